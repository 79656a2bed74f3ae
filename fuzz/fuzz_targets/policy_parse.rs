//! The endorsement policy parser (`Policy::parse`, `Principal::from_str`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    streamledger_fuzz::policy_target(data);
});
