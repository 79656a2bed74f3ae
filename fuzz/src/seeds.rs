//! The seed corpus under `fuzz/seeds/<target>/`: a few valid records of every topic, in both
//! framings (Confluent with the current schema's id, and with each older version's id), and a few
//! policies. `FUZZ_WRITE_SEEDS=1 cargo test --lib` (in `fuzz/`) writes them; without it the test
//! checks that the committed seeds still decode, so a schema change cannot leave them stale.

use std::path::PathBuf;

use streamledger_core::codec::{self, Record, CONFLUENT_MAGIC};
use streamledger_core::fixtures::{Fixture, Rw};
use streamledger_core::model::*;
use streamledger_core::schema_history;

use crate::{decode_target, policy_target, registry_id};

fn dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("seeds").join(target)
}

fn target_of<T: Record>() -> String {
    format!("decode_{}", T::TOPIC.replace('-', "_"))
}

/// `values` single-object encoded, then Confluent-framed with the current version's id and with
/// every older version's id.
fn framings<T: Record>(values: &[T]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let versions: Vec<u32> = schema_history::versions(T::TOPIC).map(|v| v.version).collect();
    let current = versions.iter().copied().max().expect("every topic has a published version");
    for (i, v) in values.iter().enumerate() {
        let single = codec::encode(v).expect("encodes");
        let confluent = |id: u32| [&[CONFLUENT_MAGIC][..], &id.to_be_bytes(), &single[10..]].concat();
        out.push(single.clone());
        out.push(confluent(registry_id(T::TOPIC, current).expect("current version has an id")));
        if i == 0 {
            for &old in versions.iter().filter(|&&v| v != current) {
                out.push(confluent(registry_id(T::TOPIC, old).expect("id")));
            }
        }
    }
    out
}

fn all() -> Vec<(String, Vec<Vec<u8>>)> {
    let f = Fixture::new();
    let rw = Rw::new().read("a", Some((1, 0))).write("a", "1").delete("b").range("c", "d", true, &[("c1", (2, 3))]).build();
    let p1 = f.proposal("kv", "put", &["k", "v"]);
    let p2 = f.proposal_by(&f.clients[1], "transfer", "transfer", &["alice", "bob", "30"]);
    let t1 = f.endorsed(p1.clone(), rw.clone());
    let t2 = f.tx(RwSet::default());
    let b1 = f.block(1, &[0; 32], &[t1.clone(), t2.clone()]);
    let b2 = f.block_of_raw(2, &[7; 32], vec![b"garbage".to_vec()]);
    // One result naming the proposal record it answers (v2), one naming none (as a v1 endorser's).
    let er = |p: &Proposal, ok: bool| {
        let response = if ok { Response::ok(b"done".to_vec()) } else { Response::error("no such key") };
        let result = streamledger_core::endorsement::endorse(&f.peers[0], p, response, rw.clone());
        if ok { result.answering((1, 42)) } else { result }
    };
    let vb = ValidatedBlock {
        block_number: 1,
        block_hash: vec![1; 32],
        peer: "Org1.peer0".into(),
        results: vec![TxResult { tx_id: t1.proposal.tx_id.clone(), code: 0 }, TxResult { tx_id: t2.proposal.tx_id.clone(), code: 11 }],
        state_hash: vec![2; 32],
    };
    let dl = |instance: Option<&str>, key: Option<&[u8]>| DeadLetter {
        source_topic: "mychannel.proposals".into(),
        partition: 0,
        offset: 42,
        key: key.map(<[u8]>::to_vec),
        payload: vec![0xc3, 0x01, 0xff],
        stage: "endorser".into(),
        reason: "cannot decode".into(),
        instance: instance.map(Into::into),
    };
    let sc = |value: Option<&[u8]>| StateChange {
        channel: "mychannel".into(),
        block_number: 1,
        tx_index: 0,
        tx_id: p1.tx_id.clone(),
        namespace: "kv".into(),
        key: "a".into(),
        value: value.map(<[u8]>::to_vec),
        is_delete: value.is_none(),
        version: Version::new(1, 0),
    };
    let row = TxResultRow {
        tx_id: p1.tx_id.clone(),
        channel: "mychannel".into(),
        block_number: 1,
        tx_index: 0,
        validation_code: 0,
        validation_code_name: "VALID".into(),
        contract: "kv".into(),
        function: "put".into(),
        creator_org: "Org1".into(),
        block_hash: "ab".repeat(32),
        peer: "Org1.peer0".into(),
        commit_timestamp_ms: 1_700_000_000_123,
    };
    let policies = [
        "AND('Org1.peer', 'Org2.peer')",
        "OR('Org1.member', 'Org2.member')",
        "OutOf(2, 'Org1.peer', 'Org2.client', 'org3.example.com.admin')",
        " and ( 'Org1.member' , OR('Org2.peer', OutOf(1, 'Org3.orderer')) ) ",
        "'Org1.peer'",
        "AND('Org1.peer'",
    ];
    vec![
        (target_of::<Proposal>(), framings(&[p1.clone(), p2.clone()])),
        (target_of::<EndorsementResult>(), framings(&[er(&p1, true), er(&p2, false)])),
        (target_of::<OrderedTx>(), framings(&[t1, t2])),
        (
            target_of::<CutMarker>(),
            framings(&[
                CutMarker { block_number: 1, first_offset: 0, last_offset: 9, cutter_id: "orderer0".into(), reason: CutReason::Count },
                CutMarker { block_number: 2, first_offset: 10, last_offset: 10, cutter_id: "orderer0".into(), reason: CutReason::Timeout },
            ]),
        ),
        (target_of::<Block>(), framings(&[b1, b2])),
        (target_of::<ValidatedBlock>(), framings(&[vb])),
        (target_of::<DeadLetter>(), framings(&[dl(Some("Org1"), Some(b"k")), dl(None, None)])),
        (
            target_of::<Rejection>(),
            framings(&[Rejection { tx_id: p2.tx_id.clone(), stage: "gateway".into(), reason: "timeout".into(), source_offset: 3, source_partition: 1 }]),
        ),
        (target_of::<StateChange>(), framings(&[sc(Some(br#"{"balance":70}"#)), sc(None)])),
        (target_of::<TxResultRow>(), framings(&[row])),
        ("policy_parse".into(), policies.iter().map(|p| p.as_bytes().to_vec()).collect()),
    ]
}

fn run(target: &str, data: &[u8]) -> bool {
    match target {
        "decode_proposals" => decode_target::<Proposal>(data),
        "decode_endorsement_results" => decode_target::<EndorsementResult>(data),
        "decode_ordered_tx" => decode_target::<OrderedTx>(data),
        "decode_cut_markers" => decode_target::<CutMarker>(data),
        "decode_blocks" => decode_target::<Block>(data),
        "decode_validated_blocks" => decode_target::<ValidatedBlock>(data),
        "decode_dead_letters" => decode_target::<DeadLetter>(data),
        "decode_rejections" => decode_target::<Rejection>(data),
        "decode_state_changes" => decode_target::<StateChange>(data),
        "decode_tx_results" => decode_target::<TxResultRow>(data),
        "policy_parse" => policy_target(data),
        other => panic!("no fuzz target {other}"),
    }
}

#[test]
fn seeds_are_written_or_still_valid() {
    let write = std::env::var_os("FUZZ_WRITE_SEEDS").is_some();
    for (target, seeds) in all() {
        let d = dir(&target);
        if write {
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            for (i, s) in seeds.iter().enumerate() {
                std::fs::write(d.join(format!("seed-{i}")), s).unwrap();
            }
        }
        let on_disk = std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e} (FUZZ_WRITE_SEEDS=1 writes it)", d.display()));
        let mut n = 0;
        for entry in on_disk {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let valid = run(&target, &data);
            // Every single-object seed and every complete policy is valid.
            let must = data.starts_with(&codec::SINGLE_OBJECT_MAGIC) || (target == "policy_parse" && data.ends_with(b")"));
            assert!(valid || !must, "{} no longer decodes", path.display());
            n += 1;
        }
        assert_eq!(n, seeds.len(), "{target}: seeds on disk differ from the generated ones (FUZZ_WRITE_SEEDS=1 rewrites them)");
    }
}
