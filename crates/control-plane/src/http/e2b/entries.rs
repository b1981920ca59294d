//! envd's `EntryInfo`, as E2B's envd fills it: owner and group by name
//! (looked up in the sandbox's own `/etc/passwd` and `/etc/group`, the
//! number when an id has no name), `mode` as the permission bits,
//! `permissions` in Go's `FileMode` spelling, and a symlink described by
//! what it points to (the target's type and permission bits, and the
//! resolved target path) while its name, size and `permissions` stay the
//! link's own.

use std::collections::HashMap;

use futures_util::StreamExt;
use serde_json::{json, Value};
use stacyvm_core::files::FileType;
use stacyvm_core::FileEntry;
use time::format_description::well_known::Rfc3339;

use super::envd::Caller;
use crate::http::AppState;

/// Largest account file (`/etc/passwd`, `/etc/group`) read for names.
const MAX_ACCOUNT_FILE: usize = 1 << 20;
/// Links followed from one symlink before it counts as unresolvable, as
/// the kernel's own limit on nested links.
const MAX_LINK_HOPS: usize = 40;
/// Symlinks of one listing resolved at once.
const LINKS_AT_ONCE: usize = 16;

/// The names of a sandbox's users and groups, by id.
#[derive(Default)]
pub(super) struct Owners {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
}

impl Owners {
    /// Read from the sandbox. An unreadable file leaves ids as numbers,
    /// as envd's lookup does when the account database lacks them.
    async fn of(s: &AppState, c: &Caller) -> Owners {
        Owners {
            users: account_names(s, c, "/etc/passwd").await,
            groups: account_names(s, c, "/etc/group").await,
        }
    }

    fn name(names: &HashMap<u32, String>, id: Option<u32>) -> String {
        match id {
            Some(id) => names.get(&id).cloned().unwrap_or_else(|| id.to_string()),
            // An agent that does not report ids.
            None => String::new(),
        }
    }
}

pub(super) async fn account_names(s: &AppState, c: &Caller, path: &str) -> HashMap<u32, String> {
    let Ok(mut stream) = s.app.file_read(c.who(), c.sandbox(), path).await else {
        return HashMap::new();
    };
    let mut buf = Vec::new();
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else {
            return HashMap::new();
        };
        let room = MAX_ACCOUNT_FILE.saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if room <= chunk.len() {
            // What fits is still names; the rest is left unread.
            break;
        }
    }
    parse_accounts(&String::from_utf8_lossy(&buf))
}

/// `name:password:id:…` lines; the first name of an id wins, as in
/// `getpwuid`.
fn parse_accounts(text: &str) -> HashMap<u32, String> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let mut fields = line.split(':');
        let (Some(name), Some(_), Some(id)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        let name = name.trim();
        if name.is_empty() || name.starts_with('#') || name.starts_with(['+', '-']) {
            continue;
        }
        if let Ok(id) = id.trim().parse::<u32>() {
            out.entry(id).or_insert_with(|| name.to_owned());
        }
    }
    out
}

/// Where a symlink leads: the path it resolves to and that path's entry,
/// `None` when the chain is broken, too long, or leaves the sandbox's paths.
struct LinkTarget {
    path: String,
    entry: Option<FileEntry>,
}

/// Follows `link` inside the sandbox, one hop per agent call (each hop is
/// resolved by the agent within the sandbox's root, so a chain cannot lead
/// out of it).
async fn follow(s: &AppState, c: &Caller, link: &FileEntry) -> LinkTarget {
    let mut at = link.path.clone();
    let mut raw = link.symlink_target.clone();
    for _ in 0..MAX_LINK_HOPS {
        let Some(target) = raw.take() else {
            break;
        };
        let next = if target.starts_with('/') {
            target
        } else {
            let parent = at.rsplit_once('/').map_or("", |(p, _)| p);
            format!("{parent}/{target}")
        };
        let Ok(next) = stacyvm_core::validate_sandbox_path(&next) else {
            break;
        };
        match s.app.file_stat(c.who(), c.sandbox(), &next).await {
            Ok(e) if e.file_type == FileType::Symlink => {
                raw = e.symlink_target.clone();
                at = next;
            }
            Ok(e) => {
                return LinkTarget {
                    path: next,
                    entry: Some(e),
                }
            }
            Err(_) => break,
        }
    }
    // envd names the link itself when its target cannot be resolved.
    LinkTarget {
        path: link.path.clone(),
        entry: None,
    }
}

/// `EntryInfo`s of `entries`, in order.
pub(super) async fn entry_infos(s: &AppState, c: &Caller, entries: &[FileEntry]) -> Vec<Value> {
    let owners = Owners::of(s, c).await;
    let shown: Vec<_> = entries.iter().map(|e| shown(s, c, &owners, e)).collect();
    futures_util::stream::iter(shown)
        .buffered(LINKS_AT_ONCE)
        .collect()
        .await
}

async fn shown(s: &AppState, c: &Caller, owners: &Owners, e: &FileEntry) -> Value {
    let link = match e.file_type {
        FileType::Symlink => Some(follow(s, c, e).await),
        _ => None,
    };
    entry_info(e, owners, link.as_ref())
}

/// One `EntryInfo`.
pub(super) async fn entry_info_of(s: &AppState, c: &Caller, e: &FileEntry) -> Value {
    entry_infos(s, c, std::slice::from_ref(e))
        .await
        .pop()
        .unwrap_or(Value::Null)
}

fn file_type_name(t: FileType) -> Option<&'static str> {
    match t {
        FileType::File => Some("FILE_TYPE_FILE"),
        FileType::Dir => Some("FILE_TYPE_DIRECTORY"),
        FileType::Symlink => Some("FILE_TYPE_SYMLINK"),
        FileType::Other => None,
    }
}

fn mode_bits(e: &FileEntry) -> u32 {
    u32::from_str_radix(&e.mode, 8).unwrap_or(0)
}

/// Permissions as Go's `FileMode.String` writes them: type and special
/// bits as letters (`d`, `L`, `u`, `g`, `t`, `?`, or `-` for none), then
/// `rwx` three times.
fn permissions(file_type: FileType, mode: u32) -> String {
    let mut out = String::with_capacity(13);
    match file_type {
        FileType::Dir => out.push('d'),
        FileType::Symlink => out.push('L'),
        FileType::File => {}
        FileType::Other => {}
    }
    if mode & 0o4000 != 0 {
        out.push('u');
    }
    if mode & 0o2000 != 0 {
        out.push('g');
    }
    if mode & 0o1000 != 0 {
        out.push('t');
    }
    if file_type == FileType::Other {
        out.push('?');
    }
    if out.is_empty() {
        out.push('-');
    }
    for shift in [6u32, 3, 0] {
        let bits = (mode >> shift) & 7;
        out.push(if bits & 4 != 0 { 'r' } else { '-' });
        out.push(if bits & 2 != 0 { 'w' } else { '-' });
        out.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    out
}

fn entry_info(e: &FileEntry, owners: &Owners, link: Option<&LinkTarget>) -> Value {
    let own_mode = mode_bits(e);
    let (file_type, mode) = match link {
        None => (file_type_name(e.file_type), own_mode & 0o777),
        Some(LinkTarget { entry: Some(t), .. }) => {
            (file_type_name(t.file_type), mode_bits(t) & 0o777)
        }
        Some(LinkTarget { entry: None, .. }) => (None, 0),
    };
    let mut v = json!({
        "name": e.name,
        "path": e.path,
        "size": e.size.to_string(),
        "mode": mode,
        "permissions": permissions(e.file_type, own_mode),
        "owner": Owners::name(&owners.users, e.uid),
        "group": Owners::name(&owners.groups, e.gid),
        "modifiedTime": e.mtime.format(&Rfc3339).unwrap_or_default(),
    });
    if let Some(t) = file_type {
        v["type"] = json!(t);
    }
    if let Some(l) = link {
        v["symlinkTarget"] = json!(l.path);
    }
    let metadata = metadata_of(&e.xattrs);
    if !metadata.is_empty() {
        v["metadata"] = json!(metadata);
    }
    v
}

/// Where E2B file metadata lives: the extended attribute `user.e2b.KEY`
/// holds the value of `KEY`, as in envd.
pub(super) const METADATA_XATTR: &str = "user.e2b.";

/// The E2B metadata among a file's extended attributes (set by an upload
/// or by anything in the sandbox).
pub(super) fn metadata_of(
    xattrs: &std::collections::BTreeMap<String, String>,
) -> std::collections::BTreeMap<&str, &str> {
    xattrs
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(METADATA_XATTR)?, v.as_str())))
        .filter(|(k, _)| !k.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_read_as_go_writes_them() {
        assert_eq!(permissions(FileType::File, 0o644), "-rw-r--r--");
        assert_eq!(permissions(FileType::Dir, 0o755), "drwxr-xr-x");
        assert_eq!(permissions(FileType::Dir, 0o1777), "dtrwxrwxrwx");
        assert_eq!(permissions(FileType::File, 0o4755), "urwxr-xr-x");
        assert_eq!(permissions(FileType::Symlink, 0o777), "Lrwxrwxrwx");
        assert_eq!(permissions(FileType::Other, 0o600), "?rw-------");
    }

    #[test]
    fn account_files_map_ids_to_their_first_name() {
        let names = parse_accounts(
            "root:x:0:0:root:/root:/bin/sh\n# comment\nuser:x:1000:1000::/home/user:/bin/bash\n\
             alias:x:1000:1000::/:/bin/sh\nbroken\n+nis::::\nodd:x:notanumber:0::/:\n",
        );
        assert_eq!(names.get(&0).map(String::as_str), Some("root"));
        assert_eq!(names.get(&1000).map(String::as_str), Some("user"));
        assert_eq!(names.len(), 2);
        let owners = Owners {
            users: names,
            groups: HashMap::new(),
        };
        assert_eq!(Owners::name(&owners.users, Some(1000)), "user");
        assert_eq!(Owners::name(&owners.users, Some(4242)), "4242");
        assert_eq!(Owners::name(&owners.groups, None), "");
    }
}
