//! What a process-based sandbox keeps in its host directory besides its
//! root: the provider's own log (JSON lines with times), the runtime's
//! output, and a JSON meta file written atomically.

use std::io::Write;
use std::path::Path;

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use stacyvm_core::{Error, Result};

use crate::LogLine;

/// What the runtime (and the agent) printed.
pub const RUNTIME_LOG: &str = "runtime.log";
/// The provider's own lines about the sandbox.
pub const PROVIDER_LOG: &str = "provider.log";

#[derive(Serialize, Deserialize)]
struct ProviderLogLine {
    #[serde(with = "time::serde::rfc3339")]
    ts: time::OffsetDateTime,
    message: String,
}

/// Writes `value` as `dir/name`, atomically (a reader sees the old file or
/// the new one, never half of one).
pub fn write_json<T: Serialize>(dir: &Path, name: &str, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value)
        .map_err(|e| Error::internal("encoding sandbox meta", e))?;
    let tmp = dir.join(format!("{name}.tmp"));
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, dir.join(name)))
        .map_err(|e| Error::internal(format_args!("writing {}", dir.join(name).display()), e))
}

/// `dir/name` as JSON, if it exists and parses.
pub fn read_json<T: DeserializeOwned>(dir: &Path, name: &str) -> Option<T> {
    let bytes = std::fs::read(dir.join(name)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Appends one line to the sandbox's provider log (never fails the caller).
pub fn provider_log(dir: &Path, message: &str) {
    let line = ProviderLogLine {
        ts: stacyvm_core::now(),
        message: message.to_owned(),
    };
    let Ok(mut json) = serde_json::to_vec(&line) else {
        return;
    };
    json.push(b'\n');
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(PROVIDER_LOG))
        .and_then(|mut f| f.write_all(&json));
    if let Err(e) = written {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot write the provider log");
    }
}

/// The provider log's lines with their times.
pub fn read_provider_log(dir: &Path) -> Vec<(time::OffsetDateTime, String)> {
    let Ok(text) = std::fs::read_to_string(dir.join(PROVIDER_LOG)) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| serde_json::from_str::<ProviderLogLine>(l).ok())
        .map(|p| (p.ts, p.message))
        .collect()
}

/// The last lines of the runtime log, for error messages.
pub fn log_tail(dir: &Path) -> String {
    let text = std::fs::read(dir.join(RUNTIME_LOG)).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(20)..].join("\n");
    if tail.trim().is_empty() {
        "(empty)".into()
    } else {
        tail
    }
}

/// Both logs as the API shows them, oldest first. The runtime log carries
/// no times: its lines are stamped with the file's last modification.
pub fn read_logs(dir: &Path) -> Vec<LogLine> {
    let mut lines: Vec<LogLine> = read_provider_log(dir)
        .into_iter()
        .map(|(ts, message)| LogLine {
            ts,
            source: "provider".into(),
            message,
        })
        .collect();
    let runtime = dir.join(RUNTIME_LOG);
    if let Ok(bytes) = std::fs::read(&runtime) {
        let ts = std::fs::metadata(&runtime)
            .and_then(|m| m.modified())
            .map(time::OffsetDateTime::from)
            .unwrap_or_else(|_| stacyvm_core::now());
        for l in String::from_utf8_lossy(&bytes).lines() {
            lines.push(LogLine {
                ts,
                source: "runtime".into(),
                message: l.to_owned(),
            });
        }
    }
    lines.sort_by_key(|l| l.ts);
    lines
}
