//! Exec: the request body, the answer of a command run to completion, and
//! the events of a streamed one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Body of `POST /v1/sandboxes/{id}/exec` and `…/exec/stream`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// The argv array; never joined into a shell string.
    pub cmd: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Seconds; default 60.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<f64>,
    /// Runs the command as this user of the sandbox's `/etc/passwd` (a
    /// name, or a numeric uid), with its uid, primary group and, unless
    /// `env` sets them, its `HOME`, `USER` and `LOGNAME`. Default: the
    /// user the sandbox runs as (root for the built-in providers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

impl ExecRequest {
    /// Runs `argv` with the sandbox's defaults.
    pub fn new<I, S>(argv: I) -> ExecRequest
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ExecRequest {
            cmd: argv.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }

    /// Runs `script` with `sh -c`.
    pub fn shell(script: impl Into<String>) -> ExecRequest {
        ExecRequest::new(["sh".to_owned(), "-c".to_owned(), script.into()])
    }
}

/// How a command ended: the data of the stream's `exit` event, and part of
/// [`ExecResponse`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExitStatus {
    /// Null when the command was killed by a signal.
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub duration_ms: u64,
    pub timed_out: bool,
}

impl ExitStatus {
    /// The conventional shell exit code: the code, 124 on timeout, or
    /// 128 + the signal number.
    pub fn shell_code(&self) -> i32 {
        if self.timed_out {
            return 124;
        }
        match (self.exit_code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 1,
        }
    }

    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }
}

/// The answer of `POST /v1/sandboxes/{id}/exec`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExecResponse {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// The output as text (invalid UTF-8 replaced).
    pub stdout: String,
    pub stderr: String,
    /// Present when stdout is not valid UTF-8: its exact bytes, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout_b64: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr_b64: Option<String>,
    pub duration_ms: u64,
    pub timed_out: bool,
    #[serde(default)]
    pub stdout_truncated: bool,
    #[serde(default)]
    pub stderr_truncated: bool,
}

impl ExecResponse {
    pub fn status(&self) -> ExitStatus {
        ExitStatus {
            exit_code: self.exit_code,
            signal: self.signal,
            duration_ms: self.duration_ms,
            timed_out: self.timed_out,
        }
    }
}

/// The data of a streamed exec's `stdout` and `stderr` events.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StreamChunk {
    /// The chunk as text (invalid UTF-8 replaced).
    pub data: String,
    /// Present when the chunk is not valid UTF-8: its exact bytes, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_b64: Option<String>,
}

/// The data of a streamed exec's `error` event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StreamError {
    pub code: String,
    pub message: String,
}

/// Body of `POST /v1/sandboxes/{id}/processes`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ProcessStart {
    /// The argv array; never joined into a shell string.
    pub cmd: Vec<String>,
    /// Added to the sandbox's environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (absolute); default the sandbox's workdir.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Runs it as this user of the sandbox's `/etc/passwd` (a name, or a
    /// numeric uid), as `exec`'s `user` does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

impl ProcessStart {
    /// Starts `argv` with the sandbox's defaults.
    pub fn new<I, S>(argv: I) -> ProcessStart
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ProcessStart {
            cmd: argv.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }

    /// Starts `script` with `sh -c`.
    pub fn shell(script: impl Into<String>) -> ProcessStart {
        ProcessStart::new(["sh".to_owned(), "-c".to_owned(), script.into()])
    }
}

/// A background process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Process {
    /// Its process id inside the sandbox.
    pub pid: u32,
    pub cmd: Vec<String>,
    pub cwd: Option<String>,
    /// `running` or `exited`.
    pub state: String,
    pub exit_code: Option<i32>,
    /// The signal that ended it.
    pub signal: Option<i32>,
    /// RFC 3339.
    pub started_at: String,
    pub ended_at: Option<String>,
    pub stdin_open: bool,
    /// Whether older output was dropped from the bounded output buffer.
    pub truncated: bool,
    pub stdout_dropped: u64,
    pub stderr_dropped: u64,
}

impl Process {
    /// Whether it still runs.
    pub fn is_running(&self) -> bool {
        self.state == "running"
    }
}

/// `{"processes": [...]}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProcessList {
    pub processes: Vec<Process>,
}

/// Body of `POST …/processes/{pid}/signal`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ProcessSignal {
    /// One of TERM, KILL, INT, HUP, USR1, USR2, STOP, CONT.
    pub signal: String,
}

/// Answer of `POST …/processes/{pid}/stdin`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StdinWritten {
    /// Bytes written to the process's stdin.
    pub written: u64,
    /// Whether stdin is now closed.
    pub closed: bool,
}
