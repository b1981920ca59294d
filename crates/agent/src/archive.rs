//! Archive creation: a directory (or one file) of the sandbox streamed out
//! as a tar, the reverse of [`crate::extract`] (the agent's `FileArchive`).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use stacyvm_core::{Error, Result};

use crate::files::pseudo_dirs;
use crate::flow::{Out, Sent};
use crate::protocol::{Kind, CHUNK_SIZE};
use crate::root::{base_name, io_error, Root};

/// How an archive ended.
pub enum Ended {
    /// Every entry was sent.
    Done,
    /// The client went away; nothing more is sent.
    Cancelled,
}

/// `archive`: sends `path` as a tar in `Data` chunks. A directory's entries
/// are named relative to it (so unpacking the tar into a directory of the
/// same name gives back the tree), a single file under its own name.
/// Regular files, directories and symlinks (stored as links, never
/// followed); sockets, FIFOs and devices are left out, as are `/proc` and
/// `/sys` when the walk starts above them. A file that changes size while
/// it is read is cut or padded with zeros to the size its header gives, so
/// the tar stays well formed; an entry that vanishes mid-walk is skipped.
pub fn archive(root: &Root, path: &str, out: &Out) -> Result<Ended> {
    let r = root.resolve(path, true)?;
    if !r.exists {
        return Err(Error::NotFound(format!("{} does not exist", r.logical)));
    }
    let meta = std::fs::symlink_metadata(&r.host).map_err(|e| io_error(&r.logical, e))?;
    let mut sink = ChunkSink {
        out,
        buf: Vec::with_capacity(CHUNK_SIZE),
        cancelled: false,
    };
    let result = {
        let mut tar = tar::Builder::new(&mut sink);
        tar.follow_symlinks(false);
        let written = if meta.is_dir() {
            walk(root, &r.host, &mut tar)
        } else if meta.is_file() {
            append(&mut tar, &r.host, &base_name(&r.logical), &meta)
        } else {
            return Err(Error::InvalidRequest(format!(
                "{} is neither a directory nor a regular file",
                r.logical
            )));
        };
        written.and_then(|()| tar.finish())
    };
    if sink.cancelled {
        return Ok(Ended::Cancelled);
    }
    result
        .and_then(|()| sink.flush())
        .map_err(|e| io_error(&r.logical, e))?;
    if sink.cancelled {
        return Ok(Ended::Cancelled);
    }
    Ok(Ended::Done)
}

fn walk<W: Write>(root: &Root, top: &Path, tar: &mut tar::Builder<W>) -> io::Result<()> {
    let pseudo = pseudo_dirs(root);
    let mut walker = walkdir::WalkDir::new(top)
        .min_depth(1)
        .follow_links(false)
        .sort_by_file_name()
        .into_iter();
    while let Some(item) = walker.next() {
        let Ok(item) = item else {
            continue;
        };
        if item.file_type().is_dir() && pseudo.iter().any(|p| p == item.path()) {
            walker.skip_current_dir();
            continue;
        }
        let Ok(rel) = item.path().strip_prefix(top) else {
            continue;
        };
        let Ok(meta) = item.metadata() else {
            continue;
        };
        append(tar, item.path(), &rel.to_string_lossy(), &meta)?;
    }
    Ok(())
}

/// Appends one entry named `name`; other types than file, directory and
/// symlink, and files gone before they could be opened, are skipped.
fn append<W: Write>(
    tar: &mut tar::Builder<W>,
    host: &Path,
    name: &str,
    meta: &std::fs::Metadata,
) -> io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_mode(meta.mode() & 0o7777);
    header.set_uid(u64::from(meta.uid()));
    header.set_gid(u64::from(meta.gid()));
    header.set_mtime(u64::try_from(meta.mtime()).unwrap_or(0));
    let ft = meta.file_type();
    if ft.is_dir() {
        header.set_entry_type(tar::EntryType::Directory);
        header.set_size(0);
        tar.append_data(&mut header, format!("{name}/"), io::empty())
    } else if ft.is_symlink() {
        let Ok(target) = std::fs::read_link(host) else {
            return Ok(());
        };
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_size(0);
        // Stored byte for byte: `append_link` rewrites the target as a path
        // (`/` comes out as `//`). Longer targets need its GNU long-link entry.
        if target.as_os_str().len() <= 100 {
            header.set_link_name_literal(target.as_os_str().as_encoded_bytes())?;
            tar.append_data(&mut header, name, io::empty())
        } else {
            tar.append_link(&mut header, name, target)
        }
    } else if ft.is_file() {
        // Opened without following a link that replaced the file since the
        // walk saw it, and without blocking on one that became a FIFO.
        let file: File = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(host)
        {
            Ok(f) => f,
            Err(_) => return Ok(()),
        };
        let now = file.metadata()?;
        if !now.is_file() {
            return Ok(());
        }
        let size = now.len();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(size);
        let body = file.take(size).chain(io::repeat(0)).take(size);
        tar.append_data(&mut header, name, body)
    } else {
        Ok(())
    }
}

/// The tar's bytes, sent as `Data` chunks of [`CHUNK_SIZE`] as they fill.
struct ChunkSink<'a> {
    out: &'a Out,
    buf: Vec<u8>,
    cancelled: bool,
}

impl ChunkSink<'_> {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        if self.out.chunk(Kind::Data, &self.buf, None) != Sent::Sent {
            self.cancelled = true;
            return Err(io::Error::other("the client went away"));
        }
        self.buf.clear();
        Ok(())
    }
}

impl Write for ChunkSink<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = CHUNK_SIZE - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK_SIZE {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}
