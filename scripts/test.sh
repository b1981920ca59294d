#!/usr/bin/env bash
# Runs StacyVM's whole test suite against real components: installs what is
# missing (docker.io, proot, busybox-static, PostgreSQL), starts dockerd and
# PostgreSQL when they are not running, builds the static agent and the
# busybox test image, then runs formatting and lint checks, every Rust test
# (nextest), the Python SDK's tests and the E2B SDK's tests.
set -euo pipefail
root_dir="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root_dir"
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

python3 scripts/gen-python-models.py --check
python3 scripts/gen-python-sync.py --check
prepare_test_env "$root_dir"

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy -q --workspace --all-targets -- -D warnings

log "building"
# Every target, so the crates are built once with the features the tests
# unify in (e.g. the fake provider of the control plane's tests) and the
# test run below reuses them.
cargo build -q --workspace --all-targets
export STACYVM_BIN="$root_dir/target/debug/stacyvm"

log "API fuzzing (schemathesis, 100 examples per operation)"
scripts/fuzz-api.sh 100
log "fuzz target seed replay"
cargo test -q --manifest-path fuzz/Cargo.toml

log "Python SDK tests"
if [ ! -x .venv/bin/pytest ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q ./sdk/python -r sdk/python/requirements-test.txt -r tests/e2b/requirements.txt
else
  .venv/bin/pip install -q --no-deps --force-reinstall ./sdk/python
  .venv/bin/pip install -q -r tests/e2b/requirements.txt
fi
.venv/bin/pytest -q sdk/python/tests

log "E2B SDK against the E2B-compatible API"
# The unmodified `e2b` package (pinned below 3 in tests/e2b/requirements.txt);
# the E2B base image is built from Debian packages by scripts/build-e2b-image.sh.
.venv/bin/pytest -q tests/e2b

log "Rust tests"
cargo nextest run --workspace --no-fail-fast

log "API suite against a control plane with two remote workers"
# The same tests, with every server they start served by two
# `stacyvm worker` processes instead of its in-process worker.
# (`--workspace` with a filter, so the test binaries built above are reused.)
STACYVM_TEST_TOPOLOGY=workers cargo nextest run --workspace --no-fail-fast -E 'binary_id(stacyvm::api)'
