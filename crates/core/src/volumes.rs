//! Volumes: named, sized filesystems that outlive the sandboxes they are
//! mounted into, and the checks on where a sandbox may mount them.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Smallest and largest volume sizes, in MiB. ext4 needs a few MiB for its
/// own metadata; the ceiling keeps one request from claiming a disk.
pub const MIN_VOLUME_MB: i64 = 8;
pub const MAX_VOLUME_MB: i64 = 1024 * 1024;

/// Directories a volume may not be mounted at or under: the kernel's
/// pseudo-filesystems and the places StacyVM's agent and its own mounts live.
const RESERVED: &[&str] = &[
    "/proc",
    "/sys",
    "/dev",
    "/.stacyvm",
    "/stacyvm",
    "/run/stacyvm",
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/hostname",
];

/// One volume a sandbox create asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMount {
    /// The volume's name (in the caller's tenant).
    pub volume: String,
    /// Absolute, normalised path inside the sandbox.
    pub path: String,
    #[serde(default)]
    pub read_only: bool,
}

/// A host directory a provider binds into a sandbox: what a [`VolumeMount`]
/// becomes once the worker has resolved and mounted the volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostMount {
    /// The host directory (the volume's mounted filesystem).
    pub source: String,
    /// Where it appears inside the sandbox (validated by [`validate_mount_path`]).
    pub target: String,
    #[serde(default)]
    pub read_only: bool,
}

/// A volume name: 1–63 characters of `[a-z0-9_-]`, starting alphanumeric, so
/// it is safe as a file name on the host.
pub fn validate_volume_name(field: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidRequest(format!(
            "{field}: {name:?} is not a volume name (1-63 characters of a-z, 0-9, '-' and '_', \
             starting with a letter or digit)"
        )))
    }
}

/// A volume size in MiB within [`MIN_VOLUME_MB`]..=[`MAX_VOLUME_MB`].
pub fn validate_volume_size(field: &str, size_mb: i64) -> Result<()> {
    if (MIN_VOLUME_MB..=MAX_VOLUME_MB).contains(&size_mb) {
        Ok(())
    } else {
        Err(Error::InvalidRequest(format!(
            "{field}: {size_mb} is out of range ({MIN_VOLUME_MB}..={MAX_VOLUME_MB} MiB)"
        )))
    }
}

/// Refuses a mount path that is not absolute and normalised (no `.`, `..`,
/// empty components or trailing slash), is `/`, or is at or under a reserved
/// directory. Symlinks are not resolved here: providers bind onto the path
/// inside the sandbox's own root, never following links to the host.
pub fn validate_mount_path(field: &str, path: &str) -> Result<()> {
    let bad = |why: &str| Err(Error::InvalidRequest(format!("{field}: {path:?} {why}")));
    if !path.starts_with('/') {
        return bad("is not an absolute path");
    }
    if path.contains('\0') {
        return bad("contains a NUL byte");
    }
    if path == "/" {
        return bad("is the sandbox's root");
    }
    if path.len() > 1024 {
        return bad("is too long");
    }
    if path[1..]
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return bad("is not normalised (no '.', '..', '//' or trailing '/')");
    }
    for r in RESERVED {
        if path == *r || path.starts_with(&format!("{r}/")) {
            return bad(&format!(
                "is at or under {r}, which StacyVM or the kernel owns"
            ));
        }
    }
    Ok(())
}

/// Checks every mount of a create: names, paths, and that no two mounts
/// share a path or nest inside each other.
pub fn validate_mounts(mounts: &[VolumeMount]) -> Result<()> {
    for (i, m) in mounts.iter().enumerate() {
        validate_volume_name(&format!("volumes[{i}].volume"), &m.volume)?;
        validate_mount_path(&format!("volumes[{i}].path"), &m.path)?;
        for (j, other) in mounts[..i].iter().enumerate() {
            let nested = m.path.starts_with(&format!("{}/", other.path))
                || other.path.starts_with(&format!("{}/", m.path));
            if m.path == other.path || nested {
                return Err(Error::InvalidRequest(format!(
                    "volumes[{i}].path: {:?} overlaps volumes[{j}].path {:?}",
                    m.path, other.path
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_paths_must_be_absolute_normalised_and_unreserved() {
        for ok in ["/data", "/work/cache", "/home/user/.x"] {
            assert!(validate_mount_path("p", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "data",
            "/",
            "/data/",
            "/a//b",
            "/a/./b",
            "/a/../proc",
            "/proc",
            "/proc/1",
            "/sys/x",
            "/dev",
            "/.stacyvm/agent",
            "/a\0b",
        ] {
            assert!(validate_mount_path("p", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn duplicate_and_nested_mounts_are_refused_naming_the_field() {
        let m = |v: &str, p: &str| VolumeMount {
            volume: v.into(),
            path: p.into(),
            read_only: false,
        };
        assert!(validate_mounts(&[m("a", "/a"), m("b", "/b")]).is_ok());
        let err = validate_mounts(&[m("a", "/a"), m("b", "/a")]).unwrap_err();
        assert!(err.to_string().contains("volumes[1].path"), "{err}");
        assert!(validate_mounts(&[m("a", "/a"), m("b", "/a/b")]).is_err());
        assert!(validate_mounts(&[m("a", "/ab"), m("b", "/a")]).is_ok());
        let err = validate_mounts(&[m("../x", "/a")]).unwrap_err();
        assert!(err.to_string().contains("volumes[0].volume"), "{err}");
    }

    #[test]
    fn names_and_sizes_are_bounded() {
        assert!(validate_volume_name("n", "cache-1").is_ok());
        for bad in ["", "-x", "A", "a/b", "..", &"x".repeat(64)] {
            assert!(validate_volume_name("n", bad).is_err(), "{bad:?}");
        }
        assert!(validate_volume_size("s", MIN_VOLUME_MB - 1).is_err());
        assert!(validate_volume_size("s", 64).is_ok());
    }
}
