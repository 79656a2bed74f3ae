//! The checker on a real run of every stage over the embedded log: silent on a healthy run, and
//! naming each fault written into the topics afterwards (as a buggy or malicious stage would).

use std::sync::Arc;

use streamledger_audit::{audit, AuditConfig, AuditReport, Violation};
use streamledger_core::codec;
use streamledger_core::crypto::block_header_hash;
use streamledger_core::fixtures::Rw;
use streamledger_core::model::{Block, Proposal, TxResult, ValidatedBlock};
use streamledger_core::validation::TxValidationCode;
use streamledger_embedded::log::EmbeddedLog;
use streamledger_embedded::store::EmbeddedStore;
use streamledger_ports::log::{ensure_topics, Log, OutRecord};
use streamledger_ports::store::PeerStore;
use streamledger_ports::topics::names;
use streamledger_stages::testkit::{Options, TestNetwork};

/// A network that ran transfers (with conflicts) and stopped; its topics and stores stay.
struct Ran {
    _dir: tempfile::TempDir,
    net: TestNetwork,
    stores: Vec<(String, Arc<dyn PeerStore>)>,
    created: u128,
}

async fn ran() -> Ran {
    let dir = tempfile::tempdir().unwrap();
    let log: Arc<dyn Log> = EmbeddedLog::open(&dir.path().join("log")).unwrap();
    let stores: Vec<(String, Arc<dyn PeerStore>)> = ["Org1", "Org2"]
        .iter()
        .map(|org| (format!("{org}.peer0"), Arc::new(EmbeddedStore::open(&dir.path().join(format!("{org}.redb"))).unwrap()) as Arc<dyn PeerStore>))
        .collect();
    let net = TestNetwork::start(log, stores.iter().map(|(_, s)| s.clone()).collect(), Options::default()).await;
    let f = &net.f;
    let create = [f.proposal("transfer", "create", &["alice", "100"]), f.proposal("transfer", "create", &["bob", "7"])];
    net.submit(&create).await;
    net.codes(&create.iter().map(|p| p.tx_id.as_str()).collect::<Vec<_>>()).await;
    // Sent at once from one account: some conflict, and the books must still balance.
    let spends: Vec<Proposal> = (0..6).map(|i| f.proposal("transfer", "transfer", &["alice", "bob", &format!("{}", i + 1)])).collect();
    net.submit(&spends).await;
    net.codes(&spends.iter().map(|p| p.tx_id.as_str()).collect::<Vec<_>>()).await;
    net.peers_agree().await;
    let mut net = net;
    net.halt().await;
    Ran { _dir: dir, net, stores, created: 107 }
}

async fn check(r: &Ran, expect_settled: bool) -> AuditReport {
    let config = AuditConfig {
        network: Arc::new(r.net.f.network.clone()),
        topics: r.net.topics.clone(),
        stores: r.stores.clone(),
        expect_settled,
        progress: false,
    };
    audit(r.net.log.clone(), config).await.expect("the audit runs")
}

async fn append<T: codec::Record>(r: &Ran, suffix: &str, value: &T) {
    r.net.log.append(r.net.topics.name(suffix), vec![OutRecord::unkeyed(codec::encode(value).unwrap())]).await.unwrap();
}

async fn tip(r: &Ran) -> Block {
    let blocks = r.net.read_all::<Block>(names::BLOCKS).await;
    let top = blocks.iter().map(|b| b.header.number).max().unwrap();
    blocks.into_iter().find(|b| b.header.number == top).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_run_has_no_violations_and_its_books_balance() {
    let r = ran().await;
    let report = check(&r, true).await;
    assert!(report.ok(), "{:#?}", report.violations);
    assert_eq!(report.proposals, 8);
    assert_eq!(report.transactions, 8, "each proposal once in the chain");
    let valid = report.codes.get("VALID").copied().unwrap_or(0);
    let conflicts = report.codes.get("MVCC_READ_CONFLICT").copied().unwrap_or(0);
    assert!(valid >= 3 && valid + conflicts == 8, "{:?}", report.codes);
    let money = report.money.clone().expect("a transfer ledger");
    assert_eq!((money.created, money.held, money.accounts), (r.created, r.created, 2));
    assert_eq!(report.peers.len(), 2);
    assert!(report.peers.values().all(|h| *h == report.last_block), "{:?} vs {}", report.peers, report.last_block);
    assert_eq!(report.last_block as u64 + 1, report.blocks);
    assert_eq!(report.state_hash.len(), 64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_store_given_for_a_peer_at_the_tip_is_behind() {
    let mut r = ran().await;
    let empty = tempfile::tempdir().unwrap();
    r.stores[1].1 = Arc::new(EmbeddedStore::open(&empty.path().join("empty.redb")).unwrap());
    let report = check(&r, true).await;
    let peer = format!("{}'s store", r.stores[1].0);
    assert!(
        matches!(report.violations.as_slice(), [Violation::PeerBehind { peer: p, last_block: -1, .. }] if *p == peer),
        "{:#?}",
        report.violations
    );
    assert!(check(&r, false).await.ok(), "not settled: a store may lag");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_proposal_with_no_verdict_is_lost() {
    let r = ran().await;
    // On the topic (acknowledged) after every stage stopped: nobody will ever answer it.
    let p = r.net.f.proposal("transfer", "create", &["carol", "5"]);
    r.net.submit(std::slice::from_ref(&p)).await;
    let report = check(&r, true).await;
    assert!(
        matches!(report.violations.as_slice(), [Violation::Lost { tx_id, .. }] if *tx_id == p.tx_id),
        "{:#?}",
        report.violations
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsubmitted_transaction_in_a_signed_block_is_reported_and_peers_behind_it() {
    let r = ran().await;
    let last = tip(&r).await;
    // Signed by a real orderer key, linking, valid: only the proposals topic shows nobody sent it.
    let forged = r.net.f.tx(Rw::new().write("k", "v").build());
    let block = r.net.f.block(last.header.number + 1, &block_header_hash(&last.header), std::slice::from_ref(&forged));
    append(&r, names::BLOCKS, &block).await;
    let report = check(&r, true).await;
    assert!(report.violations.contains(&Violation::Unsubmitted { tx_id: forged.proposal.tx_id.clone(), block: block.header.number, position: 0 }), "{:#?}", report.violations);
    assert_eq!(report.last_block, block.header.number, "the replay commits it");
    let behind: Vec<_> = report.violations.iter().filter(|v| matches!(v, Violation::PeerBehind { .. })).collect();
    assert_eq!(behind.len(), 2, "both peers stopped before it: {:#?}", report.violations);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_and_a_fork_are_reported() {
    let r = ran().await;
    let last = tip(&r).await;
    let n = last.header.number;
    // A signed block two ahead of the tip: the one between never appears.
    let ahead = r.net.f.block(n + 2, &[7u8; 32], &[r.net.f.tx(Rw::new().write("a", "1").build())]);
    append(&r, names::BLOCKS, &ahead).await;
    // A second, different, signed block with the tip's number and parent.
    let fork = r.net.f.block(n, &last.header.previous_hash, &[r.net.f.tx(Rw::new().write("b", "2").build())]);
    append(&r, names::BLOCKS, &fork).await;
    let report = check(&r, false).await;
    assert!(report.violations.iter().any(|v| matches!(v, Violation::Gap { missing, next_present, .. } if *missing == n + 1 && *next_present == n + 2)), "{:#?}", report.violations);
    assert!(report.violations.iter().any(|v| matches!(v, Violation::Fork { number, .. } if *number == n)), "{:#?}", report.violations);
    assert_eq!(report.blocks as i64, n + 1, "neither joins the chain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_disagrees_on_state_or_codes_is_reported() {
    let r = ran().await;
    let last = tip(&r).await;
    let n = last.header.number;
    let results: Vec<TxResult> = (0..last.transactions.len()).map(|_| TxResult { tx_id: String::new(), code: TxValidationCode::InvalidOtherReason as i32 }).collect();
    let liar = ValidatedBlock { block_number: n, block_hash: block_header_hash(&last.header).to_vec(), peer: "Org3.peer0".into(), results, state_hash: vec![9; 32] };
    append(&r, names::VALIDATED_BLOCKS, &liar).await;
    let report = check(&r, false).await;
    assert!(
        report.violations.iter().any(|v| matches!(v, Violation::StateDisagrees { number, source_b, .. } if *number == n && source_b.contains("Org3.peer0"))),
        "{:#?}",
        report.violations
    );
    // No honest validator gives INVALID_OTHER_REASON to these transactions.
    assert!(report.violations.iter().any(|v| matches!(v, Violation::CodesDisagree { number, peer, .. } if *number == n && peer == "Org3.peer0")), "{:#?}", report.violations);
    // A verdict on a block the chain does not have.
    let off = ValidatedBlock { block_number: n + 5, block_hash: vec![1; 32], peer: "Org3.peer0".into(), results: vec![], state_hash: vec![1; 32] };
    append(&r, names::VALIDATED_BLOCKS, &off).await;
    let report = check(&r, false).await;
    assert!(report.violations.iter().any(|v| matches!(v, Violation::VerdictOffChain { number, .. } if *number == n + 5)), "{:#?}", report.violations);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reordered_copy_of_a_block_is_refused_not_counted_as_a_copy() {
    let dir = tempfile::tempdir().unwrap();
    let log: Arc<dyn Log> = EmbeddedLog::open(&dir.path().join("log")).unwrap();
    let f = streamledger_core::fixtures::Fixture::new();
    let topics = streamledger_ports::topics::Topics::default_for(f.network.channel());
    ensure_topics(log.as_ref(), &topics).await.unwrap();
    let txs = [f.tx(Rw::new().write("a", "1").build()), f.tx(Rw::new().write("b", "2").build())];
    let block = f.block(0, &[0; 32], &txs);
    let mut reordered = block.clone();
    reordered.transactions.reverse();
    for b in [&block, &block, &reordered] {
        log.append(topics.name(names::BLOCKS), vec![OutRecord::unkeyed(codec::encode(b).unwrap())]).await.unwrap();
    }
    let config = AuditConfig { network: Arc::new(f.network.clone()), topics, stores: vec![], expect_settled: false, progress: false };
    let report = audit(log, config).await.unwrap();
    assert_eq!((report.blocks, report.block_copies, report.refused_block_records), (1, 1, 1), "{report:#?}");
    assert!(!report.violations.iter().any(|v| matches!(v, Violation::Fork { .. })), "{:#?}", report.violations);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_block_that_does_not_link_is_harmless_when_a_linking_copy_follows() {
    let r = ran().await;
    let last = tip(&r).await;
    let n = last.header.number;
    let tx = r.net.f.tx(Rw::new().write("k", "v").build());
    // An orderer's block n+1 built on a parent nobody has, then the real block n+1.
    let stray = r.net.f.block(n + 1, &[7u8; 32], std::slice::from_ref(&tx));
    let next = r.net.f.block(n + 1, &block_header_hash(&last.header), std::slice::from_ref(&tx));
    append(&r, names::BLOCKS, &stray).await;
    append(&r, names::BLOCKS, &next).await;
    let report = check(&r, false).await;
    assert!(!report.violations.iter().any(|v| matches!(v, Violation::ReplayFailed { .. } | Violation::Gap { .. })), "{:#?}", report.violations);
    assert_eq!((report.last_block, report.blocks as i64, report.refused_block_records), (n + 1, n + 2, 1), "{report:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_block_that_does_not_link_and_is_never_repaired_fails_the_replay_naming_it() {
    let r = ran().await;
    let last = tip(&r).await;
    let n = last.header.number;
    let stray = r.net.f.block(n + 1, &[7u8; 32], &[r.net.f.tx(Rw::new().write("k", "v").build())]);
    append(&r, names::BLOCKS, &stray).await;
    let report = check(&r, false).await;
    let broken = format!("broken chain at block {}", n + 1);
    assert!(report.violations.iter().any(|v| matches!(v, Violation::ReplayFailed { message } if message.contains(&broken))), "{:#?}", report.violations);
    assert_eq!(report.last_block, n, "the blocks before it are replayed");
}
