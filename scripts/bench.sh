#!/usr/bin/env bash
# The benchmark comparison: installs a font for the plots (Debian packages; QEMU comes with
# scripts/setup.sh), builds livemig and runs `livemig bench` with the given arguments (e.g.
# --quick). Results land in results/bench-DATE/ (CSV, JSON, markdown table, PNG/SVG plots).
# Needs root (namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
need=()
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Touch RAM once so first-touch costs do not swing the figures (nested virtualisation).
head -c "$(( $(awk '/MemAvailable/ {print $2}' /proc/meminfo) * 1024 / 4 ))" /dev/zero > /dev/shm/livemig-warm || true
rm -f /dev/shm/livemig-warm
cargo build --release --quiet
exec ./target/release/livemig bench "$@"
