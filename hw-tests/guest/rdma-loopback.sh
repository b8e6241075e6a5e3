#!/usr/bin/env bash
# Guest test: the rdma crate's loopback self-test on soft-RoCE.
#
#   hw-tests/vm.sh hw-tests/guest/rdma-loopback.sh [MIB ROUNDS]...
#
# Creates rxe0 on a dummy interface with a link-local address (RDMA CM
# cannot route to an rxe on lo or to 127.x) and runs the example binary
# once per (MIB, ROUNDS) pair; default "16 1 8 4": one 16 MiB command
# (64 pool buffers, two RDMA work requests of 32 elements each way) and
# four of 8 MiB; then once more deleting rxe0 under live connections
# (DEVICE_REMOVAL on every id, the device released). The binary is VMTEST_LOOPBACK_BIN, default
# target/release/examples/loopback of this repository (build it with
# `cargo build --release -p rdma --example loopback`). It prints its own
# PASS/FAIL lines; vm.sh reads them.
set -uo pipefail
ADDR=${VMTEST_RDMA_ADDR:-169.254.77.1}
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=${VMTEST_LOOPBACK_BIN:-$HERE/../../target/release/examples/loopback}
# vm.sh hands an empty argument through when given none: drop empties.
args=()
for a in "$@"; do [ -n "$a" ] && args+=("$a"); done
[ "${#args[@]}" -gt 0 ] || args=(16 1 8 4)
set -- "${args[@]}"

fail() { echo "FAIL $*"; exit 1; }

[ $(($# % 2)) = 0 ] || fail "loopback: arguments come in MIB ROUNDS pairs"

[ -x "$BIN" ] || fail "loopback: no binary at $BIN"
echo 32 >/proc/sys/vm/nr_hugepages 2>/dev/null || true

ip link set lo up
ip link add dummy0 type dummy || fail "setup: dummy0"
ip addr add "$ADDR/16" dev dummy0
ip link set dummy0 up
modprobe rdma_rxe || fail "setup: modprobe rdma_rxe"
modprobe rdma_ucm || fail "setup: modprobe rdma_ucm"
rdma link add rxe0 type rxe netdev dummy0 || fail "setup: rdma link add rxe0"
for _ in $(seq 1 50); do
    ibv_devinfo -d rxe0 2>/dev/null | grep -q PORT_ACTIVE && break
    sleep 0.2
done
ibv_devinfo -d rxe0 | grep -q PORT_ACTIVE || fail "setup: rxe0 not ACTIVE"
echo "PASS setup: rxe0 ACTIVE on dummy0 $ADDR"

rc=0
while [ $# -ge 2 ]; do
    echo "INFO loopback $ADDR $1 MiB x $2"
    t0=$(cut -d' ' -f1 /proc/uptime)
    "$BIN" "$ADDR" "$1" "$2"
    r=$?
    t1=$(cut -d' ' -f1 /proc/uptime)
    echo "INFO loopback exited $r after $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}') s"
    [ "$r" = 0 ] || rc=$r
    shift 2
done
# Last, as it deletes rxe0: device removal under live connections. A
# second device keeps the list non-empty: librdmacm (rdma-core 44) only
# closes its context on a removed device when it re-reads a device list
# that still has devices in it, so the last device's removal would wait
# for the process to exit.
ip link add dummy1 type dummy && ip link set dummy1 up &&
    rdma link add rxe1 type rxe netdev dummy1 || fail "setup: rxe1"
echo "INFO loopback $ADDR device removal"
"$BIN" "$ADDR" 2 1 removal || rc=$?
if [ "$rc" != 0 ]; then
    echo "---- dmesg (last 20 lines)"
    dmesg | tail -n 20 | sed 's/^/    | /'
fi
exit "$rc"
