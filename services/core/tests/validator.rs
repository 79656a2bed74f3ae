//! Conformance of the validator with Fabric's validation semantics: signatures, policies, tx ids,
//! MVCC and phantom reads, duplicates. Cases named after Fabric's are marked so.

use proptest::prelude::*;
use streamledger_core::codec;
use streamledger_core::crypto::{self, Signer};
use streamledger_core::endorsement::endorse;
use streamledger_core::fixtures::{Fixture, Rw};
use streamledger_core::model::*;
use streamledger_core::state::{CommittedState, MemState};
use streamledger_core::crypto::SignatureChecks;
use streamledger_core::validation::{validate_block, AnyWrite, BlockValidation, CheckedBlock, TxValidationCode as Code, GENESIS_STATE_HASH};

fn validate(f: &Fixture, state: &MemState, number: i64, txs: &[OrderedTx]) -> BlockValidation {
    validate_both(f, state, &f.block(number, &[0; 32], txs), &GENESIS_STATE_HASH)
}

/// Validates in one call, and again in the validator stage's two halves (the per-transaction
/// checks first, as its look-ahead runs them, then the checks against state): every case below
/// therefore holds for both, and the two must agree on every verdict, write and hash.
fn validate_both(f: &Fixture, state: &MemState, block: &Block, previous_state_hash: &[u8]) -> BlockValidation {
    let whole = validate_block(&f.network, &AnyWrite, state, block, previous_state_hash).expect("memory state never fails");
    let checked = CheckedBlock::new(&f.network, &AnyWrite, std::sync::Arc::new(block.clone()), SignatureChecks::On);
    let halves = checked.validate(state, previous_state_hash).expect("memory state never fails");
    assert_eq!(whole, halves, "validating in two halves must give the same outcome as in one");
    whole
}

fn codes(f: &Fixture, state: &MemState, txs: &[OrderedTx]) -> Vec<Code> {
    validate(f, state, 5, txs).codes
}

/// Committed state with `a`@(1,0), `b`@(1,1), `c`@(2,0) in the `kv` namespace.
fn committed() -> MemState {
    let mut s = MemState::new();
    s.put("kv", "a", b"1", Version::new(1, 0));
    s.put("kv", "b", b"2", Version::new(1, 1));
    s.put("kv", "c", b"3", Version::new(2, 0));
    s
}

// ---- MVCC: Fabric's TestValidator cases ----

#[test]
fn read_at_the_committed_version_is_valid() {
    let f = Fixture::new();
    let tx = f.tx(Rw::new().read("a", Some((1, 0))).write("a", "x").build());
    assert_eq!(codes(&f, &committed(), &[tx]), [Code::Valid]);
}

#[test]
fn read_of_a_stale_version_conflicts() {
    let f = Fixture::new();
    let tx = f.tx(Rw::new().read("a", Some((0, 9))).write("a", "x").build());
    assert_eq!(codes(&f, &committed(), &[tx]), [Code::MvccReadConflict]);
}

#[test]
fn reading_a_missing_key_that_now_exists_conflicts() {
    let f = Fixture::new();
    let tx = f.tx(Rw::new().read("a", None).build());
    assert_eq!(codes(&f, &committed(), &[tx]), [Code::MvccReadConflict]);
    let still_missing = f.tx(Rw::new().read("zz", None).write("zz", "1").build());
    assert_eq!(codes(&f, &committed(), &[still_missing]), [Code::Valid]);
}

#[test]
fn reading_a_key_deleted_since_conflicts() {
    let f = Fixture::new();
    let mut s = committed();
    let deleter = f.tx(Rw::new().delete("a").build());
    let v = validate(&f, &s, 3, &[deleter]);
    s.apply(&v.batch);
    let reader = f.tx(Rw::new().read("a", Some((1, 0))).build());
    assert_eq!(codes(&f, &s, &[reader]), [Code::MvccReadConflict]);
}

#[test]
fn a_read_after_an_earlier_in_block_write_conflicts() {
    let f = Fixture::new();
    let writer = f.tx(Rw::new().write("a", "new").build());
    let reader = f.tx(Rw::new().read("a", Some((1, 0))).write("b", "y").build());
    assert_eq!(codes(&f, &committed(), &[writer, reader]), [Code::Valid, Code::MvccReadConflict]);
}

#[test]
fn an_invalid_transaction_s_writes_do_not_count() {
    let f = Fixture::new();
    let stale_writer = f.tx(Rw::new().read("a", Some((0, 0))).write("b", "new").build());
    let reader = f.tx(Rw::new().read("b", Some((1, 1))).build());
    assert_eq!(codes(&f, &committed(), &[stale_writer, reader]), [Code::MvccReadConflict, Code::Valid]);
}

#[test]
fn blind_writes_never_conflict_and_the_last_one_wins() {
    let f = Fixture::new();
    let w1 = f.tx(Rw::new().write("a", "first").build());
    let w2 = f.tx(Rw::new().write("a", "second").build());
    let v = validate(&f, &committed(), 7, &[w1, w2]);
    assert_eq!(v.codes, [Code::Valid, Code::Valid]);
    let (value, version) = &v.batch.writes[&("kv".to_string(), "a".to_string())];
    assert_eq!(value.as_deref(), Some(&b"second"[..]));
    assert_eq!(*version, Version::new(7, 1));
}

#[test]
fn conflicting_transfers_on_one_account_only_the_first_commits() {
    let f = Fixture::new();
    let spend = |to: &str| f.tx(Rw::new().read("a", Some((1, 0))).write("a", "0").write(to, "1").build());
    let got = codes(&f, &committed(), &[spend("x"), spend("y"), spend("z")]);
    assert_eq!(got, [Code::Valid, Code::MvccReadConflict, Code::MvccReadConflict]);
}

// ---- Phantom reads ----

fn full_range() -> Rw {
    Rw::new().range("a", "d", true, &[("a", (1, 0)), ("b", (1, 1)), ("c", (2, 0))])
}

#[test]
fn an_unchanged_range_is_valid() {
    let f = Fixture::new();
    assert_eq!(codes(&f, &committed(), &[f.tx(full_range().build())]), [Code::Valid]);
}

#[test]
fn a_key_inserted_into_the_range_is_a_phantom() {
    let f = Fixture::new();
    let mut s = committed();
    s.put("kv", "bb", b"new", Version::new(3, 0));
    assert_eq!(codes(&f, &s, &[f.tx(full_range().build())]), [Code::PhantomReadConflict]);
    // Outside the range it does not matter.
    let mut s = committed();
    s.put("kv", "d", b"new", Version::new(3, 0));
    assert_eq!(codes(&f, &s, &[f.tx(full_range().build())]), [Code::Valid]);
}

#[test]
fn a_key_deleted_from_the_range_is_a_phantom() {
    let f = Fixture::new();
    let deleter = f.tx(Rw::new().delete("b").build());
    let ranger = f.tx(full_range().build());
    assert_eq!(codes(&f, &committed(), &[deleter, ranger]), [Code::Valid, Code::PhantomReadConflict]);
}

#[test]
fn a_key_updated_in_the_range_is_a_phantom() {
    let f = Fixture::new();
    let mut s = committed();
    s.put("kv", "c", b"changed", Version::new(4, 2));
    assert_eq!(codes(&f, &s, &[f.tx(full_range().build())]), [Code::PhantomReadConflict]);
}

#[test]
fn an_in_block_insert_into_the_range_is_a_phantom() {
    let f = Fixture::new();
    let inserter = f.tx(Rw::new().write("ab", "x").build());
    let ranger = f.tx(full_range().build());
    assert_eq!(codes(&f, &committed(), &[inserter, ranger]), [Code::Valid, Code::PhantomReadConflict]);
}

#[test]
fn an_unexhausted_range_is_checked_up_to_its_last_key_only() {
    let f = Fixture::new();
    // Read a, b of [a, unbounded) and stopped.
    let partial = || f.tx(Rw::new().range("a", "", false, &[("a", (1, 0)), ("b", (1, 1))]).build());
    let mut beyond = committed();
    beyond.put("kv", "c", b"changed", Version::new(4, 0));
    assert_eq!(codes(&f, &beyond, &[partial()]), [Code::Valid], "a change past the last key read is not seen");
    let mut last_changed = committed();
    last_changed.put("kv", "b", b"changed", Version::new(4, 0));
    assert_eq!(codes(&f, &last_changed, &[partial()]), [Code::PhantomReadConflict], "the last key read changed");
    let mut inserted_before_last = committed();
    inserted_before_last.put("kv", "aa", b"new", Version::new(4, 0));
    assert_eq!(codes(&f, &inserted_before_last, &[partial()]), [Code::PhantomReadConflict]);
}

// ---- Duplicate tx ids ----

#[test]
fn a_duplicate_tx_id_in_one_block_is_flagged_after_the_first() {
    let f = Fixture::new();
    let tx = f.tx(Rw::new().write("k", "v").build());
    let v = validate(&f, &committed(), 3, &[tx.clone(), tx]);
    assert_eq!(v.codes, [Code::Valid, Code::DuplicateTxid]);
    assert_eq!(v.batch.tx_index.len(), 1, "only the first occurrence is indexed");
    assert_eq!(v.batch.tx_index[0].1.position, 0);
}

#[test]
fn a_tx_id_already_in_the_ledger_is_a_duplicate_even_if_it_failed_there() {
    let f = Fixture::new();
    let mut s = committed();
    let tx = f.tx(Rw::new().read("a", Some((0, 0))).build());
    let first = validate(&f, &s, 3, std::slice::from_ref(&tx));
    assert_eq!(first.codes, [Code::MvccReadConflict]);
    s.apply(&first.batch);
    assert_eq!(s.tx_location(&tx.proposal.tx_id).unwrap().unwrap().code, Code::MvccReadConflict as i32);
    assert_eq!(codes(&f, &s, &[tx]), [Code::DuplicateTxid]);
}

#[test]
fn a_forged_copy_cannot_claim_a_real_transaction_s_id() {
    let f = Fixture::new();
    let real = f.tx(Rw::new().write("k", "v").build());
    let mut forged = real.clone();
    forged.proposal.signature[0] ^= 1;
    let v = validate(&f, &committed(), 3, &[forged, real]);
    assert_eq!(v.codes, [Code::BadCreatorSignature, Code::Valid]);
}

// ---- Identity, tx id, signatures, policy ----

#[test]
fn a_tampered_creator_signature_is_bad_creator_signature() {
    let f = Fixture::new();
    let mut tx = f.tx(Rw::new().write("k", "v").build());
    tx.proposal.args.push("smuggled".into());
    assert_eq!(codes(&f, &committed(), &[tx]), [Code::BadCreatorSignature]);
}

#[test]
fn a_creator_the_network_does_not_know_is_bad_creator_signature() {
    let f = Fixture::new();
    let stranger = Signer::from_seed("Org1", [42; 32]);
    let p = f.proposal_by(&stranger, "kv", "put", &["k", "v"]);
    let tx = f.endorsed(p, Rw::new().write("k", "v").build());
    assert_eq!(codes(&f, &committed(), &[tx]), [Code::BadCreatorSignature]);
}

#[test]
fn a_tx_id_not_derived_from_nonce_and_creator_is_bad_proposal_txid() {
    let f = Fixture::new();
    let mut p = f.proposal("kv", "put", &["k", "v"]);
    p.tx_id = "f".repeat(64);
    p.signature = f.clients[0].sign(&crypto::proposal_signing_bytes(&p));
    let tx = f.endorsed(p, Rw::new().write("k", "v").build());
    assert_eq!(codes(&f, &committed(), &[tx]), [Code::BadProposalTxid]);
}

#[test]
fn too_few_endorsements_fail_the_policy() {
    let f = Fixture::new();
    let p = f.proposal("transfer", "transfer", &["a", "b", "1"]);
    let rw = RwSet { writes: vec![KvWrite { namespace: "transfer".into(), key: "a".into(), value: Some(b"1".to_vec()) }], ..Default::default() };
    let mut tx = f.endorsed(p, rw);
    tx.endorsements.truncate(1);
    assert_eq!(codes(&f, &committed(), &[tx.clone()]), [Code::EndorsementPolicyFailure]);
    // The same identity twice counts once (Fabric de-duplicates signers).
    tx.endorsements.push(tx.endorsements[0].clone());
    assert_eq!(codes(&f, &committed(), &[tx]), [Code::EndorsementPolicyFailure]);
}

#[test]
fn endorsements_that_disagree_on_the_rwset_fail_the_policy() {
    let f = Fixture::new();
    let p = f.proposal("transfer", "transfer", &["a", "b", "1"]);
    let agreed = RwSet { writes: vec![KvWrite { namespace: "transfer".into(), key: "a".into(), value: Some(b"1".to_vec()) }], ..Default::default() };
    let mut other = agreed.clone();
    other.writes[0].value = Some(b"2".to_vec());
    let e1 = endorse(&f.peers[0], &p, Response::ok(Vec::new()), agreed.clone());
    let e2 = endorse(&f.peers[1], &p, Response::ok(Vec::new()), other);
    let tx = OrderedTx { proposal: p, response: Response::ok(Vec::new()), rwset: agreed, endorsements: vec![e1.endorsement(), e2.endorsement()] };
    assert_eq!(codes(&f, &committed(), &[tx]), [Code::EndorsementPolicyFailure]);
}

#[test]
fn an_endorser_the_policy_does_not_name_does_not_count() {
    let f = Fixture::new();
    let p = f.proposal("transfer", "transfer", &["a", "b", "1"]);
    let rw = RwSet { writes: vec![KvWrite { namespace: "transfer".into(), key: "a".into(), value: Some(b"1".to_vec()) }], ..Default::default() };
    // Org2's client (a client, not a peer) and an unregistered key claiming Org2.
    let stranger = Signer::from_seed("Org2", [43; 32]);
    let endorsements = [&f.peers[0], &f.clients[1], &stranger]
        .into_iter()
        .map(|s| endorse(s, &p, Response::ok(Vec::new()), rw.clone()).endorsement())
        .collect();
    let tx = OrderedTx { proposal: p, response: Response::ok(Vec::new()), rwset: rw, endorsements };
    assert_eq!(codes(&f, &committed(), &[tx]), [Code::EndorsementPolicyFailure]);
}

#[test]
fn a_stranger_s_bad_endorsement_beside_the_needed_ones_changes_nothing() {
    // The validator leaves strangers' endorsements out of its signature batches (a bad one would
    // fail a batch of good ones); the verdicts must be those of checking every signature.
    let f = Fixture::new();
    let stranger = Signer::from_seed("Org2", [43; 32]);
    let txs: Vec<OrderedTx> = ["a", "b", "c"]
        .into_iter()
        .map(|key| {
            let p = f.proposal("kv", "put", &[key, "v"]);
            let rw = RwSet { writes: vec![KvWrite { namespace: "kv".into(), key: key.into(), value: Some(b"v".to_vec()) }], ..Default::default() };
            let mut tx = f.endorsed(p.clone(), rw.clone());
            let mut forged = endorse(&stranger, &p, Response::ok(Vec::new()), rw).endorsement();
            forged.signature[0] ^= 1;
            tx.endorsements.insert(0, forged);
            tx
        })
        .collect();
    assert_eq!(codes(&f, &committed(), &txs), [Code::Valid, Code::Valid, Code::Valid]);
    // And a member's bad endorsement still fails its policy.
    let mut spoilt = txs[1].clone();
    spoilt.endorsements.truncate(2); // the stranger's and the first peer's,
    spoilt.endorsements[1].signature[0] ^= 1; // now spoilt: no good member's endorsement is left
    assert_eq!(codes(&f, &committed(), &[txs[0].clone(), spoilt, txs[2].clone()]), [Code::Valid, Code::EndorsementPolicyFailure, Code::Valid]);
}

// ---- Malformed transactions ----

#[test]
fn undecodable_transactions_stay_in_the_block_as_bad_payload() {
    let f = Fixture::new();
    let good = codec::encode(&f.tx(Rw::new().write("k", "v").build())).unwrap();
    let truncated = good[..good.len() / 2].to_vec();
    let block = f.block_of_raw(1, &[0; 32], vec![b"garbage".to_vec(), Vec::new(), truncated, good]);
    let v = validate_both(&f, &committed(), &block, &GENESIS_STATE_HASH);
    assert_eq!(v.codes, [Code::BadPayload, Code::BadPayload, Code::BadPayload, Code::Valid]);
    assert_eq!(v.tx_ids[0], "");
}

#[test]
fn wrong_channel_unknown_contract_failed_response_and_bad_rwset_get_their_codes() {
    let f = Fixture::new();
    let reendorse = |mut p: Proposal, client: &Signer, rw: RwSet| {
        client.sign_proposal(&mut p);
        f.endorsed(p, rw)
    };
    let rw = Rw::new().write("k", "v").build();
    let mut p = f.proposal("kv", "put", &[]);
    p.channel = "otherchannel".into();
    let wrong_channel = reendorse(p, &f.clients[0], rw.clone());
    let mut p = f.proposal("nosuch", "put", &[]);
    p.contract = "nosuch".into();
    let unknown_contract = reendorse(p, &f.clients[0], rw.clone());
    let mut failed = f.tx(rw.clone());
    failed.response = Response::error("boom");
    let other_namespace = f.tx(RwSet { writes: vec![KvWrite { namespace: "transfer".into(), key: "k".into(), value: None }], ..Default::default() });
    let duplicate_write = f.tx(Rw::new().write("k", "1").write("k", "2").build());
    let empty_key = f.tx(Rw::new().write("", "1").build());
    let range_outside = f.tx(Rw::new().range("a", "b", true, &[("z", (1, 0))]).build());
    let got = codes(&f, &committed(), &[wrong_channel, unknown_contract, failed, other_namespace, duplicate_write, empty_key, range_outside]);
    assert_eq!(
        got,
        [
            Code::TargetChainNotFound,
            Code::InvalidChaincode,
            Code::BadResponsePayload,
            Code::BadRwset,
            Code::BadRwset,
            Code::BadRwset,
            Code::BadRwset
        ]
    );
}

#[test]
fn codes_keep_fabric_numbers_and_names() {
    assert_eq!(Code::MvccReadConflict as i32, 11);
    assert_eq!(Code::PhantomReadConflict.name(), "PHANTOM_READ_CONFLICT");
    assert_eq!(Code::from_i32(9), Some(Code::DuplicateTxid));
    assert_eq!(Code::name_of(13), "CODE_13");
    for c in Code::ALL {
        assert_eq!(Code::from_i32(c as i32), Some(c));
    }
}

// ---- Outputs: write batch, tx index, state hash ----

#[test]
fn the_batch_holds_valid_writes_with_heights_and_indexes_every_owned_tx_id() {
    let f = Fixture::new();
    let ok = f.tx(Rw::new().delete("a").write("n", "1").build());
    let conflict = f.tx(Rw::new().read("b", Some((0, 0))).write("m", "2").build());
    let v = validate(&f, &committed(), 9, &[ok.clone(), conflict.clone()]);
    let keys: Vec<&str> = v.batch.writes.keys().map(|(_, k)| k.as_str()).collect();
    assert_eq!(keys, ["a", "n"]);
    assert_eq!(v.batch.writes[&("kv".into(), "a".into())], (None, Version::new(9, 0)));
    let index: Vec<(&str, i32)> = v.batch.tx_index.iter().map(|(id, l)| (id.as_str(), l.code)).collect();
    assert_eq!(index, [(ok.proposal.tx_id.as_str(), 0), (conflict.proposal.tx_id.as_str(), 11)]);
    assert_eq!(v.results()[1].code, 11);
}

#[test]
fn the_state_hash_is_deterministic_and_covers_verdicts_and_writes() {
    let f = Fixture::new();
    let txs = [f.tx(Rw::new().write("n", "1").build()), f.tx(Rw::new().read("a", Some((1, 0))).build())];
    let block = f.block(4, &[1; 32], &txs);
    let run = |s: &MemState, prev: &[u8]| validate_both(&f, s, &block, prev).state_hash;
    let base = run(&committed(), &GENESIS_STATE_HASH);
    assert_eq!(base, run(&committed(), &GENESIS_STATE_HASH));
    assert_ne!(base, run(&committed(), &[1; 32]), "the hash chains on the previous one");
    let mut moved = committed();
    moved.put("kv", "a", b"1", Version::new(2, 5));
    assert_ne!(base, run(&moved, &GENESIS_STATE_HASH), "a different verdict gives a different hash");
}

// ---- Property: the parallel validator agrees with a plain sequential model of Fabric's rules ----

#[derive(Debug, Clone)]
struct TxSpec {
    reads: Vec<(u8, bool)>, // key, read at the current version (else a stale one)
    writes: Vec<(u8, bool)>, // key, delete
}

fn tx_spec() -> impl Strategy<Value = TxSpec> {
    (prop::collection::vec((0u8..6, any::<bool>()), 0..3), prop::collection::vec((0u8..6, any::<bool>()), 0..3))
        .prop_map(|(reads, writes)| TxSpec { reads, writes })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn parallel_validation_matches_a_sequential_model(blocks in prop::collection::vec(prop::collection::vec(tx_spec(), 1..8), 1..5)) {
        let f = Fixture::new();
        let mut state = MemState::new();
        for k in 0..6u8 {
            state.put("kv", &format!("k{k}"), b"0", Version::new(0, k as i32));
        }
        let mut prev = GENESIS_STATE_HASH;
        for (b, specs) in blocks.iter().enumerate() {
            let number = b as i64 + 1;
            let mut txs = Vec::new();
            for spec in specs {
                let mut reads = std::collections::BTreeMap::new();
                for (k, fresh) in &spec.reads {
                    let key = format!("k{k}");
                    let current = state.get("kv", &key).unwrap().map(|v| v.version);
                    let version = if *fresh { current } else { Some(Version::new(99, 0)) };
                    reads.insert(key, version);
                }
                let mut writes = std::collections::BTreeMap::new();
                for (k, delete) in &spec.writes {
                    writes.insert(format!("k{k}"), *delete);
                }
                let rw = RwSet {
                    reads: reads.iter().map(|(k, v)| KvRead { namespace: "kv".into(), key: k.clone(), version: *v }).collect(),
                    range_reads: vec![],
                    writes: writes.iter().map(|(k, d)| KvWrite { namespace: "kv".into(), key: k.clone(), value: (!d).then(|| k.as_bytes().to_vec()) }).collect(),
                };
                txs.push(f.tx(rw));
            }
            // The model: sequential, one rule at a time, straight from Fabric's description.
            let mut written_in_block = std::collections::HashSet::new();
            let mut expected = Vec::new();
            for tx in &txs {
                let ok = tx.rwset.reads.iter().all(|r| {
                    !written_in_block.contains(&r.key) && state.get("kv", &r.key).unwrap().map(|v| v.version) == r.version
                });
                if ok {
                    tx.rwset.writes.iter().for_each(|w| { written_in_block.insert(w.key.clone()); });
                }
                expected.push(if ok { Code::Valid } else { Code::MvccReadConflict });
            }
            let block = f.block(number, &[0; 32], &txs);
            let v = validate_both(&f, &state, &block, &prev);
            prop_assert_eq!(&v.codes, &expected);
            prev = v.state_hash;
            state.apply(&v.batch);
        }
    }
}

// ---- Whole blocks: chain, data hash, orderer signature ----

#[test]
fn blocks_must_chain_carry_their_data_and_be_signed_by_an_orderer() {
    use streamledger_core::cutter::GENESIS_PREVIOUS_HASH;
    use streamledger_core::validation::{check_block, BlockRejection};
    let f = Fixture::new();
    let b0 = f.block(0, &GENESIS_PREVIOUS_HASH, &[f.tx(Rw::new().write("k", "v").build())]);
    assert_eq!(check_block(&f.network, None, &b0), Ok(()));
    let b1 = f.block(1, &crypto::block_header_hash(&b0.header), &[f.tx(Rw::new().write("k", "w").build())]);
    assert_eq!(check_block(&f.network, Some(&b0.header), &b1), Ok(()));

    let wrong_previous = f.block(1, &[9; 32], &[]);
    assert!(matches!(check_block(&f.network, Some(&b0.header), &wrong_previous), Err(BlockRejection::Chain(_))));
    let mut reordered = f.block(1, &crypto::block_header_hash(&b0.header), &[f.tx(Rw::new().build()), f.tx(Rw::new().write("a", "1").build())]);
    reordered.transactions.swap(0, 1);
    let err = check_block(&f.network, Some(&b0.header), &reordered).unwrap_err();
    assert!(err.to_string().contains("block 1"), "{err}");
    let mut bad_signature = b1.clone();
    bad_signature.metadata.signature[0] ^= 1;
    assert_eq!(
        check_block(&f.network, Some(&b0.header), &bad_signature),
        Err(BlockRejection::BadSignature { number: 1, orderer: "orderer0".into() })
    );
    let mut moved_offsets = b1.clone();
    moved_offsets.metadata.cut_marker_offset += 1;
    assert!(matches!(check_block(&f.network, Some(&b0.header), &moved_offsets), Err(BlockRejection::BadSignature { .. })));
    let mut stranger = b1;
    stranger.metadata.orderer = "orderer9".into();
    assert!(matches!(check_block(&f.network, Some(&b0.header), &stranger), Err(BlockRejection::UnknownOrderer { .. })));
}

#[test]
fn signature_checks_are_on_by_default_and_off_only_when_asked() {
    use streamledger_core::crypto::SignatureChecks;
    use streamledger_core::validation::validate_block_with;
    assert_eq!(SignatureChecks::default(), SignatureChecks::On);
    let f = Fixture::new();
    let mut tx = f.tx(Rw::new().write("k", "v").build());
    tx.endorsements[0].signature[0] ^= 1;
    let block = f.block(1, &[0; 32], &[tx]);
    let run = |checks| validate_block_with(&f.network, &AnyWrite, &committed(), &block, &GENESIS_STATE_HASH, checks).unwrap().codes;
    // kv needs one org: the other endorsement still satisfies OR, so corrupt both orgs' claims.
    assert_eq!(run(SignatureChecks::On), [Code::Valid], "OR('Org1.peer','Org2.peer') still holds with one good signature");
    let mut both = f.tx(Rw::new().write("k", "v").build());
    for e in &mut both.endorsements {
        e.signature[0] ^= 1;
    }
    let block = f.block(1, &[0; 32], &[both]);
    let run = |checks| validate_block_with(&f.network, &AnyWrite, &committed(), &block, &GENESIS_STATE_HASH, checks).unwrap().codes;
    assert_eq!(run(SignatureChecks::On), [Code::EndorsementPolicyFailure]);
    assert_eq!(run(SignatureChecks::Off), [Code::Valid], "with checks off, signatures are not verified");
}
