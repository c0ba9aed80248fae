#!/usr/bin/env bash
# linux-guest.sh — builds livemig's Linux test guest (L2): Debian's stock 6.1 kernel, a busybox
# initramfs that starts guest/workload.rs, an ext4 disk image, and the firmware files QEMU needs.
#
# Why: Linux guests need real KVM, which exists here only inside the nested TCG VM that
# scripts/rdma-vm.sh boots (DESIGN.md sections 6-7). This script builds everything such a guest
# needs on the host; copy the files into that VM with `rdma-vm.sh run --files ...`.
#
# Usage:
#   scripts/linux-guest.sh build    build what is missing, print the paths (KEY=VALUE, stdout)
#   scripts/linux-guest.sh paths    print the paths only if everything is built (else exit 1)
#   scripts/linux-guest.sh clean    delete the cache dir
#
# Printed keys:
#   KERNEL_BZIMAGE   Debian's vmlinuz (QEMU -kernel via linuxboot_dma.bin)
#   KERNEL_VMLINUX   the ELF inside it (QEMU -kernel via PVH, pvh.bin; livemig's VMM wants this)
#   INITRD           initramfs.cpio (uncompressed newc: see rdma-vm.sh's pack_cpio)
#   DISK_TEMPLATE    disk.img, sparse raw ext4; copy it per guest (cp --sparse=always)
#   QEMU_FIRMWARE    dir for QEMU's -L (bios-256k.bin, linuxboot_dma.bin, pvh.bin, ...)
#   WORKLOAD         the static workload binary (also inside the initramfs)
#   KERNEL_VERSION   e.g. 6.1.0-57-amd64
#
# The guest's /init loads virtio_pci/virtio_mmio/virtio_blk/virtio_net/virtio_rng/ext4, mounts
# /dev/vda (ext4) at /mnt if present, configures eth0 from `livemig.ip=ADDR/PREFIX` (optional
# `livemig.gw=ADDR`), prints `livemig-guest: init done` and runs the workload on the console
# (stdin/stdout = /dev/console, i.e. ttyS0 with console=ttyS0). When the workload exits the
# guest powers off. `livemig.shell` on the kernel command line starts a busybox shell instead.
# Workload parameters (see guest/workload.rs): livemig.ws=MiB livemig.rate=PAGES_PER_S
# livemig.pattern=seq|random livemig.disk=PATH|none livemig.echo=PORT.
#
# Example kernel command line:
#   console=ttyS0 quiet panic=-1 livemig.ip=10.0.0.2/24 livemig.echo=7 livemig.ws=64
#
# Knobs: LIVEMIG_GUEST_CACHE (default /var/tmp/livemig-linux-guest), LIVEMIG_GUEST_DISK_MB
# (default 64). The kernel comes from rdma-vm.sh's cache (LIVEMIG_RDMA_CACHE,
# LIVEMIG_RDMA_KERNEL_PKG), so both VMs always run the same kernel.
set -euo pipefail

LG_SELF="$(readlink -f "${BASH_SOURCE[0]}")"
LG_ROOT="$(dirname "$(dirname "$LG_SELF")")"
LG_CACHE="${LIVEMIG_GUEST_CACHE:-/var/tmp/livemig-linux-guest}"
LG_DISK_MB="${LIVEMIG_GUEST_DISK_MB:-64}"
LG_WORKLOAD_SRC="$LG_ROOT/guest/workload.rs"

# rdma-vm.sh defines its functions without running anything when sourced: ensure_packages,
# ensure_kernel (sets KVER/KROOT, fetches and unpacks the kernel package), make_skeleton,
# pack_cpio, die. Its own PACKAGES list is replaced by ours below.
# shellcheck source=rdma-vm.sh
. "$LG_ROOT/scripts/rdma-vm.sh"

glog() { printf 'linux-guest: %s\n' "$*" >&2; }
die() { glog "error: $*"; exit 1; } # replaces rdma-vm.sh's (whose 125 means "VM failed")

# Modules the guest loads, in this order. virtio_pci: QEMU's devices are PCI; virtio_mmio: for
# VMMs (livemig's) that put virtio devices on MMIO. crc32c_generic before ext4: ext4's metadata
# checksums look up the "crc32c" crypto algorithm at mount time, and without a loaded provider
# the kernel would have to call modprobe itself. crc32c_intel (SSE4.2) is only faster.
GUEST_MODULES=(virtio_pci virtio_mmio virtio_blk virtio_net virtio_rng crc32c_generic
  crc32c_intel ext4)
GUEST_OPTIONAL_MODULES=" crc32c_intel "

usage() { sed -n '2,/^set -euo/p' "$LG_SELF" | sed '$d; s/^# \{0,1\}//'; }

# ---------------------------------------------------------------------------------------------

# The guest's PID 1 (busybox sh). Never exits: PID 1 exiting panics the kernel.
write_guest_init() {
  cat >"$1/init" <<'INIT'
#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1

param() { # livemig.NAME=VALUE from the kernel command line -> VALUE (last one wins)
  v=; for t in $(cat /proc/cmdline); do case "$t" in "livemig.$1="*) v="${t#*=}" ;; esac; done
  echo "$v"
}
has_flag() { for t in $(cat /proc/cmdline); do [ "$t" = "livemig.$1" ] && return 0; done; return 1; }

# Loud but not fatal: a guest without, say, virtio_rng is still useful, and the message says
# exactly what is missing.
for m in $(cat /etc/livemig-modules); do
  modprobe "$m" 2>/tmp/modprobe.err || case " $(cat /etc/livemig-optional-modules) " in
    *" $m "*) ;;
    *) echo "livemig-guest: ERROR: modprobe $m failed: $(cat /tmp/modprobe.err)" ;;
  esac
done
# From here on only emergencies on the console: a late printk (e.g. "random: crng init done")
# would otherwise land in the middle of the workload's lines.
dmesg -n 1

# virtio_blk registers the disk during modprobe, but give devtmpfs a moment anyway.
i=0; while [ ! -b /dev/vda ] && [ $i -lt 20 ]; do sleep 0.1; i=$((i + 1)); done
if [ -b /dev/vda ]; then
  mount -t ext4 /dev/vda /mnt || echo "livemig-guest: ERROR: mount /dev/vda (ext4) on /mnt failed"
fi

ip link set lo up
ip=$(param ip)
if [ -n "$ip" ]; then
  { ip addr add "$ip" dev eth0 && ip link set eth0 up; } ||
    echo "livemig-guest: ERROR: cannot configure eth0 with $ip"
  gw=$(param gw)
  [ -z "$gw" ] || ip route add default via "$gw" || echo "livemig-guest: ERROR: route via $gw"
fi

echo "livemig-guest: init done"
if has_flag shell; then
  setsid -c sh # -c: the console becomes the shell's controlling tty (job control, ^C)
else
  # No tty echo: commands typed at the workload would otherwise be echoed into the middle of
  # its output ("tick 5poweroff"); the workload acknowledges every command with a line itself.
  stty -echo 2>/dev/null
  # The workload only calls reboot(2) itself when it sees LIVEMIG_GUEST=1 (safety off-guest).
  LIVEMIG_GUEST=1 /usr/bin/livemig-workload
  echo "livemig-guest: workload exited with status $?"
fi
sync
poweroff -f
while :; do sleep 1000; done
INIT
  chmod 755 "$1/init"
}

# Inputs that decide the build; the cache dir is keyed by their hash (like rdma-vm.sh's base).
build_key() {
  {
    cat "$LG_SELF" "$LG_WORKLOAD_SRC"
    echo "$KVER|$LG_DISK_MB"
    rustc --version
    dpkg-query -W busybox-static e2fsprogs seabios qemu-system-data ipxe-qemu libc6 2>/dev/null
  } | sha256sum | cut -c1-16
}

build_initramfs() { # staging-dir output
  local st="$1" out="$2" a m p line
  # Plain dirs (not rdma-vm.sh's merged-/usr skeleton): busybox's --list-full names applets by
  # their classic paths (sbin/modprobe, bin/sh, usr/bin/...), and the kernel's usermode helper
  # calls /sbin/modprobe.
  mkdir -p "$st"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,root,mnt}
  chmod 1777 "$st/tmp"
  cp /bin/busybox "$st/bin/busybox"
  for a in $(/bin/busybox --list-full); do
    [ "$a" = bin/busybox ] || [ -e "$st/$a" ] || ln -s /bin/busybox "$st/$a"
  done
  cp "$LG_CACHE/$KEY/workload" "$st/usr/bin/livemig-workload"

  # Kernel modules: the dependency closure, decompressed (busybox modprobe can't read .ko.xz)
  # and indexed with depmod, as in rdma-vm.sh.
  local mdir="lib/modules/$KVER" deps="$st.deps"
  mkdir -p "$st/$mdir"
  : >"$deps"
  for m in "${GUEST_MODULES[@]}"; do
    modprobe -d "$KROOT" -S "$KVER" --show-depends "$m" >>"$deps" 2>/dev/null ||
      die "module $m not in $KVER"
  done
  while read -r line; do
    [ "${line%% *}" = insmod ] || continue
    p="$(awk '{print $2}' <<<"$line")"
    m="${p#"$KROOT"/}"
    mkdir -p "$st/$(dirname "$m")"
    case "$p" in
      *.ko.xz) xz -dc "$p" >"$st/${m%.xz}" ;;
      *.ko.zst) zstd -qdc "$p" >"$st/${m%.zst}" ;;
      *.ko.gz) gzip -dc "$p" >"$st/${m%.gz}" ;;
      *) cp "$p" "$st/$m" ;;
    esac
  done < <(sort -u "$deps")
  rm -f "$deps"
  for a in modules.order modules.builtin modules.builtin.modinfo; do
    [ -e "$KROOT/$mdir/$a" ] && cp "$KROOT/$mdir/$a" "$st/$mdir/"
  done
  depmod -b "$st" "$KVER"
  echo "${GUEST_MODULES[*]}" >"$st/etc/livemig-modules"
  echo "$GUEST_OPTIONAL_MODULES" >"$st/etc/livemig-optional-modules"

  write_guest_init "$st"
  echo 'root:x:0:0:root:/root:/bin/sh' >"$st/etc/passwd"
  # The kernel gives /init its stdio from /dev/console before devtmpfs exists.
  mknod -m 600 "$st/dev/console" c 5 1 2>/dev/null || true
  pack_cpio "$st" "$out"
}

build() {
  mkdir -p "$LG_CACHE" "$CACHE"
  # The kernel cache is rdma-vm.sh's: hold its lock while ensure_kernel may unpack or prune it.
  exec 9>"$CACHE/.lock"
  flock 9
  PACKAGES=(busybox-static cpio kmod e2fsprogs xz-utils zstd qemu-system-x86 seabios
    qemu-system-data ipxe-qemu file)
  ensure_packages
  ensure_kernel
  flock -u 9
  command -v rustc >/dev/null || die "no rustc on PATH (needed for guest/workload.rs)"

  exec 8>"$LG_CACHE/.lock"
  flock 8
  KEY="$(build_key)"
  local d="$LG_CACHE/$KEY"
  if [ ! -e "$d/.done" ]; then
    glog "building guest $KEY (kernel $KVER)"
    rm -rf "$d"
    mkdir -p "$d"

    # -C strip=symbols: 1.3 MB instead of 5 MB in every initramfs. +crt-static with the gnu
    # target links glibc's libc.a; `file` calls the result "static-pie linked".
    nice -n 10 rustc -O -C target-feature=+crt-static -C strip=symbols --edition 2021 \
      "$LG_WORKLOAD_SRC" -o "$d/workload" >&2
    file "$d/workload" | grep -q 'static' || die "workload is not statically linked"

    local st="$d/staging"
    build_initramfs "$st" "$d/initramfs.cpio"
    rm -rf "$st"

    # Hard links (same filesystem as rdma-vm.sh's cache, normally): a newer kernel package
    # makes rdma-vm.sh delete the old one, and our initramfs's modules must match this kernel.
    ln -f "$KROOT/boot/vmlinuz-$KVER" "$d/bzImage" 2>/dev/null || cp "$KROOT/boot/vmlinuz-$KVER" "$d/bzImage"
    ln -f "$KROOT/vmlinux" "$d/vmlinux" 2>/dev/null || cp "$KROOT/vmlinux" "$d/vmlinux"

    # Sparse and fully initialised: lazy_itable_init=0/lazy_journal_init=0 keep the guest
    # kernel's ext4lazyinit thread from zeroing inode tables in the background after the first
    # mount — disk writes that would compete with the workload (and dirty the image) under TCG.
    truncate -s "${LG_DISK_MB}M" "$d/disk.img"
    mkfs.ext4 -q -F -L livemig -E lazy_itable_init=0,lazy_journal_init=0 "$d/disk.img" >&2

    # The firmware QEMU needs for this guest, for `-L DIR` where /usr/share/qemu is absent
    # (inside the nested VM): SeaBIOS, the -kernel loaders (bzImage: linuxboot_dma.bin, ELF
    # vmlinux: pvh.bin), kvmvapic.bin (pc machine + KVM) and virtio-net-pci's option ROM.
    mkdir -p "$d/qemu-fw"
    local f
    for f in /usr/share/seabios/bios-256k.bin /usr/share/qemu/linuxboot_dma.bin \
      /usr/share/qemu/linuxboot.bin /usr/share/qemu/pvh.bin /usr/share/qemu/kvmvapic.bin \
      /usr/share/qemu/multiboot_dma.bin /usr/lib/ipxe/qemu/efi-virtio.rom; do
      cp -L "$f" "$d/qemu-fw/" || die "missing QEMU firmware $f"
    done
    echo "$KVER" >"$d/kernel-version"
    touch "$d/.done"
    # Older builds: keep only the current one (each holds a vmlinux link and a disk).
    find "$LG_CACHE" -mindepth 1 -maxdepth 1 -type d ! -name "$KEY" -exec rm -rf {} +
  fi
  flock -u 8
  print_paths "$d"
}

print_paths() {
  local d="$1"
  echo "KERNEL_BZIMAGE=$d/bzImage"
  echo "KERNEL_VMLINUX=$d/vmlinux"
  echo "INITRD=$d/initramfs.cpio"
  echo "DISK_TEMPLATE=$d/disk.img"
  echo "QEMU_FIRMWARE=$d/qemu-fw"
  echo "WORKLOAD=$d/workload"
  echo "KERNEL_VERSION=$KVER"
}

paths() {
  # No package installs, no downloads: the newest complete build in the cache.
  local d
  d="$(find "$LG_CACHE" -mindepth 2 -maxdepth 2 -name .done -printf '%T@ %h\n' 2>/dev/null |
    sort -n | tail -n1 | cut -d' ' -f2-)"
  [ -n "$d" ] || { glog "nothing built yet: run '$0 build'"; exit 1; }
  KVER="$(cat "$d/kernel-version")"
  print_paths "$d"
}

lg_main() {
  case "${1:-}" in
    build) build ;;
    paths) paths ;;
    clean) rm -rf "$LG_CACHE" ;;
    -h | --help | help | "") usage ;;
    *) usage >&2; exit 2 ;;
  esac
}

lg_main "$@"
