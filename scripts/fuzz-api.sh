#!/usr/bin/env bash
# Fuzzes every endpoint of StacyVM's HTTP API from its own OpenAPI document
# with schemathesis, against a real `stacyvm serve` (PRoot provider, SQLite).
#
#   scripts/fuzz-api.sh [EXAMPLES]     test cases per operation (default 100)
#
# Before fuzzing it imports the busybox test image and makes a tenant and
# three running sandboxes (one with files), so that `{id}` paths reach real
# objects (see tests/api-fuzz/schemathesis.toml). It fails on any 5xx, a
# response that breaks its documented schema, a non-2xx body without the
# documented `{"error": {"code", "message", "request_id"}}` shape
# (tests/api-fuzz/hooks.py), or a request taking more than 30 s. Reports
# (JUnit, NDJSON) go to target/api-fuzz/report. Environment:
#   STACYVM_BIN            the stacyvm binary (default: cargo build -p stacyvm)
#   STACYVM_AGENT_BIN      the static agent (default: scripts/build-agent.sh)
#   STACYVM_TEST_IMAGE_TAR the busybox rootfs tar (default: built)
#   STACYVM_API_FUZZ_PROVIDERS  --providers for the server (default: proot)
#   STACYVM_API_FUZZ_SEED  schemathesis --seed, to replay a run
set -euo pipefail
root_dir="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root_dir"
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

examples="${1:-100}"
case "$examples" in
  ''|*[!0-9]*) echo "usage: scripts/fuzz-api.sh [EXAMPLES]" >&2; exit 2 ;;
esac

ensure_packages python3-venv proot busybox-static curl 2>/dev/null || true
work="$root_dir/target/api-fuzz"
mkdir -p "$work"

venv="$work/venv"
if [ ! -x "$venv/bin/schemathesis" ] || ! cmp -s tests/api-fuzz/requirements.txt "$venv/requirements.txt"; then
  log "installing schemathesis into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r tests/api-fuzz/requirements.txt
  cp tests/api-fuzz/requirements.txt "$venv/requirements.txt"
fi

if [ -z "${STACYVM_BIN:-}" ]; then
  cargo build -q -p stacyvm
  STACYVM_BIN="$root_dir/target/debug/stacyvm"
fi
STACYVM_AGENT_BIN="${STACYVM_AGENT_BIN:-$(scripts/build-agent.sh)}"
image_tar="${STACYVM_TEST_IMAGE_TAR:-$root_dir/target/test-images/busybox.tar}"
[ -f "$image_tar" ] || scripts/build-test-image.sh "$image_tar"

data_dir="$(mktemp -d -t stacyvm-api-fuzz.XXXXXX)"
server_log="$work/server.log"
admin_key="svm_apifuzz_$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
server_pid=""
url=""

api() { # api METHOD PATH [curl args...] — prints the body, fails on non-2xx
  local method="$1" path="$2"
  shift 2
  curl -sS --fail-with-body --max-time 120 -X "$method" \
    -H "Authorization: Bearer $admin_key" "$url$path" "$@"
}
json_field() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }

cleanup() {
  local rc=$?
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    # Destroy every sandbox through the API so no PRoot process outlives the run.
    if [ -n "$url" ]; then
      api GET "/v1/sandboxes?limit=1000" 2>/dev/null | python3 -c "
import json, sys
for s in json.load(sys.stdin)['sandboxes']:
    if s['state'] != 'destroyed':
        print(s['id'])" 2>/dev/null | while read -r id; do
        api DELETE "/v1/sandboxes/$id" >/dev/null 2>&1 || log "could not destroy $id"
      done
    fi
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$data_dir"
  exit "$rc"
}
trap cleanup EXIT

log "starting stacyvm serve (log: $server_log)"
STACYVM_ADMIN_KEY="$admin_key" STACYVM_AGENT_BIN="$STACYVM_AGENT_BIN" NO_COLOR=1 \
  "$STACYVM_BIN" serve --listen 127.0.0.1:0 --data-dir "$data_dir" \
  --providers "${STACYVM_API_FUZZ_PROVIDERS:-proot}" >"$server_log" 2>&1 &
server_pid=$!
for _ in $(seq 1 600); do
  url="$(sed -n 's/.*StacyVM is up at \(http:[^ ]*\).*/\1/p' "$server_log" | head -n1)"
  [ -n "$url" ] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$server_log" >&2; log "the server exited"; exit 1; }
  sleep 0.1
done
[ -n "$url" ] || { cat "$server_log" >&2; log "the server did not start"; exit 1; }

log "preparing objects at $url"
api POST "/v1/images?name=busybox" -H "Content-Type: application/x-tar" --data-binary "@$image_tar" >/dev/null
tenant="$(api POST /v1/tenants -H "Content-Type: application/json" -d '{"name":"api-fuzz"}' | json_field id)"
create='{"image":"busybox","timeout_s":3600}'
sandbox="$(api POST /v1/sandboxes -H "Content-Type: application/json" -d "$create" | json_field id)"
sandbox_timeout="$(api POST /v1/sandboxes -H "Content-Type: application/json" -d "$create" | json_field id)"
sandbox_destroy="$(api POST /v1/sandboxes -H "Content-Type: application/json" -d "$create" | json_field id)"
api POST "/v1/sandboxes/$sandbox/files/mkdir" -H "Content-Type: application/json" -d '{"path":"/work/src","parents":true}' >/dev/null
printf 'print("hi")\n' | api PUT "/v1/sandboxes/$sandbox/files?path=/work/src/main.py" --data-binary @- >/dev/null
api POST "/v1/sandboxes/$sandbox/exec" -H "Content-Type: application/json" \
  -d '{"cmd":["ln","-s","/etc","/work/etc-link"]}' >/dev/null

log "fuzzing every operation ($examples examples each)"
started=$SECONDS
rm -rf "$work/report"
export STACYVM_ADMIN_KEY="$admin_key" SVM_FUZZ_SANDBOX="$sandbox" \
  SVM_FUZZ_SANDBOX_TIMEOUT="$sandbox_timeout" SVM_FUZZ_SANDBOX_DESTROY="$sandbox_destroy" \
  SVM_FUZZ_TENANT="$tenant" SVM_FUZZ_CACHE="$work/cache" SCHEMATHESIS_HOOKS=hooks PYTHONDONTWRITEBYTECODE=1 PYTHONPATH="$root_dir/tests/api-fuzz"
seed_args=()
[ -n "${STACYVM_API_FUZZ_SEED:-}" ] && seed_args=(--seed "$STACYVM_API_FUZZ_SEED")
set +e
"$venv/bin/schemathesis" --config-file tests/api-fuzz/schemathesis.toml run "$url/openapi.json" \
  --url "$url" --max-examples "$examples" --no-color \
  --report junit,ndjson --report-dir "$work/report" "${seed_args[@]}"
rc=$?
set -e
log "schemathesis finished in $((SECONDS - started)) s with exit code $rc"
if grep -q '"status":5[0-9][0-9]\|panicked' "$server_log"; then
  log "the server log shows a panic; see $server_log"
fi
exit "$rc"
