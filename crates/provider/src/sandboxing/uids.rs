//! Host user ids for sandboxes: each sandbox runs as a user of its own, so
//! the kernel's ordinary permission checks keep it away from the server's
//! files and processes and from every other sandbox.
//!
//! Ids come from a range no distribution hands out to accounts, and are
//! claimed host-wide by creating a file named after the id with `O_EXCL`
//! in a root-only directory, so several servers on one host never share
//! one.

use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The first id of the range.
pub const FIRST_SANDBOX_UID: u32 = 1_800_000_000;
/// How many ids the range holds.
pub const SANDBOX_UIDS: u32 = 1 << 24;

/// Claims and releases sandbox user ids under one directory.
#[derive(Clone, Debug)]
pub struct UidPool {
    dir: PathBuf,
}

impl UidPool {
    /// Uses (and creates, mode 0700) `dir` for the claims.
    pub fn open(dir: &Path) -> io::Result<UidPool> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        Ok(UidPool {
            dir: dir.to_path_buf(),
        })
    }

    fn claim_path(&self, uid: u32) -> PathBuf {
        self.dir.join(uid.to_string())
    }

    /// Claims a free id for `owner` (written into the claim, for people
    /// looking at the host), starting the search at a point derived from it.
    pub fn claim(&self, owner: &str) -> io::Result<u32> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        owner.hash(&mut h);
        std::process::id().hash(&mut h);
        let start = (h.finish() % u64::from(SANDBOX_UIDS)) as u32;
        for i in 0..4096u32 {
            let uid = FIRST_SANDBOX_UID + (start.wrapping_add(i) % SANDBOX_UIDS);
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(self.claim_path(uid))
            {
                Ok(mut f) => {
                    f.write_all(owner.as_bytes())?;
                    return Ok(uid);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::other(format!(
            "no free sandbox user id found in {}",
            self.dir.display()
        )))
    }

    /// Releases `uid`. Releasing an id that is not claimed is success.
    pub fn release(&self, uid: u32) -> io::Result<()> {
        match std::fs::remove_file(self.claim_path(uid)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The id claimed for `owner`, if any (for cleaning up after a crash
    /// between a claim and the record of it).
    pub fn find(&self, owner: &str) -> Option<u32> {
        std::fs::read_dir(&self.dir).ok()?.flatten().find_map(|e| {
            let uid = e.file_name().to_str()?.parse().ok()?;
            (std::fs::read(e.path()).ok()? == owner.as_bytes()).then_some(uid)
        })
    }

    /// Whether `uid` is claimed.
    pub fn is_claimed(&self, uid: u32) -> bool {
        self.claim_path(uid).exists()
    }
}

/// Whether `uid` lies in the sandbox range.
pub fn is_sandbox_uid(uid: u32) -> bool {
    (FIRST_SANDBOX_UID..FIRST_SANDBOX_UID + SANDBOX_UIDS).contains(&uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_are_unique_until_released() {
        let t = tempfile::tempdir().expect("a temp dir");
        let pool = UidPool::open(&t.path().join("uids")).expect("pool");
        let a = pool.claim("sbx_a").expect("claim");
        let b = pool.claim("sbx_a").expect("claim");
        assert_ne!(a, b, "the same owner twice still gets two ids");
        assert!(is_sandbox_uid(a) && is_sandbox_uid(b));
        assert!(pool.is_claimed(a));
        let c = pool.claim("sbx_c").expect("claim");
        assert_eq!(pool.find("sbx_c"), Some(c));
        assert_eq!(pool.find("sbx_none"), None);
        pool.release(a).expect("release");
        assert!(!pool.is_claimed(a));
        pool.release(a).expect("releasing twice is fine");
    }
}
