//! Read access to committed world state, as simulation and validation need it, and `MemState`, a
//! complete in-memory implementation (the reference the persistent stores are tested against).
//!
//! Keys live in namespaces, one per contract. A range `[start, end)` is in byte order of the keys;
//! an empty `end` means unbounded.

use std::collections::{BTreeMap, HashMap};

use crate::model::Version;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionedValue {
    pub value: Vec<u8>,
    pub version: Version,
}

/// Where a committed transaction id sits in the chain: what the tx-id index maps it to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxLocation {
    pub block: i64,
    pub position: i32,
    pub code: i32,
}

/// A store failed (I/O, a server down): infrastructure, never a validation verdict.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("state store: {message}")]
pub struct StateError {
    pub message: String,
    /// Worth retrying (a timeout, a server restarting) rather than stopping.
    pub retryable: bool,
}

pub type StateResult<T> = Result<T, StateError>;

/// Committed state as of the last committed block.
pub trait CommittedState {
    fn get(&self, namespace: &str, key: &str) -> StateResult<Option<VersionedValue>>;

    /// Keys in `[start, end)` in order, at most `limit` of them.
    fn range(&self, namespace: &str, start: &str, end: &str, limit: Option<usize>) -> StateResult<Vec<(String, VersionedValue)>>;

    /// Committed versions of many keys at once. Stores with a bulk read (CouchDB's `_all_docs`)
    /// override this, so that a block's reads cost one round trip.
    fn versions(&self, keys: &[(&str, &str)]) -> StateResult<Vec<Option<Version>>> {
        keys.iter().map(|(ns, k)| Ok(self.get(ns, k)?.map(|v| v.version))).collect()
    }

    /// The tx-id index.
    fn tx_location(&self, tx_id: &str) -> StateResult<Option<TxLocation>>;

    /// The tx-id index entries of many ids at once: the validator asks once per block. Stores
    /// with a bulk read override this, as for [`CommittedState::versions`].
    fn tx_locations(&self, tx_ids: &[&str]) -> StateResult<Vec<Option<TxLocation>>> {
        tx_ids.iter().map(|id| self.tx_location(id)).collect()
    }

    /// A read-only view of the state as committed now, unaffected by later commits: what an
    /// endorser simulates a batch of proposals against, so that every read of a simulation sees
    /// one committed state (as a Fabric simulator holds the state lock while it runs) and a store
    /// need not open a read transaction per key. `None` when the store has no such view (CouchDB
    /// has no snapshots); reads then go to the store and each sees the latest commit, which MVCC
    /// validation makes safe, only more prone to conflicts.
    fn snapshot(&self) -> StateResult<Option<Box<dyn CommittedState + Send + Sync + '_>>> {
        Ok(None)
    }
}

/// Is `key` inside `[start, end)`, with an empty `end` meaning unbounded?
pub fn in_range(key: &str, start: &str, end: &str) -> bool {
    key >= start && (end.is_empty() || key < end)
}

/// A key's last write in a block or a group of blocks: the value (`None`: deleted) and the version
/// that wrote it.
pub type FinalWrite = (Option<Vec<u8>>, Version);

/// The last write of each (namespace, key).
pub type FinalWrites = BTreeMap<(String, String), FinalWrite>;

/// The committed changes of one block: final value per key (`None`: deleted) with the version
/// that wrote it, and the tx-id index entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteBatch {
    pub block: i64,
    pub writes: FinalWrites,
    pub tx_index: Vec<(String, TxLocation)>,
}

/// Blocks validated but not committed yet, over committed state: what a validator that commits
/// several blocks in one store transaction validates the next block against. Reads see the
/// pending blocks' writes (the latest wins) and tx ids, then the store.
pub struct Pending<'a> {
    base: &'a dyn CommittedState,
    writes: &'a FinalWrites,
    tx_index: &'a HashMap<String, TxLocation>,
}

/// The merged writes and tx ids of the pending blocks, in block order.
#[derive(Debug, Default)]
pub struct PendingWrites {
    writes: FinalWrites,
    tx_index: HashMap<String, TxLocation>,
}

impl PendingWrites {
    /// Adds the next block's batch: its writes replace earlier ones, its tx ids do not (the first
    /// occurrence wins, as in the store).
    pub fn push(&mut self, batch: &WriteBatch) {
        for (key, write) in &batch.writes {
            self.writes.insert(key.clone(), write.clone());
        }
        for (tx_id, loc) in &batch.tx_index {
            self.tx_index.entry(tx_id.clone()).or_insert(*loc);
        }
    }

    pub fn clear(&mut self) {
        self.writes.clear();
        self.tx_index.clear();
    }

    /// `base` as it will be once the pending blocks are committed.
    pub fn over<'a>(&'a self, base: &'a dyn CommittedState) -> Pending<'a> {
        Pending { base, writes: &self.writes, tx_index: &self.tx_index }
    }
}

impl Pending<'_> {
    fn pending(&self, namespace: &str, key: &str) -> Option<&FinalWrite> {
        // The map is keyed by owned strings; a lookup by borrowed ones would need a custom key
        // type, and this runs only for the keys a block reads.
        self.writes.get(&(namespace.to_string(), key.to_string()))
    }
}

impl CommittedState for Pending<'_> {
    fn get(&self, namespace: &str, key: &str) -> StateResult<Option<VersionedValue>> {
        match self.pending(namespace, key) {
            Some((value, version)) => Ok(value.as_ref().map(|v| VersionedValue { value: v.clone(), version: *version })),
            None => self.base.get(namespace, key),
        }
    }

    fn range(&self, namespace: &str, start: &str, end: &str, limit: Option<usize>) -> StateResult<Vec<(String, VersionedValue)>> {
        let from = (namespace.to_string(), start.to_string());
        let overlay: Vec<(&String, &FinalWrite)> = self
            .writes
            .range(from..)
            .take_while(|((ns, k), _)| ns == namespace && in_range(k, start, end))
            .map(|((_, k), w)| (k, w))
            .collect();
        // Each pending key can hide or replace at most one committed key, so the first `limit`
        // keys of the merge are among the first `limit + overlay.len()` committed ones.
        let base_limit = limit.map(|l| l.saturating_add(overlay.len()));
        let mut merged: BTreeMap<String, VersionedValue> = self.base.range(namespace, start, end, base_limit)?.into_iter().collect();
        for (key, (value, version)) in overlay {
            match value {
                Some(v) => merged.insert(key.clone(), VersionedValue { value: v.clone(), version: *version }),
                None => merged.remove(key),
            };
        }
        Ok(merged.into_iter().take(limit.unwrap_or(usize::MAX)).collect())
    }

    fn versions(&self, keys: &[(&str, &str)]) -> StateResult<Vec<Option<Version>>> {
        // Only the keys no pending block wrote go to the store, in one bulk read.
        let pending: Vec<_> = keys.iter().map(|(ns, k)| self.pending(ns, k)).collect();
        let missing: Vec<(&str, &str)> = keys.iter().zip(&pending).filter(|(_, p)| p.is_none()).map(|(key, _)| *key).collect();
        let mut committed = self.base.versions(&missing)?.into_iter();
        Ok(pending
            .into_iter()
            .map(|p| match p {
                Some((value, version)) => value.as_ref().map(|_| *version),
                None => committed.next().flatten(),
            })
            .collect())
    }

    // The committed entry first: the first occurrence of an id wins, as in the store.
    fn tx_location(&self, tx_id: &str) -> StateResult<Option<TxLocation>> {
        Ok(self.base.tx_location(tx_id)?.or_else(|| self.tx_index.get(tx_id).copied()))
    }

    fn tx_locations(&self, tx_ids: &[&str]) -> StateResult<Vec<Option<TxLocation>>> {
        let committed = self.base.tx_locations(tx_ids)?;
        Ok(committed.into_iter().zip(tx_ids).map(|(loc, id)| loc.or_else(|| self.tx_index.get(*id).copied())).collect())
    }
}

/// World state in memory: complete and simple, for tests and as the reference implementation.
#[derive(Debug, Clone, Default)]
pub struct MemState {
    data: BTreeMap<String, BTreeMap<String, VersionedValue>>,
    txs: HashMap<String, TxLocation>,
    last_block: Option<i64>,
}

impl MemState {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one block's batch. Re-applying the same batch changes nothing.
    pub fn apply(&mut self, batch: &WriteBatch) {
        for ((ns, key), (value, version)) in &batch.writes {
            let space = self.data.entry(ns.clone()).or_default();
            match value {
                Some(v) => {
                    space.insert(key.clone(), VersionedValue { value: v.clone(), version: *version });
                }
                None => {
                    space.remove(key);
                }
            }
        }
        for (tx_id, loc) in &batch.tx_index {
            self.txs.entry(tx_id.clone()).or_insert(*loc);
        }
        self.last_block = Some(batch.block);
    }

    /// The last block applied.
    pub fn last_block(&self) -> Option<i64> {
        self.last_block
    }

    /// Sets a value directly, outside any block: for tests that need a starting state.
    pub fn put(&mut self, namespace: &str, key: &str, value: &[u8], version: Version) {
        self.data
            .entry(namespace.to_string())
            .or_default()
            .insert(key.to_string(), VersionedValue { value: value.to_vec(), version });
    }
}

impl CommittedState for MemState {
    fn get(&self, namespace: &str, key: &str) -> StateResult<Option<VersionedValue>> {
        Ok(self.data.get(namespace).and_then(|s| s.get(key)).cloned())
    }

    fn range(&self, namespace: &str, start: &str, end: &str, limit: Option<usize>) -> StateResult<Vec<(String, VersionedValue)>> {
        let Some(space) = self.data.get(namespace) else { return Ok(Vec::new()) };
        Ok(space
            .range(start.to_string()..)
            .take_while(|(k, _)| in_range(k, start, end))
            .take(limit.unwrap_or(usize::MAX))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn tx_location(&self, tx_id: &str) -> StateResult<Option<TxLocation>> {
        Ok(self.txs.get(tx_id).copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A write: key index (few keys, so blocks overlap), value or delete.
    fn batch_strategy(block: i64) -> impl Strategy<Value = WriteBatch> {
        (prop::collection::vec((0u8..12, prop::option::of(any::<u8>())), 0..8), prop::collection::vec(0u8..6, 0..3)).prop_map(
            move |(writes, ids)| {
                let mut b = WriteBatch { block, ..Default::default() };
                for (tx, (k, v)) in writes.into_iter().enumerate() {
                    b.writes.insert(("ns".into(), format!("k{k:02}")), (v.map(|v| vec![v]), Version::new(block, tx as i32)));
                }
                for (position, id) in ids.into_iter().enumerate() {
                    b.tx_index.push((format!("t{id}"), TxLocation { block, position: position as i32, code: 0 }));
                }
                b
            },
        )
    }

    proptest! {
        /// Committed state plus pending blocks reads exactly as the state with those blocks
        /// applied: every key, every range with and without a limit, versions and tx ids.
        #[test]
        fn pending_blocks_read_as_if_committed(
            committed in prop::collection::vec(batch_strategy(0), 1..3),
            pending in prop::collection::vec(batch_strategy(5), 1..4),
        ) {
            let mut base = MemState::new();
            committed.iter().for_each(|b| base.apply(b));
            let mut expected = base.clone();
            let mut writes = PendingWrites::default();
            for (i, b) in pending.iter().enumerate() {
                let mut b = b.clone();
                b.block += i as i64;
                expected.apply(&b);
                writes.push(&b);
            }
            let view = writes.over(&base);
            let keys: Vec<String> = (0u8..13).map(|k| format!("k{k:02}")).collect();
            for k in &keys {
                prop_assert_eq!(view.get("ns", k).unwrap(), expected.get("ns", k).unwrap());
            }
            let refs: Vec<(&str, &str)> = keys.iter().map(|k| ("ns", k.as_str())).collect();
            prop_assert_eq!(view.versions(&refs).unwrap(), expected.versions(&refs).unwrap());
            for (start, end) in [("", ""), ("k03", "k09"), ("k05", "")] {
                for limit in [None, Some(0), Some(1), Some(3)] {
                    prop_assert_eq!(view.range("ns", start, end, limit).unwrap(), expected.range("ns", start, end, limit).unwrap());
                }
            }
            let ids: Vec<String> = (0..7).map(|i| format!("t{i}")).collect();
            let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
            prop_assert_eq!(view.tx_locations(&id_refs).unwrap(), expected.tx_locations(&id_refs).unwrap());
            for id in &id_refs {
                prop_assert_eq!(view.tx_location(id).unwrap(), expected.tx_location(id).unwrap());
            }
        }
    }

    #[test]
    fn range_is_half_open_and_empty_end_is_unbounded() {
        let mut s = MemState::new();
        for k in ["a", "b", "c", "d"] {
            s.put("ns", k, b"v", Version::new(0, 0));
        }
        let keys = |v: Vec<(String, VersionedValue)>| v.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        assert_eq!(keys(s.range("ns", "b", "d", None).unwrap()), ["b", "c"]);
        assert_eq!(keys(s.range("ns", "b", "", None).unwrap()), ["b", "c", "d"]);
        assert_eq!(keys(s.range("ns", "a", "", Some(2)).unwrap()), ["a", "b"]);
        assert!(s.range("other", "", "", None).unwrap().is_empty());
    }

    #[test]
    fn apply_deletes_and_keeps_first_tx_index_entry() {
        let mut s = MemState::new();
        s.put("ns", "k", b"v", Version::new(0, 0));
        let mut b = WriteBatch { block: 1, ..Default::default() };
        b.writes.insert(("ns".into(), "k".into()), (None, Version::new(1, 0)));
        b.tx_index.push(("t".into(), TxLocation { block: 1, position: 0, code: 0 }));
        s.apply(&b);
        assert_eq!(s.get("ns", "k").unwrap(), None);
        let mut again = b.clone();
        again.tx_index[0].1.block = 9;
        s.apply(&again);
        assert_eq!(s.tx_location("t").unwrap().unwrap().block, 1);
        assert_eq!(s.last_block(), Some(1));
    }
}
