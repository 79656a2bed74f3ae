//! A publishing validator's outputs, on the embedded log: folding `state-changes` key by key
//! gives exactly the peer's world state (every key, value and version), `tx-results` holds every
//! transaction of the chain once with its code, validators that do not publish write nothing,
//! and a publisher that crashes between publishing a block and committing it re-publishes from
//! its savepoint with the fold still equal.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use streamledger_core::codec::{self, Record as _};
use streamledger_core::cutter::GENESIS_PREVIOUS_HASH;
use streamledger_core::crypto::block_header_hash;
use streamledger_core::fixtures::{Fixture, Rw};
use streamledger_core::model::{Block, OrderedTx, StateChange, TxResultRow, Version};
use streamledger_core::publish::{self, state_change_key};
use streamledger_core::state::{CommittedState, StateError, StateResult, TxLocation, VersionedValue};
use streamledger_core::validation::TxValidationCode;
use streamledger_core::write_rules::CouchDbRules;
use streamledger_embedded::log::EmbeddedLog;
use streamledger_embedded::store::EmbeddedStore;
use streamledger_ports::log::{ensure_topics, partition_for, Log, OutRecord, Record, Subscription};
use streamledger_ports::store::{BlockCommit, PeerStore, Savepoint, StoredBlock};
use streamledger_ports::topics::{names, Topics};
use streamledger_stages::testkit::{scenarios, Options, TestNetwork};
use streamledger_stages::validator::{self, PeerProgress, ValidatorConfig};
use streamledger_stages::StageError;
use tokio::sync::watch;

type WorldState = publish::Folded;

/// Every record of every partition of a topic, in partition order.
async fn read_topic(log: &Arc<dyn Log>, topic: &str) -> Vec<Record> {
    let mut out = Vec::new();
    for partition in 0..log.partition_count(topic).await.unwrap() {
        let end = log.end_offset(topic, partition).await.unwrap();
        let mut consumer = log.consumer(Subscription::assign(topic, partition, 0)).await.unwrap();
        let mut read = 0;
        while read < end {
            let batch = consumer.poll(1000, Duration::from_secs(5)).await.unwrap();
            assert!(!batch.is_empty(), "{topic}[{partition}]: records below the end offset {end} could not be read");
            read += batch.len() as i64;
            out.extend(batch);
        }
    }
    out
}

/// Decodes a topic's records, naming the topic, partition and offset of one that does not.
fn decode_all<T: codec::Record>(records: &[Record]) -> Vec<T> {
    records
        .iter()
        .map(|r| codec::decode::<T>(&r.value).unwrap_or_else(|e| panic!("{}[{}]@{}: {e}", r.topic, r.partition, r.offset)))
        .collect()
}

/// Folds `state-changes` as an upserting sink would (`publish::fold`), after checking that every
/// record is keyed by its namespace and key and sits in that key's partition (so per-partition
/// order is per-key order).
fn fold(records: &[Record], partitions: i32) -> WorldState {
    let changes = decode_all::<StateChange>(records);
    for (record, change) in records.iter().zip(&changes) {
        let key = state_change_key(&change.namespace, &change.key);
        assert_eq!(record.key.as_deref(), Some(key.as_bytes()), "state-changes@{} is keyed by namespace and key", record.offset);
        assert_eq!(record.partition, partition_for(key.as_bytes(), partitions), "{key} is in its key's partition");
        assert_eq!(change.is_delete, change.value.is_none());
        assert_eq!(change.version, Version::new(change.block_number, change.tx_index));
    }
    publish::fold(changes)
}

/// A store's whole world state, in the namespaces the tests write.
fn world_state(store: &dyn PeerStore) -> WorldState {
    let mut state = WorldState::new();
    for ns in ["transfer", "kv"] {
        for (key, v) in store.range(ns, "", "", None).unwrap() {
            state.insert((ns.to_string(), key), (v.value, v.version));
        }
    }
    state
}

/// Every transaction of the chain: its tx id, or empty where undecodable.
fn chain_tx_ids(blocks: &[Block]) -> Vec<String> {
    let mut seen = HashSet::new();
    blocks
        .iter()
        .filter(|b| seen.insert(b.header.number)) // a block written twice by two orderers counts once
        .flat_map(|b| b.transactions.iter().map(|t| codec::decode::<OrderedTx>(t).map(|t| t.proposal.tx_id).unwrap_or_default()))
        .collect()
}

/// Checks `tx-results` against the chain and the publisher's tx-id index: every transaction
/// once (or, after a re-publication, several identical verdicts), with the peer's code.
fn check_tx_results(rows: &[TxResultRow], blocks: &[Block], store: &dyn PeerStore, peer: &str) {
    let chain = chain_tx_ids(blocks);
    let in_rows: HashSet<&str> = rows.iter().map(|r| r.tx_id.as_str()).collect();
    assert_eq!(in_rows, chain.iter().map(String::as_str).collect::<HashSet<_>>(), "tx-results names exactly the chain's transactions");
    for row in rows {
        let loc = store.tx_location(&row.tx_id).unwrap().expect("indexed");
        assert_eq!((row.block_number, row.tx_index, row.validation_code), (loc.block, loc.position, loc.code), "{}", row.tx_id);
        assert_eq!(row.validation_code_name, TxValidationCode::name_of(loc.code));
        assert_eq!(row.peer, peer);
        let block = blocks.iter().find(|b| b.header.number == row.block_number).expect("the row's block");
        assert_eq!(row.block_hash, hex::encode(block_header_hash(&block.header)));
    }
}

fn publishing_validator(peer: &str, f: &Fixture, topics: &Topics) -> ValidatorConfig {
    let mut cfg = ValidatorConfig::new(peer.into(), Arc::new(f.network.clone()), topics.clone(), Arc::new(CouchDbRules));
    cfg.publish_changes = true;
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publishers_state_changes_fold_into_its_world_state_and_every_tx_is_one_row() {
    let dir = tempfile::tempdir().unwrap();
    let log: Arc<dyn Log> = EmbeddedLog::open(&dir.path().join("log")).unwrap();
    let stores: Vec<Arc<dyn PeerStore>> =
        ["Org1", "Org2"].iter().map(|org| Arc::new(EmbeddedStore::open(&dir.path().join(format!("{org}.redb"))).unwrap()) as Arc<dyn PeerStore>).collect();
    let net = TestNetwork::start(log.clone(), stores, Options::default()).await;
    scenarios::transfers_and_conflicts(&net).await;
    // Deletes and overwrites too.
    let kv = [net.f.proposal("kv", "put", &["k1", "a"]), net.f.proposal("kv", "put", &["k2", "b"])];
    net.submit(&kv).await;
    net.codes(&[&kv[0].tx_id, &kv[1].tx_id]).await;
    let later = [net.f.proposal("kv", "delete", &["k1"]), net.f.proposal("kv", "put", &["k2", "c"])];
    net.submit(&later).await;
    assert_eq!(net.codes(&[&later[0].tx_id, &later[1].tx_id]).await, [TxValidationCode::Valid; 2]);

    // The network's two validators do not publish: nothing on either topic.
    let (changes_topic, rows_topic) = (net.topics.name(names::STATE_CHANGES).to_string(), net.topics.name(names::TX_RESULTS).to_string());
    assert!(read_topic(&log, &changes_topic).await.is_empty() && read_topic(&log, &rows_topic).await.is_empty(), "a non-publishing peer wrote");

    // A publishing peer joins from block 0 and catches up.
    let height = net.stores[0].savepoint().unwrap().unwrap().block;
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("publisher.redb")).unwrap());
    let cfg = publishing_validator("Org1.publisher", &net.f, &net.topics);
    let metrics = cfg.metrics.clone();
    let (stop, rx) = watch::channel(false);
    let (l, s) = (log.clone(), store.clone());
    let task = tokio::spawn(async move { validator::run(cfg, l, s, Arc::new(PeerProgress::new()), rx).await });
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.savepoint().unwrap().is_none_or(|sp| sp.block < height) {
        assert!(Instant::now() < deadline, "the publisher did not reach block {height}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();

    let records = read_topic(&log, &changes_topic).await;
    let state = world_state(store.as_ref());
    assert!(state.contains_key(&("kv".into(), "k2".into())) && !state.contains_key(&("kv".into(), "k1".into())));
    let partitions = net.topics.spec(names::STATE_CHANGES).partitions;
    assert_eq!(fold(&records, partitions), state, "the fold of state-changes is the publisher's world state");
    assert_eq!(state, world_state(net.stores[0].as_ref()), "and the live peer's");
    // Published once each: no (key, version) twice without a crash.
    let changes = decode_all::<StateChange>(&records);
    let distinct: HashSet<(&str, &str, Version)> = changes.iter().map(|c| (c.namespace.as_str(), c.key.as_str(), c.version)).collect();
    assert_eq!(distinct.len(), changes.len());

    let rows = decode_all::<TxResultRow>(&read_topic(&log, &rows_topic).await);
    let blocks = net.read_all::<Block>(names::BLOCKS).await;
    check_tx_results(&rows, &blocks, store.as_ref(), "Org1.publisher");
    assert_eq!(rows.len(), chain_tx_ids(&blocks).len(), "one row per transaction");
    assert!(rows.iter().any(|r| r.validation_code_name == "MVCC_READ_CONFLICT"), "the conflicts are there with their code");
    // Counted as the validator's records out: a verdict per block, plus every change and row.
    let out = metrics.stage("validator", "Org1.publisher", 1).records_out.get();
    assert_eq!(out, (height + 1) as u64 + records.len() as u64 + rows.len() as u64);
    net.stop().await;
}

/// A peer store that fails, once and for good, to commit one block: a crash after the block's
/// changes were published and before its savepoint.
struct CrashingStore {
    inner: Arc<EmbeddedStore>,
    crash_at: i64,
}

impl CommittedState for CrashingStore {
    fn get(&self, namespace: &str, key: &str) -> StateResult<Option<VersionedValue>> {
        self.inner.get(namespace, key)
    }
    fn range(&self, namespace: &str, start: &str, end: &str, limit: Option<usize>) -> StateResult<Vec<(String, VersionedValue)>> {
        self.inner.range(namespace, start, end, limit)
    }
    fn tx_location(&self, tx_id: &str) -> StateResult<Option<TxLocation>> {
        self.inner.tx_location(tx_id)
    }
}

impl PeerStore for CrashingStore {
    fn savepoint(&self) -> StateResult<Option<Savepoint>> {
        self.inner.savepoint()
    }
    fn commit(&self, commit: BlockCommit<'_>) -> StateResult<()> {
        if commit.block.number == self.crash_at {
            return Err(StateError { message: format!("simulated crash before committing block {}", self.crash_at), retryable: false });
        }
        self.inner.commit(commit)
    }
    fn block(&self, number: i64) -> StateResult<Option<StoredBlock>> {
        self.inner.block(number)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_that_crashes_before_its_savepoint_republishes_and_the_fold_stays_equal() {
    let dir = tempfile::tempdir().unwrap();
    let f = Fixture::new();
    let topics = Topics::default_for(f.network.channel());
    let log: Arc<dyn Log> = EmbeddedLog::open(&dir.path().join("log")).unwrap();
    ensure_topics(log.as_ref(), &topics).await.unwrap();
    // Block 1 reads `a` at a stale version (MVCC_READ_CONFLICT, no write); block 2, the one the
    // crash hits, overwrites `a` and deletes `b`.
    let txs = [
        vec![f.tx(Rw::new().write("a", "1").write("b", "1").build())],
        vec![f.tx(Rw::new().read("a", Some((9, 9))).write("a", "x").build()), f.tx(Rw::new().write("c", "1").build())],
        vec![f.tx(Rw::new().read("a", Some((0, 0))).write("a", "2").build()), f.tx(Rw::new().delete("b").build())],
        vec![f.tx(Rw::new().write("d", "1").build())],
    ];
    let mut previous = GENESIS_PREVIOUS_HASH.to_vec();
    let mut blocks = Vec::new();
    for (n, t) in txs.iter().enumerate() {
        let b = f.block(n as i64, &previous, t);
        previous = block_header_hash(&b.header).to_vec();
        blocks.push(b);
    }
    let records = blocks.iter().map(|b| OutRecord::unkeyed(codec::encode(b).unwrap())).collect();
    log.append(topics.name(names::BLOCKS), records).await.unwrap();

    let store = Arc::new(EmbeddedStore::open(&dir.path().join("publisher.redb")).unwrap());
    let crashing = Arc::new(CrashingStore { inner: store.clone(), crash_at: 2 });
    let (_stop, rx) = watch::channel(false);
    let err = validator::run(publishing_validator("Org1.peer0", &f, &topics), log.clone(), crashing, Arc::new(PeerProgress::new()), rx.clone())
        .await
        .expect_err("the commit of block 2 fails");
    assert!(matches!(&err, StageError::Fatal(m) if m.contains("block 2")), "{err}");
    assert_eq!(store.savepoint().unwrap().unwrap().block, 1, "the savepoint is before the crash");
    let before = decode_all::<StateChange>(&read_topic(&log, topics.name(names::STATE_CHANGES)).await);
    assert!(before.iter().any(|c| c.block_number == 2), "block 2's changes were published before the crash");

    // Restarted on the real store, from its savepoint, to the end of the blocks topic.
    let mut cfg = publishing_validator("Org1.peer0", &f, &topics);
    cfg.stop_after_offset = Some(blocks.len() as i64 - 1);
    validator::run(cfg, log.clone(), store.clone(), Arc::new(PeerProgress::new()), rx).await.unwrap();
    assert_eq!(store.savepoint().unwrap().unwrap().block, 3);

    let records = read_topic(&log, topics.name(names::STATE_CHANGES)).await;
    let changes = decode_all::<StateChange>(&records);
    let of_block = |n: i64| changes.iter().filter(|c| c.block_number == n).count();
    assert_eq!((of_block(0), of_block(1), of_block(2), of_block(3)), (2, 1, 4, 1), "block 2 published twice, the others once");
    let state = world_state(store.as_ref());
    assert_eq!(fold(&records, topics.spec(names::STATE_CHANGES).partitions), state, "duplicates re-apply versions the fold already holds");
    let keys: Vec<&str> = state.keys().map(|(_, k)| k.as_str()).collect();
    assert_eq!(keys, ["a", "c", "d"]);
    assert_eq!(state[&("kv".into(), "a".into())], (b"2".to_vec(), Version::new(2, 0)));

    let rows = decode_all::<TxResultRow>(&read_topic(&log, topics.name(names::TX_RESULTS)).await);
    check_tx_results(&rows, &blocks, store.as_ref(), "Org1.peer0");
    assert_eq!(rows.len(), 6 + 2, "six transactions, block 2's two rows twice");
    let conflict = rows.iter().find(|r| r.block_number == 1 && r.tx_index == 0).unwrap();
    assert_eq!((conflict.validation_code_name.as_str(), conflict.contract.as_str(), conflict.function.as_str()), ("MVCC_READ_CONFLICT", "kv", "put"));
    assert_eq!(StateChange::TOPIC, names::STATE_CHANGES);
}
