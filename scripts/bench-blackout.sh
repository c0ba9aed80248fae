#!/bin/bash
# bench-blackout.sh — what a client of a Linux VM loses during a live migration, livemig
# beside QEMU 7.2, in one boot of the nested VM (the only KVM here that boots a stock kernel).
# `livemig bench --blackout` runs it.
#
# Same guest (scripts/linux-guest.sh: Debian's kernel, 256 MiB, 1 vCPU, its workload writing
# 2000 pages/s over 64 MiB), same topology (the guest's tap on a bridge; the destination's tap
# on the same bridge; the client is the bridge itself), same downtime limit (QEMU's default,
# 300 ms). A client pings the guest every 10 ms and streams through the guest's TCP echo
# service; the figure is the longest gap between ping replies. QEMU announces itself with
# announce-self (5 RARPs at 50/150/250/350 ms) and livemig with its defaults (the same RARP
# schedule plus VIRTIO_NET_F_GUEST_ANNOUNCE). The two systems alternate, REPEAT times each.
#
# Usage: scripts/bench-blackout.sh [--repeat N] [--out DIR]
# Writes DIR/raw.log (everything the nested VM printed), DIR/results.md and DIR/results.json.
set -euo pipefail
cd "$(dirname "$0")/.."
repeat=3
out=results/bench-blackout-$(date -u +%Y%m%d-%H%M%S)
while [ $# -gt 0 ]; do
  case "$1" in
    --repeat) repeat=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "bench-blackout.sh: unknown argument $1 (--repeat N, --out DIR)" >&2; exit 2 ;;
  esac
done
case "$repeat" in '' | *[!0-9]* | 0) echo "bench-blackout.sh: --repeat wants a count >= 1" >&2; exit 2 ;; esac
mkdir -p "$out"

bin=${LIVEMIG_BIN:-}
if [ -z "$bin" ]; then
  echo "== building livemig (release)"
  cargo build --release --bin livemig
  bin=${CARGO_TARGET_DIR:-target}/release/livemig
fi
echo "== building the Linux guest (scripts/linux-guest.sh)"
eval "$(scripts/linux-guest.sh build)"

phases=()
for _ in $(seq "$repeat"); do phases+=(migrate lm-migrate); done
echo "== booting the nested VM: ${#phases[@]} migrations"
set +e
LIVEMIG_RDMA_EXTRA_BINS="qemu-system-x86_64 bridge" LIVEMIG_RDMA_EXTRA_MODULES="kvm kvm_amd tun bridge" \
  scripts/rdma-vm.sh run --mode lo --timeout $((600 + 400 * repeat)) \
  --env REF_BLACKOUT=1 --env REF_SMPS=1 --env REF_DISKCHECK=0 --env REF_HEARTBEAT=30 --env REF_LM_LOG=info \
  --files guest/qemu-reference.sh "$bin" \
  "$KERNEL_BZIMAGE" "$KERNEL_VMLINUX" "$INITRD" "$DISK_TEMPLATE" "$QEMU_FIRMWARE" \
  -- bash qemu-reference.sh "${phases[@]}" >"$out/raw.log" 2>&1 &
vm=$!
# The reference script prints a heartbeat every 30 s: a VM silent for 180 s after its boot is
# hung (TCG's nested SVM has frozen the VM's kernel, with no message, in runs here), and is
# stopped at once instead of at its time limit.
size=-1 quiet=$SECONDS hung=0
while kill -0 "$vm" 2>/dev/null; do
  now=$(stat -c %s "$out/raw.log" 2>/dev/null || echo 0)
  { [ "$now" != "$size" ] || ! grep -qa '^rdma-vm: booting ' "$out/raw.log"; } && { size=$now; quiet=$SECONDS; }
  if [ $((SECONDS - quiet)) -ge 180 ]; then
    hung=1
    kill "$vm" 2>/dev/null
    break
  fi
  sleep 5
done
wait "$vm"
rc=$?
set -e
[ "$hung" = 0 ] || echo "bench-blackout.sh: the nested VM printed nothing for 180 s (its kernel is hung); stopped it: run again" >&2
[ "$rc" = 0 ] && [ "$hung" = 0 ] || { tail -n 30 "$out/raw.log" >&2; echo "bench-blackout.sh: the nested run failed (status $rc); see $out/raw.log" >&2; exit 1; }

python3 - "$out" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" <<'EOF'
import json, re, statistics, sys
out, commit = sys.argv[1], sys.argv[2]
kv = lambda line: dict(re.findall(r'(\w+)=(\S*)', line))
runs = {"qemu": [], "livemig": []}
mig = {"qemu": [], "livemig": []}
for line in open(f"{out}/raw.log", errors="replace"):
    if "REF blackout " in line:
        d = kv(line.split("REF blackout ", 1)[1]); runs[d["system"]].append(d)
    elif "REF migrate " in line:
        d = kv(line.split("REF migrate ", 1)[1]); mig[d["system"]].append(d)
    elif "REF timeline " in line and runs["livemig"]:
        # livemig's own clock beside the client's (REF_LM_LOG=info): where the gap goes.
        d = kv(line); last = runs["livemig"][-1]
        if "pausing the guest" in line and "pause_unix_ms" not in last:
            last["pause_unix_ms"] = d.get("unix_ms")
        elif " resumed" in line and "resumed_unix_ms" not in last:
            last["resumed_unix_ms"] = d.get("unix_ms")
if not runs["qemu"] or not runs["livemig"]:
    sys.exit(f"bench-blackout.sh: no REF blackout lines for both systems in {out}/raw.log")
def f(x):
    try: return float(x)
    except (TypeError, ValueError): return None
def med(rows, k):
    v = [f(r.get(k)) for r in rows if f(r.get(k)) is not None]
    return statistics.median(v) if v else None
rows = []
for s in ("livemig", "qemu"):
    rows.append({
        "system": s, "runs": len(runs[s]),
        "longest_gap_ms": med(runs[s], "longest_gap_ms"),
        "back_after_resume_ms": med(runs[s], "back_after_resume_ms"),
        "lost": med(runs[s], "lost"),
        "downtime_ms": med(mig[s], "downtime_ms"),
        "total_ms": med(mig[s], "total_ms"),
        "tcp_survived": sum(r.get("tcp_survived") == "true" for r in runs[s]),
        "each_gap_ms": [f(r.get("longest_gap_ms")) for r in runs[s]],
    })
lm, q = rows
split = []
for r in runs["livemig"]:
    p, rs, gs, ge = (f(r.get(k)) for k in ("pause_unix_ms", "resumed_unix_ms", "gap_start_unix_ms", "gap_end_unix_ms"))
    if None not in (p, rs, gs, ge) and ge > 0:  # ge 0: pings never came back
        split.append((p - gs, rs - p, ge - rs))
lm["gap_split_ms"] = split
ratio = lm["longest_gap_ms"] / q["longest_gap_ms"] if q["longest_gap_ms"] else None
json.dump({"commit": commit, "rows": rows, "gap_ratio_livemig_over_qemu": ratio},
          open(f"{out}/results.json", "w"), indent=2)
fmt = lambda v, d=0: "–" if v is None else f"{v:.{d}f}"
md = [f"# Blackout a client sees during a live migration (commit {commit})", "",
      "Nested VM, Linux guest 256 MiB / 1 vCPU dirtying 2000 pages/s over 64 MiB, tap + bridge,",
      "pings every 10 ms and a TCP echo stream; medians over the runs, systems alternating.", "",
      "| system | runs | longest ping gap ms | replies back after resume ms | pings lost | downtime ms | total ms | TCP survived | each run's gap ms |",
      "|---|---|---|---|---|---|---|---|---|"]
for r in rows:
    md.append(f"| {r['system']} | {r['runs']} | {fmt(r['longest_gap_ms'])} | {fmt(r['back_after_resume_ms'])} | "
              f"{fmt(r['lost'])} | {fmt(r['downtime_ms'])} | {fmt(r['total_ms'])} | {r['tcp_survived']}/{r['runs']} | "
              + ", ".join(fmt(g) for g in r["each_gap_ms"]) + " |")
md += ["", f"livemig's blackout / QEMU's: **{fmt(ratio, 2)}×** (the median gaps, same run)."]
if split:
    md += ["", "Where livemig's gap goes (its log's clock beside the client's, ms): last reply → pause, "
           "pause → resumed on the destination, resumed → first reply:",
           ", ".join(f"{a:.0f} + {b:.0f} + {c:.0f}" for a, b, c in split) + "."]
open(f"{out}/results.md", "w").write("\n".join(md) + "\n")
print("\n".join(md))
EOF
echo "bench-blackout.sh: results in $out"
