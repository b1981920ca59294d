//! The shapes of StacyVM's public HTTP API (`API.md`): every request body
//! and every answer, once, as serde types. The server answers with them,
//! the Rust SDK reads them, and with the `openapi` feature they carry the
//! OpenAPI schemas the server's `/openapi.json` is generated from (and the
//! Python and TypeScript SDKs' types from that).
//!
//! Plain data: no behaviour beyond small conveniences, no I/O, nothing of
//! the server's internals.

pub mod admin;
pub mod exec;
pub mod files;
pub mod sandboxes;
pub mod templates;
pub mod volumes;
pub mod workers;

pub use admin::*;
pub use exec::*;
pub use files::*;
pub use sandboxes::*;
pub use templates::*;
pub use volumes::*;
pub use workers::*;

use serde::{Deserialize, Serialize};

/// Every non-2xx answer: `{"error": {"code", "message", "request_id"}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorDetail {
    /// Stable machine-readable code (`invalid_request`, `not_found`, …).
    pub code: String,
    /// What went wrong and what to do about it.
    pub message: String,
    pub request_id: String,
}

/// The answer of `/healthz` and `/readyz`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Health {
    pub status: String,
}

/// Times are RFC 3339 strings on the wire.
pub(crate) mod rfc3339 {
    pub use time::serde::rfc3339::*;
}
