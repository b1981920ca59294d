//! envd's file transfer: `GET /files?path=` (the raw bytes) and
//! `POST /files` (multipart, a `file` part per file named by its path, or
//! raw bytes to `?path=`), streamed through the app's file calls and
//! counted against the upload limit. Errors are envd's
//! `{"code": <status>, "message"}`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::{json, Value};
use stacyvm_core::{ByteStream, Error};
use stacyvm_provider::agent_client::WriteAs;

use super::envd::{signed_caller, user_name, Refused};
use super::public_message;
use crate::app::e2b::SignedUrl;
use crate::http::extract::query_pairs;
use crate::http::files::drain_refused;
use crate::http::{note, AppState};

/// An envd HTTP error.
fn file_error(e: &Error) -> Response {
    let status = match e {
        Error::Conflict(_) => StatusCode::CONFLICT,
        e => crate::http::error::status_of(e),
    };
    (
        status,
        axum::Json(json!({"code": status.as_u16(), "message": public_message(e)})),
    )
        .into_response()
}

/// A refused caller, in the `/files` error shape, with its audit note.
fn refused(r: Refused) -> Response {
    let status = r.error.status();
    let resp = (
        status,
        axum::Json(json!({"code": status.as_u16(), "message": r.error.message()})),
    )
        .into_response();
    finish(resp, r.sandbox, None, &[])
}

struct FileQuery {
    path: Option<String>,
    user: Option<String>,
    signature: Option<String>,
    signature_expiration: Option<String>,
}

fn file_query(uri: &axum::http::Uri) -> FileQuery {
    let mut q = FileQuery {
        path: None,
        user: None,
        signature: None,
        signature_expiration: None,
    };
    for (k, v) in query_pairs(uri.query()) {
        match k.as_str() {
            "path" => q.path = Some(v),
            "username" => q.user = Some(v),
            "signature" => q.signature = Some(v),
            "signature_expiration" => q.signature_expiration = Some(v),
            _ => {}
        }
    }
    q
}

/// The signed-URL claim of a `/files` request (`None` when it has no
/// signature), for `operation` (`read` or `write`).
fn signed_url(q: &FileQuery, operation: &'static str) -> Result<Option<SignedUrl>, Error> {
    let Some(signature) = q.signature.clone() else {
        return Ok(None);
    };
    let expiration = match &q.signature_expiration {
        None => None,
        Some(e) => Some(e.trim().parse::<i64>().map_err(|_| {
            Error::InvalidRequest("signature_expiration must be a Unix time in seconds".into())
        })?),
    };
    Ok(Some(SignedUrl {
        path: q.path.clone().unwrap_or_default(),
        operation,
        user: q.user.clone().unwrap_or_default(),
        signature,
        expiration,
    }))
}

/// The caller of a `/files` request: by access token, or by a URL signed
/// with it.
async fn files_caller(
    s: &AppState,
    parts: &axum::http::request::Parts,
    q: &FileQuery,
    operation: &'static str,
) -> Result<super::envd::Caller, Refused> {
    let signed = match signed_url(q, operation) {
        Ok(signed) => signed,
        Err(e) => {
            return Err(Refused {
                error: e.into(),
                sandbox: super::envd_target(&parts.headers, s.app.config().e2b.domain.as_deref())
                    .map(|t| t.0),
            })
        }
    };
    signed_caller(s, parts, signed).await
}

/// A path as envd reads it: relative ones are under the user's home.
fn resolve(user: &str, p: &str) -> Result<String, Error> {
    if p.is_empty() {
        return Err(Error::InvalidRequest("path is required".into()));
    }
    let home = if user == "root" {
        "/root".to_owned()
    } else {
        format!("/home/{user}")
    };
    let full = if p.starts_with('/') {
        p.to_owned()
    } else if p == "~" {
        home
    } else if let Some(rest) = p.strip_prefix("~/") {
        format!("{home}/{rest}")
    } else {
        format!("{home}/{p}")
    };
    stacyvm_core::validate_sandbox_path(&full)
}

fn finish(
    resp: Response,
    sandbox: Option<String>,
    who: Option<crate::app::Principal>,
    path: &[String],
) -> Response {
    let mut resp = note(resp, sandbox, json!({"paths": path, "api": "e2b"}));
    if let Some(w) = who {
        resp.extensions_mut().insert(w);
    }
    resp
}

/// The user the query names (`username`), else the Basic header's.
fn user_of(q: &FileQuery, caller_user: &str) -> Result<String, Error> {
    match &q.user {
        Some(u) if !u.is_empty() => user_name(u.clone())
            .map_err(|_| Error::InvalidRequest(format!("user {u:?} is not a valid user name"))),
        _ => Ok(caller_user.to_owned()),
    }
}

/// `GET /files?path=&username=`: the file's bytes.
pub async fn file_download(State(s): State<AppState>, req: axum::extract::Request) -> Response {
    let (parts, _body) = req.into_parts();
    let q = file_query(&parts.uri);
    let c = match files_caller(&s, &parts, &q, "read").await {
        Ok(c) => c,
        Err(r) => return refused(r),
    };
    let path = q.path.clone().unwrap_or_default();
    let read = async {
        let user = user_of(&q, c.user())?;
        let path = resolve(&user, &path)?;
        let stream = s.app.file_read(c.who(), c.sandbox(), &path).await?;
        Ok::<_, Error>((path, stream))
    }
    .await;
    let resp = match read {
        Ok((path, stream)) => {
            let mut r = Response::new(Body::from_stream(stream));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            return finish(
                r,
                Some(c.sandbox().to_owned()),
                Some(c.who().clone()),
                &[path],
            );
        }
        Err(e) => file_error(&e),
    };
    finish(
        resp,
        Some(c.sandbox().to_owned()),
        Some(c.who().clone()),
        &[path],
    )
}

/// Counts upload bytes across a whole request and fails past `limit`.
struct Limit {
    limit: u64,
    seen: std::sync::atomic::AtomicU64,
    over: AtomicBool,
}

fn limited<S, E>(stream: S, limit: Arc<Limit>) -> ByteStream
where
    S: futures_util::Stream<Item = Result<bytes::Bytes, E>> + Send + 'static,
    E: std::fmt::Display,
{
    Box::pin(stream.map(move |chunk| match chunk {
        Ok(b) => {
            let seen = limit.seen.fetch_add(b.len() as u64, Ordering::SeqCst) + b.len() as u64;
            if seen > limit.limit {
                limit.over.store(true, Ordering::SeqCst);
                Err(std::io::Error::other("upload is over the size limit"))
            } else {
                Ok(b)
            }
        }
        Err(e) => Err(std::io::Error::other(e.to_string())),
    }))
}

fn write_info(path: &str, with: &WriteAs) -> Value {
    let name = path.rsplit('/').next().unwrap_or(path);
    let mut info = json!({"name": name, "type": "file", "path": path});
    let metadata = super::entries::metadata_of(&with.xattrs);
    if !metadata.is_empty() {
        info["metadata"] = json!(metadata);
    }
    info
}

/// `POST /files?path=&username=`: multipart parts named by path, or raw
/// bytes to `path`. Answers the files written.
pub async fn file_upload(State(s): State<AppState>, req: axum::extract::Request) -> Response {
    let (parts, body) = req.into_parts();
    let q = file_query(&parts.uri);
    let c = match files_caller(&s, &parts, &q, "write").await {
        Ok(c) => c,
        Err(r) => {
            // Read what the client is still sending, so it gets the refusal
            // rather than a connection reset mid-upload.
            drain_refused(body.into_data_stream()).await;
            return refused(r);
        }
    };
    let limit = Arc::new(Limit {
        limit: s.app.config().limits.upload_bytes,
        seen: Default::default(),
        over: AtomicBool::new(false),
    });
    let mut written = Vec::new();
    let mut with = WriteAs::default();
    let result = match upload_allowed(&c, &q, &parts.headers) {
        Ok(mut allowed) => {
            // `user` places relative paths; the owner of what is written is
            // the account the request acts as.
            let user = allowed.user.clone().unwrap_or_default();
            let named = q
                .user
                .as_deref()
                .filter(|u| !u.is_empty())
                .map(|_| user.as_str());
            allowed.user = super::envd::acting_user(&s, &c, named).await;
            with = allowed;
            let to = Target {
                s: &s,
                c: &c,
                q: &q,
                user: &user,
                with: &with,
            };
            upload(to, &parts.headers, body, limit.clone(), &mut written).await
        }
        Err(e) => {
            drain_refused(body.into_data_stream()).await;
            Err(e)
        }
    };
    let resp = match result {
        Ok(()) => {
            let infos: Vec<Value> = written.iter().map(|p| write_info(p, &with)).collect();
            (StatusCode::OK, axum::Json(Value::Array(infos))).into_response()
        }
        Err(_) if limit.over.load(Ordering::SeqCst) => file_error(&Error::PayloadTooLarge(
            format!("upload is over the {}-byte limit", limit.limit),
        )),
        Err(e) => file_error(&e),
    };
    finish(
        resp,
        Some(c.sandbox().to_owned()),
        Some(c.who().clone()),
        &written,
    )
}

/// What refuses an upload before its body is read; the user it writes as
/// and the metadata (`X-Metadata-KEY: VALUE` headers, kept as the
/// `user.e2b.key` extended attribute of every file written, as envd does).
fn upload_allowed(
    c: &super::envd::Caller,
    q: &FileQuery,
    headers: &HeaderMap,
) -> Result<WriteAs, Error> {
    c.who().require_write()?;
    let user = user_of(q, c.user())?;
    let mut xattrs = BTreeMap::new();
    for (name, value) in headers {
        let Some(key) = name.as_str().strip_prefix("x-metadata-") else {
            continue;
        };
        let value = value
            .to_str()
            .ok()
            .filter(|v| v.bytes().all(|b| (0x20..0x7f).contains(&b)))
            .ok_or_else(|| {
                Error::InvalidRequest(format!(
                    "the value of file metadata {key:?} must be printable US-ASCII"
                ))
            })?;
        if key.is_empty() {
            return Err(Error::InvalidRequest("a file metadata key is empty".into()));
        }
        xattrs.insert(
            format!("{}{key}", super::entries::METADATA_XATTR),
            value.to_owned(),
        );
    }
    if let Some(enc) = headers.get(header::CONTENT_ENCODING) {
        let enc = enc.to_str().unwrap_or("");
        if !enc.eq_ignore_ascii_case("identity") {
            return Err(Error::InvalidRequest(format!(
                "Content-Encoding {enc:?} is not supported: upload the file uncompressed"
            )));
        }
    }
    Ok(WriteAs {
        user: Some(user),
        xattrs,
    })
}

/// Where an upload goes: the sandbox and user of its caller and query.
struct Target<'a> {
    s: &'a AppState,
    c: &'a super::envd::Caller,
    q: &'a FileQuery,
    user: &'a str,
    with: &'a WriteAs,
}

async fn upload(
    Target {
        s,
        c,
        q,
        user,
        with,
    }: Target<'_>,
    headers: &HeaderMap,
    body: Body,
    limit: Arc<Limit>,
    written: &mut Vec<String>,
) -> Result<(), Error> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    if ct.to_ascii_lowercase().starts_with("multipart/form-data") {
        let boundary = multer::parse_boundary(&ct).map_err(|e| {
            Error::InvalidRequest(format!("the multipart body has no usable boundary: {e}"))
        })?;
        let mut form = multer::Multipart::new(body.into_data_stream(), boundary);
        let mut files = 0usize;
        loop {
            let field = match form.next_field().await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    return Err(if limit.over.load(Ordering::SeqCst) {
                        Error::PayloadTooLarge("upload is over the size limit".into())
                    } else {
                        Error::InvalidRequest(format!("the multipart body is malformed: {e}"))
                    })
                }
            };
            let Some(name) = field.file_name().map(str::to_owned) else {
                // Parts that are not files carry nothing envd reads.
                continue;
            };
            files += 1;
            // A lone file goes to `?path=` when given (the part's file name
            // is the same path, possibly cut short by the client).
            let target = match &q.path {
                Some(p) if !p.is_empty() && files == 1 => p.clone(),
                _ => name,
            };
            let path = resolve(user, &target)?;
            let stream = limited(field, limit.clone());
            s.app
                .file_write_as(c.who(), c.sandbox(), &path, None, with, stream)
                .await?;
            written.push(path);
        }
        if files == 0 {
            return Err(Error::InvalidRequest(
                "the multipart body holds no file part".into(),
            ));
        }
        Ok(())
    } else {
        let target = q.path.clone().ok_or_else(|| {
            Error::InvalidRequest("path is required for a raw upload (?path=…)".into())
        })?;
        let path = resolve(user, &target)?;
        let stream = limited(body.into_data_stream(), limit);
        s.app
            .file_write_as(c.who(), c.sandbox(), &path, None, with, stream)
            .await?;
        written.push(path);
        Ok(())
    }
}
