//! What a publishing peer derives from a block it commits: the `state-changes` records (one per
//! key the block's valid transactions wrote) and the `tx-results` rows (one per tx-id index
//! entry). Both are read straight from the block's validation (its write batch and per-transaction
//! fields), never recomputed, so they say exactly what the peer committed.

use std::collections::BTreeMap;

use crate::model::{StateChange, TxResultRow, Version};
use crate::validation::{BlockValidation, TxValidationCode};

/// Everything but RFC 3986's unreserved characters is escaped.
const KEY_ESCAPES: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// The Kafka key of a `state-changes` record: `<namespace>:<key>`, each part percent-encoded
/// (so a `:` inside either is `%3A` and the mapping is one to one). One key always gets the same
/// Kafka key, hence one partition and its changes in order; and a sink can put the key in a URL
/// path as it is: the CouchDB sink addresses the document `<namespace>:<key>` with it. (Not `/`
/// as the separator: an encoded `%2F` in a document path is decoded before routing by some
/// CouchDB-API servers, pouchdb-server among them.)
pub fn state_change_key(namespace: &str, key: &str) -> String {
    let enc = |s| percent_encoding::utf8_percent_encode(s, KEY_ESCAPES);
    format!("{}:{}", enc(namespace), enc(key))
}

/// One record per key the block's valid transactions wrote, with its final value in the block,
/// in commit order (by transaction position, then namespace and key). The write batch holds only
/// a key's last write of the block, as the state does: an earlier write of the same key in the
/// same block was never visible to anyone, so it is not published either.
pub fn state_changes(channel: &str, v: &BlockValidation) -> Vec<StateChange> {
    let mut changes: Vec<StateChange> = v
        .batch
        .writes
        .iter()
        .map(|((namespace, key), (value, version))| StateChange {
            channel: channel.to_string(),
            block_number: version.block,
            tx_index: version.tx,
            // Every write comes from a VALID transaction, which decoded, so it has its id.
            tx_id: v.tx_ids.get(version.tx as usize).cloned().unwrap_or_default(),
            namespace: namespace.clone(),
            key: key.clone(),
            value: value.clone(),
            is_delete: value.is_none(),
            version: *version,
        })
        .collect();
    changes.sort_by(|a, b| (a.tx_index, &a.namespace, &a.key).cmp(&(b.tx_index, &b.namespace, &b.key)));
    changes
}

/// One row per entry the block adds to the tx-id index, in block order. Transactions that do not
/// claim their id (undecodable, forged creator, or a DUPLICATE_TXID copy) are left out: an upsert
/// on tx id would otherwise let a duplicate overwrite the row of the transaction that really owns
/// the id. Those still appear, with their codes, in `validated-blocks`.
pub fn tx_results(channel: &str, peer: &str, block_hash: &[u8], v: &BlockValidation, commit_timestamp_ms: i64) -> Vec<TxResultRow> {
    let at = |list: &[String], i: usize| list.get(i).cloned().unwrap_or_default();
    v.batch
        .tx_index
        .iter()
        .map(|(tx_id, loc)| {
            let i = loc.position as usize;
            TxResultRow {
                tx_id: tx_id.clone(),
                channel: channel.to_string(),
                block_number: loc.block,
                tx_index: loc.position,
                validation_code: loc.code,
                validation_code_name: TxValidationCode::name_of(loc.code),
                contract: at(&v.contracts, i),
                function: at(&v.functions, i),
                creator_org: at(&v.creator_orgs, i),
                block_hash: hex::encode(block_hash),
                peer: peer.to_string(),
                commit_timestamp_ms,
            }
        })
        .collect()
}

/// World state as `(namespace, key) -> (value, version)`.
pub type Folded = BTreeMap<(String, String), (Vec<u8>, Version)>;

/// Folds state changes, in log order per key, into world state as an upserting sink does: a
/// change older than the version held is ignored (a re-published block after a crash), a value
/// puts, a delete removes. For tests and tools that check a sink's copy against a peer.
pub fn fold(changes: impl IntoIterator<Item = StateChange>) -> Folded {
    let mut state = Folded::new();
    let mut deleted: BTreeMap<(String, String), Version> = BTreeMap::new();
    for c in changes {
        let k = (c.namespace, c.key);
        let held = state.get(&k).map(|(_, v)| *v).or_else(|| deleted.get(&k).copied());
        if held.is_some_and(|v| v > c.version) {
            continue;
        }
        match c.value {
            Some(value) => {
                deleted.remove(&k);
                state.insert(k, (value, c.version));
            }
            None => {
                state.remove(&k);
                deleted.insert(k, c.version);
            }
        }
    }
    state
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{Fixture, Rw};
    use crate::state::MemState;
    use crate::validation::{validate_block, AnyWrite};

    #[test]
    fn keys_are_one_url_segment_and_distinct() {
        assert_eq!(state_change_key("transfer", "alice"), "transfer:alice");
        assert_eq!(state_change_key("kv", "a b/c?é:"), "kv:a%20b%2Fc%3F%C3%A9%3A");
        assert_ne!(state_change_key("a:b", "c"), state_change_key("a", "b:c"));
        assert_ne!(state_change_key("kv", "a b"), state_change_key("kv", "a+b"));
    }

    #[test]
    fn changes_and_rows_come_from_the_batch_in_commit_order() {
        let f = Fixture::new();
        let state = MemState::new();
        // tx0 writes a and b, tx1 deletes a (blind: both valid), tx2 is a duplicate of tx1.
        let t0 = f.tx(Rw::new().write("a", "2").write("b", "1").build());
        let t1 = f.tx(Rw::new().delete("a").build());
        let block = f.block(0, &crate::cutter::GENESIS_PREVIOUS_HASH, &[t0.clone(), t1.clone(), t1.clone()]);
        let v = validate_block(&f.network, &AnyWrite, &state, &block, &crate::validation::GENESIS_STATE_HASH).unwrap();
        assert_eq!(v.codes[2], TxValidationCode::DuplicateTxid);

        let changes = state_changes("mychannel", &v);
        let summary: Vec<(i32, &str, Option<&[u8]>, bool)> =
            changes.iter().map(|c| (c.tx_index, c.key.as_str(), c.value.as_deref(), c.is_delete)).collect();
        // a's final value in the block is tx1's delete; b stays tx0's write.
        assert_eq!(summary, [(0, "b", Some(&b"1"[..]), false), (1, "a", None, true)]);
        assert_eq!(changes[1].tx_id, t1.proposal.tx_id);
        assert!(changes.iter().all(|c| c.version.block == 0 && c.version.tx == c.tx_index && c.channel == "mychannel"));

        let rows = tx_results("mychannel", "Org1.peer0", &[0xab; 2], &v, 7);
        let ids: Vec<(&str, i32, &str)> = rows.iter().map(|r| (r.tx_id.as_str(), r.tx_index, r.validation_code_name.as_str())).collect();
        assert_eq!(ids, [(t0.proposal.tx_id.as_str(), 0, "VALID"), (t1.proposal.tx_id.as_str(), 1, "VALID")], "the duplicate has no row of its own");
        assert_eq!((rows[0].block_hash.as_str(), rows[0].contract.as_str(), rows[0].commit_timestamp_ms), ("abab", t0.proposal.contract.as_str(), 7));
        assert_eq!((rows[0].function.as_str(), rows[0].creator_org.as_str()), (t0.proposal.function.as_str(), t0.proposal.creator.org.as_str()));

        // Folding, also with block 0 published twice (as after a crash): b stays, a is gone.
        let folded = fold(changes.iter().cloned().chain(changes.iter().cloned()));
        assert_eq!(folded.into_iter().collect::<Vec<_>>(), [(("kv".to_string(), "b".to_string()), (b"1".to_vec(), crate::model::Version::new(0, 0)))]);
    }

    #[test]
    fn an_older_change_delivered_late_does_not_overwrite_or_resurrect() {
        let change = |value: Option<&str>, block: i64| StateChange {
            channel: "c".into(),
            block_number: block,
            tx_index: 0,
            tx_id: "t".into(),
            namespace: "kv".into(),
            key: "k".into(),
            value: value.map(|v| v.as_bytes().to_vec()),
            is_delete: value.is_none(),
            version: Version::new(block, 0),
        };
        let state = fold([change(Some("new"), 2), change(Some("old"), 1)]);
        assert_eq!(state[&("kv".to_string(), "k".to_string())].0, b"new");
        assert!(fold([change(None, 3), change(Some("old"), 2)]).is_empty(), "a late older write does not bring a deleted key back");
        assert_eq!(fold([change(None, 3), change(Some("again"), 4)]).len(), 1);
    }
}
