//! Converts a log written before the thirteenth session (a redb file, `log.redb`) into the
//! append-only file of [`crate::logfile`], so that a data dir keeps its ledger and its consumer
//! groups' offsets across the upgrade. [`crate::log::EmbeddedLog::open`] runs it when it finds
//! only the old file.
//!
//! The new file is written as `log.data.converting`, synced, and renamed into place only when
//! complete, so a crash during the conversion leaves nothing half-done: the next open starts over.
//! The old file is left as it was; once the new one exists the old one is no longer read.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use streamledger_ports::log::{LogError, LogResult};

use crate::logfile::{self, Entry, MAGIC};

// The old layout, kept only to read it: see `git show 973364c:services/embedded/src/log.rs`.
const TOPICS: TableDefinition<&str, i32> = TableDefinition::new("topics");
const GROUP_OFFSETS: TableDefinition<(&str, &str, i32), i64> = TableDefinition::new("group-offsets");

fn records_table(table_name: &str) -> TableDefinition<'_, (i32, i64), &'static [u8]> {
    TableDefinition::new(table_name)
}

/// A group is written once it holds this much.
const GROUP_BYTES: usize = 1 << 20;

/// What a conversion carried over.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Converted {
    pub topics: usize,
    pub records: u64,
    pub group_offsets: usize,
}

/// An old record's timestamp, key and value.
type OldRecord<'a> = (i64, Option<&'a [u8]>, &'a [u8]);

/// One old record's fields, from its frame: `[1: version 1][8: timestamp ms][1: key flag]`
/// `[4: key length, if key][key][value]`, all little-endian.
fn old_frame(frame: &[u8]) -> Result<OldRecord<'_>, String> {
    let (&version, rest) = frame.split_first().ok_or("empty frame")?;
    if version != 1 {
        return Err(format!("unknown frame version {version}"));
    }
    let (ts, rest) = rest.split_first_chunk::<8>().ok_or("frame too short for a timestamp")?;
    let (&has_key, rest) = rest.split_first().ok_or("frame too short for the key flag")?;
    let (key, value) = match has_key {
        0 => (None, rest),
        1 => {
            let (len, rest) = rest.split_first_chunk::<4>().ok_or("frame too short for the key length")?;
            let len = u32::from_le_bytes(*len) as usize;
            if len > rest.len() {
                return Err(format!("key length {len} runs past the frame"));
            }
            let (key, value) = rest.split_at(len);
            (Some(key), value)
        }
        other => return Err(format!("bad key flag {other}")),
    };
    Ok((i64::from_le_bytes(*ts), key, value))
}

/// The new file being written, a group at a time.
struct Output {
    file: File,
    buf: Vec<u8>,
}

impl Output {
    fn put(&mut self, entry: &Entry<'_>) -> std::io::Result<()> {
        logfile::put(&mut self.buf, entry);
        if self.buf.len() >= GROUP_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.len() > logfile::GROUP_HEADER {
            logfile::finish_group(&mut self.buf).ok_or_else(|| std::io::Error::other("a group over 4 GiB"))?;
            self.file.write_all(&self.buf)?;
        }
        logfile::start_group(&mut self.buf);
        Ok(())
    }
}

/// Converts the redb log at `old` into the file `new`, which must not exist yet. Blocking.
pub(crate) fn convert(old: &Path, new: &Path) -> LogResult<Converted> {
    let context = || format!("convert the log {} of an earlier version into {}", old.display(), new.display());
    let fail = |what: String| LogError::new(context(), what, false);
    let old_err = |e: &dyn std::fmt::Display| fail(format!("{}: {e}", old.display()));
    // Opening it locks it, so two processes cannot convert at once; the one that comes second
    // finds the converted file below and leaves it.
    let db = crate::open_database(old).map_err(|e| old_err(&e))?;
    if new.exists() {
        return Ok(Converted { topics: 0, records: 0, group_offsets: 0 });
    }
    let txn = db.begin_read().map_err(|e| old_err(&e))?;
    let mut topics = Vec::new();
    for entry in txn.open_table(TOPICS).map_err(|e| old_err(&e))?.iter().map_err(|e| old_err(&e))? {
        let (name, partitions) = entry.map_err(|e| old_err(&e))?;
        topics.push((name.value().to_string(), partitions.value()));
    }
    let tmp = new.with_extension("data.converting");
    let io_err = |e: std::io::Error| fail(format!("writing {}: {e}", tmp.display()));
    let mut out = Output { file: File::create(&tmp).map_err(io_err)?, buf: Vec::new() };
    let written = write(&txn, &topics, &mut out, &tmp, old, &fail);
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp); // the next open starts over anyway
    }
    let (records, group_offsets) = written?;
    std::fs::rename(&tmp, new).map_err(|e| fail(format!("renaming {} to {}: {e}", tmp.display(), new.display())))?;
    logfile::sync_parent_dir(new).map_err(|e| fail(format!("syncing the directory of {}: {e}", new.display())))?;
    Ok(Converted { topics: topics.len(), records, group_offsets })
}

/// Writes and syncs the whole new file, `path`: the topics, every record, the groups' offsets.
/// Returns how many records and offsets it wrote.
fn write(
    txn: &redb::ReadTransaction,
    topics: &[(String, i32)],
    out: &mut Output,
    path: &Path,
    old: &Path,
    fail: &dyn Fn(String) -> LogError,
) -> LogResult<(u64, usize)> {
    let old_err = |e: &dyn std::fmt::Display| fail(format!("{}: {e}", old.display()));
    let io_err = |e: std::io::Error| fail(format!("writing {}: {e}", path.display()));
    out.file.write_all(MAGIC).map_err(io_err)?;
    logfile::start_group(&mut out.buf);
    for (name, partitions) in topics {
        out.put(&Entry::Topic { name, partitions: *partitions }).map_err(io_err)?;
    }
    let (mut records, mut reported) = (0u64, Instant::now());
    for (id, (name, partitions)) in topics.iter().enumerate() {
        let table = txn.open_table(records_table(&format!("records:{name}"))).map_err(|e| old_err(&e))?;
        for partition in 0..*partitions {
            let at = |offset: i64| format!("partition {partition} of topic {name} at offset {offset} in {}", old.display());
            for (expected, entry) in (0i64..).zip(table.range((partition, 0)..=(partition, i64::MAX)).map_err(|e| old_err(&e))?) {
                let (key, frame) = entry.map_err(|e| fail(format!("{}: {e}", at(expected))))?;
                let offset = key.value().1;
                if offset != expected {
                    return Err(fail(format!("{}: record missing (next found: {offset})", at(expected))));
                }
                let frame = frame.value();
                let (timestamp_ms, key, value) = old_frame(frame).map_err(|m| fail(format!("{}: corrupt record: {m}", at(offset))))?;
                out.put(&Entry::Record { topic: id as u32, partition, offset, timestamp_ms, key, value }).map_err(io_err)?;
                records += 1;
                if reported.elapsed() >= Duration::from_secs(2) {
                    tracing::info!(file = %old.display(), records, topic = name, "converting the log of an earlier version");
                    reported = Instant::now();
                }
            }
        }
    }
    let mut group_offsets = 0;
    for entry in txn.open_table(GROUP_OFFSETS).map_err(|e| old_err(&e))?.iter().map_err(|e| old_err(&e))? {
        let (key, next) = entry.map_err(|e| old_err(&e))?;
        let (group, topic, partition) = key.value();
        let Some(id) = topics.iter().position(|(name, _)| name == topic) else {
            return Err(fail(format!("{}: group {group} has an offset in topic {topic}, which it does not hold", old.display())));
        };
        out.put(&Entry::Offset { group, topic: id as u32, partition, next: next.value() }).map_err(io_err)?;
        group_offsets += 1;
    }
    out.flush().map_err(io_err)?;
    out.file.sync_all().map_err(io_err)?;
    Ok((records, group_offsets))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A frame as the old log wrote it.
    fn frame(timestamp_ms: i64, key: Option<&[u8]>, value: &[u8]) -> Vec<u8> {
        let mut buf = vec![1];
        buf.extend_from_slice(&timestamp_ms.to_le_bytes());
        logfile::put_key(&mut buf, key);
        buf.extend_from_slice(value);
        buf
    }

    /// Writes an old-format log: topic `t` (2 partitions) and `u` (1), and group `g`'s offsets.
    pub(crate) fn write_old_log(path: &Path, bad_frame_at: Option<i64>) {
        let db = crate::open_database(path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut topics = txn.open_table(TOPICS).unwrap();
            topics.insert("t", 2).unwrap();
            topics.insert("u", 1).unwrap();
            let mut t = txn.open_table(records_table("records:t")).unwrap();
            for offset in 0..5i64 {
                let value = if bad_frame_at == Some(offset) { vec![9, 9] } else { frame(1000 + offset, Some(b"k"), &[offset as u8; 3]) };
                t.insert((0, offset), value.as_slice()).unwrap();
            }
            t.insert((1, 0), frame(7, None, b"").as_slice()).unwrap();
            let mut u = txn.open_table(records_table("records:u")).unwrap();
            u.insert((0, 0), frame(8, Some(b""), b"u0").as_slice()).unwrap();
            let mut offsets = txn.open_table(GROUP_OFFSETS).unwrap();
            offsets.insert(("g", "t", 0), 3).unwrap();
            offsets.insert(("g", "u", 0), 1).unwrap();
        }
        txn.commit().unwrap();
    }

    #[test]
    fn old_frames_are_read_and_bad_ones_named() {
        assert_eq!(old_frame(&frame(-5, Some(b"key"), b"value")).unwrap(), (-5, Some(&b"key"[..]), &b"value"[..]));
        assert_eq!(old_frame(&frame(7, None, b"")).unwrap(), (7, None, &b""[..]));
        assert!(old_frame(&frame(7, Some(b"key"), b"v")[..12]).unwrap_err().contains("key length"));
        assert!(old_frame(&[9]).unwrap_err().contains("version 9"));
    }

    #[test]
    fn a_bad_old_record_stops_the_conversion_naming_it_and_nothing_is_renamed() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (dir.path().join("log.redb"), dir.path().join("log.data"));
        write_old_log(&old, Some(3));
        let err = convert(&old, &new).unwrap_err().to_string();
        assert!(err.contains("partition 0 of topic t at offset 3") && err.contains("log.redb") && err.contains("version 9"), "{err}");
        assert!(!new.exists(), "no half-converted log in place");
    }
}
