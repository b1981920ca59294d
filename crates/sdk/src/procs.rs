//! Background processes: start, list, read output (from the oldest byte
//! the sandbox still keeps, then live), write stdin, send signals.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use reqwest::Method;
use serde::Deserialize;

use crate::client::{request_id_of, Deadline, Retry};
use crate::models::{Process, ProcessList, ProcessSignal, ProcessStart, StdinWritten};
use crate::sandboxes::{chunk_bytes, stream_error};
use crate::sse;
use crate::{Client, Error, Result};

/// How a background process ended: the data of its output's `exit` event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub struct ProcessExit {
    /// Null when a signal ended it.
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub duration_ms: u64,
    #[serde(default)]
    pub timed_out: bool,
    /// Bytes of each stream dropped from the bounded output buffer.
    #[serde(default)]
    pub stdout_dropped: u64,
    #[serde(default)]
    pub stderr_dropped: u64,
}

impl ProcessExit {
    /// The conventional shell exit code: the code, or 128 + the signal number.
    pub fn shell_code(&self) -> i32 {
        match (self.exit_code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 1,
        }
    }
}

/// One event of a background process's output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProcessEvent {
    Stdout(Bytes),
    Stderr(Bytes),
    /// The process exited; always the last event when it comes.
    Exit(ProcessExit),
}

/// A background process's output. Following, it ends with
/// [`ProcessEvent::Exit`]; otherwise it ends where the kept output ends.
/// Dropping it leaves the process alone.
pub struct ProcessOutput {
    inner: Pin<Box<dyn Stream<Item = Result<ProcessEvent>> + Send>>,
    request_id: Option<String>,
}

impl ProcessOutput {
    /// The request id the server gave the stream.
    pub fn request_id(&self) -> Option<&str> {
        self.request_id.as_deref()
    }
}

impl Stream for ProcessOutput {
    type Item = Result<ProcessEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// The background processes of one sandbox; from [`Client::processes`].
#[derive(Clone, Debug)]
pub struct Processes {
    client: Client,
    sandbox: String,
}

impl Client {
    /// The background processes of sandbox `id`.
    pub fn processes(&self, id: &str) -> Processes {
        Processes {
            client: self.clone(),
            sandbox: id.to_owned(),
        }
    }
}

impl Processes {
    /// The sandbox these processes run in.
    pub fn sandbox_id(&self) -> &str {
        &self.sandbox
    }

    /// Starts a process; answers once it runs. Sent once, never retried, so
    /// a process is not started twice.
    pub async fn start(&self, req: &ProcessStart) -> Result<Process> {
        let c = &self.client;
        let url = c.url(&["v1", "sandboxes", &self.sandbox, "processes"], &[])?;
        c.send_json(Retry::Once, || {
            Ok(c.request(Method::POST, url.clone(), Deadline::Default)
                .json(req))
        })
        .await
    }

    /// Every process the sandbox keeps, running and exited.
    pub async fn list(&self) -> Result<Vec<Process>> {
        let c = &self.client;
        let url = c.url(&["v1", "sandboxes", &self.sandbox, "processes"], &[])?;
        let list: ProcessList = c
            .send_json(Retry::Idempotent, || {
                Ok(c.request(Method::GET, url.clone(), Deadline::Default))
            })
            .await?;
        Ok(list.processes)
    }

    /// One process; `not_found` when the sandbox keeps no such process.
    pub async fn get(&self, pid: u32) -> Result<Process> {
        let c = &self.client;
        let pid = pid.to_string();
        let url = c.url(&["v1", "sandboxes", &self.sandbox, "processes", &pid], &[])?;
        c.send_json(Retry::Idempotent, || {
            Ok(c.request(Method::GET, url.clone(), Deadline::Default))
        })
        .await
    }

    /// The process's output from the oldest byte still kept, then live
    /// output until it exits.
    pub async fn output(&self, pid: u32) -> Result<ProcessOutput> {
        self.output_stream(pid, true).await
    }

    /// The output kept so far, without waiting for more (ends with
    /// [`ProcessEvent::Exit`] only if the process has exited).
    pub async fn output_so_far(&self, pid: u32) -> Result<ProcessOutput> {
        self.output_stream(pid, false).await
    }

    async fn output_stream(&self, pid: u32, follow: bool) -> Result<ProcessOutput> {
        let c = &self.client;
        let pid = pid.to_string();
        let url = c.url(
            &[
                "v1",
                "sandboxes",
                &self.sandbox,
                "processes",
                &pid,
                "output",
            ],
            &[("follow", follow.to_string())],
        )?;
        let resp = c
            .send(Retry::Idempotent, || {
                Ok(c.request(Method::GET, url.clone(), Deadline::Streaming)
                    .header("Accept", "text/event-stream"))
            })
            .await?;
        let request_id = request_id_of(&resp);
        let client = c.clone();
        let rid = request_id.clone();
        let events = Box::pin(sse::events(Box::pin(resp.bytes_stream())));
        // Stops after the exit or an error. A followed stream that ends
        // before the exit is reported (the connection broke), never taken
        // for a clean end.
        let stream = futures_util::stream::unfold((events, false), move |(mut events, done)| {
            let client = client.clone();
            let rid = rid.clone();
            async move {
                if done {
                    return None;
                }
                loop {
                    let ev = match events.next().await {
                        Some(Ok(ev)) => ev,
                        Some(Err(e)) => return Some((Err(client.transport(e)), (events, true))),
                        None if follow => {
                            return Some((
                                Err(Error::Protocol(
                                    "the process's output stream ended before its exit".into(),
                                )),
                                (events, true),
                            ))
                        }
                        None => return None,
                    };
                    let item = match ev.event.as_str() {
                        "stdout" => chunk_bytes(&ev.data).map(ProcessEvent::Stdout),
                        "stderr" => chunk_bytes(&ev.data).map(ProcessEvent::Stderr),
                        "exit" => serde_json::from_str::<ProcessExit>(&ev.data)
                            .map(ProcessEvent::Exit)
                            .map_err(|e| Error::Protocol(format!("the exit event: {e}"))),
                        "error" => Err(stream_error(&ev.data, &rid)),
                        _ => continue,
                    };
                    let end = !matches!(
                        item,
                        Ok(ProcessEvent::Stdout(_)) | Ok(ProcessEvent::Stderr(_))
                    );
                    return Some((item, (events, end)));
                }
            }
        });
        Ok(ProcessOutput {
            inner: Box::pin(stream),
            request_id,
        })
    }

    /// Writes `data` to the process's stdin.
    pub async fn write_stdin(&self, pid: u32, data: impl Into<Bytes>) -> Result<StdinWritten> {
        self.stdin(pid, data.into(), false).await
    }

    /// Writes `data` to the process's stdin, then closes it (an empty
    /// `data` just closes it).
    pub async fn close_stdin(&self, pid: u32, data: impl Into<Bytes>) -> Result<StdinWritten> {
        self.stdin(pid, data.into(), true).await
    }

    async fn stdin(&self, pid: u32, data: Bytes, close: bool) -> Result<StdinWritten> {
        let c = &self.client;
        let pid = pid.to_string();
        let query = if close {
            vec![("close", "true".to_owned())]
        } else {
            Vec::new()
        };
        let url = c.url(
            &["v1", "sandboxes", &self.sandbox, "processes", &pid, "stdin"],
            &query,
        )?;
        c.send_json(Retry::Once, || {
            Ok(c.request(Method::POST, url.clone(), Deadline::Default)
                .header("Content-Type", "application/octet-stream")
                .body(data.clone()))
        })
        .await
    }

    /// Sends `signal` (TERM, KILL, INT, HUP, USR1, USR2, STOP, CONT, with or
    /// without a `SIG` prefix) to the process's group; answers with the process.
    pub async fn signal(&self, pid: u32, signal: &str) -> Result<Process> {
        let c = &self.client;
        let pid = pid.to_string();
        let url = c.url(
            &[
                "v1",
                "sandboxes",
                &self.sandbox,
                "processes",
                &pid,
                "signal",
            ],
            &[],
        )?;
        let name = signal.trim();
        let name = name
            .strip_prefix("SIG")
            .or_else(|| name.strip_prefix("sig"))
            .unwrap_or(name)
            .to_ascii_uppercase();
        let body = ProcessSignal { signal: name };
        c.send_json(Retry::Once, || {
            Ok(c.request(Method::POST, url.clone(), Deadline::Default)
                .json(&body))
        })
        .await
    }
}
