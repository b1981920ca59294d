//! Extractors whose rejections speak the API's error shape: JSON bodies
//! with a size limit, query strings, path parameters, and the
//! authenticated principal.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use futures_util::StreamExt;
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

/// How much of a refused body is read and thrown away before the refusal is
/// sent. A client still sending when the server answers and closes sees
/// its write fail rather than the 413; reading the rest first lets it read
/// the answer. Bodies beyond this are cut off with the connection.
fn drain_limit(limit: usize) -> usize {
    limit.saturating_mul(4).min(64 << 20)
}

/// Reads and discards what is left of `body`, up to `max` bytes.
async fn drain(mut body: axum::body::BodyDataStream, max: usize) {
    let mut seen = 0usize;
    while let Some(Ok(chunk)) = body.next().await {
        seen += chunk.len();
        if seen > max {
            break;
        }
    }
}

/// A JSON body, at most the configured size, parsed with a message that
/// says what is wrong.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let limit = state.app.config().limits.json_body_bytes;
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
                if len <= drain_limit(limit) as u64 {
                    drain(req.into_body().into_data_stream(), drain_limit(limit)).await;
                }
                return Err(too_large());
            }
        }
        let mut body = req.into_body().into_data_stream();
        let mut bytes = Vec::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| {
                ApiError(Error::InvalidRequest(format!(
                    "could not read the request body: {e}"
                )))
            })?;
            if bytes.len() + chunk.len() > limit {
                drain(body, drain_limit(limit)).await;
                return Err(too_large());
            }
            bytes.extend_from_slice(&chunk);
        }
        if bytes.is_empty() {
            return Err(ApiError(Error::InvalidRequest(
                "a JSON body is required".into(),
            )));
        }
        // Every body of the API is an object. serde would also fill a
        // struct from an array of its fields in order (`[null, 5]`), which
        // the documented schema does not allow and no client means.
        let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
        if first != Some(&b'{') {
            return Err(ApiError(Error::InvalidRequest(
                "the JSON body must be an object".into(),
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
        check_query_utf8(parts.uri.query())?;
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

/// Refuses a query string whose percent-decoded bytes are not UTF-8. The
/// decoder behind `Q` would replace them with U+FFFD, and a file written
/// or deleted at that path would not be the one the client named.
fn check_query_utf8(query: Option<&str>) -> Result<(), ApiError> {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    for part in query.unwrap_or("").split('&') {
        let raw = part.as_bytes();
        let mut decoded = Vec::with_capacity(raw.len());
        let mut i = 0;
        while i < raw.len() {
            let escaped = match (raw[i], raw.get(i + 1), raw.get(i + 2)) {
                (b'%', Some(&h), Some(&l)) => hex(h).zip(hex(l)).map(|(h, l)| h << 4 | l),
                _ => None,
            };
            match escaped {
                Some(b) => {
                    decoded.push(b);
                    i += 3;
                }
                None => {
                    decoded.push(raw[i]);
                    i += 1;
                }
            }
        }
        if std::str::from_utf8(&decoded).is_err() {
            return Err(ApiError(Error::InvalidRequest(
                "invalid query string: a percent-encoded value is not UTF-8".into(),
            )));
        }
    }
    Ok(())
}

/// Path parameters parsed into `T`. A segment axum cannot decode (a
/// percent-encoding that is not UTF-8) is the client's 400 in the API's
/// error shape; axum's own rejection is a plain-text body. Named `Path` so
/// the OpenAPI derive reads the parameter as it does axum's.
pub struct Path<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        use axum::extract::rejection::PathRejection;
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(p) => Ok(Path(p.0)),
            // A route without the parameter its handler reads: a bug here.
            Err(e @ PathRejection::MissingPathParams(_)) => {
                Err(ApiError(Error::internal("extracting path parameters", e)))
            }
            Err(e) => Err(ApiError(Error::InvalidRequest(format!(
                "invalid path: {}",
                e.body_text()
            )))),
        }
    }
}

/// All `(key, value)` pairs of the query string, repeated keys kept.
pub fn query_pairs(parts_query: Option<&str>) -> Vec<(String, String)> {
    form_urlencoded::parse(parts_query.unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::check_query_utf8;

    #[test]
    fn query_strings_must_decode_to_utf8() {
        for ok in [
            None,
            Some(""),
            Some("path=/work/a%20b&x=%E2%82%AC"),
            Some("a=100%"),
            Some("a=%zz"),
        ] {
            assert!(check_query_utf8(ok).is_ok(), "{ok:?}");
        }
        for bad in ["path=/%FF", "a=1&path=%C3", "%80=x"] {
            assert!(check_query_utf8(Some(bad)).is_err(), "{bad}");
        }
    }
}
