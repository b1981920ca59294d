//! Streams a sandbox's root filesystem, as seen from the host, as a tar.
//!
//! The walk never follows a symbolic link: a link is stored as a link, so a
//! sandbox that plants `ln -s / escape` gets a link in its image, never the
//! host's files. Regular files are opened with `O_NOFOLLOW` and checked
//! again after opening, so a file swapped for a link between the listing and
//! the read is refused instead of read through. The tar is produced on a
//! blocking thread and handed over in chunks through a bounded channel, so
//! the whole filesystem is never held in memory.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use stacyvm_core::ByteStream;
use tokio::sync::mpsc;

/// Size of one chunk handed to the reader.
const CHUNK: usize = 256 * 1024;
/// Chunks buffered between the walker and the reader.
const DEPTH: usize = 8;

/// Paths (relative to the root, no leading `/`) whose contents a snapshot
/// never captures: kernel filesystems are mounted afresh in every sandbox,
/// and StacyVM's own injected files are put back by the provider at create.
pub const DEFAULT_EXCLUDES: &[&str] = &["proc", "sys", "dev", "run/stacyvm", ".stacyvm"];

/// Appends a link entry whose target is stored byte for byte:
/// `append_link` rewrites it as a path (`/` comes out as `//`). Targets
/// too long for the header go through a GNU long-link entry.
fn append_link_exact<W: Write>(
    builder: &mut tar::Builder<W>,
    header: &mut tar::Header,
    path: &Path,
    target: &Path,
) -> io::Result<()> {
    if target.as_os_str().len() <= 100 {
        header.set_link_name_literal(target.as_os_str().as_encoded_bytes())?;
        builder.append_data(header, path, io::empty())
    } else {
        builder.append_link(header, path, target)
    }
}

/// Returns a stream of a tar of `root`. Excluded directories are kept as
/// empty directories (with their mode) so the image still has its mount
/// points. An error during the walk ends the stream with that error.
pub fn tar_tree(root: PathBuf, excludes: Vec<String>) -> ByteStream {
    tar_layers(vec![root], excludes, IdShift::NONE)
}

/// Maps the owners the host sees back to the owners the sandbox sees: a
/// host ID in `[first, first + count)` becomes `id - first`.
#[derive(Clone, Copy, Debug)]
pub struct IdShift {
    pub first: u64,
    pub count: u64,
}

impl IdShift {
    /// Owners are stored as the host sees them.
    pub const NONE: IdShift = IdShift { first: 0, count: 0 };

    fn map(&self, id: u64) -> u64 {
        if id >= self.first && id - self.first < self.count {
            id - self.first
        } else {
            id
        }
    }
}

/// Returns a stream of a tar of the overlay of `layers` (the topmost
/// first), merged the way overlayfs merges them: an upper entry hides the
/// lower one, a whiteout (a character device 0:0) deletes it, and an opaque
/// directory (`trusted.overlay.opaque` or `user.overlay.opaque` = `y`)
/// hides everything below it. With one layer this is a plain tree walk.
pub fn tar_layers(layers: Vec<PathBuf>, excludes: Vec<String>, ids: IdShift) -> ByteStream {
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(DEPTH);
    tokio::task::spawn_blocking(move || {
        let writer = ChannelWriter {
            tx: tx.clone(),
            buf: Vec::with_capacity(CHUNK),
        };
        let mut builder = tar::Builder::new(writer);
        builder.follow_symlinks(false);
        let walker = Walker {
            excludes: &excludes,
            ids,
        };
        let result = check_root(&layers)
            .and_then(|()| walker.walk(&mut builder, &layers, Path::new("")))
            .and_then(|()| builder.into_inner())
            .and_then(|mut w| w.flush());
        if let Err(e) = result {
            // The reader may already be gone; nothing more to tell then.
            let _ = tx.blocking_send(Err(e));
        }
    });
    Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

fn check_root(layers: &[PathBuf]) -> io::Result<()> {
    match layers.first() {
        Some(top) => fs::symlink_metadata(top).map(|_| ()),
        None => Err(io::Error::new(
            io::ErrorKind::NotFound,
            "no root filesystem to snapshot",
        )),
    }
}

/// Re-streams a tar (a provider's own export) without the entries under
/// `excludes`: an excluded directory is kept, empty, as a mount point. The
/// archive is read and written entry by entry on a blocking thread, never
/// held whole in memory.
pub fn filter_tar(input: ByteStream, excludes: Vec<String>) -> ByteStream {
    use futures_util::StreamExt;
    let (in_tx, in_rx) = mpsc::channel::<io::Result<Bytes>>(DEPTH);
    tokio::spawn(async move {
        let mut input = input;
        while let Some(chunk) = input.next().await {
            if in_tx.send(chunk).await.is_err() {
                break;
            }
        }
    });
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(DEPTH);
    tokio::task::spawn_blocking(move || {
        let reader = ChannelReader {
            rx: in_rx,
            current: Bytes::new(),
        };
        let writer = ChannelWriter {
            tx: tx.clone(),
            buf: Vec::with_capacity(CHUNK),
        };
        let result = copy_filtered(reader, writer, &excludes);
        if let Err(e) = result {
            let _ = tx.blocking_send(Err(e));
        }
    });
    Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

fn copy_filtered(
    reader: ChannelReader,
    writer: ChannelWriter,
    excludes: &[String],
) -> io::Result<()> {
    let mut archive = tar::Archive::new(reader);
    let mut builder = tar::Builder::new(writer);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let rel = path.strip_prefix("./").unwrap_or(&path).to_path_buf();
        let inside = excludes
            .iter()
            .any(|x| rel.starts_with(x) && rel != Path::new(x));
        if inside {
            continue;
        }
        let mut header = entry.header().clone();
        let link = entry.link_name()?.map(|l| l.into_owned());
        match link {
            Some(target)
                if header.entry_type().is_symlink() || header.entry_type().is_hard_link() =>
            {
                append_link_exact(&mut builder, &mut header, &rel, &target)?;
            }
            _ => builder.append_data(&mut header, &rel, &mut entry)?,
        }
    }
    builder.into_inner()?.flush()
}

struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl io::Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.current = chunk?,
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.current.len());
        out[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

struct ChannelWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "snapshot reader went away"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

struct Walker<'a> {
    excludes: &'a [String],
    ids: IdShift,
}

fn is_whiteout(meta: &fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    meta.file_type().is_char_device() && meta.rdev() == 0
}

fn is_opaque(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    for attr in [c"trusted.overlay.opaque", c"user.overlay.opaque"] {
        let mut value = [0u8; 4];
        // SAFETY: both strings are NUL-terminated and outlive the call; the
        // buffer is valid for `value.len()` bytes.
        let n = unsafe {
            libc::lgetxattr(
                c_path.as_ptr(),
                attr.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if n == 1 && value[0] == b'y' {
            return true;
        }
    }
    false
}

impl Walker<'_> {
    /// Writes the entries of directory `rel` as the merge of `dirs` (the
    /// roots of the layers that still contribute to it, topmost first).
    fn walk<W: Write>(
        &self,
        builder: &mut tar::Builder<W>,
        dirs: &[PathBuf],
        rel: &Path,
    ) -> io::Result<()> {
        let mut names = std::collections::BTreeSet::new();
        for (i, root) in dirs.iter().enumerate() {
            let dir = root.join(rel);
            match fs::read_dir(&dir) {
                Ok(rd) => {
                    for e in rd {
                        names.insert(e?.file_name());
                    }
                }
                // A lower layer need not have every directory of an upper.
                Err(e) if i > 0 && e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        // A sorted order makes two snapshots of the same tree byte-identical.
        for name in names {
            let rel_path = rel.join(&name);
            let mut found = None;
            for (i, root) in dirs.iter().enumerate() {
                match fs::symlink_metadata(root.join(&rel_path)) {
                    Ok(meta) => {
                        found = Some((i, meta));
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
            let Some((top, meta)) = found else { continue };
            if dirs.len() > 1 && is_whiteout(&meta) {
                continue;
            }
            let full = dirs[top].join(&rel_path);
            let excluded = self.excludes.iter().any(|x| Path::new(x) == rel_path);
            let ft = meta.file_type();
            if ft.is_dir() {
                let mut header = tar::Header::new_gnu();
                header.set_metadata(&meta);
                header.set_entry_type(tar::EntryType::Directory);
                header.set_size(0);
                self.own(&mut header, &meta);
                builder.append_data(&mut header, &rel_path, io::empty())?;
                if !excluded {
                    // The layers below contribute while they hold a
                    // directory here and no layer above made it opaque.
                    let mut below = vec![dirs[top].clone()];
                    if !is_opaque(&full) {
                        for root in &dirs[top + 1..] {
                            match fs::symlink_metadata(root.join(&rel_path)) {
                                Ok(m) if m.is_dir() => {
                                    below.push(root.clone());
                                    if is_opaque(&root.join(&rel_path)) {
                                        break;
                                    }
                                }
                                Ok(_) => break,
                                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                                Err(e) => return Err(e),
                            }
                        }
                    }
                    self.walk(builder, &below, &rel_path)?;
                }
            } else if excluded || ft.is_socket() {
                // Sockets cannot be stored in a tar and mean nothing in a new
                // sandbox; an excluded non-directory is dropped whole.
                continue;
            } else if ft.is_file() {
                let file = open_nofollow(&full)?;
                let fmeta = file.metadata()?;
                if !fmeta.is_file() {
                    return Err(io::Error::other(format!(
                        "{} changed while it was read",
                        rel_path.display()
                    )));
                }
                let mut header = tar::Header::new_gnu();
                header.set_metadata(&fmeta);
                self.own(&mut header, &fmeta);
                builder.append_data(&mut header, &rel_path, file)?;
            } else if ft.is_symlink() {
                let target = fs::read_link(&full)?;
                let mut header = tar::Header::new_gnu();
                header.set_metadata(&meta);
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_size(0);
                self.own(&mut header, &meta);
                append_link_exact(builder, &mut header, &rel_path, &target)?;
            } else {
                // FIFOs and device nodes: stored as what they are, never
                // opened.
                let mut header = tar::Header::new_gnu();
                header.set_metadata(&meta);
                self.own(&mut header, &meta);
                builder.append_data(&mut header, &rel_path, io::empty())?;
            }
        }
        Ok(())
    }

    fn own(&self, header: &mut tar::Header, meta: &fs::Metadata) {
        use std::os::unix::fs::MetadataExt;
        header.set_uid(self.ids.map(u64::from(meta.uid())));
        header.set_gid(self.ids.map(u64::from(meta.gid())));
    }
}

fn open_nofollow(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use std::os::unix::fs::PermissionsExt;

    async fn collect(mut s: ByteStream) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(chunk) = s.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn links_stay_links_and_excludes_keep_mount_points() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        fs::create_dir_all(root.join("new/dir")).expect("mkdir");
        fs::write(root.join("new/dir/f"), b"hello").expect("write");
        fs::write(root.join("run.sh"), b"#!/bin/sh\n").expect("write");
        fs::set_permissions(root.join("run.sh"), fs::Permissions::from_mode(0o755)).expect("chmod");
        std::os::unix::fs::symlink("/", root.join("escape")).expect("symlink");
        std::os::unix::fs::symlink("/etc/hostname", root.join("host-file")).expect("symlink");
        fs::create_dir_all(root.join("proc/1")).expect("mkdir");
        fs::write(root.join("proc/1/status"), b"x").expect("write");

        let tar_bytes = collect(tar_tree(
            root.to_path_buf(),
            DEFAULT_EXCLUDES.iter().map(|s| s.to_string()).collect(),
        ))
        .await
        .expect("tar");
        let mut archive = tar::Archive::new(&tar_bytes[..]);
        let mut seen = Vec::new();
        for entry in archive.entries().expect("entries") {
            let mut entry = entry.expect("entry");
            let path = entry.path().expect("path").to_path_buf();
            let kind = entry.header().entry_type();
            let mode = entry.header().mode().expect("mode");
            let link = entry.link_name().expect("link").map(|l| l.to_path_buf());
            let mut body = Vec::new();
            io::Read::read_to_end(&mut entry, &mut body).expect("read");
            seen.push((path, kind, mode, link, body));
        }
        let find = |p: &str| {
            seen.iter()
                .find(|e| e.0 == Path::new(p))
                .unwrap_or_else(|| panic!("{p} missing from {seen:?}"))
        };
        assert_eq!(find("new/dir/f").4, b"hello");
        assert_eq!(find("run.sh").2 & 0o777, 0o755);
        let escape = find("escape");
        assert_eq!(escape.1, tar::EntryType::Symlink);
        assert_eq!(escape.3.as_deref(), Some(Path::new("/")));
        assert!(escape.4.is_empty());
        assert_eq!(find("host-file").1, tar::EntryType::Symlink);
        assert_eq!(find("proc").1, tar::EntryType::Directory);
        assert!(
            !seen.iter().any(|e| e.0.starts_with("proc/1")),
            "excluded contents were captured"
        );
        // Nothing reached through the link to `/` was stored.
        // (`Path::starts_with` compares components, so the link itself
        // matches "escape" and is left out of the check.)
        assert!(!seen
            .iter()
            .any(|e| e.0.starts_with("escape") && e.0 != Path::new("escape")));
    }

    #[tokio::test]
    async fn a_missing_root_ends_the_stream_with_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = collect(tar_tree(dir.path().join("absent"), Vec::new()))
            .await
            .expect_err("missing root must fail");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
    /// Overlayfs semantics: an upper file hides the lower one, a whiteout
    /// deletes it, an opaque directory hides the lower directory's
    /// contents, and owners in the ID block are shifted back.
    #[tokio::test]
    async fn layers_merge_like_overlayfs() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let (upper, lower) = (dir.path().join("upper"), dir.path().join("lower"));
        for d in [&upper, &lower] {
            fs::create_dir_all(d.join("etc")).expect("mkdir");
            fs::create_dir_all(d.join("opaque")).expect("mkdir");
        }
        fs::write(lower.join("etc/kept"), b"lower").expect("write");
        fs::write(lower.join("etc/changed"), b"lower").expect("write");
        fs::write(lower.join("etc/deleted"), b"lower").expect("write");
        fs::write(lower.join("opaque/hidden"), b"lower").expect("write");
        fs::create_dir_all(lower.join("only-lower")).expect("mkdir");
        fs::write(lower.join("only-lower/f"), b"lower").expect("write");
        fs::write(upper.join("etc/changed"), b"upper").expect("write");
        fs::write(upper.join("opaque/new"), b"upper").expect("write");
        let whiteout =
            std::ffi::CString::new(upper.join("etc/deleted").as_os_str().as_bytes()).expect("path");
        // SAFETY: a valid NUL-terminated path; mknod touches no memory of ours.
        let rc = unsafe { libc::mknod(whiteout.as_ptr(), libc::S_IFCHR, 0) };
        assert_eq!(rc, 0, "mknod a whiteout (the provider tests run as root)");
        let opaque =
            std::ffi::CString::new(upper.join("opaque").as_os_str().as_bytes()).expect("path");
        // SAFETY: valid NUL-terminated strings and a 1-byte value.
        let rc = unsafe {
            libc::lsetxattr(
                opaque.as_ptr(),
                c"trusted.overlay.opaque".as_ptr(),
                b"y".as_ptr().cast(),
                1,
                0,
            )
        };
        assert_eq!(
            rc, 0,
            "set the opaque xattr (the provider tests run as root)"
        );
        std::os::unix::fs::chown(upper.join("etc/changed"), Some(100_005), Some(100_007))
            .expect("chown");

        let tar_bytes = collect(tar_layers(
            vec![upper, lower],
            Vec::new(),
            IdShift {
                first: 100_000,
                count: 65_536,
            },
        ))
        .await
        .expect("tar");
        let mut archive = tar::Archive::new(&tar_bytes[..]);
        let mut seen = std::collections::BTreeMap::new();
        for entry in archive.entries().expect("entries") {
            let mut entry = entry.expect("entry");
            let path = entry.path().expect("path").display().to_string();
            let ids = (
                entry.header().uid().expect("uid"),
                entry.header().gid().expect("gid"),
            );
            let mut body = String::new();
            io::Read::read_to_string(&mut entry, &mut body).expect("read");
            seen.insert(path, (body, ids));
        }
        assert_eq!(seen["etc/kept"].0, "lower");
        assert_eq!(seen["etc/changed"], ("upper".to_owned(), (5, 7)));
        assert!(!seen.contains_key("etc/deleted"), "{seen:?}");
        assert_eq!(seen["opaque/new"].0, "upper");
        assert!(!seen.contains_key("opaque/hidden"), "{seen:?}");
        assert_eq!(seen["only-lower/f"].0, "lower");
    }
    /// A provider's export re-streamed without StacyVM's files: the
    /// excluded directory stays as an empty mount point.
    #[tokio::test]
    async fn filter_tar_drops_excluded_contents() {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, body) in [
            ("etc/hostname", &b"box"[..]),
            (".stacyvm/agent", &b"elf"[..]),
        ] {
            let mut header = tar::Header::new_gnu();
            header.set_size(body.len() as u64);
            header.set_mode(0o644);
            builder
                .append_data(&mut header, path, body)
                .expect("append");
        }
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(0o755);
        header.set_size(0);
        builder
            .append_data(&mut header, ".stacyvm", io::empty())
            .expect("append");
        let input = builder.into_inner().expect("tar");
        let stream: ByteStream = Box::pin(futures_util::stream::iter(
            input
                .chunks(1000)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect::<Vec<_>>(),
        ));
        let out = collect(filter_tar(
            stream,
            DEFAULT_EXCLUDES.iter().map(|s| s.to_string()).collect(),
        ))
        .await
        .expect("filtered");
        let mut archive = tar::Archive::new(&out[..]);
        let paths: Vec<String> = archive
            .entries()
            .expect("entries")
            .map(|e| {
                e.expect("entry")
                    .path()
                    .expect("path")
                    .display()
                    .to_string()
            })
            .collect();
        assert_eq!(paths, vec!["etc/hostname", ".stacyvm"]);
    }
}
