//! Handlers of `/v1/sandboxes` (lifecycle, logs, exec, streaming exec).

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::{stream, StreamExt};
use serde::Deserialize;
use stacyvm_core::{Error, ExecEvent, SandboxId, SandboxState};

use super::error::{ApiError, ApiResult};
use super::extract::{query_pairs, Auth, JsonBody, Path, Q};
use super::{note, AppState};
use crate::app::sandboxes::CreateSandbox;
use crate::app::views;
use stacyvm_api as api;

/// Create a sandbox.
///
/// Starts a sandbox from `image` (a catalog image, or for Docker an image the daemon has) or from a
/// `template`, and answers `201` once commands can run in it (state `running`). Everything but
/// `image`/`template` has a server default: the first healthy provider, `network: none`,
/// `timeout_s: 300`; at `expires_at` the sandbox is destroyed. A repeated create with the same
/// `Idempotency-Key` header (same tenant) answers the first sandbox instead of making a second.
/// Errors: `422 image_not_found`, `429 quota_exceeded`, `503 no_capacity` when no worker or
/// provider can take it (the message says why).
#[utoipa::path(post, path = "/v1/sandboxes", tag = "sandboxes", request_body = api::CreateSandbox,
    params(("Idempotency-Key" = Option<String>, Header, description = "repeat-safe create")),
    responses((status = 201, body = api::Sandbox), (status = 400, body = super::error::ErrorBody),
        (status = 422, body = super::error::ErrorBody), (status = 429, body = super::error::ErrorBody),
        (status = 503, body = super::error::ErrorBody)))]
pub async fn sandbox_create(
    State(s): State<AppState>,
    Auth(who): Auth,
    headers: HeaderMap,
    JsonBody(body): JsonBody<api::CreateSandbox>,
) -> ApiResult<Response> {
    let (network, egress_allow) = super::egress::network_from_api(body.network)?;
    let idempotency_key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| {
                    ApiError(Error::InvalidRequest(
                        "Idempotency-Key must be printable ASCII".into(),
                    ))
                })?
                .to_owned(),
        ),
    };
    // The create runs to its end even if this call is cut off (the client
    // went away, or the request timeout answered first): a create dropped
    // half-way would leave its sandbox `starting`, holding quota, with a
    // runtime nobody finishes. The client finds it again by listing, or by
    // retrying with the same Idempotency-Key.
    let app = s.app.clone();
    let create = tokio::spawn(async move {
        app.sandbox_create(
            &who,
            CreateSandbox {
                image: body.image,
                template: body.template,
                provider: body.provider,
                cpu: body.cpu,
                memory_mb: body.memory_mb,
                timeout_s: body.timeout_s,
                env: body.env,
                labels: body.labels,
                worker_labels: body.worker_labels,
                workdir: body.workdir,
                network,
                idempotency_key,
                egress_allow,
                volumes: body
                    .volumes
                    .into_iter()
                    .map(|v| stacyvm_core::VolumeMount {
                        volume: v.volume,
                        path: v.path,
                        read_only: v.read_only,
                    })
                    .collect(),
            },
        )
        .await
    });
    let created = create
        .await
        .map_err(|e| ApiError(Error::internal("the create task", e)))??;
    let rec = &created.sandbox;
    let resp = (StatusCode::CREATED, Json(views::sandbox(rec))).into_response();
    Ok(note(
        resp,
        Some(rec.id.to_string()),
        serde_json::json!({"image": rec.image, "provider": rec.provider, "idempotent_replay": created.existing}),
    ))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only sandboxes in this state.
    pub state: Option<String>,
    /// `k=v`; repeat to require several labels.
    pub label: Option<String>,
    /// At most 1000; default 100.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

/// List sandboxes.
///
/// The caller's tenant's sandboxes (an admin key sees every tenant's), newest first, destroyed ones
/// included. Filter with `state` and with `label=k=v` (repeat it to require several labels); page
/// with `limit` and `cursor` (`next_cursor` is null on the last page).
#[utoipa::path(get, path = "/v1/sandboxes", tag = "sandboxes", params(ListQuery),
    responses((status = 200, body = api::SandboxList)))]
pub async fn sandbox_list(
    State(s): State<AppState>,
    Auth(who): Auth,
    uri: axum::http::Uri,
    Q(q): Q<ListQueryLoose>,
) -> ApiResult<Json<api::SandboxList>> {
    let state = match q.state.as_deref() {
        None | Some("") => None,
        Some(st) => Some(
            SandboxState::parse(st)
                .ok_or_else(|| ApiError(Error::InvalidRequest(format!("unknown state {st:?}"))))?,
        ),
    };
    let mut labels = Vec::new();
    for (k, v) in query_pairs(uri.query()) {
        if k == "label" {
            let (lk, lv) = v.split_once('=').ok_or_else(|| {
                ApiError(Error::InvalidRequest(format!(
                    "label filter {v:?} must look like key=value"
                )))
            })?;
            labels.push((lk.to_owned(), lv.to_owned()));
        }
    }
    let page = s
        .app
        .sandbox_list(&who, state, labels, q.limit, q.cursor)
        .await?;
    Ok(Json(api::SandboxList {
        sandboxes: page.items.iter().map(views::sandbox).collect(),
        next_cursor: page.next_cursor,
    }))
}

/// The list query, with repeated `label` keys tolerated (they are read
/// from the raw query string).
#[derive(Deserialize)]
pub struct ListQueryLoose {
    pub state: Option<String>,
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

/// Get a sandbox.
///
/// Its state, resources, labels, times and, for a `failed` sandbox, the reason. Destroyed sandboxes
/// stay readable. Another tenant's sandbox is `404`, never `403`.
#[utoipa::path(get, path = "/v1/sandboxes/{id}", tag = "sandboxes",
    responses((status = 200, body = api::Sandbox), (status = 404, body = super::error::ErrorBody)))]
pub async fn sandbox_get(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<api::Sandbox>> {
    let rec = s.app.sandbox_visible(&who, &id).await?;
    Ok(Json(views::sandbox(&rec)))
}

/// Destroy a sandbox.
///
/// Stops its runtime and frees its quota; the record stays readable as `destroyed`. Idempotent: a
/// repeat answers `204` again. An unknown id is `404`.
#[utoipa::path(delete, path = "/v1/sandboxes/{id}", tag = "sandboxes",
    responses((status = 204), (status = 404, body = super::error::ErrorBody)))]
pub async fn sandbox_destroy(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    s.app.sandbox_destroy(&who, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Set a sandbox's lifetime.
///
/// Sets `expires_at` to now + `timeout_s`, longer or shorter than before, within the tenant's
/// `max_timeout_s`. At `expires_at` the sandbox is destroyed automatically.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/timeout", tag = "sandboxes", request_body = api::SetTimeout,
    responses((status = 200, body = api::Sandbox)))]
pub async fn sandbox_timeout(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<api::SetTimeout>,
) -> ApiResult<Json<api::Sandbox>> {
    let rec = s.app.sandbox_set_timeout(&who, &id, body.timeout_s).await?;
    Ok(Json(views::sandbox(&rec)))
}

/// Pause a sandbox.
///
/// Freezes every process of the sandbox (state `paused`); exec and files answer `409` until it is
/// resumed. A provider that cannot pause answers `409 unsupported`.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/pause", tag = "sandboxes",
    responses((status = 200, body = api::Sandbox), (status = 409, body = super::error::ErrorBody)))]
pub async fn sandbox_pause(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<api::Sandbox>> {
    Ok(Json(views::sandbox(
        &s.app.sandbox_pause(&who, &id, true).await?,
    )))
}

/// Resume a paused sandbox.
///
/// Thaws its processes; the sandbox is `running` again. `409 unsupported` where the provider cannot
/// pause.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/resume", tag = "sandboxes",
    responses((status = 200, body = api::Sandbox), (status = 409, body = super::error::ErrorBody)))]
pub async fn sandbox_resume(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<api::Sandbox>> {
    Ok(Json(views::sandbox(
        &s.app.sandbox_pause(&who, &id, false).await?,
    )))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct StatsQuery {
    /// Only readings at or after this time (RFC 3339).
    pub since: Option<String>,
    /// Only readings at or before this time (RFC 3339).
    pub until: Option<String>,
}

fn stats_time(v: Option<&str>, what: &str) -> ApiResult<Option<time::OffsetDateTime>> {
    v.map(|v| {
        time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339).map_err(
            |_| {
                ApiError::from(Error::InvalidRequest(format!(
                    "{what} {v:?} is not an RFC 3339 time"
                )))
            },
        )
    })
    .transpose()
}

/// Read a sandbox's resource use.
///
/// CPU, memory and disk readings of a running or paused sandbox, oldest first, as its provider
/// measures them (Docker's engine stats, the cgroup of a namespaces or PRoot sandbox); a field the
/// provider cannot measure is null. The call takes a new reading unless the newest is under a
/// second old, and the server keeps reading every 5 s for ten minutes after the last call, so
/// repeated calls see a series (up to 120 readings). `cpu_used_pct` is the share of the
/// sandbox's CPUs used since the reading before. `409 unsupported` where the provider cannot
/// measure; `409 conflict` for a sandbox that is not running or paused.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/stats", tag = "sandboxes", params(StatsQuery),
    responses((status = 200, body = api::SandboxStats), (status = 400, body = super::error::ErrorBody),
        (status = 404, body = super::error::ErrorBody), (status = 409, body = super::error::ErrorBody)))]
pub async fn sandbox_stats(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    Q(q): Q<StatsQuery>,
) -> ApiResult<Json<api::SandboxStats>> {
    let since = stats_time(q.since.as_deref(), "since")?;
    let until = stats_time(q.until.as_deref(), "until")?;
    let answer = s.app.sandbox_stats(&who, &id, since, until).await?;
    if let Some(e) = answer.unavailable {
        return Err(e.into());
    }
    Ok(Json(api::SandboxStats {
        sandbox_id: id,
        samples: answer.samples.iter().map(views::stats_sample).collect(),
    }))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// Stream new lines as SSE until the sandbox ends.
    #[serde(default)]
    pub follow: bool,
}

/// Read a sandbox's logs.
///
/// Lifecycle events (created, started, destroyed), provider messages and the runtime's own output,
/// oldest first. With `follow=true` the answer is a `text/event-stream` that keeps sending new lines
/// until the sandbox ends or the client leaves.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/logs", tag = "sandboxes", params(LogsQuery),
    responses((status = 200, body = api::Logs)))]
pub async fn sandbox_logs(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    Q(q): Q<LogsQuery>,
) -> ApiResult<Response> {
    let lines = s.app.sandbox_logs(&who, &id).await?;
    if !q.follow {
        return Ok(Json(api::Logs {
            lines: lines.iter().map(views::log_line).collect(),
        })
        .into_response());
    }
    // Follow: send what exists, then poll for lines not sent yet until the
    // sandbox reaches a terminal state (its last lifecycle line included).
    // A follower keeps only a position, and polls less often while nothing
    // happens, so idle followers cost little.
    let mut cursor = LogCursor::default();
    let first: Vec<Event> = cursor.fresh(&lines).map(log_event).collect();
    let app = s.app.clone();
    let follow = stream::unfold(
        (app, who, id, cursor, FOLLOW_POLL_MIN, false),
        move |(app, who, id, mut cursor, wait, done)| async move {
            if done {
                return None;
            }
            tokio::time::sleep(wait).await;
            let (terminal, lines) = match app.sandbox_logs_and_state(&who, &id).await {
                Ok((state, lines)) => (state.is_terminal(), lines),
                // Gone or unreadable: end the stream rather than poll on.
                Err(_) => (true, Vec::new()),
            };
            let fresh: Vec<&stacyvm_provider::LogLine> = cursor.fresh(&lines).collect();
            // Provider diagnostics are restated on every read; only lines
            // from the runtime or the lifecycle mean something happened.
            let active = fresh.iter().any(|l| l.source != "provider");
            let wait = if active {
                FOLLOW_POLL_MIN
            } else {
                (wait * 2).min(FOLLOW_POLL_MAX)
            };
            let events: Vec<Event> = fresh.into_iter().map(log_event).collect();
            Some((stream::iter(events), (app, who, id, cursor, wait, terminal)))
        },
    )
    .flatten();
    let events = stream::iter(first).chain(follow).map(Ok::<_, Infallible>);
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// How often a log follower polls: this soon after something happened,
/// backing off to the maximum while nothing does.
const FOLLOW_POLL_MIN: Duration = Duration::from_millis(500);
const FOLLOW_POLL_MAX: Duration = Duration::from_secs(5);

fn log_event(l: &stacyvm_provider::LogLine) -> Event {
    Event::default()
        .event("log")
        .json_data(views::log_line(l))
        .unwrap_or_else(|_| Event::default().event("log").data("{}"))
}

/// What a log follower has sent, in constant space. Provider and runtime
/// lines come in time order, so a position is enough: the newest time sent
/// and how many lines with exactly that time were sent. Lifecycle lines are
/// made from the sandbox's record and may carry an older time than lines
/// already sent (a failure is stamped when it happened), so the few of them
/// there can be are remembered one by one.
#[derive(Default)]
struct LogCursor {
    last: Option<time::OffsetDateTime>,
    at_last: usize,
    lifecycle: Vec<(time::OffsetDateTime, String)>,
}

/// At most this many lifecycle lines are remembered (a record yields four
/// at most); past it the oldest is forgotten rather than growing.
const LIFECYCLE_LINES_KEPT: usize = 16;

impl LogCursor {
    /// The lines of `lines` (sorted by time) not sent yet, in order; marks
    /// them sent.
    fn fresh<'a>(
        &mut self,
        lines: &'a [stacyvm_provider::LogLine],
    ) -> impl Iterator<Item = &'a stacyvm_provider::LogLine> {
        let mut out = Vec::new();
        let mut at_last_seen = 0;
        let (last, at_last) = (self.last, self.at_last);
        for l in lines {
            if l.source == "lifecycle" {
                if !self
                    .lifecycle
                    .iter()
                    .any(|(ts, m)| *ts == l.ts && *m == l.message)
                {
                    if self.lifecycle.len() == LIFECYCLE_LINES_KEPT {
                        self.lifecycle.remove(0);
                    }
                    self.lifecycle.push((l.ts, l.message.clone()));
                    out.push(l);
                }
                continue;
            }
            let new = match last {
                None => true,
                Some(t) if l.ts > t => true,
                Some(t) if l.ts == t => {
                    at_last_seen += 1;
                    at_last_seen > at_last
                }
                Some(_) => false,
            };
            if new {
                if self.last == Some(l.ts) {
                    self.at_last += 1;
                } else {
                    self.last = Some(l.ts);
                    self.at_last = 1;
                }
                out.push(l);
            }
        }
        out.into_iter()
    }
}

/// What the audit log keeps of a command: the program, never its arguments
/// (they may hold secrets).
fn exec_detail(sandbox: &SandboxId, cmd: &[String]) -> serde_json::Value {
    serde_json::json!({"sandbox": sandbox, "program": cmd.first()})
}

/// Run a command and wait for it.
///
/// `cmd` is an argv array, never joined into a shell string (use `["sh", "-c", "…"]` for a shell).
/// Answers once the command ends, with its exit code, output and duration. A program that cannot
/// start exits 127 (not found) or 126 (not executable) with the reason on stderr; past `timeout_s`
/// (default 60) its process group is killed (`timed_out`, `signal` 9); output past the cap is cut
/// and flagged `*_truncated`. A sandbox that is not running is `409 conflict`.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/exec", tag = "exec", request_body = api::ExecRequest,
    responses((status = 200, body = api::ExecResponse), (status = 409, body = super::error::ErrorBody),
        (status = 429, body = super::error::ErrorBody)))]
pub async fn sandbox_exec(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<api::ExecRequest>,
) -> ApiResult<Response> {
    let program = body.cmd.first().cloned();
    let (sandbox, out) = s.app.sandbox_exec(&who, &id, body).await?;
    let mut detail = exec_detail(&sandbox, program.as_slice());
    detail["exit_code"] = serde_json::json!(out.status.exit_code);
    detail["timed_out"] = serde_json::json!(out.status.timed_out);
    Ok(note(
        Json(views::exec_response(out)).into_response(),
        Some(sandbox.to_string()),
        detail,
    ))
}

/// Run a command and stream its output.
///
/// The same body as exec; the answer is a `text/event-stream` sent while the command runs:
/// `event: stdout` / `event: stderr` with `data: {"data": "<text>"}` (plus `data_b64` holding the
/// exact bytes when a chunk is not UTF-8), then always last `event: exit` with
/// `{"exit_code", "signal", "duration_ms", "timed_out"}`, or `event: error` with
/// `{"code", "message"}` if the stream fails. A client that disconnects kills the command.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/exec/stream", tag = "exec", request_body = api::ExecRequest,
    responses((status = 200, description = "text/event-stream of stdout, stderr, then exit (or error) events")))]
pub async fn sandbox_exec_stream(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<api::ExecRequest>,
) -> ApiResult<Response> {
    let program = body.cmd.first().cloned();
    let run = s.app.sandbox_exec_stream(&who, &id, body).await?;
    let detail = exec_detail(&run.sandbox, program.as_slice());
    let sandbox = run.sandbox;
    let (exec, slot) = (run.events, run.slot);
    // Ends after `exit` or `error`; if the runtime goes away mid-stream the
    // client still gets an `error` as the last event. Dropping the response
    // (client gone) drops `exec`, which kills the command.
    // The exec slot lives as long as the stream: it is freed when the
    // stream ends or the client goes away.
    let events = stream::unfold(
        (exec, false, slot),
        |(mut exec, finished, slot)| async move {
            if finished {
                return None;
            }
            let (event, done) = match exec.next().await {
            Some(Ok(ExecEvent::Stdout(b))) => (Event::default().event("stdout").json_data(views::stream_chunk(&b)), false),
            Some(Ok(ExecEvent::Stderr(b))) => (Event::default().event("stderr").json_data(views::stream_chunk(&b)), false),
            Some(Ok(ExecEvent::Exit(st))) => (
                Event::default().event("exit").json_data(views::exit_status(&st)),
                true,
            ),
            Some(Err(e)) => (
                Event::default().event("error").json_data(serde_json::json!({"code": e.code(), "message": e.message()})),
                true,
            ),
            None => (
                Event::default().event("error").json_data(serde_json::json!({
                    "code": "provider_unavailable", "message": "the command's stream ended before it exited",
                })),
                true,
            ),
        };
            let event = event.unwrap_or_else(|_| {
                Event::default()
                    .event("error")
                    .data("{\"code\":\"internal\"}")
            });
            Some((Ok::<_, Infallible>(event), (exec, done, slot)))
        },
    );
    let resp = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response();
    Ok(note(resp, Some(sandbox.to_string()), detail))
}

#[cfg(test)]
mod tests {
    use super::*;
    use stacyvm_provider::LogLine;

    fn line(secs: i64, source: &str, message: &str) -> LogLine {
        LogLine {
            ts: time::OffsetDateTime::from_unix_timestamp(1_700_000_000 + secs).unwrap(),
            source: source.into(),
            message: message.into(),
        }
    }

    fn messages<'a>(it: impl Iterator<Item = &'a LogLine>) -> Vec<&'a str> {
        it.map(|l| l.message.as_str()).collect()
    }

    #[test]
    fn a_log_cursor_sends_each_line_once() {
        let mut c = LogCursor::default();
        let first = vec![
            line(0, "lifecycle", "created"),
            line(1, "runtime", "a"),
            line(1, "runtime", "b"),
        ];
        assert_eq!(messages(c.fresh(&first)), ["created", "a", "b"]);
        assert!(c.fresh(&first).next().is_none(), "nothing twice");

        // A third line with the same time, a later one, and a lifecycle line
        // stamped earlier than what was already sent.
        let second = vec![
            line(0, "lifecycle", "created"),
            line(0, "lifecycle", "failed (x): y"),
            line(1, "runtime", "a"),
            line(1, "runtime", "b"),
            line(1, "runtime", "c"),
            line(2, "runtime", "d"),
        ];
        assert_eq!(messages(c.fresh(&second)), ["failed (x): y", "c", "d"]);
        assert!(c.fresh(&second).next().is_none());

        // Provider lines that vanish with the runtime do not make old ones new.
        let third = vec![
            line(0, "lifecycle", "created"),
            line(3, "lifecycle", "destroyed"),
        ];
        assert_eq!(messages(c.fresh(&third)), ["destroyed"]);
    }

    #[test]
    fn a_log_cursor_stays_small() {
        let mut c = LogCursor::default();
        for i in 0..10_000 {
            let lines = vec![
                line(i, "runtime", "tick"),
                line(i, "lifecycle", &format!("odd {i}")),
            ];
            assert_eq!(c.fresh(&lines).count(), 2);
        }
        assert!(c.lifecycle.len() <= LIFECYCLE_LINES_KEPT);
    }
}
