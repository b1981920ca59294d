//! StacyVM's fuzz checks: one function per fuzz target, each taking arbitrary
//! bytes and panicking only on a real finding. The cargo-fuzz binaries in
//! `fuzz_targets/` call them, and `tests/seeds.rs` replays the committed seeds
//! (and any local corpus) through them on stable Rust.

pub mod frame_decoder;
pub mod glob_pattern;
pub mod image_tar;
pub mod path_resolve;
pub mod tree;
