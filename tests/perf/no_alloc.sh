#!/usr/bin/env bash
# The I/O path allocates nothing: while a workload runs, each reactor's
# count of heap allocations (the binary's global allocator counts them per
# thread; --stats-file publishes them every second) must not move.
#
#   tests/perf/no_alloc.sh TARGET_BIN IOBENCH_BIN LOG_DIR
#
# For each workload: start the client for RUN_S seconds, take a snapshot
# of the counters once the sessions are in full feature phase and warm
# (after WARM_S), another before the end, and require that commands
# completed in between while heap allocations did not. Logins and
# logouts allocate (names, session state); they are outside the window.
set -euo pipefail
BIN=$1 IOBENCH=$2 LOGS=$3
RUN_S=${NO_ALLOC_RUN_S:-9} WARM_S=${NO_ALLOC_WARM_S:-3} WINDOW_S=${NO_ALLOC_WINDOW_S:-4}
# The LUN under test (NO_ALLOC_LUN, e.g. a gluster:// URL) and a name for
# the verdict lines; extra target flags in NO_ALLOC_FLAGS. NO_ALLOC_WORKLOADS
# replaces the workload list (lines "name iobench-args"). With
# NO_ALLOC_EXPECT_WAITS=1 (a pool made small on purpose) each workload must
# also have made commands wait for data buffers; with NO_ALLOC_EXPECT_SG=1,
# have given some commands their data in several smaller buffers
# (data_pool_sg). In every run no command may take a heap buffer instead
# of a pool buffer (data_pool_misses). NO_ALLOC_FILL=0 skips writing the
# LUN first (iobench's stamps), for workloads that expect zeros (VERIFY).
LUN=${NO_ALLOC_LUN:-mem:256MiB} TAG=${NO_ALLOC_TAG:-} FILL=${NO_ALLOC_FILL:-1}
EXPECT_WAITS=${NO_ALLOC_EXPECT_WAITS:-0} EXPECT_SG=${NO_ALLOC_EXPECT_SG:-0}
read -ra EXTRA <<<"${NO_ALLOC_FLAGS:-}"
mkdir -p "$LOGS"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
stats=$LOGS/no-alloc-stats.json
iqn=iqn.2026-11.io.target-rdma:no-alloc
# A reactor in steady state prints a backtrace for each of its next few
# heap allocations (TARGET_RDMA_TRACE_ALLOCS), so a failure names the
# allocation; the lines the log gained during a failed window are shown.
log=$LOGS/no-alloc-target.log
TARGET_RDMA_TRACE_ALLOCS=${TARGET_RDMA_TRACE_ALLOCS:-4} \
timeout -k 5 600 "$BIN" --portal "127.0.0.1:$port" --target "$iqn" --lun "$LUN" "${EXTRA[@]}" \
    --cores 0-1 --stats-file "$stats" --log-level warn >"$log" 2>&1 &
wrap=$!
trap 'kill -TERM $wrap 2>/dev/null; pkill -TERM -f "127.0.0.1:$port --target $iqn" 2>/dev/null || true; wait $wrap 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$port" 2>/dev/null && break
    sleep 0.1
done
url=iscsi://127.0.0.1:$port/$iqn/0
if [ "$FILL" = 1 ]; then
    timeout 120 "$IOBENCH" -m fill -b 1048576 -q 8 "$url" >"$LOGS/no-alloc-fill.log" 2>&1
fi

snapshot() { # prints "reactor allocs commands direct copied waits misses sg" per reactor, one line each
    python3 - "$stats" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["reactors"]:
    print(r["reactor"], r["heap_allocs"], r["commands"] + r["commands_served_remote"],
          r["rx_data_direct_bytes"], r["rx_data_copied_bytes"],
          r["data_pool_waits"], r["data_pool_misses"], r["data_pool_sg"])
PY
}

fail=0
while read -r name args; do
    read -ra a <<<"$args"
    timeout $((RUN_S + 60)) "$IOBENCH" "${a[@]}" -t "$RUN_S" "$url" >"$LOGS/no-alloc-$name.log" 2>&1 &
    client=$!
    sleep "$WARM_S"
    before=$(snapshot)
    log_from=$(wc -l <"$log")
    sleep "$WINDOW_S"
    after=$(snapshot)
    log_to=$(wc -l <"$log")
    if ! wait "$client"; then
        echo "FAIL  no-alloc$TAG $name: the client failed (see $LOGS/no-alloc-$name.log)"
        fail=1
        continue
    fi
    # Writes must also have their data put where the backstore takes it by
    # the socket's copy alone, at least 90% of it: read straight into the
    # command's buffer (64 KiB and more, transport_tcp::direct), or lent
    # from the pool ring it was received into (4 KiB with immediate data,
    # or in one Data-Out answering an R2T: mempool::RxRing).
    direct_min=0
    case $name in 4k-*write* | 64k-*write* | 1m-*write*) direct_min=90 ;; esac
    verdict=$(paste -d' ' <(echo "$before") <(echo "$after") | awk -v n="$name" -v tag="$TAG" -v dmin="$direct_min" -v ewait="$EXPECT_WAITS" -v esg="$EXPECT_SG" '
        { allocs += $10 - $2; cmds += $11 - $3; direct += $12 - $4; copied += $13 - $5
          waits += $14 - $6; misses += $15 - $7; sg += $16 - $8
          detail = detail sprintf(" reactor %s: %d allocations, %d commands;", $1, $10 - $2, $11 - $3) }
        END {
            share = (direct + copied > 0) ? 100 * direct / (direct + copied) : 0
            ok = (allocs == 0 && cmds > 0 && misses == 0 && (dmin == 0 || share >= dmin) && (ewait == 0 || waits > 0) && (esg == 0 || sg > 0))
            if (dmin > 0) detail = detail sprintf(" write data received into place %.1f%% (at least %d%%);", share, dmin)
            detail = detail sprintf(" %d waits for a data buffer%s, %d commands with data in pieces%s, %d heap buffers instead (none allowed);", waits, (ewait ? " (some required)" : ""), sg, (esg ? " (some required)" : ""), misses)
            printf "%s  no-alloc%s %s:%s\n", (ok ? "PASS" : "FAIL"), tag, n, detail
        }')
    echo "$verdict"
    if [[ $verdict != PASS* ]]; then
        fail=1
        # The stats file lags by up to a second: widen the window by the
        # lines written just before it.
        echo "  target log during the window (lines $((log_from > 20 ? log_from - 20 : 0))-$log_to of $log):"
        # Backtraces without the allocator's and the standard library's
        # frames, at most 10 frames each.
        sed -n "$((log_from > 20 ? log_from - 20 : 1)),${log_to}p" "$log" | awk '
            /^ +[0-9]+: / { frame = $0; next }
            /^ +at / {
                if ($0 !~ /\/rustc\// && $0 !~ /heap_count\.rs/ && n < 10) { print frame; print; n++ }
                next
            }
            { print; n = 0 }' | head -200 | sed 's/^/  | /'
    fi
done <<<"${NO_ALLOC_WORKLOADS:-4k-randread-qd32-2sess -m read -p rand -b 4096 -q 32 -s 2
4k-randwrite-qd32-2sess -m write -p rand -b 4096 -q 32 -s 2
4k-randwrite-r2t-qd32 -m write -p rand -b 4096 -q 32 -I
64k-randwrite-qd16 -m write -p rand -b 65536 -q 16
1m-seqread-qd8 -m read -p seq -b 1048576 -q 8
1m-seqwrite-qd8 -m write -p seq -b 1048576 -q 8}"
exit $fail
