#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit/property/doc tests, end-to-end tests with real
# KVM guests, two-host (network namespace) tests, storage, bad-input and fault tests, the fuzz
# targets, and — inside one boot of a nested TCG VM with soft-RoCE and real KVM
# (scripts/test-nested.sh) — the RDMA suite and the Linux-guest tests.
# Needs: root (network namespaces), /dev/kvm. Installs what is missing (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

"$(dirname "$0")/setup.sh"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --release -- -D warnings
echo "== cargo doc (no warnings)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --workspace --quiet
echo "== cargo test (release: KVM guests and page copies are slow in debug builds)"
cargo test --workspace --release -- --test-threads=2 --skip fault_matrix
echo "== fault matrix (prints its table of cases and outcomes)"
cargo test --release --test faults -- --nocapture
echo "== criterion benches compile"
cargo bench --workspace --no-run --quiet
echo "== fuzz targets: build and run each briefly"
./scripts/fuzz.sh
echo "== nested VM: RDMA on soft-RoCE and Linux guests on real KVM (scripts/test-nested.sh)"
./scripts/test-nested.sh
