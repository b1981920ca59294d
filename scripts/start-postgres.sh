#!/usr/bin/env bash
# Starts (or finds running) the PostgreSQL 15 cluster the store tests use, and prints its URL.
#
# The cluster lives in $STACYVM_PG_DIR (default /var/tmp/stacyvm-pg), listens on
# 127.0.0.1:$STACYVM_PG_PORT (default 55432) with trust authentication, and keeps
# its data across runs. It is a test database: fsync is off, so a machine crash
# (not a process crash) may lose it; delete the directory to start afresh.
#
# Idempotent and safe to run concurrently (a file lock serialises callers). The
# URL is the only thing written to stdout; everything else goes to stderr.
set -euo pipefail

PG_DIR="${STACYVM_PG_DIR:-/var/tmp/stacyvm-pg}"
PG_PORT="${STACYVM_PG_PORT:-55432}"
PG_BIN="${STACYVM_PG_BIN:-/usr/lib/postgresql/15/bin}"
DATA="$PG_DIR/data"
LOG="$PG_DIR/postgres.log"
URL="postgres://postgres@127.0.0.1:${PG_PORT}/postgres"

# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"
log() { echo "start-postgres: $*" >&2; }

exec 3>&1 1>&2 # keep stdout for the URL alone

# One caller at a time, from the install on: concurrent test processes all
# call this script.
mkdir -p "$(dirname "$PG_DIR")"
exec 9>"$PG_DIR.lock"
flock 9

if [[ ! -x "$PG_BIN/postgres" ]]; then
    if [[ "$(id -u)" -ne 0 ]]; then
        log "no PostgreSQL 15 in $PG_BIN and not root: install the postgresql-15 package"
        exit 1
    fi
    log "installing PostgreSQL 15"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q 9>&-
    apt-get install -y -q postgresql-15 postgresql-client-15 9>&-
fi

# Run a command as the cluster owner: `postgres` when we are root (initdb
# refuses to run as root), ourselves otherwise.
if [[ "$(id -u)" -eq 0 ]]; then
    if ! id postgres >/dev/null 2>&1; then
        useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
    fi
    as_owner() { runuser -u postgres -- "$@"; }
    OWNER=postgres
else
    as_owner() { "$@"; }
    OWNER="$(id -un)"
fi

mkdir -p "$PG_DIR"
chown "$OWNER" "$PG_DIR"
chmod 0700 "$PG_DIR"

# Whether $1 is a running postgres process (a zombie's cmdline is empty).
live_postgres() {
    [[ -n "$1" && -r "/proc/$1/cmdline" ]] && [[ "$(tr '\0' ' ' <"/proc/$1/cmdline")" == *postgres* ]]
}

ready() { "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -d postgres -U postgres; }

if [[ ! -f "$DATA/PG_VERSION" ]]; then
    log "initialising a cluster in $DATA"
    rm -rf "$DATA"
    as_owner "$PG_BIN/initdb" -D "$DATA" -U postgres --auth=trust --encoding=UTF8 --locale=C.UTF-8 >&2 9>&-
    cat >>"$DATA/postgresql.conf" <<EOF

# StacyVM test cluster
listen_addresses = '127.0.0.1'
max_connections = 300
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
fi

# A postmaster.pid left behind by a killed server (or a rebooted container,
# where the PID may now belong to another process) stops the server from
# starting: remove it unless it names a live postgres serving this directory.
PIDFILE="$DATA/postmaster.pid"
if [[ -f "$PIDFILE" ]]; then
    pid="$(head -n1 "$PIDFILE" 2>/dev/null || true)"
    if live_postgres "$pid"; then
        if ready; then
            log "already running"
            echo "$URL" >&3
            exit 0
        fi
        # Running but not (yet) answering on our port: give it a moment.
        for _ in $(seq 1 60); do
            if ready; then
                echo "$URL" >&3
                exit 0
            fi
            sleep 0.5
        done
        log "postgres (pid $pid) runs in $DATA but does not answer on 127.0.0.1:$PG_PORT; see $LOG"
        exit 1
    fi
    log "removing stale $PIDFILE"
    rm -f "$PIDFILE"
fi
# The socket's lock file names the server too, and blocks a restart the same way.
for lock in "$PG_DIR"/.s.PGSQL.*.lock; do
    [[ -e "$lock" ]] || continue
    if ! live_postgres "$(head -n1 "$lock" 2>/dev/null || true)"; then
        log "removing stale $lock"
        rm -f "$lock" "${lock%.lock}"
    fi
done

touch "$LOG"
chown "$OWNER" "$LOG"
log "starting on 127.0.0.1:$PG_PORT"
# The server outlives this script, so it starts `detached` (scripts/lib.sh):
# holding none of this script's descriptors, neither the lock (9) nor the
# caller's stdout (3).
# setsid: the server must outlive the caller's process group (a test runner
# may kill it).
detached as_owner setsid -w "$PG_BIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 \
    -o "-p $PG_PORT -k $PG_DIR -c listen_addresses=127.0.0.1" start >&2

if ! ready; then
    log "postgres started but does not answer on 127.0.0.1:$PG_PORT; see $LOG"
    exit 1
fi
echo "$URL" >&3
