//! Provider tests against the real runtimes: one conformance suite run
//! against every provider, plus provider-specific checks; and the checks of
//! the fake provider the control plane's tests use.

mod conformance;
mod docker;
mod fake;
mod firecracker;
mod namespaces;
mod plugin;
mod proot;
mod qemu;
mod support;
mod vmlinux;
mod watch;
