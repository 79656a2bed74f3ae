//! Forged and malformed input, in one place: every stage runs over the embedded log with the
//! sample network, and each case writes its record straight onto the topic it targets, as a
//! malicious producer with write access to the cluster would. Each case asserts its exact outcome
//! (a Fabric validation code in the peers' stores or verdicts, a rejection on `rejections` with
//! its reason, or dead letters naming the topic, offset and reason) and that nothing else was
//! affected: the next good transaction commits, in the next block, and both peers keep equal
//! state hashes. The checker (`streamledger_audit`) runs last over the topics and the stores and
//! must report exactly the transactions forged straight into `ordered-tx` (nobody submitted them)
//! and nothing else.
//!
//! The forger has no orderer key, no peer key and no registered client key, except where a case
//! says it plays a compromised or faulty member (the fixture holds every key of the sample network).
//! The HTTP cases (bad JSON, oversized bodies, huge args, unknown keys) are in `tests/tests/up.rs`
//! and `services/node/src/api.rs`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use streamledger_audit::{audit, AuditConfig, Violation};
use streamledger_core::codec;
use streamledger_core::crypto::{block_signing_bytes, Signer};
use streamledger_core::endorsement::endorse;
use streamledger_core::fixtures::Rw;
use streamledger_core::model::{Block, CutMarker, CutReason, DeadLetter, OrderedTx, Proposal, Rejection, Response, RwSet, ValidatedBlock};
use streamledger_core::validation::TxValidationCode;
use streamledger_embedded::log::{EmbeddedLog, MAX_RECORD_BYTES};
use streamledger_embedded::store::EmbeddedStore;
use streamledger_ports::log::{Log, OutRecord, Subscription};
use streamledger_ports::store::PeerStore;
use streamledger_ports::topics::names;
use streamledger_stages::testkit::{scenarios, Options, TestNetwork};

const PEERS: [&str; 2] = ["Org1.peer0", "Org2.peer0"];

/// A key nobody registered: an outsider's.
fn stranger(org: &str) -> Signer {
    Signer::from_seed(org, [42; 32])
}

/// Every decodable record of partition 0 of a topic, with its offset (garbage is skipped: the
/// forged records sit on these topics too).
async fn read<T: codec::Record>(net: &TestNetwork, suffix: &str) -> Vec<(i64, T)> {
    let topic = net.topics.name(suffix);
    let end = net.log.end_offset(topic, 0).await.unwrap();
    let mut c = net.log.consumer(Subscription::assign(topic, 0, 0)).await.unwrap();
    let (mut out, mut next) = (Vec::new(), 0);
    while next < end {
        let batch = c.poll(1000, Duration::from_secs(5)).await.unwrap();
        assert!(!batch.is_empty(), "{topic}: records below the end offset could not be read");
        next = batch.last().unwrap().offset + 1;
        out.extend(batch.into_iter().filter_map(|r| codec::decode::<T>(&r.value).ok().map(|v| (r.offset, v))));
    }
    out
}

/// Appends one record to a topic as an outside producer; returns its partition and offset.
async fn forge(net: &TestNetwork, suffix: &str, key: Option<&[u8]>, value: Vec<u8>) -> (i32, i64) {
    let record = match key {
        Some(k) => OutRecord::keyed(k.to_vec(), value),
        None => OutRecord::unkeyed(value),
    };
    net.log.append(net.topics.name(suffix), vec![record]).await.unwrap()[0]
}

async fn eventually<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The dead letters about one forged record, once `stages` (stage name, instances) have all
/// written theirs; asserts that no other stage wrote one and that each carries the record.
async fn dead_letters(net: &TestNetwork, suffix: &str, (partition, offset): (i32, i64), stages: &[(&str, usize)]) -> Vec<DeadLetter> {
    let topic = net.topics.name(suffix).to_string();
    let letters = eventually(&format!("dead letters for {topic}/{partition}@{offset} from {stages:?}"), async || {
        let about: Vec<DeadLetter> = read::<DeadLetter>(net, names::DEAD_LETTERS)
            .await
            .into_iter()
            .map(|(_, l)| l)
            .filter(|l| l.source_topic == topic && l.partition == partition && l.offset == offset)
            .collect();
        stages.iter().all(|(s, n)| about.iter().filter(|l| l.stage == *s).count() >= *n).then_some(about)
    })
    .await;
    // Late letters would come in the time a good transaction takes; callers commit one after.
    for l in &letters {
        assert!(stages.iter().any(|(s, _)| *s == l.stage), "{topic}@{offset}: dead-lettered by {}, which should not: {l:?}", l.stage);
        assert!(!l.reason.is_empty());
    }
    let total: usize = stages.iter().map(|(_, n)| n).sum();
    assert_eq!(letters.len(), total, "{topic}@{offset}: one letter per reader: {letters:#?}");
    letters
}

/// The rejection reported for a tx id.
async fn rejection(net: &TestNetwork, tx_id: &str) -> Rejection {
    eventually(&format!("the rejection of {tx_id}"), async || {
        read::<Rejection>(net, names::REJECTIONS).await.into_iter().map(|(_, r)| r).find(|r| r.tx_id == tx_id)
    })
    .await
}

/// Each peer's verdicts, per block (the first verdict for a number; a restarted peer repeats one).
async fn verdicts(net: &TestNetwork, peer: &str) -> Vec<ValidatedBlock> {
    let mut v: Vec<ValidatedBlock> = read::<ValidatedBlock>(net, names::VALIDATED_BLOCKS).await.into_iter().map(|(_, v)| v).filter(|v| v.peer == peer).collect();
    v.sort_by_key(|v| v.block_number);
    v.dedup_by_key(|v| v.block_number);
    v
}

/// Every code a peer gave `tx_id`, in chain order.
async fn codes_of(net: &TestNetwork, peer: &str, tx_id: &str) -> Vec<TxValidationCode> {
    verdicts(net, peer)
        .await
        .iter()
        .flat_map(|v| v.results.iter().filter(|r| r.tx_id == tx_id).map(|r| TxValidationCode::from_i32(r.code).unwrap()))
        .collect()
}

/// The committed height and tip header hash, equal on both peers (waits for them to agree).
async fn tip(net: &TestNetwork) -> (i64, Vec<u8>) {
    net.peers_agree().await;
    let sp = net.stores[0].savepoint().unwrap().unwrap();
    (sp.block, sp.block_hash)
}

/// A good `kv` transaction after a case: it commits VALID on both peers in the block after
/// `height` (no block was skipped or taken by the forgery), and the peers agree.
async fn good_commits_next(net: &TestNetwork, height: i64, key: &str) -> String {
    let p = net.f.proposal("kv", "put", &[key, "ok"]);
    net.submit(std::slice::from_ref(&p)).await;
    assert_eq!(net.codes(&[&p.tx_id]).await, [TxValidationCode::Valid], "{key}: the good transaction after the case");
    for store in &net.stores {
        let at = store.tx_location(&p.tx_id).unwrap().unwrap();
        assert_eq!(at.block, height + 1, "{key}: the good transaction lands in the next block");
    }
    net.peers_agree().await;
    p.tx_id
}

/// A transaction endorsed by the given signers over `rwset`, as a gateway would order it.
fn ordered(p: Proposal, rwset: RwSet, endorsers: &[&Signer]) -> OrderedTx {
    let results: Vec<_> = endorsers.iter().map(|s| endorse(s, &p, Response::ok(Vec::new()), rwset.clone())).collect();
    OrderedTx { proposal: p, response: Response::ok(Vec::new()), rwset, endorsements: results.iter().map(|r| r.endorsement()).collect() }
}

/// The Avro long encoding (zig-zag, then base-128 little-endian).
fn avro_long(n: i64) -> Vec<u8> {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    let mut out = Vec::new();
    loop {
        let byte = (z & 0x7f) as u8;
        z >>= 7;
        if z == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_malformed_input_is_refused_and_nothing_else_is_affected() {
    let dir = tempfile::tempdir().unwrap();
    let log: Arc<dyn Log> = EmbeddedLog::open(&dir.path().join("log")).unwrap();
    let stores: Vec<(String, Arc<dyn PeerStore>)> = PEERS
        .iter()
        .map(|p| (p.to_string(), Arc::new(EmbeddedStore::open(&dir.path().join(format!("{p}.redb"))).unwrap()) as Arc<dyn PeerStore>))
        .collect();
    let mut net = TestNetwork::start(log, stores.iter().map(|(_, s)| s.clone()).collect(), Options::default()).await;
    let f = &net.f;
    let ok = || Response::ok(Vec::new());
    // Transactions forged straight into `ordered-tx`: the checker must name each as unsubmitted.
    let mut unsubmitted = BTreeSet::new();

    // --- Records of the wrong schema and truncated Avro on every input topic: undecodable bytes,
    // a record of the topic's schema cut in half, a valid record of another schema, each on
    // proposals, endorsement-results, ordered-tx, cut-markers and blocks. Dead-lettered by every
    // reader with topic, partition, offset and reason; on ordered-tx they stay in their block as
    // BAD_PAYLOAD. (The output topics get theirs at the end, before the checker reads them.)
    scenarios::garbage_on_every_input_topic(&net).await;

    // --- A proposal signed by an unknown key: each org's endorser refuses it, the gateway
    // reports it on `rejections`; nothing reaches the chain.
    let (height, _) = tip(&net).await;
    let forged = f.proposal_by(&stranger("Org1"), "kv", "put", &["forged", "1"]);
    net.submit(std::slice::from_ref(&forged)).await;
    let r = rejection(&net, &forged.tx_id).await;
    assert_eq!(r.stage, "gateway");
    assert!(r.reason.contains("refused") && r.reason.contains("is not registered in the network"), "{r:?}");
    // A registered creator, but the arguments changed after signing.
    let mut tampered = f.proposal("kv", "put", &["tampered", "1"]);
    tampered.args[1] = "2".into();
    net.submit(std::slice::from_ref(&tampered)).await;
    let r = rejection(&net, &tampered.tx_id).await;
    assert!(r.reason.contains("signature does not verify"), "{r:?}");
    good_commits_next(&net, height, "after-unknown-key").await;
    for store in &net.stores {
        assert_eq!(store.tx_location(&forged.tx_id).unwrap(), None);
        assert_eq!(store.tx_location(&tampered.tx_id).unwrap(), None);
    }

    // --- The same, ordered straight into a block (a malicious gateway; the forger has the peers'
    // keys for the endorsements): every peer flags it BAD_CREATOR_SIGNATURE.
    let (height, _) = tip(&net).await;
    let in_block = ordered(f.proposal_by(&stranger("Org1"), "kv", "put", &["forged-in-block", "1"]), Rw::new().write("forged-in-block", "1").build(), &[&f.peers[0], &f.peers[1]]);
    unsubmitted.insert(in_block.proposal.tx_id.clone());
    forge(&net, names::ORDERED_TX, Some(in_block.proposal.tx_id.as_bytes()), codec::encode(&in_block).unwrap()).await;
    for peer in PEERS {
        // A creator that is not registered cannot claim a tx id: the verdict names no tx id, so
        // the flag is found by its position (the only code 4 of the chain).
        let flagged: Vec<i64> = eventually(&format!("{peer}'s verdict on the forged creator"), async || {
            let flagged: Vec<i64> = verdicts(&net, peer)
                .await
                .iter()
                .flat_map(|v| v.results.iter().filter(|r| r.code == TxValidationCode::BadCreatorSignature as i32).map(|_| v.block_number).collect::<Vec<_>>())
                .collect();
            (!flagged.is_empty()).then_some(flagged)
        })
        .await;
        assert_eq!(flagged, [height + 1], "{peer}: one BAD_CREATOR_SIGNATURE, in the block after the case");
    }
    good_commits_next(&net, height + 1, "after-unknown-key-in-block").await;
    assert_eq!(net.stores[0].get("kv", "forged-in-block").unwrap(), None, "its write was not applied");

    // --- A proposal replayed with the same tx id. On `proposals` (its bytes appended again after
    // it committed): the gateway knows the tx id is ordered and drops it; the chain holds it once.
    let (height, _) = tip(&net).await;
    let original = f.proposal("kv", "put", &["replayed", "1"]);
    net.submit(std::slice::from_ref(&original)).await;
    assert_eq!(net.codes(&[&original.tx_id]).await, [TxValidationCode::Valid]);
    net.submit(std::slice::from_ref(&original)).await;
    good_commits_next(&net, height + 1, "after-replayed-proposal").await;
    for peer in PEERS {
        // A validator appends its verdicts after committing its store, so they may lag the agreement.
        let codes = eventually(&format!("{peer}'s verdict on the original"), async || Some(codes_of(&net, peer, &original.tx_id).await).filter(|c| !c.is_empty())).await;
        assert_eq!(codes, [TxValidationCode::Valid], "{peer}: once in the chain");
    }
    assert!(read::<Rejection>(&net, names::REJECTIONS).await.iter().all(|(_, r)| r.tx_id != original.tx_id), "a replay is not a new attempt");
    // Its ordered transaction copied into `ordered-tx` (a gateway that forgot, or a forger): the
    // copy stays in its block, flagged DUPLICATE_TXID; the tx index still points at the original.
    let (height, _) = tip(&net).await;
    let copy = read::<OrderedTx>(&net, names::ORDERED_TX).await.into_iter().map(|(_, t)| t).find(|t| t.proposal.tx_id == original.tx_id).unwrap();
    let first = net.stores[0].tx_location(&original.tx_id).unwrap().unwrap();
    forge(&net, names::ORDERED_TX, Some(original.tx_id.as_bytes()), codec::encode(&copy).unwrap()).await;
    for (peer, store) in PEERS.iter().zip(&net.stores) {
        let codes = eventually(&format!("{peer}'s verdict on the copy"), async || Some(codes_of(&net, peer, &original.tx_id).await).filter(|c| c.len() > 1)).await;
        assert_eq!(codes, [TxValidationCode::Valid, TxValidationCode::DuplicateTxid], "{peer}");
        assert_eq!(store.tx_location(&original.tx_id).unwrap(), Some(first), "{peer}: the index keeps the first occurrence");
    }
    good_commits_next(&net, height + 1, "after-replayed-ordered-tx").await;

    // --- An endorsement signed by an org the policy does not name (`transfer` needs Org1's and
    // Org2's peers). On `endorsement-results`, ahead of the real ones: the gateway does not count
    // it, and orders the transaction with the real endorsements only.
    let org3 = stranger("Org3");
    let (height, _) = tip(&net).await;
    let p = f.proposal("transfer", "create", &["carol", "10"]);
    let outsider = endorse(&org3, &p, ok(), RwSet::default());
    forge(&net, names::ENDORSEMENT_RESULTS, Some(p.tx_id.as_bytes()), codec::encode(&outsider).unwrap()).await;
    net.submit(std::slice::from_ref(&p)).await;
    assert_eq!(net.codes(&[&p.tx_id]).await, [TxValidationCode::Valid]);
    let tx = read::<OrderedTx>(&net, names::ORDERED_TX).await.into_iter().map(|(_, t)| t).find(|t| t.proposal.tx_id == p.tx_id).unwrap();
    let orgs: BTreeSet<&str> = tx.endorsements.iter().map(|e| e.endorser.org.as_str()).collect();
    assert_eq!(orgs, BTreeSet::from(["Org1", "Org2"]), "the outsider's endorsement is not in the order");
    assert_eq!(net.balance("carol"), 10);
    good_commits_next(&net, height + 1, "after-outsider-endorsement").await;
    // In a block (a malicious gateway): Org1's peer and an Org3 key, or Org1's peer and Org1's
    // client (a registered key, but not a peer). Both flagged ENDORSEMENT_POLICY_FAILURE.
    let (height, _) = tip(&net).await;
    let with_org3 = ordered(f.proposal("transfer", "create", &["mallory", "1000"]), RwSet::default(), &[&f.peers[0], &org3]);
    let with_client = ordered(f.proposal("transfer", "create", &["trudy", "1000"]), RwSet::default(), &[&f.peers[0], &f.clients[0]]);
    for tx in [&with_org3, &with_client] {
        unsubmitted.insert(tx.proposal.tx_id.clone());
        forge(&net, names::ORDERED_TX, Some(tx.proposal.tx_id.as_bytes()), codec::encode(tx).unwrap()).await;
    }
    let ids = [with_org3.proposal.tx_id.as_str(), with_client.proposal.tx_id.as_str()];
    assert_eq!(net.codes(&ids).await, [TxValidationCode::EndorsementPolicyFailure; 2]);
    let after = net.stores[0].tx_location(ids[1]).unwrap().unwrap().block;
    good_commits_next(&net, after, "after-policy-failure").await;
    assert!(height < after);

    // --- Endorsements that disagree on the read-write set. At the gateway: a faulty Org2 peer
    // (its real key) answers first with another read-write set; Org1's real one disagrees, both
    // orgs of the policy have answered, and the gateway rejects the transaction saying so.
    let (height, _) = tip(&net).await;
    let p = f.proposal("transfer", "create", &["dave", "10"]);
    let faulty = endorse(&f.peers[1], &p, ok(), Rw::new().write("x", "y").build());
    forge(&net, names::ENDORSEMENT_RESULTS, Some(p.tx_id.as_bytes()), codec::encode(&faulty).unwrap()).await;
    net.submit(std::slice::from_ref(&p)).await;
    let r = rejection(&net, &p.tx_id).await;
    assert!(r.reason.contains("endorsements disagree on the response or read-write set"), "{r:?}");
    good_commits_next(&net, height, "after-disagreement").await;
    assert!(net.stores.iter().all(|s| s.tx_location(&p.tx_id).unwrap().is_none()));
    // In a block: Org2's signature covers another read-write set than the transaction carries,
    // so it does not verify, Org1's alone does not meet the policy: ENDORSEMENT_POLICY_FAILURE.
    let (height, _) = tip(&net).await;
    let mut split = ordered(f.proposal("transfer", "create", &["erin", "1000"]), RwSet::default(), &[&f.peers[0]]);
    split.endorsements.push(endorse(&f.peers[1], &split.proposal, ok(), Rw::new().write("x", "y").build()).endorsement());
    unsubmitted.insert(split.proposal.tx_id.clone());
    forge(&net, names::ORDERED_TX, Some(split.proposal.tx_id.as_bytes()), codec::encode(&split).unwrap()).await;
    assert_eq!(net.codes(&[&split.proposal.tx_id]).await, [TxValidationCode::EndorsementPolicyFailure]);
    good_commits_next(&net, height + 1, "after-split-endorsements").await;

    // --- Blocks written straight to `blocks`, while no transaction is in flight, for the next
    // number: each is dead-lettered by both validators with the reason, and the real next block
    // still commits (the orderers are not fooled into thinking it was written).
    let (height, tip_hash) = tip(&net).await;
    let tx = ordered(f.proposal("kv", "put", &["forged-block", "1"]), Rw::new().write("forged-block", "1").build(), &[&f.peers[0], &f.peers[1]]);
    let resign = |b: &mut Block, by: &Signer| b.metadata.signature = by.sign(&block_signing_bytes(&b.header, &b.metadata, &b.metadata.orderer));
    // Signed by a key that is not an orderer's.
    let mut bad_signature = f.block(height + 1, &tip_hash, std::slice::from_ref(&tx));
    resign(&mut bad_signature, &stranger("orderer"));
    // Chained to a block that does not exist (the forger has no orderer key either).
    let mut wrong_previous = f.block(height + 1, &[0xab; 32], std::slice::from_ref(&tx));
    resign(&mut wrong_previous, &stranger("orderer"));
    // A committed number, signed by an outsider: refused as a forgery, not alarmed as a fork.
    let mut over_committed = f.block(height, &[0xab; 32], std::slice::from_ref(&tx));
    resign(&mut over_committed, &stranger("orderer"));
    let cases = [
        (bad_signature, "the signature of orderer orderer0 does not verify"),
        (wrong_previous, "is not the previous header's hash"),
        (over_committed, "is not the committed block"),
    ];
    for (block, reason) in cases {
        let at = forge(&net, names::BLOCKS, None, codec::encode(&block).unwrap()).await;
        for l in dead_letters(&net, names::BLOCKS, at, &[("validator", 2)]).await {
            assert!(l.reason.contains(reason) && !l.reason.contains("FORK"), "{l:?}");
        }
    }
    good_commits_next(&net, height, "after-forged-blocks").await;
    assert_eq!(net.stores[0].get("kv", "forged-block").unwrap(), None);
    // A reordered transaction list: a copy of a committed block of several transactions with
    // its list reversed. Its header and signature are the original's; its data hash is not.
    let several = |blocks: Vec<(i64, Block)>| blocks.into_iter().map(|(_, b)| b).find(|b| b.transactions.len() >= 2 && b.transactions.first() != b.transactions.last());
    let mut found = several(read::<Block>(&net, names::BLOCKS).await);
    for round in 0..5 {
        if found.is_some() {
            break;
        }
        // Sent in one append, these usually share a block; the cut is the orderer's to decide.
        let batch: Vec<Proposal> = (0..4).map(|i| f.proposal("kv", "put", &[&format!("batch-{round}-{i}"), "1"])).collect();
        net.submit(&batch).await;
        net.codes(&batch.iter().map(|p| p.tx_id.as_str()).collect::<Vec<_>>()).await;
        found = several(read::<Block>(&net, names::BLOCKS).await);
    }
    let mut reordered = found.expect("a block of several transactions");
    let (height, _) = tip(&net).await;
    reordered.transactions.reverse();
    let at = forge(&net, names::BLOCKS, None, codec::encode(&reordered).unwrap()).await;
    for l in dead_letters(&net, names::BLOCKS, at, &[("validator", 2)]).await {
        assert!(l.reason.contains("do not match its data_hash"), "{l:?}");
    }
    good_commits_next(&net, height, "after-reordered-block").await;

    // --- Cut markers written straight to `cut-markers`, with nothing in flight. One that skips
    // a block number is dead-lettered once (by the replica it names), one that repeats a block
    // number already built is stale and ignored by every replica (first valid marker wins, as a
    // slower replica's own marker is), one that repeats the last block's offsets under the next
    // number is dead-lettered once. The next block is still the next number, and holds exactly
    // the next transaction.
    let (height, _) = tip(&net).await;
    let next_offset = net.log.end_offset(net.topics.name(names::ORDERED_TX), 0).await.unwrap();
    let marker = |n: i64, first: i64, last: i64, by: &str| CutMarker { block_number: n, first_offset: first, last_offset: last, cutter_id: by.into(), reason: CutReason::Timeout };
    let skips = forge(&net, names::CUT_MARKERS, None, codec::encode(&marker(height + 5, next_offset, next_offset, "orderer0")).unwrap()).await;
    let repeats_number = forge(&net, names::CUT_MARKERS, None, codec::encode(&marker(height, next_offset, next_offset, "orderer1")).unwrap()).await;
    let repeats_offsets = forge(&net, names::CUT_MARKERS, None, codec::encode(&marker(height + 1, next_offset - 1, next_offset - 1, "orderer1")).unwrap()).await;
    let l = dead_letters(&net, names::CUT_MARKERS, skips, &[("orderer", 1)]).await;
    assert!(l[0].reason.contains("skips ahead") && l[0].instance.as_deref() == Some("orderer0"), "{l:?}");
    let l = dead_letters(&net, names::CUT_MARKERS, repeats_offsets, &[("orderer", 1)]).await;
    assert!(l[0].reason.contains("repeats offsets already in block") && l[0].instance.as_deref() == Some("orderer1"), "{l:?}");
    good_commits_next(&net, height, "after-forged-markers").await;
    assert!(
        read::<DeadLetter>(&net, names::DEAD_LETTERS).await.iter().all(|(_, l)| !(l.source_topic.ends_with(names::CUT_MARKERS) && l.offset == repeats_number.1)),
        "a stale marker is not dead-lettered"
    );
    let built = read::<Block>(&net, names::BLOCKS).await.into_iter().map(|(_, b)| b).find(|b| b.header.number == height + 1).unwrap();
    assert_eq!((built.metadata.first_offset, built.metadata.last_offset), (next_offset, next_offset), "the block holds the good transaction only");

    // --- Huge strings. A proposal of 11 MB (one argument) on `proposals`: endorsed, then
    // rejected by the gateway at AbsoluteMaxBytes (10 MiB) before it reaches the order.
    let (height, _) = tip(&net).await;
    let huge = "x".repeat(11 << 20);
    let p = f.proposal("kv", "put", &["huge", &huge]);
    net.submit(std::slice::from_ref(&p)).await;
    let r = rejection(&net, &p.tx_id).await;
    assert!(r.reason.contains("exceeds AbsoluteMaxBytes"), "{}", &r.reason[..r.reason.len().min(300)]);
    // 10 MB of bytes that are not a record: dead-lettered by both endorsers and the gateway.
    let at = forge(&net, names::PROPOSALS, Some(b"huge-garbage"), vec![b'x'; 10 << 20]).await;
    dead_letters(&net, names::PROPOSALS, at, &[("endorser", 2), ("gateway", 1)]).await;
    // A proposal's header followed by a tx id that claims to be 1 GiB long (and is not there):
    // dead-lettered, nothing is allocated for it.
    let mut claims = codec::encode(&f.proposal("kv", "put", &["k", "v"])).unwrap()[..10].to_vec();
    claims.extend(avro_long(1 << 30));
    let at = forge(&net, names::PROPOSALS, Some(b"huge-claim"), claims).await;
    for l in dead_letters(&net, names::PROPOSALS, at, &[("endorser", 2), ("gateway", 1)]).await {
        assert!(l.reason.contains("Proposal"), "{l:?}");
    }
    // A record over the log's limit never gets onto the topic at all.
    let before = net.log.end_offset(net.topics.name(names::PROPOSALS), 0).await.unwrap();
    let err = net.log.append(net.topics.name(names::PROPOSALS), vec![OutRecord::unkeyed(vec![0; MAX_RECORD_BYTES + 1])]).await.unwrap_err();
    assert!(err.to_string().contains("byte limit"), "{err}");
    assert_eq!(net.log.end_offset(net.topics.name(names::PROPOSALS), 0).await.unwrap(), before);
    good_commits_next(&net, height, "after-huge-strings").await;

    // --- Records of the wrong schema on the output topics, which no stage reads: the checker
    // and the API's trackers skip them.
    let marker_bytes = codec::encode(&marker(0, 0, 0, "orderer0")).unwrap();
    for suffix in [names::VALIDATED_BLOCKS, names::REJECTIONS, names::DEAD_LETTERS, names::STATE_CHANGES, names::TX_RESULTS] {
        forge(&net, suffix, Some(b"garbage"), marker_bytes.clone()).await;
        forge(&net, suffix, Some(b"garbage"), b"not avro".to_vec()).await;
    }
    let (height, _) = tip(&net).await;
    good_commits_next(&net, height, "the-last-one").await;

    // --- The checker over the topics and the stores: the forged ordered transactions are named
    // (nobody submitted them), and nothing else: no loss, no double apply, no gap or fork, peers
    // and the replay from offset 0 agree, and the `transfer` books balance.
    net.halt().await;
    let config = AuditConfig { network: Arc::new(net.f.network.clone()), topics: net.topics.clone(), stores, expect_settled: true, progress: false };
    let report = audit(net.log.clone(), config).await.unwrap();
    let mut named = BTreeSet::new();
    for v in &report.violations {
        match v {
            Violation::Unsubmitted { tx_id, .. } => assert!(named.insert(tx_id.clone()), "named twice: {v}"),
            other => panic!("unexpected violation: {other}\n{:#?}", report.violations),
        }
    }
    assert_eq!(named, unsubmitted, "{:#?}", report.violations);
    // The scenario's three undecodable records, the three forged blocks, and the reordered copy
    // (its signed header is the original's, but its transactions are not the ones the header's
    // data hash covers).
    assert_eq!(report.refused_block_records, 7, "{report:#?}");
    assert_eq!(report.money.as_ref().map(|m| (m.created, m.held)), Some((10, 10)), "{report:#?}");
    assert_eq!(report.codes.get("DUPLICATE_TXID"), Some(&1), "{:?}", report.codes);
    assert_eq!(report.codes.get("ENDORSEMENT_POLICY_FAILURE"), Some(&3), "{:?}", report.codes);
}
