//! Archive extraction: a tar stream unpacked into a directory of the
//! sandbox, with nothing landing outside it (the agent's `FileExtract`).

use std::fs;
use std::io;
use std::path::Path;

use stacyvm_core::{ArchiveSummary, Error, FileType, Result};

use crate::files::{chmod, make_dirs, mkdir, write_begin};
use crate::root::{base_name, io_error, parent_of, Resolved, Root};

/// `extract`: unpacks a tar stream into the directory `dest` (created with
/// its parents). Each file is written as `write_begin` writes one (through
/// a temporary file, so a reader never sees half a file); directories as
/// `mkdir -p`, their modes applied once everything is in place (so a
/// read-only directory can still be filled); symlinks and hard links in
/// place of what is at their path unless it is a directory.
///
/// Everything stays inside `dest`: names are checked before anything of an
/// entry is written (absolute paths and `..` are refused), an entry whose
/// parent leads out of `dest` through a symlink (one the archive made, or
/// one already there) is refused, and a symlink at an entry's own path is
/// replaced, never written through. Types other than file, directory,
/// symlink and hard link stop the unpacking with `InvalidRequest` naming
/// the entry; what was written before stays.
pub fn extract(root: &Root, dest: &str, body: &mut dyn io::Read) -> Result<ArchiveSummary> {
    let top = mkdir(root, dest, true, None)?;
    if top.file_type != FileType::Dir {
        return Err(Error::Conflict(format!("{} is not a directory", top.path)));
    }
    let top_inner = root.resolve(&top.path, true)?.inner;
    let mut summary = ArchiveSummary {
        path: top.path.clone(),
        ..ArchiveSummary::default()
    };
    // Directory modes, applied deepest first at the end.
    let mut dir_modes: Vec<(String, u32)> = Vec::new();
    let bad_tar =
        |e: io::Error| Error::InvalidRequest(format!("the body is not a valid tar archive: {e}"));
    // One copy buffer for every file of the archive.
    let mut buf = vec![0u8; 64 * 1024];
    let mut archive = tar::Archive::new(body);
    for entry in archive.entries().map_err(bad_tar)? {
        let mut entry = entry.map_err(bad_tar)?;
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader
        ) {
            // Metadata for the reader (as `git archive` writes), not a file.
            continue;
        }
        let raw = entry.path().map_err(bad_tar)?.into_owned();
        let shown = raw.display().to_string();
        let Some(rel) = archive_name(&raw, &shown)? else {
            // "./": the destination itself.
            continue;
        };
        let at = place(root, &top_inner, &rel, &shown)?;
        let mode = entry.header().mode().ok().map(|m| m & 0o7777);
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                clear_link(&at)?;
                let mut pending = write_begin(root, &at.inner, mode, None, &Default::default())?;
                loop {
                    let n = match io::Read::read(&mut entry, &mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(bad_tar(e)),
                    };
                    pending.write(&buf[..n])?;
                    summary.bytes += n as u64;
                }
                pending.commit()?;
                summary.files += 1;
            }
            tar::EntryType::Directory => {
                clear_link(&at)?;
                let made = mkdir(root, &at.inner, true, None)?;
                if made.file_type != FileType::Dir {
                    return Err(Error::Conflict(format!(
                        "{} exists and is not a directory",
                        at.logical
                    )));
                }
                if let Some(m) = mode {
                    dir_modes.push((at.inner.clone(), m));
                }
                summary.dirs += 1;
            }
            tar::EntryType::Symlink | tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(bad_tar)?
                    .ok_or_else(|| {
                        Error::InvalidRequest(format!("tar entry {shown:?}: a link without a target"))
                    })?
                    .into_owned();
                if at.exists {
                    let meta =
                        fs::symlink_metadata(&at.host).map_err(|e| io_error(&at.logical, e))?;
                    if meta.is_dir() {
                        return Err(Error::Conflict(format!("{} is a directory", at.logical)));
                    }
                    fs::remove_file(&at.host).map_err(|e| io_error(&at.logical, e))?;
                }
                let parent = at
                    .host
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| root.dir().to_owned());
                make_dirs(&parent, &parent_of(&at.logical))?;
                if kind == tar::EntryType::Symlink {
                    // A link may point anywhere: it is only followed by
                    // later entries, and `place` refuses those that leave
                    // `dest` through it.
                    std::os::unix::fs::symlink(&target, &at.host)
                        .map_err(|e| io_error(&at.logical, e))?;
                    summary.symlinks += 1;
                } else {
                    // A hard link names another entry of the archive.
                    let shown_target = target.display().to_string();
                    let Some(rel_target) = archive_name(&target, &shown_target)? else {
                        return Err(Error::InvalidRequest(format!(
                            "tar entry {shown:?}: a hard link to the directory itself"
                        )));
                    };
                    let src = place(root, &top_inner, &rel_target, &shown_target)?;
                    let src_meta = fs::symlink_metadata(&src.host).ok();
                    if !src_meta.as_ref().is_some_and(|m| m.is_file()) {
                        return Err(Error::InvalidRequest(format!(
                            "tar entry {shown:?}: its hard-link target {shown_target:?} is not a file unpacked before it"
                        )));
                    }
                    if fs::hard_link(&src.host, &at.host).is_err() {
                        fs::copy(&src.host, &at.host).map_err(|e| io_error(&at.logical, e))?;
                    }
                    summary.files += 1;
                }
            }
            other => {
                return Err(Error::InvalidRequest(format!(
                    "tar entry {shown:?}: {other:?} entries are not supported (only files, directories, symlinks and hard links)"
                )))
            }
        }
    }
    dir_modes.sort_by_key(|(p, _)| std::cmp::Reverse(p.matches('/').count()));
    for (path, m) in dir_modes {
        chmod(root, &path, m)?;
    }
    Ok(summary)
}

/// The relative name of an archive entry, its parts joined with `/`;
/// `None` for the archive's root (`./`). Absolute names, `..` and names
/// that are not UTF-8 are refused.
fn archive_name(raw: &Path, shown: &str) -> Result<Option<String>> {
    let mut parts: Vec<&str> = Vec::new();
    for c in raw.components() {
        match c {
            std::path::Component::Normal(p) => parts.push(p.to_str().ok_or_else(|| {
                Error::InvalidRequest(format!("tar entry {shown:?}: the name is not UTF-8"))
            })?),
            std::path::Component::CurDir => {}
            _ => {
                return Err(Error::InvalidRequest(format!(
                    "tar entry {shown:?}: absolute paths and `..` are refused"
                )))
            }
        }
    }
    Ok((!parts.is_empty()).then(|| parts.join("/")))
}

/// Where the entry `rel` goes: its parent resolved through any symlinks
/// and required to be `top` or below it, its last component not followed.
fn place(root: &Root, top: &str, rel: &str, shown: &str) -> Result<Resolved> {
    let logical = format!("{}/{rel}", top.trim_end_matches('/'));
    let parent = root.resolve(&parent_of(&logical), true)?;
    let inside = top == "/"
        || parent.inner == top
        || parent
            .inner
            .strip_prefix(top)
            .is_some_and(|rest| rest.starts_with('/'));
    if !inside {
        return Err(Error::InvalidRequest(format!(
            "tar entry {shown:?}: it would land outside {top} through a symlink"
        )));
    }
    let name = base_name(&logical);
    root.resolve(
        &format!("{}/{name}", parent.inner.trim_end_matches('/')),
        false,
    )
}

/// Removes a symlink at `at`, so that what is written there replaces the
/// link instead of going through it.
fn clear_link(at: &Resolved) -> Result<()> {
    if at.exists
        && fs::symlink_metadata(&at.host)
            .map_err(|e| io_error(&at.logical, e))?
            .file_type()
            .is_symlink()
    {
        fs::remove_file(&at.host).map_err(|e| io_error(&at.logical, e))?;
    }
    Ok(())
}
