#!/usr/bin/env bash
# test-nested.sh — livemig's tests that need what this host lacks, in one boot of the nested
# QEMU/TCG VM of scripts/rdma-vm.sh: soft-RoCE (the RDMA suite) and real KVM (Linux guests).
#
# This host's kernel has no RDMA and its /dev/kvm cannot boot a stock kernel. Inside the
# nested VM, rxe gives RDMA devices (rxe0 10.0.99.1, rxe1 10.0.99.2 on a veth pair) and
# `kvm_amd` a real /dev/kvm. Here we build the livemig binary, the test binaries and the Linux
# guest (scripts/linux-guest.sh: Debian's kernel, an initramfs with guest/workload.rs, an ext4
# disk), copy them into one VM boot and run, one at a time:
#   - livemig-transport's RDMA unit tests (the verbs layer on its own),
#   - tests/rdma.rs (migrations over RDMA; memory-only VMs),
#   - tests/linux.rs (Linux guests: boot, migrations, ping-pong, over RDMA).
#
# Usage: scripts/test-nested.sh [rdma|linux|all] [extra test-binary args, e.g. a name filter]
# Env:   LIVEMIG_NESTED_TIMEOUT (whole VM, default 1800 s), LIVEMIG_NESTED_MEM (MiB, default 3072),
#        LIVEMIG_NESTED_TEST_LIMIT (each test, default 600 s), LIVEMIG_NESTED_SILENCE (a VM that
#        prints nothing that long is hung, default 180 s), LIVEMIG_NESTED_REPEAT (run each selected
#        test that many times in a row, default 1: for chasing a rare failure; the retries
#        below still count as for one run).
# Exit status: the tests' (0 = all passed); 124/125 from rdma-vm.sh if the VM itself failed.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
what=${1:-all}
case "$what" in rdma | linux | all) shift || true ;; *) what=all ;; esac

# The path of the test executable cargo reports on stderr: "Executable <name> (<path>)".
test_exe() {
  sed -n 's/^ *Executable .*(\(.*\))$/\1/p' | tail -n1
}
build_tests() { # cargo test args... -> the executable
  local out
  out=$(cargo test --release "$@" --no-run 2>&1) || { echo "$out" >&2; exit 1; }
  echo "$out" >&2
  test_exe <<<"$out"
}

echo "== building livemig and the test binaries (release)"
cargo build --release --bin livemig
rdma_tests=$(build_tests --test rdma)
transport_tests=$(build_tests -p livemig-transport --lib)
linux_tests=$(build_tests --test linux)
bin=target/release/livemig
[ -n "${CARGO_TARGET_DIR:-}" ] && bin="$CARGO_TARGET_DIR/release/livemig"
for f in "$rdma_tests" "$transport_tests" "$linux_tests"; do
  [ -x "$f" ] || { echo "test-nested: no test executable $f" >&2; exit 1; }
done

files=("$bin" "$rdma_tests" "$transport_tests" "$linux_tests")
envs=(--env LIVEMIG_BIN=/opt/livemig/livemig --env "LIVEMIG_NESTED_TEST_LIMIT=${LIVEMIG_NESTED_TEST_LIMIT:-600}"
  --env "LIVEMIG_NESTED_REPEAT=${LIVEMIG_NESTED_REPEAT:-1}")
if [ "$what" != rdma ]; then
  echo "== building the Linux guest (scripts/linux-guest.sh)"
  eval "$(scripts/linux-guest.sh build)"
  # QEMU's firmware and guest/qemu-reference.sh: one test migrates the same guest with QEMU's
  # own RDMA migration beside livemig's.
  files+=("$KERNEL_BZIMAGE" "$KERNEL_VMLINUX" "$INITRD" "$DISK_TEMPLATE" "$QEMU_FIRMWARE"
    guest/qemu-reference.sh)
  envs+=(--env LIVEMIG_QEMU_REFERENCE=/opt/livemig/qemu-reference.sh
    --env "LIVEMIG_GUEST_BZIMAGE=/opt/livemig/$(basename "$KERNEL_BZIMAGE")"
    --env "LIVEMIG_GUEST_VMLINUX=/opt/livemig/$(basename "$KERNEL_VMLINUX")"
    --env "LIVEMIG_GUEST_INITRD=/opt/livemig/$(basename "$INITRD")"
    --env "LIVEMIG_GUEST_DISK=/opt/livemig/$(basename "$DISK_TEMPLATE")")
fi

log=$(mktemp)     # this boot's output
all_log=$(mktemp) # every boot's, for the summary
trap 'rm -f "$log" "$all_log"' EXIT
t=$(basename "$transport_tests")
r=$(basename "$rdma_tests")
l=$(basename "$linux_tests")
# Inside the VM each test runs on its own (`--exact`), at most LIVEMIG_NESTED_TEST_LIMIT
# seconds (a hung test — CI saw one hold the VM until its 1800 s limit, leaving no time for the
# tests after it nor for a second boot — costs that much, says where its processes stood, and
# the run goes on with the next test). Its processes are killed with it: it runs in a process
# group of its own (job control), as do the VMs and clients it started.
inner='
    what=$1; shift
    limit=${LIVEMIG_NESTED_TEST_LIMIT:-600}
    set -m
    run_each() { # BINARY FILTER ARGS...: each ignored test it selects, one at a time
      local bin=$1 filter=$2 rc=0 name pid t; shift 2
      for name in $(./"$bin" --ignored --list $filter "$@" 2>/dev/null | sed -n "s/: test\$//p" |
                    awk -v n="${LIVEMIG_NESTED_REPEAT:-1}" "{ for (i = 0; i < n; i++) print }"); do
        ./"$bin" --ignored --exact --test-threads=1 --nocapture "$name" &
        pid=$!; t=0
        while kill -0 "$pid" 2>/dev/null && [ "$t" -lt "$limit" ]; do
          sleep 1; t=$((t + 1))
          [ $((t % 60)) -eq 0 ] && echo "test-nested: $name running for $t s"
        done
        if kill -0 "$pid" 2>/dev/null; then
          echo
          echo "test-nested: TIMEOUT $name did not end within ${limit} s; its processes:"
          for p in $pid $(pgrep -f "^[^ ]*(livemig/livemig|qemu-system)" || true); do
            echo "-- $p (parent $(sed "s/.*) //" /proc/$p/stat 2>/dev/null | cut -d" " -f2)): $(tr "\0" " " < /proc/$p/cmdline 2>/dev/null | cut -c1-160)"
            for d in /proc/$p/task/*; do
              echo "   $(cat $d/comm 2>/dev/null) $(sed "s/.*) //" $d/stat 2>/dev/null | cut -d" " -f1) $(cat $d/wchan 2>/dev/null) syscall $(cut -d" " -f1 $d/syscall 2>/dev/null)"
            done
          done
          kill -KILL -- "-$pid" 2>/dev/null
          pkill -KILL -f "^[^ ]*(livemig/livemig|qemu-system)" 2>/dev/null
          echo "test $name ... FAILED (timed out)"
          rc=1
        fi
        wait "$pid" || rc=1
      done
      return $rc
    }
    a=0; b=0; c=0
    if [ "$what" != linux ]; then
      echo "== verbs layer: livemig-transport unit tests (ignored = need a device)"
      run_each '"$t"' rdma:: "$@" || a=1
      echo "== migrations over RDMA: tests/rdma.rs"
      run_each '"$r"' "" "$@" || b=1
    fi
    if [ "$what" != rdma ]; then
      echo "== Linux guests on KVM: tests/linux.rs"
      [ -w /dev/kvm ] || echo "no /dev/kvm in the nested VM (kvm_amd did not load)"
      run_each '"$l"' "" "$@" || c=1
    fi
    [ $a -eq 0 ] && [ $b -eq 0 ] && [ $c -eq 0 ]'

# One boot of the nested VM; its output also goes to $log. A kernel hang there (TCG's
# emulation of nested SVM has, rarely, left both vCPUs in soft lockup) is cut short: status 200.
# So is a VM that printed nothing for LIVEMIG_NESTED_SILENCE seconds: a test running there says
# so every minute, so silence means its kernel stopped (CI saw a run go quiet in the middle of a
# test and stay so until the VM's own time limit, 25 minutes later).
boot_nested() {
  : >"$log" # (a previous attempt's lines must not count for this one)
  LIVEMIG_RDMA_EXTRA_MODULES="kvm kvm_amd tun bridge" LIVEMIG_RDMA_EXTRA_BINS="debugfs e2fsck bridge qemu-system-x86_64" \
    scripts/rdma-vm.sh run --timeout "${LIVEMIG_NESTED_TIMEOUT:-1800}" --mem "${LIVEMIG_NESTED_MEM:-3072}" \
    --files "${files[@]}" "${envs[@]}" \
    -- bash -c "$inner" test-nested "$what" "$@" > >(tee "$log") 2>&1 &
  local pid=$! size=-1 quiet_since=$SECONDS silence=${LIVEMIG_NESTED_SILENCE:-180} now
  while kill -0 "$pid" 2>/dev/null; do
    if grep -qaE 'soft lockup - CPU#[0-9]+ stuck for ([6-9][0-9]|[0-9]{3,})s' "$log"; then
      echo "test-nested: the nested VM's kernel is hung (soft lockup for a minute); stopping it"
      kill "$pid" 2>/dev/null
      wait "$pid" 2>/dev/null
      return 200
    fi
    # A test that timed out in a kernel that reports tasks blocked for minutes: the kernel is
    # hung, though it goes on printing its hung-task traces (CI at 00ebe49: the stack guard
    # page hit at 33 s, khugepaged blocked from 847 s, the announce test stuck until the
    # VM's own limit, 1800 s, which left no time for a second boot).
    if grep -qa '^test-nested: TIMEOUT ' "$log" &&
      grep -qaE 'INFO: task .+ blocked for more than [0-9]+ seconds' "$log"; then
      echo "test-nested: a test timed out and the nested VM's kernel reports tasks blocked for minutes (it is hung); stopping it"
      kill "$pid" 2>/dev/null
      wait "$pid" 2>/dev/null
      return 200
    fi
    # (Counted from the VM's boot: building its image before says little for minutes.)
    now=$(stat -c %s "$log" 2>/dev/null || echo 0)
    { [ "$now" != "$size" ] || ! grep -qa '^rdma-vm: booting ' "$log"; } && { size=$now; quiet_since=$SECONDS; }
    if [ $((SECONDS - quiet_since)) -ge "$silence" ]; then
      echo "test-nested: the nested VM printed nothing for $silence s (a running test says so every minute: its kernel is hung); stopping it"
      kill "$pid" 2>/dev/null
      wait "$pid" 2>/dev/null
      return 200
    fi
    sleep 5
  done
  wait "$pid"
}

# A crash of the nested VM's own kernel (a panic, or the hang above) is the emulator's, not a
# test's: the run is repeated, saying so — in at most five boots, and not once this script has
# run for LIVEMIG_NESTED_RETRY_BUDGET seconds (CI has seen two hangs and a guest's reset in
# pre-copy in one run, and two hangs, a panic of the nested kernel and a reset in another;
# each boot after the first runs only the tests that have not passed). A failing test in a
# boot whose kernel stayed healthy is never retried.
budget="${LIVEMIG_NESTED_RETRY_BUDGET:-1800}"
max_boots=5

# A Linux guest (L2) whose kernel crashed or stopped while it booted, before its test
# migrated anything: the test fails waiting for the workload on the source's console (a.log),
# and the console tail it prints shows the guest's panic, or ends inside the kernel's boot
# (no line of init or the workload). Seen under TCG's nested SVM — a double fault in the
# guest's exception entry 5 s into boot; a console that stopped mid-line 0.2 s into boot for
# four minutes — while the same kernel booted in every other test of the run. A guest that
# crashes after a migration is a test failure, never retried. The same goes for a guest that
# guest/qemu-reference.sh booted as the source of its next migration (QEMU's or livemig's) and
# that never printed its first tick: CI saw QEMU exit during that boot (`-no-reboot`: the
# guest reset) in the comparison test, after three migrations of the run had passed.
guest_boot_crash() {
  awk '/qemu-ref: FAILED: [^ ]+: no first tick$/ { found = 1 }
       /no tick [0-9]+ on [^ ]*\/a\.log/ { inside = 1; booted = 0 }
       inside && /Kernel panic - not syncing/ { found = 1 }
       inside && /Run \/init as init process|livemig-(guest|workload):/ { booted = 1 }
       inside && /^(FAILED|note: run with)/ { if (!booted) found = 1; inside = 0 }
       END { exit !found }' "$log"
}

# A Linux guest that reset itself (a triple fault: KVM's shutdown exit, which the source VM
# logs) on the source while pre-copy was running, so that the migration failed before any
# switchover: the source only reads the guest's RAM and its dirty log then, and the guest's
# kernel printed no panic. Seen once in CI, in the two-vCPU test, under TCG's emulation of
# nested SVM (nested page faults from the dirty log's write protection during the guest's
# event delivery); the same test passed in the runs before but one, which hung inside it.
# Retried like a crash at boot; the rerun's result stands, and a reset after a switchover fails
# the test. The same in guest/qemu-reference.sh's livemig migrations (the comparison test):
# there the source VM process ends with its guest ("the VM process closed the control
# connection"), and its log's last lines, in the FAILED line, say why (CI at 009565b) — and in
# its QEMU migrations, where QEMU's source (`src1`, run with -no-reboot) ended during pre-copy
# with its guest's reset, which QEMU reports as a SHUTDOWN event of reason guest-reset (CI at
# c0976f6, twice in one run: once while the guest booted, once in pre-copy). No code of ours
# runs in a QEMU migration.
guest_reset_before_switchover() {
  awk '/qemu-ref: FAILED: [^ ]+: livemig migrate: .*the guest shut down \(a triple fault/ { found = 1 }
       /qemu-ref: src[0-9]+: QEMU (died|exited): .*-no-reboot: the guest reset itself/ { found = 1 }
       /panicked at/ { inside = 1; failed = 0; reset = 0 }
       inside && /^migrate failed: / { failed = 1 }
       inside && /the guest shut down \(a triple fault/ { reset = 1 }
       inside && /^(FAILED|note: run with)/ { if (failed && reset) found = 1; inside = 0 }
       END { exit !found }' "$log"
}

# A Linux guest that stopped on the destination after a completed switchover (whose RAM
# digest matched the source's): it reset itself (the destination logs KVM's shutdown exit),
# or its workload stopped printing while its vCPU thread kept running and it acknowledged no
# interrupt. Seen in CI on an AMD host, once each in about a dozen runs — 13.6 s after a
# resume the guest ran normally until, and right after a resume — with the same signs as the
# crashes above that happen with no migration at all (a guest whose console stopped 0.2 s
# into its boot; a double fault while booting), which no restore of ours can cause. (The
# stop right after a resume, with the vCPU looping on a page fault, turned out to be the
# guest given its host's state: below, `guest_given_host_state`.) Any other stop is
# repeated once only, saying so with the test's whole output above, and the rerun's result
# stands. The same goes
# for a guest that stopped on the source — its interrupts unacknowledged for 6 s and more, in
# the source's log — as CI saw once before its migration had even started — and for a guest
# that guest/qemu-reference.sh migrated with livemig (completed, digests matching) and that
# printed no tick on the destination (seen once, in a TCP migration with zstd) — or that QEMU
# migrated, as the reference, and reported completed, whose guest then printed no tick and
# answered no echo on QEMU's destination (seen once, over QEMU's own rdma:, at 40b1dab) — or,
# migrated by either, that ran at a tenth of its pace on the destination (`kept_rising=slow`:
# 3 ticks in 3 s against 30-39 in every other migration CI logged, no echo, no ping answered
# for 6.6 s; once, livemig over RDMA with two queue pairs at 6d8e6d0; the script's `REF stall`
# lines now say which threads held the nested VM's CPUs then) — or whose guest, its ticks
# still rising, answered no echo 3 s after the resume because it had reset itself (the
# destination's log in the `REF stall` line: a triple fault; CI at 1a92644, in a boot where
# QEMU's own destination guest also went silent after its TCP migration) — or, migrated by
# either, whose guest kept ticking but answered no echo 3 s after the resume nor in four more
# tries over the next ~20 s (`echo_after=FAILED`; twice in CI, both livemig over RDMA with two
# queue pairs, the last migration of its boot: at 6d8e6d0 with 3 ticks in 3 s, at 33230ae
# with 18; QEMU's guest lost its network so in the boot at 1a92644; the `REF stall` and
# `REF echo-lost` lines above now say what the nested VM's CPUs, the switch, both taps and the
# guest's own NIC showed) — or
# that livemig was about to migrate there and that had stopped on its own before the migration
# began ("VM is Stopped: cannot pause"; seen once in CI at 494d857, after QEMU's guest of the
# same test had migrated: the guest reset itself while nothing of livemig but its VMM ran).
# A test that did not end within its time limit (`TIMEOUT` above; seen once in CI, at
# 494d857, holding the VM until its own limit) goes the same way, once: its processes' state
# is in the log, and a hang that comes back fails the run.
guest_stopped_after_switchover() {
  awk '/qemu-ref: FAILED: [^ ]+: livemig migrate: .*VM is Stopped: cannot pause/ { found = 1 }
       /qemu-ref: REF migrate system=livemig / { done = / status=completed / && / digest_match=true / }
       /qemu-ref: REF ticks system=livemig .* kept_rising=(no|slow) / && done { found = 1 }
       /qemu-ref: REF ticks system=livemig .* echo_after=FAILED/ && done { found = 1 }
       /qemu-ref: REF stall lmdst[0-9]+: its log: .*the guest shut down \(a triple fault/ && done { found = 1 }
       /qemu-ref: REF migrate system=qemu / { qdone = / status=completed / }
       /qemu-ref: REF ticks system=qemu .* kept_rising=(no|slow) / && qdone { found = 1 }
       /qemu-ref: REF ticks system=qemu .* echo_after=FAILED/ && qdone { found = 1 }
       /panicked at/ { inside = 1; dest = 0; src = 0; stalled = 0; reset = 0 }
       inside && /^no tick [0-9]+ on / { stalled = 1 }
       inside && /^destination status: / && stalled { found = 1 }
       inside && /^destination.s / { dest = 1 }
       inside && dest && /the guest shut down \(a triple fault/ { found = 1 }
       inside && /^source.s stderr/ { src = 1 }
       inside && /^(source.s threads|destination)/ { src = 0 }
       inside && src && /interrupt stayed unacknowledged.*times=(32|64|128|256|512|1024)$/ { found = 1 }
       inside && /^(FAILED|note: run with)/ { inside = 0 }
       /^test-nested: TIMEOUT / { found = 1 }
       END { exit !found }' "$log"
}
after_retried=0

# A Linux guest given its host's own processor state: TCG's emulation of nested SVM, at a
# #VMEXIT, can write the nested VM's own state (its RIP inside kvm_amd's __svm_vcpu_run, its
# CR3 in its own RAM, beyond the guest's) into the guest's save area. Seen at the source's
# pause, in one or two of 20 to 40 migrations of `ping_pong_three_migrations` here (the stop
# after a switchover above, every time at that RIP): the destination resumed a guest whose
# every instruction fetch walked page tables outside its RAM. The source now refuses to send
# such a state ("not a state this guest can run", with the registers: CR3 0xbf89c000 for a
# 256 MiB guest in a 3 GiB nested VM; the migration fails before the switchover), the
# destination refuses to restore it, and the test's trace of a stopped guest names the host
# symbol its RIP lies in. No code of ours can produce an address of the nested VM's own
# kernel: booted again, like the crashes above.
guest_given_host_state() {
  grep -qaE "not a state this guest can run|the guest runs its host.s code" "$log"
}

# The tests that passed in a boot: "test NAME ... ok" or, when a test printed something (its
# output and the nested kernel's console lines follow its name), "ok" alone on a later line
# before the next test starts. A pass this misses is only run again.
passed_tests() {
  awk '/^test [A-Za-z0-9_:]+ \.\.\. / { name = $2; if ($0 ~ / \.\.\. ok$/) { print name; name = "" }; next }
       /^ok$/ && name != "" { print name; name = "" }
       /^test result:/ { name = "" }' "$1"
}

# A boot after a crash runs only what has not passed yet (`--skip NAME` for each test that
# passed before; no test name is part of another's), so a crash late in the run costs the
# rest of the run, not all of it.
# Whether another boot is allowed: this was not the last one, and the retry budget lasts.
boot_left() { [ "$attempt" != "$max_boots" ] && [ "$SECONDS" -lt "$((start + budget))" ]; }

skips=()
for attempt in $(seq "$max_boots"); do
  echo "== booting the nested VM (soft-RoCE + KVM): $what${skips[*]:+ (skipping the $((${#skips[@]} / 2)) tests that passed in earlier boots)}"
  set +e
  boot_nested "$@" "${skips[@]}"
  rc=$?
  set -e
  cat "$log" >>"$all_log"
  while read -r name; do skips+=(--skip "$name"); done < <(passed_tests "$log")
  # The nested VM's own kernel failing under the tests (seen: a panic, soft lockups, a stack
  # guard hit and "scheduling while atomic" in a vCPU thread) takes its L2 guests with it.
  if boot_left && { [ "$rc" = 200 ] ||
    { [ "$rc" = 125 ] && grep -qa 'Kernel panic' "$log" && ! grep -qa 'LIVEMIG-EXIT=' "$log"; } ||
    { [ "$rc" != 0 ] && grep -qaE '^\[ *[0-9.]+\] (BUG: scheduling while atomic|BUG: TASK stack guard page was hit|watchdog: BUG: soft lockup)' "$log"; }; }; then
    echo "test-nested: the nested VM's kernel crashed (status $rc; not a test failure): booting it again (attempt $((attempt + 1)) of at most $max_boots)"
    continue
  fi
  if boot_left && [ "$rc" != 0 ] &&
    guest_boot_crash; then
    echo "test-nested: a Linux guest's kernel crashed or stopped while booting, before any migration (status $rc; the emulator's, not a test failure): booting the nested VM again (attempt $((attempt + 1)) of at most $max_boots)"
    continue
  fi
  if boot_left && [ "$rc" != 0 ] &&
    guest_given_host_state; then
    echo "test-nested: a Linux guest was given the nested VM's own processor state at a pause or resume (the emulator's, not a test failure; see its test's output above): booting the nested VM again for the tests that have not passed (attempt $((attempt + 1)) of at most $max_boots)"
    continue
  fi
  if boot_left && [ "$rc" != 0 ] &&
    guest_reset_before_switchover; then
    echo "test-nested: a Linux guest reset itself (triple fault) on the source during pre-copy, before any switchover (status $rc; see its test's output above): booting the nested VM again for the tests that have not passed (attempt $((attempt + 1)) of at most $max_boots)"
    continue
  fi
  if boot_left && [ "$rc" != 0 ] &&
    [ "$after_retried" = 0 ] && guest_stopped_after_switchover; then
    after_retried=1
    echo "test-nested: a Linux guest stopped (on the source, or on the destination after a completed switchover: reset, or no progress with its vCPU running), or a test timed out (status $rc; see its test's output above): booting the nested VM again, once, for the tests that have not passed (attempt $((attempt + 1)) of at most $max_boots)"
    continue
  fi
  break
done

echo
echo "== summary (from the nested VM)"
sed -n '/^--- livemig rdma devices ---$/,/^---$/{p;/^---$/q}' "$all_log"
# (-o: a test's first line of output follows its name on the same line)
grep -aoE '(test-nested: TIMEOUT|RDMA MIGRATION|FAULT|RETRY|MISSING DEVICE|AUTO|RDMA THROUGHPUT|RDMA COUNTERS|after the peer vanished|LINUX BOOT|LINUX MIGRATION|LINUX COPY|LINUX BLACKOUT|LINUX CELL|qemu-ref: REF migrate).*|^test result.*' "$all_log" || true
echo "test-nested: $( [ "$rc" = 0 ] && echo passed || echo "FAILED (status $rc)" ) in $((SECONDS - start)) s"
exit "$rc"
