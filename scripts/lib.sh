# Shared helpers for StacyVM's scripts: install what is missing from
# Debian's packages, start dockerd when it is not running. Sourced, not run.

log() { echo "stacyvm: $*" >&2; }

# detached CMD... — runs CMD with stdin from /dev/null and none of the
# caller's descriptors but stdout and stderr. For commands that leave a
# daemon behind: a daemon holding the pipe of a `$(…)` or of a CI runner
# keeps its reader waiting for EOF long after the script is done.
# (No redirection on the loop: bash would keep a saved copy of stderr in a
# high descriptor, the loop would close it, and stderr would stay lost.)
detached() (
  for fd in /proc/self/fd/*; do
    fd="${fd##*/}"
    # Skips the descriptor the glob itself used, closed by now.
    if [ "$fd" -gt 2 ] && [ -e "/proc/self/fd/$fd" ]; then eval "exec $fd>&-"; fi
  done
  "$@" </dev/null
)

apt_updated=0
# ensure_packages PKG... — installs the Debian packages that are missing.
ensure_packages() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    log "missing Debian packages: ${missing[*]} (run as root, or: sudo apt-get install ${missing[*]})"
    return 1
  fi
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if [ "$apt_updated" = 0 ]; then
    apt-get update -q >&2
    apt_updated=1
  fi
  apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
}

# ensure_runtime_packages — everything the providers and scripts need.
ensure_runtime_packages() {
  ensure_packages ca-certificates curl docker.io proot busybox-static iproute2 procps util-linux nftables
}

# ensure_dockerd — starts dockerd in the background unless it answers.
ensure_dockerd() {
  if docker info >/dev/null 2>&1; then
    return 0
  fi
  if [ "$(id -u)" -ne 0 ]; then
    log "dockerd is not running and only root can start it; the docker provider will report unhealthy"
    return 1
  fi
  # A dockerd that is still shutting down holds its pid file, and a new
  # one would exit at once: wait for it to answer or to go.
  local i
  for i in $(seq 1 60); do
    pgrep -x dockerd >/dev/null 2>&1 || break
    docker info >/dev/null 2>&1 && return 0
    [ "$i" = 1 ] && log "waiting for a dockerd that does not answer (yet)"
    sleep 0.5
  done
  log "starting dockerd"
  mkdir -p /var/log
  detached nohup dockerd >>/var/log/stacyvm-dockerd.log 2>&1 &
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  log "dockerd did not come up; the end of /var/log/stacyvm-dockerd.log:"
  tail -n 20 /var/log/stacyvm-dockerd.log >&2 || true
  return 1
}

# ensure_cargo — Rust is needed to build StacyVM.
ensure_cargo() {
  if command -v cargo >/dev/null 2>&1; then
    return 0
  fi
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
    return 0
  fi
  log "cargo was not found: install Rust (https://rustup.rs, 1.85 or newer) and run this again"
  return 1
}

# ensure_node — Node.js 20.4 or newer (AbortSignal.any, Symbol.asyncDispose)
# and npm, for the TypeScript SDK. Debian 13 ships Node.js 20; Debian 12's
# own is 18, too old: there, install a newer Node.js (its packages carry
# npm) before running this.
ensure_node() {
  if ! command -v node >/dev/null 2>&1; then
    ensure_packages nodejs npm || return 1
  elif ! command -v npm >/dev/null 2>&1; then
    ensure_packages npm || return 1
  fi
  if ! node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a === 20 && b >= 4) ? 0 : 1)' 2>/dev/null; then
    log "Node.js $(node --version 2>/dev/null) is too old for the TypeScript SDK: it needs 20.4 or newer"
    return 1
  fi
}

# ensure_ui_test_tools ROOT — what the browser test (tests/ui) needs:
# Debian's chromium and, from the npm registry, the playwright-core version
# pinned in tests/ui/package-lock.json (installed again only when the lock
# file changed since the last install).
ensure_ui_test_tools() {
  local root="$1"
  ensure_packages chromium || { log "could not install chromium"; return 1; }
  ensure_node || { log "the browser test needs Node.js and npm"; return 1; }
  npm_ci_if_changed "$root/tests/ui"
}

# npm_ci_if_changed DIR — `npm ci` in DIR unless node_modules already holds
# exactly what DIR's package-lock.json pins.
npm_ci_if_changed() {
  local dir="$1"
  if ! cmp -s "$dir/package-lock.json" "$dir/node_modules/.installed-lock.json"; then
    log "installing the npm packages of ${dir#"$PWD"/}"
    (cd "$dir" && npm ci --no-audit --no-fund --silent) || { log "npm ci in $dir failed"; return 1; }
    cp "$dir/package-lock.json" "$dir/node_modules/.installed-lock.json"
  fi
}

# prepare_test_env ROOT — everything the test suites need: packages, a
# running dockerd and PostgreSQL, the static agent, the busybox test image
# and the python template's root filesystem; exports STACYVM_TEST_POSTGRES_URL,
# STACYVM_AGENT_BIN, STACYVM_TEST_IMAGE_TAR and STACYVM_TEST_PYTHON_IMAGE_TAR.
#
# Every step must succeed: a test that cannot reach what it needs fails, so
# an environment missing a piece is reported here, by name, and the
# function returns non-zero (also when the caller has no `set -e`).
# Unmounts every filesystem mounted at or below DIR, deepest first: a server's
# volumes stay mounted when it stops (they outlive it by design), so a
# throwaway data dir must be unmounted before it can be removed.
unmount_under() {
  local dir target
  dir="$(realpath -m "$1")"
  findmnt -rn -o TARGET | awk -v d="$dir" '$0 == d || index($0, d "/") == 1' | sort -r |
    while read -r target; do
      umount "$target" || log "could not unmount $target"
    done
}

prepare_test_env() {
  local root="$1"
  ensure_cargo || return 1
  ensure_runtime_packages || { log "could not install the runtime packages"; return 1; }
  # python3-venv: the API fuzzer and the Python SDK tests; sqlite3: the
  # security suite reads the SQLite store with it.
  ensure_packages python3-venv sqlite3 || { log "could not install python3-venv and sqlite3"; return 1; }
  ensure_node || { log "the TypeScript SDK's tests need Node.js 20.4 or newer and npm"; return 1; }
  ensure_dockerd || return 1
  STACYVM_TEST_POSTGRES_URL="$("$root/scripts/start-postgres.sh")" || { log "PostgreSQL did not start"; return 1; }
  export STACYVM_TEST_POSTGRES_URL
  STACYVM_AGENT_BIN="$("$root/scripts/build-agent.sh")" || { log "the agent did not build"; return 1; }
  export STACYVM_AGENT_BIN
  export STACYVM_TEST_IMAGE_TAR="$root/target/test-images/busybox.tar"
  "$root/scripts/build-test-image.sh" --docker "$STACYVM_TEST_IMAGE_TAR" || { log "the test image did not build"; return 1; }
  # The provided `python` template's root filesystem (debootstrap; about a minute the first
  # time, then cached by its inputs).
  STACYVM_TEST_PYTHON_IMAGE_TAR="$("$root/scripts/build-python-image.sh" "$root/target/test-images/python.tar")" ||
    { log "the python template's root filesystem did not build"; return 1; }
  export STACYVM_TEST_PYTHON_IMAGE_TAR
  # The microVM providers' guest kernel and initramfs, QEMU and vhost-device-vsock.
  STACYVM_GUEST_DIR="$("$root/scripts/build-guest.sh")" || { log "the microVM guest assets did not build"; return 1; }
  export STACYVM_GUEST_DIR
}
