#!/usr/bin/env bash
# Guest test: one target over one or more transports, driven by the kernel
# initiator.
#
#   check.sh KIND TRANSPORTS [--perf]
#     KIND        target-rdma | lio
#     TRANSPORTS  tcp | iser | a comma list such as iser,tcp (one after the
#                 other, each with a freshly started target, in the same VM)
#
# Login (with the kernel's "iSCSI Initiator over ..." line), fio verify=crc32c
# over sequential and random writes and reads from 4k to 8 MiB blocks, ext4
# with checksummed files and a clean fsck, logout, login again, fsck and
# checksums again. --perf adds the timed fio jobs with CPU figures.
# Run it in the VM: hw-tests/vm.sh hw-tests/guest/check.sh target-rdma tcp
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: check.sh KIND TRANSPORTS [--perf]"; exit 2; }
KIND=$1 TRANSPORTS=$2 PERF=${3:-}
# shellcheck source=hw-tests/guest/common.sh
. "$(dirname "$0")/common.sh"

run() {
    local transport=$1 label=$KIND:$1
    target_start "$KIND" "$transport" || return 1
    login "$transport" || return 1
    fio_verify_suite "$label" || return 1
    fs_write "$label" || return 1
    logout || return 1
    login "$transport" || return 1
    fs_verify "$label" || return 1
    if [ "$PERF" = --perf ]; then perf_suite "$label"; fi
    logout || return 1
}

if vm_setup; then
    IFS=, read -r -a transports <<<"$TRANSPORTS"
    for transport in "${transports[@]}"; do
        echo "==== $KIND over $transport"
        t0=$(now) f0=$N_FAIL rc=0
        run "$transport" || rc=$?
        if [ "$rc" != 0 ] || [ "$N_FAIL" != "$f0" ]; then dump_diagnostics; fi
        initiator_reset
        target_stop || true
        info "$KIND:$transport: guest test took $(awk -v a="$t0" -v b="$(now)" 'BEGIN{printf "%.0f", b-a}') s"
    done
fi
finish
