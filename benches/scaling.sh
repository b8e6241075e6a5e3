#!/usr/bin/env bash
# How target-rdma scales from one reactor to two, measured per reactor thread.
#
#   bash benches/scaling.sh
#
# Environment:
#   BENCH_SECONDS    seconds per measured run (default 10)
#   BENCH_ROUNDS     rounds (default 3); each round runs every workload with one
#                    and with two reactors, the order alternating between rounds
#   BENCH_OUT        directory for the CSV (default /tmp): scaling-<UTC stamp>.csv
#   TARGET_RDMA_BIN  target-rdma binary (default target/release/target-rdma);
#                    it is copied first, so a rebuild during the run changes nothing
#   BENCH_KEEP_LOGS  1: keep the work directory with target and client logs
#
# Workloads (4k random read, 2 sessions x QD32, reads verified against the
# stamps a full-LUN fill wrote first), each with target-rdma started fresh from
# a TOML config with cores = "0" and with cores = "0-1" (poll = "interrupt"):
#   two-targets  two targets with one 1 GiB mem LUN each, one session per
#                target: with two reactors each target has its own home
#                reactor and each session lands on its target's home reactor.
#   one-target   one target, one 1 GiB mem LUN, both sessions to it: with two
#                reactors the second session is placed on reactor 1 and its
#                commands are forwarded to the target's home reactor 0.
#   verify-two-targets  as two-targets, but the load is VERIFY(16) with
#                BYTCHK=11b over 256 KiB ranges (2 sessions x QD32, LUNs not
#                filled, so they read as the zero block sent): the target
#                reads and compares 512 blocks per command while the client
#                sends one, so the client is not the bottleneck and the raw
#                IOPS of one reactor and of two can be compared directly.
#                (Until the read-back moved into a pool buffer, 2026-12-03,
#                that held; since, one reactor does ten times the VERIFYs and
#                the client is the bottleneck again: see benches/README.md.)
#                BENCH_VERIFY_BYTES and BENCH_VERIFY_QD change the range
#                (default 262144) and the depth per session (default 32).
# BENCH_WORKLOADS picks among them (default: all three).
#
# The metric.  The machine this was written for has 2 CPUs, shared by the
# target and by the libiscsi client, so raw IOPS are bounded by the client
# and by the CPU the two have to share; a second reactor cannot double them.
# What can be measured is how much CPU each reactor needs per I/O: with
# poll = "interrupt" a reactor sleeps in epoll_wait when it has nothing to
# do, so its CPU time (utime+stime of its thread, /proc/PID/task/TID/stat)
# is the time it spent working.  The engine saturates when its busiest
# reactor is busy all the time, so the IOPS it could sustain is
#     projected = ios / max over reactors (reactor CPU seconds)
# and the scaling figure is projected(2 reactors) / projected(1 reactor):
# 2.0 when the work splits evenly over the two reactors at no extra cost,
# lower when it does not split (one-target: the home reactor still runs every
# SCSI command) or when splitting costs CPU (forwarding, cache traffic).
# The issue asks for >= 1.7x with two reactors on a two-session workload.
# Also printed: raw IOPS and their ratio, each reactor's busy fraction
# (CPU seconds / wall seconds of the window) and I/Os per CPU-second of the
# whole target process.  The ratios are taken per round (the 1- and 2-reactor
# runs of the same round) and summarised as median and min-max over rounds.
#
# See benches/README.md ("Scaling") for how to read it.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=benches/lib.sh
source "$here/lib.sh"
root=$(dirname "$here")
SECS=${BENCH_SECONDS:-10}
ROUNDS=${BENCH_ROUNDS:-3}
# The verify-* load: VERIFY range and queue depth per session (see above).
VERIFY_BYTES=${BENCH_VERIFY_BYTES:-262144}
VERIFY_QD=${BENCH_VERIFY_QD:-32}
OUT=${BENCH_OUT:-/tmp}
BIN=${TARGET_RDMA_BIN:-$root/target/release/target-rdma}
TICK=$(getconf CLK_TCK)
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
IQN_PREFIX=iqn.2026-11.io.target-rdma:scale
GOAL=1.7
FILL_TIMEOUT=300
# hard upper bound on the life of one target process: its fills, one run, slack
MAX_LIFE=$((2 * FILL_TIMEOUT + SECS + 60 + 120))
read -ra WORKLOADS <<<"${BENCH_WORKLOADS:-two-targets one-target verify-two-targets}"
CORE_SETS=(0 0-1)

die() { echo "scaling: $*" >&2; exit 1; }

[[ $SECS =~ ^[0-9]+$ && $SECS -ge 1 ]] || die "BENCH_SECONDS must be a positive integer"
[[ $ROUNDS =~ ^[0-9]+$ && $ROUNDS -ge 1 && $ROUNDS -le 20 ]] || die "BENCH_ROUNDS must be 1..20"
[[ -x $BIN ]] || die "no target-rdma binary at $BIN (run 'bash scripts/setup.sh' or set TARGET_RDMA_BIN)"
mkdir -p "$OUT"
for tool in cc python3; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install gcc python3)"
done
[[ -f /usr/include/iscsi/iscsi.h ]] || die "libiscsi headers missing (apt-get install libiscsi-dev)"
timeout 10 python3 -c 'import os, sys; sys.exit(0 if {0, 1} <= os.sched_getaffinity(0) else 1)' ||
    die "CPUs 0 and 1 must both be usable by this process (cores = \"0-1\" pins reactors to them)"

work=$(mktemp -d /tmp/scaling.XXXXXX)
RAW=$work/raw.tsv
: >"$RAW"
PID= WRAP=

# --- cleanup -----------------------------------------------------------------
stop_target() { stop_pid "$PID" "$WRAP"; PID= WRAP=; }
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_target
    if [[ $rc -ne 0 || ${BENCH_KEEP_LOGS:-0} == 1 ]]; then
        echo "scaling: logs kept in $work" >&2
    else
        rm -rf "$work"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- helpers -----------------------------------------------------------------
stat_ticks() { # /proc/.../stat file: utime+stime (fields 14 and 15), in clock ticks
    local s
    s=$(<"$1")
    s=${s##*) } # the name may contain spaces and ')'; fields restart at 3 (state)
    awk '{print $12 + $13}' <<<"$s"
}
n_cores() { # "0" -> 1, "0-1" -> 2, "0,2-3" -> 3
    local n=0 part
    IFS=, read -ra parts <<<"$1"
    for part in "${parts[@]}"; do
        if [[ $part == *-* ]]; then n=$((n + ${part#*-} - ${part%-*} + 1)); else n=$((n + 1)); fi
    done
    echo "$n"
}

# Reactor threads of $PID, one "tid name" line each, in reactor order: reactor 0
# is the main thread, named after the binary ("target-rdma"), the others are
# "reactor-N".  Other threads, if the engine ever has any, are not listed.
reactor_threads() {
    local t name
    for t in /proc/"$PID"/task/*; do
        name=$(cat "$t/comm" 2>/dev/null) || continue
        case $name in
        target-rdma) echo "0 ${t##*/} $name" ;;
        reactor-[0-9]*) echo "${name#reactor-} ${t##*/} $name" ;;
        esac
    done | sort -n | cut -d' ' -f2-
}

# write_config workload cores port file
write_config() {
    local wl=$1 cores=$2 port=$3 file=$4 names t
    case $wl in
    two-targets | verify-two-targets) names="$IQN_PREFIX-a $IQN_PREFIX-b" ;;
    one-target) names="$IQN_PREFIX-a" ;;
    *) die "unknown workload $wl" ;;
    esac
    {
        echo "# written by benches/scaling.sh"
        echo "log_level = \"warn\""
        echo "cores = \"$cores\""
        echo "poll = \"interrupt\""
        echo "pr_dir = \"$work/pr\""
        echo
        echo "[[portals]]"
        echo "addr = \"127.0.0.1:$port\""
        for t in $names; do
            echo
            echo "[[targets]]"
            echo "name = \"$t\""
            echo "[[targets.luns]]"
            echo "backstore = \"mem\""
            echo "size = \"1GiB\""
        done
    } >"$file"
    URLS=()
    for t in $names; do URLS+=("iscsi://127.0.0.1:$port/$t/0"); done
}

# start_target workload cores: sets PID, WRAP, URLS (one per target), TIDS, TNAMES
start_target() {
    local wl=$1 cores=$2 port cfg want log
    port=$(free_port)
    cfg=$work/$wl-cores-$cores.toml
    log=$work/target-$wl-cores-$cores.log
    write_config "$wl" "$cores" "$port" "$cfg"
    mkdir -p "$work/pr"
    timeout -k 5 "$MAX_LIFE" "$BIN" --config "$cfg" >>"$log" 2>&1 &
    WRAP=$!
    PID=$(child_of "$WRAP") || die "target-rdma did not start (see $log)"
    wait_port "$port" || die "target-rdma ($wl, cores $cores) not listening on $port (see $log)"
    want=$(n_cores "$cores")
    TIDS=() TNAMES=()
    for _ in $(seq 20); do
        TIDS=() TNAMES=()
        while read -r tid name; do TIDS+=("$tid"); TNAMES+=("$name"); done < <(reactor_threads)
        ((${#TIDS[@]} >= want)) && break
        sleep 0.1
    done
    ((${#TIDS[@]} == want)) ||
        die "target-rdma with cores = \"$cores\" shows ${#TIDS[@]} reactor thread(s) (${TNAMES[*]:-none}), expected $want; threads: $(cat /proc/"$PID"/task/*/comm | tr '\n' ' ')"
    [[ ${TNAMES[0]} == target-rdma ]] || die "reactor 0 (thread named target-rdma) is missing: ${TNAMES[*]}"
}

fill() { # url: write the whole LUN once so reads are of written, stamped data
    local log=$work/fill-$RANDOM.log
    timeout "$FILL_TIMEOUT" "$IOBENCH" -m fill -b 1048576 -q 8 "$1" >"$log" 2>&1 ||
        { cat "$log" >&2; die "warm-up fill of $1 failed"; }
}

# measure round workload cores order: one run against the started target, one
# raw line appended to $RAW and one line printed
measure() {
    local round=$1 wl=$2 cores=$3 order=$4
    local log=$work/run-$round-$wl-cores-$cores.log p0 p1 t0 t1 i res threads=
    local -a r0=() r1=()
    kill -0 "$PID" 2>/dev/null || die "target-rdma (pid $PID) died before the $wl run"
    for i in "${!TIDS[@]}"; do r0+=("$(stat_ticks "/proc/$PID/task/${TIDS[i]}/stat")"); done
    p0=$(stat_ticks "/proc/$PID/stat")
    t0=$(date +%s%N)
    local load=(-m read -p rand -b 4096 -q 32)
    [[ $wl == verify-* ]] && load=(-m verify -p rand -b "$VERIFY_BYTES" -q "$VERIFY_QD")
    if ! timeout $((SECS + 60)) "$IOBENCH" "${load[@]}" -s 2 -t "$SECS" \
        "${URLS[@]}" >"$log" 2>&1; then
        cat "$log" >&2
        die "$wl, cores $cores: iobench failed (a SCSI error, a data mismatch or a lost connection)"
    fi
    t1=$(date +%s%N)
    kill -0 "$PID" 2>/dev/null || die "target-rdma (pid $PID) died during the $wl run"
    for i in "${!TIDS[@]}"; do
        [[ -r /proc/$PID/task/${TIDS[i]}/stat ]] ||
            die "reactor thread ${TNAMES[i]} (tid ${TIDS[i]}) disappeared during the $wl run"
        r1+=("$(stat_ticks "/proc/$PID/task/${TIDS[i]}/stat")")
    done
    p1=$(stat_ticks "/proc/$PID/stat")
    res=$(grep '^RESULT ' "$log") || die "no RESULT line from iobench ($log)"
    [[ $res =~ \ errors=0( |$) ]] || die "iobench reported errors: $res"
    for i in "${!TIDS[@]}"; do
        threads+="${threads:+;}${TNAMES[i]}/${TIDS[i]}/$((r1[i] - r0[i]))"
    done
    # I/Os of each session (iobench prints a SESSION line per session)
    local sess
    sess=$(awk '/^SESSION /{for (i = 2; i <= NF; i++) if ($i ~ /^ios=/) print substr($i, 5)}' "$log" |
        paste -sd, -)
    [[ -n $sess ]] || die "no SESSION lines from iobench ($log)"
    local line
    line=$(printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s' "$round" "$wl" "$cores" "$order" \
        "$((t1 - t0))" "$((p1 - p0))" "$threads" "$sess" "$(cut -d' ' -f1 /proc/loadavg)" \
        "${res#RESULT }")
    echo "$line" >>"$RAW"
    timeout 30 python3 "$here/scaling_report.py" --tick "$TICK" --line "$line" ||
        die "scaling_report.py failed on: $line"
}

# --- context -----------------------------------------------------------------
echo "== scaling: target-rdma with one reactor vs two, $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "   host: $(nproc) CPUs, kernel $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
echo "   load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "   target-rdma: $BIN, $(stat -c '%y' "$BIN" | cut -d. -f1) (workspace HEAD $(cd "$root" && timeout 5 git rev-parse --short HEAD 2>/dev/null || echo '?'))"
echo "   client: benches/iobench.c on libiscsi $(dpkg-query -W -f '${Version}' libiscsi7 2>/dev/null || echo '?'),"
echo "   4k random read, 2 sessions x QD32, verified (verify-*: VERIFY(16) BYTCHK=11b of 256 KiB"
echo "   ranges, 2 sessions x QD32: the target compares 512 blocks per command, the client"
echo "   sends one); $SECS s per run, $ROUNDS round(s)"
echo "   target: poll = \"interrupt\", log_level = \"warn\", 1 GiB mem LUN(s), filled before each run"
echo "   projected = ios / busiest reactor's CPU-s (the IOPS at which that reactor saturates);"
echo "   busy = reactor CPU-s / wall s of the run; per CPU-s = ios / CPU-s of the whole process"
echo

IOBENCH=$work/iobench
cp "$BIN" "$work/target-rdma"   # a private copy, named target-rdma (reactor 0's thread name)
BIN=$work/target-rdma
timeout 120 cc -O2 -Wall -o "$IOBENCH" "$here/iobench.c" -liscsi -lpthread ||
    die "building iobench failed"

for ((round = 1; round <= ROUNDS; round++)); do
    if ((round % 2 == 1)); then order=("${CORE_SETS[@]}"); else order=(0-1 0); fi
    echo "== round $round of $ROUNDS (cores ${order[0]} first)"
    for wl in "${WORKLOADS[@]}"; do
        k=0
        for cores in "${order[@]}"; do
            k=$((k + 1))
            start_target "$wl" "$cores"
            # verify-*: LUNs never written (zeros) are what VERIFY compares
            # with the zero block it sends.
            [[ $wl == verify-* ]] || for u in "${URLS[@]}"; do fill "$u"; done
            measure "$round" "$wl" "$cores" "$k"
            stop_target
        done
    done
done
echo "   load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo

timeout 60 python3 "$here/scaling_report.py" --tick "$TICK" --raw "$RAW" --goal "$GOAL" \
    --csv "$OUT/scaling-$STAMP.csv" --stamp "$STAMP"
