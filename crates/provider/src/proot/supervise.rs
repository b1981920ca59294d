//! Finding and killing every process of a PRoot sandbox, even ones that
//! called `setsid` or double-forked away from the agent: through its cgroups
//! where the host has them, then by its user id (each sandbox runs as a
//! user of its own), and as a last net through proot's process group, the
//! processes proot traces and the sandbox's environment marker.

use std::time::{Duration, Instant};

use stacyvm_core::{Error, Result, SandboxId};

use crate::sandboxing::cgroups::Group;
use crate::sandboxing::procs::{self, ProcId};

/// The environment variable every process of a sandbox inherits.
pub const SANDBOX_ENV_MARKER: &str = "STACYVM_SANDBOX";
/// How long destroy waits for a sandbox's processes to die.
const KILL_DEADLINE: Duration = Duration::from_secs(10);

/// Everything known about where a sandbox's processes are.
pub struct Processes<'a> {
    pub id: &'a SandboxId,
    pub cgroups: &'a Group,
    pub uid: Option<u32>,
    pub proot: Option<ProcId>,
    pub agent: Option<ProcId>,
}

impl Processes<'_> {
    /// Every live process of the sandbox found without its cgroups.
    fn scan(&self) -> Vec<i32> {
        let me = std::process::id() as i32;
        let marker = format!("{SANDBOX_ENV_MARKER}={}", self.id).into_bytes();
        let pids = procs::all_pids();
        let mut found: Vec<i32> = [self.proot, self.agent]
            .into_iter()
            .flatten()
            .filter(|p| p.is_alive())
            .map(|p| p.pid)
            .collect();
        for &pid in &pids {
            if pid == me || found.contains(&pid) {
                continue;
            }
            let ours = match self.uid {
                Some(uid) => procs::uid_of(pid) == Some(uid),
                None => procs::has_env(pid, &marker),
            };
            if ours && ProcId::of(pid).is_some() {
                found.push(pid);
            }
        }
        // Close over tracer and parent links until nothing new turns up.
        loop {
            let mut grew = false;
            for &pid in &pids {
                if pid == me || found.contains(&pid) || ProcId::of(pid).is_none() {
                    continue;
                }
                let linked = procs::tracer_of(pid).is_some_and(|t| found.contains(&t))
                    || procs::parent_of(pid).is_some_and(|p| found.contains(&p));
                if linked {
                    found.push(pid);
                    grew = true;
                }
            }
            if !grew {
                break;
            }
        }
        found
    }

    /// Kills every process of the sandbox and waits until they are gone;
    /// removes its cgroups.
    pub fn kill_all(&self) -> Result<()> {
        let deadline = Instant::now() + KILL_DEADLINE;
        if self.cgroups.exists() {
            self.cgroups
                .kill_and_remove(KILL_DEADLINE)
                .map_err(|e| Error::internal(format_args!("killing sandbox {}", self.id), e))?;
        }
        // Also with cgroups, as a second net: the user id, the process
        // group, the traced processes and the marker.
        loop {
            if let Some(p) = self.proot.filter(|p| p.is_alive()) {
                // SAFETY: kill has no memory preconditions; the group is the
                // session proot leads (it was started with setsid).
                unsafe { libc::kill(-p.pid, libc::SIGKILL) };
            }
            let procs = self.scan();
            if procs.is_empty() {
                return Ok(());
            }
            // Tracees first: once proot is gone they would run on untraced.
            for &pid in procs.iter().rev() {
                // SAFETY: as above; pids come from this scan.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            if Instant::now() >= deadline {
                return Err(Error::Internal(format!(
                    "processes of sandbox {} survived SIGKILL: {procs:?}",
                    self.id
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Removes the loader (`prooted-<pid>-*`) and glue (`proot-<pid>-*`) a
/// proot process made in /tmp (the health check's proot uses /tmp; a
/// sandbox's proot uses its own scratch directory). Only once no process
/// runs under that pid any more, so a recycled pid's files are left alone.
pub fn remove_proot_temp_files(proot: ProcId) {
    // Ours may still be on its way out (killed, not yet a zombie): only a
    // different process under the same pid keeps the files.
    if ProcId::of(proot.pid).is_some_and(|now| now.start != proot.start) {
        return;
    }
    let proot_pid = proot.pid;
    let prefixes = [
        format!("prooted-{proot_pid}-"),
        format!("proot-{proot_pid}-"),
    ];
    let Ok(rd) = std::fs::read_dir("/tmp") else {
        return;
    };
    for entry in rd.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if prefixes.iter().any(|p| name.starts_with(p.as_str())) {
            let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
            let removed = if is_dir {
                crate::images::remove_tree(&entry.path())
            } else {
                std::fs::remove_file(entry.path())
            };
            if let Err(e) = removed {
                tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove proot's temporary file");
            }
        }
    }
}
