//! `streamledger up` as a real process: transactions through the HTTP API and the CLI, conflicting
//! transfers in one block, and bad input that must not stop the node.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use streamledger_core::network::KeyStore;
use streamledger_node::api::{SignedProposalRequest, TxState, DEFAULT_MAX_BODY_BYTES};
use streamledger_node::client::Client;

/// Transfers through the HTTP API and through `streamledger submit`; balances through the API and
/// `streamledger query`; both peers end at the same height and state hash, with the same blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_through_the_api_and_the_cli_commit_on_both_peers() {
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(dir.path());
    let c = &up.client;
    let api = up.api.as_str();
    bounded("end to end", 60, async {
        let mut valid = Vec::new(); // (tx id, block, position) of every VALID transaction

        // Through the API.
        let (alice, b, p) = submit_valid(c, "transfer", "create", &["alice", "1000"]).await;
        valid.push((alice.tx_id.clone(), b, p));

        // Through the CLI: the tx id first, then the verdict; the API agrees with what it printed.
        let run = cli(Some(api), &["submit", "transfer", "create", "bob", "50"]).await;
        run.assert_success();
        let (bob_tx, verdict) = parse_submit(&run);
        let (name, b, p) = verdict.expect("submit waits for the verdict");
        assert_eq!(name, "VALID", "{run:?}");
        let seen = c.tx_status(&bob_tx).await.unwrap();
        assert_eq!(committed(&seen), (b, p, CODE_VALID), "the API and the CLI disagree on {bob_tx}");
        wait_peers_agree(c, b, Duration::from_secs(20)).await;
        valid.push((bob_tx, b, p));

        let (api_transfer, b, p) = submit_valid(c, "transfer", "transfer", &["alice", "bob", "300"]).await;
        valid.push((api_transfer.tx_id.clone(), b, p));

        let run = cli(Some(api), &["submit", "transfer", "transfer", "bob", "alice", "20"]).await;
        run.assert_success();
        let (cli_transfer, verdict) = parse_submit(&run);
        let (name, b, p) = verdict.expect("verdict line");
        assert_eq!(name, "VALID", "{run:?}");
        valid.push((cli_transfer, b, p));
        wait_peers_agree(c, b, Duration::from_secs(20)).await;

        // A rejected submission makes the CLI fail, naming the reason, after printing the tx id.
        let run = cli(Some(api), &["submit", "transfer", "transfer", "bob", "alice", "1000000"]).await;
        run.assert_failure();
        let (refused, verdict) = parse_submit(&run);
        assert!(verdict.is_none(), "no verdict line for a rejection: {run:?}");
        assert!(run.stderr.contains("insufficient funds") && run.stderr.contains(&refused), "{run:?}");
        match c.tx_status(&refused).await.unwrap().state {
            TxState::Rejected { reason, .. } => assert!(reason.contains("insufficient funds"), "{reason}"),
            other => panic!("{refused} should be rejected: {other:?}"),
        }

        // Balances, through the API and the CLI.
        assert_eq!((balance(c, "alice").await, balance(c, "bob").await), (720, 330));
        for (name, expected) in [("alice", 720), ("bob", 330)] {
            let run = cli(Some(api), &["query", "transfer", name]).await;
            run.assert_success();
            let value = parse_query(&run);
            assert_eq!(value["balance"], expected, "{run:?}");
            assert_eq!(value["owner"]["org"], "Org1", "owned by the node's client identity: {run:?}");
        }

        // Blocks are in order, each transaction where its status says, with code VALID.
        let top = valid.iter().map(|v| v.1).max().unwrap();
        let (height, state_hash) = wait_peers_agree(c, top, Duration::from_secs(20)).await;
        let blocks = chain(c, height, None).await;
        for (tx_id, b, p) in &valid {
            assert_eq!(occurrences(&blocks, tx_id), vec![(*b, *p as usize, CODE_VALID)], "transaction {tx_id}");
        }
        // The second peer holds the same blocks with the same codes.
        let other = chain(c, height, Some("Org2.peer0")).await;
        for (a, b) in blocks.iter().zip(&other) {
            assert_eq!((&a.block_hash, &a.transactions), (&b.block_hash, &b.transactions), "block {} differs between peers", a.number);
        }
        // `streamledger blocks` lists every block and every transaction with its code.
        let run = cli(Some(api), &["blocks"]).await;
        run.assert_success();
        for (tx_id, b, _) in &valid {
            assert!(run.stdout.contains(&format!("  {tx_id} VALID")), "{tx_id} missing from `blocks`: {}", run.stdout);
            assert!(run.stdout.contains(&format!("block {b} (")), "block {b} missing from `blocks`: {}", run.stdout);
        }
        eprintln!("end to end: {} VALID transactions in blocks 0..={height}, both peers at state hash {state_hash}", valid.len());
    })
    .await;
}

/// N transfers from one account submitted at once are endorsed on the same state: exactly one is
/// VALID, every other is MVCC_READ_CONFLICT, and the balances moved once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_transfers_from_one_account_conflict() {
    const N: usize = 5;
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(dir.path());
    let c = up.client.clone();
    bounded("conflicts", 60, async {
        submit_valid(&c, "transfer", "create", &["src", "100"]).await;
        submit_valid(&c, "transfer", "create", &["dst", "0"]).await;

        let mut submissions = tokio::task::JoinSet::new();
        for _ in 0..N {
            let c = c.clone();
            submissions.spawn(async move { submit_no_wait(&c, "transfer", "transfer", args(&["src", "dst", "10"])).await });
        }
        let mut ids = Vec::new();
        while let Some(joined) = submissions.join_next().await {
            ids.push(joined.unwrap().expect("accepted").tx_id);
        }

        let mut by_code: BTreeMap<i32, Vec<(i64, i32)>> = BTreeMap::new();
        for id in &ids {
            let res = wait_verdict(&c, id, Duration::from_secs(30)).await.unwrap_or_else(|| panic!("no verdict for {id}"));
            let (block, position, code) = committed(&res);
            if code == CODE_MVCC_READ_CONFLICT {
                assert!(matches!(&res.state, TxState::Committed { code_name, .. } if code_name == "MVCC_READ_CONFLICT"), "{res:?}");
            }
            by_code.entry(code).or_default().push((block, position));
        }
        eprintln!("conflicts: {N} transfers from one account -> (code: [(block, position)]) {by_code:?}");
        let valid = by_code.get(&CODE_VALID).cloned().unwrap_or_default();
        let conflicts = by_code.get(&CODE_MVCC_READ_CONFLICT).cloned().unwrap_or_default();
        assert_eq!((valid.len(), conflicts.len()), (1, N - 1), "expected one VALID and {} MVCC_READ_CONFLICT: {by_code:?}", N - 1);
        // A read goes stale only after the valid write: every conflict comes later in the order.
        assert!(conflicts.iter().all(|c| *c > valid[0]), "a conflict precedes the valid transfer: {by_code:?}");
        assert_eq!((balance(&c, "src").await, balance(&c, "dst").await), (90, 10), "exactly one transfer applied");
        wait_peers_agree(&c, valid[0].0, Duration::from_secs(20)).await;
    })
    .await;
}

/// Malformed, oversized and unknown requests are refused with the right status, a transfer with
/// insufficient funds is rejected with the reason, and the node keeps committing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_the_node_keeps_running() {
    let dir = tempfile::tempdir().unwrap();
    let mut up = Up::start(dir.path());
    let c = up.client.clone();
    let url = format!("{}/v1/transactions", up.api);
    let http = reqwest::Client::new();
    let post = |body: Vec<u8>| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let res = http.post(&url).header("content-type", "application/json").body(body).send().await.expect("POST");
            let status = res.status().as_u16();
            let text = res.text().await.expect("body");
            let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("error body {text:?} is not JSON: {e}"));
            (status, json["error"].as_str().unwrap_or_else(|| panic!("no error field: {text}")).to_string())
        }
    };
    bounded("bad input", 60, async {
        let (status, error) = post(b"{\"contract\": \"transfer\", \"function\":".to_vec()).await;
        eprintln!("bad input: malformed JSON -> {status} {error:?}");
        assert_eq!(status, 400, "{error}");
        up.assert_running("malformed JSON");

        let (status, error) = post(b"\xff\xfe not json at all".to_vec()).await;
        assert_eq!(status, 400, "{error}");

        // Just over the limit, so that the whole body is sent before the node answers.
        let huge = serde_json::json!({"contract": "transfer", "function": "create", "args": ["big", "x".repeat(DEFAULT_MAX_BODY_BYTES + 64 * 1024)]});
        let (status, error) = post(huge.to_string().into_bytes()).await;
        eprintln!("bad input: body of {} bytes -> {status} {error:?}", huge.to_string().len());
        assert_eq!(status, 413, "{error}");
        assert!(error.contains(&format!("limit of {DEFAULT_MAX_BODY_BYTES} bytes")), "{error}");
        up.assert_running("an oversized body");

        // On /v1/proposals: a proposal signed by a key the network does not know (403), and one
        // signed by a registered key with a 1 MiB argument (413): neither reaches the log.
        let stranger = streamledger_core::crypto::Signer::from_seed("Org1", [42; 32]);
        let forged = Client::sign(&stranger, "mychannel", "transfer", "create", args(&["forged", "1"]), vec![1; 24], 1);
        let err = c.submit_signed(&SignedProposalRequest::from_proposal(&forged, false, 1000)).await.unwrap_err();
        eprintln!("bad input: unknown key on /v1/proposals -> {err}");
        assert_eq!(err.status().map(|s| s.as_u16()), Some(403), "{err}");
        assert!(err.to_string().contains("is not registered in the network"), "{err}");
        let keys = KeyStore::from_toml(&std::fs::read_to_string(up.data_dir.join("network").join("keys.toml")).unwrap()).unwrap();
        let big = Client::sign(&keys.signer("Org1/client0").unwrap(), "mychannel", "transfer", "create", args(&["big", &"x".repeat(DEFAULT_MAX_BODY_BYTES)]), vec![2; 24], 1);
        let err = c.submit_signed(&SignedProposalRequest::from_proposal(&big, false, 1000)).await.unwrap_err();
        assert_eq!(err.status().map(|s| s.as_u16()), Some(413), "{err}");
        up.assert_running("refused proposals");

        let err = c.submit(&streamledger_node::api::SubmitRequest::new("nope", "create", args(&["a", "1"]))).await.unwrap_err();
        eprintln!("bad input: unknown contract -> {err}");
        assert_eq!(err.status().map(|s| s.as_u16()), Some(404), "{err}");
        assert!(err.to_string().contains("\"nope\""), "{err}");

        submit_valid(&c, "transfer", "create", &["poor", "5"]).await;
        submit_valid(&c, "transfer", "create", &["rich", "0"]).await;
        let refused = submit(&c, "transfer", "transfer", &["poor", "rich", "6"]).await;
        eprintln!("bad input: insufficient funds -> {:?}", refused.state);
        match &refused.state {
            TxState::Rejected { reason, .. } => assert!(reason.contains("insufficient funds") && reason.contains("poor"), "{reason}"),
            other => panic!("a transfer over the balance should be rejected: {other:?}"),
        }
        // Unknown function and wrong argument count are refused by the contract, with the reason.
        let refused = submit(&c, "transfer", "steal", &["poor"]).await;
        assert!(matches!(&refused.state, TxState::Rejected { reason, .. } if reason.contains("steal")), "{refused:?}");
        up.assert_running("rejected transactions");

        // A good transaction still commits, and moved the money.
        let good = submit(&c, "transfer", "transfer", &["poor", "rich", "5"]).await;
        let (block, _) = assert_valid(&good);
        assert_eq!((balance(&c, "poor").await, balance(&c, "rich").await), (0, 5));
        wait_peers_agree(&c, block, Duration::from_secs(20)).await;
        up.assert_running("the whole test");
    })
    .await;
}

/// A proposal the client signed itself, rejected by an endorser, can be sent again once the
/// reason is gone and commit: so say the API's and the tracker's docs ("a rejection already known
/// is not final: the same signed proposal may be submitted again and commit").
/// The gateway treats a rejected tx id as open to a new attempt; only an ordered one is final.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_proposal_sent_again_can_commit() {
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(dir.path());
    bounded("resubmission", 60, async {
        let c = up.client.clone();
        let keys = std::fs::read_to_string(up.data_dir.join("network").join("keys.toml")).expect("keys.toml of the data dir");
        let signer = KeyStore::from_toml(&keys).unwrap().signer("Org1/client0").unwrap();
        submit_valid(&c, "transfer", "create", &["poor", "5"]).await;
        submit_valid(&c, "transfer", "create", &["bank", "100"]).await;
        let proposal = Client::sign(&signer, "mychannel", "transfer", "transfer", args(&["poor", "bank", "6"]), vec![7; 24], 1);
        let first = c.submit_signed(&SignedProposalRequest::from_proposal(&proposal, true, 10_000)).await.unwrap();
        assert!(matches!(&first.state, TxState::Rejected { reason, .. } if reason.contains("insufficient funds")), "{first:?}");
        submit_valid(&c, "transfer", "transfer", &["bank", "poor", "10"]).await;
        let again = c.submit_signed(&SignedProposalRequest::from_proposal(&proposal, true, 15_000)).await.unwrap();
        eprintln!("resubmission: first {:?}; again {:?}", first.state, again.state);
        assert_valid(&again);
        assert_eq!((balance(&c, "poor").await, balance(&c, "bank").await), (9, 96));
    })
    .await;
}
