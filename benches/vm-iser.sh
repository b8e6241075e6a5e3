#!/usr/bin/env bash
# Side-by-side fio in one VM run: LIO over iSER, LIO over TCP, target-rdma
# over TCP and target-rdma over iSER (an expected failure until its iSER
# transport exists), all driven by the Linux kernel initiator on soft-RoCE.
# Prints IOPS, MB/s, target CPU and the ratios target-rdma / LIO.
#
#   benches/vm-iser.sh
#
# Environment:
#   VM_BENCH_CASES   default "lio:iser lio:tcp target-rdma:tcp target-rdma:iser?"
#                    ("?" = may fail without failing the run)
#                    ("+OPTS" after a target-rdma case adds options, e.g.
#                    target-rdma:tcp+--poll=interrupt)
#   VM_BENCH_ROUNDS  passes over the cases in the one VM (default 1); the
#                    report shows medians, with the spread over passes
#   VMTEST_FIO_SECONDS  seconds per timed fio job (default 5)
#   BENCH_OUT        where the serial log and the report go (default /tmp)
#   TARGET_RDMA_BIN  binary under test (default $CARGO_TARGET_DIR/release/target-rdma)
#
# Under TCG emulation absolute figures mean little; compare the rows of one
# run only, and read even the ratios as rough.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CASES=${VM_BENCH_CASES:-lio:iser lio:tcp target-rdma:tcp target-rdma:iser?}
OUT=${BENCH_OUT:-/tmp}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
LOG=$OUT/vm-iser-$STAMP.log
REPORT=$OUT/vm-iser-$STAMP.txt
mkdir -p "$OUT"

read -r -a one_round <<<"$CASES"
case_args=()
for _ in $(seq 1 "${VM_BENCH_ROUNDS:-1}"); do case_args+=("${one_round[@]}"); done
# ~60-90 s per case under TCG plus boot and setup; the limit only guards hangs.
limit=$((240 + ${#case_args[@]} * (10 * ${VMTEST_FIO_SECONDS:-5} + 200)))
rc=0
"$ROOT/hw-tests/vm.sh" --timeout "$limit" --log "$LOG" \
    "$ROOT/hw-tests/guest/bench.sh" "${case_args[@]}" || rc=$?
echo
python3 "$ROOT/benches/vm_iser_report.py" "$LOG" | tee "$REPORT"
echo "serial log: $LOG; report: $REPORT"
exit "$rc"
