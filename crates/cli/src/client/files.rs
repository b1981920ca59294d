//! `stacyvm cp` (host ↔ sandbox, streamed both ways with progress) and
//! `stacyvm files …` (ls, stat, mv, chmod, rm, glob, mkdir).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use futures_util::{StreamExt, TryStreamExt};
use stacyvm_sdk::{Client, FileEntry, FileType};
use tokio::io::AsyncWriteExt;

use super::output::{self, Counting, Format};
use super::{usage, Conn};

#[derive(Args)]
pub struct CpArgs {
    #[command(flatten)]
    conn: Conn,
    #[command(flatten)]
    paths: CpPaths,
}

/// The two sides of a copy (also `stacyvm sandbox cp`).
#[derive(Args)]
pub struct CpPaths {
    /// A host path, `-` for stdin, or SANDBOX_ID:/path.
    src: String,
    /// A host path, `-` for stdout, or SANDBOX_ID:/path. An existing
    /// directory (or a path ending in `/`) receives the file under its name.
    /// A directory on either side goes as one tar.
    dst: String,
}

#[derive(Args)]
pub struct FilesArgs {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    cmd: FilesCmd,
}

#[derive(Subcommand)]
enum FilesCmd {
    /// List a directory.
    Ls {
        sandbox: String,
        #[arg(default_value = "/")]
        path: String,
        #[arg(short, long)]
        recursive: bool,
    },
    /// Show one entry (symlinks not followed).
    Stat { sandbox: String, path: String },
    /// Move or rename.
    Mv {
        sandbox: String,
        from: String,
        to: String,
        /// Replace an existing target.
        #[arg(short = 'f', long)]
        overwrite: bool,
    },
    /// Set permission bits (octal, e.g. 0755).
    Chmod {
        sandbox: String,
        mode: String,
        path: String,
    },
    /// Delete a file or directory.
    Rm {
        sandbox: String,
        path: String,
        /// Delete a non-empty directory and everything in it.
        #[arg(short, long)]
        recursive: bool,
    },
    /// Paths matching a pattern (`**` crosses directories).
    Glob { sandbox: String, pattern: String },
    /// Make a directory (with its parents).
    Mkdir {
        sandbox: String,
        path: String,
        /// Fail if the parent does not exist instead of making it.
        #[arg(long)]
        no_parents: bool,
    },
}

/// One side of a copy.
#[derive(Debug, PartialEq, Eq)]
enum Loc {
    Host(PathBuf),
    Std,
    Sandbox { id: String, path: String },
}

/// `SANDBOX_ID:/path` is the sandbox side (as in `docker cp`); a host path
/// holding a colon can be written `./a:b`.
fn parse_loc(s: &str) -> Loc {
    if s == "-" {
        return Loc::Std;
    }
    if let Some((id, path)) = s.split_once(':') {
        if !id.is_empty() && !id.contains('/') && !id.starts_with('.') {
            return Loc::Sandbox {
                id: id.to_owned(),
                path: path.to_owned(),
            };
        }
    }
    Loc::Host(PathBuf::from(s))
}

fn base_name(p: &str) -> &str {
    p.trim_end_matches('/').rsplit('/').next().unwrap_or(p)
}

pub async fn cp(a: CpArgs) -> Result<ExitCode> {
    cp_paths(&a.conn, a.paths).await
}

pub async fn cp_paths(conn: &Conn, a: CpPaths) -> Result<ExitCode> {
    let client = conn.client()?;
    let entry = match (parse_loc(&a.src), parse_loc(&a.dst)) {
        (Loc::Sandbox { .. }, Loc::Sandbox { .. }) | (Loc::Host(_) | Loc::Std, Loc::Host(_) | Loc::Std) => {
            usage("cp copies between the host and a sandbox: one side must be SANDBOX_ID:/path, the other a host path")
        }
        (src, Loc::Sandbox { id, path }) => Some(upload(&client, src, &id, &path).await?),
        (Loc::Sandbox { id, path }, dst) => {
            download(&client, &id, &path, dst).await?;
            None
        }
    };
    if let Some(e) = entry {
        if conn.output == Format::Json {
            output::json(&e)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn upload(client: &Client, src: Loc, id: &str, path: &str) -> Result<serde_json::Value> {
    let mut target = path.to_owned();
    let name = match &src {
        Loc::Host(p) => p.file_name().map(|n| n.to_string_lossy().into_owned()),
        _ => None,
    };
    // Into an existing directory, as cp does.
    let into_dir = target.ends_with('/')
        || matches!(client.file_stat(id, &target).await, Ok(e) if e.file_type == FileType::Dir);
    let src_is_dir = matches!(&src, Loc::Host(p) if p.is_dir());
    if into_dir && !(src_is_dir && name.is_none()) {
        // (A directory without a name of its own, `.` or `..`, goes
        // straight into the target, as `docker cp DIR/. SBX:/path` does.)
        let Some(name) = name else {
            usage(format!(
                "{id}:{path} is a directory: name the file to write"
            ))
        };
        target = format!("{}/{name}", target.trim_end_matches('/'));
    }
    match src {
        Loc::Std => Ok(serde_json::to_value(
            client
                .file_write(id, &target, tokio::io::stdin(), None)
                .await?,
        )?),
        Loc::Host(p) => {
            let meta = tokio::fs::metadata(&p)
                .await
                .with_context(|| format!("cannot read {}", p.display()))?;
            if meta.is_dir() {
                return upload_dir(client, p, id, &target).await;
            }
            let mode = {
                use std::os::unix::fs::PermissionsExt;
                format!("{:04o}", meta.permissions().mode() & 0o7777)
            };
            let file = tokio::fs::File::open(&p)
                .await
                .with_context(|| format!("cannot open {}", p.display()))?;
            let bar = output::progress(
                Some(meta.len()),
                &format!("{} → {id}:{target}", p.display()),
            );
            let entry = client
                .file_write(id, &target, Counting::new(file, bar.clone()), Some(&mode))
                .await;
            bar.finish_and_clear();
            Ok(serde_json::to_value(entry?)?)
        }
        Loc::Sandbox { .. } => unreachable_sandbox(),
    }
}

/// A host directory goes as one tar (as `docker cp` sends it), packed into
/// an anonymous temporary file first so that memory does not grow with
/// the tree; symlinks stay links.
async fn upload_dir(
    client: &Client,
    dir: PathBuf,
    id: &str,
    target: &str,
) -> Result<serde_json::Value> {
    let shown = dir.display().to_string();
    let packed = tokio::task::spawn_blocking(move || -> Result<std::fs::File> {
        use std::io::{Seek, SeekFrom};
        let mut f = tempfile::tempfile().context("creating a temporary file")?;
        let mut tar = tar::Builder::new(&mut f);
        tar.follow_symlinks(false);
        tar.append_dir_all(".", &dir)
            .with_context(|| format!("packing {}", dir.display()))?;
        tar.finish()?;
        drop(tar);
        f.seek(SeekFrom::Start(0))?;
        Ok(f)
    })
    .await??;
    let size = packed.metadata()?.len();
    let bar = output::progress(Some(size), &format!("{shown}/ → {id}:{target}"));
    let summary = client
        .file_write_archive(
            id,
            target,
            Counting::new(tokio::fs::File::from_std(packed), bar.clone()),
        )
        .await;
    bar.finish_and_clear();
    let summary = summary?;
    eprintln!(
        "{shown}/ → {id}:{}: {} files, {} directories, {} symlinks, {} bytes",
        summary.path, summary.files, summary.dirs, summary.symlinks, summary.bytes
    );
    Ok(serde_json::to_value(summary)?)
}

fn unreachable_sandbox() -> ! {
    usage("cp copies between the host and a sandbox, not between two sandboxes")
}

async fn download(client: &Client, id: &str, path: &str, dst: Loc) -> Result<()> {
    let entry = client.file_stat(id, path).await?;
    if entry.file_type == FileType::Dir {
        return download_dir(client, id, path, dst).await;
    }
    let bar = output::progress(Some(entry.size), &format!("{id}:{path}"));
    let mut stream = client
        .file_read(id, path)
        .await?
        .inspect_ok(|b| bar.inc(b.len() as u64));
    match dst {
        Loc::Std => {
            let mut out = tokio::io::stdout();
            while let Some(chunk) = stream.next().await {
                out.write_all(&chunk?).await?;
            }
            out.flush().await?;
        }
        Loc::Host(p) => {
            let target = if p.is_dir() || p.as_os_str().to_string_lossy().ends_with('/') {
                p.join(base_name(path))
            } else {
                p
            };
            let tmp = partial(&target);
            let result = async {
                let mut f = tokio::fs::File::create(&tmp)
                    .await
                    .with_context(|| format!("cannot create {}", tmp.display()))?;
                while let Some(chunk) = stream.next().await {
                    f.write_all(&chunk?)
                        .await
                        .with_context(|| format!("cannot write {}", tmp.display()))?;
                }
                f.sync_all().await?;
                {
                    use std::os::unix::fs::PermissionsExt;
                    if let Ok(m) = u32::from_str_radix(&entry.mode, 8) {
                        let _ = tokio::fs::set_permissions(
                            &tmp,
                            std::fs::Permissions::from_mode(m & 0o777),
                        )
                        .await;
                    }
                }
                tokio::fs::rename(&tmp, &target)
                    .await
                    .with_context(|| format!("cannot write {}", target.display()))
            }
            .await;
            if result.is_err() {
                let _ = tokio::fs::remove_file(&tmp).await;
            }
            result?;
        }
        Loc::Sandbox { .. } => unreachable_sandbox(),
    }
    bar.finish_and_clear();
    Ok(())
}

/// A sandbox directory comes as one tar, as `docker cp` copies one: to
/// stdout as the tar itself, or unpacked into a host directory (the
/// destination when it does not exist yet, else a directory of the same
/// name inside it). The archive comes from the sandbox, so it is unpacked
/// as untrusted input: only files, directories and symlinks; every entry
/// inside the destination (an absolute name, a `..` or a parent that is a
/// symlink leading out is refused); no set-id bits, and owned by whoever
/// runs the copy.
async fn download_dir(client: &Client, id: &str, path: &str, dst: Loc) -> Result<()> {
    let bar = output::progress(None, &format!("{id}:{path}/"));
    let counted = bar.clone();
    let mut stream = client
        .file_read_archive(id, path)
        .await?
        .inspect_ok(move |b| counted.inc(b.len() as u64));
    let result = match dst {
        Loc::Std => {
            let mut out = tokio::io::stdout();
            while let Some(chunk) = stream.next().await {
                out.write_all(&chunk?).await?;
            }
            out.flush().await.map_err(anyhow::Error::from)
        }
        Loc::Host(p) => {
            let target = if p.is_dir() {
                p.join(base_name(path))
            } else {
                p
            };
            let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(
                stream.map_err(|e| std::io::Error::other(e.to_string())),
            ));
            let shown = target.clone();
            let counts =
                tokio::task::spawn_blocking(move || unpack_untrusted(reader, &target)).await??;
            bar.finish_and_clear();
            eprintln!(
                "{id}:{path}/ → {}: {} files, {} directories, {} symlinks{}",
                shown.display(),
                counts.files,
                counts.dirs,
                counts.symlinks,
                if counts.skipped > 0 {
                    format!(", {} entries of other types left out", counts.skipped)
                } else {
                    String::new()
                }
            );
            Ok(())
        }
        Loc::Sandbox { .. } => unreachable_sandbox(),
    };
    bar.finish_and_clear();
    result
}

#[derive(Default)]
struct Unpacked {
    files: u64,
    dirs: u64,
    symlinks: u64,
    skipped: u64,
}

fn unpack_untrusted(reader: impl std::io::Read, dest: &Path) -> Result<Unpacked> {
    std::fs::create_dir_all(dest).with_context(|| format!("cannot create {}", dest.display()))?;
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(false);
    archive.set_preserve_ownerships(false);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    let mut n = Unpacked::default();
    for entry in archive.entries().context("reading the archive")? {
        let mut entry = entry.context("reading the archive")?;
        let kind = entry.header().entry_type();
        if !matches!(
            kind,
            tar::EntryType::Regular | tar::EntryType::Directory | tar::EntryType::Symlink
        ) {
            n.skipped += 1;
            continue;
        }
        let name = entry
            .path()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        if !entry
            .unpack_in(dest)
            .with_context(|| format!("unpacking {name} into {}", dest.display()))?
        {
            anyhow::bail!(
                "the archive's entry {name:?} would land outside {}",
                dest.display()
            );
        }
        match kind {
            tar::EntryType::Regular => n.files += 1,
            tar::EntryType::Directory => n.dirs += 1,
            _ => n.symlinks += 1,
        }
    }
    Ok(n)
}

/// Where a download goes until it is complete, so a failed copy never
/// leaves a truncated file under the real name.
fn partial(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "download".into());
    target.with_file_name(format!(".{name}.stacyvm-partial-{}", std::process::id()))
}

fn entries(fmt: Format, list: &[FileEntry]) -> Result<()> {
    if fmt == Format::Json {
        return output::json(list);
    }
    let rows = list
        .iter()
        .map(|e| {
            let name = match &e.symlink_target {
                Some(t) => format!("{} -> {t}", e.path),
                None => e.path.clone(),
            };
            vec![
                e.mode.clone(),
                e.file_type.as_str().to_owned(),
                e.size.to_string(),
                output::time(e.mtime),
                name,
            ]
        })
        .collect();
    output::table(&["MODE", "TYPE", "SIZE", "MODIFIED", "PATH"], rows);
    Ok(())
}

pub async fn run(a: FilesArgs) -> Result<ExitCode> {
    let client = a.conn.client()?;
    let fmt = a.conn.output;
    match a.cmd {
        FilesCmd::Ls {
            sandbox,
            path,
            recursive,
        } => entries(fmt, &client.file_list(&sandbox, &path, recursive).await?)?,
        FilesCmd::Stat { sandbox, path } => {
            entries(fmt, &[client.file_stat(&sandbox, &path).await?])?
        }
        FilesCmd::Mv {
            sandbox,
            from,
            to,
            overwrite,
        } => entries(
            fmt,
            &[client.file_move(&sandbox, &from, &to, overwrite).await?],
        )?,
        FilesCmd::Chmod {
            sandbox,
            mode,
            path,
        } => entries(fmt, &[client.file_chmod(&sandbox, &path, &mode).await?])?,
        FilesCmd::Rm {
            sandbox,
            path,
            recursive,
        } => client.file_delete(&sandbox, &path, recursive).await?,
        FilesCmd::Glob { sandbox, pattern } => {
            let paths = client.file_glob(&sandbox, &pattern).await?;
            if fmt == Format::Json {
                output::json(&paths)?;
            } else {
                for p in paths {
                    println!("{p}");
                }
            }
        }
        FilesCmd::Mkdir {
            sandbox,
            path,
            no_parents,
        } => entries(
            fmt,
            &[client.file_mkdir(&sandbox, &path, !no_parents).await?],
        )?,
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_sides_are_id_colon_path() {
        assert_eq!(
            parse_loc("sbx_1:/work/a"),
            Loc::Sandbox {
                id: "sbx_1".into(),
                path: "/work/a".into()
            }
        );
        assert_eq!(parse_loc("./a:b"), Loc::Host("./a:b".into()));
        assert_eq!(parse_loc("/tmp/a:b"), Loc::Host("/tmp/a:b".into()));
        assert_eq!(parse_loc("plain"), Loc::Host("plain".into()));
        assert_eq!(parse_loc("-"), Loc::Std);
        assert_eq!(base_name("/work/dir/f.txt"), "f.txt");
    }
}
