//! The `blocks` decoder, single-object and Confluent framing (see the crate's doc).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    streamledger_fuzz::decode_target::<streamledger_core::model::Block>(data);
});
