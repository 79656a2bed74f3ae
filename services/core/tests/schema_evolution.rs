//! Schema history and evolution: every published version of a topic's schema is kept under
//! `schemas/history/` and pinned in `schemas/PUBLISHED.toml`, the current schemas can read every
//! one of them (BACKWARD_TRANSITIVE, because a ledger is replayed from offset 0 by new readers),
//! and records written with an older version decode with today's types.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use apache_avro::schema_compatibility::{Compatibility, SchemaCompatibility};
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::Schema;
use streamledger_core::codec::{self, all_schemas, CodecError, Record};
use streamledger_core::endorsement::{endorse, verify_endorsement};
use streamledger_core::fixtures::Fixture;
use streamledger_core::model::{DeadLetter, EndorsementResult, Rejection, Response, RwSet};
use streamledger_core::schema_history::{self, by_fingerprint, fingerprint, HISTORY};

fn schemas_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas")
}

/// `schemas/PUBLISHED.toml`: topic → version → fingerprint (hex).
fn published() -> BTreeMap<String, BTreeMap<String, String>> {
    let path = schemas_dir().join("PUBLISHED.toml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn topic_of(file: &str) -> &str {
    file.trim_end_matches(".avsc")
}

/// The guard that keeps a schema from changing silently: the current schema's fingerprint must be
/// listed as the newest published version, and that version must be kept in history.
#[test]
fn every_current_schema_is_a_published_version() {
    let published = published();
    let mut problems = Vec::new();
    for rs in all_schemas() {
        let topic = topic_of(rs.file);
        let fp = hex::encode(rs.fingerprint());
        let versions = published.get(topic).cloned().unwrap_or_default();
        let newest = versions.keys().filter_map(|v| v.strip_prefix('v')?.parse::<u32>().ok()).max().unwrap_or(0);
        let listed_as = versions.iter().find(|(_, f)| **f == fp).map(|(v, _)| v.clone());
        match listed_as {
            Some(v) if v == format!("v{newest}") => {
                if !schemas_dir().join(format!("history/{topic}/{v}.avsc")).exists() {
                    problems.push(format!("schemas/{} is {v}, but schemas/history/{topic}/{v}.avsc is missing: copy it there", rs.file));
                }
            }
            Some(v) => problems.push(format!(
                "schemas/{} has the fingerprint of {v}, but v{newest} is newer: a published version cannot be taken back; \
                 make the change a new version instead",
                rs.file
            )),
            None if newest == 0 => problems.push(format!(
                "schemas/{file} is a new topic's schema with no published version: copy it to \
                 schemas/history/{topic}/v1.avsc and add `[{topic}]` with `v1 = \"{fp}\"` to schemas/PUBLISHED.toml",
                file = rs.file
            )),
            None => {
                let next = newest + 1;
                problems.push(format!(
                    "schemas/{file} changed (fingerprint {fp} is not in schemas/PUBLISHED.toml). Published schemas are \
                     never changed in place: v{newest} stays under schemas/history/{topic}/, the change must be \
                     backward compatible (new fields need a default), then copy schemas/{file} to schemas/history/{topic}/v{next}.avsc and add `v{next} = \"{fp}\"` under \
                     [{topic}] in schemas/PUBLISHED.toml",
                    file = rs.file
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_history_file_has_its_published_fingerprint() {
    let published = published();
    let mut seen = 0;
    for v in HISTORY {
        let fp = fingerprint(v.text).unwrap_or_else(|e| panic!("schemas/{} is not a valid Avro schema: {e}", v.file));
        let listed = published.get(v.topic).and_then(|m| m.get(&format!("v{}", v.version)));
        assert_eq!(
            listed.map(String::as_str),
            Some(hex::encode(fp).as_str()),
            "schemas/{} was edited, or is not listed in schemas/PUBLISHED.toml: history files are never changed",
            v.file
        );
        seen += 1;
    }
    // And the other way round: nothing listed without its file.
    let listed: usize = published.values().map(BTreeMap::len).sum();
    assert_eq!(listed, seen, "schemas/PUBLISHED.toml lists versions that have no file under schemas/history/");
    // Every file on disk is compiled in (build.rs scans the directory).
    let on_disk = walk(&schemas_dir().join("history"));
    assert_eq!(on_disk, HISTORY.len(), "history files on disk and compiled in differ: rebuild");
}

fn walk(dir: &Path) -> usize {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).map(|p| if p.is_dir() { walk(&p) } else { 1 }).sum()
}

#[test]
fn current_schemas_are_backward_transitive_compatible_with_their_history() {
    let mut checked = Vec::new();
    for rs in all_schemas() {
        for v in schema_history::versions(topic_of(rs.file)) {
            let writer = Schema::parse_str(v.text).unwrap();
            let got = SchemaCompatibility::can_read(&writer, rs.schema);
            assert!(
                matches!(got, Ok(Compatibility::Full)),
                "schemas/{} cannot read records written with schemas/{}: {got:?}",
                rs.file,
                v.file
            );
            checked.push(v.file);
        }
    }
    assert!(checked.contains(&"history/dead-letters/v1.avsc"), "an evolved schema must be among those checked: {checked:?}");
}

/// The check can fail: dead-letters v1 with a field added without a default, or with a field's
/// type changed, cannot read v1 records.
#[test]
fn an_incompatible_change_is_reported_incompatible() {
    let v1 = schema_history::versions("dead-letters").find(|v| v.version == 1).expect("dead-letters v1");
    let writer = Schema::parse_str(v1.text).unwrap();
    let no_default = v1.text.replacen(r#""fields": ["#, r#""fields": [{"name": "added", "type": "string"},"#, 1);
    let changed_type = v1.text.replacen(r#""name": "partition",
            "type": "int""#, r#""name": "partition",
            "type": "string""#, 1);
    assert_ne!(changed_type, v1.text, "the variant must differ from v1");
    for (what, text) in [("a new field without a default", no_default), ("a changed type", changed_type)] {
        let reader = Schema::parse_str(&text).unwrap_or_else(|e| panic!("{what}: {e}"));
        let got = SchemaCompatibility::can_read(&writer, &reader);
        assert!(got.is_err(), "{what} was judged compatible: {got:?}");
    }
}

fn letter_v1_fields() -> Vec<(String, Value)> {
    vec![
        ("source_topic".into(), Value::String("mychannel.proposals".into())),
        ("partition".into(), Value::Int(3)),
        ("offset".into(), Value::Long(42)),
        ("key".into(), Value::Union(1, Box::new(Value::Bytes(b"k".to_vec())))),
        ("payload".into(), Value::Bytes(vec![0xde, 0xad])),
        ("stage".into(), Value::String("endorser".into())),
        ("reason".into(), Value::String("cannot decode".into())),
    ]
}

/// A dead letter as a v1 writer put it on the topic: v1's single-object header, then the datum.
fn written_with_v1() -> Vec<u8> {
    let v1 = schema_history::versions("dead-letters").find(|v| v.version == 1).expect("dead-letters v1");
    let schema = Schema::parse_str(v1.text).unwrap();
    let mut bytes = codec::SINGLE_OBJECT_MAGIC.to_vec();
    bytes.extend_from_slice(&fingerprint(v1.text).unwrap());
    let writer = GenericDatumWriter::builder(&schema).build().unwrap();
    bytes.extend(writer.write_value_to_vec(Value::Record(letter_v1_fields())).unwrap());
    bytes
}

#[test]
fn a_record_written_with_a_history_version_decodes_with_the_current_type() {
    let bytes = written_with_v1();
    assert_ne!(&bytes[2..10], &DeadLetter::schema().fingerprint(), "v1 and the current schema must differ for this test");
    let letter: DeadLetter = codec::decode(&bytes).expect("a v1 dead letter decodes");
    assert_eq!(
        letter,
        DeadLetter {
            source_topic: "mychannel.proposals".into(),
            partition: 3,
            offset: 42,
            key: Some(b"k".to_vec()),
            payload: vec![0xde, 0xad],
            stage: "endorser".into(),
            reason: "cannot decode".into(),
            instance: None,
        }
    );
    // Re-encoding writes the current version, with the new field.
    let again = codec::encode(&DeadLetter { instance: Some("Org1".into()), ..letter.clone() }).unwrap();
    assert_eq!(&again[2..10], &DeadLetter::schema().fingerprint());
    assert_eq!(codec::decode::<DeadLetter>(&again).unwrap().instance.as_deref(), Some("Org1"));
}

/// A rejection from a v1 gateway names no partition: it reads as -1, which the endorsers take as
/// "the offset in any partition", what v1 meant.
#[test]
fn a_v1_rejection_reads_with_an_unknown_partition() {
    let v1 = schema_history::versions("rejections").find(|v| v.version == 1).expect("rejections v1");
    let schema = Schema::parse_str(v1.text).unwrap();
    let mut bytes = codec::SINGLE_OBJECT_MAGIC.to_vec();
    bytes.extend_from_slice(&fingerprint(v1.text).unwrap());
    let fields = vec![
        ("tx_id".to_string(), Value::String("t1".into())),
        ("stage".to_string(), Value::String("gateway".into())),
        ("reason".to_string(), Value::String("gateway overloaded".into())),
        ("source_offset".to_string(), Value::Long(42)),
    ];
    bytes.extend(GenericDatumWriter::builder(&schema).build().unwrap().write_value_to_vec(Value::Record(fields)).unwrap());
    assert_ne!(&bytes[2..10], &Rejection::schema().fingerprint(), "v1 and the current schema must differ for this test");
    let r: Rejection = codec::decode(&bytes).expect("a v1 rejection decodes");
    assert_eq!((r.tx_id.as_str(), r.source_offset, r.source_partition), ("t1", 42, -1));
}

/// An endorsement result from a v1 endorser names no proposal record: it reads as -1 for both,
/// which the gateway takes as "names none" (and keeps the v1 behaviour for it). Its signature,
/// which never covered the record, still verifies.
#[test]
fn a_v1_endorsement_result_reads_naming_no_proposal_record() {
    let f = Fixture::new();
    let p = f.proposal("kv", "put", &["k", "v"]);
    let current = endorse(&f.peers[0], &p, Response::ok(b"done".to_vec()), RwSet::default()).answering((3, 42));
    // The same result as a v1 endorser wrote it: every field but the two v2 added.
    let Value::Record(mut fields) = apache_avro::to_value(&current).unwrap() else { panic!("a result is a record") };
    fields.retain(|(name, _)| name != "proposal_partition" && name != "proposal_offset");
    assert_eq!(fields.len(), 6, "v1 has six fields");
    let v1 = schema_history::versions("endorsement-results").find(|v| v.version == 1).expect("endorsement-results v1");
    let schema = Schema::parse_str(v1.text).unwrap();
    let mut bytes = codec::SINGLE_OBJECT_MAGIC.to_vec();
    bytes.extend_from_slice(&fingerprint(v1.text).unwrap());
    bytes.extend(GenericDatumWriter::builder(&schema).build().unwrap().write_value_to_vec(Value::Record(fields)).unwrap());
    assert_ne!(&bytes[2..10], &EndorsementResult::schema().fingerprint(), "v1 and the current schema must differ for this test");
    let r: EndorsementResult = codec::decode(&bytes).expect("a v1 endorsement result decodes");
    assert_eq!((r.proposal_partition, r.proposal_offset, r.proposal_record()), (-1, -1, None));
    assert_eq!(r, EndorsementResult { proposal_partition: -1, proposal_offset: -1, ..current.clone() });
    assert!(verify_endorsement(&p, &r), "the signature does not cover the record");
    // Written with the current version, the record is kept.
    let again: EndorsementResult = codec::decode(&codec::encode(&current).unwrap()).unwrap();
    assert_eq!(again.proposal_record(), Some((3, 42)));
}

#[test]
fn a_corrupt_history_record_names_the_version_and_the_offset() {
    let mut bytes = written_with_v1();
    let full = bytes.len();
    bytes.truncate(full - 3);
    let err = codec::decode::<DeadLetter>(&bytes).unwrap_err();
    let CodecError::Decode { at_byte, reason, .. } = &err else { panic!("{err:?}") };
    assert!(reason.contains("history/dead-letters/v1.avsc"), "{err}");
    assert!(*at_byte > 10 && *at_byte <= full, "{err}");
    let mut longer = written_with_v1();
    longer.push(0);
    let err = codec::decode::<DeadLetter>(&longer).unwrap_err().to_string();
    assert!(err.contains("trailing") && err.contains(&format!("byte offset {full}")), "{err}");
}

#[test]
fn fingerprints_map_to_known_versions() {
    let v1 = fingerprint(schema_history::versions("dead-letters").next().unwrap().text).unwrap();
    let known = by_fingerprint(&v1).expect("v1 is known");
    assert_eq!((known.topic, known.version, known.current), ("dead-letters", 1, false));
    let current = by_fingerprint(&DeadLetter::schema().fingerprint()).expect("the current version is known");
    assert_eq!((current.topic, current.current), ("dead-letters", true));
    assert!(current.version >= 2, "{current:?}");
    assert!(by_fingerprint(&[0; 8]).is_none());
    // (A topic with no history yet is reported by every_current_schema_is_a_published_version.)
    for rs in all_schemas().into_iter().filter(|rs| schema_history::versions(topic_of(rs.file)).next().is_some()) {
        let k = by_fingerprint(&rs.fingerprint()).unwrap_or_else(|| panic!("schemas/{} is not in history", rs.file));
        assert!(k.current && k.topic == topic_of(rs.file), "{k:?}");
    }
}

#[test]
fn a_confluent_framed_record_is_refused_naming_the_schema_id_and_the_registry() {
    let single = codec::encode(&DeadLetter {
        source_topic: "t".into(),
        partition: 0,
        offset: 0,
        key: None,
        payload: vec![],
        stage: "s".into(),
        reason: "r".into(),
        instance: None,
    })
    .unwrap();
    let mut confluent = vec![codec::CONFLUENT_MAGIC];
    confluent.extend_from_slice(&4242u32.to_be_bytes());
    confluent.extend_from_slice(&single[10..]);
    assert_eq!(codec::confluent_schema_id(&confluent), Some(4242));
    assert_eq!(codec::confluent_schema_id(&single), None);
    assert_eq!(codec::confluent_schema_id(&[0, 1, 2]), None, "too short for an id");
    let err = codec::decode::<DeadLetter>(&confluent).unwrap_err().to_string();
    assert!(err.contains("schema id 4242") && err.contains("schema registry URL") && err.contains("byte offset 0"), "{err}");
}
