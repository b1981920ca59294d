//! The image catalog: root filesystems imported as tar streams, checked,
//! unpacked once and shared by every provider on the host.
//!
//! Layout under the catalog directory:
//! ```text
//! <dir>/<safe-name>            symlink → .versions/<version>
//! <dir>/.versions/<version>/   image.tar, rootfs/, meta.json
//! <dir>/.tmp/                  staging for imports in progress
//! ```
//! An import is built in its own version directory and published by
//! renaming a fresh symlink over `<safe-name>`. `rename(2)` is atomic, so a
//! reader sees either the previous image or the new one, never half of one.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use stacyvm_core::{ByteStream, Error, Result};
use time::OffsetDateTime;
use tokio::io::AsyncWriteExt;

/// Longest image name accepted, in bytes.
pub const MAX_IMAGE_NAME_LEN: usize = 255;

const VERSIONS_DIR: &str = ".versions";
const STAGING_DIR: &str = ".tmp";
const META_FILE: &str = "meta.json";
const TAR_FILE: &str = "image.tar";
const ROOTFS_DIR: &str = "rootfs";
/// The tenant that owns an image made by a snapshot; absent for images an
/// operator imported, which every tenant may use.
const OWNER_FILE: &str = "owner";

/// One image of the catalog, as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ImageInfo {
    pub name: String,
    /// Size of the imported tar, in bytes.
    pub size: u64,
    /// `sha256:<hex>` of the imported tar.
    pub digest: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// The host's image catalog. Cheap to share behind an `Arc`; every method is
/// safe to call concurrently.
#[derive(Debug)]
pub struct ImageCatalog {
    dir: PathBuf,
    /// Serialises the publish/delete step per name, so two imports of the
    /// same name never both believe they replaced the same old version.
    name_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Checks an image name: one or more `/`-separated components, each
/// `[a-z0-9][a-z0-9._-]*`, optionally followed by `:tag` where the tag is
/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub fn validate_image_name(name: &str) -> Result<()> {
    let bad = |why: &str| {
        Error::InvalidRequest(format!(
            "image name {name:?} is invalid: {why} (names look like \"busybox\", \"team/python:3.12\")"
        ))
    };
    if name.is_empty() {
        return Err(bad("it is empty"));
    }
    if name.len() > MAX_IMAGE_NAME_LEN {
        return Err(bad(&format!(
            "it is longer than {MAX_IMAGE_NAME_LEN} bytes"
        )));
    }
    let (repo, tag) = match name.split_once(':') {
        Some((r, t)) => (r, Some(t)),
        None => (name, None),
    };
    for component in repo.split('/') {
        let mut bytes = component.bytes();
        match bytes.next() {
            Some(b) if b.is_ascii_lowercase() || b.is_ascii_digit() => {}
            Some(_) => {
                return Err(bad(
                    "each part must start with a lowercase letter or a digit",
                ))
            }
            None => return Err(bad("it has an empty part")),
        }
        if component.len() > 128 {
            return Err(bad("a part is longer than 128 bytes"));
        }
        if !bytes.all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        }) {
            return Err(bad(
                "only lowercase letters, digits, '.', '_', '-' and '/' are allowed",
            ));
        }
    }
    if let Some(tag) = tag {
        let mut bytes = tag.bytes();
        match bytes.next() {
            Some(b) if b.is_ascii_alphanumeric() || b == b'_' => {}
            _ => return Err(bad("the tag must start with a letter, a digit or '_'")),
        }
        if tag.len() > 128 {
            return Err(bad("the tag is longer than 128 bytes"));
        }
        if !bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
            return Err(bad("the tag allows only letters, digits, '.', '_' and '-'"));
        }
    }
    Ok(())
}

/// The directory name a (valid) image name is stored under. `/` and `:` are
/// not allowed in file names, and `+` and `@` are not allowed in image names,
/// so the mapping is one-to-one; valid names never start with `.`, so they
/// never collide with the catalog's own entries.
fn safe_name(name: &str) -> String {
    name.replace('/', "+").replace(':', "@")
}

/// A unique suffix for staging and version directories.
fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos();
    format!(
        "{}-{}-{}",
        std::process::id(),
        nanos,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// The setuid and setgid bits, never kept on the host.
const SETID_BITS: u32 = 0o6000;

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

impl ImageCatalog {
    /// Opens (creating if needed) the catalog stored in `dir`.
    pub fn open(dir: &Path) -> Result<ImageCatalog> {
        for d in [
            dir.to_path_buf(),
            dir.join(VERSIONS_DIR),
            dir.join(STAGING_DIR),
        ] {
            // Only the server reads the catalog; other local users have no
            // business in the images every sandbox runs.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)
                .map_err(|e| {
                    Error::internal(
                        format_args!("creating the image catalog directory {}", d.display()),
                        e,
                    )
                })?;
        }
        sweep_leftovers(dir);
        Ok(ImageCatalog {
            dir: dir.to_path_buf(),
            name_locks: Mutex::new(HashMap::new()),
        })
    }

    /// The directory the catalog lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the imported tar of `name` is (through the name's symlink, so
    /// it always names the current version). Meaningful only for valid names.
    pub fn tar_path(&self, name: &str) -> PathBuf {
        self.dir.join(safe_name(name)).join(TAR_FILE)
    }

    fn name_lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .name_locks
            .lock()
            .expect("the name-lock map is never left poisoned: no code panics while holding it");
        locks.entry(name.to_owned()).or_default().clone()
    }

    /// Imports a root filesystem tar under `name`, replacing any image of
    /// that name. The body is streamed to disk, never held in memory.
    pub async fn import(&self, name: &str, body: ByteStream) -> Result<ImageInfo> {
        self.import_as(name, body, None, true).await
    }

    /// Imports like [`ImageCatalog::import`], recording `owner` (a tenant)
    /// with the image. Without `replace`, a name already taken is
    /// `Conflict`, checked again at the atomic publish so two racing
    /// imports cannot both win.
    pub async fn import_as(
        &self,
        name: &str,
        body: ByteStream,
        owner: Option<&str>,
        replace: bool,
    ) -> Result<ImageInfo> {
        validate_image_name(name)?;
        if !replace && self.exists(name).await {
            return Err(taken(name));
        }
        let version = format!("{}-{}", safe_name(name), unique_suffix());
        let version_dir = self.dir.join(VERSIONS_DIR).join(&version);
        tokio::fs::create_dir(&version_dir)
            .await
            .map_err(|e| Error::internal(format_args!("creating {}", version_dir.display()), e))?;
        let mut built = self.build_version(name, &version_dir, body).await;
        if let (Ok(_), Some(owner)) = (&built, owner) {
            let path = version_dir.join(OWNER_FILE);
            if let Err(e) = tokio::fs::write(&path, owner).await {
                built = Err(Error::internal(
                    format_args!("writing {}", path.display()),
                    e,
                ));
            }
        }
        let info = match built {
            Ok(info) => info,
            Err(e) => {
                remove_tree_blocking(version_dir).await;
                return Err(e);
            }
        };
        if let Err(e) = self.publish(name, &version, replace).await {
            remove_tree_blocking(version_dir).await;
            return Err(e);
        }
        tracing::info!(image = name, digest = %info.digest, size = info.size, "image imported");
        Ok(info)
    }

    /// Writes the tar, checks and unpacks it, and writes the metadata, all
    /// inside `version_dir`.
    async fn build_version(
        &self,
        name: &str,
        version_dir: &Path,
        mut body: ByteStream,
    ) -> Result<ImageInfo> {
        let tar_path = version_dir.join(TAR_FILE);
        let mut file = tokio::fs::File::create(&tar_path)
            .await
            .map_err(|e| Error::internal(format_args!("creating {}", tar_path.display()), e))?;
        let mut hasher = Sha256::new();
        let mut size: u64 = 0;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| {
                Error::InvalidRequest(format!("reading the image body failed: {e}"))
            })?;
            hasher.update(&chunk);
            size += chunk.len() as u64;
            file.write_all(&chunk)
                .await
                .map_err(|e| Error::internal(format_args!("writing {}", tar_path.display()), e))?;
        }
        file.flush()
            .await
            .map_err(|e| Error::internal("flushing the image tar", e))?;
        file.sync_all()
            .await
            .map_err(|e| Error::internal("syncing the image tar", e))?;
        drop(file);
        if size == 0 {
            return Err(Error::InvalidRequest(
                "the image body is empty: send a root filesystem as a tar stream".into(),
            ));
        }
        let digest = format!("sha256:{}", hex::encode(hasher.finalize()));

        let rootfs = version_dir.join(ROOTFS_DIR);
        let tar_for_check = tar_path.clone();
        tokio::task::spawn_blocking(move || {
            check_tar(&tar_for_check)?;
            unpack_tar(&tar_for_check, &rootfs)
        })
        .await
        .map_err(|e| Error::internal("the image unpack task failed", e))??;

        let info = ImageInfo {
            name: name.to_owned(),
            size,
            digest,
            created_at: stacyvm_core::now(),
        };
        let meta = serde_json::to_vec_pretty(&info)
            .map_err(|e| Error::internal("encoding image metadata", e))?;
        let meta_path = version_dir.join(META_FILE);
        tokio::fs::write(&meta_path, meta)
            .await
            .map_err(|e| Error::internal(format_args!("writing {}", meta_path.display()), e))?;
        Ok(info)
    }

    /// Points `name` at `version` atomically and removes the version it
    /// replaced.
    async fn publish(&self, name: &str, version: &str, replace: bool) -> Result<()> {
        let lock = self.name_lock(name);
        let _held = lock.lock().await;
        let link = self.dir.join(safe_name(name));
        let previous = tokio::fs::read_link(&link).await.ok();
        if previous.is_some() && !replace {
            return Err(taken(name));
        }
        let staged = self
            .dir
            .join(STAGING_DIR)
            .join(format!("link-{}", unique_suffix()));
        let target = Path::new(VERSIONS_DIR).join(version);
        tokio::fs::symlink(&target, &staged)
            .await
            .map_err(|e| Error::internal(format_args!("creating {}", staged.display()), e))?;
        if let Err(e) = tokio::fs::rename(&staged, &link).await {
            let _ = tokio::fs::remove_file(&staged).await;
            return Err(Error::internal(format_args!("publishing image {name}"), e));
        }
        if let Some(previous) = previous {
            self.remove_version(&previous).await;
        }
        Ok(())
    }

    /// Removes a version directory named by a link target, refusing anything
    /// that is not directly under `.versions`.
    async fn remove_version(&self, link_target: &Path) {
        let mut parts = link_target.components();
        let (Some(first), Some(std::path::Component::Normal(v)), None) =
            (parts.next(), parts.next(), parts.next())
        else {
            tracing::warn!(target = %link_target.display(), "not removing an unexpected image link target");
            return;
        };
        if first.as_os_str() != OsStr::new(VERSIONS_DIR) {
            tracing::warn!(target = %link_target.display(), "not removing an unexpected image link target");
            return;
        }
        let version_dir = self.dir.join(VERSIONS_DIR).join(v);
        if mounted_from(&version_dir) {
            // Running sandboxes (PRoot overlays) still have this version as
            // their lower layer: keep it; `open` sweeps it once unused.
            tracing::info!(version = %version_dir.display(), "keeping a replaced image version that running sandboxes still use");
            return;
        }
        remove_tree_blocking(version_dir).await;
    }

    async fn exists(&self, name: &str) -> bool {
        tokio::fs::symlink_metadata(self.dir.join(safe_name(name)))
            .await
            .is_ok()
    }

    /// The tenant owning `name` (`None`: an operator's image, public).
    /// `NotFound` when there is no such image.
    pub async fn owner(&self, name: &str) -> Result<Option<String>> {
        validate_image_name(name)?;
        let link = self.dir.join(safe_name(name));
        let version_dir = match tokio::fs::read_link(&link).await {
            Ok(target) => self.dir.join(target),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::NotFound(format!(
                    "no image named {name:?} in the image catalog"
                )))
            }
            Err(e) => {
                return Err(Error::internal(
                    format_args!("reading {}", link.display()),
                    e,
                ))
            }
        };
        match tokio::fs::read_to_string(version_dir.join(OWNER_FILE)).await {
            Ok(owner) => Ok(Some(owner)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::internal(
                format_args!("reading the owner of image {name:?}"),
                e,
            )),
        }
    }

    /// Every image, sorted by name.
    pub async fn list(&self) -> Result<Vec<ImageInfo>> {
        let mut rd = tokio::fs::read_dir(&self.dir)
            .await
            .map_err(|e| Error::internal(format_args!("reading {}", self.dir.display()), e))?;
        let mut images = Vec::new();
        while let Some(entry) = rd
            .next_entry()
            .await
            .map_err(|e| Error::internal("listing the image catalog", e))?
        {
            let file_name = entry.file_name();
            if file_name.as_encoded_bytes().first() == Some(&b'.') {
                continue;
            }
            match read_meta(&entry.path().join(META_FILE)).await {
                Ok(Some(info)) => images.push(info),
                // Deleted between read_dir and here.
                Ok(None) => {}
                Err(e) => return Err(e),
            }
        }
        images.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(images)
    }

    /// One image; `NotFound` when there is none of that name.
    pub async fn get(&self, name: &str) -> Result<ImageInfo> {
        validate_image_name(name)?;
        read_meta(&self.dir.join(safe_name(name)).join(META_FILE))
            .await?
            .ok_or_else(|| Error::NotFound(format!("no image named {name:?} in the image catalog")))
    }

    /// Deletes an image; `NotFound` when there is none of that name.
    pub async fn delete(&self, name: &str) -> Result<()> {
        validate_image_name(name)?;
        let lock = self.name_lock(name);
        let _held = lock.lock().await;
        let link = self.dir.join(safe_name(name));
        let target = match tokio::fs::read_link(&link).await {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::NotFound(format!(
                    "no image named {name:?} in the image catalog"
                )));
            }
            Err(e) => {
                return Err(Error::internal(
                    format_args!("reading {}", link.display()),
                    e,
                ))
            }
        };
        tokio::fs::remove_file(&link)
            .await
            .map_err(|e| Error::internal(format_args!("removing {}", link.display()), e))?;
        self.remove_version(&target).await;
        tracing::info!(image = name, "image deleted");
        Ok(())
    }

    /// The metadata and an open handle on the tar of the current version of
    /// `name`, both read from the same version so they always match (a
    /// concurrent re-import cannot pair one digest with another's bytes).
    /// `ImageNotFound` when there is no such image.
    pub async fn open_tar(&self, name: &str) -> Result<(ImageInfo, tokio::fs::File)> {
        validate_image_name(name)?;
        let missing =
            || Error::ImageNotFound(format!("no image named {name:?} in the image catalog"));
        let link = self.dir.join(safe_name(name));
        let version_dir = match tokio::fs::read_link(&link).await {
            Ok(target) => self.dir.join(target),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(missing()),
            Err(e) => {
                return Err(Error::internal(
                    format_args!("reading {}", link.display()),
                    e,
                ))
            }
        };
        let info = read_meta(&version_dir.join(META_FILE))
            .await?
            .ok_or_else(missing)?;
        match tokio::fs::File::open(version_dir.join(TAR_FILE)).await {
            Ok(file) => Ok((info, file)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(missing()),
            Err(e) => Err(Error::internal(
                format_args!("opening the tar of image {name:?}"),
                e,
            )),
        }
    }

    /// The unpacked root directory of the current version of `name`.
    ///
    /// The path is resolved to the version directory, so a caller keeps a
    /// consistent tree even if the name is re-imported meanwhile.
    pub async fn rootfs(&self, name: &str) -> Result<PathBuf> {
        validate_image_name(name)?;
        let link = self.dir.join(safe_name(name));
        match tokio::fs::read_link(&link).await {
            Ok(target) => {
                let root = self.dir.join(target).join(ROOTFS_DIR);
                if tokio::fs::metadata(&root)
                    .await
                    .map(|m| m.is_dir())
                    .unwrap_or(false)
                {
                    Ok(root)
                } else {
                    Err(Error::ImageNotFound(format!(
                        "image {name:?} was removed from the image catalog"
                    )))
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Error::ImageNotFound(format!(
                "no image named {name:?} in the image catalog"
            ))),
            Err(e) => Err(Error::internal(
                format_args!("reading {}", link.display()),
                e,
            )),
        }
    }
}

fn taken(name: &str) -> Error {
    Error::Conflict(format!(
        "an image named {name:?} already exists in the image catalog; choose another name"
    ))
}

/// How old an unreferenced version or staging entry must be before `open`
/// removes it: younger ones may belong to an import still running in
/// another process sharing the directory.
const LEFTOVER_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Removes what a crashed import left behind: version directories no name
/// points to and stale staging links.
fn sweep_leftovers(dir: &Path) {
    let old_enough = |p: &Path| {
        std::fs::symlink_metadata(p)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= LEFTOVER_AGE)
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let referenced: std::collections::HashSet<std::ffi::OsString> = entries
        .flatten()
        .filter(|e| e.file_name().as_encoded_bytes().first() != Some(&b'.'))
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|t| t.file_name().map(OsStr::to_os_string))
        .collect();
    if let Ok(versions) = std::fs::read_dir(dir.join(VERSIONS_DIR)) {
        for v in versions.flatten() {
            if !referenced.contains(&v.file_name())
                && old_enough(&v.path())
                && !mounted_from(&v.path())
            {
                if let Err(e) = remove_tree(&v.path()) {
                    tracing::warn!(path = %v.path().display(), error = %e, "could not remove an abandoned image version");
                }
            }
        }
    }
    if let Ok(staged) = std::fs::read_dir(dir.join(STAGING_DIR)) {
        for s in staged.flatten() {
            if old_enough(&s.path()) {
                let _ = std::fs::remove_file(s.path());
            }
        }
    }
}

/// Whether a mount on this host (an overlay's lower layer, a bind) names a
/// path inside `dir`, i.e. a running sandbox still reads from it.
fn mounted_from(dir: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let needle = dir.to_string_lossy();
    info.lines().any(|l| l.contains(needle.as_ref()))
}

async fn read_meta(path: &Path) -> Result<Option<ImageInfo>> {
    match tokio::fs::read(path).await {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::internal(format_args!("decoding {}", path.display()), e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::internal(
            format_args!("reading {}", path.display()),
            e,
        )),
    }
}

fn invalid_entry(entry: &[u8], why: &str) -> Error {
    Error::InvalidRequest(format!(
        "the image tar is refused: entry {:?} {why}",
        String::from_utf8_lossy(entry)
    ))
}

/// Folds `..` components lexically onto `base`; `None` when they climb
/// above the root.
fn resolve_within(base: &[Vec<u8>], rel: &[u8]) -> Option<()> {
    let mut depth = base.len();
    for part in rel.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => depth = depth.checked_sub(1)?,
            _ => depth += 1,
        }
    }
    Some(())
}

/// Checks every entry of the tar before anything is unpacked: no absolute
/// paths, no `..`, no link leaving the root, no device node unless root.
fn check_tar(tar_path: &Path) -> Result<()> {
    let file =
        std::fs::File::open(tar_path).map_err(|e| Error::internal("opening the image tar", e))?;
    let mut archive = tar::Archive::new(io::BufReader::new(file));
    let not_tar = |e: io::Error| {
        Error::InvalidRequest(format!("the image body is not a valid tar archive: {e}"))
    };
    let as_root = running_as_root();
    let mut count = 0usize;
    for entry in archive.entries().map_err(not_tar)? {
        let entry = entry.map_err(not_tar)?;
        count += 1;
        let path = entry.path_bytes().into_owned();
        if path.first() == Some(&b'/') {
            return Err(invalid_entry(&path, "has an absolute path"));
        }
        let components: Vec<Vec<u8>> = path
            .split(|b| *b == b'/')
            .filter(|p| !p.is_empty() && *p != b".")
            .map(<[u8]>::to_vec)
            .collect();
        if components.iter().any(|c| c == b"..") {
            return Err(invalid_entry(&path, "has a '..' component"));
        }
        let kind = entry.header().entry_type();
        let link = || {
            entry
                .link_name_bytes()
                .map(|l| l.into_owned())
                .unwrap_or_default()
        };
        if kind.is_hard_link() {
            let target = link();
            if target.is_empty() {
                return Err(invalid_entry(&path, "is a hard link without a target"));
            }
            if target.first() == Some(&b'/') {
                return Err(invalid_entry(&path, "is a hard link to an absolute path"));
            }
            if resolve_within(&[], &target).is_none() {
                return Err(invalid_entry(
                    &path,
                    "is a hard link whose target escapes the root",
                ));
            }
        } else if kind.is_symlink() {
            let target = link();
            if target.is_empty() {
                return Err(invalid_entry(&path, "is a symlink without a target"));
            }
            // An absolute target resolves inside the sandbox's own root at run
            // time; a relative one must not climb out of it.
            if target.first() != Some(&b'/') {
                let parent = &components[..components.len().saturating_sub(1)];
                if resolve_within(parent, &target).is_none() {
                    return Err(invalid_entry(
                        &path,
                        "is a symlink whose target escapes the root",
                    ));
                }
            }
        } else if kind.is_character_special() || kind.is_block_special() {
            if !as_root {
                return Err(invalid_entry(
                    &path,
                    "is a device node, which only a root server can import",
                ));
            }
        } else if !(kind.is_file()
            || kind.is_contiguous()
            || kind.is_gnu_sparse()
            || kind.is_dir()
            || kind.is_fifo()
            || kind.is_pax_global_extensions())
        {
            return Err(invalid_entry(
                &path,
                &format!("has an unsupported type {:?}", kind.as_byte() as char),
            ));
        }
    }
    if count == 0 {
        return Err(Error::InvalidRequest(
            "the image body is not a tar archive (no entries found)".into(),
        ));
    }
    Ok(())
}

/// Unpacks a checked tar into `rootfs`, preserving modes (without set-id
/// bits) and symlinks. Everything belongs to the server's user: an owner
/// from the tar would hand a host user (say uid 1000, a person's account)
/// write access to an image every sandbox runs, and a setuid binary owned
/// by root would be one for the host too. Providers map ownership into the
/// sandbox's own view (PRoot through an ID-mapped mount; Docker imports the
/// tar itself).
///
/// Device nodes and FIFOs are not created on the host: a device node in a
/// directory the server owns would give whoever runs in it the device (a
/// PRoot sandbox is not confined by a device cgroup). Docker gets them from
/// the tar, where its device cgroup applies.
fn unpack_tar(tar_path: &Path, rootfs: &Path) -> Result<()> {
    std::fs::create_dir(rootfs)
        .map_err(|e| Error::internal(format_args!("creating {}", rootfs.display()), e))?;
    let file =
        std::fs::File::open(tar_path).map_err(|e| Error::internal("opening the image tar", e))?;
    let mut archive = tar::Archive::new(io::BufReader::new(file));
    archive.set_preserve_permissions(true);
    archive.set_mask(SETID_BITS);
    archive.set_preserve_ownerships(false);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    let rootfs_given = rootfs.display().to_string();
    let rootfs_shown = rootfs
        .canonicalize()
        .unwrap_or_else(|_| rootfs.to_path_buf())
        .display()
        .to_string();
    let refuse = |path: &[u8], e: io::Error| {
        Error::InvalidRequest(format!(
            "the image tar is refused: entry {:?} cannot be unpacked safely: {}",
            String::from_utf8_lossy(path),
            // Server paths mean nothing to the client and are not its business.
            error_chain(&e)
                .replace(&rootfs_shown, "<root>")
                .replace(&rootfs_given, "<root>")
        ))
    };
    // Directories last, deepest first, so a read-only directory does not
    // block its own children (as `tar::Archive::unpack` does).
    let mut directories = Vec::new();
    for entry in archive.entries().map_err(|e| {
        Error::InvalidRequest(format!("the image body is not a valid tar archive: {e}"))
    })? {
        let mut entry = entry.map_err(|e| {
            Error::InvalidRequest(format!("the image body is not a valid tar archive: {e}"))
        })?;
        let kind = entry.header().entry_type();
        if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            continue;
        }
        if kind.is_dir() {
            directories.push(entry);
            continue;
        }
        let path = entry.path_bytes().into_owned();
        entry.unpack_in(rootfs).map_err(|e| refuse(&path, e))?;
    }
    directories.sort_by(|a, b| b.path_bytes().cmp(&a.path_bytes()));
    for mut dir in directories {
        let path = dir.path_bytes().into_owned();
        dir.unpack_in(rootfs).map_err(|e| refuse(&path, e))?;
    }
    // The root itself must stay reachable for the server whatever mode the
    // archive's "./" entry carried.
    let mut perms = std::fs::metadata(rootfs)
        .map_err(|e| Error::internal("reading the rootfs mode", e))?
        .permissions();
    perms.set_mode(perms.mode() | 0o700);
    std::fs::set_permissions(rootfs, perms)
        .map_err(|e| Error::internal("setting the rootfs mode", e))?;
    Ok(())
}

/// An error and its sources on one line (`tar` wraps the useful part).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Removes a directory tree, making read-only directories writable first
/// when needed (an image may carry `0555` directories).
pub(crate) fn remove_tree(path: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(_) => {
            make_dirs_writable(path);
            match std::fs::remove_dir_all(path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                other => other,
            }
        }
    }
}

fn make_dirs_writable(path: &Path) {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    if !meta.is_dir() {
        return;
    }
    let mut perms = meta.permissions();
    perms.set_mode(perms.mode() | 0o700);
    let _ = std::fs::set_permissions(path, perms);
    if let Ok(rd) = std::fs::read_dir(path) {
        for entry in rd.flatten() {
            make_dirs_writable(&entry.path());
        }
    }
}

async fn remove_tree_blocking(path: PathBuf) {
    let shown = path.display().to_string();
    match tokio::task::spawn_blocking(move || remove_tree(&path)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(path = %shown, error = %e, "could not remove an image directory")
        }
        Err(e) => tracing::warn!(path = %shown, error = %e, "the image removal task failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_documented_rules() {
        for ok in [
            "busybox",
            "a",
            "team/python:3.12",
            "x.y_z-1/a:Latest_1",
            "0abc",
        ] {
            assert!(validate_image_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "Busybox", "/abs", "a//b", "a/", ".hidden", "-x", "a:", "a:-x", "a b", "a/../b",
            "a+b", "a@b",
        ] {
            assert!(
                matches!(validate_image_name(bad), Err(Error::InvalidRequest(_))),
                "{bad:?}"
            );
        }
        assert!(validate_image_name(&"a".repeat(300)).is_err());
    }

    /// A tar can carry a setuid root binary and files of any host user:
    /// neither reaches the host.
    #[test]
    fn unpacked_images_keep_no_set_id_bits_and_no_foreign_owners() {
        use std::os::unix::fs::MetadataExt;
        let t = tempfile::tempdir().expect("a temp dir");
        let tar_path = t.path().join("image.tar");
        let mut b = tar::Builder::new(std::fs::File::create(&tar_path).expect("tar file"));
        let mut add = |name: &str, mode: u32, uid: u64, kind: tar::EntryType| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_uid(uid);
            h.set_gid(uid);
            h.set_size(if kind == tar::EntryType::Regular {
                1
            } else {
                0
            });
            h.set_cksum();
            let data: &[u8] = if kind == tar::EntryType::Regular {
                b"x"
            } else {
                b""
            };
            b.append_data(&mut h, name, data).expect("append");
        };
        add("bin/", 0o2755, 0, tar::EntryType::Directory);
        add("bin/su", 0o4755, 0, tar::EntryType::Regular);
        add("home/", 0o755, 0, tar::EntryType::Directory);
        add("home/user-file", 0o644, 1000, tar::EntryType::Regular);
        add("tmp/", 0o1777, 0, tar::EntryType::Directory);
        b.into_inner().expect("finish the tar");
        check_tar(&tar_path).expect("a valid tar");
        let root = t.path().join("rootfs");
        unpack_tar(&tar_path, &root).expect("unpack");
        let meta = |p: &str| std::fs::metadata(root.join(p)).expect("stat");
        assert_eq!(meta("bin/su").mode() & 0o7777, 0o755, "setuid dropped");
        assert_eq!(meta("bin").mode() & 0o7777, 0o755, "setgid dropped");
        assert_eq!(meta("tmp").mode() & 0o7777, 0o1777, "sticky kept");
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        assert_eq!(
            meta("home/user-file").uid(),
            me,
            "no foreign owner on the host"
        );
    }

    #[test]
    fn safe_names_are_distinct_and_never_hidden() {
        assert_ne!(safe_name("a/b"), safe_name("a:b"));
        assert_eq!(safe_name("team/py:3"), "team+py@3");
    }

    #[test]
    fn relative_links_may_not_climb_above_the_root() {
        let base = vec![b"usr".to_vec(), b"bin".to_vec()];
        assert!(resolve_within(&base, b"../../bin/busybox").is_some());
        assert!(resolve_within(&base, b"../../../etc/passwd").is_none());
        assert!(resolve_within(&[], b"a/../b").is_some());
        assert!(resolve_within(&[], b"../x").is_none());
    }
}
