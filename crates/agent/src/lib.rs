//! The StacyVM agent: the small binary that runs inside every sandbox and
//! serves exec, streaming exec and file operations over one framed,
//! multiplexed connection; and the protocol it speaks, shared with the
//! host-side client (`stacyvm_agent::protocol`).
//!
//! The agent uses plain threads and blocking I/O (no async runtime), so it
//! stays small and its idle footprint stays low.

pub mod archive;
pub mod conn;
pub mod exec;
pub mod extract;
pub mod files;
pub mod flow;
pub mod pool;
pub mod ports;
pub mod procs;
pub mod protocol;
pub mod pty;
pub mod root;
pub mod server;
pub mod upload;
pub mod users;
pub mod vsock;
pub mod watch;
pub mod xattrs;
