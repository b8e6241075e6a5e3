#!/usr/bin/env bash
# Guest test of target-rdma's iSER transport against the kernel's iSER
# initiator (needs the hw-tests harness: vm.sh, common.sh, check.sh).
#
#   hw-tests/vm.sh hw-tests/guest/iser-check.sh
#
# The same suite as `check.sh target-rdma iser` (login with "iSCSI Initiator
# over iSER", fio verify=crc32c 4k..8m sequential and random, ext4 + files +
# fsck, logout, login, fsck and checksums again), with the target writing its
# stats file; then the counters: data moved by RDMA Write and RDMA Read, no
# failed work request, and no memory registered since the device was set up
# (registration stays off the I/O path), and no heap allocation by the
# reactors during fio on a warmed-up session. Last, the target is stopped with an
# iSER session still logged in and must exit cleanly on SIGTERM.
set -euo pipefail
# shellcheck source=hw-tests/guest/common.sh
. "$(dirname "$0")/common.sh"

STATS=$WORK/target-rdma-stats.json
export VMTEST_TARGET_ARGS="${VMTEST_TARGET_ARGS:-} --stats-file $STATS"

stat_of() {
    # stat_of FIELD: the sum over reactors of FIELD in the stats file.
    python3 - "$STATS" "$1" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
print(sum(int(r.get(sys.argv[2]) or 0) for r in d["reactors"]))
EOF
}

counters() {
    local label=target-rdma:iser regs w r errs wb rb
    sleep 1.5 # the stats file is rewritten every second
    regs=$(stat_of rdma_registrations_since_setup)
    w=$(stat_of iser_rdma_writes) r=$(stat_of iser_rdma_reads)
    wb=$(stat_of iser_rdma_write_bytes) rb=$(stat_of iser_rdma_read_bytes)
    errs=$(stat_of iser_completion_errors)
    info "$label stats: $(python3 -c "import json;d=json.load(open('$STATS'));print({k:v for k,v in d['reactors'][0].items() if 'iser' in k or 'rdma' in k})")"
    if [ "$regs" = 0 ] && [ "$(stat_of rdma_registrations_at_setup)" -gt 0 ]; then
        pass "$label: no memory registration under load ($(stat_of rdma_registrations_at_setup) at device setup, 0 since)"
    else
        fail "$label: memory registrations since device setup: $regs"
    fi
    if [ "$w" -gt 0 ] && [ "$r" -gt 0 ]; then
        pass "$label: data by RDMA: $w RDMA Writes ($wb bytes), $r RDMA Reads ($rb bytes)"
    else
        fail "$label: RDMA Writes $w, RDMA Reads $r"
    fi
    if [ "$errs" = 0 ]; then pass "$label: no failed work request"; else fail "$label: $errs failed work requests"; fi
    # Every command's data came from the registered pool, so no read was
    # copied into bounce chunks: the kernel's largest command (2044 KiB
    # here) fits the 2 MiB class.
    local bounce misses
    bounce=$(stat_of iser_bounce_copies) misses=$(stat_of data_pool_misses)
    if [ "$bounce" = 0 ] && [ "$misses" = 0 ]; then
        pass "$label: all data in registered pool buffers (0 bounce copies, 0 pool misses)"
    else
        fail "$label: $bounce bounce copies, $misses data buffers from the heap"
    fi
}

# The I/O path allocates nothing: reactor heap allocation counts before and
# after fio jobs on a warmed-up session (reads by RDMA Write, writes by
# RDMA Read with immediate and unsolicited data).
no_alloc() {
    local label=target-rdma:iser a0 a1 pass
    fio_base
    # The same jobs twice: the first pass warms the caches (buffer classes
    # first seen, queues reaching their depth), the second is measured.
    for pass in warm-up measured; do
        [ "$pass" = measured ] && { sleep 1.5; a0=$(stat_of heap_allocs); }
        check "$label: fio randrw bs=4k QD16 ($pass)" timeout 300 "${FIO[@]}" \
            --rw=randrw --bs=4k --size=8M --iodepth=16 || return 1
        check "$label: fio randrw bs=1m QD4 ($pass)" timeout 300 "${FIO[@]}" \
            --rw=randrw --bs=1m --size=32M --iodepth=4 || return 1
    done
    sleep 1.5
    a1=$(stat_of heap_allocs)
    if [ "$a1" = "$a0" ]; then
        pass "$label: no heap allocation on the I/O path (reactors: $a0 allocations before and after)"
    else
        fail "$label: reactors allocated $((a1 - a0)) times during I/O ($a0 -> $a1)"
    fi
}

run() {
    target_start target-rdma iser || return 1
    login iser || return 1
    fio_verify_suite target-rdma:iser || return 1
    fs_write target-rdma:iser || return 1
    logout || return 1
    login iser || return 1
    fs_verify target-rdma:iser || return 1
    no_alloc || return 1
    counters
    logout || return 1
    # A session left logged in when the target stops: the target must
    # still exit cleanly (its QP torn down, the CM disconnect answered).
    login iser || return 1
}

if vm_setup; then
    echo "==== target-rdma over iser (iser-check.sh)"
    t0=$(now) rc=0
    run || rc=$?
    if [ "$rc" != 0 ] || [ "$N_FAIL" != 0 ]; then dump_diagnostics; fi
    target_stop || true
    initiator_reset
    info "target-rdma:iser: guest test took $(awk -v a="$t0" -v b="$(now)" 'BEGIN{printf "%.0f", b-a}') s"
fi
finish
