//! Hashes, transaction ids and Ed25519 signatures.
//!
//! What is signed or hashed is never the Avro encoding: it is an explicit, domain-separated,
//! length-prefixed preimage built here. Signatures and hashes therefore stay valid when a schema
//! evolves (a new reader re-encoding an old record would not reproduce the old bytes), and no two
//! different messages can share a preimage.

use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier, VerifyingKey};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::model::*;

pub type Hash = [u8; 32];

pub fn sha256(bytes: &[u8]) -> Hash {
    Sha256::digest(bytes).into()
}

/// Builds an unambiguous byte string to hash or sign: a domain tag, then each field with its
/// length in front.
pub struct Preimage(Vec<u8>);

impl Preimage {
    pub fn new(domain: &str) -> Self {
        let mut p = Self(Vec::with_capacity(256));
        p.bytes(domain.as_bytes());
        p
    }

    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(&(b.len() as u64).to_be_bytes());
        self.0.extend_from_slice(b);
        self
    }

    pub fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }

    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn identity(&mut self, id: &Identity) -> &mut Self {
        self.str(&id.org).bytes(&id.public_key)
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }

    pub fn hash(&self) -> Hash {
        sha256(&self.0)
    }
}

/// The transaction id of a proposal: `hex(SHA-256(nonce || creator))`, as Fabric computes it, so
/// a client cannot claim someone else's id (the creator signs the nonce along with the rest).
pub fn compute_tx_id(nonce: &[u8], creator: &Identity) -> String {
    let mut p = Preimage::new("streamledger/txid/v1");
    p.bytes(nonce).identity(creator);
    hex::encode(p.hash())
}

/// What a client signs: every proposal field but the signature.
pub fn proposal_signing_bytes(p: &Proposal) -> Vec<u8> {
    let mut pre = Preimage::new("streamledger/proposal/v1");
    pre.str(&p.tx_id).str(&p.channel).str(&p.contract).str(&p.function).i64(p.args.len() as i64);
    for a in &p.args {
        pre.str(a);
    }
    pre.identity(&p.creator).bytes(&p.nonce).i64(p.timestamp_ms);
    pre.into_bytes()
}

/// The hash an endorsement binds to: that of the signed proposal content.
pub fn proposal_hash(p: &Proposal) -> Hash {
    sha256(&proposal_signing_bytes(p))
}

fn push_read(pre: &mut Preimage, r: &KvRead) {
    pre.str(&r.namespace).str(&r.key);
    match r.version {
        None => pre.i64(-1),
        Some(v) => pre.i64(v.block).i64(v.tx as i64),
    };
}

/// What an endorser signs: the proposal it simulated and the outcome.
pub fn endorsement_signing_bytes(tx_id: &str, proposal_hash: &[u8], response: &Response, rwset: &RwSet) -> Vec<u8> {
    let mut pre = Preimage::new("streamledger/endorsement/v1");
    pre.str(tx_id).bytes(proposal_hash).i64(response.status as i64).str(&response.message).bytes(&response.payload);
    pre.i64(rwset.reads.len() as i64);
    for r in &rwset.reads {
        push_read(&mut pre, r);
    }
    pre.i64(rwset.range_reads.len() as i64);
    for rr in &rwset.range_reads {
        pre.str(&rr.namespace).str(&rr.start_key).str(&rr.end_key).i64(rr.exhausted as i64).i64(rr.reads.len() as i64);
        for r in &rr.reads {
            push_read(&mut pre, r);
        }
    }
    pre.i64(rwset.writes.len() as i64);
    for w in &rwset.writes {
        pre.str(&w.namespace).str(&w.key);
        match &w.value {
            None => pre.i64(-1),
            Some(v) => pre.i64(0).bytes(v),
        };
    }
    pre.into_bytes()
}

/// Covers the block's transactions, each with its length, in order.
pub fn block_data_hash<B: AsRef<[u8]>>(transactions: &[B]) -> Hash {
    let mut h = Sha256::new();
    h.update(b"streamledger/block-data/v1");
    for tx in transactions {
        let tx = tx.as_ref();
        h.update((tx.len() as u64).to_be_bytes());
        h.update(tx);
    }
    h.finalize().into()
}

/// The block hash, as in Fabric: the hash of the header only. The next block's `previous_hash`.
pub fn block_header_hash(header: &BlockHeader) -> Hash {
    let mut pre = Preimage::new("streamledger/block-header/v1");
    pre.i64(header.number).bytes(&header.previous_hash).bytes(&header.data_hash);
    pre.hash()
}

/// What an orderer signs: the header hash, the offsets the block was built from, and its own id.
pub fn block_signing_bytes(header: &BlockHeader, metadata: &BlockMetadata, orderer: &str) -> Vec<u8> {
    let mut pre = Preimage::new("streamledger/block-signature/v1");
    pre.bytes(&block_header_hash(header))
        .i64(metadata.first_offset)
        .i64(metadata.last_offset)
        .i64(metadata.cut_marker_offset)
        .str(orderer);
    pre.into_bytes()
}

/// A private key with the identity it signs as.
#[derive(Clone)]
pub struct Signer {
    identity: Identity,
    key: SigningKey,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the private key.
        f.debug_struct("Signer").field("org", &self.identity.org).finish_non_exhaustive()
    }
}

impl Signer {
    /// A signer from a 32-byte secret seed (the caller draws it; the core has no randomness).
    pub fn from_seed(org: &str, seed: [u8; 32]) -> Self {
        let key = SigningKey::from_bytes(&seed);
        let identity = Identity { org: org.to_string(), public_key: key.verifying_key().to_bytes().to_vec() };
        Self { identity, key }
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn seed(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.key.sign(message).to_bytes().to_vec()
    }

    /// Fills in the tx id and signature of a proposal built with this signer as creator.
    pub fn sign_proposal(&self, proposal: &mut Proposal) {
        proposal.creator = self.identity.clone();
        proposal.tx_id = compute_tx_id(&proposal.nonce, &self.identity);
        proposal.signature = self.sign(&proposal_signing_bytes(proposal));
    }
}

/// Whether signatures are verified. `Off` exists only to measure how far the rest of the
/// pipeline goes without the crypto (`streamledger bench --no-signature-checks`); it is never the
/// default and a network running with it is not secure.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SignatureChecks {
    #[default]
    On,
    Off,
}

/// One signature to check.
#[derive(Debug, Clone, Copy)]
pub struct SigCheck<'a> {
    pub public_key: &'a [u8],
    pub message: &'a [u8],
    pub signature: &'a [u8],
}

/// Keys parsed per thread, at most this many. A permissioned network has few signers (its
/// clients, peers and orderers), so nearly every check finds its key here.
const KEY_CACHE: usize = 4096;

thread_local! {
    /// Public key bytes → the parsed key, `None` for bytes that are no usable key. Parsing is a
    /// point decompression, a square root in the field: the profile of the peak bench run put it
    /// at 9% of all CPU time, as much as the validators' whole storage commit. Per thread, so
    /// that the rayon workers checking a block share no lock.
    static KEYS: std::cell::RefCell<std::collections::HashMap<[u8; 32], Option<VerifyingKey>>> = Default::default();
}

/// The parsed key, from this thread's cache. The cache changes no verdict: the same bytes always
/// parse to the same key, and a key that does not parse (or is weak) is refused either way.
fn verifying_key(bytes: &[u8]) -> Option<VerifyingKey> {
    let bytes: [u8; 32] = bytes.try_into().ok()?;
    KEYS.with_borrow_mut(|keys| {
        if let Some(key) = keys.get(&bytes) {
            return *key;
        }
        let key = VerifyingKey::from_bytes(&bytes).ok().filter(|k| !k.is_weak());
        // Emptied rather than evicted one by one: only a flood of distinct keys fills it, and
        // then the cost is at worst the uncached one.
        if keys.len() >= KEY_CACHE {
            keys.clear();
        }
        keys.insert(bytes, key);
        key
    })
}

fn parse(check: &SigCheck) -> Option<(VerifyingKey, Signature)> {
    let key = verifying_key(check.public_key)?;
    let sig = Signature::from_slice(check.signature).ok()?;
    Some((key, sig))
}

pub fn verify(check: &SigCheck) -> bool {
    parse(check).is_some_and(|(key, sig)| key.verify(check.message, &sig).is_ok())
}

/// Signatures per batch. Fixed, not derived from the thread count, so that which signatures are
/// batched together (and so the verdict on a maliciously crafted one) is the same on every peer.
///
/// Why 256: a batch is one multiscalar multiplication, and from about 96 signatures on
/// curve25519-dalek switches it from Straus to Pippenger, which gets cheaper per point as the
/// batch grows. Timed interleaved on this machine, one thread, per signature: 22.7 µs in batches
/// of 64, 20.4 at 128, 18.9 at 256, 17.7 at 512. 256 keeps most of that and still gives a block
/// of a few hundred transactions (three signatures each) several batches to share out over the
/// cores; an endorser's poll brings at most 256 proposals, one batch.
pub const BATCH: usize = 256;

/// Checks many signatures: in batches (about half the cost of one by one) spread over the rayon
/// pool. A batch that fails is re-checked one by one to find the bad signatures.
pub fn verify_all(checks: &[SigCheck]) -> Vec<bool> {
    checks.par_chunks(BATCH).flat_map_iter(verify_chunk).collect()
}

/// [`verify_all`] over the checks that are present, `false` where one is absent. A caller leaves
/// out the signatures whose verdict cannot matter (a stranger's, a proposal already refused): in
/// a batch, a bad one would send the whole batch of good ones to one-by-one checks.
pub fn verify_present(checks: &[Option<SigCheck>]) -> Vec<bool> {
    let present: Vec<SigCheck> = checks.iter().flatten().copied().collect();
    let mut verdicts = verify_all(&present).into_iter();
    checks.iter().map(|c| c.is_some() && verdicts.next().unwrap_or(false)).collect()
}

fn verify_chunk(chunk: &[SigCheck]) -> Vec<bool> {
    let parsed: Vec<_> = chunk.iter().map(parse).collect();
    if parsed.iter().all(Option::is_some) {
        let (keys, sigs): (Vec<_>, Vec<_>) = parsed.iter().flatten().cloned().unzip();
        let messages: Vec<&[u8]> = chunk.iter().map(|c| c.message).collect();
        if crate::batch_verify::verify_batch(&messages, &sigs, &keys) {
            return vec![true; chunk.len()];
        }
    }
    chunk
        .iter()
        .zip(parsed)
        .map(|(c, p)| p.is_some_and(|(key, sig)| key.verify(c.message, &sig).is_ok()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(n: u8) -> Signer {
        Signer::from_seed("Org1", [n; 32])
    }

    #[test]
    fn tx_id_binds_nonce_and_creator() {
        let a = signer(1);
        let b = signer(2);
        assert_ne!(compute_tx_id(b"n", a.identity()), compute_tx_id(b"n", b.identity()));
        assert_ne!(compute_tx_id(b"n1", a.identity()), compute_tx_id(b"n2", a.identity()));
        assert_eq!(compute_tx_id(b"n", a.identity()).len(), 64);
    }

    #[test]
    fn absent_checks_are_false_and_the_present_ones_keep_their_places() {
        let s = signer(7);
        let msgs: Vec<Vec<u8>> = (0..6u32).map(|i| i.to_be_bytes().to_vec()).collect();
        let mut sigs: Vec<Vec<u8>> = msgs.iter().map(|m| s.sign(m)).collect();
        sigs[4][0] ^= 1;
        let pk = s.identity().public_key.clone();
        let checks: Vec<Option<SigCheck>> = msgs
            .iter()
            .zip(&sigs)
            .enumerate()
            .map(|(i, (m, sig))| (i != 1 && i != 3).then_some(SigCheck { public_key: &pk, message: m, signature: sig }))
            .collect();
        assert_eq!(verify_present(&checks), [true, false, true, false, false, true]);
        assert!(verify_present(&[]).is_empty());
    }

    #[test]
    fn batch_verification_finds_the_bad_signatures() {
        let s = signer(7);
        // Three batches, one bad signature in each.
        let msgs: Vec<Vec<u8>> = (0..(2 * BATCH + 22) as u32).map(|i| i.to_be_bytes().to_vec()).collect();
        let mut sigs: Vec<Vec<u8>> = msgs.iter().map(|m| s.sign(m)).collect();
        sigs[3][0] ^= 1; // corrupt
        sigs[2 * BATCH + 12] = vec![1, 2, 3]; // malformed
        let pk = s.identity().public_key.clone();
        let wrong_key = signer(8).identity().public_key.clone();
        let mut checks: Vec<SigCheck> = msgs
            .iter()
            .zip(&sigs)
            .map(|(m, sig)| SigCheck { public_key: &pk, message: m, signature: sig })
            .collect();
        checks[BATCH + 6].public_key = &wrong_key;
        let verdicts = verify_all(&checks);
        let bad: Vec<usize> = verdicts.iter().enumerate().filter(|(_, ok)| !**ok).map(|(i, _)| i).collect();
        assert_eq!(bad, vec![3, BATCH + 6, 2 * BATCH + 12]);
        assert!(verify(&checks[0]));
        assert!(!verify(&checks[3]));
    }

    #[test]
    fn cached_keys_give_the_same_verdicts() {
        let s = signer(9);
        let msg = b"m";
        let sig = s.sign(msg);
        let pk = s.identity().public_key.clone();
        let check = SigCheck { public_key: &pk, message: msg, signature: &sig };
        // First call parses the key, the second finds it cached: same verdict both times.
        assert!(verify(&check) && verify(&check));
        // Bytes that are no key (not a point, or too short) and a weak (small-order) key are
        // refused, cached or not.
        let not_a_point = [0xff; 32];
        let mut weak = [0u8; 32];
        weak[0] = 1; // y = 1: the identity point, of small order
        for bad in [&not_a_point[..], &weak[..], &pk[..31]] {
            let c = SigCheck { public_key: bad, message: msg, signature: &sig };
            assert!(!verify(&c) && !verify(&c), "{bad:?}");
            assert_eq!(verify_all(&[c, check]), vec![false, true]);
        }
        // A flood of distinct keys empties the cache and verdicts stay right.
        for i in 0..(KEY_CACHE as u32 + 10) {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&i.to_be_bytes());
            assert!(!verify(&SigCheck { public_key: &k, message: msg, signature: &sig }));
        }
        assert!(KEYS.with_borrow(|keys| keys.len()) <= KEY_CACHE);
        assert!(verify(&check));
    }

    #[test]
    fn preimages_are_unambiguous() {
        let mut a = Preimage::new("d");
        a.str("ab").str("c");
        let mut b = Preimage::new("d");
        b.str("a").str("bc");
        assert_ne!(a.hash(), b.hash());
    }

    #[test]
    fn endorsement_bytes_cover_the_rwset() {
        let r = Response::ok(b"x".to_vec());
        let mut rw = RwSet::default();
        let before = endorsement_signing_bytes("t", b"h", &r, &rw);
        rw.writes.push(KvWrite { namespace: "n".into(), key: "k".into(), value: None });
        assert_ne!(before, endorsement_signing_bytes("t", b"h", &r, &rw));
    }
}
