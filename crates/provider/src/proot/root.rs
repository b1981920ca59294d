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

use std::path::Path;

use stacyvm_core::{Error, Result};

use super::state::{Layout, SandboxMeta};
use crate::sandboxing::mounts::{self, Owner};
use crate::sandboxing::rootfs;

/// Upper bound of a sandbox's `/dev/shm`.
const SHM_BYTES: u64 = 64 << 20;

/// The guest's mount points for the agent's socket directory and binary.
pub const GUEST_RUN_DIR: &str = "/.stacyvm/run";
pub const GUEST_AGENT: &str = "/.stacyvm/agent";

/// Creates the run directory on its own small tmpfs, with the socket
/// directory owned by the sandbox's user.
pub fn make_run_dir(meta: &SandboxMeta, owner: Owner) -> Result<()> {
    rootfs::make_run_dir(&meta.run_dir, owner)
}

pub use rootfs::{probe_overlay, remove};

/// Makes the sandbox's root at `meta.root()` from the catalog rootfs
/// `lower`, owned (as the sandbox sees it) by `owner`. Returns the layout
/// used: an overlay falls back to a copy when it cannot be mounted.
pub async fn make_root(
    lower: &Path,
    dir: &Path,
    meta: &SandboxMeta,
    owner: Owner,
) -> Result<(Layout, Option<String>)> {
    rootfs::make_root(lower, dir, &meta.root(), meta.layout, owner, None).await
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
    rootfs::write_env_file(&meta.socket_dir(), env, owner)
}
