#!/usr/bin/env bash
# The whole reliability and security run, longer than CI's share of it:
# the security suite (containment, keys, crashes and faults), API fuzzing
# with more examples, every cargo-fuzz target for a while, and the 5-minute
# soak. Results and commands are described in docs/TESTING.md and
# docs/SECURITY.md.
#
#   scripts/reliability.sh [FUZZ_SECONDS_PER_TARGET] [SOAK_SECONDS]   defaults: 60 300
set -euo pipefail
root_dir="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root_dir"
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
fuzz_secs="${1:-60}"
soak_secs="${2:-300}"

prepare_test_env "$root_dir"
cargo build -q -p stacyvm
export STACYVM_BIN="$root_dir/target/debug/stacyvm"

log "security suite"
cargo nextest run -p stacyvm --test security --no-fail-fast
log "API fuzzing (schemathesis, 500 examples per operation)"
scripts/fuzz-api.sh 500
log "fuzz targets, ${fuzz_secs} s each"
scripts/fuzz.sh all "$fuzz_secs"
log "soak, ${soak_secs} s"
# cargo test, not nextest: nextest's slow-test limit would end a long soak.
STACYVM_SOAK_SECS="$soak_secs" cargo test -q -p stacyvm --test soak -- --nocapture
