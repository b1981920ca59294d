//! The one error type of StacyVM.
//!
//! Every layer (agent client, providers, store, worker, control plane) returns
//! this error; only the HTTP edge turns it into a status code. The `code()`
//! strings are part of the public API contract (`API.md`, Errors).

use serde::{Deserialize, Serialize};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Malformed or out-of-range input; the message says what to fix.
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    /// The object's state does not allow the operation.
    #[error("{0}")]
    Conflict(String),
    /// The sandbox's provider cannot do this.
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    ImageNotFound(String),
    #[error("{0}")]
    QuotaExceeded(String),
    #[error("{message}")]
    RateLimited { message: String, retry_after_s: u64 },
    #[error("{0}")]
    NoCapacity(String),
    #[error("{0}")]
    ProviderUnavailable(String),
    #[error("{0}")]
    Timeout(String),
    /// A bug or an unexpected failure. The message is for logs only; the
    /// HTTP edge never shows it to clients.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// The stable, documented error code.
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidRequest(_) => "invalid_request",
            Error::Unauthenticated(_) => "unauthenticated",
            Error::Forbidden(_) => "forbidden",
            Error::NotFound(_) => "not_found",
            Error::Conflict(_) => "conflict",
            Error::Unsupported(_) => "unsupported",
            Error::PayloadTooLarge(_) => "payload_too_large",
            Error::ImageNotFound(_) => "image_not_found",
            Error::QuotaExceeded(_) => "quota_exceeded",
            Error::RateLimited { .. } => "rate_limited",
            Error::NoCapacity(_) => "no_capacity",
            Error::ProviderUnavailable(_) => "provider_unavailable",
            Error::Timeout(_) => "timeout",
            Error::Internal(_) => "internal",
        }
    }

    /// Rebuilds an error from its wire form (`code`, `message`), as sent by
    /// the agent or a remote worker. Unknown codes become `Internal`.
    pub fn from_code(code: &str, message: impl Into<String>) -> Error {
        let m = message.into();
        match code {
            "invalid_request" => Error::InvalidRequest(m),
            "unauthenticated" => Error::Unauthenticated(m),
            "forbidden" => Error::Forbidden(m),
            "not_found" => Error::NotFound(m),
            "conflict" => Error::Conflict(m),
            "unsupported" => Error::Unsupported(m),
            "payload_too_large" => Error::PayloadTooLarge(m),
            "image_not_found" => Error::ImageNotFound(m),
            "quota_exceeded" => Error::QuotaExceeded(m),
            "rate_limited" => Error::RateLimited {
                message: m,
                retry_after_s: 1,
            },
            "no_capacity" => Error::NoCapacity(m),
            "provider_unavailable" => Error::ProviderUnavailable(m),
            "timeout" => Error::Timeout(m),
            _ => Error::Internal(m),
        }
    }

    pub fn message(&self) -> String {
        self.to_string()
    }

    pub fn internal(context: impl std::fmt::Display, err: impl std::fmt::Display) -> Error {
        Error::Internal(format!("{context}: {err}"))
    }

    pub fn to_wire(&self) -> WireError {
        WireError {
            code: self.code().to_owned(),
            message: self.message(),
        }
    }
}

/// An error as it travels between processes (agent ↔ provider, worker ↔
/// control plane).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WireError {
    pub code: String,
    pub message: String,
}

impl From<WireError> for Error {
    fn from(w: WireError) -> Self {
        Error::from_code(&w.code, w.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_through_the_wire_form() {
        for e in [
            Error::InvalidRequest("x".into()),
            Error::NotFound("x".into()),
            Error::Conflict("x".into()),
            Error::Unsupported("x".into()),
            Error::ImageNotFound("x".into()),
            Error::Timeout("x".into()),
            Error::Internal("x".into()),
        ] {
            assert_eq!(Error::from(e.to_wire()), e);
        }
    }
}
