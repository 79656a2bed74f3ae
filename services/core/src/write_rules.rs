//! [`CouchDbRules`]: the writes a CouchDB state store cannot hold, refused at validation.
//!
//! The CouchDB store (`streamledger-couch`) keeps each key as a document id and a JSON object
//! value as the document's fields, as Hyperledger Fabric does. CouchDB refuses some of those:
//! ids starting with `_` (reserved for `_design/` and `_local/` documents) or empty, top-level
//! fields starting with `_` (`_id`, `_rev`, `_deleted`, `_attachments`, ...), and documents over
//! its `max_document_size`. The store also reserves two fields of its own, [`VERSION_FIELD`] (the
//! version, Fabric's `~version`) and [`VALUE_FIELD`] (the exact value bytes when the fields alone
//! would not give them back).
//!
//! Refusing such a write at commit would make peers on CouchDB fail where peers on the embedded
//! store succeed. Refusing it here, as INVALID_WRITESET, gives every peer the same verdict
//! whichever store it uses, which is why every validator applies these rules (Fabric does the same
//! in `statecouchdb.ValidateKeyValue`, but only on CouchDB peers).

use std::collections::HashMap;

use serde::de::IgnoredAny;

use crate::model::KvWrite;
use crate::validation::WriteRules;

/// The document field that holds a value's version `(block, tx)`, as `"block:tx"`.
pub const VERSION_FIELD: &str = "~version";
/// The document field that holds a value's exact bytes, base64: values that are not JSON objects,
/// and JSON objects whose fields would not give back the same bytes (spacing, key order).
pub const VALUE_FIELD: &str = "~value";

/// The largest value accepted, in bytes. CouchDB 3 refuses documents over `max_document_size`
/// (8,000,000 bytes by default); the store's largest encoding of a value is its fields plus a
/// base64 copy, about 2.34 times its size, so 3,000,000 bytes keep every document under the limit.
pub const MAX_VALUE_BYTES: usize = 3_000_000;

/// The first character of a key the store cannot hold: U+10FFFF, a Unicode noncharacter, is the
/// upper bound of unbounded range reads (pouchdb-server ends an `_all_docs` scan without an end
/// key at U+FFFF, so the store always sends one).
pub const RANGE_END: char = '\u{10FFFF}';

/// Refuses the writes the CouchDB state store cannot hold. See the module docs.
#[derive(Debug, Clone, Copy, Default)]
pub struct CouchDbRules;

impl WriteRules for CouchDbRules {
    fn check(&self, write: &KvWrite) -> Result<(), String> {
        check_key(&write.key).map_err(|reason| format!("namespace {:?}: {reason}", write.namespace))?;
        match &write.value {
            Some(value) => check_value(&write.key, value).map_err(|reason| format!("namespace {:?}: {reason}", write.namespace)),
            // A delete needs only a valid id.
            None => Ok(()),
        }
    }
}

/// Is `key` usable as a CouchDB document id by the store?
pub fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("the empty key cannot be a CouchDB document id".into());
    }
    if key.starts_with('_') {
        return Err(format!("key {key:?} starts with '_', which CouchDB reserves for its own documents"));
    }
    if key.starts_with(RANGE_END) {
        return Err(format!("key {key:?} starts with U+10FFFF, the store's upper bound of key ranges"));
    }
    Ok(())
}

/// Is `name` a top-level field the store or CouchDB reserves?
pub fn reserved_field(name: &str) -> bool {
    name.starts_with('_') || name == VERSION_FIELD || name == VALUE_FIELD
}

/// Can the value written to `key` be stored? Values that are not JSON objects are stored as bytes
/// and only their size matters; a JSON object must not carry a reserved top-level field.
pub fn check_value(key: &str, value: &[u8]) -> Result<(), String> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(format!(
            "the value of key {key:?} is {} bytes; the CouchDB state store takes at most {MAX_VALUE_BYTES}",
            value.len()
        ));
    }
    // Only an object's top-level fields become document fields; nested `_` fields are fine.
    // The verdict is that of parsing the value as a JSON object (`serde_json::Value`s): a value
    // that does not parse so is stored as bytes. Most values have no reserved field, so the top
    // level is read first without building the nested values (the validator checks every write
    // of every block), and only a value that seems to have one is parsed in full to decide.
    // Skipping values parses at least what a full parse does, with the same keys, so the verdicts
    // are those of the full parse alone.
    let Ok(fields) = serde_json::from_slice::<HashMap<String, IgnoredAny>>(value) else { return Ok(()) };
    if !fields.keys().any(|name| reserved_field(name)) {
        return Ok(());
    }
    if let Ok(fields) = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(value) {
        if let Some(name) = fields.keys().find(|name| reserved_field(name)) {
            return Err(format!("the JSON value of key {key:?} has the field {name:?}, which the CouchDB state store reserves"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(key: &str, value: Option<&[u8]>) -> KvWrite {
        KvWrite { namespace: "transfer".into(), key: key.into(), value: value.map(<[u8]>::to_vec) }
    }

    fn refused(key: &str, value: Option<&[u8]>) -> String {
        CouchDbRules.check(&write(key, value)).expect_err("refused")
    }

    #[test]
    fn keys_couchdb_cannot_hold_are_refused_with_the_key_named() {
        assert!(refused("", Some(b"1")).contains("empty key"));
        for key in ["_id", "_design/x", "_local/x", "_"] {
            let reason = refused(key, Some(b"1"));
            assert!(reason.contains(&format!("{key:?}")) && reason.contains("transfer"), "{reason}");
        }
        // Deletes too: the id is what CouchDB refuses.
        assert!(refused("_x", None).contains("\"_x\""));
        assert!(refused("\u{10FFFF}", None).contains("U+10FFFF"));
        assert!(refused("\u{10FFFF}abc", Some(b"1")).contains("U+10FFFF"));
    }

    #[test]
    fn ordinary_keys_pass() {
        for key in ["a", "a_b", "x\u{0}y", "é", "😀", "a\u{10FFFF}", "~version", "design/_x", " "] {
            assert_eq!(CouchDbRules.check(&write(key, Some(b"v"))), Ok(()), "{key:?}");
            assert_eq!(CouchDbRules.check(&write(key, None)), Ok(()), "{key:?}");
        }
    }

    #[test]
    fn json_objects_with_reserved_fields_are_refused() {
        for field in ["_id", "_rev", "_deleted", "_attachments", "_conflicts", "_anything", "~version", "~value"] {
            let value = format!(r#"{{"balance": 1, "{field}": 2}}"#);
            let reason = refused("acct", Some(value.as_bytes()));
            assert!(reason.contains(&format!("{field:?}")) && reason.contains("\"acct\""), "{reason}");
        }
        // Leading whitespace is still a JSON object.
        assert!(refused("k", Some(b"  {\"_id\": \"other\"}")).contains("_id"));
    }

    #[test]
    fn other_values_pass() {
        let ok: &[&[u8]] = &[
            br#"{"balance":100,"owner":{"org":"Org1MSP"}}"#,
            // Nested reserved names are plain data to CouchDB.
            br#"{"a":{"_id":1,"~version":2}}"#,
            // Not objects: stored as bytes, whatever they hold.
            br#"["_id"]"#,
            br#""_id""#,
            b"_id",
            br#"{"_id": 1"#,
            &[0xff, 0x00, b'{'],
            b"",
            // Fields that only look reserved.
            br#"{"id":1,"rev":2,"~other":3,"version":4}"#,
        ];
        for value in ok {
            assert_eq!(CouchDbRules.check(&write("k", Some(value))), Ok(()), "{:?}", String::from_utf8_lossy(value));
        }
    }

    /// The verdict by the full parse alone, as `check_value` decided before it read the top level
    /// first: verdicts are consensus, so a replay of old blocks must get the same ones.
    fn full_parse_verdict(value: &[u8]) -> bool {
        serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(value).map_or(true, |f| !f.keys().any(|n| reserved_field(n)))
    }

    #[test]
    fn a_value_the_full_parse_refuses_is_stored_as_bytes_even_with_a_reserved_field() {
        // A number past f64 and a lone surrogate: skipping values accepts them, a full parse not.
        for value in [br#"{"_id": 1, "x": 1e400}"#.as_slice(), br#"{"_id": 1, "x": "\ud800"}"#] {
            assert!(full_parse_verdict(value), "{}", String::from_utf8_lossy(value));
            assert_eq!(CouchDbRules.check(&write("k", Some(value))), Ok(()), "{}", String::from_utf8_lossy(value));
        }
    }

    proptest::proptest! {
        #[test]
        fn verdicts_are_those_of_the_full_parse(tokens in proptest::collection::vec(proptest::sample::select(vec![
            "{", "}", "[", "]", ",", ":", " ", "\"_id\"", "\"~value\"", "\"a\"", "\"_x\"", "1", "-0.5e3", "1e400",
            "\"\\ud800\"", "\"\\u00e9\"", "true", "null", "\"", "\\",
        ]), 0..14)) {
            let value = tokens.concat();
            let accepted = check_value("k", value.as_bytes()).is_ok();
            proptest::prop_assert_eq!(accepted, full_parse_verdict(value.as_bytes()), "{}", value);
        }
    }

    #[test]
    fn values_over_the_size_limit_are_refused() {
        let big = vec![b'x'; MAX_VALUE_BYTES];
        assert_eq!(CouchDbRules.check(&write("k", Some(&big))), Ok(()));
        let bigger = vec![b'x'; MAX_VALUE_BYTES + 1];
        assert!(refused("k", Some(&bigger)).contains("at most"));
    }
}
