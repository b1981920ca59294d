//! StacyVM's API test suite: real HTTP against a real `stacyvm serve`
//! process, with the real Docker and PRoot providers and plugins, on SQLite and on
//! PostgreSQL. Each test starts its own server on a temporary data dir (and,
//! for PostgreSQL, a fresh database) and leaves nothing behind.
//!
//! Needs: dockerd, proot, and either `STACYVM_AGENT_BIN`, `STACYVM_TEST_IMAGE_TAR`,
//! `STACYVM_TEST_POSTGRES_URL` or the scripts in `scripts/` that build and start them.

mod archive;
mod certify;
#[allow(dead_code)]
#[path = "../common/cluster.rs"]
mod cluster;
mod egress;
mod errors;
mod exec_stream;
mod files;
#[allow(dead_code)]
#[path = "../common/fixtures.rs"]
mod fixtures;
mod harness;
mod images;
mod lifecycle;
mod pages;
mod per_store;
mod plugins;
mod ports;
mod procs;
mod pty;
mod qemu;
mod snapshots;
mod stats;
#[allow(dead_code)]
#[path = "../common/server.rs"]
mod support;
mod templates;
mod tenancy;
mod users;
mod volumes;
mod workers;
