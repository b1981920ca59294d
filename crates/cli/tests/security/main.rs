//! StacyVM's security and reliability suite: attacks a real `stacyvm serve`
//! the way untrusted sandbox code, other tenants and crashing hosts will —
//! containment against the real Docker, namespaces (as root and rootless) and PRoot
//! providers, key and tenant
//! refusals with their audit trail, the HTTP front under abuse (slow
//! request heads, too many connections, bad-key floods, forged
//! X-Forwarded-For, what operators' endpoints tell tenants), which images a
//! tenant may run, and crashes and
//! faults (kill -9, a stopped dockerd, a stopped PostgreSQL, a full disk). Each test starts its
//! own server and private fixtures and leaves nothing behind.
//!
//! Needs root, dockerd, proot, PostgreSQL 15 binaries, and either
//! `STACYVM_AGENT_BIN`, `STACYVM_TEST_IMAGE_TAR`, `STACYVM_TEST_POSTGRES_URL`
//! or the scripts in `scripts/` that build and start them.
//! Run: `cargo nextest run -p stacyvm --test security --no-fail-fast`.

#[allow(dead_code)]
#[path = "../common/cluster.rs"]
mod cluster;
mod containment;
mod egress;
mod faults;
#[allow(dead_code)]
#[path = "../common/fixtures.rs"]
mod fixtures;
mod front;
mod images;
mod keys;
mod ports;
mod procs;
mod provided_templates;
mod pty;
mod rootless;
mod snapshots;
#[allow(dead_code)]
#[path = "../common/server.rs"]
mod support;
mod tenancy;
mod volumes;
