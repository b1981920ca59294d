//! Volumes in a process sandbox's root: each volume's host filesystem
//! attached, ID-mapped, at its path inside the root the host built, before
//! the sandbox runs, so the sandbox's root owns the volume's root-owned
//! files and what it writes lands on disk under the ids it has inside.

use std::os::fd::OwnedFd;
use std::path::Path;

use stacyvm_core::volumes::validate_mount_path;
use stacyvm_core::{Error, HostMount, Result};

use super::idmap;
use super::mounts::{self, Owner};

/// Attaches every mount of `mounts` inside `root` (a directory the host
/// mounted and the sandbox has not entered yet). Mount points are made
/// (owned by `owner`, the sandbox's root as the host sees it) without ever
/// following a symbolic link, and a volume is mapped through `userns`: an
/// id `n` on the volume's disk is the sandbox's own id `n`.
pub fn attach(root: &Path, volumes: &[HostMount], owner: Owner, userns: &OwnedFd) -> Result<()> {
    for (i, m) in volumes.iter().enumerate() {
        // Checked by the control plane; again here, because a path that
        // reaches the provider is mounted as it stands.
        validate_mount_path(&format!("volumes[{i}].path"), &m.target)?;
        let target = mounts::open_mount_point(root, &m.target, Some(owner)).map_err(|e| match e
            .raw_os_error()
        {
            Some(libc::ELOOP) | Some(libc::EXDEV) => Error::InvalidRequest(format!(
                "volumes[{i}].path: {:?} goes through a symbolic link in the image; \
                     mount the volume at a path without one",
                m.target
            )),
            Some(libc::ENOTDIR) => Error::InvalidRequest(format!(
                "volumes[{i}].path: {:?} is, or is under, something in the image that is \
                     not a directory",
                m.target
            )),
            _ => Error::internal(format_args!("making the mount point {}", m.target), e),
        })?;
        idmap::attach_idmapped(Path::new(&m.source), &target, userns, m.read_only)
            .map_err(|e| Error::internal(format_args!("mounting a volume at {}", m.target), e))?;
    }
    Ok(())
}

/// The provider log's line for a sandbox's volumes.
pub fn describe(volumes: &[HostMount]) -> String {
    let each: Vec<String> = volumes
        .iter()
        .map(|m| {
            format!(
                "{}{}",
                m.target,
                if m.read_only { " (read-only)" } else { "" }
            )
        })
        .collect();
    format!("volumes: {}", each.join(", "))
}
