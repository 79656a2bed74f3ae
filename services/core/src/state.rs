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
}

/// Is `key` inside `[start, end)`, with an empty `end` meaning unbounded?
pub fn in_range(key: &str, start: &str, end: &str) -> bool {
    key >= start && (end.is_empty() || key < end)
}

/// The committed changes of one block: final value per key (`None`: deleted) with the version
/// that wrote it, and the tx-id index entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteBatch {
    pub block: i64,
    pub writes: BTreeMap<(String, String), (Option<Vec<u8>>, Version)>,
    pub tx_index: Vec<(String, TxLocation)>,
}

/// World state in memory: complete and simple, for tests and as the reference implementation.
#[derive(Debug, Clone, Default)]
pub struct MemState {
    data: BTreeMap<String, BTreeMap<String, VersionedValue>>,
    txs: HashMap<String, TxLocation>,
    height: Option<i64>,
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
        self.height = Some(batch.block);
    }

    /// The last block applied.
    pub fn height(&self) -> Option<i64> {
        self.height
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
        assert_eq!(s.height(), Some(1));
    }
}
