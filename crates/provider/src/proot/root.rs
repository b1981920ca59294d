//! A PRoot sandbox's root and run directory: made at spawn, taken apart at
//! destroy, never deleted while anything is still mounted in it (that
//! would delete the shared image, or the host's devices, through it).
//!
//! ```text
//! <run_dir>/            a small tmpfs, root-owned, mode 0711
//!   root/               the sandbox's root: an overlay over an ID-mapped view
//!                       of the catalog rootfs (or a bind of a private copy),
//!                       with its own /proc (hidepid) and /dev mounted inside
//!   sock/               the agent's socket and env file (the sandbox's user, 0700)
//! <data_dir>/proot/<id>/
//!   lower/              the ID-mapped view (a mount point)
//!   upper/ work/        the overlay's writable layer
//!   rootfs/             the private copy, without overlayfs
//! ```

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use stacyvm_core::{Error, Result};

use super::state::{Layout, SandboxMeta};
use crate::images::remove_tree;
use crate::sandboxing::mounts::{self, Owner};
use crate::sandboxing::{idmap, is_root};

/// Size of the run directory's tmpfs: a socket and an env file fit many
/// times over; a sandbox cannot fill the host's memory through it.
const RUN_DIR_BYTES: u64 = 8 << 20;
/// Upper bound of a sandbox's `/dev/shm`.
const SHM_BYTES: u64 = 64 << 20;

/// The guest's mount points for the agent's socket directory and binary.
pub const GUEST_RUN_DIR: &str = "/.stacyvm/run";
pub const GUEST_AGENT: &str = "/.stacyvm/agent";

fn mkdir(path: &Path, mode: u32, owner: Option<Owner>) -> std::io::Result<()> {
    std::fs::DirBuilder::new().mode(mode).create(path)?;
    if let Some(o) = owner {
        std::os::unix::fs::chown(path, Some(o.uid), Some(o.gid))?;
    }
    Ok(())
}

/// Creates the run directory on its own small tmpfs, with the socket
/// directory owned by the sandbox's user.
pub fn make_run_dir(meta: &SandboxMeta, owner: Owner) -> Result<()> {
    let run = &meta.run_dir;
    let io = |what: &str, e: std::io::Error| {
        Error::internal(format_args!("{what} {}", run.display()), e)
    };
    if let Some(parent) = run.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(|e| io("creating the parent of", e))?;
    }
    mkdir(run, 0o711, None).map_err(|e| io("creating", e))?;
    mounts::mount_tmpfs(run, RUN_DIR_BYTES, 0o711, "").map_err(|e| io("mounting a tmpfs on", e))?;
    mkdir(&meta.socket_dir(), 0o700, Some(owner)).map_err(|e| io("furnishing", e))?;
    mkdir(&meta.root(), 0o755, None).map_err(|e| io("furnishing", e))?;
    Ok(())
}

/// Whether this host can give sandboxes an overlay over an ID-mapped view
/// of the catalog: root, overlayfs, ID-mapped mounts of the data dir's file
/// system. `Err` says why not.
pub fn probe_overlay(data_dir: &Path) -> std::result::Result<(), String> {
    if !is_root() {
        return Err("overlayfs and ID-mapped mounts need root".into());
    }
    let fs = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !fs
        .lines()
        .any(|l| l.split_whitespace().last() == Some("overlay"))
    {
        return Err("the kernel has no overlayfs".into());
    }
    let probe = data_dir.join(format!(".proot-overlay-probe-{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        for d in ["image", "lower", "upper", "work", "merged"] {
            std::fs::create_dir_all(probe.join(d))?;
        }
        std::fs::write(probe.join("image/f"), "x")?;
        idmap::bind_idmapped(
            &probe.join("image"),
            &probe.join("lower"),
            crate::sandboxing::uids::FIRST_SANDBOX_UID,
        )?;
        mounts::mount_overlay(
            &probe.join("lower"),
            &probe.join("upper"),
            &probe.join("work"),
            &probe.join("merged"),
        )?;
        use std::os::unix::fs::MetadataExt;
        let uid = std::fs::metadata(probe.join("merged/f"))?.uid();
        if uid != crate::sandboxing::uids::FIRST_SANDBOX_UID {
            return Err(std::io::Error::other(
                "the overlay does not keep the ID mapping",
            ));
        }
        Ok(())
    })();
    let _ = mounts::unmount_tree(&probe);
    let _ = remove_tree(&probe);
    result.map_err(|e| format!("an overlay over an ID-mapped rootfs failed: {e}"))
}

/// Makes the sandbox's root at `meta.root()` from the catalog rootfs
/// `lower`, owned (as the sandbox sees it) by `owner`. Returns the layout
/// used: an overlay falls back to a copy when it cannot be mounted.
pub async fn make_root(
    lower: &Path,
    dir: &Path,
    meta: &SandboxMeta,
    owner: Owner,
) -> Result<(Layout, Option<String>)> {
    let target = meta.root();
    if meta.layout == Layout::Overlay {
        match mount_overlay(lower, dir, &target, owner) {
            Ok(()) => return Ok((Layout::Overlay, None)),
            Err(e) => {
                let _ = mounts::unmount_tree(dir);
                let fallback = format!("overlayfs failed ({e}); copying the rootfs instead");
                copy_root(lower, dir, &target, owner).await?;
                return Ok((Layout::Copy, Some(fallback)));
            }
        }
    }
    copy_root(lower, dir, &target, owner).await?;
    Ok((Layout::Copy, None))
}

fn mount_overlay(lower: &Path, dir: &Path, target: &Path, owner: Owner) -> std::io::Result<()> {
    let (view, upper, work) = (dir.join("lower"), dir.join("upper"), dir.join("work"));
    // The overlay's root directory takes its owner from the upper layer.
    mkdir(&upper, 0o755, Some(owner))?;
    mkdir(&work, 0o700, None)?;
    mkdir(&view, 0o755, None)?;
    idmap::bind_idmapped(lower, &view, owner.uid)?;
    mounts::mount_overlay(&view, &upper, &work, target)
}

/// Copies the catalog rootfs into the sandbox directory, hands what root
/// owned to the sandbox's user, and binds it on `target`.
async fn copy_root(lower: &Path, dir: &Path, target: &Path, owner: Owner) -> Result<()> {
    let dst = dir.join("rootfs");
    std::fs::create_dir(&dst)
        .map_err(|e| Error::internal(format_args!("creating {}", dst.display()), e))?;
    let mut src = lower.as_os_str().to_owned();
    src.push("/.");
    let out = tokio::process::Command::new("cp")
        .arg("-a")
        .arg(src)
        .arg(&dst)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| Error::internal("running cp", e))?;
    if !out.status.success() {
        return Err(Error::Internal(format!(
            "copying the rootfs failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let (dst2, target2) = (dst.clone(), target.to_path_buf());
    tokio::task::spawn_blocking(move || {
        mounts::chown_tree(&dst2, Owner { uid: 0, gid: 0 }, owner)?;
        mounts::bind(&dst2, &target2)
    })
    .await
    .map_err(|e| Error::internal("preparing the rootfs copy", e))?
    .map_err(|e| Error::internal(format_args!("preparing {}", dst.display()), e))
}

/// Makes the mount points and the working directory inside the root, and
/// mounts the sandbox's own `/proc` and `/dev` there.
pub fn furnish(meta: &SandboxMeta, owner: Owner) -> Result<()> {
    let root = meta.root();
    for d in ["/proc", "/dev", GUEST_RUN_DIR, meta.workdir.as_str()] {
        mounts::mkdir_in_root(&root, d, Some(owner))
            .map_err(|e| Error::InvalidRequest(format!("cannot create {d} in the sandbox: {e}")))?;
    }
    mounts::create_file_in_root(&root, GUEST_AGENT, Some(owner))
        .map_err(|e| Error::internal("creating the agent's mount point", e))?;
    mounts::mount_private_proc(&root).map_err(|e| Error::internal("mounting /proc", e))?;
    mounts::mount_private_dev(&root, SHM_BYTES).map_err(|e| Error::internal("mounting /dev", e))?;
    Ok(())
}

/// Hands the sandbox's environment to its agent in a file only the
/// sandbox's user can read (the agent deletes it once read), so it never
/// passes through the tracer's own environment.
pub fn write_env_file(
    meta: &SandboxMeta,
    env: &std::collections::BTreeMap<String, String>,
    owner: Owner,
) -> Result<std::path::PathBuf> {
    let path = meta.socket_dir().join("env");
    let mut body = Vec::new();
    for (k, v) in env {
        body.extend_from_slice(k.as_bytes());
        body.push(b'=');
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| Error::internal("writing the sandbox's env file", e))?;
    f.write_all(&body)
        .and_then(|()| std::os::unix::fs::fchown(&f, Some(owner.uid), Some(owner.gid)))
        .map_err(|e| Error::internal("writing the sandbox's env file", e))?;
    Ok(path)
}

/// Unmounts and removes the run directory and the sandbox directory.
/// Refuses to delete anything while a mount remains below either.
pub fn remove(dir: &Path, run_dir: &Path) -> Result<()> {
    for d in [run_dir, dir] {
        mounts::unmount_tree(d)
            .map_err(|e| Error::internal(format_args!("unmounting below {}", d.display()), e))?;
        if mounts::has_mounts_below(d) {
            return Err(Error::Internal(format!(
                "{} still has mounts below it",
                d.display()
            )));
        }
    }
    remove_tree(run_dir)
        .map_err(|e| Error::internal(format_args!("removing {}", run_dir.display()), e))?;
    remove_tree(dir).map_err(|e| Error::internal(format_args!("removing {}", dir.display()), e))?;
    Ok(())
}
