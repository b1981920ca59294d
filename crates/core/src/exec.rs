//! Exec requests and outcomes, as the agent runs them and the API reports them.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Default per-stream output cap: 16 MiB.
pub const DEFAULT_OUTPUT_CAP: u64 = 16 * 1024 * 1024;

/// One command to run inside a sandbox. `cmd` is an argv array; nothing ever
/// joins it into a shell string.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Absolute working directory inside the sandbox; the sandbox's workdir
    /// (or `/`) when absent.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Bytes written to the command's stdin, which is then closed.
    #[serde(default)]
    pub stdin: Option<Vec<u8>>,
    /// Wall-clock limit in milliseconds; the process group is killed past it.
    pub timeout_ms: u64,
    /// Per-stream cap for buffered output; bytes past it are dropped and the
    /// stream is flagged truncated.
    #[serde(default = "default_cap")]
    pub output_cap: u64,
    /// The account of the sandbox's `/etc/passwd` (a name or a uid) the
    /// command runs as; the sandbox's own user when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

fn default_cap() -> u64 {
    DEFAULT_OUTPUT_CAP
}

/// How a command ended.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code, or `None` when killed by a signal.
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub duration_ms: u64,
    pub timed_out: bool,
}

/// The buffered result of an exec.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecOutcome {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
}

/// One event of a streaming exec; `Exit` is always last.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Bytes),
    Stderr(Bytes),
    Exit(ExitStatus),
}
