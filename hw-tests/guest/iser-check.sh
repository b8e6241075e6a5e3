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
    info "$label stats (sum over reactors): $(python3 -c "import json;d=json.load(open('$STATS'))['reactors'];print({k:sum(int(r.get(k) or 0) for r in d) for k in d[0] if 'iser' in k or 'rdma' in k})")"
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
    # Send with Invalidate: the Linux initiator offers it (iser module's
    # always_register, the default), so SCSI Responses of data commands
    # invalidate the initiator's STag; the initiator checks each one
    # against the task's registration and logs a bogus one.
    local inv bogus
    inv=$(stat_of iser_send_invalidates)
    bogus=$(dmesg | grep -ciE "bogus remote invalidation|unexpected remote invalidation" || true)
    # Every read command advertised an STag and got one RDMA Write, so at
    # least as many responses invalidate as there were RDMA Writes.
    if [ "$inv" -ge "$w" ] && [ "$w" -gt 0 ] && [ "$bogus" = 0 ]; then
        pass "$label: $inv SCSI Responses sent with Send with Invalidate (>= $w read commands), none refused by the initiator"
    else
        fail "$label: Send with Invalidate: $inv sent for $w read commands, $bogus complaints in the kernel log"
    fi
    # Every command's data came from the registered pool, so no read was
    # copied into bounce chunks: the kernel's largest command (2044 KiB
    # here) fits the 2 MiB class.
    # With a pool made small on purpose (VMTEST_EXPECT_WAITS=1, the target
    # run with --buffer-pool-mib 64), commands must have waited for buffers
    # instead.
    local bounce misses waits sg
    bounce=$(stat_of iser_bounce_copies) misses=$(stat_of data_pool_misses)
    waits=$(stat_of data_pool_waits) sg=$(stat_of data_pool_sg)
    if [ "$bounce" = 0 ] && [ "$misses" = 0 ]; then
        pass "$label: all data in registered pool buffers (0 bounce copies, 0 pool misses, $waits waits for a buffer)"
    else
        fail "$label: $bounce bounce copies, $misses data buffers from the heap"
    fi
    if [ "${VMTEST_EXPECT_WAITS:-0}" = 1 ]; then
        if [ "$waits" -gt 0 ]; then
            pass "$label: commands waited for buffers of the small pool ($waits waits)"
        else
            fail "$label: no command waited for a buffer, though the pool is small"
        fi
    fi
    # With --buffer-sg always (VMTEST_EXPECT_SG=1), READ and WRITE data
    # went in pieces: RDMA Writes and Reads of several work requests. Only
    # commands of 256 KiB and more can (eight 4 KiB buffers do not hold
    # 64 KiB): the 1 MiB and 8 MiB fio jobs, about 560 commands.
    if [ "${VMTEST_EXPECT_SG:-0}" = 1 ]; then
        if [ "$sg" -gt 100 ]; then
            pass "$label: $sg commands had their data in pieces (scatter-gather RDMA)"
        else
            fail "$label: only $sg commands had their data in pieces, with --buffer-sg always"
        fi
    fi
}

# Placement: reactor 0 holds the listeners, and a connect request goes to
# the least-loaded core (ties away from reactor 0), whose CQ and SRQ carry
# the queue pair for life. With two reactors (the VM has two CPUs) the
# session's RDMA traffic must show on another reactor than 0.
placement() {
    local label=target-rdma:iser per off
    per=$(python3 - "$STATS" <<'EOF2'
import json, sys
d = json.load(open(sys.argv[1]))["reactors"]
print(len(d), sum(int(r.get("iser_rdma_writes") or 0) + int(r.get("iser_rdma_reads") or 0) for r in d[1:]),
      "; ".join("reactor %d: %s recvs, %s RDMA writes, %s RDMA reads" % (i, r.get("iser_recvs"), r.get("iser_rdma_writes"), r.get("iser_rdma_reads")) for i, r in enumerate(d)))
EOF2
)
    read -r n off rest <<<"$per"
    if [ "$n" -lt 2 ]; then
        info "$label: one reactor, placement not checked ($rest)"
    elif [ "$off" -gt 0 ]; then
        pass "$label: the connection ran on the core it was placed on, with that core's CQ and SRQ ($rest)"
    else
        fail "$label: every iSER operation ran on reactor 0 ($rest)"
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

# RDMA device removal under a live session: `rdma link delete rxe0` must
# finish (the kernel waits until user space lets go of the device: the
# target ends the iSER connections at once and drops its queue pairs,
# queues, memory registrations and protection domain), the target keeps
# running and serving TCP, and once rxe0 is back it listens again and a
# new iSER login sees the data written before. A second device (rxe1)
# stays: librdmacm (rdma-core 44) closes its own context on a removed
# device only when it re-reads a device list that is not empty.
device_removal() {
    local label=target-rdma:iser t0 rc
    if ! { ip link add dummy1 type dummy && ip link set dummy1 up &&
        rdma link add rxe1 type rxe netdev dummy1; }; then
        fail "$label: set up a second device rxe1"
        return 1
    fi
    login iser || return 1
    # A pattern written before the removal must read back after it (the
    # earlier fio runs overwrote the file system on the LUN).
    head -c 8M /dev/urandom >"$WORK/pattern"
    check "$label: write an 8 MiB pattern at 64 MiB" dd if="$WORK/pattern" of="/dev/$DISK" \
        bs=1M seek=64 oflag=direct conv=fsync status=none || return 1
    t0=$(now)
    rc=0
    timeout 60 rdma link delete rxe0 || rc=$?
    if [ "$rc" = 0 ]; then
        pass "$label: rdma link delete rxe0 under a live session finished in $(awk -v a="$t0" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}') s (the target let go of the device)"
    else
        fail "$label: rdma link delete rxe0 did not finish within 60 s (exit $rc): the target holds the device"
        ls -l /proc/"$TARGET_PID"/fd 2>/dev/null | grep infiniband | sed 's/^/    | /'
        return 1
    fi
    if kill -0 "$TARGET_PID" 2>/dev/null && grep -q "RDMA device removed" "$WORK/target-rdma.log"; then
        pass "$label: target still running, logged the removal"
    else
        fail "$label: target gone or silent after the device removal"
        tail -n 20 "$WORK/target-rdma.log" | sed 's/^/    | /'
        return 1
    fi
    # The initiator's session is in recovery now: end it.
    timeout 60 iscsiadm -m node -T "$TARGET_IQN" -p "$VM_PORTAL" -I "$IFACE" --logout >/dev/null 2>&1 || true
    DISK=
    check "$label: TCP still served after the removal (discovery)" discover || return 1
    rdma link add rxe0 type rxe netdev dummy0 || { fail "$label: rdma link add rxe0 again"; return 1; }
    for _ in $(seq 1 50); do
        ibv_devinfo -d rxe0 2>/dev/null | grep -q PORT_ACTIVE && break
        sleep 0.2
    done
    # The target retries listening every half second.
    for _ in $(seq 1 20); do
        grep -q "iSER portals listening again" "$WORK/target-rdma.log" && break
        sleep 0.5
    done
    if grep -q "iSER portals listening again" "$WORK/target-rdma.log"; then
        pass "$label: iSER portal listening again once rxe0 is back"
    else
        fail "$label: iSER portal not listening again 10 s after rxe0 came back"
        return 1
    fi
    login iser || return 1
    check "$label: the pattern reads back intact over the new device" bash -c \
        "dd if=/dev/$DISK bs=1M skip=64 count=8 iflag=direct status=none | cmp - '$WORK/pattern'" || return 1
    logout || return 1
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
    placement
    logout || return 1
    device_removal || return 1
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
