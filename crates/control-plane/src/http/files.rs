//! Handlers of `/v1/sandboxes/{id}/files…`: streamed upload and download,
//! stat, list, glob, move, chmod, mkdir, delete.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde::Deserialize;
use stacyvm_core::files::parse_mode;
use stacyvm_core::{ByteStream, Error};

use super::error::{ApiError, ApiResult};
use super::extract::{Auth, JsonBody, Path, Q};
use super::openapi::RawBytes;
use super::{note, AppState};
use crate::app::views;
use stacyvm_api as api;

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PathQuery {
    /// Absolute path inside the sandbox.
    #[param(pattern = "^/")]
    pub path: Option<String>,
    /// Octal permission bits for a write (default 0644).
    #[param(pattern = "^0?[0-7]{1,4}$")]
    pub mode: Option<String>,
    /// For list and delete.
    #[serde(default)]
    pub recursive: bool,
}

impl PathQuery {
    /// The path, and the mode parsed when given. Every operation that takes
    /// these parameters checks the mode, not only the write that uses it:
    /// the document states one pattern for it, and a bad value is a
    /// client's mistake wherever it is sent.
    fn path_and_mode(&self) -> Result<(String, Option<u32>), ApiError> {
        let mode = self.mode.as_deref().map(parse_mode).transpose()?;
        Ok((required_path(&self.path)?, mode))
    }
}

fn required_path(path: &Option<String>) -> Result<String, ApiError> {
    path.clone().ok_or_else(|| {
        ApiError(Error::InvalidRequest(
            "the path query parameter is required".into(),
        ))
    })
}

fn file_note(resp: Response, id: &str, path: &str) -> Response {
    note(resp, Some(id.to_owned()), serde_json::json!({"path": path}))
}

/// Write a file.
///
/// Creates or replaces the file at `path` with the raw request body, making missing parent
/// directories, with `mode` (default `0644`). The body is streamed to the sandbox, never held whole
/// in memory, and is limited by the upload size limit (`413` past it). Answers the new entry.
#[utoipa::path(put, path = "/v1/sandboxes/{id}/files", tag = "files", params(PathQuery),
    request_body(content = Option<RawBytes>, content_type = "application/octet-stream"),
    responses((status = 201, body = api::FileEntry), (status = 413, body = super::error::ErrorBody)))]
pub async fn file_write(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    Q(q): Q<PathQuery>,
    body: Body,
) -> ApiResult<Response> {
    let (path, mode) = match q.path_and_mode() {
        Ok(p) => p,
        Err(e) => {
            drain_refused(body.into_data_stream()).await;
            return Err(e);
        }
    };
    let entry = limited_upload(&s, body, |stream| {
        s.app.file_write(&who, &id, &path, mode, stream)
    })
    .await?;
    Ok(file_note(
        (StatusCode::CREATED, Json(views::entry(&entry))).into_response(),
        &id,
        &path,
    ))
}

/// Runs `upload` over the request body, counting bytes as they pass and
/// failing the stream past the configured limit, so an upload is never
/// held whole and never grows past that size (`413`).
pub(super) async fn limited_upload<T, F>(
    s: &AppState,
    body: Body,
    upload: impl FnOnce(ByteStream) -> F,
) -> Result<T, ApiError>
where
    F: std::future::Future<Output = stacyvm_core::Result<T>>,
{
    let limit = s.app.config().limits.upload_bytes;
    let over = Arc::new(AtomicBool::new(false));
    let flag = over.clone();
    let mut seen: u64 = 0;
    // Shared, so that what a refused upload left unread can be drained.
    let body = Arc::new(tokio::sync::Mutex::new(body.into_data_stream()));
    let source = futures_util::stream::unfold(body.clone(), |b| async move {
        let next = b.lock().await.next().await;
        next.map(|item| (item, b))
    });
    let stream: ByteStream = Box::pin(source.map(move |chunk| match chunk {
        Ok(b) => {
            seen += b.len() as u64;
            if seen > limit {
                flag.store(true, Ordering::SeqCst);
                Err(std::io::Error::other("upload is over the size limit"))
            } else {
                Ok(b)
            }
        }
        Err(e) => Err(std::io::Error::other(e)),
    }));
    match upload(stream).await {
        Ok(v) => Ok(v),
        Err(_) if over.load(Ordering::SeqCst) => Err(ApiError(Error::PayloadTooLarge(format!(
            "upload is over the {limit}-byte limit"
        )))),
        Err(e) => {
            drain_refused(&mut *body.lock().await).await;
            Err(e.into())
        }
    }
}

/// Reads what is left of a refused upload, up to 64 MiB and 10 s, so that a
/// client still sending reads the refusal instead of a reset connection.
/// Bodies beyond that are cut off with the connection.
pub(super) async fn drain_refused<S>(mut body: S)
where
    S: futures_util::Stream<Item = Result<bytes::Bytes, axum::Error>> + Unpin,
{
    let drained = async {
        let mut seen = 0usize;
        while let Some(Ok(chunk)) = body.next().await {
            seen += chunk.len();
            if seen > 64 << 20 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), drained).await;
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ArchiveQuery {
    /// Absolute path of the directory to unpack into (created with its
    /// parents when missing).
    #[param(pattern = "^/")]
    pub path: Option<String>,
}

/// Upload a tar archive and unpack it.
///
/// Unpacks a tar archive into a directory of the sandbox, in one request:
/// the way to upload a whole tree. Regular files, directories, symlinks
/// and hard links, each with its mode; nothing lands outside the
/// directory: an entry with an absolute path, a `..` component, a parent
/// that leads out through a symlink, or another type (devices, FIFOs) is
/// refused with `400` (entries before it stay written). Files appear whole
/// or not at all. The body is streamed and counts against the upload size
/// limit.
#[utoipa::path(put, path = "/v1/sandboxes/{id}/files/archive", tag = "files", params(ArchiveQuery),
    request_body(content = RawBytes, content_type = "application/x-tar"),
    responses((status = 201, body = api::ArchiveSummary), (status = 400, body = super::error::ErrorBody),
        (status = 413, body = super::error::ErrorBody)))]
pub async fn file_archive_put(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    Q(q): Q<ArchiveQuery>,
    body: Body,
) -> ApiResult<Response> {
    let path = required_path(&q.path)?;
    // A tar stream has at least its end-of-archive blocks: no body at all
    // is a request that forgot its archive, not an empty one.
    let mut data = body.into_data_stream();
    let first = loop {
        match data.next().await {
            Some(Ok(chunk)) if chunk.is_empty() => continue,
            Some(chunk) => break chunk,
            None => {
                return Err(ApiError(Error::InvalidRequest(
                    "the request body is empty: send the archive as a tar stream".into(),
                )))
            }
        }
    };
    let body = Body::from_stream(futures_util::stream::once(async move { first }).chain(data));
    let summary = limited_upload(&s, body, |stream| {
        s.app.file_extract(&who, &id, &path, stream)
    })
    .await?;
    let detail = serde_json::json!({"path": path, "files": summary.files, "bytes": summary.bytes});
    Ok(note(
        (StatusCode::CREATED, Json(views::archive(summary))).into_response(),
        Some(id),
        detail,
    ))
}

/// Download a file.
///
/// The file's raw bytes as `application/octet-stream`, streamed. A missing file is `404`; a directory
/// is `400` (list it instead).
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files", tag = "files", params(PathQuery),
    responses((status = 200, content_type = "application/octet-stream", body = RawBytes),
        (status = 404, body = super::error::ErrorBody), (status = 400, body = super::error::ErrorBody)))]
pub async fn file_read(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    Q(q): Q<PathQuery>,
) -> ApiResult<Response> {
    let path = q.path_and_mode()?.0;
    let stream = s.app.file_read(&who, &id, &path).await?;
    Ok(streamed("application/octet-stream", stream))
}

/// A download's body, sent as it arrives.
fn streamed(content_type: &'static str, stream: ByteStream) -> Response {
    (
        [(header::CONTENT_TYPE, content_type)],
        Body::from_stream(stream),
    )
        .into_response()
}

/// Download a directory as a tar archive.
///
/// `path` as an `application/x-tar` stream, the way to download a whole tree in one request: a
/// directory's entries named relative to it (unpacking the archive with `PUT …/files/archive`
/// into a directory gives back the tree), a regular file under its own name. Regular files,
/// directories and symlinks with their modes, owners and modification times; symlinks are stored as
/// links and never followed; sockets, FIFOs and devices are left out, and so are `/proc` and `/sys`
/// when the directory is above them. A missing path is `404`; a sandbox whose agent predates
/// archives is `409 unsupported`.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files/archive", tag = "files", params(PathQuery),
    responses((status = 200, content_type = "application/x-tar", body = RawBytes),
        (status = 404, body = super::error::ErrorBody), (status = 400, body = super::error::ErrorBody),
        (status = 409, body = super::error::ErrorBody)))]
pub async fn file_archive_get(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    Q(q): Q<PathQuery>,
) -> ApiResult<Response> {
    let path = q.path_and_mode()?.0;
    let stream = s.app.file_archive(&who, &id, &path).await?;
    Ok(streamed("application/x-tar", stream))
}

/// Describe a path.
///
/// The entry at `path`: type, size, mode, modification time, and a symlink's target (symlinks are not
/// followed).
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files/stat", tag = "files", params(PathQuery),
    responses((status = 200, body = api::FileEntry)))]
pub async fn file_stat(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    Q(q): Q<PathQuery>,
) -> ApiResult<Json<api::FileEntry>> {
    let path = q.path_and_mode()?.0;
    Ok(Json(views::entry(
        &s.app.file_stat(&who, &id, &path).await?,
    )))
}

/// List a directory.
///
/// The entries of the directory at `path`, sorted by path; with `recursive=true` everything under it.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files/list", tag = "files", params(PathQuery),
    responses((status = 200, body = api::Entries)))]
pub async fn file_list(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    Q(q): Q<PathQuery>,
) -> ApiResult<Json<api::Entries>> {
    let path = q.path_and_mode()?.0;
    let entries = s.app.file_list(&who, &id, &path, q.recursive).await?;
    Ok(Json(api::Entries {
        entries: entries.iter().map(views::entry).collect(),
    }))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct GlobQuery {
    /// e.g. `/work/**/*.py`; `**` crosses directories.
    #[param(pattern = "^/")]
    pub pattern: Option<String>,
}

/// Find files by pattern.
///
/// The paths matching `pattern` (an absolute glob), sorted; `**` crosses directories.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files/glob", tag = "files", params(GlobQuery),
    responses((status = 200, body = api::Paths)))]
pub async fn file_glob(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    Q(q): Q<GlobQuery>,
) -> ApiResult<Json<api::Paths>> {
    let pattern = q.pattern.ok_or_else(|| {
        ApiError(Error::InvalidRequest(
            "the pattern query parameter is required".into(),
        ))
    })?;
    Ok(Json(api::Paths {
        paths: s.app.file_glob(&who, &id, &pattern).await?,
    }))
}

/// Move or rename a file.
///
/// Moves `from` to `to` inside the sandbox. If `to` exists and `overwrite` is not set the answer is
/// `409 conflict`. Answers the moved entry.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/files/move", tag = "files", request_body = api::MoveFile,
    responses((status = 200, body = api::FileEntry), (status = 409, body = super::error::ErrorBody)))]
pub async fn file_move(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<api::MoveFile>,
) -> ApiResult<Response> {
    let entry = s
        .app
        .file_move(&who, &id, &b.from, &b.to, b.overwrite)
        .await?;
    Ok(note(
        Json(views::entry(&entry)).into_response(),
        Some(id),
        serde_json::json!({"from": b.from, "to": b.to, "overwrite": b.overwrite}),
    ))
}

/// Change a file's mode.
///
/// Sets the permission bits of `path` to `mode` (octal, e.g. `0755`); answers the entry.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/files/chmod", tag = "files", request_body = api::Chmod,
    responses((status = 200, body = api::FileEntry)))]
pub async fn file_chmod(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<api::Chmod>,
) -> ApiResult<Response> {
    let mode = parse_mode(&b.mode)?;
    let entry = s.app.file_chmod(&who, &id, &b.path, mode).await?;
    Ok(file_note(
        Json(views::entry(&entry)).into_response(),
        &id,
        &b.path,
    ))
}

/// Make a directory.
///
/// Creates the directory at `path`, and with `parents` (the default) every missing parent; answers the
/// new entry.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/files/mkdir", tag = "files", request_body = api::Mkdir,
    responses((status = 201, body = api::FileEntry)))]
pub async fn file_mkdir(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<api::Mkdir>,
) -> ApiResult<Response> {
    let entry = s.app.file_mkdir(&who, &id, &b.path, b.parents).await?;
    Ok(file_note(
        (StatusCode::CREATED, Json(views::entry(&entry))).into_response(),
        &id,
        &b.path,
    ))
}

/// Delete a file or directory.
///
/// Removes `path`; a missing path is `404`, and a non-empty directory needs `recursive=true` (else
/// `409 conflict`).
#[utoipa::path(delete, path = "/v1/sandboxes/{id}/files", tag = "files", params(PathQuery),
    responses((status = 204), (status = 404, body = super::error::ErrorBody), (status = 409, body = super::error::ErrorBody)))]
pub async fn file_delete(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    Q(q): Q<PathQuery>,
) -> ApiResult<Response> {
    let path = q.path_and_mode()?.0;
    s.app.file_delete(&who, &id, &path, q.recursive).await?;
    Ok(file_note(
        StatusCode::NO_CONTENT.into_response(),
        &id,
        &path,
    ))
}
