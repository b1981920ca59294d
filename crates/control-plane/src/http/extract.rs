//! Extractors whose rejections speak the API's error shape: JSON bodies
//! with a size limit, query strings, and the authenticated principal.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use stacyvm_core::Error;

use super::error::ApiError;
use super::AppState;
use crate::app::Principal;

/// The caller, put in the request by the auth layer.
pub struct Auth(pub Principal);

impl<S: Send + Sync> FromRequestParts<S> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Principal>()
            .cloned()
            .map(Auth)
            .ok_or_else(|| ApiError(Error::Unauthenticated("missing API key".into())))
    }
}

/// A JSON body, at most the configured size, parsed with a message that
/// says what is wrong.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let limit = state.app.config.limits.json_body_bytes;
        let too_large = || {
            ApiError(Error::PayloadTooLarge(format!(
                "JSON body is over the {limit}-byte limit"
            )))
        };
        if let Some(len) = req
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        {
            if len > limit as u64 {
                return Err(too_large());
            }
        }
        let bytes = axum::body::to_bytes(req.into_body(), limit)
            .await
            .map_err(|e| {
                if std::error::Error::source(&e)
                    .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
                    || e.to_string().contains("length limit")
                {
                    too_large()
                } else {
                    ApiError(Error::InvalidRequest(format!(
                        "could not read the request body: {e}"
                    )))
                }
            })?;
        if bytes.is_empty() {
            return Err(ApiError(Error::InvalidRequest(
                "a JSON body is required".into(),
            )));
        }
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError(Error::InvalidRequest(format!("invalid JSON body: {e}"))))
    }
}

/// Parses a JSON object into `T`, refusing fields `T` does not have (for
/// request types that clients also read, which must stay lenient there:
/// a field is known when `T::default()` serializes it).
pub fn strict<T: DeserializeOwned + serde::Serialize + Default>(
    v: serde_json::Value,
) -> Result<T, ApiError> {
    let known = serde_json::to_value(T::default()).unwrap_or_default();
    if let (Some(obj), Some(known)) = (v.as_object(), known.as_object()) {
        let unknown: Vec<&str> = obj
            .keys()
            .filter(|k| !known.contains_key(*k))
            .map(String::as_str)
            .collect();
        if !unknown.is_empty() {
            return Err(ApiError(Error::InvalidRequest(format!(
                "invalid JSON body: unknown field(s) {}; expected {}",
                unknown.join(", "),
                known
                    .keys()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))));
        }
    }
    serde_json::from_value(v)
        .map_err(|e| ApiError(Error::InvalidRequest(format!("invalid JSON body: {e}"))))
}

/// A query string parsed into `T`, refusing bad input with a 400.
pub struct Q<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Q<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|q| Q(q.0))
            .map_err(|e| {
                ApiError(Error::InvalidRequest(format!(
                    "invalid query string: {}",
                    e.body_text()
                )))
            })
    }
}

/// All `(key, value)` pairs of the query string, repeated keys kept.
pub fn query_pairs(parts_query: Option<&str>) -> Vec<(String, String)> {
    form_urlencoded::parse(parts_query.unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}
