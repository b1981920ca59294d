//! What a PRoot sandbox keeps on disk: its meta (everything destroy and
//! adoption need to find every piece of it), pid files and logs.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use stacyvm_core::{Error, Result, SandboxId};

use crate::sandboxing::cgroups::Group;

pub const META_FILE: &str = "meta.json";
pub const PROOT_PID_FILE: &str = "proot.pid";
pub const AGENT_PID_FILE: &str = "agent.pid";
pub const RUNTIME_LOG: &str = "runtime.log";
pub const PROVIDER_LOG: &str = "provider.log";

/// How a sandbox's root directory is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// An overlay: a per-sandbox upper layer over an ID-mapped view of the
    /// shared catalog rootfs.
    Overlay,
    /// A per-sandbox copy of the catalog rootfs.
    Copy,
}

/// What destroy and adoption need to find every piece of a sandbox.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SandboxMeta {
    pub sandbox_id: SandboxId,
    pub instance: String,
    pub image: String,
    pub layout: Layout,
    /// Host directory holding the sandbox's root mount and the agent's
    /// socket directory.
    pub run_dir: PathBuf,
    /// The sandbox's cgroups.
    #[serde(default)]
    pub cgroups: Group,
    /// The unprivileged host user the sandbox runs as.
    #[serde(default)]
    pub uid: Option<u32>,
    pub workdir: String,
}

impl SandboxMeta {
    /// The directory the sandbox's root is mounted on.
    pub fn root(&self) -> PathBuf {
        self.run_dir.join("root")
    }

    /// The directory holding the agent's socket (the guest's `/.stacyvm/run`).
    pub fn socket_dir(&self) -> PathBuf {
        self.run_dir.join("sock")
    }
}

#[derive(Serialize, Deserialize)]
struct ProviderLogLine {
    #[serde(with = "time::serde::rfc3339")]
    ts: time::OffsetDateTime,
    message: String,
}

pub fn write_meta(dir: &Path, meta: &SandboxMeta) -> Result<()> {
    let bytes =
        serde_json::to_vec_pretty(meta).map_err(|e| Error::internal("encoding sandbox meta", e))?;
    let tmp = dir.join(format!("{META_FILE}.tmp"));
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, dir.join(META_FILE)))
        .map_err(|e| Error::internal(format_args!("writing {}", dir.join(META_FILE).display()), e))
}

pub fn read_meta(dir: &Path) -> Option<SandboxMeta> {
    let bytes = std::fs::read(dir.join(META_FILE)).ok()?;
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
