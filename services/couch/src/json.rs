//! Values as CouchDB documents, byte for byte.
//!
//! A value that is a JSON object becomes the document's fields, so that Mango queries see it, as
//! in Fabric. Reading it back must give the exact bytes that were written: endorsers on a CouchDB
//! peer and on an embedded peer simulate on these bytes and must produce the same read-write set.
//! `serde_json::Value` sorts object keys and CouchDB servers rewrite numbers (pouchdb-server
//! prints `1.0` as `1` and large integers in floating point), so the store keeps the fields in
//! order ([`Json`]) and stores a value as fields alone only when re-serializing those fields, as
//! any server will give them back, yields the same bytes ([`encode_value`]). Any other value also
//! gets its exact bytes, base64, in [`VALUE_FIELD`], which decoding prefers.

use std::fmt;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use streamledger_core::model::Version;
use streamledger_core::write_rules::{reserved_field, VALUE_FIELD, VERSION_FIELD};

/// A JSON value whose objects keep their fields in order (and any duplicates), unlike
/// `serde_json::Value`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Json {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl Json {
    pub(crate) fn str(s: impl Into<String>) -> Json {
        Json::String(s.into())
    }

    pub(crate) fn field<'a>(&'a self, name: &str) -> Option<&'a Json> {
        match self {
            Json::Object(fields) => fields.iter().find(|(k, _)| k == name).map(|(_, v)| v),
            _ => None,
        }
    }

    pub(crate) fn as_str(&self) -> Option<&str> {
        match self {
            Json::String(s) => Some(s),
            _ => None,
        }
    }
}

impl From<&serde_json::Value> for Json {
    fn from(v: &serde_json::Value) -> Json {
        match v {
            serde_json::Value::Null => Json::Null,
            serde_json::Value::Bool(b) => Json::Bool(*b),
            serde_json::Value::Number(n) => Json::Number(n.clone()),
            serde_json::Value::String(s) => Json::String(s.clone()),
            serde_json::Value::Array(a) => Json::Array(a.iter().map(Json::from).collect()),
            serde_json::Value::Object(o) => Json::Object(o.iter().map(|(k, v)| (k.clone(), Json::from(v))).collect()),
        }
    }
}

impl Serialize for Json {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Json::Null => s.serialize_unit(),
            Json::Bool(b) => s.serialize_bool(*b),
            Json::Number(n) => n.serialize(s),
            Json::String(v) => s.serialize_str(v),
            Json::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Json::Object(fields) => {
                let mut map = s.serialize_map(Some(fields.len()))?;
                for (k, v) in fields {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Json, D::Error> {
        struct JsonVisitor;

        impl<'de> Visitor<'de> for JsonVisitor {
            type Value = Json;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E>(self, v: bool) -> Result<Json, E> {
                Ok(Json::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Json, E> {
                Ok(Json::Number(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Json, E> {
                Ok(Json::Number(v.into()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Json, E> {
                serde_json::Number::from_f64(v).map(Json::Number).ok_or_else(|| E::custom("a non-finite number"))
            }
            fn visit_str<E>(self, v: &str) -> Result<Json, E> {
                Ok(Json::String(v.to_string()))
            }
            fn visit_string<E>(self, v: String) -> Result<Json, E> {
                Ok(Json::String(v))
            }
            fn visit_unit<E>(self) -> Result<Json, E> {
                Ok(Json::Null)
            }
            fn visit_none<E>(self) -> Result<Json, E> {
                Ok(Json::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Json, D::Error> {
                Json::deserialize(d)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Json::Array(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
                let mut fields = Vec::new();
                while let Some(entry) = map.next_entry::<String, Json>()? {
                    fields.push(entry);
                }
                Ok(Json::Object(fields))
            }
        }

        d.deserialize_any(JsonVisitor)
    }
}

/// How a value is kept in its document: fields (for Mango), and the exact bytes when the fields
/// alone would not give them back.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EncodedValue {
    pub fields: Vec<(String, Json)>,
    /// Base64 of the value, for [`VALUE_FIELD`].
    pub bytes: Option<String>,
}

/// The largest integer every CouchDB-API server gives back unchanged (JavaScript's
/// `Number.MAX_SAFE_INTEGER`: pouchdb-server keeps numbers as doubles).
const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// Does `j` come back from any CouchDB-API server as it went in, field order included? Numbers
/// must be safe integers; object keys must not be all digits (JavaScript objects list such keys
/// first, in numeric order) nor repeated.
fn portable(j: &Json) -> bool {
    match j {
        Json::Null | Json::Bool(_) | Json::String(_) => true,
        Json::Number(n) => n.as_u64().map_or_else(|| n.as_i64().is_some_and(|i| i.unsigned_abs() <= MAX_SAFE_INTEGER), |u| u <= MAX_SAFE_INTEGER),
        Json::Array(items) => items.iter().all(portable),
        Json::Object(fields) => fields.iter().enumerate().all(|(i, (k, v))| {
            let digits = !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit());
            !digits && !fields[..i].iter().any(|(other, _)| other == k) && portable(v)
        }),
    }
}

/// Splits a value into document fields and, where needed, its exact bytes. See the module docs.
pub(crate) fn encode_value(value: &[u8]) -> EncodedValue {
    let bytes = || Some(BASE64.encode(value));
    let Ok(parsed) = serde_json::from_slice::<Json>(value) else {
        return EncodedValue { fields: Vec::new(), bytes: bytes() };
    };
    let Json::Object(fields) = &parsed else {
        return EncodedValue { fields: Vec::new(), bytes: bytes() };
    };
    // A reserved field cannot be a document field (the validator refuses such values with
    // CouchDbRules; this keeps the store correct without them).
    if fields.iter().any(|(k, _)| reserved_field(k)) {
        return EncodedValue { fields: Vec::new(), bytes: bytes() };
    }
    let exact = portable(&parsed) && serde_json::to_vec(&parsed).is_ok_and(|again| again == value);
    let Json::Object(fields) = parsed else { unreachable!("matched as an object above") };
    if exact {
        return EncodedValue { fields, bytes: None };
    }
    // Still queryable by its fields (the last of repeated keys wins, as in most JSON readers),
    // but read back from the bytes.
    let mut unique: Vec<(String, Json)> = Vec::with_capacity(fields.len());
    for (k, v) in fields {
        match unique.iter_mut().find(|(other, _)| *other == k) {
            Some(slot) => slot.1 = v,
            None => unique.push((k, v)),
        }
    }
    EncodedValue { fields: unique, bytes: bytes() }
}

/// The value a document holds: its [`VALUE_FIELD`] bytes if it has them, else its non-reserved
/// fields, in order.
pub(crate) fn decode_value(doc: &Json) -> Result<Vec<u8>, String> {
    let Json::Object(fields) = doc else { return Err("the document is not a JSON object".into()) };
    if let Some((_, encoded)) = fields.iter().find(|(k, _)| k == VALUE_FIELD) {
        let encoded = encoded.as_str().ok_or_else(|| format!("its {VALUE_FIELD} field is not a string"))?;
        return BASE64.decode(encoded).map_err(|e| format!("its {VALUE_FIELD} field is not base64: {e}"));
    }
    let value = Json::Object(fields.iter().filter(|(k, _)| !reserved_field(k)).cloned().collect());
    serde_json::to_vec(&value).map_err(|e| e.to_string())
}

/// A version as the [`VERSION_FIELD`] holds it: `"block:tx"` (Fabric 1.x wrote `~version` so).
pub(crate) fn version_text(v: Version) -> String {
    format!("{}:{}", v.block, v.tx)
}

pub(crate) fn parse_version(doc: &Json) -> Result<Version, String> {
    let text = doc.field(VERSION_FIELD).and_then(Json::as_str).ok_or_else(|| format!("it has no {VERSION_FIELD} field"))?;
    let parsed = text.split_once(':').and_then(|(b, t)| Some(Version::new(b.parse().ok()?, t.parse().ok()?)));
    parsed.ok_or_else(|| format!("its {VERSION_FIELD} field {text:?} is not \"block:tx\""))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// What a server that keeps field order (CouchDB) gives back for a stored document: the
    /// stored fields after `_id` and `_rev`.
    fn stored(value: &[u8]) -> Json {
        let e = encode_value(value);
        let mut doc = vec![("_id".to_string(), Json::str("k")), ("_rev".to_string(), Json::str("1-a"))];
        doc.push((VERSION_FIELD.to_string(), Json::str("1:0")));
        if let Some(b) = e.bytes {
            doc.push((VALUE_FIELD.to_string(), Json::String(b)));
        }
        doc.extend(e.fields);
        // Through text, as over HTTP.
        serde_json::from_slice(&serde_json::to_vec(&Json::Object(doc)).unwrap()).unwrap()
    }

    #[test]
    fn compact_json_objects_are_fields_only() {
        for v in [
            r#"{"balance":100,"owner":{"org":"Org1MSP","public_key":"ab"}}"#,
            r#"{"z":1,"a":[1,-2,{"y":null,"b":true}],"m":"é\u0000\"\\"}"#,
            r#"{}"#,
            r#"{"":9007199254740991,"n":-9007199254740991}"#,
        ] {
            let e = encode_value(v.as_bytes());
            assert_eq!(e.bytes, None, "{v}");
            assert_eq!(decode_value(&stored(v.as_bytes())).unwrap(), v.as_bytes());
        }
    }

    #[test]
    fn other_values_keep_their_bytes() {
        for v in [
            &br#"{"a": 1}"#[..],               // spacing
            br#"{"b":1,"1":2}"#,               // a key JavaScript would move first
            br#"{"f":1.0}"#,                   // pouchdb-server gives back 1
            br#"{"big":9007199254740993}"#,    // beyond a double's integers
            br#"{"a":1,"a":2}"#,               // a repeated key
            br#"{"s":"\u00e9"}"#,              // an escape serde_json would not write
            br#"{"_id":"x"}"#,                 // a reserved field: bytes only
            br#"[1,2]"#,
            b"42",
            b"plain text",
            &[0xff, 0xfe, 0],
            b"",
        ] {
            let e = encode_value(v);
            assert!(e.bytes.is_some(), "{}", String::from_utf8_lossy(v));
            assert_eq!(decode_value(&stored(v)).unwrap(), v);
        }
        // Non-exact objects stay queryable by their fields.
        let e = encode_value(br#"{"a": 1, "a": 2, "b": {"c": 1.5}}"#);
        assert_eq!(e.fields.len(), 2);
        assert_eq!(e.fields[0], ("a".to_string(), Json::Number(2.into())));
        assert!(encode_value(br#"{"_id":"x","a":1}"#).fields.is_empty());
    }

    #[test]
    fn server_field_order_of_reserved_fields_does_not_matter() {
        // pouchdb-server lists `_id` and `_rev` last.
        let doc: Json = serde_json::from_str(r#"{"balance":5,"~version":"3:1","_id":"k","_rev":"2-x"}"#).unwrap();
        assert_eq!(decode_value(&doc).unwrap(), br#"{"balance":5}"#);
        assert_eq!(parse_version(&doc).unwrap(), Version::new(3, 1));
    }

    #[test]
    fn versions_round_trip_and_bad_ones_are_named() {
        let doc = Json::Object(vec![(VERSION_FIELD.into(), Json::str(version_text(Version::new(12, 7))))]);
        assert_eq!(parse_version(&doc).unwrap(), Version::new(12, 7));
        for bad in [r#"{}"#, r#"{"~version":"12"}"#, r#"{"~version":"a:b"}"#, r#"{"~version":3}"#] {
            let doc: Json = serde_json::from_str(bad).unwrap();
            assert!(parse_version(&doc).unwrap_err().contains("~version"), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn any_bytes_round_trip(value in prop::collection::vec(any::<u8>(), 0..64)) {
            prop_assert_eq!(decode_value(&stored(&value)).unwrap(), value);
        }

        #[test]
        fn any_json_round_trips(v in json_value()) {
            let bytes = serde_json::to_vec(&v).unwrap();
            prop_assert_eq!(decode_value(&stored(&bytes)).unwrap(), bytes.clone());
            let pretty = serde_json::to_vec_pretty(&v).unwrap();
            prop_assert_eq!(decode_value(&stored(&pretty)).unwrap(), pretty);
        }
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            (-1e6f64..1e6).prop_map(serde_json::Value::from),
            "[a-z_~0-9é]{0,4}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                prop::collection::btree_map("[a-z_~0-9]{0,3}", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }
}
