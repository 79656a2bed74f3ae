//! How a peer store's commit cost grows with the ledger: commits blocks of 350 transfer-like
//! transactions (two writes over 10,000 keys and one random 64-hex tx id each, ~210 KB of block
//! bytes), checking each block's tx ids first as the validator does, and prints the time per
//! block and per transaction every 1,000 blocks, and the process's CPU time per transaction
//! (background threads included). The tx-id index is the part that grows: each random tx id
//! lands on a random leaf of its B-tree (see "What limits it now" in the README's Performance).
//!
//!   cargo bench -p streamledger-embedded --bench ledger_growth -- [BLOCKS, default 12000]

use std::time::Instant;

use streamledger_core::model::Version;
use streamledger_core::state::{CommittedState, TxLocation, WriteBatch};
use streamledger_embedded::store::EmbeddedStore;
use streamledger_ports::store::{BlockCommit, PeerStore, Savepoint, StoredBlock};
use streamledger_stages::metrics::process_cpu_seconds;

const TXS_PER_BLOCK: usize = 350;
const REPORT_EVERY: i64 = 1000;

fn main() {
    // `cargo bench` passes `--bench`; the first number is the block count. Without `--bench`,
    // `cargo test --all-targets` is running it (unoptimised): a few blocks check that it works.
    let benching = std::env::args().any(|a| a == "--bench");
    let default_blocks = if benching { 12_000 } else { 3 };
    let blocks: i64 = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(default_blocks);
    let dir = tempfile::tempdir().expect("temp dir");
    let store = EmbeddedStore::open(&dir.path().join("peer.redb")).expect("open the store");
    // xorshift: the same ids on every run, without a dependency.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    println!("ledger_growth: {blocks} blocks of {TXS_PER_BLOCK} txs into {}", dir.path().display());
    let (start, mut since, mut cpu_since, mut reported) = (Instant::now(), Instant::now(), cpu_seconds(), 0);
    for number in 0..blocks {
        let mut batch = WriteBatch { block: number, ..Default::default() };
        for position in 0..TXS_PER_BLOCK {
            for _ in 0..2 {
                let key = format!("account{:06}", next() % 10_000);
                batch.writes.insert(("transfer".into(), key), (Some(b"{\"balance\":100}".to_vec()), Version::new(number, position as i32)));
            }
            let tx_id = format!("{:016x}{:016x}{:016x}{:016x}", next(), next(), next(), next());
            batch.tx_index.push((tx_id, TxLocation { block: number, position: position as i32, code: 0 }));
        }
        let ids: Vec<&str> = batch.tx_index.iter().map(|(id, _)| id.as_str()).collect();
        assert!(store.tx_locations(&ids).expect("look up the tx ids").iter().all(Option::is_none), "a random tx id repeated");
        let stored = StoredBlock { number, bytes: vec![7; TXS_PER_BLOCK * 600], codes: vec![0; TXS_PER_BLOCK] };
        let savepoint = Savepoint { block: number, block_hash: vec![1; 32], state_hash: vec![2; 32], blocks_offset: number };
        store.commit_all(&[BlockCommit { block: &stored, batch: &batch, savepoint: &savepoint }]).expect("commit");
        if (number + 1) % REPORT_EVERY == 0 || number + 1 == blocks {
            let done = (number + 1 - reported) as f64;
            let per_block = since.elapsed().as_secs_f64() / done;
            let cpu = cpu_seconds();
            println!(
                "blocks {:>6}, txs {:>9}: {:6.2} ms per block, {:5.1} µs per tx, CPU {:5.1} µs per tx",
                number + 1,
                (number + 1) * TXS_PER_BLOCK as i64,
                per_block * 1e3,
                per_block * 1e6 / TXS_PER_BLOCK as f64,
                (cpu - cpu_since) * 1e6 / (done * TXS_PER_BLOCK as f64)
            );
            (since, cpu_since, reported) = (Instant::now(), cpu, number + 1);
        }
    }
    println!("total {:.1} s, CPU {:.1} s", start.elapsed().as_secs_f64(), cpu_seconds());
}

/// The CPU time of this process so far, every thread included (NaN where `/proc` is not Linux's).
fn cpu_seconds() -> f64 {
    process_cpu_seconds().unwrap_or(f64::NAN)
}
