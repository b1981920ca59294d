//! A small sandbox root full of traps (symlinks that climb, loop, point at
//! host paths), shared by the path and glob checks, with a sibling directory
//! standing for the host that must never be reached.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The trap tree: `root` is the sandbox root, `outside` a host directory
/// beside it holding `secret`.
pub struct Tree {
    /// Kept alive for the life of the process; the fuzz script runs with a
    /// `TMPDIR` of its own and removes it afterwards.
    _dir: tempfile::TempDir,
    pub root: PathBuf,
    /// `root`, canonicalised.
    pub root_real: PathBuf,
}

/// The tree, built on first use.
pub fn tree() -> &'static Tree {
    static TREE: OnceLock<Tree> = OnceLock::new();
    TREE.get_or_init(|| build().expect("the trap tree can be built in TMPDIR"))
}

fn build() -> std::io::Result<Tree> {
    let dir = tempfile::Builder::new().prefix("stacyvm-fuzz-").tempdir()?;
    let root = dir.path().join("root");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(root.join("a/b/c"))?;
    std::fs::create_dir_all(root.join("work/src/deep"))?;
    std::fs::create_dir_all(&outside)?;
    std::fs::write(outside.join("secret"), b"host secret")?;
    std::fs::write(root.join("file"), b"x")?;
    std::fs::write(root.join("a/b/c/file.py"), b"x")?;
    std::fs::write(root.join("work/src/main.py"), b"x")?;
    std::fs::write(root.join("work/src/deep/mod.py"), b"x")?;
    std::fs::write(root.join("work/[x].txt"), b"x")?;
    let links: &[(&str, &str)] = &[
        ("../../..", "a/b/up"),
        ("/a/b", "a/abs"),
        ("/etc", "etc-link"),
        ("../../../../../../../../etc", "escape"),
        ("../outside", "out"),
        ("../outside/secret", "secret-link"),
        ("loop2", "loop1"),
        ("loop1", "loop2"),
        (".", "self"),
        ("a", "dir-link"),
        ("file", "file-link"),
        ("/nonexistent/x", "dangling"),
        ("/work/src", "work/src-link"),
        ("..", "work/src/deep/parent"),
    ];
    for (target, link) in links {
        symlink(target, root.join(link))?;
    }
    let root_real = root.canonicalize()?;
    Ok(Tree {
        _dir: dir,
        root,
        root_real,
    })
}

/// Whether a host path is inside the root once the host resolves it.
pub fn inside_root(tree: &Tree, host: &Path) -> bool {
    match host.canonicalize() {
        Ok(real) => real.starts_with(&tree.root_real),
        // Missing (dangling or not created): nothing to reach.
        Err(_) => true,
    }
}

/// A normalised sandbox path: `/` or `/`-joined components, none of them
/// empty, `.` or `..`.
pub fn is_normal(path: &str) -> bool {
    path == "/"
        || (path.starts_with('/')
            && path[1..]
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != ".."))
}
