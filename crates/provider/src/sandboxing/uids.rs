//! Host user ids for sandboxes: each sandbox runs as a user of its own (or,
//! in a user namespace, as a block of users of its own), so the kernel's
//! ordinary permission checks keep it away from the server's files and
//! processes and from every other sandbox.
//!
//! Ids come from ranges no distribution hands out to accounts, and are
//! claimed host-wide by creating a file named after the (first) id with
//! `O_EXCL` in a root-only directory, so several servers on one host never
//! share one. Single ids and blocks come from separate ranges.

use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The first id of the range.
pub const FIRST_SANDBOX_UID: u32 = 1_800_000_000;
/// How many ids the range holds.
pub const SANDBOX_UIDS: u32 = 1 << 24;

/// The first id of the range blocks are claimed from (above the range of
/// single ids, below 2^31 so that no tool mistakes an id for a negative
/// number).
pub const FIRST_SANDBOX_BLOCK_UID: u32 = 1_900_000_000;
/// Ids per block: a user namespace mapping 0..65535 inside, as a
/// container's user namespace usually does.
pub const SANDBOX_BLOCK_IDS: u32 = 1 << 16;
/// How many blocks the block range holds.
pub const SANDBOX_BLOCKS: u32 = 2048;

/// Claims and releases sandbox user ids (or blocks of them) under one
/// directory.
#[derive(Clone, Debug)]
pub struct UidPool {
    dir: PathBuf,
    /// The first id of the pool's range.
    first: u32,
    /// Ids per claim.
    ids: u32,
    /// How many claims the range holds.
    slots: u32,
}

impl UidPool {
    /// Single ids, claimed under (and created, mode 0700) `dir`.
    pub fn open(dir: &Path) -> io::Result<UidPool> {
        UidPool::open_with(dir, FIRST_SANDBOX_UID, 1, SANDBOX_UIDS)
    }

    /// Blocks of [`SANDBOX_BLOCK_IDS`] ids, claimed under `dir`; a claim
    /// returns the block's first id.
    pub fn open_blocks(dir: &Path) -> io::Result<UidPool> {
        UidPool::open_with(
            dir,
            FIRST_SANDBOX_BLOCK_UID,
            SANDBOX_BLOCK_IDS,
            SANDBOX_BLOCKS,
        )
    }

    fn open_with(dir: &Path, first: u32, ids: u32, slots: u32) -> io::Result<UidPool> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        Ok(UidPool {
            dir: dir.to_path_buf(),
            first,
            ids,
            slots,
        })
    }

    /// Ids per claim.
    pub fn ids_per_claim(&self) -> u32 {
        self.ids
    }

    fn claim_path(&self, uid: u32) -> PathBuf {
        self.dir.join(uid.to_string())
    }

    /// Claims a free id (or block) for `owner` (written into the claim, for
    /// people looking at the host), starting the search at a point derived
    /// from it. Returns the (first) id.
    pub fn claim(&self, owner: &str) -> io::Result<u32> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        owner.hash(&mut h);
        std::process::id().hash(&mut h);
        let start = (h.finish() % u64::from(self.slots)) as u32;
        for i in 0..self.slots.min(4096) {
            let uid = self.first + (start.wrapping_add(i) % self.slots) * self.ids;
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

    /// Releases `uid` (a block by its first id). Releasing an id that is
    /// not claimed is success.
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

/// Whether `uid` lies in the range of single sandbox ids.
pub fn is_sandbox_uid(uid: u32) -> bool {
    (FIRST_SANDBOX_UID..FIRST_SANDBOX_UID + SANDBOX_UIDS).contains(&uid)
}

/// Whether `uid` lies in the range of sandbox blocks.
pub fn is_sandbox_block_uid(uid: u32) -> bool {
    let end = u64::from(FIRST_SANDBOX_BLOCK_UID)
        + u64::from(SANDBOX_BLOCK_IDS) * u64::from(SANDBOX_BLOCKS);
    uid >= FIRST_SANDBOX_BLOCK_UID && u64::from(uid) < end
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

    #[test]
    fn blocks_are_aligned_disjoint_and_apart_from_single_ids() {
        let t = tempfile::tempdir().expect("a temp dir");
        let pool = UidPool::open_blocks(&t.path().join("blocks")).expect("pool");
        assert_eq!(pool.ids_per_claim(), SANDBOX_BLOCK_IDS);
        let a = pool.claim("sbx_a").expect("claim");
        let b = pool.claim("sbx_a").expect("claim");
        assert_ne!(a, b);
        for first in [a, b] {
            assert_eq!((first - FIRST_SANDBOX_BLOCK_UID) % SANDBOX_BLOCK_IDS, 0);
            let last = first + (SANDBOX_BLOCK_IDS - 1);
            assert!(is_sandbox_block_uid(first) && is_sandbox_block_uid(last));
            assert!(!is_sandbox_uid(first) && !is_sandbox_uid(last));
            assert!(last < 1 << 31);
        }
        assert!(a.abs_diff(b) >= SANDBOX_BLOCK_IDS, "blocks overlap");
        assert_eq!(pool.find("sbx_a").map(|f| f == a || f == b), Some(true));
        pool.release(a).expect("release");
        assert!(!pool.is_claimed(a) && pool.is_claimed(b));
    }
}
