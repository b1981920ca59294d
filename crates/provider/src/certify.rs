//! Certification: whether a provider really works on this host, proven by
//! running it, and the record of that proof in the data dir.
//!
//! The sandbox-level checks (spawn, exec, every file operation, limits,
//! destroy) are written once over the [`Provider`] trait and run for every
//! provider; the host-level checks of the microVM launchers live in
//! [`crate::kvm`]. A record is kept per provider in
//! `DATA_DIR/certification/PROVIDER.json`, written atomically. `stacyvm
//! serve` enables the providers that need one (see [`needs_certification`]) only with a
//! passing record made on this host by this StacyVM version.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use stacyvm_core::{ExecRequest, Network, SandboxId, SpawnSpec};

use crate::{AgentClient, DynProvider, Error, Health, LogLine, Provider, Result, RuntimeInfo};

/// Memory given to a certification sandbox, in MiB; the memory check
/// allocates well past it.
pub const SANDBOX_MEMORY_MB: u64 = 128;

/// One check of a certification.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    /// What was found: the evidence when it passed, the reason when not.
    pub reason: String,
    /// What to do about a failure; empty when it passed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub fix: String,
}

impl Check {
    pub fn pass(name: &str, reason: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            passed: true,
            reason: reason.into(),
            fix: String::new(),
        }
    }

    pub fn fail(name: &str, reason: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            passed: false,
            reason: reason.into(),
            fix: fix.into(),
        }
    }
}

/// The host a record was made on: a record counts only on the same one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostId {
    pub hostname: String,
    /// `uname -r`: a new kernel can change what a provider can do.
    pub kernel: String,
}

impl HostId {
    pub fn this() -> HostId {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        };
        HostId {
            hostname: read("/proc/sys/kernel/hostname"),
            kernel: read("/proc/sys/kernel/osrelease"),
        }
    }
}

/// A provider's certification on a host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub provider: String,
    pub host: HostId,
    /// The StacyVM version that ran the checks.
    pub version: String,
    #[serde(with = "time::serde::rfc3339")]
    pub certified_at: time::OffsetDateTime,
    /// How the provider runs here: `tcg`/`kvm`/`pvm` for the microVM
    /// launchers, the provider's own mode (`root`, `rootless`) otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// The catalog image the sandbox checks ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Limits the provider does not enforce here.
    #[serde(default)]
    pub not_enforced: Vec<String>,
    pub passed: bool,
    pub checks: Vec<Check>,
}

impl Record {
    /// Whether the record speaks for this host and this StacyVM version:
    /// a new version may launch differently, so it is certified again.
    pub fn applies_here(&self) -> bool {
        self.host == HostId::this() && self.version == env!("CARGO_PKG_VERSION")
    }

    /// The first failed check, as one line.
    pub fn failure(&self) -> Option<String> {
        self.checks
            .iter()
            .find(|c| !c.passed)
            .map(|c| format!("{}: {} (fix: {})", c.name, c.reason, c.fix))
    }
}

fn records_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("certification")
}

/// The record file of `provider` (`plugin:x` is stored as `plugin-x`).
pub fn record_path(data_dir: &Path, provider: &str) -> PathBuf {
    records_dir(data_dir).join(format!("{}.json", provider.replace(':', "-")))
}

/// Writes `record` next to its final name and renames it over it, so a
/// reader sees the old record or the new one, never half of one.
pub fn save(data_dir: &Path, record: &Record) -> Result<PathBuf> {
    let dir = records_dir(data_dir);
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::internal(format!("creating {}", dir.display()), e))?;
    let path = record_path(data_dir, &record.provider);
    let body = serde_json::to_vec_pretty(record)
        .map_err(|e| Error::internal("encoding the certification record", e))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        record.provider.replace(':', "-"),
        std::process::id()
    ));
    let written = (|| -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::internal(format!("writing {}", path.display()), e));
    }
    Ok(path)
}

/// The record of `provider`, if one was made (whatever host it was made on).
pub fn load(data_dir: &Path, provider: &str) -> Option<Record> {
    let body = std::fs::read(record_path(data_dir, provider)).ok()?;
    serde_json::from_slice(&body).ok()
}

/// `Ok(record)` when `provider` has a passing record for this host and
/// version, else the reason it does not, for `"not certified on this host: …"`.
pub fn verdict(data_dir: &Path, provider: &str) -> std::result::Result<Record, String> {
    let run = format!("run `stacyvm certify --provider {provider}`");
    let Some(rec) = load(data_dir, provider) else {
        return Err(format!("never certified; {run}"));
    };
    if rec.host != HostId::this() {
        return Err(format!(
            "the record was made on {} ({}); {run}",
            rec.host.hostname, rec.host.kernel
        ));
    }
    if rec.version != env!("CARGO_PKG_VERSION") {
        return Err(format!(
            "the record was made by StacyVM {}; {run} again",
            rec.version
        ));
    }
    if !rec.passed {
        return Err(rec
            .failure()
            .unwrap_or_else(|| "the last certification failed".into()));
    }
    Ok(rec)
}

/// What `/v1/status` shows of a provider's certification.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Standing {
    /// A passing record for this host and StacyVM version.
    pub certified: bool,
    /// When the record was made.
    #[serde(with = "time::serde::rfc3339")]
    pub certified_at: time::OffsetDateTime,
}

/// The standing of `provider` in `data_dir`; `None` when it was never
/// certified (no record).
pub fn standing(data_dir: &Path, provider: &str) -> Option<Standing> {
    let rec = load(data_dir, provider)?;
    Some(Standing {
        certified: rec.passed && rec.applies_here(),
        certified_at: rec.certified_at,
    })
}

/// A provider `stacyvm serve` was asked for but may not use on this host:
/// listed unhealthy with the reason, refusing every sandbox.
pub struct Uncertified {
    name: String,
    reason: String,
}

impl Uncertified {
    pub fn new(name: &str, reason: String) -> Uncertified {
        Uncertified {
            name: name.into(),
            reason,
        }
    }
}

#[async_trait::async_trait]
impl Provider for Uncertified {
    fn name(&self) -> &str {
        &self.name
    }

    async fn health(&self) -> Health {
        Health {
            healthy: false,
            detail: self.reason.clone(),
        }
    }

    async fn spawn(&self, _spec: &SpawnSpec) -> Result<()> {
        Err(Error::Unavailable(format!(
            "{}: {}",
            self.name, self.reason
        )))
    }

    async fn destroy(&self, _id: &SandboxId) -> Result<()> {
        Ok(())
    }

    async fn list(&self) -> Result<Vec<RuntimeInfo>> {
        Ok(Vec::new())
    }

    async fn logs(&self, id: &SandboxId) -> Result<Vec<LogLine>> {
        Err(Error::NotFound(format!("sandbox {id}")))
    }

    async fn agent(&self, id: &SandboxId) -> Result<Arc<AgentClient>> {
        Err(Error::NotFound(format!("sandbox {id}")))
    }
}

/// Whether provider `name`, running in `mode`, may serve only with a
/// passing record: `firecracker` always, `qemu` in KVM mode (under TCG it
/// needs nothing of the host's KVM).
pub fn needs_certification(name: &str, mode: Option<&str>) -> bool {
    match name {
        "firecracker" => true,
        "qemu" => mode == Some("kvm"),
        _ => false,
    }
}

/// `provider` as `serve` may use it: itself, unless it needs
/// certification here and has no passing record, in which case an
/// unhealthy stand-in saying `"not certified on this host: …"`.
pub fn gated(provider: DynProvider, data_dir: &Path) -> DynProvider {
    let mode = provider.mode().map(|m| m.mode);
    if !needs_certification(provider.name(), mode.as_deref()) {
        return provider;
    }
    match verdict(data_dir, provider.name()) {
        Ok(_) => provider,
        Err(why) => Arc::new(Uncertified::new(
            provider.name(),
            format!("not certified on this host: {why}"),
        )),
    }
}

/// The host-level checks of the `firecracker` provider: KVM must boot the
/// guest kernel (`report`, from [`crate::kvm::kvm_checks`]) and a firecracker
/// binary must be there. Also the mode it would run in (`hardware`, `pvm`
/// or `none`). When these pass, `stacyvm certify` goes on to boot real
/// sandboxes with [`crate::firecracker::FirecrackerProvider`].
pub fn firecracker_checks(
    report: &crate::kvm::KvmReport,
    binary: Option<&Path>,
) -> (String, Vec<Check>) {
    let mut checks = report.checks.clone();
    let found = binary
        .map(Path::to_path_buf)
        .or_else(|| crate::microvm::find_program("firecracker"));
    match found {
        Some(b) if b.is_file() => {
            checks.push(Check::pass("firecracker-binary", b.display().to_string()))
        }
        Some(b) => checks.push(Check::fail(
            "firecracker-binary",
            format!("no firecracker binary at {}", b.display()),
            "point --firecracker-bin at a firecracker release binary",
        )),
        None => checks.push(Check::fail(
            "firecracker-binary",
            "no firecracker binary; set --firecracker-bin",
            format!(
                "install a firecracker release binary and pass --firecracker-bin PATH{}",
                if report.kind == crate::kvm::KvmKind::Pvm {
                    " (on this PVM host, a PVM-capable firecracker build)"
                } else {
                    ""
                }
            ),
        )),
    }
    (report.kind.as_str().to_owned(), checks)
}

/// The host-level checks of the `qemu` provider (from `report`, of
/// [`crate::kvm::kvm_checks`]) and the mode it runs in: `kvm` when KVM
/// boots the guest kernel here, else `tcg`. A KVM that
/// does not boot a guest is no failure for `qemu` (TCG is a VM boundary
/// too), so those findings become one passing `accel` check saying
/// which mode and why; QEMU and the guest kernel must be there.
pub fn qemu_host_checks(
    report: &crate::kvm::KvmReport,
    provider_mode: Option<&str>,
) -> (String, Vec<Check>) {
    let mut checks = Vec::new();
    let mut kvm_findings = Vec::new();
    for c in report.checks.iter().cloned() {
        match c.name.as_str() {
            "qemu-binary" | "guest-kernel" => checks.push(c),
            _ => kvm_findings.push(c),
        }
    }
    let why = kvm_findings
        .iter()
        .map(|c| format!("{}: {}", c.name, c.reason))
        .collect::<Vec<_>>()
        .join("; ");
    let accel = match (report.boots, provider_mode) {
        (true, Some("kvm")) => format!("KVM mode: KVM boots a guest here ({why})"),
        (true, _) => format!(
            "TCG mode: KVM boots a guest here ({why}), but the qemu provider runs its \
             sandboxes under TCG"
        ),
        (false, _) => format!(
            "TCG mode (software emulation, slower, still a VM boundary): KVM does not boot \
             a guest here ({why})"
        ),
    };
    checks.push(Check::pass("accel", accel));
    let mode = match provider_mode {
        Some(m) => m.to_owned(),
        None if report.boots => "kvm".to_owned(),
        None => "tcg".to_owned(),
    };
    (mode, checks)
}

fn body(data: &[u8]) -> stacyvm_core::ByteStream {
    let chunk: std::io::Result<Bytes> = Ok(Bytes::copy_from_slice(data));
    Box::pin(futures_util::stream::iter(vec![chunk]))
}

async fn read_all(mut s: stacyvm_core::ByteStream) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(chunk) = s.next().await {
        out.extend_from_slice(&chunk.map_err(|e| Error::internal("reading a file", e))?);
    }
    Ok(out)
}

fn exec(cmd: &str, timeout_ms: u64) -> ExecRequest {
    ExecRequest {
        cmd: vec!["/bin/sh".into(), "-c".into(), cmd.into()],
        env: BTreeMap::new(),
        cwd: None,
        stdin: None,
        timeout_ms,
        output_cap: 64 * 1024,
        user: None,
    }
}

/// Runs `f`, turning an error into a failed check with `fix`.
async fn check<F>(name: &str, fix: &str, f: F) -> Check
where
    F: std::future::Future<Output = std::result::Result<String, String>>,
{
    match f.await {
        Ok(evidence) => Check::pass(name, evidence),
        Err(reason) => Check::fail(name, reason, fix),
    }
}

/// What [`sandbox_checks`] runs.
#[derive(Clone, Debug)]
pub struct SandboxChecks {
    /// The catalog image the sandbox runs.
    pub image: String,
    /// Whether the fork bomb and the memory hog run: a microVM's limits
    /// are its own size, and a hog there meets the guest's OOM killer,
    /// which may pick the agent.
    pub limits: bool,
    /// Whether a second sandbox, with egress, must reach a machine beyond
    /// the host and none of the host's own services ([`network_check`]).
    pub network: bool,
}

/// Every provider's limits that [`sandbox_checks`] tries.
const LIMITS: &[&str] = &["pids", "memory"];

/// The sandbox-level checks, the same for every provider: a sandbox of
/// `image` starts with the agent answering, the image's own `/bin/sh`
/// runs, every file operation works, the limits the provider enforces
/// hold, pause and snapshot work where the provider offers them, and
/// destroy leaves nothing. The sandbox is destroyed on every path.
pub async fn sandbox_checks(provider: &DynProvider, what: &SandboxChecks) -> Vec<Check> {
    let image = what.image.as_str();
    let mut checks = Vec::new();
    let health = provider.health().await;
    let name = provider.name().to_owned();
    if !health.healthy {
        checks.push(Check::fail(
            "health",
            health.detail,
            format!("make the {name} provider healthy (see docs/PROVIDERS.md)"),
        ));
        return checks;
    }
    checks.push(Check::pass("health", health.detail));
    let not_enforced = provider.mode().map(|m| m.not_enforced).unwrap_or_default();
    let id = SandboxId::generate();
    let spec = SpawnSpec {
        sandbox_id: id.clone(),
        image: image.into(),
        cpu: 1.0,
        memory_mb: SANDBOX_MEMORY_MB,
        env: BTreeMap::new(),
        workdir: Some("/tmp".into()),
        network: Network::None,
        labels: BTreeMap::from([("stacyvm.certify".into(), "1".into())]),
        mounts: Vec::new(),
        egress_allow: Vec::new(),
    };
    let spawned = tokio::time::timeout(SPAWN_LIMIT, provider.spawn(&spec)).await;
    let started = match spawned {
        Ok(Ok(())) => Check::pass(
            "spawn",
            format!("a sandbox of {image} started and its agent answered"),
        ),
        Ok(Err(e)) => Check::fail(
            "spawn",
            format!("the sandbox did not start: {e}"),
            format!("read the {name} provider's logs; check the image and the agent binary"),
        ),
        Err(_) => Check::fail(
            "spawn",
            format!(
                "the sandbox did not start within {} s",
                SPAWN_LIMIT.as_secs()
            ),
            "check the runtime's logs",
        ),
    };
    let up = started.passed;
    checks.push(started);
    if up {
        let inner = async {
            let agent = match provider.agent(&id).await {
                Ok(a) => a,
                Err(e) => {
                    checks.push(Check::fail(
                        "agent",
                        format!("no connection to the agent: {e}"),
                        "check the agent binary (STACYVM_AGENT_BIN)",
                    ));
                    return;
                }
            };
            checks.push(exec_check(&agent).await);
            checks.push(files_check(&agent).await);
            if name == "docker" {
                checks.push(hardening_check(&agent).await);
            }
            if what.limits {
                for limit in LIMITS {
                    if not_enforced.iter().any(|l| l == limit) {
                        continue;
                    }
                    checks.push(match *limit {
                        "pids" => pids_check(&agent).await,
                        _ => memory_check(&agent).await,
                    });
                }
            }
            checks.push(pause_check(provider, &id).await);
            // A microVM's pause saves and restores the guest, which ends
            // the agent's connections: the provider hands out a new one.
            let agent = provider.agent(&id).await.unwrap_or(agent);
            checks.push(snapshot_check(provider, &agent, &id).await);
            if what.network {
                checks.push(network_check(provider, image).await);
            }
        };
        // Bounded: a check that hangs must not keep the sandbox forever.
        if tokio::time::timeout(CHECKS_LIMIT, inner).await.is_err() {
            checks.push(Check::fail(
                "checks",
                format!(
                    "the sandbox checks did not finish within {} s",
                    CHECKS_LIMIT.as_secs()
                ),
                "check the runtime's logs",
            ));
        }
    }
    // Destroyed whatever happened above: a failed or timed-out spawn may
    // have left part of a runtime.
    match provider.destroy(&id).await {
        Ok(()) => match provider.list().await {
            Ok(l) if l.iter().any(|r| r.sandbox_id == id) => checks.push(Check::fail(
                "destroy",
                "the runtime is still listed after destroy",
                "remove it by hand and report it",
            )),
            Ok(_) if up => checks.push(Check::pass("destroy", "the runtime is gone")),
            Ok(_) => {}
            Err(e) => checks.push(Check::fail(
                "destroy",
                format!("cannot list runtimes: {e}"),
                "check the runtime",
            )),
        },
        Err(e) => checks.push(Check::fail(
            "destroy",
            format!("destroy failed: {e}"),
            "remove the runtime by hand",
        )),
    }
    checks
}

/// What a provider leaves unenforced on this host, as the record lists it:
/// the limits its mode names, and the isolation of one that is not a
/// security boundary.
pub fn not_enforced(provider: &DynProvider) -> Vec<String> {
    let mut out: Vec<String> = provider.mode().map(|m| m.not_enforced).unwrap_or_default();
    if !provider.security_boundary() {
        out.push("isolation".into());
    }
    out
}

/// How long a certification sandbox gets to start (a TCG guest boots
/// slowly on a loaded host).
const SPAWN_LIMIT: Duration = Duration::from_secs(180);
/// How long the checks inside one sandbox get, together.
const CHECKS_LIMIT: Duration = Duration::from_secs(300);

async fn hardening_check(agent: &AgentClient) -> Check {
    check(
        "hardened",
        "the Docker provider must start sandboxes with no-new-privileges and a reduced \
         capability set",
        async {
            let out = agent
                .exec(exec("grep -E '^(NoNewPrivs|CapEff|CapBnd):' /proc/self/status", 30_000))
                .await
                .map_err(|e| format!("reading /proc/self/status: {e}"))?;
            let status = String::from_utf8_lossy(&out.stdout).into_owned();
            let field = |k: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(k))
                    .map(|v| v.trim().to_owned())
                    .unwrap_or_default()
            };
            let (nnp, eff, bnd) = (field("NoNewPrivs:"), field("CapEff:"), field("CapBnd:"));
            if nnp != "1" {
                return Err(format!("NoNewPrivs is {nnp:?} inside the sandbox, not 1"));
            }
            let caps = |hex: &str| u64::from_str_radix(hex, 16).map(u64::count_ones);
            match (caps(&eff), caps(&bnd)) {
                // CAP_SYS_ADMIN is bit 21: a container that has it is not hardened.
                (Ok(n), Ok(_)) if n <= 16 && u64::from_str_radix(&eff, 16).is_ok_and(|v| v & (1 << 21) == 0) => {
                    Ok(format!(
                        "no new privileges, {n} effective capabilities (CapEff {eff}), no CAP_SYS_ADMIN"
                    ))
                }
                _ => Err(format!(
                    "the sandbox runs with CapEff {eff} / CapBnd {bnd}: more than a minimal set"
                )),
            }
        },
    )
    .await
}

async fn pause_check(provider: &DynProvider, id: &SandboxId) -> Check {
    match provider.pause(id).await {
        Err(Error::Unsupported(why)) => {
            return Check::pass("pause", format!("not offered here: {why}"))
        }
        Err(e) => {
            return Check::fail(
                "pause",
                format!("pause failed: {e}"),
                "check the runtime's freezer (cgroup freezer, docker pause, QMP stop)",
            )
        }
        Ok(()) => {}
    }
    if let Err(e) = provider.resume(id).await {
        return Check::fail(
            "pause",
            format!("paused, but resume failed: {e}"),
            "check the runtime's freezer",
        );
    }
    let answered = match provider.agent(id).await {
        Ok(agent) => agent.exec(exec("echo resumed", 30_000)).await,
        Err(e) => Err(e),
    };
    match answered {
        Ok(out) if String::from_utf8_lossy(&out.stdout).contains("resumed") => {
            Check::pass("pause", "paused and resumed; the sandbox answers again")
        }
        Ok(out) => Check::fail(
            "pause",
            format!(
                "after resume, a command printed {:?}",
                String::from_utf8_lossy(&out.stdout).trim()
            ),
            "check the runtime's freezer",
        ),
        Err(e) => Check::fail(
            "pause",
            format!("after resume, the sandbox does not answer: {e}"),
            "check the runtime's freezer",
        ),
    }
}

async fn snapshot_check(provider: &DynProvider, agent: &AgentClient, id: &SandboxId) -> Check {
    let marker = "/tmp/stacyvm-certify-snapshot.txt";
    if let Err(e) = agent
        .file_write(marker, Some(0o644), body(b"snapshot\n"))
        .await
    {
        return Check::fail(
            "snapshot",
            format!("writing the marker file: {e}"),
            "check the agent",
        );
    }
    let stream = match provider.snapshot(id).await {
        Err(Error::Unsupported(why)) => {
            return Check::pass("snapshot", format!("not offered here: {why}"))
        }
        Err(e) => {
            return Check::fail(
                "snapshot",
                format!("snapshot failed: {e}"),
                "read the provider's logs",
            )
        }
        Ok(s) => s,
    };
    let tar = match read_all(stream).await {
        Ok(t) => t,
        Err(e) => {
            return Check::fail(
                "snapshot",
                format!("reading the snapshot: {e}"),
                "read the provider's logs",
            )
        }
    };
    let found = (|| -> std::io::Result<bool> {
        let mut archive = tar::Archive::new(std::io::Cursor::new(&tar));
        for entry in archive.entries()? {
            let mut entry = entry?;
            let path = entry.path()?.to_string_lossy().into_owned();
            if path.trim_start_matches("./").trim_start_matches('/') == &marker[1..] {
                let mut content = String::new();
                std::io::Read::read_to_string(&mut entry, &mut content)?;
                return Ok(content == "snapshot\n");
            }
        }
        Ok(false)
    })();
    match found {
        Ok(true) => Check::pass(
            "snapshot",
            format!(
                "the root filesystem streamed as a tar ({} bytes) holding the file written into it",
                tar.len()
            ),
        ),
        Ok(false) => Check::fail(
            "snapshot",
            format!("the snapshot tar lacks {marker}, written before it was taken"),
            "read the provider's logs",
        ),
        Err(e) => Check::fail(
            "snapshot",
            format!("the snapshot is not a readable tar: {e}"),
            "read the provider's logs",
        ),
    }
}

async fn exec_check(agent: &AgentClient) -> Check {
    check("exec", "check the image's /bin/sh and the agent", async {
        let out = agent
            .exec(exec("echo certify-$((6*7))", 30_000))
            .await
            .map_err(|e| format!("exec failed: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if out.status.exit_code != Some(0) || !stdout.contains("certify-42") {
            return Err(format!(
                "/bin/sh -c exited {:?} printing {:?} (stderr {:?})",
                out.status.exit_code,
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok("the image's /bin/sh ran a command through the agent".into())
    })
    .await
}

async fn files_check(agent: &AgentClient) -> Check {
    check(
        "files",
        "check the agent and the sandbox's filesystem",
        async {
            let e = |op: &str| {
                let op = op.to_owned();
                move |err: Error| format!("{op}: {err}")
            };
            let dir = "/tmp/stacyvm-certify";
            agent.file_mkdir(dir, true).await.map_err(e("mkdir"))?;
            let data = b"certified\n".to_vec();
            agent
                .file_write(&format!("{dir}/a.txt"), Some(0o644), body(&data))
                .await
                .map_err(e("write"))?;
            let back = read_all(
                agent
                    .file_read(&format!("{dir}/a.txt"))
                    .await
                    .map_err(e("read"))?,
            )
            .await
            .map_err(e("read"))?;
            if back != data {
                return Err(format!("read back {back:?}, wrote {data:?}"));
            }
            let listed = agent.file_list(dir, false).await.map_err(e("list"))?;
            if !listed.iter().any(|f| f.name == "a.txt") {
                return Err("list does not show the written file".into());
            }
            let st = agent
                .file_stat(&format!("{dir}/a.txt"))
                .await
                .map_err(e("stat"))?;
            if st.size != data.len() as u64 {
                return Err(format!("stat says {} bytes, wrote {}", st.size, data.len()));
            }
            agent
                .file_move(&format!("{dir}/a.txt"), &format!("{dir}/b.txt"), false)
                .await
                .map_err(e("move"))?;
            let ch = agent
                .file_chmod(&format!("{dir}/b.txt"), 0o600)
                .await
                .map_err(e("chmod"))?;
            if ch.mode != "0600" {
                return Err(format!("chmod 0600 left mode {}", ch.mode));
            }
            let globbed = agent
                .file_glob(&format!("{dir}/*.txt"))
                .await
                .map_err(e("glob"))?;
            if globbed.len() != 1 || !globbed[0].ends_with("b.txt") {
                return Err(format!("glob found {globbed:?}, expected only b.txt"));
            }
            agent.file_delete(dir, true).await.map_err(e("delete"))?;
            if agent.file_stat(dir).await.is_ok() {
                return Err("the directory is still there after delete".into());
            }
            Ok("write, read, list, stat, move, chmod, glob and delete work".into())
        },
    )
    .await
}

/// Attempts at most this many processes: past any sane pid limit, and
/// bounded so a host whose limit does not hold is not itself exhausted.
const FORK_ATTEMPTS: u32 = 4000;

async fn pids_check(agent: &AgentClient) -> Check {
    check(
        "pids-limit",
        "the runtime must apply a pids limit (Docker: PidsLimit; cgroup pids controller)",
        async {
            // The bomb runs in a subshell, which a failed fork ends; the
            // count and the clean-up use shell builtins only, since no
            // fork succeeds while the bomb's processes live.
            let script = format!(
                "( i=0; while [ $i -lt {FORK_ATTEMPTS} ]; do \
                   sleep 120 </dev/null >/dev/null 2>&1 & i=$((i+1)); done ) 2>/dev/null; \
                 n=0; for p in /proc/[0-9]*; do n=$((n+1)); done; \
                 for p in /proc/[0-9]*; do read -r c < \"$p/comm\" && \
                   [ \"$c\" = sleep ] && kill -9 \"${{p#/proc/}}\"; done 2>/dev/null; \
                 echo \"$n\""
            );
            let out = agent
                .exec(exec(&script, 120_000))
                .await
                .map_err(|e| format!("running the fork bomb: {e}"))?;
            let n: u32 = String::from_utf8_lossy(&out.stdout)
                .lines()
                .last()
                .and_then(|l| l.trim().parse().ok())
                .ok_or_else(|| {
                    format!(
                        "cannot count processes: stdout {:?}, stderr {:?}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    )
                })?;
            if n >= FORK_ATTEMPTS {
                return Err(format!(
                    "{n} processes ran: {FORK_ATTEMPTS} forks all succeeded, no pids limit held"
                ));
            }
            let alive = agent
                .exec(exec("echo alive", 30_000))
                .await
                .map_err(|e| format!("the sandbox stopped answering after the fork bomb: {e}"))?;
            if !String::from_utf8_lossy(&alive.stdout).contains("alive") {
                return Err("the sandbox stopped answering after the fork bomb".into());
            }
            Ok(format!(
                "a fork bomb of {FORK_ATTEMPTS} processes stopped at {n} (the pids limit held, \
                 the sandbox still answers)"
            ))
        },
    )
    .await
}

async fn memory_check(agent: &AgentClient) -> Check {
    check(
        "memory-limit",
        "the runtime must apply a memory limit without extra swap",
        async {
            let hog = SANDBOX_MEMORY_MB * 3;
            let out = agent
                .exec(exec(
                    &format!("dd if=/dev/zero of=/dev/null bs={hog}M count=1 && echo survived"),
                    60_000,
                ))
                .await
                .map_err(|e| format!("running the memory hog: {e}"))?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            if stdout.contains("survived") {
                return Err(format!(
                    "a {hog} MiB allocation succeeded in a {SANDBOX_MEMORY_MB} MiB sandbox"
                ));
            }
            let alive = agent
                .exec(exec("echo alive", 30_000))
                .await
                .map_err(|e| format!("the sandbox stopped answering after the hog: {e}"))?;
            if !String::from_utf8_lossy(&alive.stdout).contains("alive") {
                return Err("the sandbox stopped answering after the hog".into());
            }
            let how = match (out.status.exit_code, out.status.signal) {
                (_, Some(sig)) => format!("signal {sig}"),
                (Some(code), None) => format!("exit {code}"),
                (None, None) => "no exit status".to_owned(),
            };
            Ok(format!(
                "a {hog} MiB allocation in a {SANDBOX_MEMORY_MB} MiB sandbox was stopped \
                 ({how}) and the sandbox still answers"
            ))
        },
    )
    .await
}

/// The other end of a veth pair in a network namespace of its own: a
/// machine beyond the host, with a TCP listener, that a guest with egress
/// must reach through the host's forwarding and NAT. Removed on drop.
/// Named and addressed after the certifying process, so two certifications
/// at once do not take each other's link.
struct RemoteEnd {
    netns: String,
    /// The host's end of the veth pair.
    host_if: String,
    /// The host's side of the pair's /30, and the remote's.
    host_addr: std::net::Ipv4Addr,
    addr: std::net::Ipv4Addr,
    listener: std::net::TcpListener,
}

/// 198.18.0.0/15 is set aside for network tests: the remote end takes the
/// /30 numbered by the process id within it, the host's side `.1`, the
/// remote's `.2`. Interfaces are named `svcert<pid>`: not `svq*`, `veth*`,
/// `docker*`, `br-*` nor `svm-*`, which the guests' rules treat as other
/// sandboxes.
fn remote_link(pid: u32) -> (String, std::net::Ipv4Addr, std::net::Ipv4Addr) {
    let base = u32::from(std::net::Ipv4Addr::new(198, 18, 0, 0)) + (pid % (1 << 15)) * 4;
    (
        format!("svcert{pid}"),
        std::net::Ipv4Addr::from(base + 1),
        std::net::Ipv4Addr::from(base + 2),
    )
}

async fn ip(args: &[&str]) -> std::result::Result<(), String> {
    let out = tokio::process::Command::new("ip")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl RemoteEnd {
    async fn new() -> std::result::Result<RemoteEnd, String> {
        let pid = std::process::id();
        let netns = format!("svmcert-{pid}");
        let (host_if, host_addr, addr) = remote_link(pid);
        ip(&["netns", "add", &netns]).await?;
        let mut end = RemoteEnd {
            netns,
            host_if,
            host_addr,
            addr,
            // Replaced below; dropping the end removes the namespace.
            listener: std::net::TcpListener::bind("127.0.0.1:0")
                .map_err(|e| format!("cannot bind a listener: {e}"))?,
        };
        let ns = end.netns.clone();
        let host_if = end.host_if.clone();
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])
        .await?;
        ip(&["addr", "add", &format!("{host_addr}/30"), "dev", &host_if]).await?;
        ip(&["link", "set", &host_if, "up"]).await?;
        let remote_cidr = format!("{addr}/30");
        let gateway = host_addr.to_string();
        for args in [
            vec!["-n", &ns, "addr", "add", &remote_cidr, "dev", "eth0"],
            vec!["-n", &ns, "link", "set", "eth0", "up"],
            vec!["-n", &ns, "link", "set", "lo", "up"],
            vec!["-n", &ns, "route", "add", "default", "via", &gateway],
        ] {
            ip(&args).await?;
        }
        let fd = crate::microvm::net::open_netns(&ns).map_err(|e| e.to_string())?;
        // A socket belongs to the namespace of the thread that makes it:
        // a thread of its own enters the remote's and binds there.
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        let bound = std::thread::spawn(move || {
            // SAFETY: setns(2) on this short-lived thread only; `fd` is
            // open until the thread is joined below.
            unsafe { crate::microvm::net::enter_netns(raw) }?;
            std::net::TcpListener::bind((addr, 0))
        })
        .join()
        .map_err(|_| "the listener thread panicked".to_string())?
        .map_err(|e| format!("cannot listen in {ns}: {e}"))?;
        drop(fd);
        end.listener = bound;
        Ok(end)
    }
}

impl Drop for RemoteEnd {
    fn drop(&mut self) {
        // The pair first, by its host end: a namespace's devices go with
        // it only later, in the kernel's own time.
        for args in [
            &["link", "del", &self.host_if][..],
            &["netns", "del", &self.netns],
        ] {
            let _ = std::process::Command::new("ip")
                .args(args)
                .stdin(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// Connections accepted on `l` within `wait`, with what each sent.
async fn accepted(l: &std::net::TcpListener, wait: Duration) -> Vec<String> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    let _ = l.set_nonblocking(true);
    while tokio::time::Instant::now() < deadline {
        match l.accept() {
            Ok((mut c, _)) => {
                let _ = c.set_nonblocking(false);
                let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                let mut text = String::new();
                let _ = std::io::Read::read_to_string(&mut c, &mut text);
                got.push(text);
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    got
}

/// A sandbox with egress reaches a listener on a machine beyond the host
/// (a namespace behind a veth pair of the host's), and none of the host's
/// own: a listener on all the host's addresses gets nothing, whether the
/// guest knocks at its gateway or at another address of the host.
async fn network_check(provider: &DynProvider, image: &str) -> Check {
    const NAME: &str = "network";
    const FIX: &str = "check the provider's network setup (ip, nftables, IP forwarding)";
    let remote = match RemoteEnd::new().await {
        Ok(r) => r,
        Err(e) => return Check::fail(NAME, format!("setting up the remote end: {e}"), FIX),
    };
    let host = match std::net::TcpListener::bind("0.0.0.0:0") {
        Ok(l) => l,
        Err(e) => return Check::fail(NAME, format!("cannot listen on the host: {e}"), FIX),
    };
    let (Ok(remote_port), Ok(host_port)) = (
        remote.listener.local_addr().map(|a| a.port()),
        host.local_addr().map(|a| a.port()),
    ) else {
        return Check::fail(NAME, "the listeners have no address", FIX);
    };
    let id = SandboxId::generate();
    let spec = SpawnSpec {
        sandbox_id: id.clone(),
        image: image.into(),
        cpu: 1.0,
        memory_mb: SANDBOX_MEMORY_MB,
        env: BTreeMap::new(),
        workdir: Some("/tmp".into()),
        network: Network::Egress,
        labels: BTreeMap::from([("stacyvm.certify".into(), "1".into())]),
        mounts: Vec::new(),
        egress_allow: Vec::new(),
    };
    let result = async {
        tokio::time::timeout(SPAWN_LIMIT, provider.spawn(&spec))
            .await
            .map_err(|_| "the egress sandbox did not start in time".to_string())?
            .map_err(|e| format!("the egress sandbox did not start: {e}"))?;
        let agent = provider
            .agent(&id)
            .await
            .map_err(|e| format!("no connection to the egress sandbox's agent: {e}"))?;
        // The gateway is the host's end of the guest's link.
        let script = format!(
            "command -v nc >/dev/null || {{ echo no-nc; exit 3; }}; \
             gw=$(awk '$2 == \"00000000\" {{ g=$3; printf \"%d.%d.%d.%d\", \
             \"0x\" substr(g,7,2), \"0x\" substr(g,5,2), \"0x\" substr(g,3,2), \"0x\" substr(g,1,2) }}' \
             /proc/net/route); echo gw=$gw; \
             echo host | nc -w 3 $gw {host_port}; \
             echo host | nc -w 3 {host_addr} {host_port}; \
             echo certify-remote | nc -w 5 {addr} {remote_port}; echo done",
            host_addr = remote.host_addr,
            addr = remote.addr
        );
        let out = agent
            .exec(exec(&script, 40_000))
            .await
            .map_err(|e| format!("exec in the egress sandbox failed: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if stdout.contains("no-nc") {
            return Err(format!("the image {image} has no nc to test the network with"));
        }
        let reached_remote = accepted(&remote.listener, Duration::from_secs(3)).await;
        let reached_host = accepted(&host, Duration::from_millis(500)).await;
        if !reached_host.is_empty() {
            return Err(format!(
                "the sandbox reached a service of the host itself ({stdout:?})"
            ));
        }
        if !reached_remote.iter().any(|t| t.contains("certify-remote")) {
            return Err(format!(
                "the sandbox did not reach a listener beyond the host ({}:{remote_port}); \
                 it printed {:?}, stderr {:?}",
                remote.addr,
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let gw = stdout
            .lines()
            .find_map(|l| l.strip_prefix("gw="))
            .unwrap_or("?")
            .to_owned();
        Ok(format!(
            "a sandbox with egress reached a listener beyond the host ({} in namespace {}, behind \
             {}) but not the host's own (at its gateway {gw} or at {})",
            remote.addr,
            remote.netns,
            remote.host_if,
            remote.host_addr
        ))
    }
    .await;
    let destroyed = provider.destroy(&id).await;
    drop(remote);
    match (result, destroyed) {
        (Ok(evidence), Ok(())) => Check::pass(NAME, evidence),
        (Err(e), _) => Check::fail(NAME, e, FIX),
        (Ok(_), Err(e)) => Check::fail(
            NAME,
            format!("destroying the egress sandbox failed: {e}"),
            "remove it by hand",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_certifying_process_has_its_own_remote_link() {
        let (name, host, remote) = remote_link(4_194_303);
        assert_eq!(name, "svcert4194303");
        assert!(name.len() <= 15, "interface names are at most 15 bytes");
        assert_eq!(host.octets()[..2], [198, 19]);
        assert_eq!(u32::from(remote), u32::from(host) + 1);
        assert_eq!(u32::from(host) % 4, 1, "the /30's first host address");
        assert_ne!(remote_link(100).1, remote_link(101).1);
    }

    fn record(passed: bool) -> Record {
        Record {
            provider: "firecracker".into(),
            host: HostId::this(),
            version: env!("CARGO_PKG_VERSION").into(),
            certified_at: time::OffsetDateTime::now_utc(),
            mode: Some("pvm".into()),
            image: None,
            not_enforced: Vec::new(),
            passed,
            checks: vec![if passed {
                Check::pass("kvm", "ok")
            } else {
                Check::fail("kvm", "no boot", "a PVM kernel")
            }],
        }
    }

    #[test]
    fn firecracker_always_and_qemu_in_kvm_mode_need_a_record() {
        assert!(needs_certification("firecracker", None));
        assert!(needs_certification("qemu", Some("kvm")));
        assert!(!needs_certification("qemu", Some("tcg")));
        for p in ["docker", "proot", "namespaces", "plugin:x"] {
            assert!(!needs_certification(p, Some("kvm")), "{p}");
        }
        let d = tempfile::tempdir().expect("tempdir");
        // An ungated provider is served as it is, record or not.
        let docker: DynProvider = Arc::new(Uncertified::new("docker", "stand-in".into()));
        let served = gated(docker, d.path());
        assert_eq!(served.name(), "docker");
        assert_eq!(standing(d.path(), "firecracker"), None);
        save(d.path(), &record(false)).expect("save");
        let st = standing(d.path(), "firecracker").expect("a record");
        assert!(!st.certified);
        save(d.path(), &record(true)).expect("save");
        assert!(standing(d.path(), "firecracker").is_some_and(|s| s.certified));
    }

    #[test]
    fn records_round_trip_and_decide_the_gate() {
        let d = tempfile::tempdir().expect("tempdir");
        let why = verdict(d.path(), "firecracker").expect_err("no record");
        assert!(why.contains("never certified"), "{why}");
        save(d.path(), &record(false)).expect("save");
        let why = verdict(d.path(), "firecracker").expect_err("failed record");
        assert!(
            why.contains("no boot") && why.contains("a PVM kernel"),
            "{why}"
        );
        save(d.path(), &record(true)).expect("save");
        assert!(verdict(d.path(), "firecracker").is_ok());
        let mut other = record(true);
        other.version = "0.0.0-other".into();
        save(d.path(), &other).expect("save");
        let why = verdict(d.path(), "firecracker").expect_err("other version");
        assert!(why.contains("0.0.0-other"), "{why}");
        // Nothing but the record is left in the directory.
        let names: Vec<_> = std::fs::read_dir(d.path().join("certification"))
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("firecracker.json")]);
    }
}
