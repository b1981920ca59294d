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

/// Returns a stream of a tar of `root`. Excluded directories are kept as
/// empty directories (with their mode) so the image still has its mount
/// points. An error during the walk ends the stream with that error.
pub fn tar_tree(root: PathBuf, excludes: Vec<String>) -> ByteStream {
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(DEPTH);
    tokio::task::spawn_blocking(move || {
        let writer = ChannelWriter {
            tx: tx.clone(),
            buf: Vec::with_capacity(CHUNK),
        };
        let mut builder = tar::Builder::new(writer);
        builder.follow_symlinks(false);
        let result = walk(&mut builder, &root, Path::new(""), &excludes)
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

fn walk<W: Write>(
    builder: &mut tar::Builder<W>,
    root: &Path,
    rel: &Path,
    excludes: &[String],
) -> io::Result<()> {
    let dir = root.join(rel);
    let mut names: Vec<_> = fs::read_dir(&dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()?;
    // A stable order makes two snapshots of the same tree byte-identical.
    names.sort();
    for name in names {
        let rel_path = rel.join(&name);
        let full = root.join(&rel_path);
        let meta = fs::symlink_metadata(&full)?;
        let ft = meta.file_type();
        let excluded = excludes.iter().any(|x| Path::new(x) == rel_path);
        if ft.is_dir() {
            let mut header = tar::Header::new_gnu();
            header.set_metadata(&meta);
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            builder.append_data(&mut header, &rel_path, io::empty())?;
            if !excluded {
                walk(builder, root, &rel_path, excludes)?;
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
            builder.append_data(&mut header, &rel_path, file)?;
        } else {
            // Links, FIFOs and device nodes: `append_path_with_name` with
            // `follow_symlinks(false)` stores them as what they are.
            builder.append_path_with_name(&full, &rel_path)?;
        }
    }
    Ok(())
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
}
