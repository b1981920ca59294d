//! cargo-fuzz entry point for `stacyvm_fuzz::path_resolve` (see that module for what
//! it checks).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| stacyvm_fuzz::path_resolve::check(data));
