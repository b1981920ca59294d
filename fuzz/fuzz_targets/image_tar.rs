//! cargo-fuzz entry point for `stacyvm_fuzz::image_tar` (see that module for what
//! it checks).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| stacyvm_fuzz::image_tar::check(data));
