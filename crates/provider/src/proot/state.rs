//! What a PRoot sandbox keeps on disk: its meta (everything destroy and
//! adoption need to find every piece of it), pid files and logs.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use stacyvm_core::{Result, SandboxId};

use crate::sandboxing::cgroups::Group;
use crate::sandboxing::logs;

pub use crate::sandboxing::logs::{log_tail, provider_log, read_provider_log, RUNTIME_LOG};
pub use crate::sandboxing::rootfs::Layout;

pub const META_FILE: &str = "meta.json";
pub const PROOT_PID_FILE: &str = "proot.pid";
pub const AGENT_PID_FILE: &str = "agent.pid";

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
        crate::sandboxing::rootfs::root_of(&self.run_dir)
    }

    /// The directory holding the agent's socket (the guest's `/.stacyvm/run`).
    pub fn socket_dir(&self) -> PathBuf {
        crate::sandboxing::rootfs::socket_dir_of(&self.run_dir)
    }
}

pub fn write_meta(dir: &Path, meta: &SandboxMeta) -> Result<()> {
    logs::write_json(dir, META_FILE, meta)
}

pub fn read_meta(dir: &Path) -> Option<SandboxMeta> {
    logs::read_json(dir, META_FILE)
}
