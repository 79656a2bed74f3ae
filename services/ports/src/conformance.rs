//! Support for tests (like the core's `fixtures`): checks every peer store must pass, whatever
//! it stores on, so the embedded store and CouchDB are held to the same rules by the same code;
//! and the same for the log adapters (embedded and Kafka); and [`capture_logs`], for tests of
//! what an operator reads. Assertions panic, as tests expect.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use streamledger_core::model::Version;
use streamledger_core::state::{CommittedState, StateResult, TxLocation, VersionedValue, WriteBatch};

use crate::log::{Log, OutRecord, Subscription};
use crate::store::{BlockCommit, PeerStore, Savepoint, StoredBlock};

/// What this thread logs through `tracing` (info and above, no colours) while the returned value
/// lives; [`CapturedLogs::text`] gives it so far. Async tests must run on one thread (the default
/// `#[tokio::test]`).
pub fn capture_logs() -> CapturedLogs {
    let lines = Lines::default();
    let writer = lines.clone();
    let subscriber = tracing_subscriber::fmt().with_ansi(false).with_writer(move || writer.clone()).finish();
    CapturedLogs { lines, _default: tracing::subscriber::set_default(subscriber) }
}

pub struct CapturedLogs {
    lines: Lines,
    _default: tracing::subscriber::DefaultGuard,
}

impl CapturedLogs {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.lines.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)).into_owned()
    }
}

#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub fn savepoint(block: i64) -> Savepoint {
    Savepoint { block, block_hash: vec![1, block as u8], state_hash: vec![2, block as u8], blocks_offset: 100 + block }
}

pub fn stored(number: i64) -> StoredBlock {
    StoredBlock { number, bytes: format!("block {number}").into_bytes(), codes: vec![0, 11, number as i32] }
}

/// Commits `batch` with a made-up block and savepoint of the same number.
pub fn commit(store: &dyn PeerStore, batch: &WriteBatch) -> StateResult<()> {
    let block = stored(batch.block);
    let sp = savepoint(batch.block);
    store.commit(BlockCommit { block: &block, batch, savepoint: &sp })
}

/// A batch for `block`: `(namespace, key, value or delete)` writes and `(tx id, position)` index
/// entries with code 0.
pub fn batch(block: i64, writes: &[(&str, &str, Option<&str>)], txs: &[(&str, i32)]) -> WriteBatch {
    let mut b = WriteBatch { block, ..Default::default() };
    for (i, (ns, key, value)) in writes.iter().enumerate() {
        b.writes.insert((ns.to_string(), key.to_string()), (value.map(|v| v.as_bytes().to_vec()), Version::new(block, i as i32)));
    }
    for (id, position) in txs {
        b.tx_index.push((id.to_string(), TxLocation { block, position: *position, code: 0 }));
    }
    b
}

pub fn keys(found: Vec<(String, VersionedValue)>) -> Vec<String> {
    found.into_iter().map(|(k, _)| k).collect()
}

/// On a fresh store: a block that is not the next one (early, repeated with other content, after
/// a gap, or with inconsistent numbers) is refused, not retryable, and changes nothing; the store
/// then goes on. `named` must appear in the duplicate's error (the file or the channel).
pub fn duplicate_gap_and_inconsistent_commits_are_refused(store: &dyn PeerStore, named: &str) {
    let err = commit(store, &batch(1, &[("ns", "k", Some("early"))], &[])).unwrap_err();
    assert!(!err.retryable);
    assert!(err.message.contains("block 1") && err.message.contains("block 0"), "{err}");
    assert_eq!(store.savepoint().unwrap(), None);

    commit(store, &batch(0, &[("ns", "k", Some("v0"))], &[("t0", 0)])).unwrap();
    commit(store, &batch(1, &[("ns", "k", Some("v1"))], &[("t1", 0)])).unwrap();

    // Block 1 delivered again, with different content: refused, nothing changes.
    let mut again = batch(1, &[("ns", "k", Some("twice")), ("ns", "new", Some("n"))], &[("t9", 0)]);
    again.tx_index.push(("t1".into(), TxLocation { block: 1, position: 7, code: 9 }));
    let err = commit(store, &again).unwrap_err();
    assert!(!err.retryable);
    assert!(err.message.contains("block 1 is already committed") && err.message.contains(named), "{err}");

    // A gap: block 3 after block 1.
    let err = commit(store, &batch(3, &[("ns", "k", Some("gap"))], &[("t3", 0)])).unwrap_err();
    assert!(!err.retryable);
    assert!(err.message.contains("block 3") && err.message.contains("block 1") && err.message.contains("expected block 2"), "{err}");

    // Block, batch and savepoint disagreeing on the number.
    let (block, b, sp) = (stored(2), batch(2, &[("ns", "k", Some("odd"))], &[]), savepoint(3));
    let err = store.commit(BlockCommit { block: &block, batch: &b, savepoint: &sp }).unwrap_err();
    assert!(!err.retryable && err.message.contains("inconsistent"), "{err}");

    assert_eq!(store.get("ns", "k").unwrap().unwrap().value, b"v1");
    assert_eq!(store.get("ns", "new").unwrap(), None);
    assert_eq!(store.tx_location("t9").unwrap(), None);
    assert_eq!(store.tx_location("t3").unwrap(), None);
    assert_eq!(store.tx_location("t1").unwrap(), Some(TxLocation { block: 1, position: 0, code: 0 }));
    assert_eq!(store.savepoint().unwrap(), Some(savepoint(1)));
    assert_eq!(store.block(1).unwrap(), Some(stored(1)));
    assert_eq!(store.block(3).unwrap(), None);
    // The refusals did not wedge the store.
    commit(store, &batch(2, &[], &[])).unwrap();
}

/// State, tx index, blocks and savepoint outlive the store: `open` gives a store over the same
/// place each time (a file, a CouchDB database); the first is fresh.
pub fn everything_survives_a_new_store(open: &dyn Fn() -> Box<dyn PeerStore>) {
    {
        let store = open();
        assert_eq!(store.savepoint().unwrap(), None);
        commit(store.as_ref(), &batch(0, &[("ns", "k", Some("v0")), ("ns", "gone", Some("x"))], &[("t0", 0)])).unwrap();
        commit(store.as_ref(), &batch(1, &[("ns", "k", Some("v1")), ("ns", "gone", None)], &[("t1", 3)])).unwrap();
    }
    let store = open();
    assert_eq!(store.savepoint().unwrap(), Some(savepoint(1)));
    assert_eq!(store.get("ns", "k").unwrap(), Some(VersionedValue { value: b"v1".to_vec(), version: Version::new(1, 0) }));
    assert_eq!(store.get("ns", "gone").unwrap(), None);
    assert_eq!(store.tx_location("t1").unwrap(), Some(TxLocation { block: 1, position: 3, code: 0 }));
    assert_eq!(store.tx_location("t0").unwrap().map(|l| l.block), Some(0));
    assert_eq!(store.block(0).unwrap(), Some(stored(0)));
    assert_eq!(store.block(1).unwrap(), Some(stored(1)));
    assert_eq!(store.block(2).unwrap(), None);
    // And it goes on from where it was.
    commit(store.as_ref(), &batch(2, &[], &[])).unwrap();
    assert_eq!(store.savepoint().unwrap().map(|s| s.block), Some(2));
}

/// On a fresh store: the tx-id index keeps the first occurrence, within a block and across blocks.
pub fn tx_index_keeps_the_first_occurrence(store: &dyn PeerStore) {
    let mut b0 = batch(0, &[], &[("dup", 0), ("dup", 1)]);
    b0.tx_index[1].1.code = 9;
    commit(store, &b0).unwrap();
    assert_eq!(store.tx_location("dup").unwrap(), Some(TxLocation { block: 0, position: 0, code: 0 }));
    let mut b1 = batch(1, &[], &[("dup", 4)]);
    b1.tx_index[0].1.code = 9;
    commit(store, &b1).unwrap();
    assert_eq!(store.tx_location("dup").unwrap(), Some(TxLocation { block: 0, position: 0, code: 0 }));
}

/// On a fresh store: while `blocks` blocks commit (each writing the same value and version to `x`
/// and `y`), two reader threads never see the two differ (half a block) nor the savepoint go back.
pub fn readers_never_see_half_a_block(store: Arc<dyn PeerStore>, blocks: i64) {
    let done = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (store, done) = (store.clone(), done.clone());
            std::thread::spawn(move || {
                let mut reads = 0;
                let mut last_block = -1;
                while !done.load(Ordering::Relaxed) {
                    let both = store.range("ns", "x", "", None).unwrap();
                    if let [(_, x), (_, y)] = both.as_slice() {
                        assert_eq!(x, y);
                    } else {
                        assert!(both.is_empty(), "{both:?}");
                    }
                    let v = store.versions(&[("ns", "x"), ("ns", "y")]).unwrap();
                    assert_eq!(v[0], v[1]);
                    // Two reads of one snapshot: a block committed between them is not seen.
                    if let Some(snapshot) = store.snapshot().unwrap() {
                        let x = snapshot.get("ns", "x").unwrap();
                        std::thread::yield_now();
                        assert_eq!(x, snapshot.get("ns", "y").unwrap());
                    }
                    let block = store.savepoint().unwrap().map_or(-1, |s| s.block);
                    assert!(block >= last_block, "savepoint went back from {last_block} to {block}");
                    last_block = block;
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    for n in 0..blocks {
        let v = n.to_string();
        let mut b = batch(n, &[("ns", "x", Some(&v)), ("ns", "y", Some(&v))], &[]);
        // Same version on both keys, so `versions` can compare them too.
        for (_, version) in b.writes.values_mut() {
            *version = Version::new(n, 0);
        }
        commit(store.as_ref(), &b).unwrap();
    }
    done.store(true, Ordering::Relaxed);
    for r in readers {
        assert!(r.join().unwrap() > 0);
    }
    assert_eq!(store.get("ns", "y").unwrap().unwrap().value, (blocks - 1).to_string().as_bytes());
}

/// One block of random changes: `(namespace, key, value or delete)` writes and
/// `(tx id, position, code)` index entries.
pub type RandomBlock = (Vec<(String, String, Option<Vec<u8>>)>, Vec<(String, i32, i32)>);

/// A read to compare: `(namespace, start or key, end, limit)`.
pub type RandomQuery = (String, String, String, Option<usize>);

/// Commits `blocks` to a fresh `store` and to the in-memory reference, and after each block checks
/// that every query (get, range with and without limit, whole namespaces, bulk versions, the tx
/// index, the savepoint) answers the same on both. For property tests with store-specific inputs.
pub fn agrees_with_the_reference(store: &dyn PeerStore, blocks: Vec<RandomBlock>, queries: &[RandomQuery]) {
    use streamledger_core::state::MemState;
    let mut model = MemState::new();
    for (n, (writes, txs)) in blocks.into_iter().enumerate() {
        let n = n as i64;
        let mut b = WriteBatch { block: n, ..Default::default() };
        for (i, (ns, key, value)) in writes.into_iter().enumerate() {
            b.writes.insert((ns, key), (value, Version::new(n, i as i32)));
        }
        for (id, position, code) in txs {
            b.tx_index.push((id, TxLocation { block: n, position, code }));
        }
        // A snapshot taken before the commit must go on answering as the state was.
        let before = store.snapshot().unwrap();
        let model_before = model.clone();
        commit(store, &b).unwrap();
        model.apply(&b);

        answers_alike(store, &model, queries, "the store");
        if let Some(before) = before {
            answers_alike(before.as_ref(), &model_before, queries, "a snapshot taken before the commit");
        }
        if let Some(now) = store.snapshot().unwrap() {
            answers_alike(now.as_ref(), &model, queries, "a snapshot taken after the commit");
        }
        assert_eq!(store.savepoint().unwrap().map(|s| s.block), model.last_block());
    }
}

/// Every query, asked of `view` and of the reference `model`, gets the same answer.
fn answers_alike(view: &dyn CommittedState, model: &streamledger_core::state::MemState, queries: &[RandomQuery], what: &str) {
    for (ns, start, end, limit) in queries {
        assert_eq!(view.get(ns, start).unwrap(), model.get(ns, start).unwrap(), "{what}");
        assert_eq!(view.range(ns, start, end, *limit).unwrap(), model.range(ns, start, end, *limit).unwrap(), "{what}");
        assert_eq!(view.range(ns, start, end, None).unwrap(), model.range(ns, start, end, None).unwrap(), "{what}");
    }
    for ns in ["a", "ab", "a\0", "b", "", "c"] {
        assert_eq!(view.range(ns, "", "", None).unwrap(), model.range(ns, "", "", None).unwrap(), "{what}, namespace {ns:?}");
    }
    let probe: Vec<(&str, &str)> = queries.iter().flat_map(|(ns, s, e, _)| [(ns.as_str(), s.as_str()), (ns.as_str(), e.as_str())]).collect();
    assert_eq!(view.versions(&probe).unwrap(), model.versions(&probe).unwrap(), "{what}");
    let ids: Vec<String> = (0..7).map(|i| format!("tx{i}")).collect();
    for id in &ids {
        assert_eq!(view.tx_location(id).unwrap(), model.tx_location(id).unwrap(), "{what}, {id}");
    }
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    assert_eq!(view.tx_locations(&ids).unwrap(), model.tx_locations(&ids).unwrap(), "{what}");
}

/// Every call on a topic the log does not have fails naming the topic, and not as retryable
/// (waiting will not create it).
pub async fn missing_topics_are_named_and_not_retried(log: &dyn Log) {
    for err in [
        log.append("missing.topic", vec![OutRecord::to_partition(0, b"x")]).await.unwrap_err(),
        log.end_offset("missing.topic", 0).await.unwrap_err(),
        log.partition_count("missing.topic").await.unwrap_err(),
        log.consumer(Subscription::group("g", "missing.topic")).await.err().unwrap(),
    ] {
        assert!(err.to_string().contains("missing.topic"), "{err}");
        assert!(!err.retryable, "{err}");
    }
}
