#!/usr/bin/env bash
# Builds the image E2B's `base` template runs on StacyVM (see README, "Using the E2B SDK"):
# the busybox test image plus Debian's bash and the libraries it needs, a user `user` with
# the home directory /home/user, as a tar file. The E2B SDK runs every command as
# `/bin/bash -l -c CMD` and resolves relative paths against the user's home.
#
#   scripts/build-e2b-image.sh [OUT_TAR]     default: target/test-images/e2b-base.tar
#
# Only Debian's package archive is needed (apt-get download); nothing is installed on the
# host. With --docker it is also imported into Docker as `stacyvm-test/e2b-base:latest`.
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
out="${out:-$root_dir/target/test-images/e2b-base.tar}"
mkdir -p "$(dirname "$out")"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
stage="$work/root"
debs="$work/debs"
mkdir -p "$stage" "$debs"

# The busybox root filesystem is the base: a shell, coreutils and the layout.
"$root_dir/scripts/build-test-image.sh" "$work/busybox.tar" >/dev/null
tar -C "$stage" -xf "$work/busybox.tar"

# bash and everything it needs to run (libc6, libtinfo6; their own pre-dependencies are
# in the same archive). apt-get download fetches the .debs only.
packages=(bash libc6 libtinfo6 libgcc-s1)
(cd "$debs" && chmod 0755 "$work" "$debs" && apt-get download -q "${packages[@]}" >/dev/null) || {
  echo "build-e2b-image: apt-get download failed; run 'apt-get update' and retry" >&2
  exit 1
}
for deb in "$debs"/*.deb; do
  dpkg-deb -x "$deb" "$stage"
done
# busybox's applets are symlinks in /bin; bash's real binary replaces the applet
# (busybox has no `bash` applet in Debian's build, but be sure).
[ -x "$stage/bin/bash" ] || { echo "build-e2b-image: no /bin/bash after unpacking" >&2; exit 1; }
# Debian's usrmerge layout: the loader lives under /lib64 (or /usr/lib64).
if [ ! -e "$stage/lib64/ld-linux-x86-64.so.2" ] && [ -e "$stage/usr/lib64/ld-linux-x86-64.so.2" ]; then
  ln -s usr/lib64 "$stage/lib64"
fi

# The user E2B's SDK runs as, with its home; root keeps /root.
mkdir -p "$stage/home/user"
chmod 0755 "$stage/home/user"
printf 'root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000:user:/home/user:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$stage/etc/passwd"
printf 'root:x:0:\nuser:x:1000:\nnogroup:x:65534:\n' > "$stage/etc/group"
# A login shell (`bash -l`) reads /etc/profile: give it a PATH and nothing else.
printf 'export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n' > "$stage/etc/profile"

# Check that bash runs from the image's own libraries.
if ! "$stage/lib64/ld-linux-x86-64.so.2" --library-path "$stage/lib/x86_64-linux-gnu:$stage/usr/lib/x86_64-linux-gnu" \
    "$stage/bin/bash" -c 'exit 0'; then
  echo "build-e2b-image: the unpacked bash does not run" >&2
  exit 1
fi

# Everything is root's but the user's home, which is theirs (uid and gid 1000, as in
# /etc/passwd above): commands run as `user` create files there.
tar --numeric-owner --owner=0 --group=0 --exclude=./home/user -C "$stage" -cf "$out.tmp" .
tar --numeric-owner --owner=1000 --group=1000 -C "$stage" -rf "$out.tmp" ./home/user
mv "$out.tmp" "$out"
echo "build-e2b-image: wrote $out" >&2

if [ "$docker_import" = 1 ]; then
  docker import "$out" stacyvm-test/e2b-base:latest >/dev/null
  echo "build-e2b-image: imported stacyvm-test/e2b-base:latest into Docker" >&2
fi
echo "$out"
