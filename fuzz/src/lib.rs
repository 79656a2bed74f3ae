//! What the fuzz targets run, and the seed corpus they start from.
//!
//! Each topic has one target, `decode_<topic>`, fed in both framings:
//! - the input as it comes: single-object (`C3 01`, fingerprint, datum), Confluent (`00`, schema
//!   id, datum: `decode` must refuse it), or anything else;
//! - when the input is Confluent-framed and its id is in a fixed id → schema table (every
//!   published version of every topic, see [`REGISTRY`]), the header swapped back to single-object
//!   as the Kafka adapter does on consume (`streamledger_kafka::wire::to_single_object`, mirrored
//!   in [`to_single_object`]: the Kafka crate itself builds librdkafka, too costly for CI here),
//!   then decoded, so the datum reaches the current reader or an older version's resolving one.
//!
//! Whatever decodes must re-encode and decode back to an equal value. The policy target parses
//! any UTF-8 text, and what parses must print back to text that parses to an equal policy.

use std::fmt::Debug;
use std::sync::LazyLock;

use streamledger_core::codec::{self, confluent_schema_id, Record, CONFLUENT_HEADER_LEN, SINGLE_OBJECT_MAGIC};
use streamledger_core::policy::{Policy, Principal, Role, SignerRef};
use streamledger_core::schema_history::{self, HISTORY};

/// The fixed registry the Confluent-framed inputs are read against: id `i + 1` is
/// `schema_history::HISTORY[i]` (every published version of every topic), as fingerprints.
pub static REGISTRY: LazyLock<Vec<[u8; 8]>> = LazyLock::new(|| {
    HISTORY
        .iter()
        .map(|v| schema_history::fingerprint(v.text).unwrap_or_else(|e| panic!("schemas/{}: {e}", v.file)))
        .collect()
});

/// The id the fixed registry gives `topic`'s schema version `version`.
pub fn registry_id(topic: &str, version: u32) -> Option<u32> {
    HISTORY.iter().position(|v| v.topic == topic && v.version == version).map(|i| i as u32 + 1)
}

/// A Confluent-framed value back in single-object encoding for the schema with `fingerprint`, as
/// `streamledger_kafka::wire::to_single_object` does.
pub fn to_single_object(value: &[u8], fingerprint: &[u8; 8]) -> Option<Vec<u8>> {
    confluent_schema_id(value)?;
    let mut out = Vec::with_capacity(value.len() - CONFLUENT_HEADER_LEN + 10);
    out.extend_from_slice(&SINGLE_OBJECT_MAGIC);
    out.extend_from_slice(fingerprint);
    out.extend_from_slice(&value[CONFLUENT_HEADER_LEN..]);
    Some(out)
}

/// One `decode_<topic>` run; whether the input decoded (as it came or converted).
pub fn decode_target<T: Record + PartialEq + Debug>(data: &[u8]) -> bool {
    let direct = round_trip::<T>(data);
    if let Some(id) = confluent_schema_id(data) {
        assert!(!direct, "decode accepted a Confluent-framed record (schema id {id}) as it came");
        let fingerprint = id.checked_sub(1).and_then(|i| REGISTRY.get(i as usize));
        if let Some(fingerprint) = fingerprint {
            let single = to_single_object(data, fingerprint).expect("a Confluent-framed value converts");
            return round_trip::<T>(&single);
        }
    }
    direct
}

/// Decodes `bytes`; when that succeeds, checks that the value re-encodes and decodes back equal.
fn round_trip<T: Record + PartialEq + Debug>(bytes: &[u8]) -> bool {
    let Ok(value) = codec::decode::<T>(bytes) else { return false };
    let again = codec::encode(&value).unwrap_or_else(|e| panic!("a decoded {} does not re-encode: {e}", T::TOPIC));
    let back = codec::decode::<T>(&again).unwrap_or_else(|e| panic!("a re-encoded {} does not decode: {e}", T::TOPIC));
    assert_eq!(back, value, "{} does not round-trip", T::TOPIC);
    true
}

/// One `policy_parse` run; whether the input parsed as a policy.
pub fn policy_target(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else { return false };
    if let Ok(principal) = text.parse::<Principal>() {
        let printed = principal.to_string();
        assert_eq!(printed.parse::<Principal>().ok(), Some(principal), "principal {text:?} printed as {printed:?}");
    }
    let Ok(policy) = Policy::parse(text) else { return false };
    let printed = policy.to_string();
    let again = Policy::parse(&printed).unwrap_or_else(|e| panic!("{text:?} parsed, but its printed form {printed:?} does not: {e}"));
    assert_eq!(again, policy, "{text:?} printed as {printed:?} parses to another policy");
    // Evaluation over a few signers, a repeated key among them.
    let signers = [
        SignerRef { org: "Org1", role: Role::Peer, id: b"k1" },
        SignerRef { org: "Org2", role: Role::Member, id: b"k2" },
        SignerRef { org: "Org1", role: Role::Peer, id: b"k1" },
        SignerRef { org: "Org3", role: Role::Admin, id: b"k3" },
    ];
    for n in 0..=signers.len() {
        let _ = policy.evaluate(&signers[..n]);
    }
    let _ = policy.orgs();
    true
}

#[cfg(test)]
mod seeds;
