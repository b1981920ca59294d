#!/usr/bin/env bash
# Writes the uncompressed kernel ELF (`vmlinux`) held inside an x86 bzImage,
# which is what Firecracker boots (QEMU boots the bzImage itself).
#
#   scripts/extract-vmlinux.sh BZIMAGE OUT
#
# The bzImage's setup header says where its compressed payload starts and
# how long it is (`payload_offset`, `payload_length`, boot protocol 2.08+);
# the payload's first bytes say how it is compressed (gzip, xz, zstd, lz4,
# bzip2 or lzma), and the matching tool unpacks it. The kernel's build
# appends the uncompressed size to the payload (4 bytes, little-endian):
# those are left out of what the tool reads and checked against what it
# wrote. The result must be an x86-64 ELF of that size or nothing is
# written. Needs GNU od and dd and the decompressor in use.
set -euo pipefail

die() { echo "extract-vmlinux: $*" >&2; exit 1; }

[ $# -eq 2 ] || die "usage: extract-vmlinux.sh BZIMAGE OUT"
image="$1"
out="$2"
[ -f "$image" ] || die "$image is not a file"

# Little-endian unsigned integer of $2 bytes at offset $1.
uint() {
  local v
  v="$(od -An -t u"$2" -j "$1" -N "$2" --endian=little "$image" | tr -d ' \n')"
  [ -n "$v" ] || die "$image is too short for a bzImage header"
  echo "$v"
}
# The bytes at offset $1, $2 of them, as lowercase hex.
hex() { od -An -t x1 -j "$1" -N "$2" "$image" | tr -d ' \n'; }

[ "$(hex 514 4)" = "48647253" ] || die "$image is not a bzImage (no HdrS signature)"
version="$(uint 518 2)"
[ "$version" -ge 520 ] || die "$image uses boot protocol $((version >> 8)).$((version & 255)); 2.08 or later names its payload"
setup_sects="$(uint 497 1)"
[ "$setup_sects" -ne 0 ] || setup_sects=4
payload_offset="$(uint 584 4)"
payload_length="$(uint 588 4)"
start=$(((setup_sects + 1) * 512 + payload_offset))
size="$(stat -c %s "$image")"
[ "$payload_length" -gt 4 ] && [ $((start + payload_length)) -le "$size" ] ||
  die "$image names a payload ($payload_length bytes at $start) beyond its end ($size bytes)"

magic="$(hex "$start" 6)"
case "$magic" in
  1f8b*) tool=(gzip -dc) ;;
  fd377a585a00) tool=(xz -dc) ;;
  28b52ffd*) tool=(zstd -dcq) ;;
  02214c18*) tool=(lz4 -dcq) ;;
  425a68*) tool=(bzip2 -dc) ;;
  5d0000*) tool=(lzma -dc) ;;
  *) die "$image's payload starts with $magic, which is no known compression" ;;
esac
command -v "${tool[0]}" >/dev/null 2>&1 || die "the payload is ${tool[0]}-compressed and ${tool[0]} is not installed"

tmp="$(mktemp "$(dirname "$out")/.vmlinux.XXXXXX")"
trap 'rm -f "$tmp"' EXIT
expected="$(uint $((start + payload_length - 4)) 4)"
dd if="$image" iflag=skip_bytes,count_bytes skip="$start" count=$((payload_length - 4)) bs=1M status=none |
  "${tool[@]}" >"$tmp" ||
  die "${tool[0]} could not unpack the payload"
got="$(stat -c %s "$tmp")"
[ "$got" = "$expected" ] || die "the payload unpacked to $got bytes, the bzImage says $expected"
# ELF, 64-bit, little-endian, for x86-64 (e_machine 62).
[ "$(od -An -t x1 -N 6 "$tmp" | tr -d ' \n')" = "7f454c460201" ] || die "the payload is not a 64-bit ELF"
[ "$(od -An -t u2 -j 18 -N 2 --endian=little "$tmp" | tr -d ' ')" = 62 ] || die "the payload is not an x86-64 kernel"
chmod 0644 "$tmp"
mv -f "$tmp" "$out"
trap - EXIT
