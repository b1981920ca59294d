//! The accounts of the sandbox: who a command runs as and who a new file
//! belongs to, looked up in the sandbox's own `/etc/passwd` (never the
//! host's, and without NSS: an image's passwd file is the whole truth).

use std::fs;
use std::io::Read;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use stacyvm_core::{Error, Result};

use crate::root::{io_error, Root};

/// Largest `/etc/passwd` read.
const MAX_PASSWD: u64 = 4 << 20;

/// An account of the sandbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

/// `user` as the sandbox knows it: a name of its `/etc/passwd`, or a
/// numeric uid (which need not be listed: its gid is then the same number
/// and its home `/`).
pub fn lookup(root: &Root, user: &str) -> Result<Account> {
    if user.is_empty() || user.len() > 256 || user.contains(['\0', ':', '\n']) {
        return Err(Error::InvalidRequest(format!(
            "user {user:?} is not a user name or uid"
        )));
    }
    let text = read_passwd(root)?;
    let numeric = user.parse::<u32>().ok();
    let found = text.lines().filter_map(parse_line).find(|a| match numeric {
        Some(uid) => a.uid == uid,
        None => a.name == user,
    });
    match (found, numeric) {
        (Some(a), _) => Ok(a),
        (None, Some(uid)) => Ok(Account {
            name: user.to_owned(),
            uid,
            gid: uid,
            home: "/".into(),
        }),
        (None, None) => Err(Error::InvalidRequest(format!(
            "the sandbox has no user {user:?} (its /etc/passwd does not list it)"
        ))),
    }
}

fn read_passwd(root: &Root) -> Result<String> {
    let r = root.resolve("/etc/passwd", true)?;
    if !r.exists {
        return Ok(String::new());
    }
    let mut text = String::new();
    fs::File::open(&r.host)
        .and_then(|f| f.take(MAX_PASSWD).read_to_string(&mut text))
        .map_err(|e| io_error("/etc/passwd", e))?;
    Ok(text)
}

/// One `name:x:uid:gid:gecos:home:shell` line.
fn parse_line(line: &str) -> Option<Account> {
    let f: Vec<&str> = line.split(':').collect();
    if f.len() < 7 || f[0].is_empty() || f[0].starts_with('#') {
        return None;
    }
    Some(Account {
        name: f[0].to_owned(),
        uid: f[2].parse().ok()?,
        gid: f[3].parse().ok()?,
        home: if f[5].is_empty() { "/" } else { f[5] }.to_owned(),
    })
}

/// Gives `path` (not following a symlink) to `owner`.
pub fn give(path: &Path, logical: &str, owner: &Account) -> Result<()> {
    std::os::unix::fs::lchown(path, Some(owner.uid), Some(owner.gid)).map_err(|e| {
        Error::Conflict(format!(
            "{logical} could not be given to user {} (uid {}): {e}; this sandbox cannot switch \
             users",
            owner.name, owner.uid
        ))
    })
}

/// `mkdir -p` of `host` (already resolved inside the root), giving each
/// directory it creates to `owner`; those that exist keep theirs.
pub fn make_dirs_owned(host: &Path, logical: &str, mode: u32, owner: &Account) -> Result<()> {
    let mut missing: Vec<PathBuf> = Vec::new();
    let mut at = Some(host);
    while let Some(p) = at {
        match fs::symlink_metadata(p) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => {
                return Err(Error::InvalidRequest(format!(
                    "{logical}: a parent of it is not a directory"
                )))
            }
            Err(_) => missing.push(p.to_path_buf()),
        }
        at = p.parent();
    }
    for dir in missing.iter().rev() {
        match fs::DirBuilder::new().mode(mode).create(dir) {
            Ok(()) => give(dir, logical, owner)?,
            // Made by someone else meanwhile: theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if !fs::metadata(dir).is_ok_and(|m| m.is_dir()) {
                    return Err(Error::InvalidRequest(format!(
                        "{logical}: a parent of it is not a directory"
                    )));
                }
            }
            Err(e) => return Err(io_error(logical, e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root_with(passwd: &str) -> (tempfile::TempDir, Root) {
        let d = tempfile::tempdir().expect("tempdir");
        fs::create_dir(d.path().join("etc")).expect("etc");
        fs::write(d.path().join("etc/passwd"), passwd).expect("passwd");
        let root = Root::new(d.path());
        (d, root)
    }

    #[test]
    fn names_and_uids_are_found_in_the_sandboxes_passwd() {
        let (_d, root) = root_with(
            "root:x:0:0:root:/root:/bin/sh\n# a comment\nbroken\nuser:x:1000:1001::/home/user:/bin/bash\n",
        );
        let u = lookup(&root, "user").expect("user");
        assert_eq!((u.uid, u.gid, u.home.as_str()), (1000, 1001, "/home/user"));
        assert_eq!(lookup(&root, "1000").expect("by uid").name, "user");
        let n = lookup(&root, "4242").expect("an unlisted uid");
        assert_eq!((n.uid, n.gid, n.home.as_str()), (4242, 4242, "/"));
        let e = lookup(&root, "nobody").expect_err("not listed");
        assert!(e.to_string().contains("no user \"nobody\""), "{e}");
        assert!(lookup(&root, "a:b").is_err());
        assert!(lookup(&root, "").is_err());
    }

    #[test]
    fn a_missing_passwd_knows_only_uids() {
        let d = tempfile::tempdir().expect("tempdir");
        let root = Root::new(d.path());
        assert!(lookup(&root, "user").is_err());
        assert_eq!(lookup(&root, "0").expect("uid 0").uid, 0);
    }
}
