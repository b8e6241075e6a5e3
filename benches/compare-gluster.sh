#!/usr/bin/env bash
# One Gluster image, three ways to reach it, in one run:
#   1. fio's gfapi_async engine directly on the volume (no iSCSI at all),
#   2. libiscsi (benches/iobench.c) through target-rdma's gluster backstore,
#   3. the same client through tgt's glfs backing store (tgt-glusterfs).
# Workloads: 4k random read and write at QD1 and QD32, 128k sequential read
# and write at QD32. Prints IOPS, MB/s, CPU per I/O of the thing serving the
# I/O (fio itself for 1, the target process for 2 and 3) and the ratios.
#
#   bash benches/compare-gluster.sh
#
# Environment:
#   BENCH_SECONDS    seconds per measured run (default 10)
#   BENCH_GLUSTER    HOST/VOLUME of an existing volume to use (default: start a
#                    private glusterd with scripts/gluster.sh and use its gv0;
#                    that needs 127.0.0.2:24007 free)
#   BENCH_SIZE       image size (default 1GiB)
#   TARGET_RDMA_BIN  target-rdma binary (default target/release/target-rdma)
#   BENCH_POLL       target-rdma's --poll mode (default: its own default, adaptive)
#   BENCH_KEEP_LOGS  1: keep the work directory
#
# Needs fio (gfapi engines), tgt and tgt-glusterfs, libiscsi-dev, a C compiler.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=benches/lib.sh
source "$here/lib.sh"
root=$(dirname "$here")
SECS=${BENCH_SECONDS:-10}
SIZE=${BENCH_SIZE:-1GiB}
BIN=${TARGET_RDMA_BIN:-$root/target/release/target-rdma}
TICK=$(getconf CLK_TCK)
IQN_OURS=iqn.2026-11.io.target-rdma:bench-gluster
IQN_TGT=iqn.2026-11.io.target-rdma:bench-gluster-tgt
MAX_LIFE=$((SECS * 40 + 900))

die() { echo "compare-gluster: $*" >&2; exit 1; }

[[ $SECS =~ ^[0-9]+$ && $SECS -ge 1 ]] || die "BENCH_SECONDS must be a positive integer"
[[ -x $BIN ]] || die "no target-rdma binary at $BIN (set TARGET_RDMA_BIN)"
for tool in fio tgtd tgtadm cc python3; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install fio tgt tgt-glusterfs gcc python3)"
done
fio --enghelp 2>/dev/null | grep -qw gfapi_async || die "this fio has no gfapi_async engine"
[[ -e /usr/lib/tgt/backing-store/bs_glfs.so ]] || die "tgt's glfs backing store missing (apt-get install tgt-glusterfs)"
[[ -f /usr/include/iscsi/iscsi.h ]] || die "libiscsi headers missing (apt-get install libiscsi-dev)"

work=$(mktemp -d /tmp/compare-gluster.XXXXXX)
OURS_PID= OURS_WRAP= TGT_PID= TGT_WRAP= TGT_CTL= OWN_GLUSTER=

stop_ours() { stop_pid "$OURS_PID" "$OURS_WRAP"; OURS_PID= OURS_WRAP=; }
stop_tgt() {
    if [[ -n $TGT_PID ]] && kill -0 "$TGT_PID" 2>/dev/null; then
        timeout 10 tgtadm -C "$TGT_CTL" --lld iscsi --mode target --op delete --force --tid 1 \
            >/dev/null 2>&1 || true
        timeout 10 tgtadm -C "$TGT_CTL" --mode system --op delete >/dev/null 2>&1 || true
        for _ in $(seq 30); do kill -0 "$TGT_PID" 2>/dev/null || break; sleep 0.1; done
    fi
    stop_pid "$TGT_PID" "$TGT_WRAP"
    [[ -n $TGT_PID && -n $TGT_CTL ]] &&
        rm -f "/var/run/tgtd/socket.$TGT_CTL" "/var/run/tgtd/socket.$TGT_CTL.lock"
    TGT_PID= TGT_WRAP=
    return 0
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_ours
    stop_tgt
    [[ -n $OWN_GLUSTER ]] && bash "$root/scripts/gluster.sh" stop "$OWN_GLUSTER" >/dev/null 2>&1
    if [[ $rc -ne 0 || ${BENCH_KEEP_LOGS:-0} == 1 ]]; then
        echo "compare-gluster: logs kept in $work" >&2
    else
        rm -rf "$work"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM


if [[ -n ${BENCH_GLUSTER:-} ]]; then
    HOST=${BENCH_GLUSTER%%/*} VOL=${BENCH_GLUSTER#*/}
else
    OWN_GLUSTER=$work/gluster
    bash "$root/scripts/gluster.sh" start "$OWN_GLUSTER" || die "could not start glusterd"
    HOST=127.0.0.2 VOL=gv0
fi
IMG=bench-$$.img

echo "== compare-gluster: direct gfapi vs target-rdma vs tgt glfs, $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "   host: $(nproc) CPUs, kernel $(uname -r); load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "   volume $VOL on $HOST, image /$IMG ($SIZE); $SECS s per run"
echo "   fio $(fio --version), tgt $(dpkg-query -W -f '${Version}' tgt 2>/dev/null || echo '?'), glusterfs $(dpkg-query -W -f '${Version}' glusterfs-common 2>/dev/null || echo '?')"
echo "   NOTE: 2 shared cores here: compare the ratios of one run, not raw IOPS across runs."
echo

IOBENCH=$work/iobench
cp "$BIN" "$work/target-rdma"
BIN=$work/target-rdma
timeout 120 cc -O2 -Wall -o "$IOBENCH" "$here/iobench.c" -liscsi -lpthread || die "building iobench failed"

# name | fio rw, bs, iodepth | iobench args
WORKLOADS=(
    "4k-randread-qd1|randread 4k 1|-m read -p rand -b 4096 -q 1"
    "4k-randread-qd32|randread 4k 32|-m read -p rand -b 4096 -q 32"
    "4k-randwrite-qd1|randwrite 4k 1|-m write -p rand -b 4096 -q 1"
    "4k-randwrite-qd32|randwrite 4k 32|-m write -p rand -b 4096 -q 32"
    "128k-seqread-qd32|read 128k 32|-m read -p seq -b 131072 -q 32"
    "128k-seqwrite-qd32|write 128k 32|-m write -p seq -b 131072 -q 32"
)
RES=$work/results.tsv
: >"$RES"

# --- 1. fio directly on gfapi (also creates the image at full size)
echo "== fio gfapi_async (direct)"
timeout 600 fio --name=create --ioengine=gfapi --volume="$VOL" --brick="$HOST" --filename="$IMG" \
    --rw=write --bs=1m --size="${SIZE/iB/}" --end_fsync=1 >"$work/fio-create.log" 2>&1 ||
    { cat "$work/fio-create.log" >&2; die "creating the image with fio failed"; }
for w in "${WORKLOADS[@]}"; do
    IFS='|' read -r wl fioargs _ <<<"$w"
    read -r rw bs qd <<<"$fioargs"
    out=$work/fio-$wl.json
    timeout $((SECS + 120)) fio --name="$wl" --ioengine=gfapi_async --volume="$VOL" --brick="$HOST" \
        --filename="$IMG" --size="${SIZE/iB/}" --rw="$rw" --bs="$bs" --iodepth="$qd" \
        --time_based --runtime="$SECS" --output-format=json >"$out" 2>"$work/fio-$wl.err" ||
        { cat "$work/fio-$wl.err" >&2; die "fio $wl failed"; }
    python3 - "$out" "$wl" "$TICK" >>"$RES" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
ios = j["read"]["total_ios"] + j["write"]["total_ios"]
nbytes = j["read"]["io_bytes"] + j["write"]["io_bytes"]
secs = max(j["job_runtime"], 1) / 1000.0
# fio reports usr and sys as percent of its runtime
cpu_s = (j["usr_cpu"] + j["sys_cpu"]) / 100.0 * secs
print("%s\tgfapi\t%d\t%d\t%.3f\t%.4f" % (sys.argv[2], ios, nbytes, secs, cpu_s))
EOF
    tail -n 1 "$RES" | awk -F'\t' '{printf "  %-20s %-12s %9.0f IOPS %8.1f MB/s  CPU/IO %6.1f us\n", $1, $2, $3/$5, $4/$5/1e6, ($3 ? $6/$3*1e6 : 0)}'
done

# run workload label pid url iobench-args...
run_iscsi() {
    local wl=$1 label=$2 pid=$3 url=$4
    shift 4
    local log=$work/run-$wl-$label.log c0 c1 res
    kill -0 "$pid" 2>/dev/null || die "$label (pid $pid) is not running"
    c0=$(cpu_ticks "$pid")
    timeout $((SECS + 120)) "$IOBENCH" -t "$SECS" "$@" "$url" >"$log" 2>&1 ||
        { cat "$log" >&2; die "$wl through $label failed"; }
    c1=$(cpu_ticks "$pid")
    res=$(grep '^RESULT ' "$log") || die "no RESULT line ($log)"
    awk -v wl="$wl" -v lb="$label" -v c="$((c1 - c0))" -v t="$TICK" '{
        for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
        printf "%s\t%s\t%d\t%d\t%.3f\t%.4f\n", wl, lb, v["ios"], v["bytes"], v["seconds"], c / t
    }' <<<"$res" >>"$RES"
    tail -n 1 "$RES" | awk -F'\t' '{printf "  %-20s %-12s %9.0f IOPS %8.1f MB/s  CPU/IO %6.1f us\n", $1, $2, $3/$5, $4/$5/1e6, ($3 ? $6/$3*1e6 : 0)}'
}

# --- 2. target-rdma
echo "== target-rdma (gluster backstore)"
port=$(free_port)
OURS_URL=iscsi://127.0.0.1:$port/$IQN_OURS/0
POLL=()
[[ -n ${BENCH_POLL:-} ]] && POLL=(--poll "$BENCH_POLL")
timeout -k 5 "$MAX_LIFE" "$BIN" --portal "127.0.0.1:$port" --target "$IQN_OURS" --log-level warn "${POLL[@]}" \
    --gluster-log-file "$work/gfapi-target-rdma.log" --lun "gluster://$HOST/$VOL/$IMG" \
    >>"$work/target-rdma.log" 2>&1 &
OURS_WRAP=$!
OURS_PID=$(child_of "$OURS_WRAP") || die "target-rdma did not start"
wait_port "$port" || die "target-rdma not listening (see $work/target-rdma.log)"
echo "  warm-up: stamping every block through target-rdma (iobench fill)"
timeout 900 "$IOBENCH" -m fill -b 1048576 -q 8 "$OURS_URL" >"$work/fill.log" 2>&1 ||
    { cat "$work/fill.log" >&2; die "fill failed"; }
for w in "${WORKLOADS[@]}"; do
    IFS='|' read -r wl _ args <<<"$w"
    read -ra a <<<"$args"
    run_iscsi "$wl" target-rdma "$OURS_PID" "$OURS_URL" "${a[@]}"
done
stop_ours

# --- 3. tgt with bs_glfs (synchronous gfapi calls from 16 threads; opens the
# image O_SYNC|O_DIRECT by default and always talks to port 24007)
echo "== tgt (bstype glfs)"
port=$(free_port)
for _ in $(seq 50); do
    TGT_CTL=$((10000 + RANDOM % 20000))
    [[ -e /var/run/tgtd/socket.$TGT_CTL ]] || break
done
TGT_URL=iscsi://127.0.0.1:$port/$IQN_TGT/1
timeout -k 5 "$MAX_LIFE" tgtd -f -C "$TGT_CTL" --iscsi "portal=127.0.0.1:$port" >>"$work/tgtd.log" 2>&1 &
TGT_WRAP=$!
TGT_PID=$(child_of "$TGT_WRAP") || die "tgtd did not start"
ok=
for _ in $(seq 100); do
    timeout 5 tgtadm -C "$TGT_CTL" --mode system --op show >/dev/null 2>&1 && { ok=1; break; }
    sleep 0.1
done
[[ -n $ok ]] || die "tgtd management not answering"
a=(timeout 60 tgtadm -C "$TGT_CTL" --lld iscsi)
"${a[@]}" --mode target --op new --tid 1 --targetname "$IQN_TGT"
"${a[@]}" --mode logicalunit --op new --tid 1 --lun 1 --bstype glfs \
    --backing-store "$VOL@$HOST:$IMG" || die "tgt could not open $VOL@$HOST:$IMG (see $work/tgtd.log)"
"${a[@]}" --mode target --op bind --tid 1 --initiator-address ALL
wait_port "$port" || die "tgtd not listening"
for w in "${WORKLOADS[@]}"; do
    IFS='|' read -r wl _ args <<<"$w"
    read -ra a <<<"$args"
    run_iscsi "$wl" tgt-glfs "$TGT_PID" "$TGT_URL" "${a[@]}"
done
stop_tgt

echo "   load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
python3 - "$RES" <<'EOF'
import sys
rows = {}
order = []
for line in open(sys.argv[1]):
    wl, who, ios, nbytes, secs, cpu = line.rstrip("\n").split("\t")
    ios, nbytes, secs, cpu = int(ios), int(nbytes), float(secs), float(cpu)
    if wl not in order:
        order.append(wl)
    rows[(wl, who)] = (ios / secs, nbytes / secs / 1e6, (cpu / ios * 1e6) if ios else 0.0)
who = ["gfapi", "target-rdma", "tgt-glfs"]
print("%-20s | %-26s | %-26s | %-26s | %-9s %-9s" % (
    "workload", "fio gfapi_async (direct)", "target-rdma", "tgt glfs", "ours/gfapi", "ours/tgt"))
print("%-20s | %-26s | %-26s | %-26s |" % ("", *(["IOPS    MB/s  CPU us/IO"] * 3)))
for wl in order:
    cells = []
    for w in who:
        r = rows.get((wl, w))
        cells.append("%8.0f %7.1f %8.1f" % r if r else "%26s" % "-")
    ours = rows.get((wl, "target-rdma"))
    g = rows.get((wl, "gfapi"))
    t = rows.get((wl, "tgt-glfs"))
    r1 = "%.2f" % (ours[0] / g[0]) if ours and g and g[0] else "-"
    r2 = "%.2f" % (ours[0] / t[0]) if ours and t and t[0] else "-"
    print("%-20s | %-26s | %-26s | %-26s | %-9s %-9s" % (wl, *cells, r1, r2))
print()
print("CPU us/IO: CPU time of the serving process per I/O (fio's own usr+sys for the direct")
print("runs, which includes generating the load; the target process for the iSCSI runs).")
print("Goals (issue 4): ours/gfapi >= 0.90 at QD32; ours/tgt >= 2 on writes.")
EOF
