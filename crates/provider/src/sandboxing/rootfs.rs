//! A process-based sandbox's root and run directory on the host: made at
//! spawn, taken apart at destroy, never deleted while anything is still
//! mounted in it (that would delete the shared image, or the host's
//! devices, through it).
//!
//! ```text
//! <run_dir>/            a small tmpfs, root-owned, mode 0711
//!   root/               the sandbox's root: an overlay over an ID-mapped view
//!                       of the catalog rootfs (or a bind of a private copy)
//!   sock/               the agent's socket and env file (the sandbox's owner, 0700)
//! <sandbox dir>/
//!   lower/              the ID-mapped view (a mount point)
//!   upper/ work/        the overlay's writable layer
//!   rootfs/             the private copy, without overlayfs
//! ```

use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use serde::{Deserialize, Serialize};
use stacyvm_core::{Error, Result};

use super::mounts::{self, Owner};
use super::{idmap, is_root};
use crate::images::remove_tree;

/// Size of the run directory's tmpfs: a socket and an env file fit many
/// times over; a sandbox cannot fill the host's memory through it.
const RUN_DIR_BYTES: u64 = 8 << 20;

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

/// The directory the sandbox's root is mounted on, in its run directory.
pub fn root_of(run_dir: &Path) -> PathBuf {
    run_dir.join("root")
}

/// The directory holding the agent's socket, in its run directory.
pub fn socket_dir_of(run_dir: &Path) -> PathBuf {
    run_dir.join("sock")
}

fn mkdir(path: &Path, mode: u32, owner: Option<Owner>) -> std::io::Result<()> {
    std::fs::DirBuilder::new().mode(mode).create(path)?;
    if let Some(o) = owner {
        std::os::unix::fs::chown(path, Some(o.uid), Some(o.gid))?;
    }
    Ok(())
}

/// Creates the run directory on its own small tmpfs, with the socket
/// directory owned by `owner` (the sandbox's user as the host sees it).
pub fn make_run_dir(run: &Path, owner: Owner) -> Result<()> {
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
    mkdir(&socket_dir_of(run), 0o700, Some(owner)).map_err(|e| io("furnishing", e))?;
    mkdir(&root_of(run), 0o755, None).map_err(|e| io("furnishing", e))?;
    Ok(())
}

/// Rootless: creates the run directory as a plain directory only the
/// server's user may enter (an unprivileged server cannot mount a tmpfs on
/// the host), with the socket directory and the root's mount point in it.
/// The sandbox's root is the server's user here, so nothing is handed over.
pub fn make_run_dir_rootless(run: &Path) -> Result<()> {
    let io = |what: &str, e: std::io::Error| {
        Error::internal(format_args!("{what} {}", run.display()), e)
    };
    if let Some(parent) = run.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(|e| io("creating the parent of", e))?;
    }
    mkdir(run, 0o700, None).map_err(|e| io("creating", e))?;
    mkdir(&socket_dir_of(run), 0o700, None).map_err(|e| io("furnishing", e))?;
    mkdir(&root_of(run), 0o755, None).map_err(|e| io("furnishing", e))?;
    Ok(())
}

/// Rootless: the writable layer of an overlay the sandbox mounts itself,
/// `(upper, work)` in the sandbox directory `dir`.
pub fn make_overlay_dirs(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let (upper, work) = (dir.join("upper"), dir.join("work"));
    mkdir(&upper, 0o755, None)
        .and_then(|()| mkdir(&work, 0o700, None))
        .map_err(|e| {
            Error::internal(format_args!("creating the overlay in {}", dir.display()), e)
        })?;
    Ok((upper, work))
}

/// Whether this host can give sandboxes an overlay over an ID-mapped view
/// of the catalog: root, overlayfs, ID-mapped mounts of the data dir's file
/// system. `Err` says why not.
pub fn probe_overlay(data_dir: &Path) -> std::result::Result<(), String> {
    static PROBES: AtomicU32 = AtomicU32::new(0);
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
    let probe = data_dir.join(format!(
        ".overlay-probe-{}-{}",
        std::process::id(),
        PROBES.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| -> std::io::Result<()> {
        for d in ["image", "lower", "upper", "work", "merged"] {
            std::fs::create_dir_all(probe.join(d))?;
        }
        std::fs::write(probe.join("image/f"), "x")?;
        idmap::bind_idmapped(
            &probe.join("image"),
            &probe.join("lower"),
            super::uids::FIRST_SANDBOX_UID,
        )?;
        mounts::mount_overlay(
            &probe.join("lower"),
            &probe.join("upper"),
            &probe.join("work"),
            &probe.join("merged"),
        )?;
        use std::os::unix::fs::MetadataExt;
        let uid = std::fs::metadata(probe.join("merged/f"))?.uid();
        if uid != super::uids::FIRST_SANDBOX_UID {
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

/// Makes a sandbox's root at `target` from the catalog rootfs `lower`, with
/// its writable layer (or copy) in the sandbox directory `dir`, owned (as
/// the host sees it) by `owner` wherever the image has root. The overlay's
/// lower layer is mapped through `userns` (the sandbox's own user
/// namespace, whose root is `owner`) or, without one, through a namespace
/// made to map root to `owner`. Returns the layout used, and why it differs
/// from `wanted`: an overlay falls back to a copy when it cannot be mounted.
pub async fn make_root(
    lower: &Path,
    dir: &Path,
    target: &Path,
    wanted: Layout,
    owner: Owner,
    userns: Option<&OwnedFd>,
) -> Result<(Layout, Option<String>)> {
    if wanted == Layout::Overlay {
        match mount_overlay(lower, dir, target, owner, userns) {
            Ok(()) => return Ok((Layout::Overlay, None)),
            Err(e) => {
                let _ = mounts::unmount_tree(dir);
                let fallback = format!("overlayfs failed ({e}); copying the rootfs instead");
                copy_root(lower, dir, target, owner).await?;
                return Ok((Layout::Copy, Some(fallback)));
            }
        }
    }
    copy_root(lower, dir, target, owner).await?;
    Ok((Layout::Copy, None))
}

fn mount_overlay(
    lower: &Path,
    dir: &Path,
    target: &Path,
    owner: Owner,
    userns: Option<&OwnedFd>,
) -> std::io::Result<()> {
    let (view, upper, work) = (dir.join("lower"), dir.join("upper"), dir.join("work"));
    // The overlay's root directory takes its owner from the upper layer.
    mkdir(&upper, 0o755, Some(owner))?;
    mkdir(&work, 0o700, None)?;
    mkdir(&view, 0o755, None)?;
    match userns {
        Some(ns) => idmap::bind_idmapped_through(lower, &view, ns)?,
        None => idmap::bind_idmapped(lower, &view, owner.uid)?,
    }
    mounts::mount_overlay(&view, &upper, &work, target)
}

/// Copies the catalog rootfs into the sandbox directory, hands what root
/// owned to `owner`, and binds it on `target`.
async fn copy_root(lower: &Path, dir: &Path, target: &Path, owner: Owner) -> Result<()> {
    let dst = copy_rootfs(lower, dir).await?;
    let (dst2, target2) = (dst.clone(), target.to_path_buf());
    tokio::task::spawn_blocking(move || {
        mounts::chown_tree(&dst2, Owner { uid: 0, gid: 0 }, owner)?;
        mounts::bind(&dst2, &target2)
    })
    .await
    .map_err(|e| Error::internal("preparing the rootfs copy", e))?
    .map_err(|e| Error::internal(format_args!("preparing {}", dst.display()), e))
}

/// Copies the catalog rootfs to `<dir>/rootfs` and returns that path.
pub async fn copy_rootfs(lower: &Path, dir: &Path) -> Result<PathBuf> {
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
    Ok(dst)
}

/// Hands the sandbox's environment to its agent in `socket_dir/env`, a file
/// only `owner` can read (the agent deletes it once read), so it never
/// passes through the environment of whatever starts the agent.
pub fn write_env_file(
    socket_dir: &Path,
    env: &std::collections::BTreeMap<String, String>,
    owner: Owner,
) -> Result<PathBuf> {
    let path = socket_dir.join("env");
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

/// The layers a snapshot of the sandbox in `dir` merges, topmost first:
/// the overlay's upper layer over the lower view it was mounted with (or
/// `lower` when the sandbox mounted its overlay itself and left no view on
/// the host), or the sandbox's own copy of the rootfs.
pub fn snapshot_layers(dir: &Path, layout: Layout, lower: &Path) -> Vec<PathBuf> {
    match layout {
        Layout::Copy => vec![dir.join("rootfs")],
        Layout::Overlay => {
            let view = dir.join("lower");
            let view_mounted = std::fs::read_dir(&view)
                .map(|mut rd| rd.next().is_some())
                .unwrap_or(false);
            let lower = if view_mounted {
                view
            } else {
                lower.to_path_buf()
            };
            vec![dir.join("upper"), lower]
        }
    }
}
