//! Files: entries, lists, the bodies of move, chmod and mkdir, and what an
//! archive upload wrote.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// What a path is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum FileType {
    File,
    Dir,
    Symlink,
    #[serde(other)]
    Other,
}

impl FileType {
    pub fn as_str(self) -> &'static str {
        match self {
            FileType::File => "file",
            FileType::Dir => "dir",
            FileType::Symlink => "symlink",
            FileType::Other => "other",
        }
    }
}

/// A file's metadata (symlinks not followed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FileEntry {
    pub path: String,
    pub name: String,
    #[serde(rename = "type")]
    pub file_type: FileType,
    pub size: u64,
    /// Octal permission bits, e.g. `0644`.
    pub mode: String,
    #[serde(with = "crate::rfc3339")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub mtime: OffsetDateTime,
    pub symlink_target: Option<String>,
}

/// The answer of `GET …/files/list`, sorted by path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Entries {
    pub entries: Vec<FileEntry>,
}

/// The answer of `GET …/files/glob`, sorted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Paths {
    pub paths: Vec<String>,
}

/// Body of `POST …/files/move`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct MoveFile {
    #[cfg_attr(feature = "openapi", schema(pattern = "^/"))]
    pub from: String,
    #[cfg_attr(feature = "openapi", schema(pattern = "^/"))]
    pub to: String,
    #[serde(default)]
    pub overwrite: bool,
}

/// Body of `POST …/files/chmod`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Chmod {
    #[cfg_attr(feature = "openapi", schema(pattern = "^/"))]
    pub path: String,
    /// Octal, e.g. `0755`.
    #[cfg_attr(feature = "openapi", schema(pattern = "^0?[0-7]{1,4}$"))]
    pub mode: String,
}

/// Body of `POST …/files/mkdir`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Mkdir {
    #[cfg_attr(feature = "openapi", schema(pattern = "^/"))]
    pub path: String,
    /// Make missing parents too (default true).
    #[serde(default = "yes")]
    pub parents: bool,
}

fn yes() -> bool {
    true
}

/// What unpacking a tar archive into a sandbox wrote.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ArchiveSummary {
    /// The directory unpacked into.
    pub path: String,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Bytes of file contents written.
    pub bytes: u64,
}
