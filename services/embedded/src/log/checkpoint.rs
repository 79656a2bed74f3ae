//! Checkpoints of what open learns from the log: the topics, each partition's end offset and
//! sparse index, and the groups' offsets, as of a group boundary of `log.data`. Open starts from
//! the checkpoint and reads only the groups written after it, instead of the whole file (about
//! 1.2 s per GB), so a restart of a node with a long ledger is quick.
//!
//! The file is `log.index`, beside `log.data`, in the log's own format ([`crate::logfile`]): the
//! header [`CHECKPOINT_MAGIC`], then one checksummed group of entries. It is written:
//! - after every [`EVERY_BYTES`] of groups, by the writer, which holds the log still meanwhile;
//! - when the log is closed (dropped), so that a clean stop leaves nothing to scan;
//! - at open, after a scan of more than a little (no checkpoint yet, or a crash after the last).
//!
//! Each write goes to a temporary file, is synced, and is renamed over the old one: a crash leaves
//! the old checkpoint or the new one. A checkpoint only ever covers synced groups. It names the
//! length it covers and the position and header (length and CRC) of the last group of it, and
//! open uses it only when `log.data` has that very group there; a checkpoint that is missing,
//! damaged or of another file is ignored with a warning, and open reads the whole file as before.
//!
//! What open no longer does for the part a checkpoint covers is check each group's checksum: a
//! group damaged there is found when it is read (every read checks it), as Kafka finds damage in
//! the segments its recovery does not read.

use std::fs::File;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::PoisonError;

use super::{apply, lock, Inner, Loaded, Writer};
use crate::logfile::{self, Bad, Entry, Groups, CHECKPOINT_MAGIC, GROUP_HEADER, MAGIC};

/// A checkpoint after this many bytes of groups: a crash costs the next open a scan of at most
/// about this much (about 0.1 s: a whole 1.30 GB log took 0.57 s), and a checkpoint of a long
/// log (its index is a few bytes per MiB of file per partition; 224 KB for 1.30 GB) takes a few
/// milliseconds to write.
pub(super) const EVERY_BYTES: u64 = 256 << 20;

/// The checkpoint file of the log at `log`.
pub(super) fn path_for(log: &Path) -> PathBuf {
    log.with_file_name("log.index")
}

/// The checkpoint of the log as it stands, as one group ready to store. Call it under the writer.
pub(super) fn body(inner: &Inner, writer: &Writer) -> Vec<u8> {
    let topics = inner.topics.read().unwrap_or_else(PoisonError::into_inner);
    let mut by_id: Vec<_> = topics.values().collect();
    by_id.sort_by_key(|t| t.id);
    let mut buf = Vec::new();
    logfile::start_group(&mut buf);
    for topic in &by_id {
        logfile::put(&mut buf, &Entry::Topic { name: &topic.name, partitions: topic.partitions.len() as i32 });
    }
    for topic in &by_id {
        for (partition, state) in topic.partitions.iter().enumerate() {
            let partition = partition as i32;
            logfile::put(&mut buf, &Entry::Partition { topic: topic.id, partition, end: state.end.load(Ordering::Acquire) });
            for &(offset, group_pos) in &lock(&state.recent).index {
                logfile::put(&mut buf, &Entry::IndexPoint { topic: topic.id, partition, offset, group_pos });
            }
        }
    }
    for ((group, topic, partition), &next) in lock(&inner.group_offsets).iter() {
        // Group offsets are only committed for existing topics.
        if let Some(topic) = topics.get(topic) {
            logfile::put(&mut buf, &Entry::Offset { group, topic: topic.id, partition: *partition, next });
        }
    }
    let (last_group_pos, last_group_header) = writer.last_group.unwrap_or_default();
    logfile::put(&mut buf, &Entry::Covers { len: writer.len, last_group_pos, last_group_header });
    logfile::finish_group(&mut buf).expect("a checkpoint is far smaller than 4 GiB");
    buf
}

/// Stores `group` as the checkpoint at `path`, replacing the old one whole. Returns its size.
pub(super) fn store(path: &Path, group: &[u8]) -> std::io::Result<usize> {
    let temporary = path.with_extension("index.writing");
    let mut file = File::create(&temporary)?;
    file.write_all(CHECKPOINT_MAGIC)?;
    file.write_all(group)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)?;
    logfile::sync_parent_dir(path)?;
    Ok(CHECKPOINT_MAGIC.len() + group.len())
}

/// What the checkpoint at `path` says, if there is one; an error says why it does not fit `file`
/// (the log, `file_len` bytes long) or cannot be read.
pub(super) fn load(path: &Path, file: &File, file_len: u64) -> Result<Option<Loaded>, String> {
    let checkpoint = match File::open(path) {
        Ok(checkpoint) => checkpoint,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read it: {e}")),
    };
    let checkpoint_len = checkpoint.metadata().map_err(|e| format!("cannot read it: {e}"))?.len();
    let mut magic = [0u8; CHECKPOINT_MAGIC.len()];
    if checkpoint.read_exact_at(&mut magic, 0).is_err() || &magic != CHECKPOINT_MAGIC {
        return Err("it is not a checkpoint of a streamledger log (its first bytes)".into());
    }
    // Its one group, read and checked as the log's own groups are.
    let mut groups = Groups::new(&checkpoint, CHECKPOINT_MAGIC.len() as u64, checkpoint_len);
    let body = match groups.next_group() {
        Ok(Some((_, body))) => body,
        Ok(None) | Err(Bad::Short) => return Err("it is cut short".into()),
        Err(Bad::Checksum) => return Err("it fails its checksum".into()),
        Err(Bad::Io(e)) => return Err(format!("cannot read it: {e}")),
    };
    let mut loaded = Loaded::empty();
    let mut covers = None;
    for entry in logfile::entries(body) {
        let entry = entry?;
        match entry {
            Entry::Topic { .. } | Entry::Offset { .. } => apply(&mut loaded, entry, 0)?,
            Entry::Partition { topic, partition, end } => {
                let state = partition_of(&loaded, topic, partition)?;
                if end < 0 {
                    return Err(format!("partition {partition} of topic number {topic} ends at offset {end}"));
                }
                state.end.store(end, Ordering::Relaxed);
                lock(&state.recent).first = end;
            }
            Entry::IndexPoint { topic, partition, offset, group_pos } => {
                let state = partition_of(&loaded, topic, partition)?;
                let mut recent = lock(&state.recent);
                let ascending = recent.index.last().is_none_or(|&(o, p)| offset > o && group_pos > p);
                if !ascending || offset >= recent.first || group_pos < MAGIC.len() as u64 {
                    return Err(format!("index point (offset {offset}, byte {group_pos}) out of order for partition {partition} of topic number {topic}"));
                }
                recent.index.push((offset, group_pos));
            }
            Entry::Covers { len, last_group_pos, last_group_header } => covers = Some((len, last_group_pos, last_group_header)),
            Entry::Record { .. } => return Err("it holds a record".into()),
        }
    }
    if groups.position() != checkpoint_len {
        return Err(format!("it has {} bytes after its group", checkpoint_len - groups.position()));
    }
    let (len, last_group_pos, last_group_header) = covers.ok_or("it does not say what it covers")?;
    fits(file, file_len, len, last_group_pos, last_group_header)?;
    loaded.len = len;
    loaded.scanned_from = len;
    loaded.checkpointed_len = len;
    loaded.last_group = (last_group_pos != 0).then_some((last_group_pos, last_group_header));
    Ok(Some(loaded))
}

fn partition_of(loaded: &Loaded, topic: u32, partition: i32) -> Result<&super::PartitionState, String> {
    let topic = loaded.topics.get(topic as usize).ok_or(format!("topic number {topic} is not in it"))?;
    topic.partition(partition).map_err(|e| e.to_string())
}

/// Whether the log is the one the checkpoint was taken of: the group it names as its last one is
/// there, with the same header, and ends where the checkpoint does.
fn fits(file: &File, file_len: u64, len: u64, last_group_pos: u64, last_group_header: [u8; GROUP_HEADER]) -> Result<(), String> {
    if len > file_len {
        return Err(format!("it covers {len} bytes of a log of {file_len} bytes"));
    }
    if last_group_pos == 0 {
        return if len == MAGIC.len() as u64 { Ok(()) } else { Err(format!("it covers {len} bytes but names no last group")) };
    }
    let mut header = [0u8; GROUP_HEADER];
    file.read_exact_at(&mut header, last_group_pos).map_err(|e| format!("cannot read the log's group at byte {last_group_pos}: {e}"))?;
    let (body_len, _) = logfile::parse_header(&header);
    if header != last_group_header || last_group_pos + (GROUP_HEADER + body_len) as u64 != len {
        return Err(format!("the log's group at byte {last_group_pos} is not the one it names: it was taken of another log"));
    }
    Ok(())
}

