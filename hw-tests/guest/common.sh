# shellcheck shell=bash
# Guest-side helpers shared by the VM test scripts (sourced, not run): VM setup
# (configfs, soft-RoCE on a dummy interface, iscsid), the two targets
# (target-rdma and LIO), the kernel initiator, the fio and filesystem checks
# and the performance jobs. Every check prints one "PASS name" or
# "FAIL name: reason" line; vm.sh reads them from the serial log.
#
# A target is named KIND:TRANSPORT, KIND target-rdma or lio, TRANSPORT tcp or
# iser. The transport is a parameter everywhere, so target-rdma over iSER is
# the same code path as LIO over iSER.

VM_ADDR=169.254.77.1
VM_PORT=3260
VM_PORTAL=$VM_ADDR:$VM_PORT
TARGET_IQN=iqn.2026-11.io.target-rdma:vm
INITIATOR_IQN=iqn.2026-11.io.target-rdma:vm-initiator
LUN_MIB=${VMTEST_LUN_MIB:-256}
FIO_SECONDS=${VMTEST_FIO_SECONDS:-5}
# Bytes per fio verify job = this many MiB times the block size's factor.
FIO_SCALE=${VMTEST_FIO_SCALE:-1}
HW_GUEST=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
WORK=/var/tmp/vmtest
mkdir -p "$WORK"

N_PASS=0
N_FAIL=0
N_XFAIL=0
# EXPECT_FAIL=1 while running a case that is known not to work yet (the
# benchmark's target-rdma over iSER before its transport exists): its
# failures print as XFAIL and do not fail the run.
EXPECT_FAIL=0
pass() { N_PASS=$((N_PASS + 1)); echo "PASS $*"; }
fail() {
    if [ "$EXPECT_FAIL" = 1 ]; then N_XFAIL=$((N_XFAIL + 1)); echo "XFAIL $*"
    else N_FAIL=$((N_FAIL + 1)); echo "FAIL $*"; fi
}
info() { echo "INFO $*"; }
now() { cut -d' ' -f1 /proc/uptime; }

# check NAME CMD...: run with output to a log, one PASS/FAIL line; the log's
# tail is shown on failure only, to keep the serial log readable.
check() {
    local name=$1; shift
    local logf
    logf=$WORK/$(tr -c 'A-Za-z0-9._-' '_' <<<"$name").log
    local t0 rc=0
    t0=$(now)
    "$@" >"$logf" 2>&1 || rc=$?
    if [ "$rc" = 0 ]; then
        pass "$name ($(awk -v a="$t0" -v b="$(now)" 'BEGIN{printf "%.1f s", b-a}'))"
        return 0
    fi
    fail "$name: exit $rc"
    tail -n "${VMTEST_LOG_TAIL:-15}" "$logf" | sed 's/^/    | /'
    return 1
}

finish() {
    echo "guest: $N_PASS passed, $N_FAIL failed"
    [ "$N_FAIL" = 0 ] && [ "$N_PASS" -gt 0 ]
}

dump_diagnostics() {
    echo "---- dmesg (last 30 lines)"
    dmesg | tail -n 30 | sed 's/^/    | /'
    if [ -s "$WORK/target-rdma.log" ]; then
        echo "---- target-rdma log (last 20 lines)"
        tail -n 20 "$WORK/target-rdma.log" | sed 's/^/    | /'
    fi
}

# ------------------------------------------------------------------ VM setup
vm_setup() {
    # Reserved up front: target-rdma's buffer pool prefers 2 MiB huge pages.
    echo "${VMTEST_HUGEPAGES:-64}" >/proc/sys/vm/nr_hugepages 2>/dev/null || true
    if ! modprobe configfs || ! mount -t configfs configfs /sys/kernel/config; then
        fail "setup: configfs"
        return 1
    fi
    check "setup: dummy0 $VM_ADDR/16" setup_net || return 1
    check "setup: soft-RoCE rxe0 on dummy0 ACTIVE" setup_rxe || return 1
    check "setup: iscsid and initiator modules" setup_iscsid || return 1
}

setup_net() {
    ip link set lo up
    ip link add dummy0 type dummy
    # A link-local address: RDMA CM cannot route to 127.x or to an rxe on lo.
    ip addr add "$VM_ADDR/16" dev dummy0
    ip link set dummy0 up
}

setup_rxe() {
    modprobe rdma_rxe
    modprobe rdma_ucm
    rdma link add rxe0 type rxe netdev dummy0

    for _ in $(seq 1 50); do
        if ibv_devinfo -d rxe0 2>/dev/null | grep -q 'PORT_ACTIVE'; then
            ibv_devinfo -d rxe0 | grep -E 'hca_id|transport|state|active_mtu'
            return 0
        fi
        sleep 0.2
    done
    ibv_devinfo -d rxe0
    return 1
}

setup_iscsid() {
    mkdir -p /etc/iscsi /var/lib/iscsi /run/lock/iscsi
    # The host's node database is not ours to use; the overlay keeps this local.
    rm -rf /etc/iscsi/nodes /etc/iscsi/send_targets /etc/iscsi/ifaces /var/lib/iscsi/*
    echo "InitiatorName=$INITIATOR_IQN" >/etc/iscsi/initiatorname.iscsi
    # Short login retries so a target that cannot log in fails in seconds,
    # and a short replacement timeout so I/O on a dead session errors out
    # instead of hanging the test; NOP-Outs relaxed for emulation's latency.
    cat >/etc/iscsi/iscsid.conf <<'CONF'
node.startup = manual
node.session.timeo.replacement_timeout = 20
node.conn[0].timeo.login_timeout = 15
node.conn[0].timeo.logout_timeout = 15
node.conn[0].timeo.noop_out_interval = 10
node.conn[0].timeo.noop_out_timeout = 30
node.session.initial_login_retry_max = 1
node.session.err_timeo.abort_timeout = 15
node.session.err_timeo.lu_reset_timeout = 30
node.session.err_timeo.tgt_reset_timeout = 30
node.session.iscsi.InitialR2T = No
node.session.iscsi.ImmediateData = Yes
node.session.iscsi.FirstBurstLength = 262144
node.session.iscsi.MaxBurstLength = 16776192
node.conn[0].iscsi.MaxRecvDataSegmentLength = 262144
node.session.cmds_max = 128
node.session.queue_depth = 32
CONF
    modprobe sd_mod
    modprobe iscsi_tcp
    # ib_iser caps a command at 512 KiB unless told; the issue wants up to
    # 8 MiB per command (the RDMA device may still clamp it, see login's INFO).
    modprobe ib_iser max_sectors="${VMTEST_ISER_MAX_SECTORS:-16384}"
    iscsid

    for _ in $(seq 1 50); do
        iscsiadm -m session >/dev/null 2>&1; local rc=$?
        # 21 = "no active sessions": iscsid answers.
        if [ "$rc" = 21 ] || [ "$rc" = 0 ]; then return 0; fi
        sleep 0.2
    done
    echo "iscsid does not answer"
    return 1
}

# ------------------------------------------------------------------ targets
# target_start KIND TRANSPORT / target_stop: one target at a time on
# $VM_PORTAL. TARGET_PID is target-rdma's pid, empty for LIO.
TARGET_KIND=
TARGET_PID=
target_start() {
    TARGET_KIND=$1
    case "$1" in
        target-rdma) check "start target-rdma ($2)" target_rdma_start "$2" ;;
        lio) check "configure LIO through configfs ($2)" lio_start "$2" ;;
        *) fail "unknown target kind $1"; return 1 ;;
    esac
}

target_stop() {
    case "$TARGET_KIND" in
        target-rdma) target_rdma_stop ;;
        lio) check "LIO teardown" lio_stop ;;
    esac
    TARGET_KIND=
}

port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/$VM_ADDR/$VM_PORT" 2>/dev/null; }

target_rdma_start() {
    local transport=$1
    [ -x "$TARGET_RDMA_BIN" ] || { echo "no executable TARGET_RDMA_BIN=$TARGET_RDMA_BIN"; return 1; }
    # Always a TCP portal, for discovery; the transport under test adds its own
    # (a second portal on the same address and port: RDMA CM has its own ports).
    local portals=(--portal "$VM_PORTAL")
    [ "$transport" = tcp ] || portals+=(--portal "$VM_PORTAL,$transport")
    # VMTEST_TARGET_ARGS: more options, e.g. "--poll interrupt"
    local extra=()
    read -r -a extra <<<"${VMTEST_TARGET_ARGS:-}"
    echo "$TARGET_RDMA_BIN ${portals[*]} --target $TARGET_IQN --lun mem:${LUN_MIB}MiB ${extra[*]}"
    "$TARGET_RDMA_BIN" "${portals[@]}" --target "$TARGET_IQN" --lun "mem:${LUN_MIB}MiB" \
        --log-level "${VMTEST_TARGET_LOG_LEVEL:-info}" "${extra[@]}" >"$WORK/target-rdma.log" 2>&1 &
    TARGET_PID=$!

    for _ in $(seq 1 150); do
        if ! kill -0 "$TARGET_PID" 2>/dev/null; then
            echo "target-rdma exited during startup:"; cat "$WORK/target-rdma.log"; TARGET_PID=; return 1
        fi
        port_open && { sleep 0.5; cat "$WORK/target-rdma.log"; return 0; }
        sleep 0.2
    done
    echo "target-rdma does not listen on $VM_PORTAL after 30 s"; cat "$WORK/target-rdma.log"
    return 1
}

target_rdma_stop() {
    [ -n "$TARGET_PID" ] || return 0
    if ! kill -0 "$TARGET_PID" 2>/dev/null; then
        fail "target-rdma was still running at the end"
        tail -n 20 "$WORK/target-rdma.log" | sed 's/^/    | /'
        TARGET_PID=
        return 1
    fi
    kill -TERM "$TARGET_PID"
    local rc=0
    for _ in $(seq 1 100); do kill -0 "$TARGET_PID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$TARGET_PID" 2>/dev/null; then
        kill -KILL "$TARGET_PID"
        fail "target-rdma stops on SIGTERM within 10 s"
        rc=1
    else
        wait "$TARGET_PID" 2>/dev/null || rc=$?
        if [ "$rc" = 0 ]; then pass "target-rdma stops cleanly on SIGTERM"
        else fail "target-rdma stops cleanly on SIGTERM: exit $rc"; fi
    fi
    TARGET_PID=
    # The next case's diagnostics must not show this run's log.
    mv -f "$WORK/target-rdma.log" "$WORK/target-rdma.prev.log" 2>/dev/null || true
    return "$rc"
}

LIO=/sys/kernel/config/target
LIO_TPG=$LIO/iscsi/$TARGET_IQN/tpgt_1
LIO_DEV=$LIO/core/iblock_0/vmdisk
lio_start() {
    local transport=$1
    modprobe target_core_mod || return 1
    modprobe target_core_iblock || return 1
    modprobe iscsi_target_mod || return 1
    if [ "$transport" != tcp ]; then modprobe ib_isert || return 1; fi
    # The backstore: a brd RAM disk (rd_size in KiB) under iblock, LIO's
    # usual block backend.
    if [ ! -b /dev/ram0 ]; then
        modprobe brd rd_nr=1 rd_size=$((LUN_MIB * 1024)) max_part=0 || return 1
    fi
    mkdir -p "$LIO_DEV" || return 1
    echo "udev_path=/dev/ram0" >"$LIO_DEV/control" || return 1
    echo 1 >"$LIO_DEV/enable" || return 1
    mkdir -p "$LIO_TPG" || return 1
    mkdir "$LIO_TPG/lun/lun_0" || return 1
    ln -s "$LIO_DEV" "$LIO_TPG/lun/lun_0/vmdisk" || return 1
    mkdir "$LIO_TPG/np/$VM_PORTAL" || return 1
    # iser=1 adds an iSER portal beside the TCP one on the same address.
    if [ "$transport" != tcp ]; then echo 1 >"$LIO_TPG/np/$VM_PORTAL/iser" || return 1; fi
    echo 1 >"$LIO_TPG/attrib/generate_node_acls" || return 1
    echo 1 >"$LIO_TPG/attrib/cache_dynamic_acls" || return 1
    echo 0 >"$LIO_TPG/attrib/demo_mode_write_protect" || return 1
    echo 0 >"$LIO_TPG/attrib/authentication" || return 1
    echo 1 >"$LIO_TPG/enable" || return 1

    for _ in $(seq 1 50); do port_open && return 0; sleep 0.2; done
    echo "LIO does not listen on $VM_PORTAL"
    return 1
}

lio_stop() {
    local rc=0
    [ -d "$LIO_TPG" ] || return 0
    echo 0 >"$LIO_TPG/enable" || rc=1
    if [ -d "$LIO_TPG/np/$VM_PORTAL" ]; then
        [ "$(cat "$LIO_TPG/np/$VM_PORTAL/iser" 2>/dev/null)" = 1 ] && { echo 0 >"$LIO_TPG/np/$VM_PORTAL/iser" || rc=1; }
        rmdir "$LIO_TPG/np/$VM_PORTAL" || rc=1
    fi
    rm -f "$LIO_TPG/lun/lun_0/vmdisk" || rc=1
    rmdir "$LIO_TPG/lun/lun_0" || rc=1
    rmdir "$LIO_TPG" || rc=1
    rmdir "$LIO/iscsi/$TARGET_IQN" || rc=1
    rmdir "$LIO_DEV" || rc=1
    rmdir "$LIO/core/iblock_0" || rc=1
    return "$rc"
}

# ------------------------------------------------------------------ initiator
# login TRANSPORT: discovery over TCP, login with the iface of that transport
# (open-iscsi's built-in "default" = TCP, "iser" = iSER). Sets DISK (sdX).
DISK=
IFACE=
login() {
    local transport=$1
    IFACE=default
    [ "$transport" = tcp ] || IFACE=$transport
    check "discovery lists $TARGET_IQN" discover || return 1
    local before
    before=$(dmesg | grep -c 'iSCSI Initiator over' || true)
    check "login over $transport" login_node || return 1
    local want='iSCSI Initiator over TCP/IP'
    [ "$transport" = iser ] && want='iSCSI Initiator over iSER'
    local new
    new=$(dmesg | grep 'iSCSI Initiator over' | tail -n +"$((before + 1))")
    if grep -q "$want" <<<"$new"; then pass "kernel logged \"$want\": $(tail -n 1 <<<"$new" | sed 's/^\[[^]]*\] //')"
    else fail "kernel did not log \"$want\" at login (got: ${new:-nothing})"; return 1; fi
    check "SCSI disk attached" wait_disk || return 1
    local conn_transport
    conn_transport=$(iscsiadm -m session -P1 2>/dev/null | awk -F': ' '/Iface Transport/ {print $2; exit}')
    if [ "$conn_transport" = "$( [ "$transport" = tcp ] && echo tcp || echo "$transport")" ]; then
        pass "session transport is $conn_transport"
    else
        fail "session transport is '$conn_transport', wanted $transport"
    fi
    # Let large fio blocks reach the target as single commands where the
    # initiator allows it; report what the kernel settled on.
    local q=/sys/block/$DISK/queue hw
    hw=$(cat "$q/max_hw_sectors_kb")
    echo $((hw < 8192 ? hw : 8192)) >"$q/max_sectors_kb" 2>/dev/null || true
    info "$DISK: $(($(cat "/sys/block/$DISK/size") / 2048)) MiB, max_hw_sectors_kb=$hw max_sectors_kb=$(cat "$q/max_sectors_kb") nr_requests=$(cat "$q/nr_requests")"
}

discover() {
    timeout 60 iscsiadm -m discovery -t sendtargets -p "$VM_PORTAL" | tee /dev/stderr | grep -q " $TARGET_IQN\$"
}

login_node() {
    if [ "$IFACE" != default ]; then
        timeout 30 iscsiadm -m node -o new -T "$TARGET_IQN" -p "$VM_PORTAL" -I "$IFACE" >/dev/null
    fi
    timeout 90 iscsiadm -m node -T "$TARGET_IQN" -p "$VM_PORTAL" -I "$IFACE" --login
}

wait_disk() {
    local d
    for _ in $(seq 1 100); do
        d=$(iscsiadm -m session -P3 2>/dev/null | awk '/Attached scsi disk/ {print $4; exit}')
        if [ -n "$d" ] && [ -b "/dev/$d" ] && [ "$(cat "/sys/block/$d/size" 2>/dev/null || echo 0)" -gt 0 ]; then
            DISK=$d
            echo "/dev/$DISK"
            return 0
        fi
        sleep 0.2
    done
    iscsiadm -m session -P3
    return 1
}

logout() {
    local d=$DISK
    check "logout" timeout 60 iscsiadm -m node -T "$TARGET_IQN" -p "$VM_PORTAL" -I "$IFACE" --logout || return 1
    DISK=
    for _ in $(seq 1 50); do [ -b "/dev/$d" ] || return 0; sleep 0.2; done
    fail "/dev/$d still present after logout"
    return 1
}

# Ends every session and forgets every node: the next target starts clean.
initiator_reset() {
    timeout 60 iscsiadm -m node --logoutall=all >/dev/null 2>&1 || true
    timeout 30 iscsiadm -m node -o delete >/dev/null 2>&1 || true
    timeout 30 iscsiadm -m discoverydb -t sendtargets -p "$VM_PORTAL" -o delete >/dev/null 2>&1 || true
    DISK=
}

# ------------------------------------------------------------------ fio
# fio's common arguments, set once the disk is known.
fio_base() {
    FIO=(fio --name=vm --filename="/dev/$DISK" --ioengine=libaio --direct=1 --group_reporting=1)
}

# fio_verify_suite LABEL: for each block size, sequential and random writes
# with verify=crc32c (read back right after writing), then a read-only pass
# over the same layout with the same seed (fio re-checks every block's
# crc32c and header). Sizes stay small: under emulation a MiB costs ms.
fio_verify_suite() {
    local label=$1 bs mib qd rw
    fio_base
    for spec in 4k:4:16 64k:16:8 1m:32:4 8m:64:2; do
        IFS=: read -r bs mib qd <<<"$spec"
        local size=$((mib * FIO_SCALE))M
        for rw in write randwrite; do
            local rd=read
            [ "$rw" = randwrite ] && rd=randread
            check "$label: fio $rw bs=$bs ${size} QD$qd verify=crc32c" \
                timeout 300 "${FIO[@]}" --rw="$rw" --bs="$bs" --size="$size" --iodepth="$qd" \
                --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_dump=0 || return 1
            check "$label: fio $rd bs=$bs ${size} QD$qd verify=crc32c" \
                timeout 300 "${FIO[@]}" --rw="$rd" --bs="$bs" --size="$size" --iodepth="$qd" \
                --verify=crc32c --verify_fatal=1 --verify_dump=0 || return 1
        done
    done
}

# perf_suite LABEL: timed fio jobs, each bracketed by CPU snapshots in
# perf.py, which prints one "RESULT ..." line per job.
perf_suite() {
    local label=$1 spec name rw bs qd
    for spec in 4k-randread:randread:4k:16 4k-randwrite:randwrite:4k:16 \
                1m-read:read:1m:4 1m-write:write:1m:4 8m-write:write:8m:2; do
        IFS=: read -r name rw bs qd <<<"$spec"
        if ! timeout $((FIO_SECONDS + 60)) python3 "$HW_GUEST/perf.py" run "$label" "$name" "${TARGET_PID:-0}" \
                --name=vm --filename="/dev/$DISK" --ioengine=libaio --direct=1 \
                --rw="$rw" --bs="$bs" --iodepth="$qd" --size="$((LUN_MIB - 8))M" \
                --time_based=1 --runtime="$FIO_SECONDS"; then
            fail "$label: perf $name"
        fi
    done
}

# ------------------------------------------------------------------ filesystem
MNT=/mnt/vmtest
# fs_write LABEL: ext4 on the LUN, files of awkward sizes, their checksums
# kept in the guest's RAM, unmounted and checked by fsck.
fs_write() {
    local label=$1
    mkdir -p "$MNT"
    check "$label: mkfs.ext4" mkfs.ext4 -q -F "/dev/$DISK" || return 1
    check "$label: mount" mount -t ext4 "/dev/$DISK" "$MNT" || return 1
    check "$label: write files and checksum them" fs_fill || { umount "$MNT"; return 1; }
    check "$label: unmount" umount "$MNT" || return 1
    check "$label: fsck.ext4 -fn clean" fsck.ext4 -fn "/dev/$DISK"
}

fs_fill() {
    local n size
    n=0
    for size in 1 4095 4096 65537 1048576 3145728 8388608 25165824; do
        head -c "$size" /dev/urandom >"$MNT/f$n.bin"
        n=$((n + 1))
    done
    mkdir -p "$MNT/dir/sub"
    for n in $(seq 1 200); do echo "small file $n" >"$MNT/dir/sub/s$n.txt"; done
    sync
    (cd "$MNT" && find . -type f ! -path './lost+found/*' -print0 | sort -z | xargs -0 sha256sum) >"$WORK/manifest"
    wc -l <"$WORK/manifest"
    [ "$(wc -l <"$WORK/manifest")" = 208 ]
}

# fs_verify LABEL: after a fresh login: fsck again, mount, checksums match.
fs_verify() {
    local label=$1
    check "$label: fsck.ext4 -fn clean after re-login" fsck.ext4 -fn "/dev/$DISK" || return 1
    check "$label: mount after re-login" mount -t ext4 -o ro "/dev/$DISK" "$MNT" || return 1
    # Drop the page cache so the checksums read the LUN, not guest memory.
    echo 3 >/proc/sys/vm/drop_caches
    check "$label: all 208 checksums match after re-login" bash -c "cd '$MNT' && sha256sum --quiet -c '$WORK/manifest'"
    check "$label: unmount" umount "$MNT"
}
