#!/bin/bash
# qemu-reference.sh — QEMU's figures and livemig's for livemig's Linux test guest, side by
# side in one boot of the nested TCG VM (scripts/rdma-vm.sh), the only place on this machine
# with a KVM that boots a stock kernel. QEMU is the "peer" column of livemig's comparison
# tables (DESIGN.md section 7).
#
# Phases `lm-boot` and `lm-migrate` measure livemig the same way (needs the livemig binary in
# the --files): the same kernel, initramfs, workload, RAM, disk, taps and downtime limit;
# livemig's console is time-stamped like QEMU's. Every result line starts with `REF` and says
# `system=qemu` or `system=livemig`.
#
# It boots the guest of scripts/linux-guest.sh as an L2 KVM guest with the VM's QEMU and:
#   boot      time from QEMU start to the first `livemig-workload: tick` line, bzImage and
#             vmlinux (PVH), each on a fresh copy of the disk;
#   migrate   a live migration (TCP on 127.0.0.1, QMP on pipes) of a 256 MiB guest while the
#             workload writes 2000 pages/s over 64 MiB, QEMU's default downtime limit (300 ms)
#             and bandwidth limit; reports total time and downtime from query-migrate, whether
#             the tick counter went on rising on the destination, whether the guest's TCP echo
#             server answers before and after (tap + bridge: QEMU's self-announce must move the
#             MAC to the destination's tap), then checks the disk: the destination syncs and
#             powers off, and a third boot of that disk prints the last counter it stored.
#             Once per vCPU count in REF_SMPS (default "1 2").
#   migrate-rdma, lm-migrate-rdma[=OPTS]
#             the same migrations over RDMA (QEMU's `rdma:` URI; livemig's --transport rdma) on
#             the VM's soft-RoCE: needs rdma-vm.sh's RDMA set-up (any --mode; both systems use
#             the same rxe device at both ends, see TRANSPORT below). tests/linux.rs runs
#             `migrate-rdma lm-migrate-rdma=--channels,1 lm-migrate-rdma` (two queue pairs,
#             livemig's default) in CI
#             (test-nested.sh), REF_SMPS=1.
#
# Run from the repository on the host:
#   eval "$(scripts/linux-guest.sh build)"
#   LIVEMIG_RDMA_EXTRA_BINS="qemu-system-x86_64 bridge" LIVEMIG_RDMA_EXTRA_MODULES="kvm kvm_amd tun bridge" \
#   scripts/rdma-vm.sh run --mode lo --timeout 2400 --files guest/qemu-reference.sh \
#     "$KERNEL_BZIMAGE" "$KERNEL_VMLINUX" "$INITRD" "$DISK_TEMPLATE" "$QEMU_FIRMWARE" \
#     -- bash qemu-reference.sh [boot] [migrate]
# (no phase argument = both). Results are the `REF ...` lines (key=value) on stdout.
# Side by side with livemig: add target/release/livemig to the --files and run e.g.
#   -- bash qemu-reference.sh boot lm-boot migrate lm-migrate migrate lm-migrate
#
# Knobs (rdma-vm.sh run --env NAME=VALUE): REF_MEM (256 MiB), REF_WS (64 MiB), REF_RATE (2000
# pages/s), REF_PATTERN (random), REF_SMPS ("1 2"), REF_KERNEL for the migrations (bzImage),
# REF_WARMUP (5 s of workload before migrating), REF_PREFAULT (1: destination RAM faulted in
# ahead on both sides, see prefault below; 0: not), REF_DOWNTIME_MS / REF_MAX_BW_BYTES (unset:
# QEMU's defaults), REF_LM_MIGRATE_ARGS (more `livemig migrate` options, e.g. --compress none),
# REF_LM_HOST_ARGS (more options of both livemig VM processes, run-vm and receive, e.g.
# `--hugepages 2M`),
# REF_BLACKOUT=1 (a client pings every 10 ms and streams through the guest's echo service
# during each migration: `REF blackout` lines; REF_BLACKOUT_S its duration, 20 s),
# REF_LM_LOG=info (livemig logs; with REF_BLACKOUT, `REF timeline` lines: pause, prepared, resumed,
# announced, in unix ms beside the blackout gap), REF_LM_JSON=1 (each livemig migration's whole
# JSON report on a `REF json` line: rounds, CPU, switchover steps), REF_DISKCHECK=0 (skip the
# third boot), REF_VERBOSE=1 (echo every guest console line, not just every 10th tick),
# REF_HEARTBEAT (30 s; 0 = off), REF_SAMPLE=1 (with REF_BLACKOUT: what ran around each
# switchover, `REF sample` lines, see sampler), REF_HUGEPAGE_POOL=N (2 MiB pages reserved before
# the phases, for `REF_LM_HOST_ARGS=--hugepages 2M`). Phases and counts may
# repeat: `bash qemu-reference.sh boot boot migrate` with REF_SMPS="1 2 1 2"; `lm-migrate=OPTS`
# is one livemig migration with its own options, commas for spaces (`lm-migrate=--compress,none`).
#
# The VM needs ~0.5 GB beyond its files with both 256 MiB guests up: the default 2048 MiB is
# plenty. Figures vary ±50% from run to run (TCG on 2 shared host cores): repeat and compare
# ranges, not single runs.
set -u
cd "$(dirname "$(readlink -f "$0")")" # /opt/livemig: the --files land here

MEM=${REF_MEM:-256} WS=${REF_WS:-64} RATE=${REF_RATE:-2000} PATTERN=${REF_PATTERN:-random}
SMPS=${REF_SMPS:-1 2} MIG_KERNEL=${REF_KERNEL:-bzImage} WARMUP=${REF_WARMUP:-5}
PHASES=${*:-boot migrate}
W=/tmp/ref # per-VM dirs: FIFOs, logs, disks (tmpfs: the VM's RAM)
# mitigations=off: no speculation workarounds (each costs exits or flushes, which nested
# virtualization under TCG makes expensive). quiet: every console byte is a VM exit.
APPEND="console=ttyS0 quiet panic=-1 mitigations=off livemig.ip=10.0.0.2/24 livemig.echo=7"
APPEND="$APPEND livemig.ws=$WS livemig.rate=$RATE livemig.pattern=$PATTERN"
MAC=52:54:00:00:00:02

say() { printf 'qemu-ref: %s\n' "$*"; }
fail() { say "FAILED: $*"; exit 1; }
now() { echo "$EPOCHREALTIME"; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; } # seconds, b - a

# ---------------------------------------------------------------------------------------------
# Setup: KVM, a bridge with one tap per QEMU (both QEMUs live in this VM: tap0 = source,
# tap1 = destination), the host side of the guest's network at 10.0.0.1.

setup() {
  [ -c /dev/kvm ] || fail "no /dev/kvm (LIVEMIG_RDMA_EXTRA_MODULES must include kvm kvm_amd)"
  [ -c /dev/net/tun ] || fail "no /dev/net/tun (LIVEMIG_RDMA_EXTRA_MODULES must include tun)"
  for f in bzImage vmlinux initramfs.cpio disk.img qemu-fw/bios-256k.bin; do
    [ -e "$f" ] || fail "missing $f in $(pwd) (see the usage at the top of this script)"
  done
  say "L1: $(nproc) vCPUs, $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) MiB, $(qemu-system-x86_64 --version | head -n1)"
  mkdir -p "$W"
  trap teardown EXIT
  ip link add br0 type bridge forward_delay 0 2>/dev/null || fail "ip link add br0 (bridge module?)"
  ip addr add 10.0.0.1/24 dev br0
  ip link set br0 up
  for t in tap0 tap1; do
    ip tuntap add dev "$t" mode tap || fail "ip tuntap add $t"
    ip link set "$t" master br0 up
  done
}

# On exit, whatever ended the run: no guest keeps running and the bridge and taps go, so that
# whatever runs next in this VM (tests/linux.rs runs this script between its own tests) finds
# neither.
teardown() {
  local p
  for p in "$W"/*/pid; do
    [ -e "$p" ] && kill -9 "$(cat "$p")" 2>/dev/null
  done
  [ -z "${HB:-}" ] || kill "$HB" 2>/dev/null
  for p in tap0 tap1 br0; do ip link del "$p" 2>/dev/null; done
  return 0
}

# ---------------------------------------------------------------------------------------------
# One QEMU. Console and QMP are `-chardev pipe`s (NAME.in/NAME.out FIFOs): plain bash can drive
# them, whereas a unix socket would need socat or python, which the VM doesn't have. QEMU opens
# the FIFOs read-write, so neither side blocks at open. A reader per output FIFO time-stamps
# each line into a log.

# start_vm NAME KERNEL SMP DISK TAP [QEMU ARGS...]
start_vm() {
  local name=$1 kernel=$2 smp=$3 disk=$4 tap=$5 d=$W/$1
  shift 5
  say "$name: starting ($kernel, $smp vCPU, $MEM MiB${*:+, $*})"
  rm -rf "$d"
  mkdir -p "$d"
  mkfifo "$d/con.in" "$d/con.out" "$d/qmp.in" "$d/qmp.out"
  # -L qemu-fw: /usr/share/qemu etc. don't exist in the VM. sercon-port=0: SeaBIOS would mirror
  # its screen (escape sequences, banner) to the serial port without a VGA card. romfile=: no
  # iPXE option ROM to load and run at every boot; `-no-reboot`: a guest panic ends QEMU.
  qemu-system-x86_64 -name "$name" -accel kvm -cpu host -machine pc -m "$MEM" -smp "$smp" \
    -nodefaults -no-user-config -display none -no-reboot -L qemu-fw \
    -fw_cfg name=etc/sercon-port,string=0 \
    -chardev pipe,id=con,path="$d/con" -serial chardev:con \
    -chardev pipe,id=qmp,path="$d/qmp" -mon chardev=qmp,mode=control \
    -kernel "$kernel" -initrd initramfs.cpio -append "$APPEND" \
    -drive file="$disk",if=virtio,format=raw \
    -netdev tap,id=n0,ifname="$tap",script=no,downscript=no \
    -device virtio-net-pci,netdev=n0,mac=$MAC,romfile= \
    "$@" >"$d/qemu.log" 2>&1 &
  echo $! >"$d/pid"
  now >"$d/t0"
  : >"$d/con.log"
  : >"$d/qmp.log"
  # Console reader: stamps lines, strips the tty's \r, echoes a digest to our stdout.
  (
    while IFS= read -r l; do
      l=${l%$'\r'}
      printf '%s %s\n' "$EPOCHREALTIME" "$l" >>"$d/con.log"
      case "$l" in
        *"livemig-workload: tick "*[1-9]) [ "${REF_VERBOSE:-0}" = 1 ] && echo "[$name] $l" ;;
        *) echo "[$name] $l" ;;
      esac
    done <"$d/con.out"
  ) &
  (while IFS= read -r l; do printf '%s\n' "${l%$'\r'}" >>"$d/qmp.log"; done <"$d/qmp.out") &
  qmp "$name" '{"execute":"qmp_capabilities"}' >/dev/null || fail "$name: no QMP greeting"
}

alive() { kill -0 "$(cat "$W/$1/pid")" 2>/dev/null; }

# gone NAME: why QEMU ended, for a message: its log's last lines and the reason of the SHUTDOWN
# event it sent on QMP. With -no-reboot a guest that resets itself (a triple fault, or a reboot)
# ends QEMU with status 0 and nothing on its stderr: only the event's "guest-reset" tells that
# from a crash or a kill, which send no event.
gone() {
  local d=$W/$1 why
  sleep 0.3 # the QMP reader may not have written QEMU's last event yet
  why=$(grep -sF '"event": "SHUTDOWN"' "$d/qmp.log" | tail -n1 | jget reason)
  printf '%s; ' "$(tail -n 5 "$d/qemu.log" | tr '\n' ' ')"
  case $why in
  guest-reset) printf 'QMP SHUTDOWN reason guest-reset (-no-reboot: the guest reset itself)' ;;
  "") printf 'no SHUTDOWN event on QMP (killed or crashed)' ;;
  *) printf 'QMP SHUTDOWN reason %s' "$why" ;;
  esac
}

# qmp NAME JSON -> the reply line (stdout). Each command gets a unique id so the reply is
# matched exactly, whatever events arrive in between (a counter would not survive the $(...)
# subshells qmp runs in). Writes open the FIFO read-write (1<>): that never blocks, even if
# QEMU is gone, where a plain > would wait forever for a reader.
qmp() {
  local name=$1 cmd=$2 d=$W/$1 i
  local id="c${EPOCHREALTIME/./}$RANDOM"
  # Not before QEMU has the FIFO open (its greeting shows that): bytes written into a FIFO
  # that nobody else holds open are discarded when our end closes.
  for i in $(seq 300); do grep -q '"QMP"' "$d/qmp.log" && break; sleep 0.1; done
  printf '%s\n' "${cmd%\}},\"id\":\"$id\"}" 1<>"$d/qmp.in"
  for i in $(seq 300); do # 30 s: QMP under nested TCG can be slow while the guest boots
    grep -F "\"id\": \"$id\"" "$d/qmp.log" && return 0
    alive "$name" || { say "$name: QEMU died: $(gone "$name")" >&2; return 1; }
    sleep 0.1
  done
  say "$name: no QMP reply to $cmd" >&2
  return 1
}

# jget KEY < json -> the first scalar value of KEY (good enough for QMP's flat replies)
jget() { grep -o "\"$1\": [^,}]*" | head -n1 | cut -d' ' -f2- | tr -d '"'; }

console() { printf '%s\n' "$2" 1<>"$W/$1/con.in"; } # console NAME LINE: type a line

# wait_line NAME REGEX TIMEOUT -> the first matching log line (with its timestamp)
wait_line() {
  local d=$W/$1 i
  for i in $(seq $(($3 * 10))); do
    grep -m1 -E "$2" "$d/con.log" && return 0
    alive "$1" || { say "$1: QEMU exited: $(gone "$1")" >&2; return 1; }
    sleep 0.1
  done
  return 1
}

# kept_rising SRC_LAST DST_FIRST DST_LAST (tick lines) -> yes: the destination's ticks continue
# the source's and at least 10 more came in the 3 s after the migration (the workload prints 10
# a second; 30-39 came in every run CI logged), slow: fewer (3, once, in a guest that answered
# no echo and no ping), no: none.
kept_rising() {
  local first last
  first=$(tick_no <<<"$2")
  last=$(tick_no <<<"$3")
  if [ -z "$first" ] || [ "$first" -le "$(tick_no <<<"$1")" ] || [ "$last" -le "$first" ]; then
    echo no
  elif [ "$last" -lt "$((first + 10))" ]; then
    echo slow
  else
    echo yes
  fi
}

# stall_report NAME: for a destination whose guest stalled or answered no echo: what used the
# nested VM's CPUs over one second (the busiest threads, in clock ticks), what KVM counted for
# each VM meanwhile (its debugfs statistics that moved: exits, interrupt injections and
# interrupt-window exits tell a guest that is offered no interrupt from one that takes none),
# and its VMM's last log lines.
stall_report() {
  cpu_snapshot() { # tid (comm) utime+stime, one awk over every thread
    awk '{ p = match($0, /\) [A-Za-z] /); split(substr($0, p + 2), f, " ")
           o = index($0, "("); print $1, substr($0, o, p - o + 1), f[12] + f[13] }' \
      /proc/[0-9]*/task/[0-9]*/stat 2>/dev/null
  }
  kvm_snapshot() { # "PID-FD/stat value" for every VM's statistics
    local f
    for f in /sys/kernel/debug/kvm/[0-9]*-[0-9]*/*; do
      [ -f "$f" ] && echo "${f#/sys/kernel/debug/kvm/} $(cat "$f" 2>/dev/null)"
    done
    return 0
  }
  [ -d /sys/kernel/debug/kvm ] || mount -t debugfs none /sys/kernel/debug 2>/dev/null || true
  cpu_snapshot >"$W/cpu.1"
  kvm_snapshot >"$W/kvm.1"
  sleep 1
  cpu_snapshot >"$W/cpu.2"
  kvm_snapshot >"$W/kvm.2"
  say "REF stall $1: load $(cut -d' ' -f1-3 /proc/loadavg); busiest threads over 1 s: $(
    awk 'NR == FNR { a[$1] = $NF; next } ($1 in a) && $NF > a[$1] { print $NF - a[$1], $0 }' \
      "$W/cpu.1" "$W/cpu.2" | sort -rn | head -n 8 | awk '{ $NF = ""; print }' | tr '\n' ';')"
  say "REF stall $1: KVM's counts over 1 s (VM pid-fd/stat +delta): $(
    awk 'NR == FNR { a[$1] = $2; next } ($1 in a) && $2 ~ /^[0-9]+$/ && $2 != a[$1] { print $1, "+" $2 - a[$1] }' \
      "$W/kvm.1" "$W/kvm.2" | tr '\n' ';' | cut -c 1-1500)"
  say "REF stall $1: its log: $(tail -n 8 "$W/$1/qemu.log" 2>/dev/null | tr '\n' ' ' | cut -c 1-1500) [its last warnings: $(grep -aE ' (WARN|ERROR) ' "$W/$1/qemu.log" 2>/dev/null | tail -n 4 | tr '\n' ' ' | cut -c 1-1200)]"
}

last_tick() { grep -E 'livemig-workload: tick [0-9]+$' "$W/$1/con.log" | tail -n1; }
tick_no() { awk '{print $NF}'; }
tick_ts() { awk '{print $1}'; }

# reap NAME SECS: wait at most SECS for QEMU to exit, then SIGKILL it. Never a bare `wait`:
# once, out of ~20 guest poweroffs, a run hung for good right after the guest's "reboot: Power
# down" (L1 busy, no further output); an unbounded wait for QEMU was the only step there that
# could block forever.
reap() {
  local name=$1 i pid
  pid=$(cat "$W/$name/pid")
  for i in $(seq $(($2 * 10))); do alive "$name" || break; sleep 0.1; done
  if alive "$name"; then
    say "$name: QEMU still running after ${2}s, SIGKILL"
    kill -9 "$pid" 2>/dev/null
  fi
  wait "$pid" 2>/dev/null
  return 0
}

stop_vm() { # NAME: the workload powers the guest off; QMP quit and SIGKILL as fallbacks
  local name=$1
  if alive "$name"; then
    console "$name" poweroff
    for i in $(seq 150); do alive "$name" || break; sleep 0.1; done
    if alive "$name"; then
      say "$name: still running 15s after poweroff, QMP quit"
      qmp "$name" '{"execute":"quit"}' >/dev/null
    fi
  fi
  reap "$name" 10
}

iso_ms() { # 2026-12-02T04:05:01.123456Z -> unix ms (busybox date has no %N)
  local ts=$1 day time frac
  day=${ts%%T*} time=${ts#*T}
  time=${time%Z}
  frac=${time#*.}000
  [ "$frac" = "${time}000" ] && frac=000
  echo $(($(date -u -d "$day ${time%%.*}" +%s) * 1000 + 10#${frac:0:3}))
}

net_fresh() { # forget where the guest's MAC was: a previous phase's destination left it on
  # tap1 in the bridge's table and in this host's neighbour cache, so unicasts to the next
  # source would vanish until the guest happened to transmit. The next packet asks by broadcast.
  local t
  for t in tap0 tap1; do bridge fdb del "$MAC" dev "$t" master 2>/dev/null; done
  ip neigh flush to 10.0.0.2 2>/dev/null
  true
}

echo_check() { # TAG: one line through the guest's TCP echo server (port 7) at 10.0.0.2
  timeout 10 bash -c 'exec 3<>/dev/tcp/10.0.0.2/7 && echo "ping-$1" >&3 && read -r r <&3 &&
    [ "$r" = "ping-$1" ]' _ "$1" 2>/dev/null && echo ok || echo FAILED
}

# net_diag SYSTEM DESTINATION: where the switch sends the guest's MAC, what each tap passed,
# the guest's own view of its NIC (its workload's `status` line: counters, transmit timeouts,
# carrier), what the destination's VMM warned of, and — once livemig's VMM raised an interrupt
# the eighth time in vain — what the guest's interrupt controllers held then (the IOAPIC pin and
# PICs, each vCPU's local APIC).
net_diag() {
  local t l="" st=""
  for t in tap0 tap1; do
    l+="$t: $(ip -s link show "$t" 2>/dev/null | awk '/RX:/ { getline; rx = $1 " pkts " $4 " dropped" } /TX:/ { getline; tx = $1 " pkts " $4 " dropped" } END { print "rx " rx ", tx " tx }'); "
  done
  if alive "$2"; then
    if [ "$1" = livemig ]; then
      ./livemig console --vm "$W/$2/sock" --send status >/dev/null 2>&1
    else
      console "$2" status
    fi
    sleep 1
    st=$(grep -a 'livemig-workload: status' "$W/$2/con.log" | tail -n1 | cut -d' ' -f2-)
  fi
  echo "the MAC on $(bridge fdb show br br0 2>/dev/null | grep -i "^$MAC" | grep -v permanent | tr '\n' ' '); ${l}the guest: ${st:-no status}; destination's warnings: $(grep -aE ' (WARN|ERROR) ' "$W/$2/qemu.log" 2>/dev/null | grep -avE 'interrupt controllers:|local APIC:' | tail -n 5 | tr '\n' ' ' | cut -c 1-1200)$(
    grep -aE 'interrupt controllers:|local APIC:' "$W/$2/qemu.log" 2>/dev/null | head -n 3 | tr '\n' ' ' | cut -c 1-2000 | sed 's/^./; interrupt state: &/')"
}

# echo_check_after SYSTEM DESTINATION: the echo check 3 s after the migration; when it fails,
# what the destination's network and CPUs show (`REF stall`, `REF echo-lost`), then the check
# again four times, 2 s apart: `ok`, `late_Ns` (seconds from the first try to the answer) or
# FAILED.
echo_check_after() {
  local t0 i
  t0=$(now)
  [ "$(echo_check after)" = ok ] && { echo ok; return; }
  stall_report "$2" >&2
  say "REF echo-lost $1 $2: $(net_diag "$1" "$2")" >&2
  for i in 1 2 3 4; do
    sleep 2
    if [ "$(echo_check "after-$i")" = ok ]; then
      echo "late_$(elapsed "$t0" "$(now)")s"
      return
    fi
  done
  echo FAILED
}

# Until killed (REF_SAMPLE=1), every 20 ms plus the loop's own time (60-100 ms apart in the
# nested VM): a `T` line with KVM's counters of every VM from debugfs (exits, nested-paging
# faults fixed, halts, injected interrupts, port and MMIO exits, 4 KiB and 2 MiB mappings) and
# a `P` line with the CPU ticks (user + system) of every thread of the phase's processes.
# Counters only rise: the reader takes differences.
sampler() {
  grep -q " /sys/kernel/debug " /proc/mounts || mount -t debugfs none /sys/kernel/debug
  local d f v l p t pids comm tick
  # A FIFO nobody writes: `read -t` on it is a sleep without a process (the initramfs has no
  # /dev/fd for <(...)).
  rm -f "$W/sampler.fifo"
  mkfifo "$W/sampler.fifo"
  exec {tick}<>"$W/sampler.fifo"
  while :; do
    l="T $EPOCHREALTIME"
    for d in /sys/kernel/debug/kvm/*-*; do
      l+=" | vm=${d##*/}"
      for f in exits pf_fixed halt_exits irq_injections io_exits mmio_exits pages_4k pages_2m; do
        read -r v <"$d/$f" 2>/dev/null || v=-
        l+=" $f=$v"
      done
    done
    echo "$l"
    pids=
    for f in "$W"/*/pid "$W"/*/blackout.pid; do read -r v <"$f" 2>/dev/null && pids+=" $v"; done
    l="P $EPOCHREALTIME"
    for p in $pids; do
      for t in /proc/"$p"/task/*/stat; do
        read -r v <"$t" 2>/dev/null || continue
        v=${v#*(}
        comm=${v%%)*}
        v=${v#*) }
        # shellcheck disable=SC2086 # the fields of stat, split on purpose
        set -- $v
        l+=" $p/${comm// /_}=$((${12} + ${13}))"
      done
    done
    echo "$l"
    read -r -t 0.02 -u "$tick"
  done
}

# Blackout (REF_BLACKOUT=1, needs the livemig binary): a client on br0 pings the guest every
# 10 ms and streams through its echo service while the migration runs; the longest gap between
# ping replies is what a user of the VM loses.
blackout_start() { # DIR
  [ "${REF_BLACKOUT:-0}" = 1 ] || return 0
  if [ "${REF_SAMPLE:-0}" = 1 ]; then
    sampler >"$1/samples" 2>/dev/null &
    echo $! >"$1/sampler.pid"
  fi
  ./livemig bench-blackout --target 10.0.0.2 --echo-port 7 --duration-s "${REF_BLACKOUT_S:-20}" \
    >"$1/blackout.json" 2>"$1/blackout.err" &
  echo $! >"$1/blackout.pid"
  now >"$1/blackout.t0"
  # When the switch moves the guest's MAC from port to port (unix ms and the port), to set
  # beside the pause, the resume, the announcements and the gap.
  bridge monitor fdb 2>/dev/null | while read -r l; do
    case $l in "${MAC,,}"* | "${MAC^^}"*) echo "$(now) $l" ;; esac
  done >"$1/fdb.log" &
  echo $! >"$1/fdb.pid"
  sleep 2 # a baseline of replies before the migration starts
}

blackout_report() { # DIR SYSTEM SMP MIGRATE_START_S TOTAL_MS [DESTINATION]
  [ "${REF_BLACKOUT:-0}" = 1 ] || return 0
  wait "$(cat "$1/blackout.pid")" 2>/dev/null
  if [ -f "$1/sampler.pid" ]; then
    # The samples from 0.6 s before the migration's end (the resume) to 0.8 s after it.
    local l t lo total=${5%.*}
    kill "$(cat "$1/sampler.pid")" 2>/dev/null
    wait "$(cat "$1/sampler.pid")" 2>/dev/null
    [[ $total =~ ^[0-9]+$ ]] || total=0
    t=${4/./}
    lo=$((10#$t + 10#$total * 1000 - 600000))
    while IFS= read -r l; do
      t=${l#* }
      t=${t%% *}
      t=${t/./}
      [ "$t" -lt "$lo" ] || [ "$t" -gt $((lo + 1400000)) ] || say "REF sample system=$2 $l"
    done <"$1/samples"
  fi
  killall bridge 2>/dev/null # the monitor (the loop reading it ends with it)
  wait "$(cat "$1/fdb.pid")" 2>/dev/null
  say "REF fdb system=$2 transport=$TRANSPORT $(awk '{ printf "%.0f:%s ", $1 * 1000, $4 }' "$1/fdb.log")"
  local j resumed_ms
  j=$(cat "$1/blackout.json")
  resumed_ms=$(awk -v a="$4" -v t="$5" 'BEGIN { printf "%.0f", a * 1000 + t }')
  bnum() { grep -o "\"$1\":[^,}]*" <<<"$j" | head -n1 | cut -d: -f2 | tr -d '"'; }
  # Every silence of over 25 ms between replies, unix ms of its start and its length (where
  # the longest one sits against the pause and resume of `REF timeline`, and what else the
  # guest's network went through).
  say "REF gaps system=$2 transport=$TRANSPORT $(grep -o '"reply_times_unix_ms":\[[^]]*\]' <<<"$j" |
    tr -d '[]"a-z_:' | tr ',' '\n' | awk 'NF { if (p != "" && $1 - p > 25) printf "%.0f+%.0f ", p, $1 - p; p = $1 }')"
  if [ "$(bnum gap_end_unix_ms)" = 0.0 ] || [ "$(bnum gap_end_unix_ms)" = 0 ]; then
    # The replies stopped and never came back within the window (both VMs are still up).
    say "REF blackout-lost $2: $(net_diag "$2" "${6:-none}")"
  fi
  say "REF blackout system=$2 transport=$TRANSPORT smp=$3 longest_gap_ms=$(bnum longest_gap_ms) back_after_resume_ms=$(awk -v e="$(bnum gap_end_unix_ms)" -v r="$resumed_ms" 'BEGIN { if (e == 0) print "never"; else printf "%.0f", e - r }') lost=$(bnum lost) lost_before=$(bnum lost_before_gap) lost_after=$(bnum lost_after_gap) sent=$(bnum sent) tcp_survived=$(bnum survived) tcp_bytes=$(bnum bytes_echoed) tcp_sent=$(bnum bytes_sent) tcp_longest_stall_ms=$(bnum longest_stall_ms) tcp_error=$(bnum error | tr ' ' _) gap_start_unix_ms=$(bnum gap_start_unix_ms) gap_end_unix_ms=$(bnum gap_end_unix_ms) err=$(tr ' ' _ <"$1/blackout.err" | head -c 200)$(grep -o '"tcp_info":"[^"]*"' <<<"$j" | cut -d'"' -f4 | tr ' ' , | sed 's/^./ tcp_info=&/')"
}

# ---------------------------------------------------------------------------------------------

# The migration stream's transport, set per phase: tcp (127.0.0.1) or rdma (phases
# migrate-rdma and lm-migrate-rdma: the nested VM's soft-RoCE, see scripts/rdma-vm.sh). Over
# RDMA both systems use the same device, the last of LIVEMIG_RDMA_DEVICES, at both ends:
# QEMU's `rdma:HOST:PORT` URI names no source address, so its source resolves the
# destination's address — local in this one network namespace — to that address's device, and
# livemig is given the same device on both sides (--rdma-device), so that neither crosses a
# veth pair the other does not.
TRANSPORT=tcp
# Destination RAM faulted in before the migration on both sides (REF_PREFAULT=1, the default),
# as a destination host that reserves a VM's RAM ahead does: QEMU's -mem-prealloc on the
# -incoming VM, livemig's `receive --reserve-mib` (which also registers it for RDMA then).
# REF_PREFAULT=0: both fault it in while pages arrive.
prefault() { # qemu|livemig
  [ "${REF_PREFAULT:-1}" = 1 ] || return 0
  case $1 in
    qemu) echo -mem-prealloc ;;
    livemig) echo --reserve-mib "$MEM" ;;
  esac
}
rdma_last() { # VAR: the last word of LIVEMIG_RDMA_VAR
  local a
  read -r -a a <<<"$(eval echo "\${LIVEMIG_RDMA_$1:-}")"
  [ ${#a[@]} -gt 0 ] || fail "RDMA phase without LIVEMIG_RDMA_$1 (run inside scripts/rdma-vm.sh)"
  echo "${a[${#a[@]} - 1]}"
}
qemu_uri() {
  case $TRANSPORT in
    rdma) echo "rdma:$(rdma_last ADDRS):4444" ;;
    *) echo "tcp:127.0.0.1:4444" ;;
  esac
}
lm_addr() { if [ "$TRANSPORT" = rdma ]; then rdma_last ADDRS; else echo 127.0.0.1; fi; }
lm_rdma_args() { # [migrate]: livemig's RDMA options (none over TCP)
  [ "$TRANSPORT" = rdma ] || return 0
  echo "${1:+--transport rdma} --rdma-device $(rdma_last DEVICES)"
}

phase_boot() {
  local k t0 init tick
  for k in bzImage vmlinux; do
    cp disk.img "$W/boot-$k.img"
    start_vm "boot-$k" "$k" 1 "$W/boot-$k.img" tap0
    t0=$(cat "$W/boot-$k/t0")
    tick=$(wait_line "boot-$k" 'livemig-workload: tick 1$' 300) || fail "boot-$k: no first tick"
    init=$(grep -m1 'livemig-guest: init done' "$W/boot-$k/con.log" | tick_ts)
    say "REF boot system=qemu kernel=$k init_done_s=$(elapsed "$t0" "$init") first_tick_s=$(elapsed "$t0" "$(tick_ts <<<"$tick")") mem=$MEM"
    stop_vm "boot-$k"
    rm -f "$W/boot-$k.img"
  done
}

phase_migrate() { # SMP
  local smp=$1 src=src$1 dst=dst$1 disk=$W/mig$1.img r st i
  cp disk.img "$disk"
  # Same command line on both ends (what migration requires), plus -incoming on the
  # destination. The disk file is shared: the destination opens it inactive (no write lock)
  # and takes it over at switchover, after the source flushed and released it.
  start_vm "$src" "$MIG_KERNEL" "$smp" "$disk" tap0
  wait_line "$src" 'livemig-workload: tick 1$' 300 >/dev/null || fail "$src: no first tick"
  # shellcheck disable=SC2046 # word splitting of the argument list is intended
  start_vm "$dst" "$MIG_KERNEL" "$smp" "$disk" tap1 -incoming "$(qemu_uri)" $(prefault qemu)
  sleep "$WARMUP"
  local echo_before
  net_fresh
  echo_before=$(echo_check before)
  say "$src: workload running ($(last_tick "$src" | tick_no) ticks), echo before: $echo_before"

  [ -n "${REF_DOWNTIME_MS:-}" ] &&
    qmp "$src" "{\"execute\":\"migrate-set-parameters\",\"arguments\":{\"downtime-limit\":$REF_DOWNTIME_MS}}" >/dev/null
  [ -n "${REF_MAX_BW_BYTES:-}" ] &&
    qmp "$src" "{\"execute\":\"migrate-set-parameters\",\"arguments\":{\"max-bandwidth\":$REF_MAX_BW_BYTES}}" >/dev/null
  r=$(qmp "$src" '{"execute":"query-migrate-parameters"}')
  local dl bw
  dl=$(jget downtime-limit <<<"$r") bw=$(jget max-bandwidth <<<"$r")
  say "$src: downtime-limit=${dl}ms max-bandwidth=${bw}B/s"

  blackout_start "$W/$src"
  local t_mig
  t_mig=$(now)
  qmp "$src" "{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"$(qemu_uri)\"}}" >/dev/null ||
    fail "$src: migrate"
  for i in $(seq 1200); do # 10 min at 0.5 s
    sleep 0.5
    r=$(qmp "$src" '{"execute":"query-migrate"}') || fail "$src: query-migrate"
    st=$(jget status <<<"$r")
    case "$st" in completed | failed | cancelled) break ;; esac
    # A progress line every 2 s: remaining bytes and the dirty rate QEMU measures.
    [ $((i % 4)) = 0 ] && say "$src: $st remaining=$(jget remaining <<<"$r") dirty-pages-rate=$(jget dirty-pages-rate <<<"$r") mbps=$(jget mbps <<<"$r") iterations=$(jget dirty-sync-count <<<"$r")"
  done
  [ "$st" = completed ] || { say "$src: $r"; fail "$src: migration status $st"; }
  # QEMU 7.2 sets "completed" a moment before it fills in total-time and downtime: a query in
  # that window reports both as 0 (seen here). Ask again until they are there.
  for i in $(seq 50); do
    [ "$(jget total-time <<<"$r")" != 0 ] && break
    sleep 0.1
    r=$(qmp "$src" '{"execute":"query-migrate"}') || fail "$src: query-migrate"
  done
  local src_last
  src_last=$(last_tick "$src")
  local ds
  ds=$(qmp "$dst" '{"execute":"query-status"}' | jget status)
  # Let the destination run: its ticks must continue from the source's counter.
  sleep 3
  local dst_first dst_last echo_after
  dst_first=$(grep -E 'livemig-workload: tick [0-9]+$' "$W/$dst/con.log" | head -n1)
  dst_last=$(last_tick "$dst")
  echo_after=$(echo_check_after qemu "$dst")
  local kept
  kept=$(kept_rising "$src_last" "$dst_first" "$dst_last")
  [ "$kept" = yes ] || [ "$echo_after" != ok ] || stall_report "$dst"
  say "REF migrate system=qemu transport=$TRANSPORT prefault=${REF_PREFAULT:-1} smp=$smp mem=$MEM ws=$WS rate=$RATE status=$st total_ms=$(jget total-time <<<"$r") downtime_ms=$(jget downtime <<<"$r") setup_ms=$(jget setup-time <<<"$r") transferred=$(jget transferred <<<"$r") iterations=$(jget dirty-sync-count <<<"$r") mbps=$(jget mbps <<<"$r") downtime_limit_ms=$dl max_bandwidth=$bw dst_status=$ds"
  blackout_report "$W/$src" qemu "$smp" "$t_mig" "$(jget total-time <<<"$r")" "$dst"
  say "REF ticks system=qemu transport=$TRANSPORT smp=$smp src_last=$(tick_no <<<"$src_last") dst_first=$(tick_no <<<"$dst_first") dst_after_3s=$(tick_no <<<"$dst_last") console_gap_s=$(elapsed "$(tick_ts <<<"$src_last")" "$(tick_ts <<<"$dst_first")") kept_rising=$kept echo_before=$echo_before echo_after=$echo_after"
  say "$src: full query-migrate: $r"
  say "L1 memory with both QEMUs up (MiB): $(free -m | awk '/Mem:/ {print "used=" $3 " free=" $4 " shared=" $5}')"

  # Disk: the destination syncs (the workload fsyncs every second anyway) and powers off; a
  # fresh boot of the same image prints the last counter stored in it.
  qmp "$src" '{"execute":"quit"}' >/dev/null
  reap "$src" 10
  if [ "${REF_DISKCHECK:-1}" = 0 ]; then
    stop_vm "$dst"
    rm -f "$disk"
    return 0
  fi
  console "$dst" sync
  wait_line "$dst" 'livemig-workload: synced' 30 >/dev/null
  local final
  final=$(last_tick "$dst" | tick_no)
  stop_vm "$dst"
  start_vm "check$smp" vmlinux 1 "$disk" tap0
  local line
  line=$(wait_line "check$smp" 'livemig-workload: disk ' 300) || fail "check$smp: no disk line"
  # The file gets the tick counter once a second, so it may lag the last tick by up to ~10;
  # what matters is that it is past the source's last tick: the destination's writes landed.
  local stored=${line##*last=} ok=no
  [ "$stored" -gt "$(tick_no <<<"$src_last")" ] 2>/dev/null && ok=yes
  say "REF disk system=qemu smp=$smp src_last_tick=$(tick_no <<<"$src_last") dst_last_tick=$final stored=$stored dst_writes_persisted=$ok"
  stop_vm "check$smp"
  rm -f "$disk"
}


# ---------------------------------------------------------------------------------------------
# livemig, measured the same way. A livemig process's stdout (its own lines and, with
# --console-stdout, the guest's console) is time-stamped into NAME/con.log like QEMU's console,
# so wait_line, last_tick and alive work on it unchanged.

LM_APPEND="quiet panic=-1 mitigations=off livemig.ip=10.0.0.2/24 livemig.echo=7"
LM_APPEND="$LM_APPEND livemig.ws=$WS livemig.rate=$RATE livemig.pattern=$PATTERN"

lm_start() { # NAME ARGS...: ./livemig ARGS, its socket at $W/NAME/sock
  local name=$1 d=$W/$1
  shift
  rm -rf "$d"
  mkdir -p "$d"
  mkfifo "$d/out"
  : >"$d/con.log"
  (while IFS= read -r l; do printf '%s %s\n' "$EPOCHREALTIME" "${l%$'\r'}" >>"$d/con.log"; done <"$d/out") &
  now >"$d/t0"
  LIVEMIG_LOG=${REF_LM_LOG:-warn} ./livemig "$@" >"$d/out" 2>"$d/qemu.log" &
  echo $! >"$d/pid"
}

lm_stop() { # NAME: power the guest off through its console; `livemig stop` as the fallback
  local name=$1 i
  if alive "$name"; then
    ./livemig console --vm "$W/$name/sock" --send poweroff >/dev/null 2>&1
    for i in $(seq 150); do alive "$name" || break; sleep 0.1; done
    alive "$name" && ./livemig stop --vm "$W/$name/sock" >/dev/null 2>&1
  fi
  reap "$name" 10
}

lm_vm_args() { # SOCKET KERNEL SMP DISK TAP
  echo run-vm --no-auth --socket "$1" --memory "$MEM" --vcpus "$3" --kernel "$2" \
    --initrd initramfs.cpio --disk "$4" --net "tap=$5,mac=$MAC" --console-stdout ${REF_LM_HOST_ARGS:-}
}

phase_lm_boot() {
  local k t0 init tick n
  for k in bzImage vmlinux; do
    n=lmboot-$k
    cp disk.img "$W/$n.img"
    # shellcheck disable=SC2046 # word splitting of the argument list is intended
    lm_start "$n" $(lm_vm_args "$W/$n/sock" "$k" 1 "$W/$n.img" tap0) --cmdline "$LM_APPEND"
    t0=$(cat "$W/$n/t0")
    tick=$(wait_line "$n" 'livemig-workload: tick 1$' 300) || fail "$n: no first tick"
    init=$(grep -m1 'livemig-guest: init done' "$W/$n/con.log" | tick_ts)
    say "REF boot system=livemig kernel=$k init_done_s=$(elapsed "$t0" "$init") first_tick_s=$(elapsed "$t0" "$(tick_ts <<<"$tick")") mem=$MEM"
    lm_stop "$n"
    rm -f "$W/$n.img"
  done
}

phase_lm_migrate() { # SMP
  local smp=$1 src=lmsrc$1 dst=lmdst$1 disk=$W/lmmig$1.img r
  cp disk.img "$disk"
  # shellcheck disable=SC2046
  lm_start "$src" $(lm_vm_args "$W/$src/sock" "$MIG_KERNEL" "$smp" "$disk" tap0) --cmdline "$LM_APPEND"
  wait_line "$src" 'livemig-workload: tick 1$' 300 >/dev/null || fail "$src: no first tick"
  # shellcheck disable=SC2046 # word splitting of the argument list is intended
  lm_start "$dst" receive --no-auth --listen "$(lm_addr):4445" --socket "$W/$dst/sock" \
    --tap net0=tap1 --console-stdout $(lm_rdma_args) $(prefault livemig) ${REF_LM_HOST_ARGS:-}
  wait_line "$dst" 'listening on' 60 >/dev/null || fail "$dst: not listening"
  sleep "$WARMUP"
  local echo_before
  net_fresh
  echo_before=$(echo_check before)
  say "$src: workload running ($(last_tick "$src" | tick_no) ticks), echo before: $echo_before"
  blackout_start "$W/$src"
  local t_mig
  t_mig=$(now)
  # shellcheck disable=SC2046
  r=$(./livemig migrate --vm "$W/$src/sock" --to "$(lm_addr):4445" --json \
    --downtime-limit "${REF_DOWNTIME_MS:-300}" $(lm_rdma_args migrate) ${REF_LM_MIGRATE_ARGS:-} \
    2>"$W/$src/migrate.err") ||
    fail "$src: livemig migrate: $(tr '\n' ' ' <"$W/$src/migrate.err")[the source VM's log: $(tail -n 6 "$W/$src/qemu.log" 2>/dev/null | tr '\n' ' ')]"
  local src_last
  src_last=$(last_tick "$src")
  sleep 3
  local dst_first dst_last echo_after kept
  dst_first=$(grep -E 'livemig-workload: tick [0-9]+$' "$W/$dst/con.log" | head -n1)
  dst_last=$(last_tick "$dst")
  echo_after=$(echo_check_after livemig "$dst")
  kept=$(kept_rising "$src_last" "$dst_first" "$dst_last")
  [ "$kept" = yes ] || [ "$echo_after" != ok ] || stall_report "$dst"

  num() { grep -o "\"$1\":[^,}]*" <<<"$r" | head -n1 | cut -d: -f2 | tr -d '"'; }
  say "REF migrate system=livemig transport=$TRANSPORT prefault=${REF_PREFAULT:-1} smp=$smp mem=$MEM ws=$WS rate=$RATE status=$(num status) total_ms=$(num total_time_ms) downtime_ms=$(num downtime_ms) setup_ms=$(num setup_ms) transferred=$(num bytes_on_wire) iterations=$(num rounds) downtime_limit_ms=${REF_DOWNTIME_MS:-300} digest_match=$(num digest_match) encryption=$(num encryption | tr " " _) args=$(a=${REF_LM_MIGRATE_ARGS:-}; a=${a// /,}; echo "${a:-default}")"
  if [ -n "${REF_LM_JSON:-}" ]; then say "REF json $(tr -d '\n' <<<"$r")"; fi
  blackout_report "$W/$src" livemig "$smp" "$t_mig" "$(num total_time_ms)" "$dst"
  if [ -n "${REF_LM_LOG:-}" ]; then # the switchover's timeline, unix ms (REF_LM_LOG=info)
    local f l
    for f in "$W/$src/qemu.log" "$W/$dst/qemu.log"; do
      grep -aE 'pausing the guest|prepared|resumed|announced|RDMA access revoked|RDMA registrations released' "$f" |
        while read -r l; do
          say "REF timeline $(basename "$(dirname "$f")") unix_ms=$(iso_ms "${l%% *}") ${l#* }"
        done
    done
    # The destination's own steps of the switchover (land, storage, digest, restore, record,
    # resume), from its report line.
    say "REF steps $(grep -ao 'switchover here: .*' "$W/$dst/con.log" | head -n1)"
  fi
  say "REF ticks system=livemig transport=$TRANSPORT smp=$smp src_last=$(tick_no <<<"$src_last") dst_first=$(tick_no <<<"$dst_first") dst_after_3s=$(tick_no <<<"$dst_last") console_gap_s=$(elapsed "$(tick_ts <<<"$src_last")" "$(tick_ts <<<"$dst_first")") kept_rising=$kept echo_before=$echo_before echo_after=$echo_after"
  ./livemig stop --vm "$W/$src/sock" >/dev/null 2>&1
  reap "$src" 10
  lm_stop "$dst"
  rm -f "$disk"
}

# A line every REF_HEARTBEAT seconds (default 30; 0 = off): L1 load, and for each live QEMU its
# CPU time, thread states and last console line. If a run stalls, this tells a wedged VM (no
# heartbeat at all) from a stuck guest or QEMU (heartbeats, frozen console/CPU time).
heartbeat() {
  local d pid line
  while sleep "$1"; do
    line="load=$(cut -d' ' -f1-3 /proc/loadavg)"
    for d in "$W"/*/; do
      pid=$(cat "$d/pid" 2>/dev/null) && kill -0 "$pid" 2>/dev/null || continue
      line="$line | $(basename "$d") cpu_s=$(awk '{print int(($14 + $15) / 100)}' "/proc/$pid/stat")"
      line="$line threads=$(cat /proc/"$pid"/task/*/stat 2>/dev/null | awk '{print $3}' | sort | uniq -c | tr -s ' \n' ' ')"
      line="$line last=[$(tail -n1 "$d/con.log" 2>/dev/null | cut -c 20-70)]"
    done
    say "heartbeat $line"
  done
}
HB=
[ "${REF_HEARTBEAT:-30}" = 0 ] || { heartbeat "${REF_HEARTBEAT:-30}" & HB=$!; }

setup
[ -z "${REF_HUGEPAGE_POOL:-}" ] || echo "$REF_HUGEPAGE_POOL" >/proc/sys/vm/nr_hugepages
for p in $PHASES; do
  case "$p" in
    boot) phase_boot ;;
    migrate | migrate-rdma)
      TRANSPORT=tcp
      [ "$p" = migrate ] || TRANSPORT=rdma
      for s in $SMPS; do phase_migrate "$s"; done
      ;;
    lm-boot) phase_lm_boot ;;
    lm-migrate | lm-migrate=* | lm-migrate-rdma | lm-migrate-rdma=*)
      # lm-migrate=--compress,none: this run's own `livemig migrate` options
      TRANSPORT=tcp
      case $p in lm-migrate-rdma*) TRANSPORT=rdma ;; esac
      a=${REF_LM_MIGRATE_ARGS:-}
      case $p in *=*) a=${p#*=} a=${a//,/ } ;; esac
      for s in $SMPS; do REF_LM_MIGRATE_ARGS=$a phase_lm_migrate "$s"; done
      ;;
    *) fail "unknown phase $p (boot, migrate, migrate-rdma, lm-boot, lm-migrate[=OPTIONS], lm-migrate-rdma[=OPTIONS])" ;;
  esac
done
say "done"
[ -z "$HB" ] || kill "$HB" 2>/dev/null
