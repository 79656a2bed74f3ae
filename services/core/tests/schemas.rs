//! The schema files in `schemas/` and the Rust types must not drift apart: every field of every
//! record must line up, by name and in order, and every type must round-trip through its schema.

use std::collections::HashMap;

use apache_avro::schema::{Name, Schema};
use apache_avro::types::Value;
use streamledger_core::codec::{self, all_schemas, CodecError, Record};
use streamledger_core::model::*;

fn identity() -> Identity {
    Identity { org: "Org1".into(), public_key: vec![7; 32] }
}

fn rwset() -> RwSet {
    let read = |k: &str, v: Option<Version>| KvRead { namespace: "kv".into(), key: k.into(), version: v };
    RwSet {
        reads: vec![read("a", Some(Version::new(3, 1))), read("b", None)],
        range_reads: vec![RangeRead {
            namespace: "kv".into(),
            start_key: "a".into(),
            end_key: "z".into(),
            exhausted: true,
            reads: vec![read("c", Some(Version::new(1, 0)))],
        }],
        writes: vec![
            KvWrite { namespace: "kv".into(), key: "a".into(), value: Some(b"1".to_vec()) },
            KvWrite { namespace: "kv".into(), key: "d".into(), value: None },
        ],
    }
}

fn proposal() -> Proposal {
    Proposal {
        tx_id: "ab".repeat(32),
        channel: "mychannel".into(),
        contract: "kv".into(),
        function: "put".into(),
        args: vec!["k".into(), "v".into()],
        creator: identity(),
        nonce: vec![1; 24],
        timestamp_ms: 1_700_000_000_000,
        signature: vec![9; 64],
    }
}

fn ordered_tx() -> OrderedTx {
    OrderedTx {
        proposal: proposal(),
        response: Response { status: 200, message: "ok".into(), payload: b"p".to_vec() },
        rwset: rwset(),
        endorsements: vec![Endorsement { endorser: identity(), signature: vec![5; 64] }],
    }
}

/// One fully populated value of every topic type (every optional present, every list non-empty),
/// encoded, plus the schema it belongs to.
fn samples() -> Vec<(&'static str, Value, Vec<u8>)> {
    fn entry<T: Record + PartialEq + std::fmt::Debug>(v: T) -> (&'static str, Value, Vec<u8>) {
        let bytes = codec::encode(&v).expect("encodes");
        let back: T = codec::decode(&bytes).expect("decodes");
        assert_eq!(back, v, "{} does not round-trip", T::TOPIC);
        (T::TOPIC, apache_avro::to_value(&v).expect("to value"), bytes)
    }
    vec![
        entry(proposal()),
        entry(EndorsementResult {
            tx_id: "t".into(),
            endorser: identity(),
            proposal_hash: vec![1; 32],
            response: Response::error("no"),
            rwset: rwset(),
            signature: vec![2; 64],
            proposal_partition: 1,
            proposal_offset: 7,
        }),
        entry(ordered_tx()),
        entry(CutMarker { block_number: 4, first_offset: 10, last_offset: 19, cutter_id: "orderer0".into(), reason: CutReason::Bytes }),
        entry(Block {
            header: BlockHeader { number: 4, previous_hash: vec![3; 32], data_hash: vec![4; 32] },
            transactions: vec![serde_bytes::ByteBuf::from(codec::encode(&ordered_tx()).unwrap())],
            metadata: BlockMetadata { first_offset: 10, last_offset: 10, cut_marker_offset: 4, orderer: "orderer0".into(), signature: vec![6; 64] },
        }),
        entry(ValidatedBlock {
            block_number: 4,
            block_hash: vec![1; 32],
            peer: "Org1.peer0".into(),
            results: vec![TxResult { tx_id: "t".into(), code: 11 }],
            state_hash: vec![2; 32],
        }),
        entry(DeadLetter {
            source_topic: "mychannel.proposals".into(),
            partition: 2,
            offset: 99,
            key: Some(b"k".to_vec()),
            payload: vec![0xde, 0xad],
            stage: "endorser".into(),
            reason: "bad".into(),
            instance: Some("Org1".into()),
        }),
        entry(Rejection { tx_id: "t".into(), stage: "gateway".into(), reason: "timeout".into(), source_offset: 3, source_partition: 1 }),
        entry(StateChange {
            channel: "mychannel".into(),
            block_number: 4,
            tx_index: 2,
            tx_id: "t".into(),
            namespace: "transfer".into(),
            key: "alice".into(),
            value: Some(br#"{"balance":70}"#.to_vec()),
            is_delete: false,
            version: Version::new(4, 2),
        }),
        entry(TxResultRow {
            tx_id: "t".into(),
            channel: "mychannel".into(),
            block_number: 4,
            tx_index: 2,
            validation_code: 11,
            validation_code_name: "MVCC_READ_CONFLICT".into(),
            contract: "transfer".into(),
            function: "transfer".into(),
            creator_org: "Org1".into(),
            block_hash: "ab".repeat(32),
            peer: "Org1.peer0".into(),
            commit_timestamp_ms: 1_700_000_000_123,
        }),
    ]
}

/// Walks a serde-produced value alongside the schema and reports every field whose name or
/// position differs. `path` names where we are, for the failure message.
fn compare(value: &Value, schema: &Schema, names: &HashMap<Name, Schema>, path: &str, problems: &mut Vec<String>) {
    match (value, schema) {
        (_, Schema::Ref { name }) => match names.get(name) {
            Some(s) => compare(value, s, names, path, problems),
            None => problems.push(format!("{path}: unresolved reference {name:?}")),
        },
        (Value::Record(fields), Schema::Record(rs)) => {
            let got: Vec<&str> = fields.iter().map(|(n, _)| n.as_str()).collect();
            let want: Vec<&str> = rs.fields.iter().map(|f| f.name.as_str()).collect();
            if got != want {
                problems.push(format!("{path}: type has fields {got:?}, schema {} has {want:?}", rs.name));
                return;
            }
            for ((n, v), f) in fields.iter().zip(&rs.fields) {
                compare(v, &f.schema, names, &format!("{path}.{n}"), problems);
            }
        }
        (Value::Union(_, inner), Schema::Union(us)) if **inner != Value::Null => {
            let non_null = us.variants().iter().find(|s| **s != Schema::Null);
            match non_null {
                Some(s) => compare(inner, s, names, path, problems),
                None => problems.push(format!("{path}: union has no non-null branch")),
            }
        }
        (Value::Array(items), Schema::Array(a)) => {
            for item in items.iter().take(1) {
                compare(item, &a.items, names, &format!("{path}[]"), problems);
            }
        }
        _ => {}
    }
}

fn named_types(schema: &Schema, out: &mut HashMap<Name, Schema>) {
    match schema {
        Schema::Record(r) => {
            out.insert(r.name.clone(), schema.clone());
            for f in &r.fields {
                named_types(&f.schema, out);
            }
        }
        Schema::Enum(e) => {
            out.insert(e.name.clone(), schema.clone());
        }
        Schema::Array(a) => named_types(&a.items, out),
        Schema::Union(u) => u.variants().iter().for_each(|s| named_types(s, out)),
        _ => {}
    }
}

#[test]
fn every_type_matches_its_schema_field_by_field() {
    let samples = samples();
    assert_eq!(samples.len(), all_schemas().len(), "a topic type has no sample");
    for (topic, value, _) in &samples {
        let rs = all_schemas().into_iter().find(|s| s.file == format!("{topic}.avsc")).expect("schema");
        let mut names = HashMap::new();
        named_types(rs.schema, &mut names);
        let mut problems = Vec::new();
        compare(value, rs.schema, &names, topic, &mut problems);
        assert!(problems.is_empty(), "schemas/{topic}.avsc drifted from the Rust type:\n{}", problems.join("\n"));
    }
}

#[test]
fn drift_is_detected() {
    // The checker itself must be able to fail: a value with a renamed field is reported.
    let rs = CutMarker::schema();
    let mut names = HashMap::new();
    named_types(rs.schema, &mut names);
    let value = Value::Record(vec![("block".into(), Value::Long(1))]);
    let mut problems = Vec::new();
    compare(&value, rs.schema, &names, "cut-markers", &mut problems);
    assert_eq!(problems.len(), 1, "{problems:?}");
}

#[test]
fn a_named_type_has_one_definition_across_all_schema_files() {
    let mut seen: HashMap<Name, (String, &str)> = HashMap::new();
    for rs in all_schemas() {
        let mut names = HashMap::new();
        named_types(rs.schema, &mut names);
        for (name, schema) in names {
            let canonical = schema.canonical_form();
            if let Some((other, file)) = seen.get(&name) {
                assert_eq!(other, &canonical, "{name:?} differs between schemas/{file} and schemas/{}", rs.file);
            } else {
                seen.insert(name, (canonical, rs.file));
            }
        }
    }
    assert!(seen.len() >= 15, "expected the nested record types, saw {}", seen.len());
}

#[test]
fn optional_fields_round_trip_when_absent() {
    let mut p = ordered_tx();
    p.rwset.reads[0].version = None;
    p.rwset.writes[0].value = None;
    let back: OrderedTx = codec::decode(&codec::encode(&p).unwrap()).unwrap();
    assert_eq!(back, p);
    let d = DeadLetter {
        source_topic: String::new(),
        partition: 0,
        offset: 0,
        key: None,
        payload: vec![],
        stage: String::new(),
        reason: String::new(),
        instance: None,
    };
    assert_eq!(codec::decode::<DeadLetter>(&codec::encode(&d).unwrap()).unwrap(), d);
    let delete = StateChange {
        channel: "c".into(),
        block_number: 0,
        tx_index: 0,
        tx_id: "t".into(),
        namespace: "kv".into(),
        key: "k".into(),
        value: None,
        is_delete: true,
        version: Version::new(0, 0),
    };
    assert_eq!(codec::decode::<StateChange>(&codec::encode(&delete).unwrap()).unwrap(), delete);
}

#[test]
fn single_object_header_names_the_schema_fingerprint() {
    for (topic, _, bytes) in samples() {
        assert_eq!(&bytes[..2], &codec::SINGLE_OBJECT_MAGIC, "{topic}");
        let rs = all_schemas().into_iter().find(|s| s.file == format!("{topic}.avsc")).unwrap();
        assert_eq!(&bytes[2..10], &rs.fingerprint(), "{topic}");
    }
    let fingerprints: std::collections::BTreeSet<_> = all_schemas().iter().map(|s| s.fingerprint()).collect();
    assert_eq!(fingerprints.len(), all_schemas().len(), "two schemas share a fingerprint");
}

fn decode_error(bytes: &[u8]) -> (String, usize, String) {
    match codec::decode::<Proposal>(bytes) {
        Err(CodecError::Decode { schema, at_byte, reason, .. }) => (schema, at_byte, reason),
        other => panic!("expected a decode error, got {other:?}"),
    }
}

#[test]
fn a_record_of_another_schema_is_refused_naming_both() {
    let bytes = codec::encode(&ordered_tx()).unwrap();
    let (schema, at, reason) = decode_error(&bytes);
    assert_eq!(schema, "io.streamledger.Proposal");
    assert_eq!(at, 2);
    assert!(reason.contains("unknown schema fingerprint"), "{reason}");
    let err = codec::decode::<Proposal>(&bytes).unwrap_err().to_string();
    assert!(err.contains("schemas/proposals.avsc") && err.contains("byte offset 2"), "{err}");
}

#[test]
fn truncated_garbage_and_trailing_bytes_are_refused_with_the_offset() {
    let bytes = codec::encode(&proposal()).unwrap();
    for cut in [bytes.len() - 1, bytes.len() - 40, 12] {
        let (_, at, _) = decode_error(&bytes[..cut]);
        assert!(at >= 10 && at <= cut, "offset {at} for a record cut at {cut}");
    }
    // (Not opening with 0: that is Confluent's framing, refused naming its schema id.)
    let (_, at, reason) = decode_error(b"\x01\x00\x00\x00\x01garbage");
    assert_eq!(at, 0);
    assert!(reason.contains("magic"), "{reason}");
    let (_, _, reason) = decode_error(&[]);
    assert!(reason.contains("magic"), "{reason}");
    let mut longer = bytes.clone();
    longer.push(0);
    let (_, at, reason) = decode_error(&longer);
    assert_eq!(at, bytes.len());
    assert!(reason.contains("trailing"), "{reason}");
}

#[test]
fn a_huge_declared_length_does_not_allocate_or_panic() {
    // Header, then a string length of about 2^62: must fail cleanly, not try to allocate it.
    let mut bytes = Proposal::schema().header.clone();
    bytes.extend_from_slice(&[0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
    let (schema, _, _) = decode_error(&bytes);
    assert_eq!(schema, "io.streamledger.Proposal");
}
