//! Background processes over HTTP: start, list, read and follow output
//! (SSE), write stdin, send signals. The processes live in the sandbox's
//! agent; these handlers only translate.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::{stream, StreamExt};
use serde::Deserialize;
use stacyvm_provider::agent_client::{ProcEvent, ProcInfo};

use super::error::ApiResult;
use super::extract::{Auth, JsonBody, Path, Q};
use super::{note, AppState};
use crate::app::views;

pub use stacyvm_api::{Process, ProcessList, ProcessSignal, ProcessStart, StdinWritten};

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StdinQuery {
    /// `true` closes stdin after writing the body (an empty body just closes it).
    pub close: Option<bool>,
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct OutputQuery {
    /// `false` sends what is buffered now and ends instead of following
    /// live output (default `true`).
    pub follow: Option<bool>,
}

fn rfc3339(ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

pub fn process_view(p: ProcInfo) -> Process {
    Process {
        pid: p.pid,
        cmd: p.cmd,
        cwd: p.cwd,
        state: p.state,
        exit_code: p.exit_code,
        signal: p.signal,
        started_at: rfc3339(p.started_at_ms),
        ended_at: p.ended_at_ms.map(rfc3339),
        stdin_open: p.stdin_open,
        truncated: p.stdout_dropped + p.stderr_dropped > 0,
        stdout_dropped: p.stdout_dropped,
        stderr_dropped: p.stderr_dropped,
    }
}

fn detail(id: &str, pid: Option<u32>) -> serde_json::Value {
    serde_json::json!({"sandbox": id, "pid": pid})
}

/// Start a background process.
///
/// Starts `cmd` in the sandbox and answers at once with the process. The process is kept by the
/// sandbox's agent: it keeps running when the client goes away or the control plane restarts, and
/// its output (the last 1 MiB of each stream) can be read later. A sandbox runs at most 32 at once
/// (`409 conflict` beyond); a program that cannot be started is `400`.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/processes", tag = "exec", request_body = ProcessStart,
    responses((status = 201, body = Process), (status = 409, body = super::error::ErrorBody),
        (status = 429, body = super::error::ErrorBody)))]
pub async fn process_start(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<ProcessStart>,
) -> ApiResult<Response> {
    let program = body.cmd.first().cloned();
    let (sandbox, info) = s
        .app
        .process_start(&who, &id, body.cmd, body.env, body.cwd, body.user)
        .await?;
    let pid = info.pid;
    Ok(note(
        (StatusCode::CREATED, Json(process_view(info))).into_response(),
        Some(sandbox.to_string()),
        serde_json::json!({"sandbox": sandbox, "program": program, "pid": pid}),
    ))
}

/// List background processes.
///
/// Every background process the sandbox's agent keeps, running and exited.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/processes", tag = "exec",
    responses((status = 200, body = ProcessList)))]
pub async fn process_list(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let list = s.app.process_list(&who, &id).await?;
    Ok(Json(ProcessList {
        processes: list.into_iter().map(process_view).collect(),
    })
    .into_response())
}

/// Describe a background process.
///
/// Its state, exit code and how much output was dropped; `404` when the sandbox keeps no such process.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/processes/{pid}", tag = "exec",
    responses((status = 200, body = Process), (status = 404, body = super::error::ErrorBody)))]
pub async fn process_get(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path((id, pid)): Path<(String, u32)>,
) -> ApiResult<Response> {
    let info = s.app.process_get(&who, &id, pid).await?;
    Ok(Json(process_view(info)).into_response())
}

/// Stream a background process's output.
///
/// A `text/event-stream`: everything still in the output buffer from the start, then live output
/// (unless `follow=false`), as `event: stdout` / `event: stderr` with `data: {"data": "<text>"}`
/// (plus `data_b64` when a chunk is not UTF-8); then, once the process has exited, `event: exit`
/// with `{"exit_code", "signal", "duration_ms", "timed_out", "stdout_dropped", "stderr_dropped"}`.
/// A failure ends the stream with `event: error`. Disconnecting does not touch the process.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/processes/{pid}/output", tag = "exec", params(OutputQuery),
    responses((status = 200, description = "text/event-stream of stdout, stderr, then exit (or error) events"),
        (status = 404, body = super::error::ErrorBody)))]
pub async fn process_output(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path((id, pid)): Path<(String, u32)>,
    Q(q): Q<OutputQuery>,
) -> ApiResult<Response> {
    let out = s
        .app
        .process_output(&who, &id, pid, q.follow.unwrap_or(true))
        .await?;
    let events = stream::unfold((out, false), |(mut out, finished)| async move {
        if finished {
            return None;
        }
        let (event, done) = match out.next().await {
            Some(Ok(ProcEvent::Stdout(b))) => (
                Event::default()
                    .event("stdout")
                    .json_data(views::stream_chunk(&b)),
                false,
            ),
            Some(Ok(ProcEvent::Stderr(b))) => (
                Event::default()
                    .event("stderr")
                    .json_data(views::stream_chunk(&b)),
                false,
            ),
            Some(Ok(ProcEvent::Exit(e))) => {
                let mut v = serde_json::to_value(views::exit_status(&e.status))
                    .unwrap_or_else(|_| serde_json::json!({}));
                v["stdout_dropped"] = serde_json::json!(e.stdout_dropped);
                v["stderr_dropped"] = serde_json::json!(e.stderr_dropped);
                (Event::default().event("exit").json_data(v), true)
            }
            Some(Err(e)) => (
                Event::default()
                    .event("error")
                    .json_data(serde_json::json!({"code": e.code(), "message": e.message()})),
                true,
            ),
            None => return None,
        };
        let event = event.unwrap_or_else(|_| {
            Event::default()
                .event("error")
                .data("{\"code\":\"internal\"}")
        });
        Some((Ok::<_, Infallible>(event), (out, done)))
    });
    let resp = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response();
    Ok(note(resp, Some(id.clone()), detail(&id, Some(pid))))
}

/// Write to a background process's stdin.
///
/// The raw request body is written to the process's stdin. With `close=true` stdin is closed
/// afterwards (so an empty body with `close=true` just closes it). Writing to a closed stdin is
/// `409 conflict`.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/processes/{pid}/stdin", tag = "exec", params(StdinQuery),
    request_body(content = Option<super::openapi::RawBytes>, content_type = "application/octet-stream"),
    responses((status = 200, body = StdinWritten), (status = 409, body = super::error::ErrorBody)))]
pub async fn process_stdin(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path((id, pid)): Path<(String, u32)>,
    Q(q): Q<StdinQuery>,
    body: Body,
) -> ApiResult<Response> {
    let close = q.close.unwrap_or(false);
    let written = super::files::limited_upload(&s, body, |stream| {
        s.app.process_stdin(&who, &id, pid, close, stream)
    })
    .await?;
    Ok(note(
        Json(StdinWritten {
            written,
            closed: close,
        })
        .into_response(),
        Some(id.clone()),
        detail(&id, Some(pid)),
    ))
}

/// Send a signal to a background process.
///
/// `signal` is one of TERM, KILL, INT, HUP, USR1, USR2, STOP, CONT (others are `400`); it goes to
/// the process's group. A process that already exited is `409 conflict`.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/processes/{pid}/signal", tag = "exec",
    request_body = ProcessSignal,
    responses((status = 200, body = Process), (status = 400, body = super::error::ErrorBody),
        (status = 409, body = super::error::ErrorBody)))]
pub async fn process_signal(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path((id, pid)): Path<(String, u32)>,
    JsonBody(body): JsonBody<ProcessSignal>,
) -> ApiResult<Response> {
    let info = s.app.process_signal(&who, &id, pid, &body.signal).await?;
    let mut d = detail(&id, Some(pid));
    d["signal"] = serde_json::json!(body.signal);
    Ok(note(
        Json(process_view(info)).into_response(),
        Some(id.clone()),
        d,
    ))
}
