//! `stacyvm mcp`: a Model Context Protocol server on stdin/stdout for AI
//! agents (Claude Desktop, Claude Code, Cursor, …), acting through the
//! HTTP API with `STACYVM_URL` / `STACYVM_API_KEY` like the other client
//! commands. Sandboxes it creates are destroyed when the session ends
//! (stdin closes, SIGTERM or SIGINT) unless created with `keep`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use async_trait::async_trait;
use clap::Args;
use stacyvm_api as api;
use stacyvm_mcp::{Backend, ExecResult, FileChunk, Options, Session, ToolError, Transport};
use stacyvm_sdk::{Client, SandboxFilter};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// The longest JSON-RPC line accepted; a longer one is answered with a
/// parse error instead of growing memory without bound.
const MAX_LINE: usize = 64 * 1024 * 1024;

#[derive(Args)]
pub struct McpArgs {
    /// The StacyVM server.
    #[arg(long, env = "STACYVM_URL", default_value = stacyvm_sdk::DEFAULT_URL)]
    url: String,
    /// The API key.
    #[arg(long, env = "STACYVM_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Image `create_sandbox` uses when the agent names none.
    #[arg(long, env = "STACYVM_MCP_IMAGE")]
    default_image: Option<String>,
    /// Confine upload_file and download_file to this host directory.
    /// Without it they reach any file this user can.
    #[arg(long, value_name = "DIR", conflicts_with = "no_host_files")]
    host_root: Option<PathBuf>,
    /// Offer no host file transfer tools at all.
    #[arg(long)]
    no_host_files: bool,
}

/// The HTTP API, through the SDK, as the tools' backend.
struct SdkBackend {
    client: Client,
    /// `None`: no host transfers. `Some(None)`: anywhere. `Some(Some(d))`: under `d`.
    host: Option<Option<PathBuf>>,
}

fn tool_error(e: stacyvm_sdk::Error) -> ToolError {
    let code = e.code().map(str::to_owned).unwrap_or_else(|| match e {
        stacyvm_sdk::Error::Transport { .. } => "unavailable".to_owned(),
        _ => "client_error".to_owned(),
    });
    ToolError {
        code,
        message: e.message(),
        status: e.status(),
        request_id: e.request_id().map(str::to_owned),
    }
}

fn host_denied(msg: String) -> ToolError {
    ToolError {
        status: Some(403),
        ..ToolError::new("forbidden", msg)
    }
}

impl SdkBackend {
    /// The host path, checked against `--host-root`: the file (for a
    /// read) or its parent directory (for a write) must resolve under the
    /// root, so neither `..` nor a symlink leads out of it.
    fn host_path(&self, raw: &str, writing: bool) -> Result<PathBuf, ToolError> {
        let root = match &self.host {
            None => return Err(host_denied("host file transfer is disabled".into())),
            Some(r) => r,
        };
        if raw.is_empty() || raw.contains('\0') {
            return Err(ToolError::invalid("host_path must be a non-empty path"));
        }
        let path = PathBuf::from(raw);
        let Some(root) = root else {
            return Ok(path);
        };
        let path = if path.is_absolute() {
            path
        } else {
            root.join(path)
        };
        let resolved = if writing {
            let name = path
                .file_name()
                .ok_or_else(|| ToolError::invalid("host_path must name a file"))?;
            let parent = path.parent().unwrap_or(Path::new("/"));
            let parent = parent.canonicalize().map_err(|e| {
                ToolError::new(
                    "not_found",
                    format!("host directory {}: {e}", parent.display()),
                )
            })?;
            let target = parent.join(name);
            // An existing symlink would be followed by the write.
            match target.canonicalize() {
                Ok(t) => t,
                Err(_) => target,
            }
        } else {
            path.canonicalize()
                .map_err(|e| ToolError::new("not_found", format!("host file {raw}: {e}")))?
        };
        if !resolved.starts_with(root) {
            return Err(host_denied(format!(
                "host_path {raw} is outside the allowed host directory {}",
                root.display()
            )));
        }
        Ok(resolved)
    }
}

#[async_trait]
impl Backend for SdkBackend {
    async fn sandbox_create(&self, spec: api::CreateSandbox) -> Result<api::Sandbox, ToolError> {
        self.client.sandbox_create(&spec).await.map_err(tool_error)
    }

    async fn sandbox_list(
        &self,
        labels: Vec<(String, String)>,
        state: Option<String>,
    ) -> Result<Vec<api::Sandbox>, ToolError> {
        let state = match state {
            None => None,
            Some(s) => Some(
                serde_json::from_value::<api::SandboxState>(serde_json::Value::String(s.clone()))
                    .map_err(|_| ToolError::invalid(format!("unknown state {s:?}")))?,
            ),
        };
        let filter = SandboxFilter {
            state,
            labels,
            ..Default::default()
        };
        self.client
            .sandbox_list_all(&filter)
            .await
            .map_err(tool_error)
    }

    async fn sandbox_destroy(&self, id: &str) -> Result<(), ToolError> {
        self.client.sandbox_destroy(id).await.map_err(tool_error)
    }

    async fn exec(&self, id: &str, req: api::ExecRequest) -> Result<ExecResult, ToolError> {
        let out = self.client.exec(id, &req).await.map_err(tool_error)?;
        Ok(ExecResult {
            exit_code: out.status.exit_code,
            signal: out.status.signal,
            stdout: out.stdout.to_vec(),
            stderr: out.stderr.to_vec(),
            duration_ms: out.status.duration_ms,
            timed_out: out.status.timed_out,
            stdout_truncated: out.stdout_truncated,
            stderr_truncated: out.stderr_truncated,
        })
    }

    async fn file_write(
        &self,
        id: &str,
        path: &str,
        mode: Option<String>,
        data: Vec<u8>,
    ) -> Result<api::FileEntry, ToolError> {
        self.client
            .file_write(id, path, std::io::Cursor::new(data), mode.as_deref())
            .await
            .map_err(tool_error)
    }

    async fn file_read(
        &self,
        id: &str,
        path: &str,
        offset: u64,
        limit: usize,
    ) -> Result<FileChunk, ToolError> {
        let stream = self.client.file_read(id, path).await.map_err(tool_error)?;
        stacyvm_mcp::read_window(stream, offset, limit)
            .await
            .map_err(tool_error)
    }

    async fn file_list(
        &self,
        id: &str,
        path: &str,
        recursive: bool,
    ) -> Result<Vec<api::FileEntry>, ToolError> {
        self.client
            .file_list(id, path, recursive)
            .await
            .map_err(tool_error)
    }

    fn host_transfers(&self) -> bool {
        self.host.is_some()
    }

    async fn upload(
        &self,
        id: &str,
        host_path: &str,
        path: &str,
        mode: Option<String>,
    ) -> Result<api::FileEntry, ToolError> {
        let local = self.host_path(host_path, false)?;
        if !local.is_file() {
            return Err(ToolError::invalid(format!(
                "host_path {host_path} is not a regular file"
            )));
        }
        self.client
            .file_write_path(id, path, &local, mode.as_deref())
            .await
            .map_err(tool_error)
    }

    async fn download(&self, id: &str, path: &str, host_path: &str) -> Result<u64, ToolError> {
        let local = self.host_path(host_path, true)?;
        self.client
            .file_read_to_path(id, path, &local)
            .await
            .map_err(tool_error)
    }
}

/// Reads one line of at most `MAX_LINE` bytes. `Ok(None)` at end of input;
/// `Ok(Some(Err(())))` for a line over the limit (skipped to its end).
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    input: &mut R,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<Result<(), ()>>> {
    buf.clear();
    let n = (&mut *input)
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', buf)
        .await?;
    if n == 0 {
        return Ok(None);
    }
    if buf.len() > MAX_LINE && buf.last() != Some(&b'\n') {
        // Drop the rest of the oversized line.
        let mut sink = Vec::new();
        loop {
            sink.clear();
            let m = (&mut *input)
                .take(64 * 1024)
                .read_until(b'\n', &mut sink)
                .await?;
            if m == 0 || sink.last() == Some(&b'\n') {
                break;
            }
        }
        return Ok(Some(Err(())));
    }
    Ok(Some(Ok(())))
}

/// The id of a request line (as JSON text, so `1` and `"1"` differ).
fn request_id(line: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    v.get("method")?;
    v.get("id").map(|id| id.to_string())
}

/// The request a `notifications/cancelled` line cancels.
fn cancelled_request(line: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    if v.get("method")?.as_str()? != "notifications/cancelled" {
        return None;
    }
    v.get("params")?.get("requestId").map(|id| id.to_string())
}

pub async fn run(args: McpArgs) -> Result<std::process::ExitCode> {
    // The user agent tells an operator reading the server's log which
    // calls came through an agent.
    let mut b = Client::builder()
        .url(&args.url)
        .user_agent(concat!("stacyvm-mcp/", env!("CARGO_PKG_VERSION")));
    if let Some(k) = &args.api_key {
        b = b.api_key(k);
    }
    let client = b.build().context("configuring the StacyVM client")?;
    let host = if args.no_host_files {
        None
    } else {
        Some(match &args.host_root {
            None => None,
            Some(r) => Some(
                r.canonicalize()
                    .with_context(|| format!("--host-root {}", r.display()))?,
            ),
        })
    };
    let session = Arc::new(Session::new(
        SdkBackend { client, host },
        Options {
            transport: Transport::Stdio,
            default_image: args.default_image,
        },
    ));
    eprintln!(
        "stacyvm mcp: session {} serving on stdio ({})",
        session.id(),
        args.url
    );

    // Responses go out through one writer, in the order they finish: a
    // long command does not hold up a ping.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(64);
    let writer = tokio::spawn(async move {
        let mut out = tokio::io::stdout();
        while let Some(line) = rx.recv().await {
            if out.write_all(line.as_bytes()).await.is_err()
                || out.write_all(b"\n").await.is_err()
                || out.flush().await.is_err()
            {
                break;
            }
        }
    });

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let mut input = BufReader::new(tokio::io::stdin());
    let mut buf = Vec::new();
    let mut calls = tokio::task::JoinSet::new();
    // Requests still running, by id, so that a cancellation can stop one.
    let mut running: HashMap<String, tokio::task::AbortHandle> = HashMap::new();
    let ended_by = loop {
        tokio::select! {
            line = read_line(&mut input, &mut buf) => match line {
                Ok(None) => break "end of input",
                Err(e) => {
                    eprintln!("stacyvm mcp: reading stdin: {e}");
                    break "a read error";
                }
                Ok(Some(Err(()))) => {
                    let err = stacyvm_mcp::jsonrpc::error(
                        serde_json::Value::Null,
                        stacyvm_mcp::jsonrpc::PARSE_ERROR,
                        format!("parse error: the message is over {MAX_LINE} bytes"),
                    );
                    let _ = tx.send(err.to_string()).await;
                }
                Ok(Some(Ok(()))) => {
                    let line = String::from_utf8_lossy(&buf).into_owned();
                    let cancels = cancelled_request(&line);
                    if let Some(call) = cancels.as_ref().and_then(|id| running.remove(id)) {
                        // The client gave up on it: no answer is sent.
                        call.abort();
                    }
                    let request = request_id(&line);
                    let (session, tx) = (session.clone(), tx.clone());
                    let handle = calls.spawn(async move {
                        if let Some(reply) = session.handle_line(&line).await {
                            let _ = tx.send(reply).await;
                        }
                    });
                    if let Some(id) = request {
                        running.retain(|_, h| !h.is_finished());
                        running.insert(id, handle);
                    }
                }
            },
            _ = term.recv() => break "SIGTERM",
            _ = tokio::signal::ctrl_c() => break "SIGINT",
            // Reap finished calls so the set does not grow.
            Some(_) = calls.join_next(), if !calls.is_empty() => {}
        }
    };
    // Calls still running lose their sandboxes below; their answers would
    // have no reader.
    calls.abort_all();
    let report = session.close().await;
    eprintln!(
        "stacyvm mcp: session ended ({ended_by}): destroyed {} sandbox(es), kept {}{}",
        report.destroyed.len(),
        report.kept.len(),
        if report.kept.is_empty() {
            String::new()
        } else {
            format!(" ({})", report.kept.join(", "))
        }
    );
    for (id, why) in &report.failed {
        eprintln!("stacyvm mcp: could not destroy {id}: {why}");
    }
    drop(tx);
    let _ = writer.await;
    Ok(if report.failed.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_read_whole_and_oversized_ones_skipped() {
        let mut input = Vec::new();
        input.extend_from_slice(b"{\"a\":1}\n");
        input.extend(std::iter::repeat_n(b'x', MAX_LINE + 10));
        input.extend_from_slice(b"\n{\"b\":2}");
        let mut reader = BufReader::new(&input[..]);
        let mut buf = Vec::new();
        assert_eq!(
            read_line(&mut reader, &mut buf).await.unwrap(),
            Some(Ok(()))
        );
        assert_eq!(buf, b"{\"a\":1}\n");
        assert_eq!(
            read_line(&mut reader, &mut buf).await.unwrap(),
            Some(Err(()))
        );
        assert_eq!(
            read_line(&mut reader, &mut buf).await.unwrap(),
            Some(Ok(()))
        );
        assert_eq!(
            buf, b"{\"b\":2}",
            "the line after the oversized one is intact"
        );
        assert_eq!(read_line(&mut reader, &mut buf).await.unwrap(), None);
    }

    fn backend(root: Option<PathBuf>) -> SdkBackend {
        SdkBackend {
            client: Client::builder().url("http://127.0.0.1:9").build().unwrap(),
            host: Some(root),
        }
    }

    #[test]
    fn cancellations_name_the_request() {
        let cancel =
            r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":7}}"#;
        assert_eq!(cancelled_request(cancel).as_deref(), Some("7"));
        assert_eq!(request_id(cancel), None, "a notification has no id");
        let call = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{}}"#;
        assert_eq!(request_id(call).as_deref(), Some("7"));
        assert_eq!(cancelled_request(call), None);
        let named = r#"{"jsonrpc":"2.0","id":"7","method":"ping"}"#;
        assert_eq!(request_id(named).as_deref(), Some("\"7\""));
        assert_eq!(request_id("{oops"), None);
    }

    #[test]
    fn host_paths_stay_under_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::write(root.join("in.txt"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("link")).unwrap();
        let b = backend(Some(root.clone()));
        let in_txt = root.join("in.txt");
        assert_eq!(
            b.host_path(in_txt.to_str().unwrap(), false).unwrap(),
            in_txt
        );
        assert_eq!(
            b.host_path("in.txt", false).unwrap(),
            in_txt,
            "relative to the root"
        );
        for (raw, writing) in [
            ("/etc/passwd", false),
            ("../x", true),
            ("link", false),
            ("link", true),
            ("/tmp/x", true),
        ] {
            let e = b.host_path(raw, writing).unwrap_err();
            assert!(e.code == "forbidden" || e.code == "not_found", "{raw}: {e}");
        }
        assert!(b.host_path("", false).is_err());
        let open = backend(None);
        assert!(open.host_path("/etc/passwd", false).is_ok());
        let off = SdkBackend {
            host: None,
            ..backend(None)
        };
        assert_eq!(
            off.host_path("/etc/passwd", false).unwrap_err().code,
            "forbidden"
        );
    }
}
