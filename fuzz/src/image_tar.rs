//! The image tar check: arbitrary bytes imported as a root filesystem tar
//! through the image catalog (checked, then unpacked). Every input is either
//! refused with `invalid_request` or unpacked entirely inside its version
//! directory: nothing lands beside the catalog, and nothing in the unpacked
//! tree sits under a directory that resolves outside it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use bytes::Bytes;
use stacyvm_core::{ByteStream, Error};
use stacyvm_provider::images::ImageCatalog;

struct Env {
    /// Kept alive for the life of the process; the fuzz script runs with a
    /// `TMPDIR` of its own and removes it afterwards.
    _dir: tempfile::TempDir,
    /// Beside the catalog: must stay empty.
    canary: PathBuf,
    top: PathBuf,
    catalog: ImageCatalog,
    rt: tokio::runtime::Runtime,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("stacyvm-fuzz-tar-")
            .tempdir()
            .expect("a temporary directory can be made in TMPDIR");
        let top = dir.path().to_path_buf();
        let canary = top.join("canary");
        std::fs::create_dir(&canary).expect("the canary directory can be made");
        let catalog = ImageCatalog::open(&top.join("catalog")).expect("the catalog opens");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime builds");
        Env {
            _dir: dir,
            canary,
            top,
            catalog,
            rt,
        }
    })
}

/// Checks one input (the tar bytes); panics on a finding.
pub fn check(data: &[u8]) {
    let env = env();
    let body: ByteStream = Box::pin(futures_util::stream::iter(vec![Ok::<_, std::io::Error>(
        Bytes::copy_from_slice(data),
    )]));
    let result = env.rt.block_on(env.catalog.import("fuzz", body));
    match result {
        Ok(_) => {
            let rootfs = env
                .rt
                .block_on(env.catalog.rootfs("fuzz"))
                .expect("an imported image has a rootfs");
            let real = rootfs.canonicalize().expect("the rootfs exists");
            assert_tree_inside(&rootfs, &real);
            env.rt
                .block_on(env.catalog.delete("fuzz"))
                .expect("an imported image can be deleted");
        }
        Err(Error::InvalidRequest(_)) => {}
        Err(e) => panic!("a tar of {} bytes failed with {e:?}", data.len()),
    }
    let beside: Vec<_> = std::fs::read_dir(&env.top)
        .expect("the fuzz directory is readable")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        beside.len() == 2,
        "the import wrote beside the catalog: {beside:?}"
    );
    assert!(
        std::fs::read_dir(&env.canary)
            .expect("the canary is readable")
            .next()
            .is_none(),
        "the import wrote into a directory beside the catalog"
    );
}

/// Every entry under `dir` has a parent that resolves inside `root_real`.
fn assert_tree_inside(dir: &Path, root_real: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let parent = dir.canonicalize().expect("a directory we listed resolves");
        assert!(
            parent.starts_with(root_real),
            "{} was unpacked under {}, outside the rootfs",
            path.display(),
            parent.display()
        );
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            assert_tree_inside(&path, root_real);
        }
    }
}
