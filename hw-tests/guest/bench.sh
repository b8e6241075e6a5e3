#!/usr/bin/env bash
# Guest benchmark: the same timed fio jobs against several targets, one after
# the other in one VM, so that their figures can be compared.
#
#   bench.sh CASE...     CASE = KIND:TRANSPORT[+TARGET-ARGS], e.g. lio:iser,
#                        target-rdma:tcp, target-rdma:tcp+--poll=interrupt
#                        (target-rdma options for that case, comma-separated);
#                        a trailing "?" marks a case that may fail (XFAIL)
#
# Each case: start the target, log in, one verify=crc32c pass (figures of a
# target that corrupts data are worthless), the perf jobs (RESULT lines),
# logout, stop.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: bench.sh KIND:TRANSPORT[?]..."; exit 2; }
# shellcheck source=hw-tests/guest/common.sh
. "$(dirname "$0")/common.sh"

bench_case() {
    local kind=$1 transport=$2 label=$3
    target_start "$kind" "$transport" || return 1
    login "$transport" || return 1
    fio_base
    check "$label: fio randwrite bs=64k verify=crc32c" \
        timeout 300 "${FIO[@]}" --rw=randwrite --bs=64k --size=32M --iodepth=8 \
        --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_dump=0 || return 1
    perf_suite "$label"
    logout || return 1
}

BASE_TARGET_ARGS=${VMTEST_TARGET_ARGS:-}
vm_setup || { finish; exit 1; }
for c in "$@"; do
    EXPECT_FAIL=0
    case "$c" in *\?) EXPECT_FAIL=1; c=${c%\?} ;; esac
    kind=${c%%:*} transport=${c#*:} args=
    case "$transport" in *+*) args=${transport#*+}; transport=${transport%%+*} ;; esac
    VMTEST_TARGET_ARGS="$BASE_TARGET_ARGS ${args//,/ }"
    echo "==== $kind over $transport${args:+ with ${args//,/ }}$([ "$EXPECT_FAIL" = 1 ] && echo " (may fail: XFAIL)")"
    f0=$N_FAIL x0=$N_XFAIL t0=$(now)
    rc=0
    bench_case "$kind" "$transport" "$c" || rc=$?
    if [ "$rc" != 0 ] || [ "$N_FAIL" != "$f0" ] || [ "$N_XFAIL" != "$x0" ]; then
        dump_diagnostics
        echo "RESULT $c status=failed"
    fi
    initiator_reset
    target_stop || true
    EXPECT_FAIL=0
    info "$c: $(awk -v a="$t0" -v b="$(now)" 'BEGIN{printf "%.0f", b-a}') s"
done
echo "guest: $N_XFAIL expected failures (XFAIL)"
finish
