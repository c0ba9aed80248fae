#!/usr/bin/env bash
# rdma-vm.sh — a throw-away QEMU (TCG) VM with soft-RoCE (rdma_rxe) for livemig's RDMA tests.
#
# Why a VM at all: the host kernel (and CI's) has no RDMA support, and KVM here is a paravirtual
# flavour that cannot boot a stock kernel. So we boot Debian 12's own 6.1 kernel under pure TCG
# emulation, straight from an uncompressed vmlinux (PVH entry, no bootloader, no disk image) with
# a small initramfs whose /init sets up rxe and runs one command. See DESIGN.md section 7.
#
# Usage:
#   scripts/rdma-vm.sh prepare                      install packages, fetch kernel, build initramfs
#   scripts/rdma-vm.sh run [OPTIONS] [--files FILE...] -- COMMAND [ARGS...]
#   scripts/rdma-vm.sh selftest                     ibv_devices/ibv_devinfo/rdma link + ib_write_bw
#   scripts/rdma-vm.sh bw SIZE ITERS                prints IB_WRITE_BW_MBPS=<x> on stdout
#   scripts/rdma-vm.sh clean                        delete the cache dir
#
# run OPTIONS (each also settable from the environment):
#   --files F...      host files/dirs copied to /opt/livemig/ in the VM (until the next option or
#                     `--`); for ELF files their `ldd` libraries are added too.
#   --env NAME=VALUE  exported to COMMAND (repeatable).
#   --timeout SECS    whole-VM wall clock limit           [LIVEMIG_RDMA_TIMEOUT, default 900]
#   --mode MODE       veth | single | lo (see below)      [LIVEMIG_RDMA_MODE,    default veth]
#   --mtu BYTES       veth MTU (1500: RoCE MTU 1024; 9000: 4096)    [LIVEMIG_RDMA_MTU, default 1500]
#   --mem MIB / --smp N                                   [LIVEMIG_RDMA_MEM 2048, LIVEMIG_RDMA_SMP 2]
#
# Inside the VM COMMAND runs under bash as root, cwd /opt/livemig, stdin /dev/null, with
#   PATH=/opt/livemig:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/bb   (/bb = busybox applets)
#   LIVEMIG_RDMA_DEVICES   e.g. "rxe0 rxe1"           (index-aligned with the next two)
#   LIVEMIG_RDMA_ADDRS     e.g. "10.0.99.1 10.0.99.2" (IPv4 address of each device's netdev)
#   LIVEMIG_RDMA_GIDS      e.g. "1 1"                 (RoCE v2 IPv4 GID index of each device)
#   LIVEMIG_RDMA_NETDEVS   e.g. "veth0 veth1"
#   LIVEMIG_RDMA_RAIL2_DEVICES, _ADDRS, _NETDEVS: a second rail (veth mode only; else empty):
#                          "rxe2 rxe3", "10.0.98.1 10.0.98.2", "veth2 veth3"
#   LIVEMIG_RDMA_MODE, LIVEMIG_RDMA_MTU, LIVEMIG_IN_VM=1
# Helpers in the VM: `livemig-ib-write-bw SIZE ITERS` (prints IB_WRITE_BW_MBPS=<x>), `livemig-selftest`.
#
# Modes (all three pass `selftest`-style ib_write_bw; 64 KiB x 2000 under TCG on this 2-core host):
#   veth   (default) veth0 10.0.99.1/24 <-> veth1 10.0.99.2/24, rxe0 on veth0, rxe1 on veth1:
#          two devices, packets really cross the veth pair (~25 MB/s). Both ends live in the
#          initial netns (rxe in 6.1 opens its UDP socket there only), so each side receives
#          packets from an address of its own and needs net.ipv4.conf.all.accept_local=1.
#          A second pair, veth2 10.0.98.1/24 <-> veth3 10.0.98.2/24 with rxe2 and rxe3, is a
#          second rail (a second NIC on each host) for multi-rail tests.
#   single rxe0 on veth0 only (10.0.99.1); both ends of a connection use the same device, which
#          rxe short-circuits internally (~42 MB/s).
#   lo     rxe0 on lo only (127.0.0.1), same idea (~60 MB/s; lo's 64 KiB MTU gives RoCE MTU 4096).
#   (veth with --mtu 9000: ~40-47 MB/s.)
#   Use veth for anything that models two hosts; single/lo when only the verbs matter.
#
# Exit status: COMMAND's own status; 124 if the timeout hit; 125 if the VM never reported a
# status (kernel panic, /init crash, QEMU failure) or the in-VM RDMA setup failed.
#
# Other knobs: LIVEMIG_RDMA_CACHE (default /var/tmp/livemig-rdma: extracted kernel ~450 MB,
# vmlinux, base initramfs ~20 MB; a warm run only packs the per-run files and boots, ~5 s),
# LIVEMIG_RDMA_KERNEL_PKG (pin e.g. linux-image-6.1.0-56-amd64; default: newest apt offers),
# LIVEMIG_RDMA_EXTRA_BINS ("strace gdb": host programs added to the VM with their libraries),
# LIVEMIG_RDMA_EXTRA_MODULES (more kernel modules to load), LIVEMIG_RDMA_APPEND (kernel args).
#
# Example: run a cargo test binary (host-built, dynamically linked) inside the VM:
#   bin=$(cargo test -p transport --release --no-run 2>&1 |
#         grep -o 'target/release/deps/[^)]*' | head -n1)   # "Executable ... (target/...)"
#   scripts/rdma-vm.sh run --files "$bin" -- "$(basename "$bin")" --test-threads=1
# Nothing comes back from the VM but its console: print what you need to stdout.
set -euo pipefail

SELF="$(readlink -f "${BASH_SOURCE[0]}")"
CACHE="${LIVEMIG_RDMA_CACHE:-/var/tmp/livemig-rdma}"
TIMEOUT="${LIVEMIG_RDMA_TIMEOUT:-900}"
MODE="${LIVEMIG_RDMA_MODE:-veth}"
MEM="${LIVEMIG_RDMA_MEM:-2048}"
SMP="${LIVEMIG_RDMA_SMP:-2}"
# veth MTU. rxe's active MTU is the largest IB MTU that fits: 1500 -> 1024, 9000 -> 4096, which
# about doubles 64 KiB ib_write_bw under TCG (fewer packets to checksum and copy).
MTU="${LIVEMIG_RDMA_MTU:-1500}"
# Extra host programs to put in the base initramfs (with their libraries), e.g. "strace gdb".
EXTRA_BINS="${LIVEMIG_RDMA_EXTRA_BINS:-}"
# Kernel command line. panic=-1 (with QEMU's -no-reboot) turns a panic into QEMU exiting.
# mitigations=off: no page-table isolation etc., whose TLB flushes are expensive under TCG.
# tsc=reliable: the kernel's TSC sync check fails under TCG and falls back to the HPET, making
# clock_gettime ~1.4 us (an emulated MMIO read) instead of ~75 ns; TCG's TSC is the host's and
# was checked monotonic across vCPUs. LIVEMIG_RDMA_APPEND adds to it.
CMDLINE="${LIVEMIG_RDMA_CMDLINE:-console=ttyS0 quiet panic=-1 mitigations=off tsc=reliable}"
CMDLINE="$CMDLINE ${LIVEMIG_RDMA_APPEND:-}"

# Packages on the host. ibverbs-utils/perftest/rdmacm-utils are only here to be copied into the
# VM; qemu-system-x86 pulls in seabios (whose PVH option ROM does the direct vmlinux boot).
PACKAGES=(qemu-system-x86 busybox-static bash cpio kmod iproute2 rdma-core ibverbs-providers
  libibverbs1 libibverbs-dev ibverbs-utils rdmacm-utils perftest xz-utils zstd coreutils)

# Modules for rxe. crc32_generic is the one that's easy to miss: rxe's ICRC needs the "crc32"
# crypto shash and without it `rdma link add` fails with a misleading ENOENT. crc32_pclmul is only
# a faster alternative (needs -cpu max for PCLMULQDQ under TCG); failing to load it is fine.
MODULES=(configfs crc32_generic crc32_pclmul crc32c_generic veth udp_tunnel ip6_udp_tunnel
  ib_core ib_uverbs rdma_rxe ib_cm iw_cm rdma_cm rdma_ucm)

log() { printf 'rdma-vm: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 125; }

# ---------------------------------------------------------------------------------------------
# Host packages

APT_UPDATED=0
apt_update_once() {
  if [ "$APT_UPDATED" = 0 ]; then
    log "apt-get update"
    apt-get update -qq >&2 || die "apt-get update failed"
    APT_UPDATED=1
  fi
}

ensure_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    # dpkg-query's status is the only reliable "installed" check (a removed-but-not-purged
    # package still has an entry, hence the status match).
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed'; then
      missing+=("$p")
    fi
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || die "missing packages (${missing[*]}); run as root or install them"
  log "installing: ${missing[*]}"
  apt_update_once
  # --no-install-recommends: qemu's recommends drag in a GUI stack we never use.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    >&2 || die "apt-get install failed"
}

# ---------------------------------------------------------------------------------------------
# Kernel: the newest versioned linux-image-6.1.0-N-amd64 that apt offers, unpacked (not installed:
# installing linux-image-* pulls in udev/systemd and runs initramfs hooks we don't want).

newest_kernel_pkg() {
  apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' 2>/dev/null |
    awk '{print $1}' | sort -V | tail -n1
}

# Writes the ELF vmlinux inside a bzImage to $2 (QEMU's PVH boot wants the ELF). Same idea as the kernel's
# scripts/extract-vmlinux: find each compressor's magic in the image, try to decompress from
# there, keep the first result that is an ELF file.
extract_vmlinux() {
  local img="$1" out="$2" tmp="$2.tmp"
  try_decompress() {
    # tr turns the first magic byte into a newline and newlines into a marker so grep -abo can
    # find byte offsets of the magic in a binary file.
    local pos
    for pos in $(tr "$1\n$2" "\n$2=" <"$img" | grep -abo "^$2" || true); do
      pos=${pos%%:*}
      tail -c+"$pos" "$img" | $3 >"$tmp" 2>/dev/null || true # trailing garbage => nonzero rc
      if [ "$(head -c4 "$tmp" | od -An -c | tr -d ' \n')" = '177ELF' ]; then
        mv "$tmp" "$out"
        return 0
      fi
    done
    return 1
  }
  # xz first: it's what Debian's amd64 kernels use.
  try_decompress '\3757zXZ\000' abcde 'xz -dc' ||
    try_decompress '\037\213\010' xy 'gzip -dc' ||
    try_decompress '(\265/\375' xxx 'zstd -dc' ||
    try_decompress '\135\0\0\0' xxx 'xz -dc --format=lzma' ||
    try_decompress 'BZh' xy 'bzip2 -dc' ||
    try_decompress '\002!L\030' xxx 'lz4 -dc' || {
    rm -f "$tmp"
    die "could not find a compressed vmlinux inside $img"
  }
}

fetch_kernel_pkg() { # pkg dir -> the .deb in dir
  # APT::Sandbox::User=root: as root, apt-get download otherwise warns that _apt can't write here.
  (cd "$2" && apt-get download -qq -o APT::Sandbox::User=root "$1") >&2
}

# Sets KVER and KROOT (the unpacked package root: KROOT/boot, KROOT/lib/modules/KVER).
ensure_kernel() {
  local pkg
  pkg="${LIVEMIG_RDMA_KERNEL_PKG:-$(newest_kernel_pkg)}"
  if [ -z "$pkg" ]; then # fresh machine: no apt lists yet
    apt_update_once
    pkg="$(newest_kernel_pkg)"
  fi
  if [ -z "$pkg" ]; then
    # Offline and no apt lists: fall back to whatever kernel is already cached.
    pkg="$(find "$CACHE/kernel" -mindepth 2 -maxdepth 2 -name .done -printf '%h\n' 2>/dev/null |
      xargs -r -n1 basename | sort -V | tail -n1)"
    pkg="${pkg:+linux-image-$pkg}"
  fi
  [ -n "$pkg" ] || die "apt offers no linux-image-6.1.0-*-amd64 package"
  KVER="${pkg#linux-image-}"
  KROOT="$CACHE/kernel/$KVER"
  if [ ! -e "$KROOT/.done" ]; then
    local dl="$CACHE/kernel/dl"
    rm -rf "$dl"
    mkdir -p "$dl"
    log "fetching $pkg"
    if ! fetch_kernel_pkg "$pkg" "$dl"; then
      # Stale apt lists name a package the mirror has already dropped (Debian removes the
      # previous ABI's kernel at each point release): refresh, pick again, retry once.
      apt_update_once
      [ -n "${LIVEMIG_RDMA_KERNEL_PKG:-}" ] || pkg="$(newest_kernel_pkg)"
      KVER="${pkg#linux-image-}"
      KROOT="$CACHE/kernel/$KVER"
      log "fetching $pkg (after apt-get update)"
      fetch_kernel_pkg "$pkg" "$dl" || die "apt-get download $pkg failed"
    fi
    rm -rf "$KROOT"
    mkdir -p "$KROOT"
    dpkg-deb -x "$dl"/"$pkg"_*.deb "$KROOT"
    rm -rf "$dl"
    [ -f "$KROOT/boot/vmlinuz-$KVER" ] || die "no boot/vmlinuz-$KVER in $pkg"
    # Debian generates modules.dep in postinst, which we don't run; modprobe -d needs it.
    depmod -b "$KROOT" "$KVER"
    touch "$KROOT/.done"
    # ~450 MB each: keep only the kernel in use.
    find "$CACHE/kernel" -mindepth 1 -maxdepth 1 -type d ! -name "$KVER" -exec rm -rf {} +
  fi
  if [ ! -s "$KROOT/vmlinux" ]; then
    log "extracting vmlinux from vmlinuz-$KVER"
    extract_vmlinux "$KROOT/boot/vmlinuz-$KVER" "$KROOT/vmlinux"
  fi
}

# ---------------------------------------------------------------------------------------------
# Initramfs assembly helpers. The staging trees use Debian's merged-/usr layout (bin -> usr/bin,
# lib -> usr/lib, ...) so paths as printed by ldd/command -v resolve wherever they point.

make_skeleton() {
  local root="$1" d
  mkdir -p "$root"/usr/{bin,sbin,lib,lib64} "$root"/{etc,proc,sys,dev,tmp,run,root,mnt,opt/livemig}
  for d in bin sbin lib lib64; do ln -sfn "usr/$d" "$root/$d"; done
  chmod 1777 "$root/tmp"
}

# Copy host files (dereferencing symlinks) to the same path under a staging root.
copy_in() {
  local root="$1" f
  shift
  for f in "$@"; do
    [ -e "$root$f" ] && continue
    cp -L --parents "$f" "$root/"
  done
}

# The libraries an ELF file needs, one path per line (empty for static binaries/non-ELF).
elf_libs() {
  local f="$1"
  [ "$(head -c4 "$f" 2>/dev/null | od -An -c | tr -d ' \n')" = '177ELF' ] || return 0
  # "libx.so => /path (0x...)" and "/lib64/ld-linux-x86-64.so.2 (0x...)"; "not found" is fatal
  # because the program would fail in the VM with a less obvious message.
  local out
  out="$(ldd "$f" 2>/dev/null || true)"
  if grep -q 'not found' <<<"$out"; then
    die "$f: $(grep 'not found' <<<"$out" | tr -s ' \t' ' ' | paste -sd';')"
  fi
  awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' <<<"$out"
}

# Pack a staging tree as an uncompressed newc cpio. Uncompressed on purpose: decompressing tens of
# MB under TCG costs seconds at every boot, while the kernel unpacks plain cpio almost for free.
pack_cpio() {
  (cd "$1" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
    cpio --null -o -H newc -R 0:0 --quiet) >"$2"
}

# ---------------------------------------------------------------------------------------------
# The /init and in-VM helpers (bash; busybox's own `ip` cannot create veth pairs).

write_init() {
  cat >"$1/init" <<'INIT'
#!/bin/bash
# PID 1 of the rdma-vm test VM. Never `exit` here: PID 1 exiting panics the kernel.
export PATH=/opt/livemig:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/bb
export HOME=/root TERM=dumb LANG=C.UTF-8
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
# The serial tty would turn \n into \r\n; keep the host's stream byte-clean.
stty -onlcr 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
ulimit -l unlimited # root has CAP_IPC_LOCK anyway, but child tools may check the limit

finish() { # $1 = status to report
  # The sentinel the host parses. The leading newline guards against output without a final one.
  dmesg -n 1 2>/dev/null # no "reboot: Restarting system" after the sentinel
  printf '\nLIVEMIG-EXIT=%s\n' "$1"
  # reboot(2) does not drain the UART: give the tty a moment so the sentinel reaches the host.
  sleep 0.3
  # QEMU runs with -no-reboot, so a reboot ends it; poweroff as a fallback.
  reboot -f 2>/dev/null; poweroff -f 2>/dev/null; sleep 5; echo b >/proc/sysrq-trigger
  exec 8<> <(:) # a pipe we hold both ends of: read on it blocks forever without any binary
  while :; do read -rt 1000 -u 8; done
}
setup_failed() {
  echo "rdma-vm: setup failed: $*"
  echo "rdma-vm: --- dmesg tail ---"; dmesg | tail -n 30
  echo "LIVEMIG-SETUP-FAILED"
  finish 125
}

. /etc/livemig/run.conf

for m in $(cat /etc/livemig/modules); do # written at build time from MODULES
  modprobe -q "$m" 2>/dev/null || case "$m" in
    crc32_pclmul|crc32c_generic) ;; # optional accelerations
    *) setup_failed "modprobe $m" ;;
  esac
done
grep -q " /sys/kernel/config " /proc/mounts || mount -t configfs configfs /sys/kernel/config

ip link set lo up
# Avoid tentative IPv6 link-local addresses (DAD) delaying the rxe GID table.
sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0 >/dev/null 2>&1
# Two rxe devices in one netns send to each other's *local* addresses; without accept_local the
# kernel drops those packets as martians and connections just time out.
sysctl -qw net.ipv4.conf.all.accept_local=1 >/dev/null || setup_failed "sysctl accept_local"
# The hosts' setting for guest RAM that README's "Huge pages" recommends: shared memory may
# have transparent huge pages where a process asks (MADV_HUGEPAGE), as livemig does for its
# memfd-backed guest RAM (QEMU's anonymous RAM has them anyway: THP "always" in this kernel).
echo advise >/sys/kernel/mm/transparent_hugepage/shmem_enabled 2>/dev/null

rail2_devs=() rail2_nets=() rail2_addrs=()
case "$LIVEMIG_RDMA_MODE" in
  veth)
    ip link add veth0 mtu "$LIVEMIG_RDMA_MTU" type veth peer name veth1 mtu "$LIVEMIG_RDMA_MTU" ||
      setup_failed "ip link add veth (mtu $LIVEMIG_RDMA_MTU)"
    ip addr add 10.0.99.1/24 dev veth0 && ip addr add 10.0.99.2/24 dev veth1 &&
      ip link set veth0 up && ip link set veth1 up || setup_failed "veth addresses"
    devs=(rxe0 rxe1) nets=(veth0 veth1) addrs=(10.0.99.1 10.0.99.2)
    # A second rail, as a second NIC per host: rxe2 on veth2 (source) <-> rxe3 on veth3.
    ip link add veth2 mtu "$LIVEMIG_RDMA_MTU" type veth peer name veth3 mtu "$LIVEMIG_RDMA_MTU" ||
      setup_failed "ip link add veth2 (mtu $LIVEMIG_RDMA_MTU)"
    ip addr add 10.0.98.1/24 dev veth2 && ip addr add 10.0.98.2/24 dev veth3 &&
      ip link set veth2 up && ip link set veth3 up || setup_failed "veth2 addresses"
    rail2_devs=(rxe2 rxe3) rail2_nets=(veth2 veth3) rail2_addrs=(10.0.98.1 10.0.98.2) ;;
  single)
    ip link add veth0 mtu "$LIVEMIG_RDMA_MTU" type veth peer name veth1 mtu "$LIVEMIG_RDMA_MTU" ||
      setup_failed "ip link add veth (mtu $LIVEMIG_RDMA_MTU)"
    ip addr add 10.0.99.1/24 dev veth0 && ip link set veth0 up && ip link set veth1 up ||
      setup_failed "veth addresses"
    devs=(rxe0) nets=(veth0) addrs=(10.0.99.1) ;;
  lo)
    devs=(rxe0) nets=(lo) addrs=(127.0.0.1) ;;
  *) setup_failed "unknown mode $LIVEMIG_RDMA_MODE" ;;
esac
all_devs=("${devs[@]}" "${rail2_devs[@]}") all_nets=("${nets[@]}" "${rail2_nets[@]}")
all_addrs=("${addrs[@]}" "${rail2_addrs[@]}")
for i in "${!all_devs[@]}"; do
  rdma link add "${all_devs[$i]}" type rxe netdev "${all_nets[$i]}" ||
    setup_failed "rdma link add ${all_devs[$i]}"
done

# GIDs are filled in asynchronously (ib_core's roce_gid_mgmt work queue) after the device
# registers; wait for each device's RoCE v2 IPv4 GID so the command never races with that.
gid_index() { # dev ipv4 -> index of the RoCE v2 GID ::ffff:ipv4
  local dev=$1 hex g t n
  hex=$(printf '%02x%02x:%02x%02x' ${2//./ })
  for g in /sys/class/infiniband/$dev/ports/1/gids/*; do
    n=${g##*/}
    [ "$(cat "$g" 2>/dev/null)" = "0000:0000:0000:0000:0000:ffff:$hex" ] || continue
    t=$(cat /sys/class/infiniband/$dev/ports/1/gid_attrs/types/$n 2>/dev/null) || continue
    [ "$t" = "RoCE v2" ] && { echo "$n"; return 0; }
  done
  return 1
}
gids=()
for i in "${!all_devs[@]}"; do
  for _ in $(seq 100); do
    g=$(gid_index "${all_devs[$i]}" "${all_addrs[$i]}") && break
    sleep 0.1
  done
  [ -n "${g:-}" ] || setup_failed "no RoCE v2 GID for ${all_addrs[$i]} on ${all_devs[$i]}"
  [ "$i" -lt "${#devs[@]}" ] && gids+=("$g")
  g=
done

export LIVEMIG_IN_VM=1 LIVEMIG_RDMA_MODE LIVEMIG_RDMA_MTU
export LIVEMIG_RDMA_DEVICES="${devs[*]}" LIVEMIG_RDMA_NETDEVS="${nets[*]}"
export LIVEMIG_RDMA_ADDRS="${addrs[*]}" LIVEMIG_RDMA_GIDS="${gids[*]}"
# The second rail (veth mode): source device first, as above.
export LIVEMIG_RDMA_RAIL2_DEVICES="${rail2_devs[*]}" LIVEMIG_RDMA_RAIL2_NETDEVS="${rail2_nets[*]}"
export LIVEMIG_RDMA_RAIL2_ADDRS="${rail2_addrs[*]}"
[ -f /etc/livemig/env.sh ] && . /etc/livemig/env.sh

cd /opt/livemig
/bin/bash /etc/livemig/cmd.sh </dev/null
finish $?
INIT
  chmod 755 "$1/init"

  mkdir -p "$1/usr/local/bin"
  cat >"$1/usr/local/bin/livemig-ib-write-bw" <<'BW'
#!/bin/bash
# livemig-ib-write-bw SIZE ITERS [SERVER_DEV CLIENT_DEV] — one ib_write_bw run between two rxe
# devices (default: last and first of $LIVEMIG_RDMA_DEVICES), over $LIVEMIG_IBWB_QPS queue
# pairs (default 1); prints perftest's report on stderr and `IB_WRITE_BW_MBPS=<avg>` (all QPs
# together) on stdout. perftest's MB is 2^20 bytes.
set -u
size=${1:?size} iters=${2:?iters} qps=${LIVEMIG_IBWB_QPS:-1}
read -ra devs <<<"$LIVEMIG_RDMA_DEVICES"; read -ra addrs <<<"$LIVEMIG_RDMA_ADDRS"
read -ra gids <<<"$LIVEMIG_RDMA_GIDS"
last=$((${#devs[@]} - 1))
sdev=${3:-${devs[$last]}} cdev=${4:-${devs[0]}}
idx() { local i; for i in "${!devs[@]}"; do [ "${devs[$i]}" = "$1" ] && echo "$i"; done; }
si=$(idx "$sdev") ci=$(idx "$cdev")
[ -n "$si" ] && [ -n "$ci" ] || { echo "unknown device $sdev/$cdev" >&2; exit 2; }
tmp=$(mktemp -d)
listening() { # port -> true once something LISTENs on it (state 0A) over IPv4 or IPv6
  grep -qi "^ *[0-9]*: [0-9A-F]*:$(printf '%04X' "$1") [0-9A-F:]* 0A " /proc/net/tcp /proc/net/tcp6 2>/dev/null
}
for attempt in 1 2 3 4 5; do
  # A fresh port per attempt: a half-dead server from a failed attempt can't steal the client.
  port=$((18515 + attempt))
  timeout 300 ib_write_bw -d "$sdev" -x "${gids[$si]}" -s "$size" -n "$iters" -q "$qps" -F -p "$port" \
    >"$tmp/server" 2>&1 &
  spid=$!
  # Servers started before clients need waiting for; poll the TCP listen socket, not a sleep.
  for _ in $(seq 100); do listening "$port" && break; kill -0 "$spid" 2>/dev/null || break; sleep 0.1; done
  timeout 300 ib_write_bw -d "$cdev" -x "${gids[$ci]}" -s "$size" -n "$iters" -q "$qps" -F -p "$port" \
    "${addrs[$si]}" >"$tmp/client" 2>&1
  crc=$?
  # A server whose client never came would sit out its whole timeout: give it 5 s, then stop it.
  for _ in $(seq 50); do kill -0 "$spid" 2>/dev/null || break; sleep 0.1; done
  kill "$spid" 2>/dev/null
  wait "$spid"; src=$?
  cat "$tmp/client" >&2
  # The result row: "#bytes #iterations BW-peak BW-average MsgRate". perftest sometimes fails
  # its clock calibration *after* a good transfer, so trust the row over the exit status.
  # (With several QPs perftest counts the iterations of all of them.)
  bw=$(awk -v s="$size" -v n="$iters" -v q="$qps" '$1 == s && ($2 == n || $2 == n * q) && NF >= 4 {print $4}' "$tmp/client" | tail -n1)
  if [ -n "$bw" ]; then
    echo "IB_WRITE_BW_MBPS=$bw"
    rm -rf "$tmp"; exit 0
  fi
  echo "livemig-ib-write-bw: attempt $attempt failed (client rc=$crc, server rc=$src); server said:" >&2
  cat "$tmp/server" >&2
  sleep 1
done
rm -rf "$tmp"
exit 1
BW
  cat >"$1/usr/local/bin/livemig-selftest" <<'ST'
#!/bin/bash
# livemig-selftest: the in-VM part of `rdma-vm.sh selftest`.
set -u
fail=0
step() { echo "== $*"; "$@" || { echo "!! FAILED: $*"; fail=1; }; }
echo "mode=$LIVEMIG_RDMA_MODE devices=[$LIVEMIG_RDMA_DEVICES] addrs=[$LIVEMIG_RDMA_ADDRS] gids=[$LIVEMIG_RDMA_GIDS]"
step ibv_devices
step ibv_devinfo
step rdma link show
step rdma dev show
echo "== livemig-ib-write-bw 65536 2000"
out=$(livemig-ib-write-bw 65536 2000) || { echo "!! FAILED: ib_write_bw"; fail=1; }
echo "$out"
bw=${out#IB_WRITE_BW_MBPS=}
if [ -n "$bw" ] && awk -v b="$bw" 'BEGIN{exit !(b > 0)}'; then
  echo "ib_write_bw 65536 B x 2000: $bw MB/s (perftest's MB = 2^20 B)"
else
  echo "!! FAILED: no bandwidth"; fail=1
fi
[ $fail = 0 ] && echo "SELFTEST PASSED" || echo "SELFTEST FAILED"
exit $fail
ST
  chmod 755 "$1/usr/local/bin/livemig-ib-write-bw" "$1/usr/local/bin/livemig-selftest"
}

# ---------------------------------------------------------------------------------------------
# Base initramfs: everything but the per-run command and files. Cached by a hash of its inputs:
# this script (which embeds /init), the kernel version and the host package versions.

ensure_base() {
  local key
  key="$({
    cat "$SELF"
    echo "$KVER|$EXTRA_BINS|${LIVEMIG_RDMA_EXTRA_MODULES:-}"
    dpkg-query -W "${PACKAGES[@]}" libc6 2>/dev/null
    for b in $EXTRA_BINS; do ls -lL "$(command -v "$b" || echo "/no/$b")" 2>&1 || true; done
  } | sha256sum | cut -c1-16)"
  BASE="$CACHE/initramfs/base-$key.cpio"
  if [ -s "$BASE" ]; then
    touch "$BASE" # most recently used: kept by the pruning below
    return 0
  fi
  log "building base initramfs ($key)"
  mkdir -p "$CACHE/initramfs"
  local st="$CACHE/initramfs/staging.$$"
  rm -rf "$CACHE"/initramfs/staging.* # leftovers of an interrupted build (we hold the lock)
  make_skeleton "$st"

  # busybox for the small stuff (mount, sysctl, timeout, stty, ...) in its own dir at the end of
  # PATH, so the real bash/kmod/iproute2 always win.
  mkdir -p "$st/bb"
  cp /bin/busybox "$st/bb/busybox"
  local a
  for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -s busybox "$st/bb/$a"; done

  local bins=() f
  for f in bash kmod ip rdma ldd; do bins+=("$(command -v "$f")"); done
  # All of ibverbs-utils (ibv_devices, ibv_devinfo, ibv_rc_pingpong, ...), perftest (ib_write_bw,
  # ib_read_bw, ib_send_lat, ...) and rdmacm-utils (rping, ucmatose, ...).
  while read -r f; do bins+=("$f"); done < <(dpkg -L ibverbs-utils perftest rdmacm-utils |
    grep -E '^/usr/s?bin/.' | while read -r f; do [ -f "$f" ] && echo "$f"; done)
  for f in $EXTRA_BINS; do
    command -v "$f" >/dev/null || die "LIVEMIG_RDMA_EXTRA_BINS: no $f on the host"
    bins+=("$(command -v "$f")")
  done
  copy_in "$st" "${bins[@]}"
  for f in modprobe insmod rmmod lsmod modinfo depmod; do ln -sf ../bin/kmod "$st/usr/sbin/$f"; done
  ln -sf bash "$st/usr/bin/sh"

  # libibverbs finds providers through /etc/libibverbs.d/*.driver and dlopens
  # <libdir>/libibverbs/lib<name>-rdmav<ABI>.so, which ldd can't see: copy rxe's explicitly.
  local prov
  prov="$(ls /usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav*.so 2>/dev/null | head -n1)"
  [ -n "$prov" ] || die "no librxe provider in /usr/lib/x86_64-linux-gnu/libibverbs (ibverbs-providers)"
  copy_in "$st" /etc/libibverbs.d/rxe.driver "$prov"
  bins+=("$prov")

  local libs="$st.libs"
  : >"$libs"
  for f in "${bins[@]}"; do elf_libs "$f" >>"$libs"; done
  # Name-service and DNS bits glibc dlopens at run time (getpwuid, getaddrinfo) — tests may use them.
  for f in /lib/x86_64-linux-gnu/libnss_files.so.2 /lib/x86_64-linux-gnu/libnss_dns.so.2 \
    /lib/x86_64-linux-gnu/libresolv.so.2; do [ -e "$f" ] && echo "$f" >>"$libs"; done
  mapfile -t bins < <(sort -u "$libs")
  copy_in "$st" "${bins[@]}"
  rm -f "$libs"

  cat >"$st/etc/passwd" <<<'root:x:0:0:root:/root:/bin/bash'
  cat >"$st/etc/group" <<<'root:x:0:'
  printf '127.0.0.1 localhost\n::1 localhost\n10.0.99.1 host1\n10.0.99.2 host2\n' >"$st/etc/hosts"
  printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$st/etc/nsswitch.conf"
  # A real ld.so.cache so libraries resolve exactly like on the host.
  cp -a --parents /etc/ld.so.conf /etc/ld.so.conf.d "$st/" 2>/dev/null || true
  ldconfig -r "$st" 2>/dev/null || true

  # Kernel modules: the dependency closure of MODULES, decompressed (so neither kmod nor the
  # kernel needs a decompressor), plus the index files that depmod/modprobe need for built-ins.
  local mdir="lib/modules/$KVER" m line p
  mkdir -p "$st/usr/$mdir"
  local deps="$st.deps"
  : >"$deps"
  for m in "${MODULES[@]}" ${LIVEMIG_RDMA_EXTRA_MODULES:-}; do
    modprobe -d "$KROOT" -S "$KVER" --show-depends "$m" >>"$deps" 2>/dev/null ||
      case "$m" in crc32_pclmul | crc32c_generic) ;; *) die "module $m not in $KVER" ;; esac
  done
  while read -r line; do
    [ "${line%% *}" = insmod ] || continue # "builtin foo" needs nothing
    p="$(awk '{print $2}' <<<"$line")"
    m="${p#"$KROOT"/}" # lib/modules/KVER/kernel/...
    mkdir -p "$st/usr/$(dirname "$m")"
    case "$p" in
      *.ko.xz) xz -dc "$p" >"$st/usr/${m%.xz}" ;;
      *.ko.zst) zstd -qdc "$p" >"$st/usr/${m%.zst}" ;;
      *.ko.gz) gzip -dc "$p" >"$st/usr/${m%.gz}" ;;
      *) cp "$p" "$st/usr/$m" ;;
    esac
  done < <(sort -u "$deps")
  rm -f "$deps"
  for f in modules.order modules.builtin modules.builtin.modinfo; do
    [ -e "$KROOT/$mdir/$f" ] && cp "$KROOT/$mdir/$f" "$st/usr/$mdir/"
  done
  depmod -b "$st/usr" "$KVER" # the staging root's /lib -> usr/lib, hence -b st/usr

  write_init "$st"
  mkdir -p "$st/etc/livemig"
  echo "${MODULES[*]} ${LIVEMIG_RDMA_EXTRA_MODULES:-}" >"$st/etc/livemig/modules"
  # A console node lets the kernel give /init stdio before devtmpfs is mounted (needs root).
  mknod -m 600 "$st/dev/console" c 5 1 2>/dev/null || true

  (cd "$st" && find . -mindepth 1 | sed 's|^\.||') >"$BASE.manifest"
  pack_cpio "$st" "$BASE.tmp"
  mv "$BASE.tmp" "$BASE"
  rm -rf "$st"
  # Drop stale bases from older inputs, but keep the 3 most recently used: runs with different
  # LIVEMIG_RDMA_EXTRA_BINS/_MODULES (test-nested.sh vs guest/qemu-reference.sh) take turns and
  # would otherwise rebuild each other's base every time.
  local old
  for old in $(ls -t "$CACHE"/initramfs/base-*.cpio | tail -n +4); do
    rm -f "$old" "$old.manifest"
  done
}

prepare() {
  mkdir -p "$CACHE"
  # One builder at a time; concurrent runs wait here, then find everything cached.
  exec 9>"$CACHE/.lock"
  flock 9
  ensure_packages
  ensure_kernel
  ensure_base
  flock -u 9
}

# ---------------------------------------------------------------------------------------------
# Boot: base cpio + a per-run cpio (command, env, files) concatenated — the kernel unpacks
# consecutive cpio archives into the same rootfs, later entries winning.

RUN_DIR=""
cleanup_run() {
  [ -n "$RUN_DIR" ] || return 0
  local pid
  pid="$(cat "$RUN_DIR/qemu.pid" 2>/dev/null || true)"
  # The pidfile can outlive QEMU; only kill what is still our QEMU.
  if [ -n "$pid" ] && grep -q '^qemu-system' "/proc/$pid/comm" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
  fi
  rm -rf "$RUN_DIR"
}

# run_vm FILES_ARRAY_NAME ENV_ARRAY_NAME -- COMMAND...
run_vm() {
  local -n _files="$1" _envs="$2"
  shift 3
  [ $# -gt 0 ] || die "no command given"
  case "$MODE" in veth | single | lo) ;; *) die "unknown mode '$MODE' (veth, single or lo)" ;; esac
  prepare

  mkdir -p "$CACHE/runs"
  local rt
  rt="$(mktemp -d "$CACHE/runs/run.XXXXXX")"
  RUN_DIR="$rt"
  trap cleanup_run EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  local st="$rt/root"
  make_skeleton "$st"
  mkdir -p "$st/etc/livemig"

  local f g l need=()
  local libs="$rt/libs"
  : >"$libs"
  for f in "${_files[@]}"; do
    [ -e "$f" ] || die "no such file: $f"
    cp -a -L "$f" "$st/opt/livemig/"
    if [ -d "$f" ]; then
      while IFS= read -r -d '' g; do elf_libs "$g" >>"$libs"; done < <(find "$f" -type f -print0)
    else
      elf_libs "$f" >>"$libs"
    fi
  done
  # Only the libraries the base doesn't already have (the manifest lists staged paths: /usr/...).
  while read -r l; do
    grep -qxF "/usr${l#/usr}" "$BASE.manifest" || need+=("$l")
  done < <(sort -u "$libs")
  [ ${#need[@]} -eq 0 ] || copy_in "$st" "${need[@]}"

  {
    printf 'LIVEMIG_RDMA_MODE=%q\n' "$MODE"
    printf 'LIVEMIG_RDMA_MTU=%q\n' "$MTU"
  } >"$st/etc/livemig/run.conf"
  : >"$st/etc/livemig/env.sh"
  for f in "${_envs[@]}"; do
    [[ "$f" == *=* ]] || die "--env wants NAME=VALUE, got $f"
    printf 'export %s=%q\n' "${f%%=*}" "${f#*=}" >>"$st/etc/livemig/env.sh"
  done
  printf '%q ' "$@" >"$st/etc/livemig/cmd.sh"
  echo >>"$st/etc/livemig/cmd.sh"

  pack_cpio "$st" "$rt/run.cpio"
  cat "$BASE" "$rt/run.cpio" >"$rt/initrd"
  rm -rf "$st" "$rt/run.cpio"

  # -no-reboot: the guest's reboot (our /init's way out, and panic=-1) ends QEMU.
  # -cpu max: TCG's richest model (PCLMULQDQ for crc32_pclmul, SSE4.2, ...).
  # -nodefaults: no NIC/VGA/option ROMs to initialise; the serial port is all we need.
  # etc/sercon-port=0: without a VGA card SeaBIOS mirrors its screen to the serial port, which
  # would put escape sequences and a banner in front of the command's output.
  # stdin </dev/null: QEMU then leaves the host terminal's mode alone.
  # (-machine microvm would skip SeaBIOS, but its qboot firmware doesn't do the PVH boot here.)
  local qemu=(qemu-system-x86_64 -accel tcg -machine pc -cpu max -smp "$SMP" -m "$MEM"
    -nodefaults -nographic -serial stdio -no-reboot -fw_cfg "name=etc/sercon-port,string=0"
    -kernel "$KROOT/vmlinux" -initrd "$rt/initrd" -append "$CMDLINE")
  log "booting $KVER (TCG, $SMP vCPUs, ${MEM} MiB, mode $MODE, mtu $MTU, timeout ${TIMEOUT}s): $*"
  local start=$SECONDS rc
  # awk: strips the \r the kernel's own console writes add, flushes every line so output streams
  # live, and swallows what follows the sentinel (the kernel's "reboot: Restarting system").
  # QEMU's stderr stays separate, minus the warning our sercon-port override always triggers.
  # mawk (Debian's default awk) reads a pipe in large blocks unless -W interactive: without it
  # nothing streams and a long run's output only appears when the VM exits.
  local LIVE_AWK=(awk)
  awk -W version 2>&1 | grep -q mawk && LIVE_AWK=(awk -W interactive)
  # The pipeline runs in the background so that `wait` — unlike a foreground pipeline — returns
  # at once on SIGINT/SIGTERM and cleanup_run can stop QEMU (found through its pidfile).
  {
    timeout -k 10 "$TIMEOUT" "${qemu[@]}" -pidfile "$rt/qemu.pid" </dev/null \
      2> >(grep --line-buffered -v 'externally provided fw_cfg item names' >&2)
    { echo $? >"$rt/rc"; } 2>/dev/null # (the dir is gone if we were interrupted)
  } | "${LIVE_AWK[@]}" 'done { next } { sub(/\r$/, ""); print; fflush() } /^LIVEMIG-EXIT=[0-9]+$/ { done = 1 }' |
    tee "$rt/log" &
  wait $! || true
  rc="$(cat "$rt/rc" 2>/dev/null || echo 125)"
  local took=$((SECONDS - start))
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    log "error: VM timed out after ${TIMEOUT}s (hung guest or command); raise --timeout/LIVEMIG_RDMA_TIMEOUT if it was just slow"
    return 124
  fi
  if grep -qa '^LIVEMIG-SETUP-FAILED' "$rt/log"; then
    log "error: RDMA setup inside the VM failed (see above)"
    return 125
  fi
  local status
  status="$(grep -ao 'LIVEMIG-EXIT=[0-9]*' "$rt/log" | tail -n1 | cut -d= -f2 || true)"
  if [ -z "$status" ]; then
    if grep -qa 'Kernel panic' "$rt/log"; then
      log "error: the VM kernel panicked (see above)"
    else
      log "error: the VM stopped without reporting an exit status (QEMU rc=$rc)"
    fi
    return 125
  fi
  log "VM done in ${took}s, command exit status $status"
  return "$status"
}

usage() {
  sed -n '2,/^set -euo/p' "$SELF" | sed '$d; s/^# \{0,1\}//'
}

main() {
  local cmd="${1:-}"
  [ $# -gt 0 ] && shift
  local files=() envs=()
  case "$cmd" in
    prepare)
      prepare
      log "ready: kernel $KVER, base $(basename "$BASE") ($(du -h "$BASE" | cut -f1))"
      ;;
    run)
      while [ $# -gt 0 ]; do
        case "$1" in
          --files | --file)
            shift
            while [ $# -gt 0 ] && [[ "$1" != --* ]]; do files+=("$(readlink -f "$1")"); shift; done ;;
          --env) envs+=("$2"); shift 2 ;;
          --env=*) envs+=("${1#--env=}"); shift ;;
          --timeout) TIMEOUT="$2"; shift 2 ;;
          --mode) MODE="$2"; shift 2 ;;
          --mtu) MTU="$2"; shift 2 ;;
          --mem) MEM="$2"; shift 2 ;;
          --smp) SMP="$2"; shift 2 ;;
          --) shift; break ;;
          *) die "run: unexpected '$1' (usage: run [--files F...] [--env N=V] [--timeout S] [--mode M] -- CMD ARGS)" ;;
        esac
      done
      run_vm files envs -- "$@"
      ;;
    selftest)
      local t0=$SECONDS
      run_vm files envs -- livemig-selftest
      log "selftest passed in $((SECONDS - t0))s"
      ;;
    bw)
      [ $# -eq 2 ] || die "usage: bw SIZE ITERS"
      # Only the machine-readable line on stdout; everything else goes to stderr.
      local rc
      set +e
      run_vm files envs -- livemig-ib-write-bw "$1" "$2" |
        while IFS= read -r line; do
          case "$line" in IB_WRITE_BW_MBPS=*) echo "$line" ;; *) echo "$line" >&2 ;; esac
        done
      rc=${PIPESTATUS[0]}
      set -e
      return "$rc"
      ;;
    clean) rm -rf "$CACHE" ;;
    -h | --help | help | "") usage ;;
    *) usage >&2; exit 2 ;;
  esac
}

# Sourced (scripts/linux-guest.sh reuses ensure_packages/ensure_kernel/pack_cpio...): define the
# functions only.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
