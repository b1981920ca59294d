//! The host side of volumes: each is an ext4 image of its size (allocated
//! whole, so declared volumes never add up to more than the disk) under
//! `DATA_DIR/volumes/images/`, loop-mounted at `DATA_DIR/volumes/mnt/ID`
//! (both parents 0700), so its size is a real filesystem limit. Kept by the
//! control plane for its in-process worker, and by a `stacyvm worker` for
//! the volumes it holds (the worker RPC's `Volume*` calls).
//!
//! Host paths are built from the volume's id alone, never from anything a
//! sandbox wrote: no host-side operation looks inside a volume, so a symlink
//! planted in one is never followed by the host.

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use stacyvm_core::{Error, Result, VolumeId};

/// The host side of volumes: image files and their mount points.
pub struct VolumeHost {
    root: PathBuf,
}

impl VolumeHost {
    pub fn new(data_dir: &Path) -> VolumeHost {
        VolumeHost {
            root: data_dir.join("volumes"),
        }
    }

    fn image(&self, id: &VolumeId) -> PathBuf {
        self.root.join("images").join(format!("{id}.ext4"))
    }

    /// Where the volume's filesystem is mounted on the host.
    pub fn mount_point(&self, id: &VolumeId) -> PathBuf {
        self.root.join("mnt").join(id.as_str())
    }

    /// Whether `path` is where this host mounts some volume (by its form:
    /// `mnt/` of this host followed by a volume id).
    pub fn is_mount_point_path(&self, path: &Path) -> bool {
        path.parent() == Some(self.root.join("mnt").as_path())
            && path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| VolumeId::parse(n).is_some())
    }

    fn private_dirs(&self) -> Result<()> {
        for d in [
            self.root.clone(),
            self.root.join("images"),
            self.root.join("mnt"),
        ] {
            match std::fs::DirBuilder::new().mode(0o700).create(&d) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::internal(format_args!("creating {}", d.display()), e)),
            }
        }
        Ok(())
    }

    /// Makes the image file and its filesystem, and mounts it.
    pub async fn create(&self, id: &VolumeId, size_mb: i64) -> Result<()> {
        self.private_dirs()?;
        // Checked before allocating too: a filesystem can fill itself
        // completely while it tries an allocation it then refuses.
        keep_reserve(
            &self.root.join("images"),
            size_mb,
            size_mb as u64 * 1024 * 1024,
        )?;
        let image = self.image(id);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&image)
            .map_err(|e| Error::internal(format_args!("creating {}", image.display()), e))?;
        let sized = allocate(&file, size_mb as u64 * 1024 * 1024)
            .and_then(|()| keep_reserve(&self.root.join("images"), size_mb, 0));
        drop(file);
        let made = match sized {
            Ok(()) => {
                // No blocks reserved for root: the sandbox gets the whole
                // size. No discard: on a file it would punch the allocated
                // blocks back out and the volume would be sparse again.
                run(
                    "mkfs.ext4",
                    &["-q", "-F", "-m", "0", "-E", "root_owner=0:0,nodiscard"],
                    &[&image],
                )
                .await
            }
            Err(e) => Err(e),
        };
        let made = match made {
            Ok(()) => self.ensure_mounted(id).await.map(|_| ()),
            Err(e) => Err(e),
        };
        if made.is_err() {
            let _ = self.remove(id).await;
        }
        made
    }

    /// Mounts the volume if it is not mounted (after a host restart, say);
    /// returns the mount point.
    pub async fn ensure_mounted(&self, id: &VolumeId) -> Result<PathBuf> {
        let at = self.mount_point(id);
        if is_mount_point(&at)? {
            return Ok(at);
        }
        self.private_dirs()?;
        let image = self.image(id);
        if !image.exists() {
            return Err(Error::Internal(format!(
                "the image of volume {id} is missing on this host"
            )));
        }
        match std::fs::DirBuilder::new().mode(0o755).create(&at) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(Error::internal(
                    format_args!("creating {}", at.display()),
                    e,
                ))
            }
        }
        run(
            "mount",
            &["-t", "ext4", "-o", "loop,nosuid,nodev"],
            &[&image, &at],
        )
        .await?;
        Ok(at)
    }

    /// Unmounts the volume and removes its mount point and image; what is
    /// already gone is skipped.
    pub async fn remove(&self, id: &VolumeId) -> Result<()> {
        let at = self.mount_point(id);
        if is_mount_point(&at)? {
            // The loop device goes with the mount (mount set it to autoclear).
            run("umount", &[], &[&at]).await?;
        }
        match std::fs::remove_dir(&at) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Error::internal(
                    format_args!("removing {}", at.display()),
                    e,
                ))
            }
        }
        let image = self.image(id);
        match std::fs::remove_file(&image) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::internal(
                format_args!("removing {}", image.display()),
                e,
            )),
        }
    }
}

/// Space of the data dir's filesystem no volume may take, so that the store,
/// images and logs beside them can still be written: 5% of the filesystem,
/// at most 2 GiB.
fn reserve_bytes(total: u64) -> u64 {
    (total / 20).min(2 << 30)
}

/// Gives the image file all its blocks now. A sparse image would let the
/// volumes declared on a host add up to more than its disk, and a tenant
/// filling its own volume would then fill the disk under everyone else's.
fn allocate(file: &std::fs::File, len: u64) -> Result<()> {
    use std::os::fd::AsRawFd;
    let len_off = libc::off_t::try_from(len)
        .map_err(|_| Error::InvalidRequest("size_mb: too large".into()))?;
    // SAFETY: the descriptor is open for writing for the duration of the
    // call; fallocate only changes the file's allocation.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len_off) };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EFBIG) => Err(Error::Conflict(format!(
            "the host has no room for a volume of {} MiB now; delete volumes or snapshots first",
            len >> 20
        ))),
        Some(libc::EOPNOTSUPP) => Err(Error::Unsupported(
            "volumes need a data dir on a filesystem that can allocate space ahead \
             (ext4, xfs, btrfs, tmpfs); this one cannot"
                .into(),
        )),
        _ => Err(Error::internal("allocating the volume image", e)),
    }
}

/// Refuses a volume that leaves less than the reserve free on the data dir's
/// filesystem once `still_to_take` more bytes are allocated. Checked before
/// allocating (with the volume's size) and after (with 0), so two creates at
/// once cannot both slip under the reserve.
fn keep_reserve(dir: &Path, size_mb: i64, still_to_take: u64) -> Result<()> {
    let (total, avail) = fs_space(dir)?;
    let reserve = reserve_bytes(total);
    // A size the filesystem could never hold is the request's fault; one
    // that does not fit now may fit once other volumes are gone.
    let most = total.saturating_sub(reserve);
    if still_to_take > most {
        return Err(Error::InvalidRequest(format!(
            "size_mb: {size_mb} MiB is more than this host's data dir can hold ({} MiB)",
            most >> 20
        )));
    }
    let avail = avail.saturating_sub(still_to_take);
    if avail < reserve {
        return Err(Error::Conflict(format!(
            "the host has no room for a volume of {size_mb} MiB now: its data dir keeps {} MiB \
             free for the server, and {} MiB would be left; delete volumes or snapshots first",
            reserve >> 20,
            avail >> 20
        )));
    }
    Ok(())
}

/// The size and the space available to the server of the filesystem holding
/// `dir`, in bytes.
fn fs_space(dir: &Path) -> Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| Error::internal("data dir path", e))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated path and `st` is a buffer of the
    // right type that statvfs fills on success.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(Error::internal(
            format_args!("statvfs {}", dir.display()),
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: statvfs returned 0, so it filled the buffer.
    let st = unsafe { st.assume_init() };
    let frsize = st.f_frsize;
    Ok((st.f_blocks * frsize, st.f_bavail * frsize))
}

async fn run(program: &str, args: &[&str], paths: &[&Path]) -> Result<()> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .args(paths)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| Error::internal(format_args!("running {program}"), e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Internal(format!(
            "{program} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Whether `path` is a mount point in this process's mount namespace, by
/// `/proc/self/mountinfo` (never by looking inside the directory).
fn is_mount_point(path: &Path) -> Result<bool> {
    let mounts = stacyvm_provider::host::mounts_under(path)
        .map_err(|e| Error::internal("reading /proc/self/mountinfo", e))?;
    Ok(mounts.iter().any(|m| m == path))
}

/// Whether this process can keep volumes: loop mounts need root.
pub fn can_keep() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
