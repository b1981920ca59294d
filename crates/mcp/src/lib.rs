//! StacyVM's Model Context Protocol (MCP) server: the JSON-RPC 2.0 session
//! (version negotiation, `initialize`, `tools/list`, `tools/call`, `ping`)
//! and the sandbox tools an AI agent calls, written against a [`Backend`]
//! so that `stacyvm mcp` (stdio, through the HTTP API) and the control
//! plane's `/mcp` endpoint (its own app services) share one implementation.

mod backend;
pub mod jsonrpc;
mod session;
mod tools;

pub use backend::{read_window, Backend, ExecResult, FileChunk, ToolError};
pub use session::{CloseReport, Options, Session, Transport};

/// Protocol revisions this server speaks, newest first: the stateless
/// revisions (each request names its version in `_meta`; `server/discover`
/// instead of a handshake) and the revisions of the `initialize` handshake.
pub const PROTOCOL_VERSIONS: &[&str] = &[
    "2026-07-28",
    "2025-11-25",
    "2025-06-18",
    "2025-03-26",
    "2024-11-05",
];

/// The stateless revisions among them.
pub const STATELESS_VERSIONS: &[&str] = &["2026-07-28"];

/// The revisions the `initialize` handshake negotiates, newest first. A
/// client asking for one of them gets it; any other request is answered
/// with the newest, which the client may accept or refuse.
pub const HANDSHAKE_VERSIONS: &[&str] = &["2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"];

/// Where a stateless request names its protocol version.
pub const VERSION_META_KEY: &str = "io.modelcontextprotocol/protocolVersion";

/// The label every sandbox created through MCP carries: the session's id.
pub const SESSION_LABEL: &str = "mcp-session";

/// The label of a sandbox created with `keep: true`: it outlives its session.
pub const KEEP_LABEL: &str = "mcp-keep";

/// The most bytes of one output stream or file a tool result carries.
pub const OUTPUT_CAP: usize = 64 * 1024;
