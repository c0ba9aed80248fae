#!/usr/bin/env bash
# One migration between two emulated hosts (scripts/netns-link.sh) and its JSON report.
#
#   scripts/migrate-netns.sh PROFILE [run-vm options...] -- [migrate options...]
#
# PROFILE is none, 1gbit, 10gbit or a tc rate. The destination reserves the VM's RAM ahead
# of time, as `livemig demo` does. Example:
#   scripts/migrate-netns.sh 1gbit --memory 1024 --fill text -- --compress auto
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${LIVEMIG:-$here/../target/release/livemig}
profile=$1; shift
vm_args=(); mig_args=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do vm_args+=("$1"); shift; done
[ $# -gt 0 ] && shift
mig_args=("$@")
mem=512
for ((i = 0; i < ${#vm_args[@]}; i++)); do [ "${vm_args[$i]}" = --memory ] && mem=${vm_args[$((i + 1))]}; done

name=lmmig$$
dir=$(mktemp -d)
cleanup() {
  "$bin" stop --vm "$dir/dst.sock" >/dev/null 2>&1 || true
  "$bin" stop --vm "$dir/src.sock" >/dev/null 2>&1 || true
  "$here/netns-link.sh" down "$name"
  rm -rf "$dir"
}
trap cleanup EXIT
eval "$("$here/netns-link.sh" up "$name" "$profile" | sed 's/ /\n/g' | sed 's/^/export /')"
ip netns exec "$NS_B" "$bin" receive --listen "$B:7000" --socket "$dir/dst.sock" --reserve-mib "$mem" >"$dir/recv.out" 2>"$dir/recv.err" &
ip netns exec "$NS_A" "$bin" run-vm --socket "$dir/src.sock" "${vm_args[@]}" >"$dir/run.out" 2>"$dir/run.err" &
for _ in $(seq 600); do
  grep -q listening "$dir/recv.out" 2>/dev/null && grep -q running "$dir/run.out" 2>/dev/null && break
  sleep 0.1
done
grep -q running "$dir/run.out" || { cat "$dir/run.err" >&2; exit 1; }
"$bin" migrate --vm "$dir/src.sock" --to "$B:7000" --json "${mig_args[@]}"
