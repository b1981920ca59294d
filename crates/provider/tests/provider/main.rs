//! Provider tests against the real runtimes: one conformance suite run
//! against every provider, plus provider-specific checks.

mod conformance;
mod docker;
mod namespaces;
mod plugin;
mod proot;
mod support;
