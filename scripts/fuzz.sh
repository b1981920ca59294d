#!/usr/bin/env bash
# Runs StacyVM's cargo-fuzz targets (fuzz/) for a bounded time each.
#
#   scripts/fuzz.sh TARGET [SECONDS]   one target (default 60 s)
#   scripts/fuzz.sh all [SECONDS]      every target, SECONDS each
#   scripts/fuzz.sh list               the target names
#
# Targets: frame_decoder (agent protocol frames and messages), path_resolve
# (sandbox path validation and resolution over symlink traps), glob_pattern
# (the agent's glob), image_tar (the image catalog's tar check and unpack).
# cargo-fuzz needs nightly features; on a stable toolchain RUSTC_BOOTSTRAP=1
# unlocks them. New inputs go to fuzz/corpus/TARGET (git-ignored); a crash is
# saved under fuzz/artifacts/TARGET and the script fails. Replay the seeds
# and corpus on stable with: cargo test --manifest-path fuzz/Cargo.toml
set -euo pipefail
root_dir="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root_dir"
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

targets=(frame_decoder path_resolve glob_pattern image_tar)
target="${1:-}"
seconds="${2:-60}"
case "$target" in
  list) printf '%s\n' "${targets[@]}"; exit 0 ;;
  all) run=("${targets[@]}") ;;
  frame_decoder|path_resolve|glob_pattern|image_tar) run=("$target") ;;
  *) echo "usage: scripts/fuzz.sh TARGET|all|list [SECONDS]  (targets: ${targets[*]})" >&2; exit 2 ;;
esac
case "$seconds" in
  ''|*[!0-9]*) echo "SECONDS must be a whole number, not $seconds" >&2; exit 2 ;;
esac

ensure_cargo
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

# The targets make their trap trees and catalogs under TMPDIR; give them one
# that is removed whatever happens.
scratch="$(mktemp -d -t stacyvm-fuzz.XXXXXX)"
trap 'rm -rf "$scratch"' EXIT

log "building the fuzz targets"
# Release code with debug assertions and overflow checks, under AddressSanitizer.
cargo fuzz build --fuzz-dir fuzz
for t in "${run[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  log "fuzzing $t for ${seconds}s"
  # -timeout: one input taking longer is a hang, reported as a crash.
  TMPDIR="$scratch" cargo fuzz run --fuzz-dir fuzz "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 -print_final_stats=1
done
