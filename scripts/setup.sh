#!/usr/bin/env bash
# Installs the system packages livemig's build, demo and tests need on a Debian host.
set -euo pipefail
need=()
command -v ip >/dev/null || need+=(iproute2)
command -v cc >/dev/null || need+=(gcc)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: need ${need[*]}; run as root or install them" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ ! -w /dev/kvm ]; then
  echo "setup: warning: /dev/kvm is not usable; KVM tests will fail and 'livemig demo' falls back to the memory-only VM" >&2
fi
