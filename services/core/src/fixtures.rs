//! A deterministic sample network and builders for proposals, transactions and blocks: for tests
//! and benchmarks here and in the stage crates. Its keys are derived from counters, so never use
//! it for a real network.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::codec;
use crate::crypto::{self, Signer};
use crate::endorsement::endorse;
use crate::model::*;
use crate::network::{counter_seeds, KeyStore, Network, NetworkSpec};

pub struct Fixture {
    pub network: Network,
    pub keys: KeyStore,
    /// `Org1/client0`, `Org2/client0`.
    pub clients: [Signer; 2],
    /// `Org1/peer0`, `Org2/peer0`.
    pub peers: [Signer; 2],
    pub orderer: Signer,
    nonce: AtomicU64,
}

impl Default for Fixture {
    fn default() -> Self {
        Self::new()
    }
}

impl Fixture {
    pub fn new() -> Self {
        let (network, keys) = NetworkSpec::sample().generate(counter_seeds(0)).expect("the sample network is valid");
        let signer = |owner: &str| keys.signer(owner).expect("sample key");
        Self {
            clients: [signer("Org1/client0"), signer("Org2/client0")],
            peers: [signer("Org1/peer0"), signer("Org2/peer0")],
            orderer: signer("orderer/orderer0"),
            network,
            keys,
            nonce: AtomicU64::new(0),
        }
    }

    /// A proposal signed by `client`, with a fresh nonce.
    pub fn proposal_by(&self, client: &Signer, contract: &str, function: &str, args: &[&str]) -> Proposal {
        let n = self.nonce.fetch_add(1, Ordering::Relaxed);
        let mut p = Proposal {
            tx_id: String::new(),
            channel: self.network.channel().to_string(),
            contract: contract.into(),
            function: function.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            creator: client.identity().clone(),
            nonce: n.to_be_bytes().to_vec(),
            timestamp_ms: 1_700_000_000_000 + n as i64,
            signature: Vec::new(),
        };
        client.sign_proposal(&mut p);
        p
    }

    pub fn proposal(&self, contract: &str, function: &str, args: &[&str]) -> Proposal {
        self.proposal_by(&self.clients[0], contract, function, args)
    }

    /// An ordered transaction endorsed by both peers with a 200 response.
    pub fn endorsed(&self, proposal: Proposal, rwset: RwSet) -> OrderedTx {
        let results: Vec<EndorsementResult> =
            self.peers.iter().map(|p| endorse(p, &proposal, Response::ok(Vec::new()), rwset.clone())).collect();
        OrderedTx {
            proposal,
            response: Response::ok(Vec::new()),
            rwset,
            endorsements: results.iter().map(EndorsementResult::endorsement).collect(),
        }
    }

    /// A `kv` transaction with the given read-write set, endorsed by both peers.
    pub fn tx(&self, rwset: RwSet) -> OrderedTx {
        self.endorsed(self.proposal("kv", "put", &["k", "v"]), rwset)
    }

    /// A signed block of `txs` (encoded as the gateway would write them to `ordered-tx`).
    pub fn block(&self, number: i64, previous_hash: &[u8], txs: &[OrderedTx]) -> Block {
        let raw: Vec<Vec<u8>> = txs.iter().map(|t| codec::encode(t).expect("encodes")).collect();
        self.block_of_raw(number, previous_hash, raw)
    }

    /// A signed block of raw transaction bytes, well-formed or not.
    pub fn block_of_raw(&self, number: i64, previous_hash: &[u8], raw: Vec<Vec<u8>>) -> Block {
        let header = BlockHeader {
            number,
            previous_hash: previous_hash.to_vec(),
            data_hash: crypto::block_data_hash(&raw).to_vec(),
        };
        let (first, last) = (number * 1000, number * 1000 + raw.len() as i64 - 1);
        let mut metadata =
            BlockMetadata { first_offset: first, last_offset: last, cut_marker_offset: number, orderer: String::new(), signature: Vec::new() };
        metadata.signature = self.orderer.sign(&crypto::block_signing_bytes(&header, &metadata, "orderer0"));
        metadata.orderer = "orderer0".into();
        Block { header, transactions: raw.into_iter().map(serde_bytes::ByteBuf::from).collect(), metadata }
    }
}

/// Builds read-write sets in the `kv` namespace.
#[derive(Debug, Clone, Default)]
pub struct Rw(pub RwSet);

impl Rw {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn read(mut self, key: &str, version: Option<(i64, i32)>) -> Self {
        self.0.reads.push(KvRead { namespace: "kv".into(), key: key.into(), version: version.map(|(b, t)| Version::new(b, t)) });
        self
    }

    pub fn write(mut self, key: &str, value: &str) -> Self {
        self.0.writes.push(KvWrite { namespace: "kv".into(), key: key.into(), value: Some(value.as_bytes().to_vec()) });
        self
    }

    pub fn delete(mut self, key: &str) -> Self {
        self.0.writes.push(KvWrite { namespace: "kv".into(), key: key.into(), value: None });
        self
    }

    /// A range read over `[start, end)` that saw `seen` (key, version) pairs.
    pub fn range(mut self, start: &str, end: &str, exhausted: bool, seen: &[(&str, (i64, i32))]) -> Self {
        self.0.range_reads.push(RangeRead {
            namespace: "kv".into(),
            start_key: start.into(),
            end_key: end.into(),
            exhausted,
            reads: seen
                .iter()
                .map(|(k, (b, t))| KvRead { namespace: "kv".into(), key: k.to_string(), version: Some(Version::new(*b, *t)) })
                .collect(),
        });
        self
    }

    pub fn build(self) -> RwSet {
        self.0
    }
}
