//! The embedded log's file format: one append-only file, `<dir>/log.data`, holding the topics, every
//! record and the consumer groups' offsets, the way a write-ahead log holds a database's changes.
//!
//! Why not a B-tree (the log was a redb file until the thirteenth session): a log is only ever
//! appended to and read forward, and a B-tree pays for random access it never gets. Each group
//! commit rewrote whole pages of every table it touched and checksummed them; here a group commit
//! is one `pwrite` of the bytes themselves and one `fdatasync` (see docs/performance-history.md).
//!
//! Layout:
//! - an 8-byte header, [`MAGIC`], whose last byte is the format version;
//! - then groups, one per group commit: `[4: body length, LE][4: CRC-32 of the body, LE][body]`;
//! - a body is a sequence of entries, each starting with its kind byte:
//!   - `1` topic: `[2: name length][name][4: partitions]`; topics are numbered in the order of their
//!     entries, and records and offsets name them by that number;
//!   - `2` record: `[4: topic][4: partition][8: offset][8: timestamp ms][1: 0 = no key, 1 = key]`
//!     `[4: key length, if key][key][4: value length][value]`;
//!   - `3` offset: `[2: group length][group][4: topic][4: partition][8: next offset]`.
//!
//! A checkpoint (`log.index`, see `log/checkpoint.rs`) is written in the same format: header
//! [`CHECKPOINT_MAGIC`], then one group of topic and offset entries as above and of entries found
//! only there:
//!   - `4` partition: `[4: topic][4: partition][8: end offset]`;
//!   - `5` index point: `[4: topic][4: partition][8: offset][8: position of the group holding it]`;
//!   - `6` covers: `[8: length of log.data covered][8: position of its last group][8: that group's header]`.
//!
//! All integers are little-endian. A group is written whole and synced before the next one is
//! written, so after a crash at most the last group can be torn: [`torn_tail`] finds a torn tail and
//! refuses a file that is damaged anywhere else.

use std::fs::File;
use std::os::unix::fs::FileExt;

/// The file's first bytes: a name, and the format version in the last byte.
pub(crate) const MAGIC: &[u8; 8] = b"SLLOG\0\0\x01";
/// A checkpoint file's first bytes.
pub(crate) const CHECKPOINT_MAGIC: &[u8; 8] = b"SLLOGIX\x01";
/// A group's length and checksum.
pub(crate) const GROUP_HEADER: usize = 8;
/// How much a reader fetches from the file at once.
const READ_CHUNK: usize = 128 << 10;

const TOPIC: u8 = 1;
const RECORD: u8 = 2;
const OFFSET: u8 = 3;
const PARTITION: u8 = 4;
const INDEX_POINT: u8 = 5;
const COVERS: u8 = 6;

/// One entry of a group's body, borrowing from it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Entry<'a> {
    Topic { name: &'a str, partitions: i32 },
    Record { topic: u32, partition: i32, offset: i64, timestamp_ms: i64, key: Option<&'a [u8]>, value: &'a [u8] },
    Offset { group: &'a str, topic: u32, partition: i32, next: i64 },
    /// Checkpoints only: a partition's end offset.
    Partition { topic: u32, partition: i32, end: i64 },
    /// Checkpoints only: a point of a partition's sparse index.
    IndexPoint { topic: u32, partition: i32, offset: i64, group_pos: u64 },
    /// Checkpoints only: how much of the log the checkpoint describes, and the last group of that
    /// (its position and header), by which open tells that the log is the one described.
    Covers { len: u64, last_group_pos: u64, last_group_header: [u8; GROUP_HEADER] },
}

/// Starts a group in `buf` (cleared): room for its header, filled by [`finish_group`].
pub(crate) fn start_group(buf: &mut Vec<u8>) {
    buf.clear();
    buf.extend_from_slice(&[0; GROUP_HEADER]);
}

/// Fills in the header of the group `buf` holds. `None` when the body is too long for it.
pub(crate) fn finish_group(buf: &mut [u8]) -> Option<()> {
    let (header, body) = buf.split_at_mut(GROUP_HEADER);
    let len = u32::try_from(body.len()).ok()?;
    header[..4].copy_from_slice(&len.to_le_bytes());
    header[4..].copy_from_slice(&crc32fast::hash(body).to_le_bytes());
    Some(())
}

/// A group header's (body length, CRC-32 of the body).
pub(crate) fn parse_header(header: &[u8; GROUP_HEADER]) -> (usize, u32) {
    let (len, crc) = header.split_at(4);
    (u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize, u32::from_le_bytes(crc.try_into().expect("4 bytes")))
}

/// Appends one entry to a group's body. Names fit their 2-byte lengths (topic names are at most
/// 249 characters; group names are checked by the caller) and keys and values their 4-byte ones
/// (records are limited far below 4 GiB).
pub(crate) fn put(buf: &mut Vec<u8>, entry: &Entry<'_>) {
    let short = |buf: &mut Vec<u8>, s: &str| {
        buf.extend_from_slice(&(s.len() as u16).to_le_bytes());
        buf.extend_from_slice(s.as_bytes());
    };
    match *entry {
        Entry::Topic { name, partitions } => {
            buf.push(TOPIC);
            short(buf, name);
            buf.extend_from_slice(&partitions.to_le_bytes());
        }
        Entry::Record { topic, partition, offset, timestamp_ms, key, value } => {
            buf.push(RECORD);
            buf.extend_from_slice(&topic.to_le_bytes());
            buf.extend_from_slice(&partition.to_le_bytes());
            buf.extend_from_slice(&offset.to_le_bytes());
            buf.extend_from_slice(&timestamp_ms.to_le_bytes());
            put_key(buf, key);
            buf.extend_from_slice(&(value.len() as u32).to_le_bytes());
            buf.extend_from_slice(value);
        }
        Entry::Offset { group, topic, partition, next } => {
            buf.push(OFFSET);
            short(buf, group);
            buf.extend_from_slice(&topic.to_le_bytes());
            buf.extend_from_slice(&partition.to_le_bytes());
            buf.extend_from_slice(&next.to_le_bytes());
        }
        Entry::Partition { topic, partition, end } => {
            buf.push(PARTITION);
            buf.extend_from_slice(&topic.to_le_bytes());
            buf.extend_from_slice(&partition.to_le_bytes());
            buf.extend_from_slice(&end.to_le_bytes());
        }
        Entry::IndexPoint { topic, partition, offset, group_pos } => {
            buf.push(INDEX_POINT);
            buf.extend_from_slice(&topic.to_le_bytes());
            buf.extend_from_slice(&partition.to_le_bytes());
            buf.extend_from_slice(&offset.to_le_bytes());
            buf.extend_from_slice(&group_pos.to_le_bytes());
        }
        Entry::Covers { len, last_group_pos, last_group_header } => {
            buf.push(COVERS);
            buf.extend_from_slice(&len.to_le_bytes());
            buf.extend_from_slice(&last_group_pos.to_le_bytes());
            buf.extend_from_slice(&last_group_header);
        }
    }
}

/// Syncs the directory holding `path`, so that a file just created or renamed there keeps its
/// name after a crash.
pub(crate) fn sync_parent_dir(path: &std::path::Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// A record's key as both log formats frame it: `[1: 0 = no key, 1 = key][4: key length][key]`.
pub(crate) fn put_key(buf: &mut Vec<u8>, key: Option<&[u8]>) {
    match key {
        None => buf.push(0),
        Some(key) => {
            buf.push(1);
            buf.extend_from_slice(&(key.len() as u32).to_le_bytes());
            buf.extend_from_slice(key);
        }
    }
}

/// The entries of a group's body, in order; an entry that does not parse ends it with an error.
pub(crate) struct Entries<'a> {
    rest: &'a [u8],
}

pub(crate) fn entries(body: &[u8]) -> Entries<'_> {
    Entries { rest: body }
}

impl<'a> Entries<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        if self.rest.len() < n {
            return Err(format!("entry cut short in its {what}"));
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        Ok(self.take(N, what)?.try_into().expect("took N bytes"))
    }

    fn short_str(&mut self, what: &str) -> Result<&'a str, String> {
        let len = u16::from_le_bytes(self.array(what)?) as usize;
        std::str::from_utf8(self.take(len, what)?).map_err(|_| format!("{what} is not UTF-8"))
    }

    fn bytes(&mut self, what: &str) -> Result<&'a [u8], String> {
        let len = u32::from_le_bytes(self.array(what)?) as usize;
        self.take(len, what)
    }

    fn entry(&mut self) -> Result<Entry<'a>, String> {
        let [kind] = self.array("kind")?;
        match kind {
            TOPIC => Ok(Entry::Topic { name: self.short_str("topic name")?, partitions: i32::from_le_bytes(self.array("partition count")?) }),
            RECORD => {
                let topic = u32::from_le_bytes(self.array("topic")?);
                let partition = i32::from_le_bytes(self.array("partition")?);
                let offset = i64::from_le_bytes(self.array("offset")?);
                let timestamp_ms = i64::from_le_bytes(self.array("timestamp")?);
                let key = match self.array::<1>("key flag")? {
                    [0] => None,
                    [1] => Some(self.bytes("key")?),
                    [other] => return Err(format!("bad key flag {other}")),
                };
                Ok(Entry::Record { topic, partition, offset, timestamp_ms, key, value: self.bytes("value")? })
            }
            OFFSET => Ok(Entry::Offset {
                group: self.short_str("group name")?,
                topic: u32::from_le_bytes(self.array("topic")?),
                partition: i32::from_le_bytes(self.array("partition")?),
                next: i64::from_le_bytes(self.array("next offset")?),
            }),
            PARTITION => Ok(Entry::Partition {
                topic: u32::from_le_bytes(self.array("topic")?),
                partition: i32::from_le_bytes(self.array("partition")?),
                end: i64::from_le_bytes(self.array("end offset")?),
            }),
            INDEX_POINT => Ok(Entry::IndexPoint {
                topic: u32::from_le_bytes(self.array("topic")?),
                partition: i32::from_le_bytes(self.array("partition")?),
                offset: i64::from_le_bytes(self.array("offset")?),
                group_pos: u64::from_le_bytes(self.array("group position")?),
            }),
            COVERS => Ok(Entry::Covers {
                len: u64::from_le_bytes(self.array("covered length")?),
                last_group_pos: u64::from_le_bytes(self.array("last group position")?),
                last_group_header: self.array("last group header")?,
            }),
            other => Err(format!("unknown entry kind {other}")),
        }
    }
}

impl<'a> Iterator for Entries<'a> {
    type Item = Result<Entry<'a>, String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let entry = self.entry();
        if entry.is_err() {
            self.rest = &[]; // nothing after a bad entry can be trusted
        }
        Some(entry)
    }
}

/// Why a group could not be read.
#[derive(Debug)]
pub(crate) enum Bad {
    /// The group runs past the end of what may be read.
    Short,
    /// Its body does not match its checksum.
    Checksum,
    Io(std::io::Error),
}

/// Reads groups forward from a position, up to a limit, fetching the file in large chunks.
pub(crate) struct Groups<'f> {
    file: &'f File,
    /// The position of the next group.
    pos: u64,
    /// Nothing at or past this position is read (a group being written may lie beyond it).
    limit: u64,
    /// Bytes of the file from `buf_pos`.
    buf: Vec<u8>,
    buf_pos: u64,
}

impl<'f> Groups<'f> {
    pub(crate) fn new(file: &'f File, pos: u64, limit: u64) -> Self {
        Groups { file, pos, limit, buf: Vec::new(), buf_pos: pos }
    }

    /// The position of the next group.
    pub(crate) fn position(&self) -> u64 {
        self.pos
    }

    /// `len` bytes at `pos`, from the buffer or fetched into it (with more after them).
    fn bytes_at(&mut self, pos: u64, len: usize) -> Result<&[u8], Bad> {
        if pos + len as u64 > self.limit {
            return Err(Bad::Short);
        }
        let in_buf = pos >= self.buf_pos && pos + len as u64 <= self.buf_pos + self.buf.len() as u64;
        if !in_buf {
            let fetch = (len.max(READ_CHUNK) as u64).min(self.limit - pos) as usize;
            self.buf.resize(fetch, 0);
            self.file.read_exact_at(&mut self.buf, pos).map_err(Bad::Io)?;
            self.buf_pos = pos;
        }
        let start = (pos - self.buf_pos) as usize;
        Ok(&self.buf[start..start + len])
    }

    /// The next group as (its position, its body), checked against its checksum; `None` at the
    /// limit. After an error the reader stays where the bad group starts.
    pub(crate) fn next_group(&mut self) -> Result<Option<(u64, &[u8])>, Bad> {
        let pos = self.pos;
        if pos >= self.limit {
            return Ok(None);
        }
        let header: [u8; GROUP_HEADER] = self.bytes_at(pos, GROUP_HEADER)?.try_into().expect("header length");
        let (len, crc) = parse_header(&header);
        let body_pos = pos + GROUP_HEADER as u64;
        if crc32fast::hash(self.bytes_at(body_pos, len)?) != crc {
            return Err(Bad::Checksum);
        }
        self.pos = body_pos + len as u64;
        Ok(Some((pos, self.bytes_at(body_pos, len)?)))
    }
}

/// Decides whether a bad group at `pos` is a torn tail (only the last group can be, see the module
/// documentation) or damage to stored data, which must not be cut away: if a whole, valid group
/// follows where the bad one claims to end, the bad one was written and synced before it. A torn
/// group was never synced, so no caller was told it was stored: the file is to be cut back to the
/// length returned.
pub(crate) fn torn_tail(file: &File, pos: u64, file_len: u64) -> Result<u64, String> {
    let mut header = [0u8; GROUP_HEADER];
    if pos + GROUP_HEADER as u64 <= file_len && file.read_exact_at(&mut header, pos).is_ok() {
        let claimed_end = pos + GROUP_HEADER as u64 + parse_header(&header).0 as u64;
        if claimed_end < file_len {
            let mut after = Groups::new(file, claimed_end, file_len);
            if matches!(after.next_group(), Ok(Some(_))) {
                return Err(format!(
                    "the group at byte {pos} fails its checksum but a valid group follows it at byte {claimed_end}: the file is damaged, not torn"
                ));
            }
        }
    }
    Ok(pos)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn group(entries: &[Entry<'_>]) -> Vec<u8> {
        let mut buf = Vec::new();
        start_group(&mut buf);
        for e in entries {
            put(&mut buf, e);
        }
        finish_group(&mut buf).unwrap();
        buf
    }

    fn record(offset: i64, key: Option<&'static [u8]>, value: &'static [u8]) -> Entry<'static> {
        Entry::Record { topic: 3, partition: 1, offset, timestamp_ms: -5, key, value }
    }

    #[test]
    fn every_kind_of_entry_round_trips() {
        let sent = vec![
            Entry::Topic { name: "mychannel.blocks", partitions: 4 },
            record(7, Some(b"key"), b"value"),
            record(8, None, b""),
            record(9, Some(b""), b"v"),
            Entry::Offset { group: "validator-Org1", topic: 3, partition: 1, next: 9 },
            Entry::Partition { topic: 3, partition: 1, end: 10 },
            Entry::IndexPoint { topic: 3, partition: 1, offset: 7, group_pos: 8 },
            Entry::Covers { len: 1 << 40, last_group_pos: 12345, last_group_header: [1, 2, 3, 4, 5, 6, 7, 8] },
        ];
        let buf = group(&sent);
        let got: Vec<Entry> = entries(&buf[GROUP_HEADER..]).collect::<Result<_, _>>().unwrap();
        assert_eq!(got, sent);
    }

    #[test]
    fn bad_entries_are_named_and_end_the_body() {
        let buf = group(&[record(7, Some(b"key"), b"value")]);
        let body = &buf[GROUP_HEADER..];
        let mut cut = entries(&body[..body.len() - 2]);
        assert!(cut.next().unwrap().unwrap_err().contains("value"));
        assert!(cut.next().is_none());
        assert!(entries(&[9]).next().unwrap().unwrap_err().contains("kind 9"));
        let mut flag = body.to_vec();
        flag[1 + 4 + 4 + 8 + 8] = 7;
        assert!(entries(&flag).next().unwrap().unwrap_err().contains("key flag 7"));
    }

    proptest::proptest! {
        /// Whatever a body holds, reading it names what is wrong and never panics; what was put
        /// reads back the same.
        #[test]
        fn any_body_parses_or_is_refused_and_records_round_trip(
            junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
            key in proptest::option::of(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40)),
            value in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
            offset in proptest::prelude::any::<i64>(),
        ) {
            for entry in entries(&junk) {
                if let Err(e) = entry {
                    proptest::prop_assert!(!e.is_empty());
                }
            }
            let sent = Entry::Record { topic: 1, partition: 2, offset, timestamp_ms: offset / 3, key: key.as_deref(), value: &value };
            let buf = group(&[sent]);
            let sent = Entry::Record { topic: 1, partition: 2, offset, timestamp_ms: offset / 3, key: key.as_deref(), value: &value };
            proptest::prop_assert_eq!(entries(&buf[GROUP_HEADER..]).next().unwrap().unwrap(), sent);
        }
    }

    fn file_with(groups: &[Vec<u8>]) -> (tempfile::NamedTempFile, u64) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        for g in groups {
            f.write_all(g).unwrap();
        }
        let len = f.as_file().metadata().unwrap().len();
        (f, len)
    }

    #[test]
    fn groups_read_forward_and_stop_at_the_limit() {
        let a = group(&[record(0, None, b"a")]);
        let b = group(&[record(1, None, &[7; 3 * READ_CHUNK])]);
        let c = group(&[record(2, None, b"c")]);
        let (f, len) = file_with(&[a.clone(), b.clone(), c.clone()]);
        let mut groups = Groups::new(f.as_file(), 0, len);
        let positions: Vec<u64> = std::iter::from_fn(|| groups.next_group().unwrap().map(|(p, _)| p)).collect();
        assert_eq!(positions, vec![0, a.len() as u64, (a.len() + b.len()) as u64]);
        // A limit inside a group: that group is not read.
        let mut short = Groups::new(f.as_file(), a.len() as u64, len - 1);
        assert!(short.next_group().unwrap().is_some());
        assert!(matches!(short.next_group(), Err(Bad::Short)));
        assert_eq!(short.position(), (a.len() + b.len()) as u64);
    }

    #[test]
    fn a_torn_last_group_is_cut_and_damage_before_a_valid_group_is_refused() {
        let a = group(&[record(0, None, b"a")]);
        let b = group(&[record(1, None, b"bbbb")]);
        // Torn: the last group's bytes are half there.
        let (f, len) = file_with(&[a.clone(), b[..b.len() / 2].to_vec()]);
        let mut groups = Groups::new(f.as_file(), 0, len);
        assert!(groups.next_group().unwrap().is_some());
        assert!(matches!(groups.next_group(), Err(Bad::Short)));
        assert_eq!(torn_tail(f.as_file(), groups.position(), len), Ok(a.len() as u64));
        // Torn: whole length, garbage body (the file grew but the data did not reach the disk).
        let mut zeroed = b.clone();
        zeroed[GROUP_HEADER..].fill(0);
        let (f, len) = file_with(&[a.clone(), zeroed.clone()]);
        let mut groups = Groups::new(f.as_file(), a.len() as u64, len);
        assert!(matches!(groups.next_group(), Err(Bad::Checksum)));
        assert_eq!(torn_tail(f.as_file(), a.len() as u64, len), Ok(a.len() as u64));
        // Damaged: a bad group with a good one after it.
        let (f, len) = file_with(&[a.clone(), zeroed, b]);
        let err = torn_tail(f.as_file(), a.len() as u64, len).unwrap_err();
        assert!(err.contains(&format!("byte {}", a.len())) && err.contains("damaged"), "{err}");
    }
}
