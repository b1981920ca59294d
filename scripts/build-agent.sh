#!/usr/bin/env bash
# Builds the static `stacyvm-agent` binary that runs inside every sandbox and
# prints its path. Static (+crt-static) so it runs in busybox, Alpine and
# distroless images. `--target` keeps the static flag away from build scripts
# and proc-macros, which must stay dynamic.
#
#   scripts/build-agent.sh [--debug]
set -euo pipefail
root_dir="$(cd "$(dirname "$0")/.." && pwd)"
profile=release
flag=--release
if [ "${1:-}" = "--debug" ]; then profile=debug; flag=""; fi
triple=x86_64-unknown-linux-gnu
cd "$root_dir"
RUSTFLAGS="-C target-feature=+crt-static" cargo build -q $flag -p stacyvm-agent --bin stacyvm-agent --target "$triple" >&2
echo "$root_dir/target/$triple/$profile/stacyvm-agent"
