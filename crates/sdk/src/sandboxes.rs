//! Sandbox calls: lifecycle, logs, exec and streamed exec.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use reqwest::Method;
use serde::Deserialize;

use crate::client::{request_id_of, Deadline, Retry};
use crate::models::*;
use crate::sse;
use crate::{Client, Error, Result};

/// The events of a streamed command, ending with [`ExecEvent::Exit`].
/// Dropping it before the end closes the connection, which kills the command.
pub struct ExecStream {
    inner: Pin<Box<dyn Stream<Item = Result<ExecEvent>> + Send>>,
    request_id: Option<String>,
}

impl ExecStream {
    /// The request id the server gave the stream.
    pub fn request_id(&self) -> Option<&str> {
        self.request_id.as_deref()
    }
}

impl Stream for ExecStream {
    type Item = Result<ExecEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// The lines of a followed sandbox log, until the sandbox ends.
pub struct LogStream {
    inner: Pin<Box<dyn Stream<Item = Result<LogLine>> + Send>>,
}

impl Stream for LogStream {
    type Item = Result<LogLine>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

#[derive(Deserialize)]
struct Chunk {
    data: String,
    #[serde(default)]
    data_b64: Option<String>,
}

#[derive(Deserialize)]
struct StreamError {
    code: String,
    message: String,
}

pub(crate) fn chunk_bytes(data: &str) -> Result<Bytes> {
    let c: Chunk =
        serde_json::from_str(data).map_err(|e| Error::Protocol(format!("an output chunk: {e}")))?;
    match c.data_b64 {
        Some(b) => base64::engine::general_purpose::STANDARD
            .decode(b)
            .map(Bytes::from)
            .map_err(|e| Error::Protocol(format!("an output chunk's base64: {e}"))),
        None => Ok(Bytes::from(c.data)),
    }
}

/// An `error` event's data as [`Error::Stream`].
pub(crate) fn stream_error(data: &str, request_id: &Option<String>) -> Error {
    match serde_json::from_str::<StreamError>(data) {
        Ok(se) => Error::Stream {
            code: se.code,
            message: se.message,
            request_id: request_id.clone(),
        },
        Err(_) => Error::Stream {
            code: "internal".into(),
            message: format!("the stream failed: {data}"),
            request_id: request_id.clone(),
        },
    }
}

/// One SSE event of an exec stream as an [`ExecEvent`]; `None` for events
/// this SDK does not know (skipped for forward compatibility).
fn exec_event(ev: &sse::SseEvent, request_id: &Option<String>) -> Option<Result<ExecEvent>> {
    Some(match ev.event.as_str() {
        "stdout" => chunk_bytes(&ev.data).map(ExecEvent::Stdout),
        "stderr" => chunk_bytes(&ev.data).map(ExecEvent::Stderr),
        "exit" => serde_json::from_str::<ExitStatus>(&ev.data)
            .map(ExecEvent::Exit)
            .map_err(|e| Error::Protocol(format!("the exit event: {e}"))),
        "error" => Err(stream_error(&ev.data, request_id)),
        _ => return None,
    })
}

/// The server's command timeout plus a margin, so a non-streamed exec is
/// not cut by the client before the server reports the timeout.
fn exec_deadline(req: &ExecRequest) -> Deadline {
    let secs = req.timeout_s.unwrap_or(60.0);
    match Duration::try_from_secs_f64(secs) {
        Ok(d) => Deadline::Extra(d + Duration::from_secs(30)),
        Err(_) => Deadline::Streaming,
    }
}

impl Client {
    /// Creates a sandbox; returns once it runs and exec works. Retried on
    /// transient failures only when `idempotency_key` is set.
    pub async fn sandbox_create(&self, spec: &CreateSandbox) -> Result<Sandbox> {
        let url = self.url(&["v1", "sandboxes"], &[])?;
        let retry = if spec.idempotency_key.is_some() {
            Retry::Idempotent
        } else {
            Retry::Once
        };
        self.send_json(retry, || {
            let mut rb = self
                .request(Method::POST, url.clone(), Deadline::Default)
                .json(spec);
            if let Some(k) = &spec.idempotency_key {
                rb = rb.header("Idempotency-Key", k);
            }
            Ok(rb)
        })
        .await
    }

    /// One page of the caller's sandboxes (admins see every tenant's).
    pub async fn sandbox_list(&self, filter: &SandboxFilter) -> Result<SandboxList> {
        let mut q: Vec<(&str, String)> = Vec::new();
        if let Some(s) = filter.state {
            q.push(("state", s.as_str().to_owned()));
        }
        for (k, v) in &filter.labels {
            q.push(("label", format!("{k}={v}")));
        }
        if let Some(l) = filter.limit {
            q.push(("limit", l.to_string()));
        }
        if let Some(c) = &filter.cursor {
            q.push(("cursor", c.clone()));
        }
        let url = self.url(&["v1", "sandboxes"], &q)?;
        self.send_json(Retry::Idempotent, || {
            Ok(self.request(Method::GET, url.clone(), Deadline::Default))
        })
        .await
    }

    /// Every sandbox matching `filter`, following the cursor to the end.
    pub async fn sandbox_list_all(&self, filter: &SandboxFilter) -> Result<Vec<Sandbox>> {
        let mut f = filter.clone();
        let mut all = Vec::new();
        loop {
            let page = self.sandbox_list(&f).await?;
            all.extend(page.sandboxes);
            match page.next_cursor {
                Some(c) if !c.is_empty() => f.cursor = Some(c),
                _ => return Ok(all),
            }
        }
    }

    pub async fn sandbox_get(&self, id: &str) -> Result<Sandbox> {
        let url = self.url(&["v1", "sandboxes", id], &[])?;
        self.send_json(Retry::Idempotent, || {
            Ok(self.request(Method::GET, url.clone(), Deadline::Default))
        })
        .await
    }

    /// Destroys the sandbox; destroying it again is not an error.
    pub async fn sandbox_destroy(&self, id: &str) -> Result<()> {
        let url = self.url(&["v1", "sandboxes", id], &[])?;
        self.send(Retry::Idempotent, || {
            Ok(self.request(Method::DELETE, url.clone(), Deadline::Default))
        })
        .await?;
        Ok(())
    }

    /// Sets the sandbox to expire `timeout_s` seconds from now.
    pub async fn sandbox_set_timeout(&self, id: &str, timeout_s: i64) -> Result<Sandbox> {
        let url = self.url(&["v1", "sandboxes", id, "timeout"], &[])?;
        let body = serde_json::json!({ "timeout_s": timeout_s });
        self.send_json(Retry::Once, || {
            Ok(self
                .request(Method::POST, url.clone(), Deadline::Default)
                .json(&body))
        })
        .await
    }

    /// Pauses the sandbox (`409 unsupported` where its provider cannot).
    pub async fn sandbox_pause(&self, id: &str) -> Result<Sandbox> {
        let url = self.url(&["v1", "sandboxes", id, "pause"], &[])?;
        self.send_json(Retry::Once, || {
            Ok(self.request(Method::POST, url.clone(), Deadline::Default))
        })
        .await
    }

    pub async fn sandbox_resume(&self, id: &str) -> Result<Sandbox> {
        let url = self.url(&["v1", "sandboxes", id, "resume"], &[])?;
        self.send_json(Retry::Once, || {
            Ok(self.request(Method::POST, url.clone(), Deadline::Default))
        })
        .await
    }

    /// The sandbox's log so far.
    pub async fn sandbox_logs(&self, id: &str) -> Result<Vec<LogLine>> {
        let url = self.url(&["v1", "sandboxes", id, "logs"], &[])?;
        let r: Logs = self
            .send_json(Retry::Idempotent, || {
                Ok(self.request(Method::GET, url.clone(), Deadline::Default))
            })
            .await?;
        Ok(r.lines)
    }

    /// The sandbox's log, then new lines as they come, until it ends.
    pub async fn sandbox_logs_follow(&self, id: &str) -> Result<LogStream> {
        let url = self.url(
            &["v1", "sandboxes", id, "logs"],
            &[("follow", "true".into())],
        )?;
        let resp = self
            .send(Retry::Idempotent, || {
                Ok(self.request(Method::GET, url.clone(), Deadline::Streaming))
            })
            .await?;
        let client = self.clone();
        let events = sse::events(Box::pin(resp.bytes_stream()));
        let lines = events.filter_map(move |ev| {
            let out = match ev {
                Ok(ev) if ev.event == "log" => Some(
                    serde_json::from_str::<LogLine>(&ev.data)
                        .map_err(|e| Error::Protocol(format!("a log line: {e}"))),
                ),
                Ok(_) => None,
                Err(e) => Some(Err(client.transport(e))),
            };
            std::future::ready(out)
        });
        Ok(LogStream {
            inner: Box::pin(lines),
        })
    }

    /// Runs a command to completion and returns its output.
    pub async fn exec(&self, id: &str, req: &ExecRequest) -> Result<ExecOutput> {
        let url = self.url(&["v1", "sandboxes", id, "exec"], &[])?;
        let deadline = exec_deadline(req);
        let r: ExecResponse = self
            .send_json(Retry::Once, || {
                Ok(self.request(Method::POST, url.clone(), deadline).json(req))
            })
            .await?;
        let bytes = |text: String, b64: Option<String>, which: &str| -> Result<Bytes> {
            match b64 {
                Some(b) => base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .map(Bytes::from)
                    .map_err(|e| Error::Protocol(format!("{which}_b64: {e}"))),
                None => Ok(Bytes::from(text)),
            }
        };
        Ok(ExecOutput {
            status: ExitStatus {
                exit_code: r.exit_code,
                signal: r.signal,
                duration_ms: r.duration_ms,
                timed_out: r.timed_out,
            },
            stdout: bytes(r.stdout, r.stdout_b64, "stdout")?,
            stderr: bytes(r.stderr, r.stderr_b64, "stderr")?,
            stdout_truncated: r.stdout_truncated,
            stderr_truncated: r.stderr_truncated,
        })
    }

    /// Runs a command and streams its output as it is written. The stream
    /// ends with [`ExecEvent::Exit`], or with an error if the command's
    /// stream fails; dropping it early kills the command.
    pub async fn exec_stream(&self, id: &str, req: &ExecRequest) -> Result<ExecStream> {
        let url = self.url(&["v1", "sandboxes", id, "exec", "stream"], &[])?;
        let resp = self
            .send(Retry::Once, || {
                Ok(self
                    .request(Method::POST, url.clone(), Deadline::Streaming)
                    .header("Accept", "text/event-stream")
                    .json(req))
            })
            .await?;
        let request_id = request_id_of(&resp);
        let client = self.clone();
        let rid = request_id.clone();
        let events = sse::events(Box::pin(resp.bytes_stream()));
        // Stops after the exit or an error; a body that ends before either
        // is reported, never taken for a clean end.
        let stream =
            futures_util::stream::unfold((Box::pin(events), false), move |(mut events, done)| {
                let client = client.clone();
                let rid = rid.clone();
                async move {
                    if done {
                        return None;
                    }
                    loop {
                        match events.next().await {
                            Some(Ok(ev)) => match exec_event(&ev, &rid) {
                                Some(Ok(ExecEvent::Exit(st))) => {
                                    return Some((Ok(ExecEvent::Exit(st)), (events, true)))
                                }
                                Some(Ok(out)) => return Some((Ok(out), (events, false))),
                                Some(Err(e)) => return Some((Err(e), (events, true))),
                                None => continue,
                            },
                            Some(Err(e)) => {
                                return Some((Err(client.transport(e)), (events, true)))
                            }
                            None => {
                                return Some((
                                    Err(Error::Protocol(
                                        "the output stream ended before the command's exit".into(),
                                    )),
                                    (events, true),
                                ))
                            }
                        }
                    }
                }
            });
        Ok(ExecStream {
            inner: Box::pin(stream),
            request_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_prefer_the_exact_base64_bytes() {
        let b = chunk_bytes(r#"{"data":"\ufffd","data_b64":"/w=="}"#).expect("valid chunk");
        assert_eq!(&b[..], &[0xff]);
        let t = chunk_bytes(r#"{"data":"hi\n"}"#).expect("valid chunk");
        assert_eq!(&t[..], b"hi\n");
    }

    #[test]
    fn error_events_become_stream_errors_with_the_code() {
        let ev = sse::SseEvent {
            event: "error".into(),
            data: r#"{"code":"timeout","message":"slow"}"#.into(),
        };
        match exec_event(&ev, &Some("req-1".into())) {
            Some(Err(Error::Stream {
                code,
                message,
                request_id,
            })) => {
                assert_eq!(
                    (code.as_str(), message.as_str(), request_id.as_deref()),
                    ("timeout", "slow", Some("req-1"))
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        let unknown = sse::SseEvent {
            event: "progress".into(),
            data: "{}".into(),
        };
        assert!(exec_event(&unknown, &None).is_none());
    }

    #[test]
    fn shell_codes_follow_the_shell_convention() {
        let st = |exit_code, signal, timed_out| ExitStatus {
            exit_code,
            signal,
            duration_ms: 0,
            timed_out,
        };
        assert_eq!(st(Some(7), None, false).shell_code(), 7);
        assert_eq!(st(None, Some(9), false).shell_code(), 137);
        assert_eq!(st(None, Some(9), true).shell_code(), 124);
    }
}
