//! `streamledger topics apply|check` and `streamledger up --kafka` against a real Kafka-protocol
//! broker (tansu): the CLI creates the channel's topics, then the whole network runs on Kafka and
//! commits transfers submitted through the API. Then every stage as its own OS process, with
//! proposals produced straight to Kafka: the pipeline as is, with one endorser of two SIGKILLed
//! and its partitions taken over by the other, and with an endorser of two, an orderer replica and
//! a validator SIGKILLed mid-run. The adapter itself is tested in services/kafka.

mod common;

#[path = "../../services/kafka/tests/common/mod.rs"]
mod kafka;

#[path = "common/stagenet.rs"]
mod stagenet;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::*;
use stagenet::*;
use streamledger_core::codec;
use streamledger_core::crypto::block_header_hash;
use streamledger_core::model::{Block, OrderedTx, Proposal};
use streamledger_kafka::config::{INFINITE_RETENTION, RETENTION_MAX};
use streamledger_ports::log::{partition_for, Log, Subscription};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_apply_then_up_on_kafka_commits_transfers() {
    let broker = kafka::Broker::start();
    let dir = tempfile::tempdir().unwrap();
    // tansu needs these (see the README's Kafka section); passed through as librdkafka-style
    // properties in a file, as an operator would.
    let properties = dir.path().join("kafka.properties");
    std::fs::write(&properties, format!("{INFINITE_RETENTION}={RETENTION_MAX}\nfetch.wait.max.ms=100\n")).unwrap();
    let kafka_args = ["--kafka", &broker.bootstrap(), "--kafka-config", properties.to_str().unwrap()];

    bounded("topics and up on Kafka", 150, async {
        let check = cli(None, &[&["topics", "check"][..], &kafka_args].concat()).await;
        check.assert_failure();
        assert!(check.stdout.contains("MISSING"), "{}", check.stdout);
        let apply = cli(None, &[&["topics", "apply"][..], &kafka_args].concat()).await;
        apply.assert_success();
        assert!(apply.stdout.contains("mychannel.proposals") && apply.stdout.contains("created"), "{}", apply.stdout);
        let check = cli(None, &[&["topics", "check"][..], &kafka_args].concat()).await;
        check.assert_success();
        eprintln!("kafka: topics check after apply:\n{}", check.stdout);

        let up = Up::start_with(dir.path(), &kafka_args);
        let c = up.client.clone();
        submit_valid(&c, "transfer", "create", &["alice", "100"]).await;
        submit_valid(&c, "transfer", "create", &["bob", "0"]).await;
        let (_, block, _) = submit_valid(&c, "transfer", "transfer", &["alice", "bob", "40"]).await;
        assert_eq!((balance(&c, "alice").await, balance(&c, "bob").await), (60, 40));
        let (height, hash) = wait_peers_agree(&c, block, Duration::from_secs(30)).await;
        eprintln!("kafka: both peers at block {height}, state hash {hash}");
        drop(up);
    })
    .await;
}

/// Produces a batch of proposals straight to Kafka and waits until every one is VALID on both
/// peers and the replicas of the given endorser processes have its blocks too (the next batch
/// reads what this one wrote, and an endorser simulates on its own replica, which may lag).
async fn produce_and_settle(net: &mut StageNet, verdicts: &mut Verdicts, batch: &[Proposal], endorsers: &[&str], timeout: Duration) {
    net.produce(batch).await;
    let ids: Vec<String> = batch.iter().map(|p| p.tx_id.clone()).collect();
    let missing = verdicts.wait_settled(&ids, timeout).await;
    assert!(missing.is_empty(), "no verdict within {timeout:?} for {missing:?}");
    for peer in PEERS {
        for id in &ids {
            assert_eq!(verdicts.code(peer, id), Some(CODE_VALID), "{peer}: {id} is not VALID (rejected: {:?})", verdicts.rejected.get(id));
        }
    }
    let last_block = PEERS.iter().map(|peer| verdicts.last_block(peer)).min().unwrap_or(-1);
    for name in endorsers {
        let url = net.metrics_url(name);
        let deadline = Instant::now() + timeout;
        // The gauge is Fabric's height: the last committed block + 1.
        while metric(&url, "ledger_blockchain_height", &["(endorser replica)"]).await.unwrap_or(0.0) < (last_block + 1) as f64 {
            assert!(Instant::now() < deadline, "{name}'s replica did not reach block {last_block} within {timeout:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stage_as_its_own_process_on_kafka() {
    let mut net = StageNet::start("").await;
    bounded("stages as processes on Kafka", 150, async {
        for (name, args) in ALL_STAGES {
            net.spawn(name, args);
        }
        let mut verdicts = Verdicts::new(&net).await;
        let creates = [net.proposal("create", &["alice", "100"]), net.proposal("create", &["bob", "0"])];
        produce_and_settle(&mut net, &mut verdicts, &creates, &["e1", "e2"], Duration::from_secs(120)).await;
        let spend = net.proposal("transfer", &["alice", "bob", "25"]);
        produce_and_settle(&mut net, &mut verdicts, std::slice::from_ref(&spend), &[], Duration::from_secs(60)).await;
        let blocks: BTreeSet<i64> = verdicts.sequence.iter().map(|(_, b, _)| *b).collect();
        for b in &blocks {
            if let (Some(h1), Some(h2)) = (verdicts.state_hash(PEERS[0], *b), verdicts.state_hash(PEERS[1], *b)) {
                assert_eq!(h1, h2, "state hashes differ at block {b}");
            }
        }
        eprintln!("kafka processes: 3 transactions VALID on both peers over blocks {blocks:?}");
    })
    .await;
}

/// Two Org1 endorsers in one group; one is SIGKILLed and nobody replaces it. Once the broker has
/// expired it (a 6 s session), the survivor must read every `proposals` partition. tansu 0.6.0
/// does not hand a survivor the dead member's share, so the adapter notices partitions that no
/// member commits for longer than a session timeout and joins again as a new member (`Stranding`
/// in services/kafka/src/log.rs). Then a `create` on every partition must commit VALID. Those
/// produced before the takeover are rejected after the gateway's 10 s endorsement timeout, and
/// are tried again on the same partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_surviving_endorser_takes_over_a_killed_ones_partitions_on_kafka() {
    let mut net = StageNet::start("session.timeout.ms=6000\nheartbeat.interval.ms=1000\n").await;
    bounded("a surviving endorser takes over on Kafka", 240, async {
        for (name, args) in ALL_STAGES.into_iter().chain([("e1b", ORG1_ENDORSER)]) {
            net.spawn(name, args);
        }
        let mut verdicts = Verdicts::new(&net).await;
        let mut n = 0;
        // A `create` of a new account whose tx id lands on `partition`.
        let mut create_on = |net: &mut StageNet, partition: i32| loop {
            n += 1;
            let p = net.proposal("create", &[&format!("takeover{n}"), "1"]);
            if partition_for(p.tx_id.as_bytes(), PROPOSAL_PARTITIONS) == partition {
                break p;
            }
        };
        // One on every partition, until both Org1 endorsers have read some: each owns partitions
        // (the second may join after the first has read a round alone).
        let (a, b) = (net.metrics_url("e1"), net.metrics_url("e1b"));
        let split_by = Instant::now() + Duration::from_secs(120);
        while !(has_consumed(&a, "endorser").await && has_consumed(&b, "endorser").await) {
            assert!(Instant::now() < split_by, "the two Org1 endorsers did not split the partitions within 120 s");
            let round: Vec<Proposal> = (0..PROPOSAL_PARTITIONS).map(|p| create_on(&mut net, p)).collect();
            produce_and_settle(&mut net, &mut verdicts, &round, &["e1", "e1b", "e2"], Duration::from_secs(120)).await;
        }

        net.sigkill("e1b");
        let killed = Instant::now();
        let deadline = killed + Duration::from_secs(90);
        let mut took: BTreeMap<i32, Duration> = BTreeMap::new();
        let mut refusals: Vec<String> = Vec::new();
        while took.len() < PROPOSAL_PARTITIONS as usize && Instant::now() < deadline {
            let open: Vec<i32> = (0..PROPOSAL_PARTITIONS).filter(|p| !took.contains_key(p)).collect();
            let batch: Vec<(i32, Proposal)> = open.iter().map(|p| (*p, create_on(&mut net, *p))).collect();
            let proposals: Vec<Proposal> = batch.iter().map(|(_, p)| p.clone()).collect();
            net.produce(&proposals).await;
            let ids: Vec<String> = proposals.iter().map(|p| p.tx_id.clone()).collect();
            verdicts.wait_settled(&ids, deadline.saturating_duration_since(Instant::now())).await;
            for (partition, p) in &batch {
                if PEERS.iter().all(|peer| verdicts.code(peer, &p.tx_id) == Some(CODE_VALID)) {
                    took.insert(*partition, killed.elapsed());
                } else if let Some(reason) = verdicts.rejected.get(&p.tx_id) {
                    refusals.push(format!("partition {partition}: {reason}"));
                }
            }
        }
        assert_eq!(
            took.len(),
            PROPOSAL_PARTITIONS as usize,
            "with one Org1 endorser left, only partitions {:?} of proposals committed a create within 90 s of the kill; refusals: {refusals:?}",
            took.keys().collect::<Vec<_>>()
        );
        // tansu does not hand the survivor those partitions (the test's broker; Apache Kafka would,
        // and this count could stay 0 there): it rejoined, and its metric says so.
        let rejoins = metric(&net.metrics_url("e1"), "streamledger_consumer_rejoins_total", &["stage=\"endorser\""]).await;
        assert!(rejoins.is_some_and(|n| n >= 1.0), "the survivor took over without a counted rejoin: {rejoins:?}");
        eprintln!("kafka takeover: a create VALID on every partition after the kill, at {took:?}; {} refused on the way; {rejoins:?} rejoins", refusals.len());
    })
    .await;
}

/// Accounts the load moves money between, and what each starts with.
const LOAD_ACCOUNTS: usize = 16;
const INITIAL_BALANCE: u64 = 1_000;
/// Transfers produced per tick of the load (each account in one of them), and the tick.
const PER_TICK: usize = LOAD_ACCOUNTS / 2;
const TICK: Duration = Duration::from_millis(400);
/// Ticks between two faults, at least (each fault needs the pipeline to have moved on).
const TICKS_BETWEEN_FAULTS: usize = 3;
/// Within this many ticks every fault must have been injected (a stalled pipeline fails here).
const MAX_TICKS: usize = 100;
/// Transfers after the faults, each between two accounts of its own (so none conflicts), two on
/// each of the four `proposals` partitions.
const FINAL_PER_PARTITION: usize = 2;
const PROPOSAL_PARTITIONS: i32 = 4;

fn load_account(i: usize) -> String {
    format!("acc{i}")
}

/// The faults, in order, each once the pipeline has moved on after the previous one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    KillEndorser,
    KillOrderer,
    KillValidator,
    RestartValidator,
    RestartOrderer,
    RestartEndorser,
    /// Not a fault: done once the restarted endorser has endorsed something.
    EndorserRejoined,
}

/// Two Org1 endorsers in one group, two orderers, a validator per peer, all as OS processes on
/// Kafka, under a steady load of transfers. Mid-run: one Org1 endorser is SIGKILLed (the other
/// takes its partitions), then orderer0 (orderer1 takes over its blocks), then Org1's validator,
/// which is restarted on its store, then orderer0 is restarted. Nothing is lost (every
/// transaction is committed on both peers or rejected with a reason), nothing is applied twice
/// (each tx id once in the chain, the restarted validator resumes after its savepoint and ends
/// with the other peer's state hash and balances), and the chain has no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endorser_an_orderer_and_a_validator_killed_mid_run_on_kafka_lose_nothing() {
    // A SIGKILLed group member's partitions move when its session expires: 6 s instead of
    // librdkafka's 45 s, which would outlast the gateway's 10 s endorsement timeout.
    let mut net = StageNet::start("session.timeout.ms=6000\nheartbeat.interval.ms=1000\n").await;
    bounded("stages killed mid-run on Kafka", 300, async {
        // A second Org1 endorser, e1b, in e1's group.
        for (name, args) in ALL_STAGES.into_iter().chain([("e1b", ORG1_ENDORSER)]) {
            net.spawn(name, args);
        }
        let mut verdicts = Verdicts::new(&net).await;

        // The final transfers, signed now (a tx id, hence its partition, is known once signed)
        // and produced after the faults; their accounts are created now, so that both orgs'
        // replicas of them are long settled when they are endorsed (no disagreement, no conflict).
        let mut finals: BTreeMap<i32, Vec<Proposal>> = BTreeMap::new();
        for pair in 0.. {
            if finals.len() == PROPOSAL_PARTITIONS as usize && finals.values().all(|v| v.len() == FINAL_PER_PARTITION) {
                break;
            }
            let p = net.proposal("transfer", &[&format!("fresh{pair}a"), &format!("fresh{pair}b"), "1"]);
            let slot = finals.entry(partition_for(p.tx_id.as_bytes(), PROPOSAL_PARTITIONS)).or_default();
            if slot.len() < FINAL_PER_PARTITION {
                slot.push(p);
            }
        }
        let final_txs: Vec<Proposal> = finals.into_values().flatten().collect();
        let accounts: Vec<String> = (0..LOAD_ACCOUNTS).map(load_account).chain(final_txs.iter().flat_map(|p| p.args[..2].to_vec())).collect();
        let creates: Vec<Proposal> = accounts.iter().map(|a| net.proposal("create", &[a, &INITIAL_BALANCE.to_string()])).collect();
        produce_and_settle(&mut net, &mut verdicts, &creates, &["e1", "e1b", "e2"], Duration::from_secs(120)).await;
        let total = INITIAL_BALANCE * accounts.len() as u64;

        // The load, with the faults injected between ticks.
        let blocks_topic = net.topic("blocks");
        let mut submitted: Vec<String> = Vec::new();
        let mut faults = [
            Fault::KillEndorser,
            Fault::KillOrderer,
            Fault::KillValidator,
            Fault::RestartValidator,
            Fault::RestartOrderer,
            Fault::RestartEndorser,
            Fault::EndorserRejoined,
        ]
        .into_iter()
        .peekable();
        let mut last_fault_tick = 0;
        // The blocks-topic offsets written while orderer0 was down: (from, until).
        let mut orderer_down = (0, 0);
        let mut height_at_kill = -1;
        let mut ticker = tokio::time::interval(TICK); // paces the load; it synchronizes nothing
        for tick in 1..=MAX_TICKS {
            ticker.tick().await;
            let load: Vec<Proposal> = (0..PER_TICK)
                .map(|i| {
                    // Pairs (i, i + PER_TICK), the direction alternating by tick.
                    let (from, to) = if tick % 2 == 0 { (i, i + PER_TICK) } else { (i + PER_TICK, i) };
                    let (from, to) = (load_account(from), load_account(to));
                    net.proposal("transfer", &[&from, &to, "1"])
                })
                .collect();
            net.produce(&load).await;
            submitted.extend(load.iter().map(|p| p.tx_id.clone()));
            verdicts.poll(Duration::from_millis(10)).await;
            let Some(&fault) = faults.peek() else { break };
            if tick < last_fault_tick + TICKS_BETWEEN_FAULTS {
                continue;
            }
            match fault {
                Fault::KillEndorser => {
                    // Only once both Org1 endorsers have endorsed something: each owns partitions.
                    let (a, b) = (net.metrics_url("e1"), net.metrics_url("e1b"));
                    if !(has_consumed(&a, "endorser").await && has_consumed(&b, "endorser").await) {
                        continue;
                    }
                    net.sigkill("e1b");
                }
                Fault::KillOrderer => {
                    net.sigkill("o0");
                    // The window opens after the kill, not before it: orderer0 may write a block
                    // between an offset read and the kill (CI once found one of its blocks inside
                    // a window read before the kill), and a produce request it had handed to the
                    // kernel may still reach the broker just after its exit; the pause lets such
                    // a straggler land first.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    orderer_down.0 = net.log.end_offset(&blocks_topic, 0).await.unwrap();
                }
                Fault::KillValidator => {
                    // Committed before the kill, at least (a verdict follows its commit).
                    height_at_kill = verdicts.last_block(PEERS[0]);
                    if height_at_kill < 0 {
                        continue;
                    }
                    net.sigkill("v1");
                }
                Fault::RestartValidator => {
                    net.spawn("v1", stage_args("v1"));
                    // It publishes its height as it opens its store, before reading any block.
                    let url = net.metrics_url("v1");
                    let deadline = Instant::now() + Duration::from_secs(30);
                    let resumed_at = loop {
                        if let Some(h) = metric(&url, "ledger_blockchain_height", &[r#"peer="Org1.peer0""#]).await {
                            break h as i64;
                        }
                        assert!(Instant::now() < deadline, "the restarted validator published no height");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    };
                    // Its store fsyncs once a second, so it may resume below the height it had
                    // announced and re-apply the blocks after its savepoint from the topic (the
                    // checks below see them announced again with the same state hashes). It can
                    // never resume above what the orderers wrote.
                    let written = net.log.end_offset(&blocks_topic, 0).await.unwrap();
                    assert!(resumed_at < written, "restarted at height {resumed_at}, but only {written} blocks were written");
                    eprintln!("validator killed after block {height_at_kill}, restarted at height {resumed_at}");
                }
                Fault::RestartOrderer => {
                    // Only once orderer1 has written blocks on its own.
                    orderer_down.1 = net.log.end_offset(&blocks_topic, 0).await.unwrap();
                    if orderer_down.1 == orderer_down.0 {
                        continue;
                    }
                    net.spawn("o0", stage_args("o0"));
                }
                // The survivor may have taken over the killed one's partitions by now (the adapter
                // rejoins when tansu leaves them unread, see the README's Kafka section); a
                // replacement joins the group and gets a share again.
                Fault::RestartEndorser => net.spawn("e1b", ORG1_ENDORSER),
                Fault::EndorserRejoined => {
                    let url = net.metrics_url("e1b");
                    if !has_consumed(&url, "endorser").await {
                        continue;
                    }
                }
            }
            eprintln!("tick {tick}: {fault:?} ({} transfers produced, {} settled)", submitted.len(), submitted.iter().filter(|id| verdicts.settled(id)).count());
            faults.next();
            last_fault_tick = tick;
        }
        assert!(faults.peek().is_none(), "not every fault was injected within {MAX_TICKS} ticks: next {:?}", faults.peek());

        // After the faults: transfers on every partition, none of which may conflict or be refused.
        let partitions: BTreeSet<i32> = final_txs.iter().map(|p| partition_for(p.tx_id.as_bytes(), PROPOSAL_PARTITIONS)).collect();
        net.produce(&final_txs).await;
        submitted.extend(final_txs.iter().map(|p| p.tx_id.clone()));
        let missing = verdicts.wait_settled(&submitted, Duration::from_secs(120)).await;
        assert!(missing.is_empty(), "{} of {} transactions got no verdict: {missing:?}", missing.len(), submitted.len());
        for p in &final_txs {
            for peer in PEERS {
                assert_eq!(verdicts.code(peer, &p.tx_id), Some(CODE_VALID), "{peer}: final transfer {} (rejected: {:?})", p.tx_id, verdicts.rejected.get(&p.tx_id));
            }
        }
        eprintln!("final transfers VALID on partitions {partitions:?}");
        for id in &submitted {
            let committed = PEERS.map(|peer| verdicts.code(peer, id));
            assert_eq!(committed[0], committed[1], "the peers gave {id} different codes");
            assert!(!(committed[0].is_some() && verdicts.rejected.contains_key(id)), "{id} is both committed and rejected");
        }

        // Both peers at the chain's last block, with one state hash.
        let deadline = Instant::now() + Duration::from_secs(30);
        while verdicts.last_block(PEERS[0]) != verdicts.last_block(PEERS[1]) {
            assert!(Instant::now() < deadline, "the peers did not reach one height");
            verdicts.poll(Duration::from_millis(500)).await;
        }
        let height = verdicts.last_block(PEERS[0]);
        assert_eq!(verdicts.state_hash(PEERS[0], height), verdicts.state_hash(PEERS[1], height), "state hashes differ at block {height}");

        // The chain: numbers 0..=height, each linked to the previous header; a second copy of a
        // number (a takeover race) must be identical; every tx id at most once.
        let blocks: Vec<Block> = net.read_all("blocks").await;
        let mut chain: Vec<&Block> = Vec::new();
        let mut copies = 0;
        for b in &blocks {
            match chain.get(b.header.number as usize) {
                Some(first) => {
                    assert_eq!(first.header, b.header, "two different blocks {}", b.header.number);
                    copies += 1;
                }
                None => {
                    assert_eq!(b.header.number, chain.len() as i64, "a gap before block {}", b.header.number);
                    if let Some(prev) = chain.last() {
                        assert_eq!(b.header.previous_hash, block_header_hash(&prev.header).to_vec(), "block {} does not link", b.header.number);
                    }
                    chain.push(b);
                }
            }
        }
        assert_eq!(chain.len() as i64, height + 1, "the peers' height is the chain's");
        let (from, until) = orderer_down;
        let not_orderer1: Vec<(i64, i64, &str)> = (from..until)
            .zip(&blocks[from as usize..until as usize])
            .filter(|(_, b)| b.metadata.orderer != "orderer1")
            .map(|(offset, b)| (offset, b.header.number, b.metadata.orderer.as_str()))
            .collect();
        assert!(not_orderer1.is_empty(), "orderer1 wrote every block while orderer0 was down (offsets {from}..{until}); (offset, block, writer) not by it: {not_orderer1:?}");
        let mut in_chain: BTreeMap<String, usize> = BTreeMap::new();
        let mut balances: BTreeMap<String, i64> = BTreeMap::new();
        for tx in chain.iter().flat_map(|b| &b.transactions) {
            let tx: OrderedTx = codec::decode(tx).expect("only the gateway writes ordered-tx here");
            *in_chain.entry(tx.proposal.tx_id.clone()).or_default() += 1;
            if verdicts.code(PEERS[0], &tx.proposal.tx_id) != Some(CODE_VALID) {
                continue;
            }
            match (tx.proposal.function.as_str(), tx.proposal.args.as_slice()) {
                ("create", [name, amount]) => *balances.entry(name.clone()).or_default() += amount.parse::<i64>().unwrap(),
                ("transfer", [from, to, amount]) => {
                    let amount: i64 = amount.parse().unwrap();
                    *balances.entry(from.clone()).or_default() -= amount;
                    *balances.entry(to.clone()).or_default() += amount;
                }
                other => panic!("unexpected transaction {other:?}"),
            }
        }
        let twice: Vec<_> = in_chain.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "tx ids more than once in the chain: {twice:?}");
        let committed = submitted.iter().filter(|id| verdicts.code(PEERS[0], id).is_some()).count();
        assert_eq!(in_chain.len(), committed + creates.len(), "the chain holds exactly the committed transactions");

        // The restarted validator resumed: its verdicts go up block by block, and after the
        // restart it goes back once at most, to re-announce the blocks its store had not made
        // durable yet (the store fsyncs once a second; those blocks are re-applied from the
        // topic), each with the state hash it had.
        let org1: Vec<(i64, &Vec<u8>)> = verdicts.sequence.iter().filter(|(p, ..)| p == PEERS[0]).map(|(_, b, h)| (*b, h)).collect();
        let mut first_hash: BTreeMap<i64, &Vec<u8>> = BTreeMap::new();
        for (block, hash) in &org1 {
            assert_eq!(*first_hash.entry(*block).or_insert(hash), *hash, "Org1.peer0 announced block {block} with two state hashes");
        }
        let back: Vec<(i64, i64)> = org1.windows(2).filter(|w| w[1].0 <= w[0].0).map(|w| (w[0].0, w[1].0)).collect();
        assert!(back.len() <= 1, "Org1.peer0 went back more than once after its restart: {back:?}");

        // The peers' stores: equal balances, those the VALID transactions add up to, conserving
        // money (read once the validators have stopped: a store has one writer; a clean stop
        // makes every commit durable).
        assert!(net.terminate("v1").success());
        assert!(net.terminate("v2").success());
        let mut sums = Vec::new();
        for (name, peer) in [("v1", PEERS[0]), ("v2", PEERS[1])] {
            use streamledger_core::state::CommittedState;
            let path = net.dir.path().join(name).join("peers").join(format!("{peer}.redb"));
            let store = streamledger_embedded::store::EmbeddedStore::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let mut sum = 0;
            for account in &accounts {
                let value = store.get("transfer", account).unwrap().unwrap_or_else(|| panic!("{peer}: no account {account}")).value;
                let json: serde_json::Value = serde_json::from_slice(&value).unwrap();
                let balance = json["balance"].as_u64().unwrap_or_else(|| panic!("{peer}: {account}: {json}"));
                assert_eq!(balance as i64, balances[account], "{peer}: {account} differs from what the chain adds up to");
                sum += balance;
            }
            sums.push(sum);
        }
        assert_eq!(sums, [total, total], "money is conserved on both peers");
        // Org1's endorsements produced more than once (by the killed endorser and again by its
        // replacement, for proposals whose offsets it had not committed): harmless, as above.
        let results = net.topic("endorsement-results");
        let mut endorsed: BTreeMap<(String, Vec<u8>), usize> = BTreeMap::new();
        for partition in 0..PROPOSAL_PARTITIONS {
            let end = net.log.end_offset(&results, partition).await.unwrap();
            let mut c = net.log.consumer(Subscription::assign(&results, partition, 0)).await.unwrap();
            for r in kafka::read_n(&mut c, end as usize, Duration::from_secs(30)).await {
                let e: streamledger_core::model::EndorsementResult = codec::decode(&r.value).unwrap();
                *endorsed.entry((e.tx_id, e.endorser.public_key)).or_default() += 1;
            }
        }
        let duplicates = endorsed.values().filter(|n| **n > 1).count();
        let valid = submitted.iter().filter(|id| verdicts.code(PEERS[0], id) == Some(CODE_VALID)).count();
        let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
        for reason in verdicts.rejected.values() {
            *reasons.entry(reason.chars().take(40).collect()).or_default() += 1;
        }
        eprintln!(
            "kafka faults: {} transfers, {valid} VALID, {} committed with another code, {} rejected {reasons:?}; {} blocks ({copies} duplicate copies); {duplicates} endorsements produced twice",
            submitted.len(),
            committed - valid,
            verdicts.rejected.len(),
            chain.len()
        );
    })
    .await;
}
