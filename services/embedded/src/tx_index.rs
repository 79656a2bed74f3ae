//! [`TxIndex`]: a peer's tx-id index (tx id → block, position, code) in an LSM tree (fjall),
//! beside the peer store's redb file.
//!
//! Why not a redb table like the rest of the store: tx ids are hashes, so each insert lands on a
//! random leaf of a B-tree, and redb's copy-on-write commit copies and rewrites every leaf a block
//! touches. That cost grows with the ledger (measured in docs/performance-history.md: from 7 µs
//! to about 29 µs per transaction and peer between the first 350,000 and 3.85 million
//! transactions). An LSM tree appends instead, and answers the common lookup, an id it has never
//! seen, from its Bloom filters. Fabric keeps the same index in LevelDB for the same reason.
//!
//! The index is not in redb's write transaction, so the store keeps it a superset of what redb
//! has committed: a block's ids are written here before redb commits the block, and persisted
//! before any durable redb commit. After a crash or a lost volatile commit, the index may hold
//! the ids of blocks redb no longer has ("ghosts"). Two rules make them harmless:
//! - a lookup answers only entries of blocks up to the reader's savepoint;
//! - on open, the ids of every block after the savepoint are removed, using the per-block lists
//!   kept for that purpose (pruned once a durable commit has passed them).

use std::path::{Path, PathBuf};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use streamledger_core::state::TxLocation;

/// The LSM tree's block cache. The lookups are mostly of ids it has never seen, answered by the
/// Bloom filters, so a small cache serves.
const CACHE_BYTES: u64 = 16 * 1024 * 1024;
/// The largest memtable of the ids, and of the per-block lists: fjall's default (64 MiB each)
/// added about 260 MiB to the bench's resident memory with two peers.
const IDS_MEMTABLE_BYTES: u64 = 16 * 1024 * 1024;
const LISTS_MEMTABLE_BYTES: u64 = 8 * 1024 * 1024;

pub(crate) struct TxIndex {
    db: Database,
    /// tx id → block (i64), position (i32), code (i32), big-endian.
    ids: Keyspace,
    /// block number (i64, big-endian) → the tx ids it put in `ids`, each preceded by its length
    /// (u32): what removing a ghost block needs. Kept only for blocks not yet durable in redb.
    blocks: Keyspace,
    /// [`THROUGH`]: the last block whose ids were added, which on open must be at least the
    /// store's savepoint (else the index lost entries and cannot answer for the chain).
    meta: Keyspace,
}

const THROUGH: &str = "through";

/// The directory of the index of the store at `store_path` (`peer.redb` → `peer.txindex`).
pub(crate) fn dir_for(store_path: &Path) -> PathBuf {
    store_path.with_extension("txindex")
}

impl TxIndex {
    pub(crate) fn open(dir: &Path) -> fjall::Result<TxIndex> {
        // One background worker: flushes and compactions are small next to the pipeline's work,
        // and on a 2-core machine more threads only contend with it.
        let db = Database::builder(dir).cache_size(CACHE_BYTES).worker_threads(1).open()?;
        let ids = db.keyspace("tx_ids", || KeyspaceCreateOptions::default().max_memtable_size(IDS_MEMTABLE_BYTES))?;
        let blocks = db.keyspace("blocks", || KeyspaceCreateOptions::default().max_memtable_size(LISTS_MEMTABLE_BYTES))?;
        let meta = db.keyspace("meta", || KeyspaceCreateOptions::default().max_memtable_size(1024 * 1024))?;
        Ok(TxIndex { db, ids, blocks, meta })
    }

    /// Where `tx_id` was committed, if in a block up to `last_block` (the reader's savepoint;
    /// later entries are ghosts or not committed yet).
    pub(crate) fn get(&self, tx_id: &str, last_block: Option<i64>) -> fjall::Result<Option<TxLocation>> {
        let Some(last_block) = last_block else { return Ok(None) };
        Ok(self.ids.get(tx_id.as_bytes())?.map(|v| decode(&v)).filter(|loc| loc.block <= last_block))
    }

    /// Adds the ids of `blocks` (in chain order, each after `last_block`, the savepoint they
    /// follow) in one atomic batch. The first occurrence of an id wins: an entry of a block up to
    /// `last_block`, or of an earlier block of this batch, is kept; a ghost is overwritten.
    pub(crate) fn add<'a>(&self, last_block: Option<i64>, blocks: impl IntoIterator<Item = (i64, &'a [(String, TxLocation)])>) -> fjall::Result<()> {
        let mut batch = self.db.batch();
        let mut added: std::collections::HashSet<&str> = std::collections::HashSet::new();
        let mut through = None;
        for (number, entries) in blocks {
            through = Some(number);
            let mut list = Vec::with_capacity(entries.len() * 68);
            for (tx_id, loc) in entries {
                if added.contains(tx_id.as_str()) || self.get(tx_id, last_block)?.is_some() {
                    continue;
                }
                added.insert(tx_id);
                batch.insert(&self.ids, tx_id.as_bytes(), encode(loc));
                list.extend_from_slice(&(tx_id.len() as u32).to_be_bytes());
                list.extend_from_slice(tx_id.as_bytes());
            }
            batch.insert(&self.blocks, number.to_be_bytes(), list);
        }
        if let Some(through) = through {
            batch.insert(&self.meta, THROUGH, through.to_be_bytes());
        }
        batch.commit()
    }

    /// The last block whose ids were added, if any.
    pub(crate) fn indexed_through(&self) -> fjall::Result<Option<i64>> {
        Ok(self.meta.get(THROUGH)?.map(|v| i64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8]))))
    }

    /// Removes the entries of the blocks after `last_block` (the savepoint redb opened at): the
    /// ghosts of commits redb lost. The index then holds the chain through `last_block`.
    pub(crate) fn discard_after(&self, last_block: Option<i64>) -> fjall::Result<usize> {
        let from = last_block.map_or(0, |b| b + 1);
        let mut batch = self.db.batch();
        let mut discarded = 0;
        let mut ghost_blocks = false;
        for entry in self.blocks.range(from.to_be_bytes()..) {
            let (key, list) = entry.into_inner()?;
            let number = i64::from_be_bytes(key.as_ref().try_into().unwrap_or([0xff; 8]));
            for tx_id in ids_in(&list) {
                // Only this block's entry: an id a committed block holds stays.
                if self.ids.get(tx_id)?.is_some_and(|v| decode(&v).block == number) {
                    batch.remove(&self.ids, tx_id);
                    discarded += 1;
                }
            }
            batch.remove(&self.blocks, key);
            ghost_blocks = true;
        }
        if ghost_blocks {
            match last_block {
                Some(last_block) => batch.insert(&self.meta, THROUGH, last_block.to_be_bytes()),
                None => batch.remove(&self.meta, THROUGH),
            }
        }
        batch.commit()?;
        Ok(discarded)
    }

    /// Forgets the per-block lists of blocks `from..=through`: redb has made them durable, so
    /// no crash can turn them into ghosts.
    pub(crate) fn forget_lists(&self, from: i64, through: i64) -> fjall::Result<()> {
        if from > through {
            return Ok(());
        }
        let mut batch = self.db.batch();
        for number in from..=through {
            batch.remove(&self.blocks, number.to_be_bytes());
        }
        batch.commit()
    }

    /// The first block whose list is kept, if any: where [`Self::forget_lists`] starts after an open.
    pub(crate) fn first_list(&self) -> fjall::Result<Option<i64>> {
        Ok(self.blocks.first_key_value().map(|kv| kv.key()).transpose()?.map(|k| i64::from_be_bytes(k.as_ref().try_into().unwrap_or([0; 8]))))
    }

    /// Adds entries of blocks committed through `last_block` as they are (the move from the
    /// redb table).
    pub(crate) fn add_committed<'a>(&self, entries: impl IntoIterator<Item = (&'a str, TxLocation)>, last_block: Option<i64>) -> fjall::Result<()> {
        let mut batch = self.db.batch();
        for (tx_id, loc) in entries {
            batch.insert(&self.ids, tx_id.as_bytes(), encode(&loc));
        }
        if let Some(last_block) = last_block {
            batch.insert(&self.meta, THROUGH, last_block.to_be_bytes());
        }
        batch.commit()
    }

    /// Writes what the index holds to disk (fsync): before any durable redb commit.
    pub(crate) fn persist(&self) -> fjall::Result<()> {
        self.db.persist(PersistMode::SyncData)
    }
}

fn encode(loc: &TxLocation) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&loc.block.to_be_bytes());
    v[8..12].copy_from_slice(&loc.position.to_be_bytes());
    v[12..].copy_from_slice(&loc.code.to_be_bytes());
    v
}

fn decode(v: &[u8]) -> TxLocation {
    let field = |range: std::ops::Range<usize>| v.get(range).unwrap_or(&[]);
    let i64_at = |r| i64::from_be_bytes(field(r).try_into().unwrap_or([0; 8]));
    let i32_at = |r| i32::from_be_bytes(field(r).try_into().unwrap_or([0; 4]));
    TxLocation { block: i64_at(0..8), position: i32_at(8..12), code: i32_at(12..16) }
}

/// The ids of a per-block list.
fn ids_in(list: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = list;
    std::iter::from_fn(move || {
        let (len, tail) = rest.split_first_chunk::<4>()?;
        let len = u32::from_be_bytes(*len) as usize;
        let (id, tail) = tail.split_at_checked(len)?;
        rest = tail;
        Some(id)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(block: i64, position: i32) -> TxLocation {
        TxLocation { block, position, code: 0 }
    }

    fn entries(block: i64, ids: &[&str]) -> Vec<(String, TxLocation)> {
        ids.iter().enumerate().map(|(p, id)| (id.to_string(), loc(block, p as i32))).collect()
    }

    #[test]
    fn lookups_answer_only_blocks_up_to_the_readers_savepoint() {
        let dir = tempfile::tempdir().unwrap();
        let index = TxIndex::open(dir.path()).unwrap();
        index.add(None, [(0, entries(0, &["a", "b"]).as_slice())]).unwrap();
        index.add(Some(0), [(1, entries(1, &["c"]).as_slice())]).unwrap();
        assert_eq!(index.get("a", Some(0)).unwrap(), Some(loc(0, 0)));
        assert_eq!(index.get("c", Some(0)).unwrap(), None, "block 1 is after the savepoint");
        assert_eq!(index.get("c", Some(1)).unwrap(), Some(loc(1, 0)));
        assert_eq!(index.get("a", None).unwrap(), None, "no savepoint: nothing is committed");
    }

    #[test]
    fn the_first_occurrence_wins_and_a_ghost_is_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let index = TxIndex::open(dir.path()).unwrap();
        index.add(None, [(0, entries(0, &["a", "a"]).as_slice())]).unwrap();
        assert_eq!(index.get("a", Some(0)).unwrap(), Some(loc(0, 0)), "within a block");
        index.add(Some(0), [(1, entries(1, &["x", "a"]).as_slice()), (2, entries(2, &["x"]).as_slice())]).unwrap();
        assert_eq!(index.get("a", Some(2)).unwrap(), Some(loc(0, 0)), "a committed block's entry stays");
        assert_eq!(index.get("x", Some(2)).unwrap(), Some(loc(1, 0)), "within a batch");
        // Blocks 1 and 2 lost (the savepoint is still 0): a different block 1 overwrites the ghost.
        index.add(Some(0), [(1, entries(1, &["y", "z", "x"]).as_slice())]).unwrap();
        assert_eq!(index.get("x", Some(1)).unwrap(), Some(loc(1, 2)));
    }

    #[test]
    fn discarding_removes_only_the_ghosts_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let index = TxIndex::open(dir.path()).unwrap();
            index.add(None, [(0, entries(0, &["a", "b"]).as_slice()), (1, entries(1, &["c", "a"]).as_slice())]).unwrap();
            index.add(Some(1), [(2, entries(2, &["d"]).as_slice())]).unwrap();
            index.persist().unwrap();
        }
        let index = TxIndex::open(dir.path()).unwrap();
        assert_eq!(index.discard_after(Some(0)).unwrap(), 2, "c and d; a belongs to block 0");
        assert_eq!(index.get("a", Some(9)).unwrap(), Some(loc(0, 0)));
        assert_eq!(index.get("c", Some(9)).unwrap(), None);
        assert_eq!(index.get("d", Some(9)).unwrap(), None);
        assert_eq!(index.first_list().unwrap(), Some(0), "block 0's list is kept until forgotten");
        index.forget_lists(0, 0).unwrap();
        assert_eq!(index.first_list().unwrap(), None);
        assert_eq!(index.discard_after(None).unwrap(), 0, "without lists nothing is a ghost");
        assert_eq!(index.get("b", Some(0)).unwrap(), Some(loc(0, 1)));
    }

    #[test]
    fn per_block_lists_round_trip_any_id() {
        let ids = ["", "a", &"x".repeat(300), "\u{1F600}"];
        let mut list = Vec::new();
        for id in ids {
            list.extend_from_slice(&(id.len() as u32).to_be_bytes());
            list.extend_from_slice(id.as_bytes());
        }
        let back: Vec<&[u8]> = ids_in(&list).collect();
        assert_eq!(back, ids.iter().map(|s| s.as_bytes()).collect::<Vec<_>>());
        assert_eq!(ids_in(&[0, 0, 0, 5, b'a']).count(), 0, "a truncated list ends, it does not panic");
    }
}
