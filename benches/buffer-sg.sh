#!/usr/bin/env bash
# What command data in pieces (--buffer-sg) buys when the pool is short:
# two target-rdma processes with the same small pool (64 MiB) and RAM LUN,
# one waiting for a buffer of each command's own class (--buffer-sg off),
# one taking idle smaller buffers instead (fallback, the default), driven
# alternately by the same libiscsi client with large commands at a depth
# the pool cannot hold.
#
#   bash benches/buffer-sg.sh
#
# Environment: BENCH_SECONDS (per run, default 8), BENCH_POOL_MIB (64),
# TARGET_RDMA_BIN (default target/release/target-rdma).
#
# Prints per workload and setting: IOPS, MB/s, the target's CPU-seconds
# (utime + stime of the whole process), I/Os per CPU-second, the commands
# that waited and that took pieces, and the ratios fallback/off.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=benches/lib.sh
source "$here/lib.sh"
root=$(dirname "$here")
SECS=${BENCH_SECONDS:-8}
POOL=${BENCH_POOL_MIB:-64}
BIN=${TARGET_RDMA_BIN:-$root/target/release/target-rdma}
TICK=$(getconf CLK_TCK)
IQN=iqn.2026-11.io.target-rdma:bench-sg

die() { echo "buffer-sg: $*" >&2; exit 1; }
[[ -x $BIN ]] || die "no target-rdma binary at $BIN (run 'bash scripts/setup.sh' or set TARGET_RDMA_BIN)"
[[ -f /usr/include/iscsi/iscsi.h ]] || die "libiscsi headers missing (apt-get install libiscsi-dev)"

work=$(mktemp -d /tmp/buffer-sg.XXXXXX)
declare -A PID WRAP URL STATS
cleanup() {
    local m
    for m in "${!PID[@]}"; do stop_pid "${PID[$m]}" "${WRAP[$m]}"; done
    rm -rf "$work"
}
trap cleanup EXIT

IOBENCH=$work/iobench
cc -O2 -o "$IOBENCH" "$here/iobench.c" -liscsi -lpthread || die "building iobench failed"

counters() { # stats-file: "waits sg waits-granted-pieces" summed over reactors
    python3 - "$1" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["reactors"]
print(sum(x["data_pool_waits"] for x in r), sum(x["data_pool_sg"] for x in r),
      sum(x.get("data_pool_waits_in_pieces", 0) for x in r))
PY
}

for m in off fallback; do
    port=$(free_port)
    STATS[$m]=$work/stats-$m.json
    timeout -k 5 3600 "$BIN" --portal "127.0.0.1:$port" --target "$IQN" --lun mem:1GiB \
        --buffer-pool-mib "$POOL" --buffer-sg "$m" --cores 0-1 --stats-file "${STATS[$m]}" \
        --log-level warn >"$work/target-$m.log" 2>&1 &
    WRAP[$m]=$!
    PID[$m]=$(child_of "${WRAP[$m]}") || die "target ($m) did not start"
    wait_port "$port" || die "target ($m) not listening"
    URL[$m]=iscsi://127.0.0.1:$port/$IQN/0
    timeout 300 "$IOBENCH" -m fill -b 1048576 -q 8 "${URL[$m]}" >"$work/fill-$m.log" 2>&1 ||
        die "filling the LUN ($m) failed"
done
sleep 1.2

echo "== buffer-sg: --buffer-sg off vs fallback, ${POOL} MiB pool, $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "   host: $(nproc) CPUs; target and client share them; ${SECS} s per run"
declare -A IOPS CPUIO
while read -r wl args; do
    read -ra a <<<"$args"
    for m in off fallback; do
        read -r w0 s0 g0 < <(counters "${STATS[$m]}")
        c0=$(cpu_ticks "${PID[$m]}")
        timeout $((SECS + 60)) "$IOBENCH" -t "$SECS" "${a[@]}" "${URL[$m]}" >"$work/run.log" 2>&1 ||
            { cat "$work/run.log" >&2; die "$wl ($m) failed"; }
        c1=$(cpu_ticks "${PID[$m]}")
        sleep 1.2
        read -r w1 s1 g1 < <(counters "${STATS[$m]}")
        res=$(grep '^RESULT ' "$work/run.log") || die "no RESULT from iobench"
        line=$(awk -v t="$TICK" -v c="$((c1 - c0))" -v wl="$wl" -v m="$m" \
            -v w="$((w1 - w0))" -v sg="$((s1 - s0))" -v g="$((g1 - g0))" '{
            for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
            cpu = c / t
            per = (cpu > 0 ? v["ios"] / cpu : 0)
            printf "%s %s %.0f %.1f %.2f %.0f %d %d %d\n", wl, m, v["iops"], v["mbps"], cpu, per, w, sg, g
        }' <<<"${res#RESULT }")
        read -r _ _ iops mbps cpu per w sg g <<<"$line"
        printf '  %-24s %-9s %7s IOPS %8s MB/s  target CPU %6s s  %7s I/Os per CPU-s  %6s waits (%s then in pieces)  %6s in pieces\n' \
            "$wl" "$m" "$iops" "$mbps" "$cpu" "$per" "$w" "$g" "$sg"
        IOPS[$m]=$iops CPUIO[$m]=$per
    done
    awk -v a="${IOPS[fallback]}" -v b="${IOPS[off]}" -v c="${CPUIO[fallback]}" -v d="${CPUIO[off]}" -v wl="$wl" \
        'BEGIN { printf "  %-24s fallback/off: %.2fx IOPS, %.2fx I/Os per target CPU-s\n", wl, (b > 0 ? a / b : 0), (d > 0 ? c / d : 0) }'
done <<'EOF'
1m-randwrite-qd32-2sess -m write -p rand -b 1048576 -q 32 -s 2
1m-randread-qd32-2sess -m read -p rand -b 1048576 -q 32 -s 2
256k-randread-qd64-2sess -m read -p rand -b 262144 -q 64 -s 2
EOF
