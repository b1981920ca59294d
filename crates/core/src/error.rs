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
    /// The sandbox itself ran out of something it needs to run a command:
    /// its process limit, memory or file descriptors. The message names it.
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{message}")]
    RateLimited { message: String, retry_after_s: u64 },
    #[error("{0}")]
    NoCapacity(String),
    #[error("{0}")]
    ProviderUnavailable(String),
    #[error("{0}")]
    Timeout(String),
    /// The store (SQLite, PostgreSQL) cannot be reached or written right
    /// now; retrying shortly may work. The message names the store and why.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an unexpected failure. The message (with the chain of
    /// causes) is for logs only; the HTTP edge never shows it to clients.
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
            Error::ResourceExhausted(_) => "sandbox_resource_exhausted",
            Error::RateLimited { .. } => "rate_limited",
            Error::NoCapacity(_) => "no_capacity",
            Error::ProviderUnavailable(_) => "provider_unavailable",
            Error::Timeout(_) => "timeout",
            Error::Unavailable(_) => "store_unavailable",
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
            "sandbox_resource_exhausted" => Error::ResourceExhausted(m),
            "rate_limited" => Error::RateLimited {
                message: m,
                retry_after_s: 1,
            },
            "no_capacity" => Error::NoCapacity(m),
            "provider_unavailable" => Error::ProviderUnavailable(m),
            "timeout" => Error::Timeout(m),
            "store_unavailable" => Error::Unavailable(m),
            _ => Error::Internal(m),
        }
    }

    pub fn message(&self) -> String {
        self.to_string()
    }

    /// An unexpected failure while doing `context`, with `err` and every
    /// cause below it (`source()`), so the log says what failed and why.
    pub fn internal<E>(context: impl std::fmt::Display, err: E) -> Error
    where
        E: std::error::Error,
    {
        Error::Internal(format!("{context}: {}", chain(&err)))
    }

    /// An OS error met while starting something inside a sandbox: running
    /// out of processes, memory or file descriptors is the sandbox's own
    /// state (`ResourceExhausted`, naming the limit), anything else a bug.
    pub fn from_spawn(context: impl std::fmt::Display, err: &std::io::Error) -> Error {
        let limit = match err.raw_os_error() {
            Some(libc_errno::EAGAIN) => {
                Some("its process limit (pids) is reached: too many processes or threads run in it")
            }
            Some(libc_errno::ENOMEM) => Some("it is out of memory"),
            Some(libc_errno::EMFILE) | Some(libc_errno::ENFILE) => {
                Some("it has too many open files")
            }
            _ => None,
        };
        match limit {
            Some(why) => Error::ResourceExhausted(format!(
                "{context}: the sandbox cannot start anything more because {why}; \
                 end some of its processes (or destroy it) and try again"
            )),
            None => Error::Internal(format!("{context}: {}", chain(err))),
        }
    }

    pub fn to_wire(&self) -> WireError {
        WireError {
            code: self.code().to_owned(),
            message: self.message(),
        }
    }
}

/// An error and its causes on one line, a cause left out when the message
/// above it already says it (many errors repeat their source).
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(cause) = cur {
        let text = cause.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = cause.source();
    }
    out
}

/// The errno values [`Error::from_spawn`] tells apart (Linux, every
/// architecture StacyVM runs on).
mod libc_errno {
    pub const EAGAIN: i32 = 11;
    pub const ENOMEM: i32 = 12;
    pub const ENFILE: i32 = 23;
    pub const EMFILE: i32 = 24;
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
            Error::ResourceExhausted("x".into()),
            Error::Timeout("x".into()),
            Error::Unavailable("x".into()),
            Error::Internal("x".into()),
        ] {
            assert_eq!(Error::from(e.to_wire()), e);
        }
    }

    #[test]
    fn internal_errors_keep_their_causes() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("writing the meta")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = Error::internal(
            "spawning sbx_1",
            Outer(std::io::Error::from_raw_os_error(28)),
        );
        let m = e.message();
        assert!(m.starts_with("spawning sbx_1: writing the meta: "), "{m}");
        assert!(m.contains("No space left on device"), "{m}");
    }

    #[test]
    fn spawn_errors_name_the_exhausted_limit() {
        let e = Error::from_spawn("starting sh", &std::io::Error::from_raw_os_error(11));
        assert_eq!(e.code(), "sandbox_resource_exhausted");
        assert!(e.message().contains("process limit"), "{e}");
        let e = Error::from_spawn("x", &std::io::Error::from_raw_os_error(24));
        assert!(e.message().contains("open files"), "{e}");
        let e = Error::from_spawn("x", &std::io::Error::from_raw_os_error(5));
        assert_eq!(e.code(), "internal");
    }
}
