//! The provider contract: the runtime-specific part of StacyVM behind one
//! trait, plus the providers themselves (Docker, namespaces, PRoot, and
//! out-of-process plugins), the async client
//! that talks to the in-sandbox agent, and the image catalog.
//!
//! Providers never see tenants, quotas or HTTP: they turn a [`SpawnSpec`]
//! into an isolated runtime with the agent inside and hand back a
//! connection to that agent ([`Provider::agent`]). Exec, streaming and
//! files are implemented once, on [`AgentClient`]; a provider only says how
//! to start, find, stop, pause and list its runtimes.

pub mod agent_client;
pub mod certify;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod docker;
pub mod egress_filter;
#[cfg(feature = "fake")]
pub mod fake;
pub mod firecracker;
pub mod host;
pub mod images;
pub mod kvm;
pub mod microvm;
pub mod namespaces;
pub mod plugin;
pub mod proot;
pub mod qemu;
pub mod sandboxing;
pub mod snapshot;

use std::sync::Arc;

use async_trait::async_trait;
use futures_core::Stream;
use serde::{Deserialize, Serialize};
use std::pin::Pin;

pub use agent_client::AgentClient;
pub use stacyvm_core::{
    ArchiveSummary, ByteStream, Error, ExecEvent, ExecOutcome, ExecRequest, FileEntry, Result,
    SandboxId, SpawnSpec,
};

/// Whether a provider can be used on this host, and why not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub healthy: bool,
    /// Human-readable detail: the version in use, or the reason and the fix.
    pub detail: String,
}

/// How a provider that can run in more than one way runs on this host, and
/// which of its sandbox limits it does not enforce there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderMode {
    /// e.g. `root` or `rootless` (the namespaces provider).
    pub mode: String,
    /// The limits sandboxes do not get here: `memory`, `cpu`, `pids`,
    /// `pause`. Empty when every one is enforced.
    pub not_enforced: Vec<String>,
}

/// A runtime the provider owns, as found on the host (for reconciliation).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeInfo {
    pub sandbox_id: SandboxId,
    /// Whether the runtime is up (a stopped container or a dead process
    /// tree is listed with `running: false` until destroyed).
    pub running: bool,
}

/// One reading of a sandbox's resource use, as its provider measures it: a
/// container's or process tree's cgroup, or the guest's own kernel for a
/// microVM. A field the provider cannot measure is `None`, never a guess.
/// CPU use is a counter: a rate needs two readings (the control plane keeps
/// them).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RuntimeStats {
    /// CPUs the sandbox may use: its CPU quota, else the CPUs it can run on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_count: Option<f64>,
    /// CPU time its processes used since it started, in nanoseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_time_ns: Option<u64>,
    /// Memory in use, in bytes, without the page cache the kernel can drop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_used: Option<u64>,
    /// Memory it may use: its limit, else the machine's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_total: Option<u64>,
    /// Page cache charged to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_cache: Option<u64>,
    /// Used and total bytes of the filesystem its root lives on (what `df /`
    /// shows inside it: the host's filesystem for a container, which has no
    /// disk of its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_used: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_total: Option<u64>,
}

/// One diagnostic line from the provider or the runtime.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    #[serde(with = "time::serde::rfc3339")]
    pub ts: time::OffsetDateTime,
    /// `provider` (the provider's own diagnostics) or `runtime` (what the
    /// runtime and agent printed).
    pub source: String,
    pub message: String,
}

/// The events of a streaming exec, ending with [`ExecEvent::Exit`]. Dropping
/// the stream before the exit kills the command.
pub type ExecStream = Pin<Box<dyn Stream<Item = Result<ExecEvent>> + Send + 'static>>;

/// Both halves of a byte connection to an agent.
pub trait AgentIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}

impl<T> AgentIo for T where T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}

/// A raw connection to an agent (see [`Provider::agent_stream`]).
pub type AgentStream = Box<dyn AgentIo>;

/// The runtime-specific part of StacyVM.
///
/// Every method is safe to call concurrently. `destroy` is idempotent:
/// destroying twice, or destroying a half-created runtime, succeeds and
/// leaves nothing behind.
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// The provider's name as the API shows it (`docker`, `proot`, …).
    fn name(&self) -> &str;

    /// Whether the provider's sandboxes are kept from the host and from one
    /// another. One that is not (PRoot, a plugin that does not declare
    /// itself one) is never chosen for a create that does not name it, and
    /// serves only tenants the operator allowed it.
    fn security_boundary(&self) -> bool {
        true
    }

    /// Is the runtime usable on this host, and why not.
    async fn health(&self) -> Health;

    /// The mode the provider runs in on this host, for providers that have
    /// more than one; `None` for the others.
    fn mode(&self) -> Option<ProviderMode> {
        None
    }

    /// Whether [`Provider::spawn`] binds `spec.mounts` (volumes) into the
    /// sandbox. The worker refuses a spec with mounts for one that does not,
    /// so a provider that ignores them can never drop a volume silently.
    fn supports_mounts(&self) -> bool {
        false
    }

    /// Whether [`Provider::spawn`] enforces `spec.egress_allow` (only the
    /// listed destinations reachable, DNS only for the listed names), and
    /// why not. The worker refuses a spec with an allow list for a provider
    /// that answers `Err`, so a list is never silently widened to full
    /// egress.
    fn egress_allow_support(&self) -> std::result::Result<(), String> {
        Err(format!(
            "the {} provider cannot enforce an egress allow list (network.allow): StacyVM \
             filters outbound traffic only in a network namespace it controls; use the docker \
             provider, or network \"none\" or \"egress\"",
            self.name()
        ))
    }

    /// Starts a runtime for `spec` and returns once its agent answers.
    /// On error nothing of the runtime is left behind.
    async fn spawn(&self, spec: &SpawnSpec) -> Result<()>;

    /// Stops the runtime and removes everything of it. Succeeds when there is
    /// nothing to remove.
    async fn destroy(&self, id: &SandboxId) -> Result<()>;

    /// The runtimes this provider owns on this host.
    async fn list(&self) -> Result<Vec<RuntimeInfo>>;

    /// Provider and runtime diagnostics for one sandbox.
    async fn logs(&self, id: &SandboxId) -> Result<Vec<LogLine>>;

    /// A connection to the sandbox's agent (cached and reused by providers).
    /// `NotFound` when the runtime does not exist, `Conflict` when it exists
    /// but is not running.
    async fn agent(&self, id: &SandboxId) -> Result<Arc<AgentClient>>;

    /// A raw byte connection to the sandbox's agent, checked like the one
    /// behind [`Provider::agent`] (who serves the socket), on which the
    /// caller runs the agent protocol itself: a worker carries it to a
    /// control plane on another host, where `AgentClient::over` speaks it.
    /// Every call opens a new connection (the agent serves many). The same
    /// `NotFound` and `Conflict` answers as `agent`.
    async fn agent_stream(&self, _id: &SandboxId) -> Result<AgentStream> {
        Err(Error::Unsupported(format!(
            "the {} provider cannot hand out a raw connection to its agents, so its sandboxes \
             cannot be reached from another host",
            self.name()
        )))
    }

    /// The image catalog dropped `image`: remove any copy this provider
    /// keeps of it (the Docker provider's imported Docker image). Nothing to
    /// remove is success.
    async fn image_removed(&self, _image: &images::ImageInfo) -> Result<()> {
        Ok(())
    }

    async fn pause(&self, _id: &SandboxId) -> Result<()> {
        Err(Error::Unsupported(format!(
            "the {} provider cannot pause sandboxes",
            self.name()
        )))
    }

    async fn resume(&self, _id: &SandboxId) -> Result<()> {
        Err(Error::Unsupported(format!(
            "the {} provider cannot resume sandboxes",
            self.name()
        )))
    }

    /// A reading of the sandbox's resource use (see [`RuntimeStats`]).
    /// `Unsupported` from a provider that cannot measure its sandboxes;
    /// `NotFound` when the runtime does not exist.
    async fn stats(&self, _id: &SandboxId) -> Result<RuntimeStats> {
        Err(Error::Unsupported(format!(
            "the {} provider cannot measure its sandboxes' resource use",
            self.name()
        )))
    }

    /// Streams the sandbox's root filesystem as a tar, for a snapshot that
    /// the catalog imports as a new image. The caller pauses the sandbox
    /// first where the provider can, so the tar is one consistent moment.
    /// Kernel filesystems and StacyVM's injected files are left out (see
    /// [`snapshot::DEFAULT_EXCLUDES`]); links are stored, never followed.
    async fn snapshot(&self, _id: &SandboxId) -> Result<ByteStream> {
        Err(Error::Unsupported(format!(
            "the {} provider cannot snapshot sandboxes",
            self.name()
        )))
    }
}

/// Where a provider finds the static agent binary on the host.
pub fn agent_binary_path() -> Result<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("STACYVM_AGENT_BIN").filter(|p| !p.is_empty()) {
        let p = std::path::PathBuf::from(p);
        return if p.is_file() {
            // Absolute, because providers hand the path to other processes
            // (proot, dockerd) that do not share our working directory.
            let p = std::fs::canonicalize(&p)
                .map_err(|e| Error::internal(format!("resolving {}", p.display()), e))?;
            check_static_agent(&p)?;
            Ok(p)
        } else {
            Err(Error::ProviderUnavailable(format!(
                "STACYVM_AGENT_BIN={} does not name a file",
                p.display()
            )))
        };
    }
    let exe =
        std::env::current_exe().map_err(|e| Error::internal("locating the stacyvm binary", e))?;
    let beside = exe.with_file_name("stacyvm-agent");
    if beside.is_file() {
        check_static_agent(&beside)?;
        return Ok(beside);
    }
    Err(Error::ProviderUnavailable(format!(
        "the static agent binary was not found at {} (build it with scripts/build-agent.sh, or set STACYVM_AGENT_BIN)",
        beside.display()
    )))
}

/// Refuses an agent that cannot start inside a sandbox: anything but a
/// 64-bit ELF executable without a program interpreter (a dynamically
/// linked build, such as the one `cargo build` puts beside a debug
/// `stacyvm`, needs a loader and libraries the sandbox's image lacks).
pub fn check_static_agent(path: &std::path::Path) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    const PT_INTERP: u32 = 3;
    let unusable = |why: &str| {
        Error::ProviderUnavailable(format!(
            "the agent {} {why}; build the static agent with scripts/build-agent.sh and point \
             STACYVM_AGENT_BIN at it",
            path.display()
        ))
    };
    let mut f = std::fs::File::open(path)
        .map_err(|e| Error::internal(format!("opening {}", path.display()), e))?;
    let mut head = [0u8; 64];
    f.read_exact(&mut head)
        .map_err(|_| unusable("is not an ELF executable"))?;
    if &head[..4] != b"\x7fELF" || head[4] != 2 || head[5] != 1 {
        return Err(unusable("is not a 64-bit little-endian ELF executable"));
    }
    let u16_at = |o: usize| u16::from_le_bytes([head[o], head[o + 1]]);
    let phoff = u64::from_le_bytes(head[32..40].try_into().unwrap_or_default());
    let (phentsize, phnum) = (u64::from(u16_at(54)), u64::from(u16_at(56)));
    if phentsize < 4 || phnum > 4096 {
        return Err(unusable("has a malformed ELF header"));
    }
    for i in 0..phnum {
        let mut p_type = [0u8; 4];
        f.seek(SeekFrom::Start(phoff + i * phentsize))
            .and_then(|_| f.read_exact(&mut p_type))
            .map_err(|_| unusable("has a malformed ELF header"))?;
        if u32::from_le_bytes(p_type) == PT_INTERP {
            return Err(unusable("is dynamically linked"));
        }
    }
    Ok(())
}

/// A shared handle to any provider.
pub type DynProvider = Arc<dyn Provider>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_static_elf_agent_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("agent.sh");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        let e = check_static_agent(&script).unwrap_err();
        assert!(e.to_string().contains("not an ELF"), "{e}");
        // A dynamically linked executable of the host.
        let e = check_static_agent(std::path::Path::new("/bin/sh")).unwrap_err();
        assert!(e.to_string().contains("dynamically linked"), "{e}");
        assert!(matches!(e, Error::ProviderUnavailable(_)));
        // A minimal ELF64 with one program header: PT_LOAD passes,
        // PT_INTERP does not.
        let elf = |p_type: u32| {
            let mut b = vec![0u8; 64 + 56];
            b[..4].copy_from_slice(b"\x7fELF");
            b[4] = 2; // 64-bit
            b[5] = 1; // little-endian
            b[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
            b[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
            b[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
            b[64..68].copy_from_slice(&p_type.to_le_bytes());
            b
        };
        let static_elf = dir.path().join("static");
        std::fs::write(&static_elf, elf(1)).unwrap();
        check_static_agent(&static_elf).unwrap();
        let dynamic_elf = dir.path().join("dynamic");
        std::fs::write(&dynamic_elf, elf(3)).unwrap();
        assert!(check_static_agent(&dynamic_elf).is_err());
    }
}
