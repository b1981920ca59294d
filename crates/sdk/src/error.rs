//! The SDK's one error type: the server's API errors with their code,
//! message, request id and status, plus what can go wrong on the way there.

use std::time::Duration;

/// An error answered by the server: `{"error": {"code", "message", "request_id"}}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status, e.g. 404.
    pub status: u16,
    /// Stable machine-readable code: `not_found`, `conflict`, `quota_exceeded`, …
    pub code: String,
    /// What went wrong, as the server explains it.
    pub message: String,
    /// The request id the server logged the call under.
    pub request_id: Option<String>,
    /// From a `Retry-After` header, when the server sent one.
    pub retry_after: Option<Duration>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}", self.message, self.code)?;
        if let Some(id) = &self.request_id {
            write!(f, ", request id {id}")?;
        }
        write!(f, ")")
    }
}

/// Everything an SDK call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server refused or failed the call.
    #[error("{0}")]
    Api(ApiError),
    /// A streamed exec or log follow ended with an `error` event.
    #[error("{message} ({code})")]
    Stream {
        code: String,
        message: String,
        request_id: Option<String>,
    },
    /// The server could not be reached, or the connection broke.
    #[error("the connection to the StacyVM server at {url} failed")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// A local file or stream failed.
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The server's answer was not what the API promises.
    #[error("unexpected response from the server: {0}")]
    Protocol(String),
    /// The client was configured with something unusable (a bad URL, a
    /// key that cannot go in a header).
    #[error("invalid client configuration: {0}")]
    Config(String),
}

impl Error {
    /// The API error code (`not_found`, …), for server-side errors.
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Api(e) => Some(&e.code),
            Error::Stream { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The HTTP status, for errors the server answered with.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Api(e) => Some(e.status),
            Error::Transport { source, .. } => source.status().map(|s| s.as_u16()),
            _ => None,
        }
    }

    /// The server's request id, when it sent one.
    pub fn request_id(&self) -> Option<&str> {
        match self {
            Error::Api(e) => e.request_id.as_deref(),
            Error::Stream { request_id, .. } => request_id.as_deref(),
            _ => None,
        }
    }

    /// The human-readable message, without the code.
    pub fn message(&self) -> String {
        match self {
            Error::Api(e) => e.message.clone(),
            Error::Stream { message, .. } => message.clone(),
            other => other.to_string(),
        }
    }

    /// The API error, if this is one.
    pub fn as_api(&self) -> Option<&ApiError> {
        match self {
            Error::Api(e) => Some(e),
            _ => None,
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
