//! What a namespaces sandbox keeps on disk: its meta (everything destroy
//! and adoption need to find every piece of it) and the pid files of its
//! init and agent, beside the logs of `sandboxing::logs`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use stacyvm_core::{EgressRule, Result, SandboxId};

use crate::sandboxing::cgroups::Group;
use crate::sandboxing::logs;
use crate::sandboxing::rootfs::{self, Layout};

pub const META_FILE: &str = "meta.json";
/// The sandbox's PID 1 (the agent in `--init` mode), as the host numbers it.
pub const INIT_PID_FILE: &str = "init.pid";
/// The agent proper, the init's child, as the host numbers it.
pub const AGENT_PID_FILE: &str = "agent.pid";

/// The host ids a sandbox's user namespace maps: its ids `0..count` are the
/// host's `first..first + count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdBlock {
    pub first: u32,
    pub count: u32,
}

impl IdBlock {
    /// The `uid_map`/`gid_map` line of the sandbox's user namespace.
    pub fn map_line(&self) -> String {
        format!("0 {} {}\n", self.first, self.count)
    }

    pub fn contains(&self, host_id: u32) -> bool {
        host_id >= self.first && u64::from(host_id) < u64::from(self.first) + u64::from(self.count)
    }
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
    /// The host ids of the sandbox's user namespace.
    pub ids: IdBlock,
    pub workdir: String,
    /// Made by a server that was not root: `ids` are the server's own, and
    /// the root is mounted in the sandbox's namespaces alone.
    #[serde(default)]
    pub rootless: bool,
    /// Its egress allow list; empty: none (full egress, or no network).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_allow: Vec<EgressRule>,
}

impl SandboxMeta {
    /// The directory the sandbox's root is mounted on (on the host).
    pub fn root(&self) -> PathBuf {
        rootfs::root_of(&self.run_dir)
    }

    /// The directory holding the agent's socket (the guest's `/.stacyvm/run`).
    pub fn socket_dir(&self) -> PathBuf {
        rootfs::socket_dir_of(&self.run_dir)
    }
}

pub fn write_meta(dir: &Path, meta: &SandboxMeta) -> Result<()> {
    logs::write_json(dir, META_FILE, meta)
}

pub fn read_meta(dir: &Path) -> Option<SandboxMeta> {
    logs::read_json(dir, META_FILE)
}
