//! The HTTP edge of errors: the one place that turns `stacyvm_core::Error`
//! into a status code and the documented body
//! `{"error": {"code", "message", "request_id"}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use stacyvm_core::Error;

use super::request_id;

/// An error on its way to the client.
#[derive(Debug)]
pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError(e)
    }
}

pub type ApiResult<T> = std::result::Result<T, ApiError>;

pub use stacyvm_api::{ErrorBody, ErrorDetail};

/// The HTTP status of each error kind.
pub fn status_of(e: &Error) -> StatusCode {
    match e {
        Error::InvalidRequest(_) => StatusCode::BAD_REQUEST,
        Error::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
        Error::Forbidden(_) => StatusCode::FORBIDDEN,
        Error::NotFound(_) => StatusCode::NOT_FOUND,
        Error::Conflict(_) | Error::Unsupported(_) | Error::ResourceExhausted(_) => {
            StatusCode::CONFLICT
        }
        Error::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        Error::ImageNotFound(_) => StatusCode::UNPROCESSABLE_ENTITY,
        Error::QuotaExceeded(_) | Error::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        Error::NoCapacity(_) | Error::ProviderUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        Error::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Builds the error response for `e` under the current request id.
pub fn error_response(e: &Error) -> Response {
    let request_id = request_id::current();
    let status = status_of(e);
    let (code, message) = match e {
        Error::Unavailable(m) => {
            tracing::warn!(%request_id, error = %m, "store unavailable");
            (
                "store_unavailable".to_owned(),
                "the store is unavailable; retry shortly".to_owned(),
            )
        }
        Error::Internal(m) => {
            tracing::error!(%request_id, error = %m, "internal error");
            (
                "internal".to_owned(),
                format!(
                    "internal error; the server log has the details under request id {request_id}"
                ),
            )
        }
        other => (other.code().to_owned(), other.message()),
    };
    let mut resp = (
        status,
        axum::Json(ErrorBody {
            error: ErrorDetail {
                code,
                message,
                request_id,
            },
        }),
    )
        .into_response();
    if let Error::RateLimited { retry_after_s, .. } = e {
        if let Ok(v) = HeaderValue::from_str(&retry_after_s.to_string()) {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    resp
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error_response(&self.0)
    }
}
