//! Avro encoding of every topic value, against the schema files in `schemas/`.
//!
//! The default framing is Avro single-object encoding (`C3 01`, then the 8-byte little-endian
//! CRC-64-AVRO fingerprint of the writer schema's canonical form, then the datum), so a record
//! names its own schema without a registry. Serialisation goes straight from serde to bytes with
//! apache-avro's schema-aware serializer: no intermediate `Value` tree.

use std::io::Read;
use std::sync::LazyLock;

use apache_avro::headers::{HeaderBuilder, RabinFingerprintHeader};
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::Schema;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::model::*;

/// The two magic bytes that open an Avro single-object encoded record.
pub const SINGLE_OBJECT_MAGIC: [u8; 2] = [0xC3, 0x01];
const SINGLE_OBJECT_HEADER_LEN: usize = 10;

/// A parsed schema file and what framing needs from it.
pub struct RecordSchema {
    /// The file under `schemas/` it was read from.
    pub file: &'static str,
    /// The record's full name, e.g. `io.streamledger.Proposal`.
    pub full_name: String,
    pub schema: &'static Schema,
    /// The single-object header: magic and fingerprint.
    pub header: Vec<u8>,
    /// The schema file's text, as registered with a schema registry.
    pub text: &'static str,
    /// Readers for records written with earlier published versions (see [`crate::schema_history`]).
    older: Vec<crate::schema_history::OlderWriter>,
    // Built once: resolving a schema's names is far costlier than encoding a small record.
    writer: GenericDatumWriter<'static>,
    reader: GenericDatumReader<'static>,
}

impl RecordSchema {
    fn parse(file: &'static str, text: &'static str) -> Self {
        // The schema files are compiled in; a parse failure is a build defect caught by the tests.
        let schema = Schema::parse_str(text)
            .unwrap_or_else(|e| panic!("schemas/{file} is not a valid Avro schema: {e}"));
        let full_name = match &schema {
            Schema::Record(r) => r.name.fullname(None),
            _ => panic!("schemas/{file} must hold a record schema"),
        };
        let header = RabinFingerprintHeader::from_schema(&schema).build_header();
        // One schema per record type for the life of the process, so leaking it is bounded and
        // lets the cached writer and reader borrow it for 'static.
        let schema: &'static Schema = Box::leak(Box::new(schema));
        let writer = GenericDatumWriter::builder(schema).build().expect("schema resolves");
        let reader = GenericDatumReader::builder(schema).build().expect("schema resolves");
        let fingerprint = header[2..SINGLE_OBJECT_HEADER_LEN].try_into().expect("header is 10 bytes");
        let older = crate::schema_history::older_writers(file.trim_end_matches(".avsc"), schema, fingerprint);
        Self { file, full_name, schema, header, text, older, writer, reader }
    }

    /// The 8-byte Rabin fingerprint, as carried in the single-object header.
    pub fn fingerprint(&self) -> [u8; 8] {
        self.header[2..SINGLE_OBJECT_HEADER_LEN].try_into().expect("header is 10 bytes")
    }
}

/// A topic value type, tied to its schema file.
pub trait Record: Serialize + DeserializeOwned {
    /// The topic name suffix (`<channel>.<TOPIC>`), which is also the schema file's stem.
    const TOPIC: &'static str;
    fn schema() -> &'static RecordSchema;
}

macro_rules! record {
    ($ty:ty, $topic:literal) => {
        impl Record for $ty {
            const TOPIC: &'static str = $topic;
            fn schema() -> &'static RecordSchema {
                static SCHEMA: LazyLock<RecordSchema> = LazyLock::new(|| {
                    RecordSchema::parse(
                        concat!($topic, ".avsc"),
                        include_str!(concat!("../../../schemas/", $topic, ".avsc")),
                    )
                });
                &SCHEMA
            }
        }
    };
}

record!(Proposal, "proposals");
record!(EndorsementResult, "endorsement-results");
record!(OrderedTx, "ordered-tx");
record!(CutMarker, "cut-markers");
record!(Block, "blocks");
record!(ValidatedBlock, "validated-blocks");
record!(DeadLetter, "dead-letters");
record!(Rejection, "rejections");
record!(StateChange, "state-changes");
record!(TxResultRow, "tx-results");

/// Every topic's schema, for tools that walk them all (drift tests, registration, docs).
pub fn all_schemas() -> [&'static RecordSchema; 10] {
    [
        Proposal::schema(),
        EndorsementResult::schema(),
        OrderedTx::schema(),
        CutMarker::schema(),
        Block::schema(),
        ValidatedBlock::schema(),
        DeadLetter::schema(),
        Rejection::schema(),
        StateChange::schema(),
        TxResultRow::schema(),
    ]
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("cannot decode {schema} (schemas/{file}) at byte offset {at_byte}: {reason}")]
    Decode { schema: String, file: &'static str, at_byte: usize, reason: String },
    #[error("cannot encode {schema}: {reason}")]
    Encode { schema: String, reason: String },
}

/// Encodes `value` as an Avro single-object record.
pub fn encode<T: Record>(value: &T) -> Result<Vec<u8>, CodecError> {
    let rs = T::schema();
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(&rs.header);
    encode_datum_into(value, &mut out)?;
    Ok(out)
}

/// Appends the bare Avro datum (no framing) of `value` to `out`.
pub fn encode_datum_into<T: Record>(value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let rs = T::schema();
    rs.writer
        .write_ser(out, value)
        .map(|_| ()).map_err(|e| CodecError::Encode { schema: rs.full_name.clone(), reason: e.to_string() })
}

/// Decodes an Avro single-object record of type `T`, refusing any other schema.
pub fn decode<T: Record>(bytes: &[u8]) -> Result<T, CodecError> {
    let rs = T::schema();
    let fail = |at_byte: usize, reason: String| CodecError::Decode {
        schema: rs.full_name.clone(),
        file: rs.file,
        at_byte,
        reason,
    };
    if let Some(id) = confluent_schema_id(bytes) {
        return Err(fail(0, format!(
            "Confluent wire format with schema id {id}, not converted to single-object: the Kafka adapter converts it only \
             when a schema registry URL is configured (--schema-registry / STREAMLEDGER_SCHEMA_REGISTRY_URL) and the \
             registry's schema {id} is a published version of a schema under schemas/"
        )));
    }
    if bytes.len() < SINGLE_OBJECT_HEADER_LEN || bytes[..2] != SINGLE_OBJECT_MAGIC {
        return Err(fail(0, "not an Avro single-object record (expected magic C3 01)".into()));
    }
    if bytes[..SINGLE_OBJECT_HEADER_LEN] != rs.header[..] {
        // Off the hot path: a record written with an earlier published version of the schema.
        if let Some(old) = rs.older.iter().find(|o| bytes[2..SINGLE_OBJECT_HEADER_LEN] == o.fingerprint) {
            return decode_older(old, &bytes[SINGLE_OBJECT_HEADER_LEN..]).map_err(|(at, reason)| {
                fail(SINGLE_OBJECT_HEADER_LEN + at, format!("written with schemas/{} (v{}): {reason}", old.file, old.version))
            });
        }
        return Err(fail(
            2,
            format!(
                "unknown schema fingerprint {}, expected {}",
                hex::encode(&bytes[2..SINGLE_OBJECT_HEADER_LEN]),
                hex::encode(rs.fingerprint())
            ),
        ));
    }
    decode_datum(&bytes[SINGLE_OBJECT_HEADER_LEN..])
        .map_err(|(at, reason)| fail(SINGLE_OBJECT_HEADER_LEN + at, reason))
}

/// Confluent's wire format opens with this byte, then the 4-byte big-endian schema id.
pub const CONFLUENT_MAGIC: u8 = 0;
/// Magic byte and schema id.
pub const CONFLUENT_HEADER_LEN: usize = 5;

/// The schema id of a record in Confluent's wire format (magic byte 0, then the id).
pub fn confluent_schema_id(bytes: &[u8]) -> Option<u32> {
    match bytes {
        [CONFLUENT_MAGIC, a, b, c, d, ..] => Some(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}

/// Decodes a bare datum; on failure returns the byte offset reached and the reason.
fn decode_datum<T: Record>(datum: &[u8]) -> Result<T, (usize, String)> {
    let rs = T::schema();
    let mut reader = CountingReader { inner: datum, read: 0 };
    let value = rs
        .reader
        .read_deser::<T>(&mut reader)
        .map_err(|e| (reader.read, e.to_string()))?;
    all_read(reader.read, datum)?;
    Ok(value)
}

/// Decodes a datum written with an older schema version, resolved to the current schema. (The
/// schema-aware deserializer cannot resolve yet, so this goes through a `Value`: slower, and only
/// for records older than the current schema.)
fn decode_older<T: Record>(old: &crate::schema_history::OlderWriter, datum: &[u8]) -> Result<T, (usize, String)> {
    let mut reader = CountingReader { inner: datum, read: 0 };
    let value = old.reader.read_value(&mut reader).map_err(|e| (reader.read, e.to_string()))?;
    all_read(reader.read, datum)?;
    apache_avro::from_value::<T>(&value).map_err(|e| (reader.read, e.to_string()))
}

/// Refuses bytes left over after a record: they mean a wrong schema or a corrupt record.
fn all_read(read: usize, datum: &[u8]) -> Result<(), (usize, String)> {
    if read == datum.len() {
        return Ok(());
    }
    Err((read, format!("{} trailing bytes after the record", datum.len() - read)))
}

/// Counts bytes consumed, so that a decoding error can say where it stopped.
struct CountingReader<'a> {
    inner: &'a [u8],
    read: usize,
}

impl Read for CountingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n;
        Ok(n)
    }
}
