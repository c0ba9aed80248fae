#!/usr/bin/env bash
# Two emulated hosts for migration tests and benchmarks: network namespaces NAME-a and NAME-b
# joined by a veth pair, optionally shaped with tc tbf to a 1 or 10 GbE link.
#
#   scripts/netns-link.sh up NAME [none|1gbit|10gbit|RATE]   create (replacing an old pair)
#   scripts/netns-link.sh up NAME loopback                   one namespace, NAME-a: both
#                                                            hosts on its own 127.0.0.1
#   scripts/netns-link.sh down NAME                          delete
#
# After `up`, host A is 10.M.N.1 in NAME-a and host B is 10.M.N.2 in NAME-b (printed as
# `A=... B=...`); run programs there with `ip netns exec NAME-a ...`. Needs root and iproute2.
# DEV_B is host B's end of the link, whose counters count what crossed it (`lo` for loopback:
# only the namespace's own traffic).
set -euo pipefail

cmd=${1:-}; name=${2:-}
[ -n "$cmd" ] && [ -n "$name" ] || { sed -n '2,10p' "$0"; exit 2; }
[ ${#name} -le 10 ] || { echo "netns-link: NAME must be at most 10 characters" >&2; exit 2; }

down() {
  ip netns del "$name-a" 2>/dev/null || true
  ip netns del "$name-b" 2>/dev/null || true
}

case "$cmd" in
  down) down ;;
  up)
    profile=${3:-none}
    down
    if [ "$profile" = loopback ]; then
      ip netns add "$name-a"
      ip -n "$name-a" link set lo up
      echo "A=127.0.0.1 B=127.0.0.1 NS_A=$name-a NS_B=$name-a DEV_B=lo"
      exit 0
    fi
    # A subnet derived from the name, so parallel pairs do not collide.
    sum=$(printf '%s' "$name" | cksum | cut -d' ' -f1)
    net="10.$((100 + sum % 100)).$((sum / 100 % 250))"
    ip netns add "$name-a"
    ip netns add "$name-b"
    ip link add "v$name-a" type veth peer name "v$name-b"
    ip link set "v$name-a" netns "$name-a"
    ip link set "v$name-b" netns "$name-b"
    for side in a b; do
      n=1; [ $side = b ] && n=2
      ip -n "$name-$side" addr add "$net.$n/24" dev "v$name-$side"
      ip -n "$name-$side" link set "v$name-$side" up
      ip -n "$name-$side" link set lo up
      case "$profile" in
        none) ;;
        # A token bucket per direction; the burst must hold at least one timer tick of data.
        1gbit) tc -n "$name-$side" qdisc add dev "v$name-$side" root tbf rate 1gbit burst 512kb latency 20ms ;;
        10gbit) tc -n "$name-$side" qdisc add dev "v$name-$side" root tbf rate 10gbit burst 8mb latency 20ms ;;
        *) tc -n "$name-$side" qdisc add dev "v$name-$side" root tbf rate "$profile" burst 1mb latency 20ms ;;
      esac
    done
    echo "A=$net.1 B=$net.2 NS_A=$name-a NS_B=$name-b DEV_B=v$name-b"
    ;;
  *) sed -n '2,10p' "$0"; exit 2 ;;
esac
