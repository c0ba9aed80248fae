#!/usr/bin/env bash
# test-rdma.sh — livemig's RDMA test suite, on soft-RoCE inside a throw-away QEMU VM.
#
# This host's kernel has no RDMA, so the tests run in the VM that scripts/rdma-vm.sh boots
# (TCG, Debian's kernel, rxe0 on 10.0.99.1 and rxe1 on 10.0.99.2 joined by a veth pair). Here
# we build, on the host, the livemig binary and the test binaries that need a device:
#   - tests/rdma.rs (migrations through the binary, memory-only VMs: there is no KVM in there),
#   - livemig-transport's unit tests (the verbs layer on its own),
# copy them into one VM boot and run their ignored (device-needing) tests one at a time.
# The RDMA throughput is measured against ib_write_bw in the same boot.
#
# Usage: scripts/test-rdma.sh [extra test-binary args, e.g. a test name filter]
# Env:   LIVEMIG_RDMA_TIMEOUT (whole VM, default 900 s), LIVEMIG_RDMA_MEM (MiB, default 2048).
# Exit status: the tests' (0 = all passed); 124/125 from rdma-vm.sh if the VM itself failed.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS

# The path of the test executable cargo reports on stderr: "Executable <name> (<path>)".
test_exe() {
  sed -n 's/^ *Executable .*(\(.*\))$/\1/p' | tail -n1
}

echo "== building livemig and the RDMA test binaries (release)"
cargo build --release --bin livemig
# (cargo's messages are shown as they are; not through `tee /dev/stderr`, which would truncate
# a log file our stderr is redirected to)
out=$(cargo test --release --test rdma --no-run 2>&1) || { echo "$out" >&2; exit 1; }
echo "$out" >&2
rdma_tests=$(test_exe <<<"$out")
out=$(cargo test --release -p livemig-transport --lib --no-run 2>&1) || { echo "$out" >&2; exit 1; }
echo "$out" >&2
transport_tests=$(test_exe <<<"$out")
[ -x "$rdma_tests" ] || { echo "test-rdma: no tests/rdma.rs executable found" >&2; exit 1; }
[ -x "$transport_tests" ] || { echo "test-rdma: no livemig-transport test executable found" >&2; exit 1; }
bin=target/release/livemig
[ -n "${CARGO_TARGET_DIR:-}" ] && bin="$CARGO_TARGET_DIR/release/livemig"

log=$(mktemp)
trap 'rm -f "$log"' EXIT
t=$(basename "$transport_tests")
r=$(basename "$rdma_tests")
echo "== booting the soft-RoCE VM: $t rdma::, $r --ignored"
set +e
scripts/rdma-vm.sh run --timeout "${LIVEMIG_RDMA_TIMEOUT:-900}" --mem "${LIVEMIG_RDMA_MEM:-2048}" \
  --files "$bin" "$rdma_tests" "$transport_tests" \
  --env LIVEMIG_BIN=/opt/livemig/livemig \
  -- bash -c '
    echo "== verbs layer: livemig-transport unit tests (ignored = need a device)"
    ./'"$t"' --ignored --test-threads=1 --nocapture rdma:: "$@"; a=$?
    echo "== migrations: tests/rdma.rs"
    ./'"$r"' --ignored --test-threads=1 --nocapture "$@"; b=$?
    [ $a -eq 0 ] && [ $b -eq 0 ]' test-rdma "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e

echo
echo "== RDMA summary (from the VM)"
sed -n '/^--- livemig rdma devices ---$/,/^---$/p' "$log"
# (-o: a test's first line of output follows its name on the same line)
grep -aoE '(RDMA MIGRATION|FAULT|RETRY|MISSING DEVICE|AUTO|RDMA THROUGHPUT|after the peer vanished).*|^test result.*' "$log" || true
echo "test-rdma: $( [ "$rc" = 0 ] && echo passed || echo "FAILED (status $rc)" ) in $((SECONDS - start)) s"
exit "$rc"
