#!/usr/bin/env bash
# Builds the root filesystem of the provided `python` template: a minimal Debian
# (`debootstrap --variant=minbase`) with Debian's python3 and python3-pip, as a tar file.
#
#   scripts/build-python-image.sh [OUT_TAR]     default: target/test-images/python.tar
#
# The packages come from the host's configured Debian mirror (the first `URIs:` of
# /etc/apt/sources.list.d/debian.sources, or `deb` line of /etc/apt/sources.list), for the
# host's release; STACYVM_DEBIAN_MIRROR and STACYVM_DEBIAN_SUITE override them. Needs root
# (debootstrap chroots) and installs debootstrap when it is missing.
#
# The tar is cached: OUT_TAR.inputs records what it was built from (this script, the mirror,
# the suite, the packages), and a rerun with the same inputs only prints the path. The first
# build takes about a minute. Prints the tar's path on stdout.
set -euo pipefail
root_dir="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=scripts/lib.sh
. "$root_dir/scripts/lib.sh"
out="${1:-$root_dir/target/test-images/python.tar}"
mkdir -p "$(dirname "$out")"

packages="python3,python3-pip"
suite="${STACYVM_DEBIAN_SUITE:-$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")}"
mirror="${STACYVM_DEBIAN_MIRROR:-}"
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list.d/debian.sources ]; then
  mirror="$(awk '/^URIs:/ && $2 !~ /security/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources)"
fi
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
  mirror="$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' /etc/apt/sources.list)"
fi
mirror="${mirror:-http://deb.debian.org/debian}"

inputs="$(printf 'script %s\nmirror %s\nsuite %s\npackages %s\n' \
  "$(sha256sum "$0" | cut -d' ' -f1)" "$mirror" "$suite" "$packages")"
if [ -f "$out" ] && [ -f "$out.inputs" ] && [ "$(cat "$out.inputs")" = "$inputs" ]; then
  echo "$out"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "build-python-image: debootstrap needs root" >&2
  exit 1
fi
command -v debootstrap >/dev/null 2>&1 || ensure_packages debootstrap || {
  echo "build-python-image: debootstrap is missing and could not be installed" >&2
  exit 1
}

work="$(mktemp -d)"
trap 'unmount_under "$work"; rm -rf "$work"' EXIT
stage="$work/root"
log "build-python-image: debootstrap $suite from $mirror with $packages (about a minute)"
if ! debootstrap --variant=minbase --include="$packages" "$suite" "$stage" "$mirror" > "$work/debootstrap.log" 2>&1; then
  tail -n 30 "$work/debootstrap.log" >&2
  [ -f "$stage/debootstrap/debootstrap.log" ] && tail -n 30 "$stage/debootstrap/debootstrap.log" >&2
  echo "build-python-image: debootstrap failed" >&2
  exit 1
fi
# What a sandbox never needs: downloaded packages, package lists, documentation, the host's
# resolver file.
rm -rf "$stage"/var/cache/apt/archives/*.deb "$stage"/var/lib/apt/lists/* "$stage/debootstrap" \
  "$stage"/usr/share/doc/* "$stage"/usr/share/man/* "$stage"/usr/share/info/* "$stage"/usr/share/locale/*
: > "$stage/etc/resolv.conf"
mkdir -p "$stage/home/user" "$stage/work"
chroot "$stage" python3 -c 'import pip, sys; assert sys.version_info >= (3, 9)' || {
  echo "build-python-image: python3 does not run in the new root filesystem" >&2
  exit 1
}

# Device nodes stay out: every provider gives a sandbox its own /dev.
tar --numeric-owner -C "$stage" --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' -cf "$out.tmp" .
mv "$out.tmp" "$out"
printf '%s\n' "$inputs" > "$out.inputs"
log "build-python-image: wrote $out ($(du -h "$out" | cut -f1))"
echo "$out"
