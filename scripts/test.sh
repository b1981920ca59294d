#!/usr/bin/env bash
# Runs StacyVM's whole test suite against real components: installs what is
# missing (docker.io, proot, busybox-static, PostgreSQL), starts dockerd and
# PostgreSQL when they are not running, builds the static agent and the
# busybox test image, then runs formatting and lint checks, every Rust test
# (nextest), the Python, E2B and TypeScript SDKs' tests (the Python ones
# include the MCP server's, driven by the mcp client) and the browser test of
# /ui and /docs.
set -euo pipefail
root_dir="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root_dir"
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

python3 scripts/gen-python-models.py --check
python3 scripts/gen-python-sync.py --check
ensure_node
node scripts/gen-ts-types.mjs --check
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
  # A venv made before a test dependency was added (the mcp client, e2b) gets it.
  .venv/bin/pip install -q -r sdk/python/requirements-test.txt -r tests/e2b/requirements.txt
fi
# Includes tests/test_mcp.py: `stacyvm mcp` and /mcp driven by the mcp client.
.venv/bin/pytest -q sdk/python/tests

log "E2B SDK against the E2B-compatible API"
# The unmodified `e2b` package (pinned below 3 in tests/e2b/requirements.txt);
# the E2B base image is built from Debian packages by scripts/build-e2b-image.sh.
# The JavaScript SDK too (tests/e2b/js, pinned in its package-lock.json).
npm_ci_if_changed "$root_dir/tests/e2b/js"
.venv/bin/pytest -q tests/e2b

log "TypeScript SDK tests"
# npm ci installs the pinned compiler from package-lock.json; `npm test`
# compiles the SDK and its tests and runs them with node's test runner.
(cd sdk/typescript && npm ci --no-audit --no-fund --loglevel=error && npm test)

log "browser test of the web console and the API reference (headless Chromium)"
# Fails, never skips, when Chromium or the npm packages cannot be had.
ensure_ui_test_tools "$root_dir"
node tests/ui/console.test.mjs

log "Rust tests"
cargo nextest run --workspace --no-fail-fast

log "API suite against a control plane with two remote workers"
# The same tests, with every server they start served by two
# `stacyvm worker` processes instead of its in-process worker.
# (`--workspace` with a filter, so the test binaries built above are reused.)
STACYVM_TEST_TOPOLOGY=workers cargo nextest run --workspace --no-fail-fast -E 'binary_id(stacyvm::api)'
