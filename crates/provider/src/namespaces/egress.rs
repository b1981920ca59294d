//! Egress for namespaces sandboxes (root mode only).
//!
//! A sandbox that asks for `egress` keeps the network namespace its
//! processes were cloned into; the host names it (`ip netns attach`) and
//! hands it one end of a veth pair as `eth0`, on a /30 of the same pool and
//! under the same host-wide nftables table as microVM guests
//! ([`crate::microvm::net`]): it reaches other machines, masqueraded, but
//! never the host or another sandbox, and nothing opens a connection into
//! it. Its `/etc/resolv.conf` names the upstream resolvers.
//!
//! With an allow list, the namespace also gets the table and the DNS filter
//! of [`crate::egress_filter`], both in place before spawn returns, so no
//! command of the sandbox ever runs without them. The sandbox cannot change
//! either: it has no `CAP_NET_ADMIN` (Docker's default capabilities).

use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;

use stacyvm_core::{Error, Result, SandboxId, SpawnSpec};

use super::state::{SandboxMeta, INIT_PID_FILE};
use super::NamespacesProvider;
use crate::egress_filter::{self, EgressGuard, NetNs, Placement};
use crate::microvm::{self, net};
use crate::sandboxing::logs;
use crate::sandboxing::mounts::{self, Owner};
use crate::sandboxing::procs::ProcId;

/// The sandbox's network lease ([`net::GuestNet`]), in its directory.
pub(super) const NET_FILE: &str = "net.json";

/// Why this host cannot give namespaces sandboxes egress, if so.
pub(super) fn unavailable(rootless: bool) -> Option<String> {
    if rootless {
        return Some(
            "the namespaces provider gives sandboxes network access only when StacyVM runs as \
             root (the veth pair into a sandbox's network namespace and the host's nftables \
             rules need it); this server is rootless"
                .into(),
        );
    }
    ["ip", "nft"]
        .into_iter()
        .find(|tool| microvm::find_program(tool).is_none())
        .map(|tool| {
            format!(
                "the namespaces provider gives sandboxes network access with `ip` and `nft`, and \
                 {tool} was not found (install Debian's iproute2 and nftables)"
            )
        })
}

/// Writes `text` as `/etc/resolv.conf` inside `root`, replacing whatever
/// the image has there (a symbolic link included, which is removed, never
/// followed): `/etc` is reached without following any link, and the file
/// is made fresh and owned by the sandbox's root.
pub(super) fn write_resolv_conf(root: &Path, text: &str, owner: Owner) -> Result<()> {
    let etc = mounts::open_mount_point(root, "/etc", Some(owner)).map_err(|e| {
        Error::InvalidRequest(format!(
            "the image's /etc cannot hold the sandbox's resolver file ({e}): it is, or goes \
             through, a symbolic link or something that is not a directory"
        ))
    })?;
    let name = c"resolv.conf";
    // SAFETY: a directory descriptor owned by `etc` and a NUL-terminated
    // name; unlinkat neither follows a link nor touches our memory.
    if unsafe { libc::unlinkat(etc.as_raw_fd(), name.as_ptr(), 0) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENOENT) {
            return Err(Error::InvalidRequest(format!(
                "the image's /etc/resolv.conf cannot be replaced ({e}); egress sandboxes need it \
                 to be a file"
            )));
        }
    }
    // SAFETY: as above; O_EXCL|O_NOFOLLOW make a new file or fail.
    let fd = unsafe {
        libc::openat(
            etc.as_raw_fd(),
            name.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o644,
        )
    };
    if fd < 0 {
        return Err(Error::internal(
            "creating the sandbox's /etc/resolv.conf",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.write_all(text.as_bytes())
        .and_then(|()| std::os::unix::fs::fchown(&f, Some(owner.uid), Some(owner.gid)))
        .map_err(|e| Error::internal("writing the sandbox's /etc/resolv.conf", e))
}

impl NamespacesProvider {
    /// The resolvers allow-listed names are forwarded to.
    pub(super) fn egress_upstreams(&self) -> Result<Vec<SocketAddr>> {
        egress_filter::upstreams(&self.cfg.egress_dns_upstreams)
    }

    /// How many DNS filters run (one per sandbox with an allow list).
    pub fn egress_dns_filters(&self) -> usize {
        self.egress_guards.running()
    }

    /// Gives the sandbox whose init is `pid` its allow list (when it has
    /// one) and then its veth pair, before any of its commands runs.
    pub(super) async fn connect_network(
        &self,
        spec: &SpawnSpec,
        dir: &Path,
        pid: u32,
        upstreams: Vec<SocketAddr>,
    ) -> Result<()> {
        let id = &spec.sandbox_id;
        if !spec.egress_allow.is_empty() {
            self.egress_guards.arming(id);
            let netns = NetNs::of_pid(pid)
                .map_err(|e| Error::internal("opening the sandbox's network namespace", e))?;
            let guard =
                EgressGuard::arm(netns, Placement::Own, &spec.egress_allow, upstreams).await?;
            self.egress_guards.armed(id, guard);
            logs::provider_log(
                dir,
                &format!(
                    "egress allow list enforced ({} entries)",
                    spec.egress_allow.len()
                ),
            );
        }
        let lease = net::create(id, dir, net::Holder::Process(pid), |n| {
            logs::write_json(dir, NET_FILE, n)
        })
        .await?;
        logs::provider_log(
            dir,
            &format!(
                "network: egress, eth0 {}/30 via {} (host side {})",
                lease.guest_addr(),
                lease.gateway(),
                lease.host_if()
            ),
        );
        Ok(())
    }

    /// Stops the sandbox's DNS filter and removes its veth pair and
    /// namespace name (nothing when it had none).
    pub(super) async fn disconnect_network(&self, id: &SandboxId) -> Result<()> {
        self.egress_guards.remove(id);
        net::remove(id).await
    }

    /// Starts the DNS filter again for a running sandbox with an allow list
    /// that has none: one a new server adopted (the filter ended with the
    /// server that started it; the table, in the sandbox's namespace, did
    /// not). Failures are logged: the sandbox stays as restricted as it
    /// was, its lookups fail.
    pub(super) async fn rearm(&self, dir: &Path, meta: &SandboxMeta) {
        let id = &meta.sandbox_id;
        if meta.egress_allow.is_empty() || self.egress_guards.has(id) {
            return;
        }
        let result = async {
            let init = ProcId::read(&dir.join(INIT_PID_FILE))
                .filter(|p| p.is_alive())
                .ok_or_else(|| Error::Conflict(format!("sandbox {id} is not running")))?;
            let netns = NetNs::of_pid(init.pid as u32)
                .map_err(|e| Error::internal("opening the sandbox's network namespace", e))?;
            // The pid was read before the namespace was opened: the same
            // process still running means the namespace is the sandbox's.
            if !init.is_alive() {
                return Err(Error::Conflict(format!("sandbox {id} is not running")));
            }
            EgressGuard::resume(
                netns,
                Placement::Own,
                &meta.egress_allow,
                self.egress_upstreams()?,
            )
            .await
        }
        .await;
        match result {
            Ok(guard) => {
                if self.egress_guards.adopt(id, guard) {
                    tracing::info!(sandbox = %id, "DNS filter of an adopted sandbox started again");
                }
            }
            Err(e) => tracing::warn!(
                sandbox = %id,
                error = %e.message(),
                "cannot start the DNS filter of an adopted sandbox again; its lookups fail"
            ),
        }
    }
}
