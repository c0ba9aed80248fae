#!/usr/bin/env bash
# Installs the system packages livemig's build, demo and tests need on a Debian host.
set -euo pipefail
need=()
command -v ip >/dev/null || need+=(iproute2)
command -v ethtool >/dev/null || need+=(ethtool) # a tap test checks offloads
command -v cc >/dev/null || need+=(gcc)
# The RDMA transport (cargo feature `rdma`, on by default): rdma-sys runs bindgen on the
# verbs headers (libibverbs-dev, librdmacm-dev, libclang-dev, found through pkg-config) and links
# libibverbs.so.1/librdmacm.so.1; at run time libibverbs loads the providers (ibverbs-providers:
# rxe, mlx5, ...); rdma-core brings the `rdma` tool and udev rules for real devices.
for p in libibverbs-dev librdmacm-dev libclang-dev pkg-config ibverbs-providers rdma-core; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: need ${need[*]}; run as root or install them" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
# QEMU: the benchmark's comparison and its tests (the built-in guest booted from its PVH ELF),
# and the nested VM of scripts/test-nested.sh. --no-install-recommends: its recommends drag in
# a GUI stack.
if ! command -v qemu-system-x86_64 >/dev/null; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: need qemu-system-x86; run as root or install it" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-system-x86 >/dev/null
fi
if [ ! -w /dev/kvm ]; then
  echo "setup: warning: /dev/kvm is not usable; KVM tests will fail and 'livemig demo' falls back to the memory-only VM" >&2
fi
