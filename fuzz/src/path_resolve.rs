//! The path check: `validate_sandbox_path` and the agent's resolution of a
//! sandbox path inside its root, over a tree of symlink traps. Whatever the
//! path, the result stays inside the root.

use stacyvm_agent::root::Root;
use stacyvm_core::{validate_sandbox_path, Error};

use crate::tree::{inside_root, is_normal, tree};

/// Checks one input (first byte: follow the last symlink; the rest: the
/// path); panics on a finding.
pub fn check(data: &[u8]) {
    let Some((&flags, path)) = data.split_first() else {
        return;
    };
    let follow_last = flags & 1 == 1;
    let path = String::from_utf8_lossy(path);
    let t = tree();

    let validated = validate_sandbox_path(&path);
    if let Ok(v) = &validated {
        assert!(is_normal(v), "validate_sandbox_path({path:?}) gave {v:?}");
        assert_eq!(
            validate_sandbox_path(v).as_ref(),
            Ok(v),
            "validation is idempotent"
        );
    }

    let root = Root::new(&t.root);
    match root.resolve(&path, follow_last) {
        Ok(r) => {
            assert_eq!(
                Some(&r.logical),
                validated.as_ref().ok(),
                "resolve names the path as validation does"
            );
            assert!(is_normal(&r.inner), "resolved inner path {:?}", r.inner);
            assert_eq!(r.host, root.host_path(&r.inner));
            assert!(r.host.starts_with(&t.root), "{:?} left the root", r.host);
            // The host must not reach outside either, even through what
            // resolve left unresolved (the last link when not following).
            let checked = if follow_last {
                r.host.as_path()
            } else {
                r.host.parent().unwrap_or(&r.host)
            };
            if r.inner != "/" || follow_last {
                assert!(
                    inside_root(t, checked),
                    "{path:?} (follow {follow_last}) resolves to {:?}, outside the root",
                    checked
                );
            }
        }
        Err(Error::InvalidRequest(_)) | Err(Error::NotFound(_)) => {}
        Err(e) => panic!("resolve({path:?}) failed with an unexpected error: {e:?}"),
    }
}
