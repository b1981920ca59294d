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
