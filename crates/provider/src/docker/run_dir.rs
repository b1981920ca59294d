//! The per-sandbox socket directories on the host: where they live, the
//! small tmpfs each one is, and who may answer on the agent's socket.

use super::*;

pub(super) fn choose_run_root(cfg: &DockerConfig) -> Result<(PathBuf, bool, TmpfsSupport)> {
    let fits = |root: &Path| {
        root.as_os_str().len() + 1 + TYPICAL_SANDBOX_ID_LEN + 1 + SOCKET_NAME.len() <= SUN_PATH_MAX
    };
    let preferred = cfg.data_dir.join("docker");
    let (root, shared) = if fits(&preferred) {
        (preferred, false)
    } else {
        let mut h = Sha256::new();
        h.update(cfg.data_dir.as_os_str().as_encoded_bytes());
        h.update([0]);
        h.update(cfg.instance.as_bytes());
        let short = PathBuf::from("/run/stacyvm")
            .join(format!("docker-{}", &hex::encode(h.finalize())[..12]));
        if !fits(&short) {
            return Err(Error::InvalidRequest(format!(
                "the data directory {} is too long for agent socket paths (108-byte limit); use a shorter one",
                cfg.data_dir.display()
            )));
        }
        (short, true)
    };
    create_run_root(&root).map_err(|e| {
        Error::ProviderUnavailable(format!(
            "cannot create the sandbox socket directory {}: {e} (use a shorter --data-dir, or run as a user that may write there)",
            root.display()
        ))
    })?;
    let tmpfs = probe_tmpfs(&root);
    if shared {
        // Only a check that it can be made; spawns make it again on demand.
        let _ = std::fs::remove_dir(&root);
    }
    Ok((root, shared, tmpfs))
}

/// Whether socket directories get a tmpfs of their own, or why not.
pub(super) type TmpfsSupport = std::result::Result<(), String>;

/// Whether this process can mount a tmpfs under `root` (tried for real:
/// root in a container without `CAP_SYS_ADMIN` cannot).
pub(super) fn probe_tmpfs(root: &Path) -> TmpfsSupport {
    static PROBES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("the server does not run as root".into());
    }
    let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let probe = root.join(format!(".tmpfs-probe-{}-{n}", std::process::id()));
    match std::fs::DirBuilder::new().mode(0o700).create(&probe) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("creating {}: {e}", probe.display())),
    }
    let mounted = mount_run_dir(&probe);
    let unmounted = unmount_run_dir(&probe);
    let _ = std::fs::remove_dir(&probe);
    mounted.map_err(|e| format!("mounting a tmpfs failed: {e}"))?;
    unmounted.map_err(|e| format!("unmounting a tmpfs failed: {e}"))
}

pub(super) fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path holds a NUL byte"))
}

/// Mounts a small tmpfs ([`RUN_DIR_TMPFS_OPTIONS`]) on the directory `dir`.
pub(super) fn mount_run_dir(dir: &Path) -> io::Result<()> {
    let target = c_path(dir)?;
    let options = CString::new(RUN_DIR_TMPFS_OPTIONS)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "tmpfs options"))?;
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            c"stacyvm-run".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            options.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Unmounts what is mounted on the directory `dir`; nothing mounted there,
/// or no `dir` at all, is success.
pub(super) fn unmount_run_dir(dir: &Path) -> io::Result<()> {
    // Stacked mounts take a round each; the bound keeps one that will not
    // go from looping forever.
    for _ in 0..8 {
        if !is_mount_point(dir)? {
            return Ok(());
        }
        let target = c_path(dir)?;
        // SAFETY: `target` is a NUL-terminated string that outlives the call.
        let rc =
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EINVAL) | Some(libc::ENOENT) => Ok(()),
                _ => Err(e),
            };
        }
    }
    Ok(())
}

/// Whether another file system is mounted on the directory `dir`.
pub(super) fn is_mount_point(dir: &Path) -> io::Result<bool> {
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let Some(parent) = dir.parent() else {
        return Ok(false);
    };
    Ok(meta.is_dir() && meta.dev() != std::fs::symlink_metadata(parent)?.dev())
}

/// Who must serve a sandbox's agent socket: a descendant of the
/// container's init, whose host pid the daemon reports. Only a pid this
/// process sees as that init is used (a daemon in another pid namespace
/// reports pids of its own).
pub(super) fn agent_peer(c: &ContainerInspectResponse) -> PeerCheck {
    let init = c
        .state
        .as_ref()
        .and_then(|s| s.pid)
        .and_then(|p| i32::try_from(p).ok())
        .filter(|p| *p > 1)
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|cmd| {
                cmd.split(|b| *b == 0)
                    .any(|arg| arg == AGENT_PATH_IN_SANDBOX.as_bytes())
            })
        });
    PeerCheck {
        ancestor: init,
        ..PeerCheck::default()
    }
}

pub(super) fn create_run_root(root: &Path) -> io::Result<()> {
    // Never made 0700 along the way: other providers' sandboxes pass
    // through it.
    if root.starts_with(crate::sandboxing::RUN_ROOT) {
        crate::sandboxing::ensure_run_root()?;
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
}
