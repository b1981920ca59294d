//! The glob check: the agent's `glob` over a tree of symlink traps. Every
//! pattern is answered or refused with `invalid_request`; every path answered
//! is normalised, sorted, exists, and resolves inside the root.

use stacyvm_agent::files;
use stacyvm_agent::root::Root;
use stacyvm_core::Error;

use crate::tree::{inside_root, is_normal, tree};

/// Longest pattern tried: longer ones only slow the fuzzer down on the
/// regex compiler without reaching new agent code.
const MAX_PATTERN: usize = 512;

/// Checks one input (the pattern); panics on a finding.
pub fn check(data: &[u8]) {
    if data.len() > MAX_PATTERN {
        return;
    }
    let pattern = String::from_utf8_lossy(data);
    let t = tree();
    let root = Root::new(&t.root);
    match files::glob(&root, &pattern) {
        Ok(paths) => {
            assert!(
                paths.windows(2).all(|w| w[0] < w[1]),
                "glob({pattern:?}) is not sorted and unique: {paths:?}"
            );
            for p in &paths {
                assert!(is_normal(p), "glob({pattern:?}) gave {p:?}");
                let r = root
                    .resolve(p, false)
                    .unwrap_or_else(|e| panic!("glob({pattern:?}) gave {p:?}, which fails: {e}"));
                assert!(
                    r.exists,
                    "glob({pattern:?}) gave {p:?}, which does not exist"
                );
                // The root itself has the host above it; anything else is
                // checked through its parent (a matched symlink is not followed).
                let parent = match r.host.parent() {
                    Some(parent) if r.inner != "/" => parent,
                    _ => r.host.as_path(),
                };
                assert!(
                    inside_root(t, parent),
                    "glob({pattern:?}) gave {p:?} at {:?}, outside the root",
                    r.host
                );
            }
        }
        Err(Error::InvalidRequest(_)) => {}
        Err(e) => panic!("glob({pattern:?}) failed with an unexpected error: {e:?}"),
    }
}
