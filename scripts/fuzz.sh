#!/usr/bin/env bash
# Builds every fuzz target under fuzz/ and runs each briefly (FUZZ_SECONDS, default 20),
# printing the executions per target. A crash fails the run and leaves its input in
# fuzz/artifacts/TARGET/ (turn it into a regression test).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${FUZZ_SECONDS:-20}
if ! command -v cargo-fuzz >/dev/null; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked --quiet
fi
# cargo-fuzz passes -Z flags (sanitizers); the stable toolchain accepts them this way.
export RUSTC_BOOTSTRAP=1
targets=$(cargo fuzz list)
echo "== building fuzz targets: $(echo $targets)"
cargo fuzz build --release 2>&1 | tail -n 3
total=0
for t in $targets; do
  mkdir -p "corpus/$t"
  log=$(mktemp)
  if ! cargo fuzz run --release "$t" -- -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1; then
    tail -n 40 "$log"
    echo "fuzz: target $t FAILED (input saved under fuzz/artifacts/$t)"
    exit 1
  fi
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo 0)
  total=$((total + execs))
  printf 'fuzz: %-16s %10s executions in %ss, no crash\n' "$t" "$execs" "$secs"
  rm -f "$log"
done
echo "fuzz: $total executions in all"
