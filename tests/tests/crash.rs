//! SIGKILL of `streamledger up` in the middle of a load, then a restart on the same data dir: no
//! transaction the API accepted is lost, none is applied twice, and the chain goes on.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use streamledger_node::api::{BlockResponse, TxState};
use streamledger_node::client::Client;

const ACCOUNTS: usize = 8;
const INITIAL_BALANCE: u64 = 1_000;
/// Transfers of amount 1 in the load.
const LOAD: usize = 300;
const TASKS: usize = 6;
/// Kill once this many transfers were accepted (and some of them committed).
const KILL_AFTER_ACCEPTED: usize = LOAD / 2;
/// After the restart, how long every accepted transaction has to get its verdict (the gateway
/// gives up on endorsements after 10 s).
const VERDICT_TIMEOUT: Duration = Duration::from_secs(25);

fn account(i: usize) -> String {
    format!("acc{i}")
}

/// The accounts' balances at one height: read between two equal status heights.
async fn balances_at_one_height(c: &Client) -> (i64, Vec<u64>) {
    for _ in 0..100 {
        let before = wait_peers_agree(c, -1, Duration::from_secs(20)).await.0;
        let mut balances = Vec::new();
        for i in 0..ACCOUNTS {
            balances.push(balance(c, &account(i)).await);
        }
        if c.status().await.unwrap().peers[0].last_block == Some(before) {
            return (before, balances);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("the chain never stood still long enough to read the balances at one height");
}

/// The balances that the VALID transfers of `blocks` add up to.
fn balances_from_chain(blocks: &[BlockResponse]) -> Vec<i64> {
    let mut balances = vec![0i64; ACCOUNTS];
    let index = |name: &str| (0..ACCOUNTS).find(|&i| account(i) == name);
    for tx in blocks.iter().flat_map(|b| &b.transactions).filter(|t| t.code == CODE_VALID && t.contract == "transfer") {
        match (tx.function.as_str(), tx.args.as_slice()) {
            ("create", [name, amount]) => {
                if let Some(i) = index(name) {
                    balances[i] += amount.parse::<i64>().unwrap();
                }
            }
            ("transfer", [from, to, amount]) => {
                let amount: i64 = amount.parse().unwrap();
                if let Some(i) = index(from) {
                    balances[i] -= amount;
                }
                if let Some(i) = index(to) {
                    balances[i] += amount;
                }
            }
            _ => {}
        }
    }
    balances
}

/// No double application, conservation of money, a contiguous chain that goes on after the
/// restart, and every transaction the API accepted gets a verdict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_every_accepted_transaction_gets_a_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let mut up = Up::start(dir.path());
    bounded("sigkill under load", 75, async {
        let c = up.client.clone();
        let mut creates = tokio::task::JoinSet::new();
        for i in 0..ACCOUNTS {
            let c = c.clone();
            creates.spawn(async move { submit(&c, "transfer", "create", &[&account(i), &INITIAL_BALANCE.to_string()]).await });
        }
        let mut created_block = 0;
        while let Some(res) = creates.join_next().await {
            created_block = created_block.max(assert_valid(&res.unwrap()).0);
        }
        wait_peers_agree(&c, created_block, Duration::from_secs(20)).await;

        // The load: TASKS tasks take transfer numbers from one counter until LOAD or an error.
        let accepted = Arc::new(Mutex::new(Vec::<String>::new()));
        let errors = Arc::new(Mutex::new(Vec::<String>::new()));
        let next = Arc::new(AtomicUsize::new(0));
        let mut load = tokio::task::JoinSet::new();
        for _ in 0..TASKS {
            let (c, accepted, errors, next) = (c.clone(), accepted.clone(), errors.clone(), next.clone());
            load.spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    if n >= LOAD {
                        return;
                    }
                    let (from, to) = (n % ACCOUNTS, (n + 1 + n / ACCOUNTS % (ACCOUNTS - 1)) % ACCOUNTS);
                    match submit_no_wait(&c, "transfer", "transfer", args(&[&account(from), &account(to), "1"])).await {
                        Ok(res) => accepted.lock().unwrap().push(res.tx_id),
                        Err(e) => {
                            errors.lock().unwrap().push(e.to_string());
                            return; // the node is gone
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            });
        }

        // Kill in the middle: after half the load was accepted and some of it committed.
        let started = Instant::now();
        let height_at_kill = loop {
            let height = c.status().await.unwrap().peers[0].last_block.unwrap_or(-1);
            if accepted.lock().unwrap().len() >= KILL_AFTER_ACCEPTED && height > created_block {
                break height;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "the load did not get going: height {height}, {} accepted", accepted.lock().unwrap().len());
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        up.sigkill();
        let accepted_at_kill = accepted.lock().unwrap().len();
        while load.join_next().await.is_some() {}
        let accepted = accepted.lock().unwrap().clone();
        let errors = errors.lock().unwrap().clone();
        eprintln!(
            "sigkill: killed after {:?} at height {height_at_kill} with {accepted_at_kill} accepted; the load ended with {} accepted, {} refused by the dead node (e.g. {:?})",
            started.elapsed(),
            accepted.len(),
            errors.len(),
            errors.first()
        );
        assert!(accepted.len() < LOAD, "the kill came after the whole load");

        // Restart on the same data dir; every accepted transaction gets its verdict.
        up = Up::start(dir.path());
        let c = up.client.clone();
        let (verdicts, unknown) = wait_verdicts(&c, &accepted, VERDICT_TIMEOUT).await;
        let mut codes: BTreeMap<String, usize> = BTreeMap::new();
        let mut rejected: BTreeMap<String, usize> = BTreeMap::new();
        let mut located = Vec::new();
        for res in &verdicts {
            match &res.state {
                TxState::Committed { block, position, code, code_name } => {
                    *codes.entry(code_name.clone()).or_default() += 1;
                    located.push((res.tx_id.clone(), *block, *position, *code));
                }
                TxState::Rejected { stage, reason } => *rejected.entry(format!("{stage}: {reason}")).or_default() += 1,
                TxState::Pending => unreachable!("wait_verdicts returns verdicts"),
            }
        }
        eprintln!(
            "sigkill: of {} accepted: {} committed {codes:?}, {} rejected {rejected:?}, {} without a verdict after {VERDICT_TIMEOUT:?}",
            accepted.len(),
            located.len(),
            verdicts.len() - located.len(),
            unknown.len()
        );
        for id in unknown.iter().take(5) {
            eprintln!("sigkill: no verdict for {id}; the node's log about it: {:?}", up.log_lines_mentioning(id));
        }
        assert!(unknown.is_empty(), "{} accepted transactions have no verdict after the restart, e.g. {:?}", unknown.len(), &unknown[..unknown.len().min(5)]);

        // The chain goes on after the restart: fresh accounts, so nothing left in flight conflicts.
        submit_valid(&c, "transfer", "create", &["after-a", "10"]).await;
        submit_valid(&c, "transfer", "create", &["after-b", "0"]).await;
        let (_, after_block, _) = submit_valid(&c, "transfer", "transfer", &["after-a", "after-b", "3"]).await;
        assert!(after_block > height_at_kill, "block {after_block} after the restart, height was {height_at_kill} at the kill");
        assert_eq!((balance(&c, "after-a").await, balance(&c, "after-b").await), (7, 3));

        // Money is conserved and matches what the chain's VALID transfers add up to.
        let (height, balances) = balances_at_one_height(&c).await;
        let total: u64 = balances.iter().sum();
        let blocks = chain(&c, height, None).await;
        let from_chain = balances_from_chain(&blocks);
        eprintln!("sigkill: at height {height}, balances {balances:?} (total {total}); from the chain's VALID transactions {from_chain:?}");
        assert_eq!(total, INITIAL_BALANCE * ACCOUNTS as u64, "money created or destroyed");
        assert_eq!(balances.iter().map(|&b| b as i64).collect::<Vec<_>>(), from_chain, "the state is not what the chain says");

        // Every committed verdict points at its transaction, and no tx id is VALID twice.
        let mut valid_count: HashMap<&str, usize> = HashMap::new();
        let mut duplicates = 0;
        for tx in blocks.iter().flat_map(|b| &b.transactions) {
            if tx.code == CODE_VALID {
                *valid_count.entry(&tx.tx_id).or_default() += 1;
            }
            if tx.code == CODE_DUPLICATE_TXID {
                duplicates += 1;
            }
        }
        let twice: Vec<_> = valid_count.iter().filter(|(_, &n)| n > 1).collect();
        assert!(twice.is_empty(), "transactions VALID more than once: {twice:?}");
        for (id, block, position, code) in &located {
            let b = &blocks[*block as usize];
            let tx = b.transactions.get(*position as usize).unwrap_or_else(|| panic!("{id}: block {block} has no position {position}"));
            assert_eq!((&tx.tx_id, tx.code), (id, *code), "{id}: its status says block {block} position {position}");
            let copies = occurrences(&blocks, id);
            assert_eq!(copies.iter().filter(|o| o.2 == CODE_VALID).count(), usize::from(*code == CODE_VALID), "{id}: {copies:?}");
        }
        let txs: usize = blocks.iter().map(|b| b.transactions.len()).sum();
        eprintln!("sigkill: chain of {} blocks, {txs} transactions, {} VALID, {duplicates} DUPLICATE_TXID copies", blocks.len(), valid_count.len());
        wait_peers_agree(&c, height, Duration::from_secs(20)).await;

        // The checker, from the topics and stores alone, agrees: nothing lost, applied twice or
        // invented, one chain, peers and a replay from offset 0 on one state hash, money kept.
        up.terminate();
        let audit = cli(None, &["audit", "--data-dir", dir.path().join("data").to_str().unwrap(), "--settled"]).await;
        eprintln!("sigkill: audit after the restart:\n{}", audit.stdout);
        audit.assert_success();
        assert!(audit.stdout.contains("violations              0"), "{}", audit.stdout);
        // The topic may hold more than the client saw accepted: a proposal appended just before
        // the kill whose answer never reached the client.
        let on_topic: usize = audit.stdout.lines().find_map(|l| l.strip_prefix("proposals acknowledged")).and_then(|l| l.split_whitespace().next()).and_then(|n| n.parse().ok()).expect("the audit prints the proposals");
        assert!(on_topic >= accepted.len() + ACCOUNTS + 3, "{on_topic} proposals on the topic, {} accepted", accepted.len() + ACCOUNTS + 3);
        // A mistyped store path is an error naming it, not an empty store created and audited.
        let typo = dir.path().join("data").join("peers").join("Org1.peer9.redb");
        let data_arg = dir.path().join("data");
        let bad = cli(None, &["audit", "--data-dir", data_arg.to_str().unwrap(), "--store", &format!("Org1.peer0={}", typo.display())]).await;
        bad.assert_failure();
        assert!(bad.stderr.contains(&typo.display().to_string()) && bad.stderr.contains("no such peer store file"), "{}", bad.stderr);
        assert!(!typo.exists(), "the audit created {}", typo.display());
    })
    .await;
}

/// The peer stores fsync their commits at most a second apart, and at once when no block is
/// waiting: a node killed after a quiet moment has every committed block in its stores' files, so
/// nothing needs re-applying (a mutation keeping the idle commits volatile fails this test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_node_killed_has_every_commit_in_its_stores() {
    let dir = tempfile::tempdir().unwrap();
    let mut up = Up::start(dir.path());
    let height = bounded("quiet kill", 60, async {
        let c = up.client.clone();
        submit_valid(&c, "kv", "put", &["quiet-a", "1"]).await;
        let (_, block, _) = submit_valid(&c, "kv", "put", &["quiet-b", "2"]).await;
        wait_peers_agree(&c, block, Duration::from_secs(20)).await.0
    })
    .await;
    // The validators poll for 200 ms before they call the network quiet.
    tokio::time::sleep(Duration::from_millis(800)).await;
    up.sigkill();
    use streamledger_ports::store::PeerStore;
    for peer in ["Org1.peer0", "Org2.peer0"] {
        let path = dir.path().join("data").join("peers").join(format!("{peer}.redb"));
        let store = streamledger_embedded::store::EmbeddedStore::open(&path).unwrap();
        assert_eq!(store.savepoint().unwrap().map(|s| s.block), Some(height), "{peer}: the store's file lags the height it announced");
    }
}
