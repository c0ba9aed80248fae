#!/usr/bin/env bash
# Installs what the build needs (scripts/setup.sh), builds livemig and runs `livemig demo`
# with any arguments given: a live migration of a running KVM guest on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec cargo run --release --quiet -- demo "$@"
