//! Stopping `streamledger up` gracefully (SIGTERM): a restart keeps the chain, the state and the
//! offsets, and `streamledger replay` rebuilds the state the live peer has.

mod common;

use std::time::Duration;

use common::*;
use streamledger_node::client::Client;

/// Creates two accounts and makes `n` VALID transfers between them; returns the tx ids and the
/// last block.
async fn some_transfers(c: &Client, n: usize) -> (Vec<String>, i64) {
    let mut ids = Vec::new();
    let mut last = 0;
    for (account, amount) in [("alice", "1000"), ("bob", "1000")] {
        let (res, block, _) = submit_valid(c, "transfer", "create", &[account, amount]).await;
        last = last.max(block);
        ids.push(res.tx_id);
    }
    for i in 0..n {
        let (from, to) = if i % 2 == 0 { ("alice", "bob") } else { ("bob", "alice") };
        let (res, block, _) = submit_valid(c, "transfer", "transfer", &[from, to, &(i + 1).to_string()]).await;
        last = last.max(block);
        ids.push(res.tx_id);
    }
    (ids, last)
}

/// After a graceful stop, `replay` rebuilds Org1's state from the blocks topic and finds it equal
/// to the live peer's; a second replay refuses to overwrite what the first built.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_after_a_graceful_stop_equals_the_live_peer() {
    let dir = tempfile::tempdir().unwrap();
    let mut up = Up::start(dir.path());
    let c = up.client.clone();
    bounded("replay", 60, async {
        let (ids, last) = some_transfers(&c, 6).await;
        let (last_block, live_hash) = wait_peers_agree(&c, last, Duration::from_secs(20)).await;
        let status = up.terminate();
        assert!(status.success(), "up should exit 0 on SIGTERM: {status}");

        let data = up.data_dir.to_str().unwrap().to_string();
        let run = cli(None, &["replay", "--data-dir", &data]).await;
        run.assert_success();
        eprintln!("replay: {} transactions, last block {last_block}:\n{}", ids.len(), run.stdout.trim_end());
        assert!(run.stdout.contains("equals the live peer Org1.peer0"), "{run:?}");
        // Fabric's height is the block count: one more than the last block's number.
        let reached = format!("height {} (last block {last_block}), state hash {live_hash}", last_block + 1);
        assert!(run.stdout.contains(&reached), "replay should reach the live height and hash: {run:?}");
        assert!(run.stdout.contains(&format!("replayed {} blocks", last_block + 1)), "{run:?}");

        // The same from the other peer, into a store of our choice.
        let into = dir.path().join("org2-replay.redb");
        let run = cli(None, &["replay", "--data-dir", &data, "--peer", "Org2.peer0", "--into", into.to_str().unwrap()]).await;
        run.assert_success();
        assert!(run.stdout.contains("equals the live peer Org2.peer0") && run.stdout.contains(&live_hash), "{run:?}");

        // Again into the default target: it exists now, and a replay from 0 needs a fresh store.
        let run = cli(None, &["replay", "--data-dir", &data]).await;
        run.assert_failure();
        let target = up.data_dir.join("replay").join("Org1.peer0.redb");
        eprintln!("replay again: {}", run.stderr.trim_end());
        assert!(run.stderr.contains(target.to_str().unwrap()) && run.stderr.contains("exists"), "the error should name {}: {run:?}", target.display());
        assert!(!run.stdout.contains("equals the live peer"), "{run:?}");
    })
    .await;
}

/// After a graceful stop and a restart, the height, state hash, balances and tx statuses are the
/// same, old transactions are not ordered again, and the next transaction goes in the next block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_chain_state_and_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let mut up = Up::start(dir.path());
    bounded("restart", 60, async {
        let c = up.client.clone();
        let (ids, last) = some_transfers(&c, 5).await;
        let (height, state_hash) = wait_peers_agree(&c, last, Duration::from_secs(20)).await;
        let balances = (balance(&c, "alice").await, balance(&c, "bob").await);
        let mut statuses = Vec::new();
        for id in &ids {
            statuses.push(c.tx_status(id).await.unwrap());
        }
        let status = up.terminate();
        assert!(status.success(), "up should exit 0 on SIGTERM: {status}");

        up = Up::start(dir.path());
        let c = up.client.clone();
        let (h, hash) = wait_peers_agree(&c, -1, Duration::from_secs(10)).await;
        eprintln!("restart: before height {height} hash {state_hash}; after height {h} hash {hash}; balances {balances:?}");
        assert_eq!((h, &hash), (height, &state_hash), "height and state hash after restart");
        assert_eq!((balance(&c, "alice").await, balance(&c, "bob").await), balances);
        for (id, before) in ids.iter().zip(&statuses) {
            assert_eq!(&c.tx_status(id).await.unwrap(), before, "status of {id} after restart");
        }

        let next = submit(&c, "transfer", "transfer", &["alice", "bob", "7"]).await;
        let (block, position) = assert_valid(&next);
        assert_eq!((block, position), (height + 1, 0), "the next transaction goes first in the next block");
        assert_eq!(balance(&c, "bob").await, balances.1 + 7);
        let (h, _) = wait_peers_agree(&c, height + 1, Duration::from_secs(20)).await;
        let blocks = chain(&c, h, None).await;
        // Nothing before the restart was ordered or validated again.
        let new_block = &blocks[(height + 1) as usize];
        assert_eq!(new_block.transactions.len(), 1, "block {} holds only the new transaction: {new_block:?}", height + 1);
        let all: Vec<_> = blocks.iter().flat_map(|b| &b.transactions).collect();
        assert_eq!(all.len(), ids.len() + 1, "every transaction is in the chain once");
        assert!(all.iter().all(|t| t.code == CODE_VALID), "{all:?}");
        for id in ids.iter().chain([&next.tx_id]) {
            assert_eq!(occurrences(&blocks, id).len(), 1, "{id} is in the chain once");
        }
    })
    .await;
}

/// A rejected transaction is still reported as rejected after a graceful restart: rejections are
/// in no store index, so the API's status tracker reloads the recent ones from the log before the
/// API serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejection_is_still_reported_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut up = Up::start(dir.path());
    bounded("rejection after restart", 60, async {
        let c = up.client.clone();
        submit_valid(&c, "transfer", "create", &["poor", "5"]).await;
        submit_valid(&c, "transfer", "create", &["rich", "0"]).await;
        let refused = submit(&c, "transfer", "transfer", &["poor", "rich", "6"]).await;
        assert!(matches!(refused.state, streamledger_node::api::TxState::Rejected { .. }), "{refused:?}");
        assert_eq!(c.tx_status(&refused.tx_id).await.unwrap(), refused, "before the restart");
        assert!(up.terminate().success());

        up = Up::start(dir.path());
        let after = up.client.tx_status(&refused.tx_id).await;
        eprintln!("rejection after restart: before {:?}; after {after:?}", refused.state);
        assert_eq!(after.expect("GET /v1/transactions/{id} after the restart"), refused, "after the restart");
    })
    .await;
}
