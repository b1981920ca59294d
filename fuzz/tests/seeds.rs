//! Replays every committed seed (`seeds/TARGET/`) and any local corpus or
//! crash artifact (`corpus/TARGET/`, `artifacts/TARGET/`) through the fuzz
//! checks on stable Rust, so a fixed finding stays fixed.

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let base = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut seen = 0usize;
    for dir in ["seeds", "corpus", "artifacts"] {
        let Ok(entries) = std::fs::read_dir(base.join(dir).join(target)) else {
            continue;
        };
        for entry in entries.flatten() {
            let data = std::fs::read(entry.path()).expect("a seed file is readable");
            check(&data);
            seen += 1;
        }
    }
    assert!(seen > 0, "no seeds for {target} under seeds/{target}");
}

#[test]
fn frame_decoder_seeds() {
    replay("frame_decoder", stacyvm_fuzz::frame_decoder::check);
}

#[test]
fn path_resolve_seeds() {
    replay("path_resolve", stacyvm_fuzz::path_resolve::check);
}

#[test]
fn glob_pattern_seeds() {
    replay("glob_pattern", stacyvm_fuzz::glob_pattern::check);
}

#[test]
fn image_tar_seeds() {
    replay("image_tar", stacyvm_fuzz::image_tar::check);
}
