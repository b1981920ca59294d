//! File calls: streamed upload and download (from and to readers, writers
//! or local paths, never held whole in memory), stat, list, glob, move,
//! chmod, mkdir and delete.

use std::path::{Path, PathBuf};
use std::pin::Pin;

use bytes::Bytes;
use futures_util::{Stream, StreamExt, TryStreamExt};
use reqwest::{Body, Method};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::io::ReaderStream;

use crate::client::{Deadline, Retry, UPLOAD_CHUNK};
use crate::models::*;
use crate::{Client, Error, Result};

/// A file's bytes as they arrive.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes>> + Send>>;

fn mode_query(path: &str, mode: Option<&str>) -> Vec<(&'static str, String)> {
    let mut q = vec![("path", path.to_owned())];
    if let Some(m) = mode {
        q.push(("mode", m.to_owned()));
    }
    q
}

impl Client {
    /// Writes (creates or replaces) `path` in the sandbox from `reader`,
    /// making parent directories. `mode` is octal, e.g. `"0755"` (default
    /// `0644`). Streamed: memory use does not grow with the file. Not
    /// retried, since a reader cannot be replayed.
    pub async fn file_write<R>(
        &self,
        id: &str,
        path: &str,
        reader: R,
        mode: Option<&str>,
    ) -> Result<FileEntry>
    where
        R: AsyncRead + Send + 'static,
    {
        let url = self.url(&["v1", "sandboxes", id, "files"], &mode_query(path, mode))?;
        self.send_reader_json(Method::PUT, url, "application/octet-stream", reader)
            .await
    }

    /// Unpacks the tar archive read from `reader` into the directory `path`
    /// in the sandbox (made with its parents), in one streamed request:
    /// files, directories, symlinks and hard links with their modes. Nothing
    /// lands outside `path`: an entry with an absolute name, a `..`
    /// component, a parent leading out through a symlink, or another type
    /// is refused with an API error whose [`code`](Error::code) is
    /// `invalid_request`; entries before it stay written. Not retried,
    /// since a reader cannot be replayed.
    pub async fn file_write_archive<R>(
        &self,
        id: &str,
        path: &str,
        reader: R,
    ) -> Result<ArchiveSummary>
    where
        R: AsyncRead + Send + 'static,
    {
        let url = self.url(
            &["v1", "sandboxes", id, "files", "archive"],
            &[("path", path.to_owned())],
        )?;
        self.send_reader_json(Method::PUT, url, "application/x-tar", reader)
            .await
    }

    /// Writes `data` to `path` in the sandbox.
    pub async fn file_write_bytes(
        &self,
        id: &str,
        path: &str,
        data: impl Into<Bytes>,
        mode: Option<&str>,
    ) -> Result<FileEntry> {
        let url = self.url(&["v1", "sandboxes", id, "files"], &mode_query(path, mode))?;
        let data: Bytes = data.into();
        self.send_json(Retry::Idempotent, || {
            Ok(self
                .request(Method::PUT, url.clone(), Deadline::Streaming)
                .header("Content-Type", "application/octet-stream")
                .body(data.clone()))
        })
        .await
    }

    /// Uploads the local file `local` to `path` in the sandbox, streamed.
    /// Retried on transient failures (the file is read again from the start).
    pub async fn file_write_path(
        &self,
        id: &str,
        path: &str,
        local: impl AsRef<Path>,
        mode: Option<&str>,
    ) -> Result<FileEntry> {
        let local = local.as_ref().to_path_buf();
        let url = self.url(&["v1", "sandboxes", id, "files"], &mode_query(path, mode))?;
        self.send_json(Retry::Idempotent, || {
            let f = std::fs::File::open(&local)
                .map_err(|e| Error::io(format!("cannot open {}", local.display()), e))?;
            let stream = ReaderStream::with_capacity(tokio::fs::File::from_std(f), UPLOAD_CHUNK);
            Ok(self
                .request(Method::PUT, url.clone(), Deadline::Streaming)
                .header("Content-Type", "application/octet-stream")
                .body(Body::wrap_stream(stream)))
        })
        .await
    }

    /// The bytes of `path` in the sandbox, as they arrive.
    pub async fn file_read(&self, id: &str, path: &str) -> Result<ByteStream> {
        self.download(&["v1", "sandboxes", id, "files"], path).await
    }

    /// `path` in the sandbox (a directory, or one file) as a tar stream, as
    /// it arrives: a directory's entries named relative to it, so
    /// [`file_write_archive`](Self::file_write_archive) of the stream into a
    /// directory gives back the tree. Files, directories and symlinks
    /// (stored, never followed) with their modes and times.
    pub async fn file_read_archive(&self, id: &str, path: &str) -> Result<ByteStream> {
        self.download(&["v1", "sandboxes", id, "files", "archive"], path)
            .await
    }

    /// A streamed GET of `segments?path=PATH`.
    async fn download(&self, segments: &[&str], path: &str) -> Result<ByteStream> {
        let url = self.url(segments, &[("path", path.to_owned())])?;
        let resp = self
            .send(Retry::Idempotent, || {
                Ok(self.request(Method::GET, url.clone(), Deadline::Streaming))
            })
            .await?;
        let client = self.clone();
        Ok(Box::pin(
            resp.bytes_stream().map_err(move |e| client.transport(e)),
        ))
    }

    /// Copies `path` in the sandbox into `writer`; returns the byte count.
    pub async fn file_read_to<W>(&self, id: &str, path: &str, writer: &mut W) -> Result<u64>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        let mut stream = self.file_read(id, path).await?;
        let mut n = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            writer
                .write_all(&chunk)
                .await
                .map_err(|e| Error::io("writing the downloaded file", e))?;
            n += chunk.len() as u64;
        }
        writer
            .flush()
            .await
            .map_err(|e| Error::io("writing the downloaded file", e))?;
        Ok(n)
    }

    /// Downloads `path` in the sandbox to the local file `local`. The file
    /// appears only when complete (written beside it, then renamed).
    pub async fn file_read_to_path(
        &self,
        id: &str,
        path: &str,
        local: impl AsRef<Path>,
    ) -> Result<u64> {
        let local = local.as_ref();
        let tmp = partial_path(local);
        let mut f = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| Error::io(format!("cannot create {}", tmp.display()), e))?;
        let copied = self.file_read_to(id, path, &mut f).await;
        let done = match copied {
            Ok(n) => f
                .sync_all()
                .await
                .map_err(|e| Error::io(format!("cannot write {}", tmp.display()), e))
                .map(|()| n),
            Err(e) => Err(e),
        };
        drop(f);
        match done {
            Ok(n) => {
                tokio::fs::rename(&tmp, local).await.map_err(|e| {
                    Error::io(
                        format!("cannot move the download to {}", local.display()),
                        e,
                    )
                })?;
                Ok(n)
            }
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                Err(e)
            }
        }
    }

    /// The whole content of `path` in memory; for small files.
    pub async fn file_read_bytes(&self, id: &str, path: &str) -> Result<Bytes> {
        let mut out = Vec::new();
        self.file_read_to(id, path, &mut out).await?;
        Ok(Bytes::from(out))
    }

    /// The entry of `path` (a symlink is not followed).
    pub async fn file_stat(&self, id: &str, path: &str) -> Result<FileEntry> {
        let url = self.url(
            &["v1", "sandboxes", id, "files", "stat"],
            &[("path", path.to_owned())],
        )?;
        self.send_json(Retry::Idempotent, || {
            Ok(self.request(Method::GET, url.clone(), Deadline::Default))
        })
        .await
    }

    /// The entries of the directory `path`, sorted by path.
    pub async fn file_list(&self, id: &str, path: &str, recursive: bool) -> Result<Vec<FileEntry>> {
        let url = self.url(
            &["v1", "sandboxes", id, "files", "list"],
            &[
                ("path", path.to_owned()),
                ("recursive", recursive.to_string()),
            ],
        )?;
        let r: Entries = self
            .send_json(Retry::Idempotent, || {
                Ok(self.request(Method::GET, url.clone(), Deadline::Default))
            })
            .await?;
        Ok(r.entries)
    }

    /// The paths matching `pattern` (`**` crosses directories), sorted.
    pub async fn file_glob(&self, id: &str, pattern: &str) -> Result<Vec<String>> {
        let url = self.url(
            &["v1", "sandboxes", id, "files", "glob"],
            &[("pattern", pattern.to_owned())],
        )?;
        let r: Paths = self
            .send_json(Retry::Idempotent, || {
                Ok(self.request(Method::GET, url.clone(), Deadline::Default))
            })
            .await?;
        Ok(r.paths)
    }

    /// Moves `from` to `to`; an existing `to` is a conflict unless `overwrite`.
    pub async fn file_move(
        &self,
        id: &str,
        from: &str,
        to: &str,
        overwrite: bool,
    ) -> Result<FileEntry> {
        let url = self.url(&["v1", "sandboxes", id, "files", "move"], &[])?;
        let body = serde_json::json!({ "from": from, "to": to, "overwrite": overwrite });
        self.send_json(Retry::Once, || {
            Ok(self
                .request(Method::POST, url.clone(), Deadline::Default)
                .json(&body))
        })
        .await
    }

    /// Sets the permission bits of `path`; `mode` is octal, e.g. `"0755"`.
    pub async fn file_chmod(&self, id: &str, path: &str, mode: &str) -> Result<FileEntry> {
        let url = self.url(&["v1", "sandboxes", id, "files", "chmod"], &[])?;
        let body = serde_json::json!({ "path": path, "mode": mode });
        self.send_json(Retry::Once, || {
            Ok(self
                .request(Method::POST, url.clone(), Deadline::Default)
                .json(&body))
        })
        .await
    }

    /// Makes the directory `path` (and its parents when `parents`).
    pub async fn file_mkdir(&self, id: &str, path: &str, parents: bool) -> Result<FileEntry> {
        let url = self.url(&["v1", "sandboxes", id, "files", "mkdir"], &[])?;
        let body = serde_json::json!({ "path": path, "parents": parents });
        self.send_json(Retry::Once, || {
            Ok(self
                .request(Method::POST, url.clone(), Deadline::Default)
                .json(&body))
        })
        .await
    }

    /// Deletes `path`; a non-empty directory needs `recursive`.
    pub async fn file_delete(&self, id: &str, path: &str, recursive: bool) -> Result<()> {
        let url = self.url(
            &["v1", "sandboxes", id, "files"],
            &[
                ("path", path.to_owned()),
                ("recursive", recursive.to_string()),
            ],
        )?;
        self.send(Retry::Idempotent, || {
            Ok(self.request(Method::DELETE, url.clone(), Deadline::Default))
        })
        .await?;
        Ok(())
    }
}

/// Where a download goes until it is complete.
fn partial_path(local: &Path) -> PathBuf {
    let name = local
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "download".into());
    local.with_file_name(format!(".{name}.stacyvm-partial-{}", std::process::id()))
}
