//! The `stacyvm` CLI and the Rust SDK against a real `stacyvm serve` child
//! process (PRoot, and Docker for a few checks): every client command and
//! every SDK call, streamed copies measured for memory, exit codes, errors;
//! `provider-test` against the reference plugin; `certify` on this host.
//!
//! Needs: proot, dockerd, and `STACYVM_AGENT_BIN` / `STACYVM_TEST_IMAGE_TAR`
//! or the scripts in `scripts/` that build them.

mod certify;
mod cli;
#[allow(dead_code)]
#[path = "../common/fixtures.rs"]
mod fixtures;
mod interactive;
mod ports;
mod provider_test;
mod sdk;
mod support;
mod templates;
