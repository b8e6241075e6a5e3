#!/usr/bin/env bash
# Guest test: one target over one transport, driven by the kernel initiator.
#
#   check.sh KIND TRANSPORT [--perf]
#     KIND       target-rdma | lio
#     TRANSPORT  tcp | iser
#
# Login (with the kernel's "iSCSI Initiator over ..." line), fio verify=crc32c
# over sequential and random writes and reads from 4k to 8 MiB blocks, ext4
# with checksummed files and a clean fsck, logout, login again, fsck and
# checksums again. --perf adds the timed fio jobs with CPU figures.
# Run it in the VM: hw-tests/vm.sh hw-tests/guest/check.sh target-rdma tcp
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: check.sh KIND TRANSPORT [--perf]"; exit 2; }
KIND=$1 TRANSPORT=$2 PERF=${3:-}
# shellcheck source=hw-tests/guest/common.sh
. "$(dirname "$0")/common.sh"
LABEL=$KIND:$TRANSPORT

run() {
    vm_setup || return 1
    target_start "$KIND" "$TRANSPORT" || return 1
    login "$TRANSPORT" || return 1
    fio_verify_suite "$LABEL" || return 1
    fs_write "$LABEL" || return 1
    logout || return 1
    login "$TRANSPORT" || return 1
    fs_verify "$LABEL" || return 1
    if [ "$PERF" = --perf ]; then perf_suite "$LABEL"; fi
    logout || return 1
}

t0=$(now)
rc=0
run || rc=$?
if [ "$rc" != 0 ] || [ "$N_FAIL" != 0 ]; then dump_diagnostics; fi
initiator_reset
target_stop || true
info "$LABEL: guest test took $(awk -v a="$t0" -v b="$(now)" 'BEGIN{printf "%.0f", b-a}') s"
finish
