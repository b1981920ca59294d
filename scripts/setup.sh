#!/usr/bin/env bash
# Sets up and starts a single-node StacyVM on this machine:
#   - installs what is missing (docker.io, proot, busybox-static) from Debian's packages,
#   - starts dockerd when it is not running,
#   - builds `stacyvm` and the static in-sandbox agent (release),
#   - starts `stacyvm serve` (embedded SQLite in the data dir, the Docker provider; PRoot for
#     the operator's own tenant only where Docker cannot run),
#   - imports a `busybox` image (from Debian's busybox-static) into the image catalog, and
#     `e2b-base` (bash and /home/user, from Debian's packages) as E2B's `base` template,
#   - builds the provided templates `python` (Debian's python3 and pip, in a root filesystem
#     debootstrap makes from the host's Debian mirror; cached in target/test-images) and `bash`
#     on the operator's tenant, so every tenant can start them (scripts/provide-templates.sh),
#   - prints the URL and where the admin key is, then keeps serving until Ctrl-C / SIGTERM.
#
#   scripts/setup.sh [--listen ADDR] [--data-dir DIR] [other `stacyvm serve` flags]
set -euo pipefail
root_dir="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=scripts/lib.sh
. "$root_dir/scripts/lib.sh"

listen="127.0.0.1:7070"
data_dir=""
providers_given=0
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --listen) listen="$2"; shift 2 ;;
    --data-dir) data_dir="$2"; shift 2 ;;
    --providers|--providers=*) providers_given=1; args+=("$1"); shift ;;
    *) args+=("$1"); shift ;;
  esac
done
if [ -z "$data_dir" ]; then
  if [ "$(id -u)" -eq 0 ]; then data_dir=/var/lib/stacyvm; else data_dir="$HOME/.local/share/stacyvm"; fi
fi

ensure_cargo
ensure_runtime_packages || true
if ! ensure_dockerd && [ "$providers_given" = 0 ] && [ -z "${STACYVM_PROVIDERS:-}" ]; then
  # PRoot is no security boundary: only the operator's own tenant gets it
  # unless a tenant's quota lists it.
  log "continuing without Docker: sandboxes will use PRoot, which is not a security boundary"
  args+=(--providers proot)
fi

log "building stacyvm (release; the first build takes a few minutes)"
(cd "$root_dir" && cargo build -q --release -p stacyvm)
agent="$("$root_dir/scripts/build-agent.sh")"
bin_dir="$root_dir/target/release"
cp "$agent" "$bin_dir/stacyvm-agent"
# The guest kernel and initramfs for `--providers qemu`; a host without
# them still serves the other providers.
"$root_dir/scripts/build-guest.sh" >/dev/null || log "the microVM guest assets did not build; the qemu provider will report unhealthy"
image_tar="$root_dir/target/test-images/busybox.tar"
"$root_dir/scripts/build-test-image.sh" "$image_tar"
# E2B's `base` template: bash and a home directory, from Debian's packages.
# Without it (no package mirror reachable) StacyVM runs, and E2B's SDK
# needs a template named at create.
e2b_tar="$root_dir/target/test-images/e2b-base.tar"
if "$root_dir/scripts/build-e2b-image.sh" "$e2b_tar" >/dev/null; then
  export STACYVM_E2B_DEFAULT_TEMPLATE="${STACYVM_E2B_DEFAULT_TEMPLATE:-e2b-base}"
else
  log "the E2B base image did not build; E2B's \`base\` template stays unset"
  e2b_tar=""
fi
# The provided templates' root filesystems (see scripts/provide-templates.sh).
provided=()
provide_args=()
if [ -n "$e2b_tar" ]; then
  provided+=(bash)
  provide_args+=(--bash-tar "$e2b_tar")
fi
if python_tar="$("$root_dir/scripts/build-python-image.sh")"; then
  provided+=(python)
  provide_args+=(--python-tar "$python_tar")
else
  log "the python template's root filesystem did not build; the \`python\` template is left out"
fi

mkdir -p -m 0700 "$data_dir"
log "starting stacyvm serve on $listen (data dir $data_dir)"
"$bin_dir/stacyvm" serve --listen "$listen" --data-dir "$data_dir" "${args[@]}" &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server' INT TERM

url="http://$listen"
for _ in $(seq 1 120); do
  curl -fsS "$url/healthz" >/dev/null 2>&1 && break
  kill -0 "$server" 2>/dev/null || { log "stacyvm serve exited; see the messages above"; exit 1; }
  sleep 0.5
done
key="${STACYVM_ADMIN_KEY:-$(cat "$data_dir/admin.key")}"
if ! curl -fsS -H "Authorization: Bearer $key" "$url/v1/images/busybox" >/dev/null 2>&1; then
  curl -fsS -H "Authorization: Bearer $key" -X POST "$url/v1/images?name=busybox" \
    -H 'Content-Type: application/x-tar' --data-binary @"$image_tar" >/dev/null
  log "imported the busybox image into the catalog"
fi
if [ -n "$e2b_tar" ] && ! curl -fsS -H "Authorization: Bearer $key" "$url/v1/images/e2b-base" >/dev/null 2>&1; then
  curl -fsS -H "Authorization: Bearer $key" -X POST "$url/v1/images?name=e2b-base" \
    -H 'Content-Type: application/x-tar' --data-binary @"$e2b_tar" >/dev/null
  log "imported the e2b-base image (E2B's \`base\` template) into the catalog"
fi
if [ "${#provided[@]}" -gt 0 ]; then
  STACYVM_URL="$url" STACYVM_API_KEY="$key" STACYVM_BIN="$bin_dir/stacyvm" \
    "$root_dir/scripts/provide-templates.sh" "${provide_args[@]}" "${provided[@]}" ||
    log "the provided templates did not build; see the messages above"
fi

cat >&2 <<MSG

StacyVM is ready at $url  (Ctrl-C stops it; sandboxes survive and are adopted on the next start)
  admin key: ${STACYVM_ADMIN_KEY:+\$STACYVM_ADMIN_KEY}${STACYVM_ADMIN_KEY:-$data_dir/admin.key}
  CLI:       $bin_dir/stacyvm

Try it:
  export STACYVM_URL=$url STACYVM_API_KEY=\$(cat $data_dir/admin.key)
  curl -s -H "Authorization: Bearer \$STACYVM_API_KEY" -X POST \$STACYVM_URL/v1/sandboxes -d '{"image":"busybox"}'
  $bin_dir/stacyvm sandbox create --template python --rm -- python3 -c 'print(1+1)'   # \`stacyvm template ls\`

MSG
wait "$server"
