//! File entries and sandbox path rules shared by the agent, providers and API.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::pin::Pin;

use crate::error::Error;

/// A stream of bytes moving between the API and a sandbox (uploads,
/// downloads). Never collected whole.
pub type ByteStream =
    Pin<Box<dyn futures_core::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static>>;

/// Longest path accepted, in bytes (Linux `PATH_MAX`).
pub const MAX_PATH_LEN: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileType {
    File,
    Dir,
    Symlink,
    Other,
}

/// A file's metadata, exactly as `API.md` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: String,
    pub name: String,
    #[serde(rename = "type")]
    pub file_type: FileType,
    pub size: u64,
    /// Permission bits as four octal digits, e.g. `"0644"`.
    pub mode: String,
    #[serde(with = "time::serde::rfc3339")]
    pub mtime: time::OffsetDateTime,
    pub symlink_target: Option<String>,
    /// The owner's numeric ids, when the agent reports them (agents before
    /// these fields did not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    /// The entry's `user.*` extended attributes with UTF-8 values (agent
    /// protocol 4; see [`MAX_XATTRS`]). Not part of the `/v1` file view.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, String>,
}

/// Most `user.*` extended attributes an entry reports, and the longest
/// value one may have (longer or non-UTF-8 ones are left out).
pub const MAX_XATTRS: usize = 64;
pub const MAX_XATTR_VALUE: usize = 4096;

/// What unpacking a tar archive into a sandbox wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveSummary {
    /// The directory the archive was unpacked into.
    pub path: String,
    /// Regular files written.
    pub files: u64,
    /// Directories created (or already there).
    pub dirs: u64,
    /// Symbolic links created.
    pub symlinks: u64,
    /// Bytes of file contents written.
    pub bytes: u64,
}

/// Formats permission bits as `API.md` does (`0644`).
pub fn format_mode(mode: u32) -> String {
    format!("{:04o}", mode & 0o7777)
}

/// Parses `"0755"`/`"755"` into permission bits.
pub fn parse_mode(s: &str) -> Result<u32, Error> {
    let bad = || {
        Error::InvalidRequest(format!(
            "mode {s:?} is not an octal permission like \"0644\""
        ))
    };
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return Err(bad());
    }
    let m = u32::from_str_radix(s, 8).map_err(|_| bad())?;
    if m > 0o7777 {
        return Err(bad());
    }
    Ok(m)
}

/// Checks a sandbox path and returns its lexical normal form: absolute, no
/// NUL byte, `.` and `..` folded (never above `/`), no trailing slash.
///
/// This is the first line of defence only: the agent also resolves every
/// path inside the sandbox's own root, so a symlink cannot lead out either.
pub fn validate_sandbox_path(path: &str) -> Result<String, Error> {
    if path.is_empty() {
        return Err(Error::InvalidRequest("path is required".into()));
    }
    if path.as_bytes().contains(&0) {
        return Err(Error::InvalidRequest("path contains a NUL byte".into()));
    }
    if path.len() > MAX_PATH_LEN {
        return Err(Error::InvalidRequest(format!(
            "path is longer than {MAX_PATH_LEN} bytes"
        )));
    }
    if !path.starts_with('/') {
        return Err(Error::InvalidRequest(format!(
            "path {path:?} is not absolute"
        )));
    }
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    Ok(format!("/{}", parts.join("/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_normalise_and_never_climb_above_root() {
        assert_eq!(validate_sandbox_path("/a/b/../c/").unwrap(), "/a/c");
        assert_eq!(
            validate_sandbox_path("/../../etc/passwd").unwrap(),
            "/etc/passwd"
        );
        assert_eq!(validate_sandbox_path("/").unwrap(), "/");
        assert_eq!(validate_sandbox_path("//x/./y").unwrap(), "/x/y");
    }

    #[test]
    fn relative_empty_and_nul_paths_are_invalid() {
        for p in ["", "a/b", "./a", "/a\0b"] {
            assert!(
                matches!(validate_sandbox_path(p), Err(Error::InvalidRequest(_))),
                "{p:?}"
            );
        }
    }

    #[test]
    fn modes_parse_and_format() {
        assert_eq!(parse_mode("0755").unwrap(), 0o755);
        assert_eq!(parse_mode("644").unwrap(), 0o644);
        assert_eq!(format_mode(0o100644), "0644");
        for bad in ["", "9", "0x1", "77777", "-1"] {
            assert!(parse_mode(bad).is_err(), "{bad}");
        }
    }
}
