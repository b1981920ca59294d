#!/usr/bin/env bash
# Builds the busybox root filesystem StacyVM's tests and benchmarks run in,
# from Debian's busybox-static (no registry needed), as a tar file.
#
#   scripts/build-test-image.sh [OUT_TAR]      default: target/test-images/busybox.tar
#
# With --docker it is also imported into the local Docker daemon as
# `stacyvm-test/busybox:latest`.
set -euo pipefail

docker_import=0
out=""
for arg in "$@"; do
  case "$arg" in
    --docker) docker_import=1 ;;
    *) out="$arg" ;;
  esac
done
root_dir="$(cd "$(dirname "$0")/.." && pwd)"
out="${out:-$root_dir/target/test-images/busybox.tar}"

is_static() { [ -x "$1" ] && ! ldd "$1" >/dev/null 2>&1; }
busybox=/bin/busybox
if ! is_static "$busybox"; then
  echo "build-test-image: a static busybox is needed at /bin/busybox: apt-get install busybox-static" >&2
  exit 1
fi

mkdir -p "$(dirname "$out")"
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,etc,tmp,work,root,proc,sys,dev,home,var/tmp}
chmod 1777 "$stage/tmp" "$stage/var/tmp"
cp "$busybox" "$stage/bin/busybox"
chmod 0755 "$stage/bin/busybox"
for applet in $("$stage/bin/busybox" --list-full); do
  [ "$applet" = "bin/busybox" ] && continue
  mkdir -p "$stage/$(dirname "$applet")"
  ln -sf /bin/busybox "$stage/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$stage/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$stage/etc/group"
echo "stacyvm" > "$stage/etc/hostname"

tar --numeric-owner --owner=0 --group=0 -C "$stage" -cf "$out.tmp" .
mv "$out.tmp" "$out"
echo "build-test-image: wrote $out" >&2

if [ "$docker_import" = 1 ]; then
  docker import "$out" stacyvm-test/busybox:latest >/dev/null
  echo "build-test-image: imported stacyvm-test/busybox:latest into Docker" >&2
fi
