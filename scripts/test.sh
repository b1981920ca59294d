#!/usr/bin/env bash
# Runs StacyVM's whole test suite against real components: installs what is
# missing (docker.io, proot, busybox-static, PostgreSQL), starts dockerd and
# PostgreSQL when they are not running, builds the static agent and the
# busybox test image, then runs formatting and lint checks, every Rust test
# (nextest) and the Python SDK's tests.
set -euo pipefail
root_dir="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root_dir"
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

ensure_cargo
ensure_runtime_packages
ensure_packages python3-venv sqlite3 2>/dev/null || true
ensure_dockerd

STACYVM_TEST_POSTGRES_URL="$(scripts/start-postgres.sh)"
export STACYVM_TEST_POSTGRES_URL
STACYVM_AGENT_BIN="$(scripts/build-agent.sh)"
export STACYVM_AGENT_BIN
export STACYVM_TEST_IMAGE_TAR="$root_dir/target/test-images/busybox.tar"
scripts/build-test-image.sh --docker "$STACYVM_TEST_IMAGE_TAR"

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy -q --workspace --all-targets -- -D warnings

log "building"
cargo build -q --workspace
export STACYVM_BIN="$root_dir/target/debug/stacyvm"

log "API fuzzing (schemathesis, 100 examples per operation)"
scripts/fuzz-api.sh 100
log "fuzz target seed replay"
cargo test -q --manifest-path fuzz/Cargo.toml

log "Python SDK tests"
if [ ! -x .venv/bin/pytest ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q ./sdk/python -r sdk/python/requirements-test.txt
else
  .venv/bin/pip install -q --no-deps --force-reinstall ./sdk/python
fi
.venv/bin/pytest -q sdk/python/tests

log "Rust tests"
cargo nextest run --workspace --no-fail-fast
