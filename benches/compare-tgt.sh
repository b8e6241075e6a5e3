#!/usr/bin/env bash
# Compare target-rdma with tgt per target CPU-second, in one run, on loopback.
#
#   bash benches/compare-tgt.sh
#
# Environment:
#   BENCH_SECONDS    seconds per measured run (default 10)
#   BENCH_ROUNDS     passes over the five main workloads (default 1); the
#                    figures of all passes are pooled, the ratio's spread shown
#   BENCH_OUT        directory for the CSV, SVG and PNG (default /tmp)
#   TARGET_RDMA_BIN  target-rdma binary (default target/release/target-rdma)
#   BENCH_KEEP_LOGS  1: keep the work directory with target and client logs
#
# See benches/README.md for what it measures and how to read it.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=benches/lib.sh
source "$here/lib.sh"
root=$(dirname "$here")
SECS=${BENCH_SECONDS:-10}
ROUNDS=${BENCH_ROUNDS:-1}
OUT=${BENCH_OUT:-/tmp}
BIN=${TARGET_RDMA_BIN:-$root/target/release/target-rdma}
TICK=$(getconf CLK_TCK)
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
IQN_OURS=iqn.2026-11.io.target-rdma:bench
IQN_TGT=iqn.2026-11.io.target-rdma:bench-tgt
MAX_LIFE=$((SECS * (10 * ROUNDS + 10) * 2 + 900))   # hard upper bound on any daemon we start

die() { echo "compare-tgt: $*" >&2; exit 1; }

[[ $SECS =~ ^[0-9]+$ && $SECS -ge 1 ]] || die "BENCH_SECONDS must be a positive integer"
[[ $ROUNDS =~ ^[0-9]+$ && $ROUNDS -ge 1 && $ROUNDS -le 20 ]] || die "BENCH_ROUNDS must be 1..20"
[[ -x $BIN ]] || die "no target-rdma binary at $BIN (run 'bash scripts/setup.sh' or set TARGET_RDMA_BIN)"
mkdir -p "$OUT"
for tool in tgtd tgtadm cc python3; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install tgt gcc python3)"
done
[[ -f /usr/include/iscsi/iscsi.h ]] || die "libiscsi headers missing (apt-get install libiscsi-dev)"

work=$(mktemp -d /tmp/compare-tgt.XXXXXX)
RAW=$work/raw.tsv
: >"$RAW"
OURS_PID= OURS_WRAP= TGT_PID= TGT_WRAP= TGT_CTL= TGT_FILE=

# --- cleanup -----------------------------------------------------------------
stop_ours() { stop_pid "$OURS_PID" "$OURS_WRAP"; OURS_PID= OURS_WRAP=; }
stop_tgt() {
    if [[ -n $TGT_PID ]] && kill -0 "$TGT_PID" 2>/dev/null; then
        timeout 10 tgtadm -C "$TGT_CTL" --lld iscsi --mode target --op delete --force --tid 1 \
            >/dev/null 2>&1 || true
        timeout 10 tgtadm -C "$TGT_CTL" --mode system --op delete >/dev/null 2>&1 || true
        for _ in $(seq 30); do kill -0 "$TGT_PID" 2>/dev/null || break; sleep 0.1; done
    fi
    stop_pid "$TGT_PID" "$TGT_WRAP"
    # tgtd leaves its management socket behind; it ignores SIGTERM, hence the
    # "system delete" above and the KILL fallback in stop_pid
    [[ -n $TGT_PID && -n $TGT_CTL ]] &&
        rm -f "/var/run/tgtd/socket.$TGT_CTL" "/var/run/tgtd/socket.$TGT_CTL.lock"
    TGT_PID= TGT_WRAP=
    [[ -n $TGT_FILE ]] && rm -f "$TGT_FILE"
    return 0
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_ours
    stop_tgt
    if [[ $rc -ne 0 || ${BENCH_KEEP_LOGS:-0} == 1 ]]; then
        echo "compare-tgt: logs kept in $work" >&2
    else
        rm -rf "$work"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- helpers -----------------------------------------------------------------

start_ours() { # extra flags...
    local port
    port=$(free_port)
    OURS_URL=iscsi://127.0.0.1:$port/$IQN_OURS/0
    OURS_FLAGS="$*"
    timeout -k 5 "$MAX_LIFE" "$BIN" --portal "127.0.0.1:$port" --target "$IQN_OURS" \
        --lun mem:1GiB --log-level warn "$@" >>"$work/target-rdma.log" 2>&1 &
    OURS_WRAP=$!
    OURS_PID=$(child_of "$OURS_WRAP") || die "target-rdma did not start (see $work/target-rdma.log)"
    wait_port "$port" || die "target-rdma not listening on $port (see $work/target-rdma.log)"
}

start_tgt() {
    local port
    port=$(free_port)
    # a control port (tgtd accepts up to 32767) no other tgtd uses: its
    # management socket is /var/run/tgtd/socket.N
    for _ in $(seq 50); do
        TGT_CTL=$((10000 + RANDOM % 20000))
        [[ -e /var/run/tgtd/socket.$TGT_CTL ]] || break
    done
    TGT_FILE=$(mktemp /dev/shm/compare-tgt-lun.XXXXXX)
    truncate -s 1G "$TGT_FILE"
    TGT_URL=iscsi://127.0.0.1:$port/$IQN_TGT/1
    timeout -k 5 "$MAX_LIFE" tgtd -f -C "$TGT_CTL" --iscsi "portal=127.0.0.1:$port" \
        >>"$work/tgtd.log" 2>&1 &
    TGT_WRAP=$!
    TGT_PID=$(child_of "$TGT_WRAP") || die "tgtd did not start (see $work/tgtd.log)"
    local ok=
    for _ in $(seq 100); do
        timeout 5 tgtadm -C "$TGT_CTL" --mode system --op show >/dev/null 2>&1 && { ok=1; break; }
        sleep 0.1
    done
    [[ -n $ok ]] || die "tgtd management not answering (see $work/tgtd.log)"
    local a=(timeout 10 tgtadm -C "$TGT_CTL" --lld iscsi)
    "${a[@]}" --mode target --op new --tid 1 --targetname "$IQN_TGT"
    "${a[@]}" --mode logicalunit --op new --tid 1 --lun 1 --backing-store "$TGT_FILE" --bstype rdwr
    "${a[@]}" --mode target --op bind --tid 1 --initiator-address ALL
    wait_port "$port" || die "tgtd not listening on $port"
}

fill() { # url label: write the whole LUN once so reads are of written, stamped data
    echo "  warm-up: writing the whole 1 GiB LUN of $2"
    timeout 300 "$IOBENCH" -m fill -b 1048576 -q 8 "$1" >"$work/fill-$2.log" 2>&1 ||
        { cat "$work/fill-$2.log" >&2; die "warm-up of $2 failed"; }
}

# run workload target-label flags-label pid url iobench-args...
run() {
    local wl=$1 label=$2 flags=$3 pid=$4 url=$5
    shift 5
    local log=$work/run-$wl-$label.log c0 c1 s0 s1 res steal
    kill -0 "$pid" 2>/dev/null || die "$label target (pid $pid) is not running"
    c0=$(cpu_ticks "$pid")
    s0=$(steal_ticks)
    if ! timeout $((SECS + 60)) "$IOBENCH" -t "$SECS" "$@" "$url" >"$log" 2>&1; then
        cat "$log" >&2
        die "$wl against $label failed (a SCSI error, a data mismatch or a lost connection)"
    fi
    c1=$(cpu_ticks "$pid")
    s1=$(steal_ticks)
    res=$(grep '^RESULT ' "$log") || die "no RESULT line from iobench ($log)"
    # Steal: the share of the CPUs' time (all of them, over the run) in
    # which a vCPU had work but the hypervisor ran something else: a few
    # percent on a calm host. A run with tens of percent had a busier
    # host, which preempts vCPUs also while they hold kernel locks, and
    # its figures (and a ratio against a calmer run) are disturbed.
    steal=$(awk -v d="$((s1 - s0))" -v t="$TICK" -v s="$SECS" -v n="$(nproc)" \
        'BEGIN { printf "%.1f", 100 * d / t / s / n }')
    res="$res steal_pct=$steal"
    printf '%s\t%s\t%s\t%s\t%s\n' "$wl" "$label" "$flags" "$((c1 - c0))" "${res#RESULT }" >>"$RAW"
    awk -v t="$TICK" -v c="$((c1 - c0))" -v wl="$wl" -v lb="$label" '{
        for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
        cpu = c / t
        printf "  %-14s %-16s %9.0f IOPS %8.1f MB/s  target CPU %6.2f s  %9.0f I/Os per CPU-s  steal %s%%\n",
            wl, lb, v["iops"], v["mbps"], cpu, (cpu > 0 ? v["ios"] / cpu : 0), v["steal_pct"]
    }' <<<"${res#RESULT }"
}

# --- context -----------------------------------------------------------------
echo "== compare-tgt: target-rdma vs tgt per target CPU-second, $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "   host: $(nproc) CPUs, kernel $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
echo "   load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "   target-rdma: $BIN, $(stat -c '%y' "$BIN" | cut -d. -f1) (workspace HEAD $(cd "$root" && timeout 5 git rev-parse --short HEAD 2>/dev/null || echo '?'))"
echo "   tgt: $(timeout 5 tgtd -V 2>/dev/null || dpkg-query -W -f '${Version}' tgt 2>/dev/null || echo '?')"
echo "   client: benches/iobench.c on libiscsi $(dpkg-query -W -f '${Version}' libiscsi7 2>/dev/null || echo '?'), $SECS s per run, $ROUNDS round(s)"
echo "   NOTE: on a shared machine with few cores raw IOPS depend on what else runs and on the"
echo "   client competing with the target for CPU; only the per-CPU-second figures and the"
echo "   ours/tgt ratios measured in the same run are meaningful."
echo

IOBENCH=$work/iobench
# run a private copy, so that a rebuild of the workspace during the run cannot
# swap the binary between the main runs and the scaling row
cp "$BIN" "$work/target-rdma"
BIN=$work/target-rdma
timeout 120 cc -O2 -Wall -o "$IOBENCH" "$here/iobench.c" -liscsi -lpthread ||
    die "building iobench failed"

# workload name, iobench arguments
WORKLOADS=(
    "4k-randread-qd1|-m read -p rand -b 4096 -q 1"
    "4k-randread-qd32|-m read -p rand -b 4096 -q 32"
    "4k-randwrite-qd32|-m write -p rand -b 4096 -q 32"
    "1m-seqread-qd8|-m read -p seq -b 1048576 -q 8"
    "1m-seqwrite-qd8|-m write -p seq -b 1048576 -q 8"
)

echo "== starting targets"
start_ours
echo "  target-rdma pid $OURS_PID at $OURS_URL ($(ls "/proc/$OURS_PID/task" | wc -l) thread(s))"
start_tgt
echo "  tgtd pid $TGT_PID at $TGT_URL (control port $TGT_CTL, backing file $TGT_FILE, bstype rdwr)"
fill "$OURS_URL" target-rdma
fill "$TGT_URL" tgt

echo "== measuring ($SECS s per run, $ROUNDS round(s); which target goes first alternates)"
n=0
for ((round = 1; round <= ROUNDS; round++)); do
    for w in "${WORKLOADS[@]}"; do
        wl=${w%%|*}
        read -ra args <<<"${w#*|}"
        if ((n % 2 == 0)); then
            run "$wl" target-rdma "" "$OURS_PID" "$OURS_URL" "${args[@]}"
            run "$wl" tgt "" "$TGT_PID" "$TGT_URL" "${args[@]}"
        else
            run "$wl" tgt "" "$TGT_PID" "$TGT_URL" "${args[@]}"
            run "$wl" target-rdma "" "$OURS_PID" "$OURS_URL" "${args[@]}"
        fi
        n=$((n + 1))
    done
done

# Scaling row: two sessions, 32 commands in flight each.  target-rdma is
# restarted with --cores 0 and then --cores 0-1 (each time warmed up again:
# its mem: LUN does not outlive the process).  With --cores 0-1 the engine runs
# two reactors and places the second session on reactor 1, but both sessions
# go to the one target here, whose SCSI device lives on reactor 0: reactor 1
# forwards its commands there.  The row shows what that costs or gains per
# target CPU-second (whole process, default adaptive polling) against one
# reactor and against tgt; benches/scaling.sh measures each reactor thread
# separately, with one target and with two, and projects the IOPS at which the
# busiest reactor saturates.
echo "== scaling row: 4k random read, 2 sessions x QD32"
SCALE_ARGS=(-m read -p rand -b 4096 -q 32 -s 2)
run 4k-randread-qd32-2sess tgt "" "$TGT_PID" "$TGT_URL" "${SCALE_ARGS[@]}"
stop_tgt
for cores in 0 0-1; do
    stop_ours
    start_ours --cores "$cores"
    fill "$OURS_URL" "target-rdma-cores-$cores"
    # counted after the fill: the port is bound before the buffer arenas are
    # mapped and the reactors start, so right after start_ours it may be one
    echo "  target-rdma --cores $cores: pid $OURS_PID, $(ls "/proc/$OURS_PID/task" | wc -l) thread(s)"
    run 4k-randread-qd32-2sess "target-rdma" "--cores $cores" "$OURS_PID" "$OURS_URL" "${SCALE_ARGS[@]}"
done
stop_ours

echo "   load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
timeout 60 python3 "$here/report.py" --raw "$RAW" --tick "$TICK" --seconds "$SECS" \
    --out "$OUT" --stamp "$STAMP" \
    --context "$(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), kernel $(uname -r)"

svg=$OUT/compare-tgt-$STAMP.svg
if command -v rsvg-convert >/dev/null; then
    timeout 30 rsvg-convert -o "${svg%.svg}.png" "$svg" && echo "chart (PNG): ${svg%.svg}.png"
fi
