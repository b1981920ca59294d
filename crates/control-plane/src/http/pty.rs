//! `GET /v1/sandboxes/{id}/pty`: an interactive terminal over a WebSocket.
//!
//! Binary frames carry terminal bytes both ways; a text frame
//! `{"resize": {"cols": C, "rows": R}}` resizes the terminal. When the
//! command exits the server closes the socket with code 1000 and the reason
//! `exit:N` (N is the exit code, or 128 + the signal number for a command a
//! signal ended). A failure after the upgrade closes with code 1011 and the
//! reason `error:` followed by the message. A client that closes the socket
//! kills the command's process group.

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::Deserialize;
use stacyvm_core::{Error, ExecEvent};
use stacyvm_provider::agent_client::{PtyInput, PtySize};

use super::error::{ApiError, ApiResult};
use super::extract::{query_pairs, Auth, Path};
use super::{note, AppState};
use crate::app::pty::RunningPty;

/// Size of a terminal whose client names none.
const DEFAULT_COLS: u16 = 80;
const DEFAULT_ROWS: u16 = 24;

/// Longest close reason a WebSocket close frame can carry.
const MAX_REASON: usize = 123;

/// Open an interactive terminal.
///
/// Upgrades to a WebSocket running `cmd` (repeat the parameter for each argv element; default the
/// image's shell `/bin/sh`) on a pseudo-terminal of `cols` × `rows` (default 80 × 24). Binary
/// frames carry terminal bytes both ways; a text frame `{"resize": {"cols": C, "rows": R}}` resizes
/// the terminal (the command gets `SIGWINCH`). When the command exits the socket closes with code
/// 1000 and reason `exit:N` (N is the exit code, or 128 + signal). A failure after the upgrade
/// closes with code 1011 and reason `error: <message>`. Closing the socket kills the command's
/// process group. The same admission as exec applies (member or admin key, running sandbox, exec
/// rate and slots); a sandbox that is not running is `409 conflict`.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/pty", tag = "exec",
    params(("cmd" = Option<String>, Query, description = "argv element; repeat for each (default /bin/sh)"),
        ("cols" = Option<u16>, Query, description = "terminal columns (default 80)"),
        ("rows" = Option<u16>, Query, description = "terminal rows (default 24)")),
    responses((status = 101, description = "WebSocket of terminal bytes"),
        (status = 400, body = super::error::ErrorBody), (status = 404, body = super::error::ErrorBody),
        (status = 409, body = super::error::ErrorBody), (status = 429, body = super::error::ErrorBody)))]
pub async fn sandbox_pty(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let mut cmd = Vec::new();
    let (mut cols, mut rows) = (DEFAULT_COLS, DEFAULT_ROWS);
    for (k, v) in query_pairs(query.as_deref()) {
        match k.as_str() {
            "cmd" => cmd.push(v),
            "cols" => cols = dimension("cols", &v)?,
            "rows" => rows = dimension("rows", &v)?,
            other => {
                return Err(ApiError(Error::InvalidRequest(format!(
                    "unknown query parameter {other:?} (expected cmd, cols, rows)"
                ))))
            }
        }
    }
    let ws = ws.map_err(|e| {
        ApiError(Error::InvalidRequest(format!(
            "this endpoint needs a WebSocket upgrade: {}",
            e.body_text()
        )))
    })?;
    let program = cmd.first().cloned();
    let run = s.app.sandbox_pty(&who, &id, cmd, cols, rows).await?;
    let detail = serde_json::json!({
        "sandbox": run.sandbox,
        "program": program.as_deref().unwrap_or(crate::app::pty::DEFAULT_SHELL),
        "pty": true,
    });
    let sandbox = run.sandbox.to_string();
    let resp = ws.on_upgrade(move |socket| bridge(socket, run));
    Ok(note(resp.into_response(), Some(sandbox), detail))
}

fn dimension(name: &str, v: &str) -> Result<u16, ApiError> {
    v.parse::<u16>().map_err(|_| {
        ApiError(Error::InvalidRequest(format!(
            "{name} must be a whole number between 1 and {}",
            crate::app::pty::MAX_DIMENSION
        )))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Control {
    resize: Resize,
}

#[derive(Deserialize)]
struct Resize {
    cols: u16,
    rows: u16,
}

/// Copies bytes between the socket and the terminal until the command
/// exits or the client goes away (which drops, and so kills, the command).
async fn bridge(mut socket: WebSocket, run: RunningPty) {
    let RunningPty {
        mut events,
        input,
        slot,
        ..
    } = run;
    let close = loop {
        tokio::select! {
            msg = socket.recv() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    if input.send(PtyInput::Bytes(b)).await.is_err() {
                        break None;
                    }
                }
                Some(Ok(Message::Text(t))) => match serde_json::from_str::<Control>(t.as_str()) {
                    Ok(Control { resize: Resize { cols, rows } })
                        if (1..=crate::app::pty::MAX_DIMENSION).contains(&cols)
                            && (1..=crate::app::pty::MAX_DIMENSION).contains(&rows) =>
                    {
                        if input.send(PtyInput::Resize(PtySize { cols, rows })).await.is_err() {
                            break None;
                        }
                    }
                    // A malformed control message ends the session with a
                    // reason rather than being typed into the terminal.
                    _ => break Some(close_frame(1008, format!(
                        "error: text frames must be {{\"resize\": {{\"cols\", \"rows\"}}}} with sizes 1..={}",
                        crate::app::pty::MAX_DIMENSION
                    ))),
                },
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                // Closed, gone or broken: dropping the events kills the command.
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
            },
            ev = events.next() => match ev {
                Some(Ok(ExecEvent::Stdout(b) | ExecEvent::Stderr(b))) => {
                    if socket.send(Message::Binary(b)).await.is_err() {
                        return;
                    }
                }
                Some(Ok(ExecEvent::Exit(st))) => {
                    let code = st
                        .exit_code
                        .or(st.signal.map(|s| 128 + s))
                        .unwrap_or(-1);
                    break Some(close_frame(1000, format!("exit:{code}")));
                }
                Some(Err(e)) => break Some(close_frame(1011, format!("error: {}", e.message()))),
                None => break Some(close_frame(1011, "error: the terminal's stream ended before the command exited".into())),
            },
        }
    };
    drop(slot);
    if let Some(frame) = close {
        let _ = socket.send(Message::Close(Some(frame))).await;
        // Wait briefly for the client's close, so the frame is delivered
        // before the connection goes away.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while let Some(Ok(m)) = socket.recv().await {
                if matches!(m, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
    drop(events);
}

fn close_frame(code: u16, mut reason: String) -> CloseFrame {
    if reason.len() > MAX_REASON {
        let mut cut = MAX_REASON;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
    }
    CloseFrame {
        code,
        reason: reason.into(),
    }
}
