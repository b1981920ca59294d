#!/usr/bin/env bash
# Prepares what the microVM providers boot: a guest kernel from Debian's
# `linux-image-*-cloud-amd64` package and an initramfs that loads the virtio
# and vsock modules, mounts the sandbox's ext4 root and starts the StacyVM
# agent there. Also installs QEMU, e2fsprogs, busybox-static and
# vhost-device-vsock. Idempotent: a guest directory that is complete is
# left alone. Prints the guest directory.
#
#   scripts/build-guest.sh [GUEST_DIR]   (default $STACYVM_GUEST_DIR or /var/lib/stacyvm/guest)
#
# The guest directory holds:
#   vmlinuz          the kernel (bzImage) QEMU boots
#   initramfs.cpio.gz busybox, the modules and /init
#   vmlinux          the same kernel uncompressed, an ELF (what Firecracker boots;
#                    scripts/extract-vmlinux.sh)
#   kernel-release   the kernel's release string (e.g. 6.1.0-57-cloud-amd64)
# The provider adds the agent itself (an initramfs part of its own), so a
# rebuilt agent needs no rebuilt guest.
set -euo pipefail
root_dir="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=scripts/lib.sh
. "$root_dir/scripts/lib.sh"

guest_dir="${1:-${STACYVM_GUEST_DIR:-/var/lib/stacyvm/guest}}"

ensure_packages qemu-system-x86 qemu-utils e2fsprogs busybox-static cpio iproute2 nftables lz4 ||
  { log "could not install QEMU, e2fsprogs and busybox-static"; exit 1; }

if ! command -v vhost-device-vsock >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/vhost-device-vsock" ]; then
  ensure_cargo || exit 1
  log "installing vhost-device-vsock (cargo install; a few minutes the first time)"
  nice -n 10 cargo install -q --locked vhost-device-vsock >&2 ||
    { log "cargo install vhost-device-vsock failed"; exit 1; }
fi

# The modules the guest needs, in no particular order: modprobe follows
# their dependencies through the modules.dep made below.
modules="virtio_pci virtio_mmio virtio_blk virtio_net vmw_vsock_virtio_transport"
# Changes with /init below, so a guest directory made by an older script
# is made again.
init_version=5

if [ -s "$guest_dir/vmlinuz" ] && [ -s "$guest_dir/initramfs.cpio.gz" ] && [ -s "$guest_dir/kernel-release" ] &&
  [ "$(cat "$guest_dir/init-version" 2>/dev/null)" = "$init_version" ] &&
  [ "$(cat "$guest_dir/modules" 2>/dev/null)" = "$modules" ]; then
  # A guest directory from before vmlinux was part of it gains one.
  if [ ! -s "$guest_dir/vmlinux" ]; then
    "$root_dir/scripts/extract-vmlinux.sh" "$guest_dir/vmlinuz" "$guest_dir/vmlinux" ||
      { log "could not extract vmlinux from $guest_dir/vmlinuz"; exit 1; }
  fi
  echo "$guest_dir"
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# The package the meta-package points at: apt-get download fetches only the
# named package, never its dependencies.
meta=linux-image-cloud-amd64
pkg="$(apt-cache depends "$meta" 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[^ ]*-cloud-amd64\)$/\1/p' | head -n 1)"
if [ -z "$pkg" ]; then
  apt-get update -q >&2 || true
  pkg="$(apt-cache depends "$meta" 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[^ ]*-cloud-amd64\)$/\1/p' | head -n 1)"
fi
[ -n "$pkg" ] || { log "Debian's $meta package was not found (apt-get update?)"; exit 1; }
log "fetching the guest kernel $pkg"
(cd "$work" && apt-get download "$pkg" >&2 2>/dev/null) || (cd "$work" && apt-get download "$pkg" >&2) ||
  { log "apt-get download $pkg failed"; exit 1; }
mkdir "$work/pkg"
dpkg-deb -x "$work"/"$pkg"_*.deb "$work/pkg"
release="$(basename "$(ls -d "$work"/pkg/lib/modules/*/)")"

# The initramfs: busybox, the modules with a modules.dep, and /init.
ird="$work/initramfs"
mkdir -p "$ird"/{bin,dev,proc,sys,newroot,lib/modules}
cp /bin/busybox "$ird/bin/busybox"
cp -a "$work/pkg/lib/modules/$release" "$ird/lib/modules/"
# Only the driver trees the guest can use: the package holds ~100 MB of
# modules, the guest needs a few hundred KB.
kmods="$ird/lib/modules/$release/kernel"
keep=" virtio virtio_ring virtio_pci virtio_mmio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_blk virtio_net net_failover failover vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport fuse virtiofs "
find "$kmods" -name '*.ko*' | while read -r f; do
  name="$(basename "$f")"
  name="${name%%.ko*}"
  case "$keep" in *" $name "*) ;; *) rm -f "$f" ;; esac
done
find "$kmods" -type d -empty -delete
busybox depmod -b "$ird" "$release"

cat >"$ird/init" <<'INIT'
#!/bin/busybox sh
# StacyVM guest init: loads the drivers, mounts the sandbox's root (vda),
# unpacks the sandbox's settings (vdb, a tar) and hands over to the agent.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
fail() { echo "stacyvm-init: $*" >/dev/console; sleep 1; poweroff -f; }
for m in @MODULES@; do modprobe "$m" || fail "cannot load $m"; done
i=0
while [ ! -b /dev/vda ] || [ ! -b /dev/vdb ]; do
  i=$((i + 1)); [ "$i" -gt 200 ] && fail "no disks (vda, vdb)"; sleep 0.05
done
mount -t ext4 -o noatime /dev/vda /newroot || fail "cannot mount the root file system"
for d in proc sys dev tmp .stacyvm; do
  [ -L "/newroot/$d" ] && rm -f "/newroot/$d"
  mkdir -p "/newroot/$d"
done
mount -t tmpfs -o mode=0700,size=64m stacyvm /newroot/.stacyvm
tar -x -f /dev/vdb -C /newroot/.stacyvm || fail "cannot read the sandbox settings"
cp /stacyvm-agent /newroot/.stacyvm/agent || fail "the initramfs holds no agent"
chmod 0555 /newroot/.stacyvm/agent
wd=/
if [ -s /newroot/.stacyvm/workdir ]; then wd="$(cat /newroot/.stacyvm/workdir)"; mkdir -p "/newroot$wd"; fi
if [ -s /newroot/.stacyvm/hostname ]; then hostname "$(cat /newroot/.stacyvm/hostname)"; fi
ip link set lo up 2>/dev/null
if [ -s /newroot/.stacyvm/net ]; then
  # "ADDR/PREFIX GATEWAY [ON-LINK]" for eth0, set up by the host's tap; the
  # on-link address (the DNS filter of a guest with an allow list) is
  # reached directly, not through the gateway.
  read -r addr gw onlink </newroot/.stacyvm/net
  ip link set eth0 up && ip addr add "$addr" dev eth0 && ip route add default via "$gw" ||
    fail "cannot configure eth0"
  if [ -n "$onlink" ]; then ip route add "$onlink" dev eth0 || fail "cannot route to $onlink"; fi
fi
if [ -s /newroot/.stacyvm/volumes ]; then
  # "TAG ro|rw PATH" per volume, each a virtiofs device of that tag. A
  # mount that cannot be made is recorded, not fatal: the provider reads
  # the record once the agent answers and fails the spawn with it. Lines
  # starting "path: " are the request's fault, "host: " the host's.
  modprobe virtiofs || echo "host: cannot load virtiofs" >>/newroot/.stacyvm/volume-errors
  while read -r tag mode path; do
    [ -n "$tag" ] || continue
    if ! mkdir -p "/newroot$path"; then
      echo "path: $path cannot be made in the image" >>/newroot/.stacyvm/volume-errors; continue
    fi
    case "$(readlink -f "/newroot$path")" in
      /newroot/*) ;;
      *) echo "path: $path goes through a symbolic link out of the image's root" >>/newroot/.stacyvm/volume-errors; continue ;;
    esac
    mount -t virtiofs -o "$mode,nosuid,nodev" "$tag" "/newroot$path" ||
      echo "host: the virtiofs mount of $tag at $path failed" >>/newroot/.stacyvm/volume-errors
  done </newroot/.stacyvm/volumes
fi
if [ -f /newroot/.stacyvm/resolv.conf ]; then
  # The sandbox's resolvers replace the image's (a link there included).
  rm -f /newroot/etc/resolv.conf
  mkdir -p /newroot/etc && cp /newroot/.stacyvm/resolv.conf /newroot/etc/resolv.conf &&
    chmod 0644 /newroot/etc/resolv.conf
fi
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 shm /newroot/dev/shm
echo "stacyvm-init: starting the agent" >/dev/console
exec switch_root /newroot /.stacyvm/agent --init --vsock 1024 --cwd "$wd" --env-file /.stacyvm/env
INIT
sed -i "s/@MODULES@/$modules/" "$ird/init"
chmod 0755 "$ird/init"

mkdir -p "$guest_dir"
(cd "$ird" && find . -print0 | cpio --null -o -H newc --quiet | gzip -9) >"$work/initramfs.cpio.gz"
cp "$work/pkg/boot/vmlinuz-$release" "$work/vmlinuz"
"$root_dir/scripts/extract-vmlinux.sh" "$work/vmlinuz" "$work/vmlinux" ||
  { log "could not extract vmlinux from the kernel package"; exit 1; }
for f in vmlinuz vmlinux initramfs.cpio.gz; do
  install -m 0644 "$work/$f" "$guest_dir/$f.tmp" && mv -f "$guest_dir/$f.tmp" "$guest_dir/$f"
done
echo "$release" >"$guest_dir/kernel-release"
echo "$modules" >"$guest_dir/modules"
echo "$init_version" >"$guest_dir/init-version"
log "guest kernel $release and initramfs in $guest_dir"
echo "$guest_dir"
