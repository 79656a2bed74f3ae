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
    // Built once: resolving a schema's names is far costlier than encoding a small record.
    writer: GenericDatumWriter<'static>,
    reader: GenericDatumReader<'static>,
}

impl RecordSchema {
    fn parse(file: &'static str, text: &str) -> Self {
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
        Self { file, full_name, schema, header, writer, reader }
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

/// Every topic's schema, for tools that walk them all (drift tests, registration, docs).
pub fn all_schemas() -> [&'static RecordSchema; 10] {
    [
        Proposal::schema(),
        EndorsementResult::schema(),
record!(StateChange, "state-changes");
record!(TxResultRow, "tx-results");
        OrderedTx::schema(),
        CutMarker::schema(),
        Block::schema(),
        ValidatedBlock::schema(),
        DeadLetter::schema(),
        Rejection::schema(),
    ]
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("cannot decode {schema} (schemas/{file}) at byte offset {at_byte}: {reason}")]
        StateChange::schema(),
        TxResultRow::schema(),
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
    if bytes.len() < SINGLE_OBJECT_HEADER_LEN || bytes[..2] != SINGLE_OBJECT_MAGIC {
        return Err(fail(0, "not an Avro single-object record (expected magic C3 01)".into()));
    }
    if bytes[..SINGLE_OBJECT_HEADER_LEN] != rs.header[..] {
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

/// Decodes a bare datum; on failure returns the byte offset reached and the reason.
fn decode_datum<T: Record>(datum: &[u8]) -> Result<T, (usize, String)> {
    let rs = T::schema();
    let mut reader = CountingReader { inner: datum, read: 0 };
    let value = rs
        .reader
        .read_deser::<T>(&mut reader)
        .map_err(|e| (reader.read, e.to_string()))?;
    if reader.read != datum.len() {
        return Err((reader.read, format!("{} trailing bytes after the record", datum.len() - reader.read)));
    }
    Ok(value)
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
