#!/usr/bin/env bash
# Fuzzes every endpoint of StacyVM's HTTP API from its own OpenAPI document
# with schemathesis, against a real `stacyvm serve` (Docker and PRoot
# providers, SQLite).
#
#   scripts/fuzz-api.sh [EXAMPLES]     test cases per operation (default 100; a
#                                      quarter of that for the member and viewer keys)
#
# Before fuzzing it imports the busybox test image and makes, through the
# API, a tenant for quota fuzzing, a tenant with a member and a viewer key,
# and for each acting tenant running sandboxes on every provider (one with
# files), so that `{id}` paths reach real objects (tests/api-fuzz/prepare.py,
# tests/api-fuzz/schemathesis.toml). Then it runs schemathesis three times at
# once, with the admin, the member and the viewer key; each run has the
# coverage, fuzzing and stateful phases.
#
# It fails (non-zero exit) on any 5xx, a response that breaks its documented
# schema, a non-2xx body without the documented
# `{"error": {"code", "message", "request_id"}}` shape
# (tests/api-fuzz/hooks.py), a schema-invalid request that is served, an
# operation served without a valid key, an undocumented method that is not
# 405 with `Allow`, a request taking more than 30 s, and on any panic or 5xx
# request line in the server log. Reports (JUnit, NDJSON) go to
# target/api-fuzz/report/ROLE, each run's output to target/api-fuzz/ROLE.log,
# the server's log to target/api-fuzz/server.log. Environment:
#   STACYVM_BIN            the stacyvm binary (default: cargo build -p stacyvm)
#   STACYVM_AGENT_BIN      the static agent (default: scripts/build-agent.sh)
#   STACYVM_TEST_IMAGE_TAR the busybox rootfs tar (default: built)
#   STACYVM_API_FUZZ_PROVIDERS  --providers for the server (default: docker,proot)
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
providers="${STACYVM_API_FUZZ_PROVIDERS:-docker,proot}"

ensure_packages python3-venv proot busybox-static curl || { log "could not install the packages the fuzzer needs"; exit 1; }
case ",$providers," in
  *,docker,*) ensure_runtime_packages && ensure_dockerd || { log "the docker provider is fuzzed and dockerd is not usable"; exit 1; } ;;
esac
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
fuzz_pids=()

api() { # api METHOD PATH [curl args...] — prints the body, fails on non-2xx
  local method="$1" path="$2"
  shift 2
  curl -sS --fail-with-body --max-time 120 -X "$method" \
    -H "Authorization: Bearer $admin_key" "$url$path" "$@"
}

# destroy_all — destroys every sandbox through the API (the admin sees every
# tenant's), so no container or PRoot process outlives the run; fails if one
# cannot be destroyed.
destroy_all() {
  local ids id failed=0
  ids="$(api GET "/v1/sandboxes?limit=1000" | python3 -c "
import json, sys
for s in json.load(sys.stdin)['sandboxes']:
    if s['state'] not in ('destroyed', 'failed', 'lost'):
        print(s['id'])")" || return 1
  for id in $ids; do
    api DELETE "/v1/sandboxes/$id" >/dev/null || { log "could not destroy $id"; failed=1; }
  done
  return "$failed"
}

cleanup() {
  local rc=$?
  local pid
  for pid in "${fuzz_pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    [ -n "$url" ] && { destroy_all 2>/dev/null || true; }
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  unmount_under "$data_dir"
  rm -rf "$data_dir"
  exit "$rc"
}
trap cleanup EXIT

# The ignored_auth check sends every operation without a key and with a
# wrong one; at the default limit (120 a minute per address) the server
# would soon answer those with 429 instead of 401. The limiter itself is
# tested by the security suite (crates/cli/tests/security/keys.rs).
log "starting stacyvm serve --providers $providers (log: $server_log)"
# Emptied here, not by the redirection below: that happens in the child, and
# the loop after it could read the previous run's address first.
: >"$server_log"
STACYVM_ADMIN_KEY="$admin_key" STACYVM_AGENT_BIN="$STACYVM_AGENT_BIN" NO_COLOR=1 \
  "$STACYVM_BIN" serve --listen 127.0.0.1:0 --data-dir "$data_dir" \
  --providers "$providers" --auth-failures-per-minute 1000000 >"$server_log" 2>&1 &
server_pid=$!
for _ in $(seq 1 600); do
  url="$(sed -n 's/.*StacyVM is up at \(http:[^ ]*\).*/\1/p' "$server_log" | head -n1)"
  [ -n "$url" ] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$server_log" >&2; log "the server exited"; exit 1; }
  sleep 0.1
done
[ -n "$url" ] || { cat "$server_log" >&2; log "the server did not start"; exit 1; }

log "preparing tenants, keys and sandboxes at $url"
prepare_started=$SECONDS
fixtures="$(STACYVM_ADMIN_KEY="$admin_key" PYTHONDONTWRITEBYTECODE=1 \
  "$venv/bin/python" tests/api-fuzz/prepare.py "$url" "$providers" "$image_tar")"
eval "$fixtures"
log "prepared in $((SECONDS - prepare_started)) s"

seed_args=()
[ -n "${STACYVM_API_FUZZ_SEED:-}" ] && seed_args=(--seed "$STACYVM_API_FUZZ_SEED")
rm -rf "$work/report"

# fuzz ROLE EXAMPLES PHASES KEY SANDBOX SANDBOX_TIMEOUT SANDBOX_DESTROY TENANT REVOCABLE_KEY ROTATION
# — one schemathesis run in the background, its output in $work/ROLE.log.
fuzz() {
  local role="$1" n="$2" phases="$3"
  shift 3
  SVM_FUZZ_KEY="$1" SVM_FUZZ_SANDBOX="$2" SVM_FUZZ_SANDBOX_TIMEOUT="$3" \
    SVM_FUZZ_SANDBOX_DESTROY="$4" SVM_FUZZ_TENANT="$5" SVM_FUZZ_REVOCABLE_KEY="$6" \
    SVM_FUZZ_ROTATION="$7" SVM_FUZZ_CACHE="$work/cache/$role" \
    SCHEMATHESIS_HOOKS=hooks PYTHONDONTWRITEBYTECODE=1 PYTHONPATH="$root_dir/tests/api-fuzz" \
    "$venv/bin/schemathesis" --config-file tests/api-fuzz/schemathesis.toml run "$url/openapi.json" \
    --url "$url" --max-examples "$n" --phases "$phases" --no-color \
    --report junit,ndjson --report-dir "$work/report/$role" "${seed_args[@]}" \
    >"$work/$role.log" 2>&1 &
  fuzz_pids+=($!)
}

# The tenant keys' runs take a quarter of the examples and skip the coverage
# phase: what they reach beyond the admin's run is the refusals (403, 404)
# and a tenant's own view, while the coverage phase's invalid requests meet
# the same parsing whatever the key; and the three runs share the host's
# two cores.
tenant_examples=$((examples / 4 > 10 ? examples / 4 : 10))
log "fuzzing every operation with the admin key ($examples examples each; coverage, fuzzing and stateful phases) and the member and viewer keys ($tenant_examples each; fuzzing and stateful); providers $providers"
started=$SECONDS
fuzz admin "$examples" coverage,fuzzing,stateful "$admin_key" "$SVM_FUZZ_ADMIN_SANDBOX" "$SVM_FUZZ_ADMIN_SANDBOX_TIMEOUT" \
  "$SVM_FUZZ_ADMIN_SANDBOX_DESTROY" "$SVM_FUZZ_QUOTA_TENANT" "$SVM_FUZZ_ADMIN_REVOCABLE_KEY" \
  "$SVM_FUZZ_ADMIN_ROTATION"
fuzz member "$tenant_examples" fuzzing,stateful "$SVM_FUZZ_MEMBER_KEY" "$SVM_FUZZ_MEMBER_SANDBOX" "$SVM_FUZZ_MEMBER_SANDBOX_TIMEOUT" \
  "$SVM_FUZZ_MEMBER_SANDBOX_DESTROY" "$SVM_FUZZ_MEMBERS_TENANT" "$SVM_FUZZ_MEMBER_REVOCABLE_KEY" \
  "$SVM_FUZZ_MEMBER_ROTATION"
# The viewer acts on the member tenant's sandboxes (its own tenant's): every
# write is a 403, every read an answer.
fuzz viewer "$tenant_examples" fuzzing,stateful "$SVM_FUZZ_VIEWER_KEY" "$SVM_FUZZ_MEMBER_SANDBOX" "$SVM_FUZZ_MEMBER_SANDBOX_TIMEOUT" \
  "$SVM_FUZZ_MEMBER_SANDBOX_DESTROY" "$SVM_FUZZ_MEMBERS_TENANT" "$SVM_FUZZ_MEMBER_REVOCABLE_KEY" \
  "$SVM_FUZZ_MEMBER_ROTATION"

rc=0
roles=(admin member viewer)
for i in "${!fuzz_pids[@]}"; do
  role_rc=0
  wait "${fuzz_pids[$i]}" || role_rc=$?
  echo
  echo "======== schemathesis, ${roles[$i]} key ========"
  cat "$work/${roles[$i]}.log"
  log "the ${roles[$i]} run ended with exit code $role_rc"
  [ "$role_rc" = 0 ] || rc=1
done
fuzz_pids=()
log "schemathesis finished in $((SECONDS - started)) s"

if ! destroy_all; then
  log "some sandboxes could not be destroyed; see $server_log"
  rc=1
fi
# What the checks above cannot see: a panic in a task that answered
# nothing, or a 5xx that reached no check (a probe, a stream cut short).
# The port proxy's 502 (nothing listens on the port) is a gateway's answer.
if grep -nE 'panicked at|status=5[0-9]{2}([^0-9]|$)' "$server_log" |
  grep -vE 'route=/v1/sandboxes/\{id\}/ports/\{port\}/(\{\*rest\})? status=502 ' \
    >"$work/server-errors.txt"; then
  log "the server log shows panics or 5xx answers (first 20 below; all in $server_log):"
  head -n 20 "$work/server-errors.txt" >&2
  rc=1
fi
requests="$(grep -c ' request ' "$server_log" || true)"
log "the server answered $requests requests"
exit "$rc"
