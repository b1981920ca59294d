//! The messages of the plugin protocol (`docs/PLUGIN-PROTOCOL.md`): one JSON
//! object per line on the plugin's stdin and stdout.
//!
//! StacyVM sends requests `{"id", "op", "params"}`; the plugin answers each
//! with `{"id", "result"}` or `{"id", "error": {"code", "message"}}`, and an
//! exec it runs itself may send `{"id", "event": "stdout"|"stderr", "data"}`
//! (base64) before its answer. Unknown fields are ignored in both
//! directions, so either side may add fields without a new version.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use stacyvm_core::error::WireError;
use stacyvm_core::Network;

/// The protocol versions this build speaks, newest last.
pub const PROTOCOL_VERSIONS: &[u32] = &[1];

/// Longest line a plugin may write on stdout (an exec it runs itself answers
/// with both output streams, base64-encoded, in one line).
pub const MAX_LINE: usize = 64 * 1024 * 1024;

/// Longest stderr line passed to the log as one record; longer lines are
/// cut into pieces of this size.
pub const MAX_LOG_LINE: usize = 8 * 1024;

/// A request from StacyVM.
#[derive(Debug, Serialize)]
pub struct Request<'a, P: Serialize> {
    pub id: u64,
    pub op: &'a str,
    pub params: P,
}

/// The `hello` request: the first line StacyVM writes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HelloParams {
    /// Protocol versions StacyVM speaks; the plugin picks one.
    pub versions: Vec<u32>,
    /// StacyVM's release version.
    pub stacyvm_version: String,
    /// The plugin's name (`NAME` of `plugin:NAME`).
    pub name: String,
    /// Names this server instance: runtimes the plugin lists must be this
    /// instance's only, so several servers can share a host.
    pub instance: String,
    /// The static `stacyvm-agent` on the host, for the plugin to put into
    /// its runtimes.
    pub agent_path: PathBuf,
    /// A directory of the plugin's own (mode 0700) that survives restarts.
    pub state_dir: PathBuf,
}

/// The plugin's answer to `hello`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HelloResult {
    /// The version chosen, one of those offered.
    pub version: u32,
    #[serde(default)]
    pub plugin_version: Option<String>,
    #[serde(default)]
    pub capabilities: Capabilities,
}

/// What a plugin can do, declared once in its `hello` answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Capabilities {
    /// Whether the plugin's runtimes keep a sandbox from the host and from
    /// other sandboxes. A plugin that does not say so is treated like PRoot:
    /// only tenants the operator allowed may use it, and never by default.
    pub security_boundary: bool,
    /// Whether `pause` and `resume` work.
    pub pause: bool,
    /// How its runtimes' agents can be reached (what `spawn` and `list` may
    /// answer with).
    pub agent_transports: Vec<TransportKind>,
    /// Whether the plugin runs commands itself (`exec`), for runtimes without
    /// an agent.
    pub exec: bool,
    /// Whether the plugin reads and writes files itself (`file_read`,
    /// `file_write`), for runtimes without an agent.
    pub files: bool,
    /// Which form of the catalog image `spawn` is given.
    pub image: ImageForm,
    /// Whether the plugin wants `image_removed` when a catalog image goes.
    pub image_removed: bool,
}

/// How an agent can be reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransportKind {
    Unix,
    Tcp,
    VsockUds,
}

/// Which host path of a catalog image `spawn` carries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageForm {
    /// The unpacked root directory (`rootfs`).
    #[default]
    Rootfs,
    /// The imported tar (`image_tar`).
    Tar,
    /// Neither: the plugin resolves `image` itself.
    None,
}

/// Where a runtime's agent listens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "transport", rename_all = "snake_case")]
pub enum AgentEndpoint {
    /// A Unix socket on the host. The path is checked without following
    /// links, and the peer against whichever of the ids is given.
    Unix {
        path: PathBuf,
        #[serde(default)]
        peer_uid: Option<u32>,
        #[serde(default)]
        peer_pid: Option<i32>,
        /// A process the agent must be or descend from (a container's init).
        #[serde(default)]
        peer_ancestor: Option<i32>,
    },
    /// A TCP address, `IP:PORT` (no host names).
    Tcp { address: String },
    /// A vsock port behind a host Unix socket that takes `CONNECT <port>`
    /// (Firecracker's and vhost-device-vsock's hybrid vsock).
    VsockUds { path: PathBuf, port: u32 },
}

impl AgentEndpoint {
    pub fn kind(&self) -> TransportKind {
        match self {
            AgentEndpoint::Unix { .. } => TransportKind::Unix,
            AgentEndpoint::Tcp { .. } => TransportKind::Tcp,
            AgentEndpoint::VsockUds { .. } => TransportKind::VsockUds,
        }
    }
}

/// `spawn`: everything `SpawnSpec` holds, plus where the image is.
#[derive(Debug, Serialize)]
pub struct SpawnParams<'a> {
    pub sandbox_id: &'a str,
    pub image: &'a str,
    /// `sha256:<hex>` of the catalog image, when the catalog has it.
    pub image_digest: Option<String>,
    /// The unpacked catalog rootfs (`image: "rootfs"`). Read-only for the
    /// plugin: every sandbox of the image shares it.
    pub rootfs: Option<PathBuf>,
    /// The catalog's tar of the image (`image: "tar"`).
    pub image_tar: Option<PathBuf>,
    pub cpu: f64,
    pub memory_mb: u64,
    pub env: &'a BTreeMap<String, String>,
    pub workdir: Option<&'a str>,
    pub network: Network,
    pub labels: &'a BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct SpawnResult {
    #[serde(default)]
    pub agent: Option<AgentEndpoint>,
}

/// The params of every per-sandbox call without more to say.
#[derive(Debug, Serialize)]
pub struct SandboxParams<'a> {
    pub sandbox_id: &'a str,
}

#[derive(Debug, Deserialize)]
pub struct HealthResult {
    pub healthy: bool,
    #[serde(default)]
    pub detail: String,
}

#[derive(Debug, Deserialize)]
pub struct ListResult {
    pub sandboxes: Vec<ListedSandbox>,
}

#[derive(Debug, Deserialize)]
pub struct ListedSandbox {
    pub sandbox_id: String,
    pub running: bool,
    #[serde(default)]
    pub paused: bool,
    #[serde(default)]
    pub agent: Option<AgentEndpoint>,
}

#[derive(Debug, Deserialize)]
pub struct LogsResult {
    pub lines: Vec<PluginLogLine>,
}

#[derive(Debug, Deserialize)]
pub struct PluginLogLine {
    /// RFC 3339; the time of the call when absent or unreadable.
    #[serde(default)]
    pub ts: Option<String>,
    /// `provider` (the default) or `runtime`.
    #[serde(default)]
    pub source: Option<String>,
    pub message: String,
}

#[derive(Debug, Serialize)]
pub struct ImageRemovedParams<'a> {
    pub image: &'a str,
    pub digest: &'a str,
}

/// `exec`, for plugins that run commands themselves.
#[derive(Debug, Serialize)]
pub struct ExecParams<'a> {
    pub sandbox_id: &'a str,
    pub cmd: &'a [String],
    pub env: &'a BTreeMap<String, String>,
    pub cwd: Option<&'a str>,
    /// Base64 of the command's whole stdin; empty stdin when absent.
    pub stdin: Option<String>,
    /// 0 means no limit.
    pub timeout_ms: u64,
    pub output_cap: u64,
    /// Whether output should come as events while the command runs.
    pub stream: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ExecResult {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub duration_ms: u64,
    pub timed_out: bool,
    /// Base64 of output not sent as events.
    pub stdout: Option<String>,
    pub stderr: Option<String>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
}

#[derive(Debug, Serialize)]
pub struct FileReadParams<'a> {
    pub sandbox_id: &'a str,
    pub path: &'a str,
}

#[derive(Debug, Deserialize)]
pub struct FileReadResult {
    /// Base64 of the whole file.
    pub data: String,
}

#[derive(Debug, Serialize)]
pub struct FileWriteParams<'a> {
    pub sandbox_id: &'a str,
    pub path: &'a str,
    pub mode: Option<u32>,
    /// Base64 of the whole file.
    pub data: String,
}

#[derive(Debug, Serialize)]
pub struct CancelParams {
    /// The id of the request to stop.
    pub request: u64,
}

/// One line from the plugin, as routed.
#[derive(Debug)]
pub enum Incoming {
    /// Output of an exec the plugin runs.
    Event {
        stream: OutputStream,
        data: Vec<u8>,
    },
    /// The answer; ends the request.
    Result(serde_json::Value),
    Error(WireError),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// Reads one line from the plugin. `Err` says how it breaks the protocol.
pub fn parse_line(line: &[u8]) -> Result<(u64, Incoming), String> {
    use base64::Engine as _;
    let mut obj: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(line)
        .map_err(|e| format!("a line that is not a JSON object ({e})"))?;
    let id = obj
        .get("id")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| "a line without a numeric \"id\"".to_owned())?;
    if let Some(event) = obj.get("event") {
        let stream = match event.as_str() {
            Some("stdout") => OutputStream::Stdout,
            Some("stderr") => OutputStream::Stderr,
            _ => return Err(format!("request {id}: an event of unknown kind {event}")),
        };
        let data = obj
            .get("data")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| format!("request {id}: an event without base64 \"data\""))?;
        let data = base64::engine::general_purpose::STANDARD
            .decode(data)
            .map_err(|e| format!("request {id}: event data that is not base64 ({e})"))?;
        return Ok((id, Incoming::Event { stream, data }));
    }
    if let Some(err) = obj.remove("error") {
        let err: WireError = serde_json::from_value(err)
            .map_err(|e| format!("request {id}: an error that is not {{code, message}} ({e})"))?;
        return Ok((id, Incoming::Error(err)));
    }
    match obj.remove("result") {
        Some(v) => Ok((id, Incoming::Result(v))),
        None => Err(format!(
            "request {id}: a line with neither \"result\", \"error\" nor \"event\""
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_read_as_results_errors_and_events() {
        let (id, m) = parse_line(br#"{"id":3,"result":null}"#).unwrap();
        assert_eq!(id, 3);
        assert!(matches!(m, Incoming::Result(serde_json::Value::Null)));
        let (_, m) =
            parse_line(br#"{"id":4,"error":{"code":"not_found","message":"gone"}}"#).unwrap();
        assert!(matches!(m, Incoming::Error(e) if e.code == "not_found"));
        let (_, m) = parse_line(br#"{"id":5,"event":"stderr","data":"aGk="}"#).unwrap();
        assert!(
            matches!(m, Incoming::Event { stream: OutputStream::Stderr, data } if data == b"hi")
        );
        for bad in [
            &b"not json"[..],
            br#"[1]"#,
            br#"{"result":1}"#,
            br#"{"id":"7","result":1}"#,
            br#"{"id":7}"#,
            br#"{"id":7,"event":"stdin","data":""}"#,
            br#"{"id":7,"event":"stdout","data":"***"}"#,
            br#"{"id":7,"error":"boom"}"#,
        ] {
            assert!(parse_line(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn endpoints_are_tagged_by_transport() {
        let e: AgentEndpoint =
            serde_json::from_str(r#"{"transport":"unix","path":"/run/a.sock","peer_uid":7}"#)
                .unwrap();
        assert_eq!(
            e,
            AgentEndpoint::Unix {
                path: "/run/a.sock".into(),
                peer_uid: Some(7),
                peer_pid: None,
                peer_ancestor: None
            }
        );
        let e: AgentEndpoint =
            serde_json::from_str(r#"{"transport":"vsock_uds","path":"/v.sock","port":52}"#)
                .unwrap();
        assert_eq!(e.kind(), TransportKind::VsockUds);
        assert!(serde_json::from_str::<AgentEndpoint>(r#"{"transport":"smoke"}"#).is_err());
        let caps: Capabilities = serde_json::from_str(r#"{"exec":true,"future":1}"#).unwrap();
        assert!(caps.exec && !caps.security_boundary && caps.image == ImageForm::Rootfs);
    }
}
