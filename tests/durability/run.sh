#!/usr/bin/env bash
# Kill -9 durability test: every write the target acknowledged under a
# durability promise must be on the backend after the target is SIGKILLed.
#
#   tests/durability/run.sh [--bin PATH] [--backend "gluster file-direct aptpl"]
#                           [--rounds 20] [--modes "wce0 fua sync"] [--control]
#                           [--k 300-1500] [--depth 32] [--gluster-dir DIR]
#                           [--dir DIR] [--budget SECONDS] [--keep]
#
#   --bin       target binary (default target/release/target-rdma); copied to
#               a temporary directory first so a rebuild cannot change it mid-run
#   --backend   any of: gluster (gfapi LUN on volume gv0 of a glusterd started
#               by `scripts/gluster.sh start DIR`, read back through a FUSE
#               mount), file-direct (file LUN with O_DIRECT), file (buffered
#               file LUN), aptpl (persistent reservation state file)
#   --modes     killwrite modes to hold to the contract: wce0 fua sync
#   --control   also run mode none (no promise) and only report what was lost
#   --k         kill at a random K-th GOOD in this range (killwrite's K)
#   --gluster-dir  the DIR given to scripts/gluster.sh (default $GLUSTER_DIR
#               or /tmp/dur-gluster); its env file names address and volume
#   --dir       where file images go (default: the temporary directory, under
#               $TMPDIR or /tmp; file-direct needs a filesystem with O_DIRECT)
#   --budget    seconds after which no new round starts (default 900); rounds
#               not run count as failed
#   --keep      keep the temporary directory (images, logs)
#
# Output: one line a mode,
#   durability(BACKEND,MODE): rounds=N acked=N must_survive=N lost=N torn=N ...
# and last `durability: N passed, N failed` (rounds). A round passes when
# killwrite saw no error before the kill, the target died of the SIGKILL and
# no must-survive write is lost or torn. Control rounds are not counted.
# Exit status 0 when no round failed.
set -uo pipefail
exec </dev/null

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)

BIN=$ROOT/target/release/target-rdma
BACKENDS="gluster file-direct aptpl"
ROUNDS=20
MODES="wce0 fua sync"
CONTROL=0
KRANGE=300-1500
DEPTH=32
GDIR=${GLUSTER_DIR:-/tmp/dur-gluster}
IMGDIR=
BUDGET=900
KEEP=0
IQN=iqn.2026-11.io.target-rdma:dur

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --bin) BIN=$2; shift 2 ;;
        --backend) BACKENDS=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --modes) MODES=$2; shift 2 ;;
        --control) CONTROL=1; shift ;;
        --k) KRANGE=$2; shift 2 ;;
        --depth) DEPTH=$2; shift 2 ;;
        --gluster-dir) GDIR=$2; shift 2 ;;
        --dir) IMGDIR=$2; shift 2 ;;
        --budget) BUDGET=$2; shift 2 ;;
        --keep) KEEP=1; shift ;;
        -h|--help) usage ;;
        *) echo "run.sh: unknown argument $1" >&2; usage ;;
    esac
done
[[ "$ROUNDS" =~ ^[0-9]+$ ]] || { echo "run.sh: --rounds wants a number" >&2; exit 2; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/durability.XXXXXX")
RUNID=$(basename "$TMP" | tr -cd 'A-Za-z0-9')
PIDS=()   # targets as PID:RCFILE, stopped by pid at exit
WRAPS=()  # their wrapper subshells
MNT=
IMG=
T_START=$SECONDS
PASSED=0
FAILED=0

stop_pid() {
    local pid=$1
    is_dead "$pid" && return 0
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 30); do
        is_dead "$pid" && return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null
    for _ in $(seq 1 30); do
        is_dead "$pid" && return 0
        sleep 0.1
    done
    return 0
}

cleanup() {
    local rc=$? pid
    set +e
    # only targets whose wrapper has not yet seen them exit: an old pid may
    # belong to someone else by now
    for pid in "${PIDS[@]:-}"; do
        [ -n "$pid" ] && [ ! -s "${pid#*:}" ] && stop_pid "${pid%%:*}"
    done
    for pid in "${WRAPS[@]:-}"; do [ -n "$pid" ] && wait "$pid" 2>/dev/null; done
    if [ -n "$MNT" ] && mountpoint -q "$MNT"; then
        timeout 30 umount "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null
    fi
    if [ "$KEEP" = 1 ]; then echo "run.sh: kept $TMP $IMG"; else rm -rf "$TMP" "$IMG"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'echo "run.sh: interrupted" >&2; exit 130' INT TERM HUP

# A process killed by a signal is a zombie until waited for, and kill -0
# still succeeds on it: look at its state instead.
is_dead() {
    local st
    st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 0
    [ -z "$st" ] || [ "$st" = Z ] || [ "$st" = X ]
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# start_target LOG ARGS...: sets TPID, TPORT, TRC (file that receives the
# target's exit status) and TWRAP; returns 1 if it does not listen within
# 30 s (an unreadable APTPL file makes it refuse to start). The target runs
# under a wrapper subshell that waits for it: its exit status is kept, and
# bash's "Killed" notice goes to the wrapper's stderr, not into the report.
start_target() {
    local logf=$1; shift
    TPORT=$(free_port)
    TRC=$logf.rc
    rm -f "$logf.pid" "$TRC"
    ( "$TBIN" --portal "127.0.0.1:$TPORT" --target "$IQN" --log-level warn "$@" >"$logf" 2>&1 &
      echo $! >"$logf.pid"; wait $!; echo $? >"$TRC" ) 2>/dev/null &
    TWRAP=$!
    WRAPS+=("$TWRAP")
    TPID=
    for _ in $(seq 1 50); do
        [ -s "$logf.pid" ] && { TPID=$(cat "$logf.pid"); break; }
        sleep 0.1
    done
    [ -n "$TPID" ] || { echo "run.sh: target did not start" >&2; return 1; }
    PIDS+=("$TPID:$TRC")
    for _ in $(seq 1 150); do
        if [ -s "$TRC" ]; then
            echo "run.sh: target exited with $(cat "$TRC") during startup; log $logf:" >&2
            tail -n 20 "$logf" >&2
            wait "$TWRAP" 2>/dev/null
            return 1
        fi
        port_open "$TPORT" && return 0
        sleep 0.2
    done
    echo "run.sh: target not listening on $TPORT after 30 s; log $logf" >&2
    tail -n 20 "$logf" >&2
    stop_target
    return 1
}

stop_target() {
    stop_pid "$TPID"
    wait "$TWRAP" 2>/dev/null
}

# reap_killed: 0 if the target died of SIGKILL within 5 s. A target that
# survives the kill would make every "survived" meaningless.
reap_killed() {
    local rc
    for _ in $(seq 1 50); do [ -s "$TRC" ] && break; sleep 0.1; done
    if [ ! -s "$TRC" ]; then
        echo "run.sh: target $TPID still running 5 s after SIGKILL" >&2
        stop_target
        return 1
    fi
    wait "$TWRAP" 2>/dev/null
    rc=$(cat "$TRC")
    [ "$rc" = 137 ] || { echo "run.sh: target $TPID exited with $rc, not by SIGKILL" >&2; return 1; }
    return 0
}

rand_k() { # rand_k A-B
    local a=${1%-*} b=${1#*-}
    echo $(( a + (RANDOM * 32768 + RANDOM) % (b - a + 1) ))
}

over_budget() { [ $((SECONDS - T_START)) -ge "$BUDGET" ]; }

# note_stats FILE: says once whether the target has the durable_writes counter
# (it came with the WCE=0 fix, so the numbers can be tied to a build).
note_stats() {
    [ -n "$DURABLE_SEEN" ] && return 0
    for _ in $(seq 1 20); do [ -s "$1" ] && break; sleep 0.1; done
    [ -s "$1" ] || return 0
    if grep -q '"durable_writes"' "$1"; then DURABLE_SEEN=yes; else DURABLE_SEEN=no; fi
    echo "run.sh: stats file has a durable_writes counter: $DURABLE_SEEN"
}

# ------------------------------------------------------------------ writes
# run_mode BACKEND MODE COUNTED: ROUNDS rounds; COUNTED=1 adds them to the
# pass/fail totals, 0 (control) only reports.
run_mode() {
    local backend=$1 mode=$2 counted=$3 r
    local tot_acked=0 tot_must=0 tot_lost=0 tot_torn=0 tot_alost=0 tot_unack=0 bad=0 lossy=0 ran=0
    local t0=$SECONDS
    for r in $(seq 1 "$ROUNDS"); do
        if over_budget; then
            echo "run.sh: budget of $BUDGET s used up; round $r of $backend/$mode not run" >&2
            [ "$counted" = 1 ] && FAILED=$((FAILED + ROUNDS - r + 1))
            break
        fi
        ran=$((ran + 1))
        local name="durability-$RUNID-$mode-$r.img" spec img
        local tag="$backend-$mode-$r"
        case "$backend" in
            gluster) spec="gluster://$GLUSTER_ADDR/$GLUSTER_VOLUME/$name?size=64MiB"; img=$MNT/$name ;;
            file-direct) img=$IMG/$name; spec="file:$img,size=64MiB,direct" ;;
            file) img=$IMG/$name; spec="file:$img,size=64MiB" ;;
        esac
        local ok=1 line rc
        if start_target "$TMP/logs/target-$tag.log" --lun "$spec" --stats-file "$TMP/logs/stats-$tag.json"; then
            note_stats "$TMP/logs/stats-$tag.json"
            timeout 120 "$TMP/killwrite" -r "$r" "iscsi://127.0.0.1:$TPORT/$IQN/0" "$mode" "$TPID" \
                "$KRANGE" "$DEPTH" "$TMP/logs/kw-$tag.log" 2>"$TMP/logs/kw-$tag.err"
            rc=$?
            if [ "$rc" != 0 ]; then
                echo "run.sh: $tag: killwrite failed (exit $rc):" >&2; tail -n 5 "$TMP/logs/kw-$tag.err" >&2; ok=0
            fi
            reap_killed || ok=0
            if [ -s "$TMP/logs/kw-$tag.log" ]; then
                line=$(timeout 120 python3 "$HERE/check" --label "$tag" "$img" "$TMP/logs/kw-$tag.log" 2>"$TMP/logs/check-$tag.err")
                rc=$?
                local brick=${GLUSTER_DIR:-}/bricks/${GLUSTER_VOLUME:-}/$name
                local alost0
                alost0=$(sed -n 's/.* acked_lost=\([0-9]*\) acked_torn=\([0-9]*\).*/\1+\2/p' <<<"$line")
                if { [ "$rc" = 1 ] || { [ "$counted" = 0 ] && [ "$((${alost0:-0}))" -gt 0 ]; }; } && [ "$backend" = gluster ] && [ -f "$brick" ]; then
                    # Writes the dead client had already put on the wire may
                    # still be landing on the brick: a loss counts only if the
                    # brick's own file lacks the data 2 s later (the control's
                    # losses too, so they are not an artefact of that race).
                    echo "  $line (through FUSE; rechecking the brick file in 2 s)"
                    sleep 2
                    line=$(timeout 120 python3 "$HERE/check" --label "$tag(brick)" "$brick" "$TMP/logs/kw-$tag.log" 2>"$TMP/logs/check-$tag.err")
                    rc=$?
                fi
                case $rc in
                    0) ;;
                    1) ok=0; cat "$TMP/logs/check-$tag.err" >&2 ;;
                    *) ok=0; echo "run.sh: $tag: check could not run:" >&2; cat "$TMP/logs/check-$tag.err" >&2 ;;
                esac
            else
                ok=0; line=
            fi
        else
            ok=0; line=
        fi
        [ -n "${line:-}" ] && echo "  $line"
        local acked must lost torn alost unack
        acked=$(sed -n 's/.* acked=\([0-9]*\).*/\1/p' <<<"$line")
        must=$(sed -n 's/.* must_survive=\([0-9]*\).*/\1/p' <<<"$line")
        lost=$(sed -n 's/.* lost=\([0-9]*\).*/\1/p' <<<"$line")
        torn=$(sed -n 's/.* torn=\([0-9]*\).*/\1/p' <<<"$line")
        alost=$(sed -n 's/.* acked_lost=\([0-9]*\) acked_torn=\([0-9]*\).*/\1+\2/p' <<<"$line")
        unack=$(sed -n 's/.* unacked_present=\([0-9]*\).*/\1/p' <<<"$line")
        tot_acked=$((tot_acked + ${acked:-0})); tot_must=$((tot_must + ${must:-0}))
        tot_lost=$((tot_lost + ${lost:-0})); tot_torn=$((tot_torn + ${torn:-0}))
        tot_alost=$((tot_alost + ${alost:-0})); tot_unack=$((tot_unack + ${unack:-0}))
        [ "$((${alost:-0}))" -gt 0 ] && lossy=$((lossy + 1))
        [ "$ok" = 1 ] || bad=$((bad + 1))
        if [ "$counted" = 1 ]; then
            if [ "$ok" = 1 ]; then PASSED=$((PASSED + 1)); else FAILED=$((FAILED + 1)); fi
        fi
        [ "$KEEP" = 1 ] || rm -f "$img"
    done
    if [ "$counted" = 1 ]; then
        echo "durability($backend,$mode): rounds=$ran acked=$tot_acked must_survive=$tot_must" \
            "lost=$tot_lost torn=$tot_torn failed_rounds=$bad acked_lost_or_torn=$tot_alost" \
            "unacked_present=$tot_unack seconds=$((SECONDS - t0))"
    else
        echo "durability($backend,$mode) [control, not counted]: rounds=$ran acked=$tot_acked" \
            "acked_lost_or_torn=$tot_alost rounds_with_acked_loss=$lossy unacked_present=$tot_unack" \
            "seconds=$((SECONDS - t0))"
    fi
}

run_writes() {
    local backend=$1 m
    case "$backend" in
        gluster)
            if [ ! -f "$GDIR/env" ]; then
                echo "run.sh: no $GDIR/env: start glusterd with scripts/gluster.sh start $GDIR" >&2
                FAILED=$((FAILED + 1)); echo "durability(gluster): not run"; return
            fi
            # shellcheck disable=SC1091
            . "$GDIR/env"
            MNT=$TMP/mnt
            mkdir -p "$MNT"
            if ! timeout 60 mount -t glusterfs "$GLUSTER_ADDR:/$GLUSTER_VOLUME" "$MNT" || ! mountpoint -q "$MNT"; then
                echo "run.sh: cannot FUSE-mount $GLUSTER_ADDR:/$GLUSTER_VOLUME" >&2
                FAILED=$((FAILED + 1)); echo "durability(gluster): not run"; MNT=; return
            fi ;;
        file-direct)
            # O_DIRECT is refused by some filesystems (tmpfs on older kernels)
            if ! dd if=/dev/zero of="$IMG/probe" bs=4096 count=1 oflag=direct status=none 2>/dev/null; then
                echo "run.sh: $IMG does not support O_DIRECT; use --dir" >&2
                FAILED=$((FAILED + 1)); echo "durability(file-direct): not run"; return
            fi
            rm -f "$IMG/probe" ;;
    esac
    for m in $MODES; do run_mode "$backend" "$m" 1; done
    [ "$CONTROL" = 1 ] && run_mode "$backend" none 0
    if [ "$backend" = gluster ]; then
        timeout 30 umount "$MNT" || umount -l "$MNT"
        MNT=
    fi
}

# ------------------------------------------------------------------ APTPL
run_aptpl() {
    local r acked=0 ok_rounds=0 bad=0 lost=0 stale=0 torn=0 inflight_won=0 t0=$SECONDS ran=0
    for r in $(seq 1 "$ROUNDS"); do
        if over_budget; then
            echo "run.sh: budget of $BUDGET s used up; APTPL round $r not run" >&2
            FAILED=$((FAILED + ROUNDS - r + 1)); break
        fi
        ran=$((ran + 1))
        # a fresh directory a round: each session's I_T nexus registers anew
        local d=$TMP/pr-$r ok=1 k want inflight keys got= rc
        mkdir -p "$d"
        k=$(rand_k 20-120)
        if start_target "$d/target1.log" --lun "file:$d/lun.img,size=16MiB" --pr-dir "$d"; then
            timeout 120 "$TMP/killpr" register "iscsi://127.0.0.1:$TPORT/$IQN/0" "$TPID" "$k" "$d/killpr.log" \
                2>"$d/killpr.err"
            rc=$?
            if [ "$rc" != 0 ]; then
                echo "run.sh: aptpl-$r: killpr failed (exit $rc):" >&2; tail -n 5 "$d/killpr.err" >&2; ok=0
            fi
            reap_killed || ok=0
        else
            ok=0
        fi
        want=$(awk '$1 == "acked_key" {print $2}' "$d/killpr.log" 2>/dev/null)
        inflight=$(awk '$1 == "inflight_key" {print $2}' "$d/killpr.log" 2>/dev/null)
        acked=$((acked + $(awk '$1 == "good" {print $2}' "$d/killpr.log" 2>/dev/null || echo 0)))
        keys=
        if [ "$ok" = 1 ]; then
            if start_target "$d/target2.log" --lun "file:$d/lun.img,size=16MiB" --pr-dir "$d"; then
                keys=$(timeout 60 "$TMP/killpr" readkeys "iscsi://127.0.0.1:$TPORT/$IQN/0" 2>"$d/readkeys.err")
                [ $? = 0 ] || { echo "run.sh: aptpl-$r: READ KEYS failed:" >&2; cat "$d/readkeys.err" >&2; ok=0; }
                stop_target
                # a state file it could not parse is reported, not silently reset
                if grep -Eiq 'error|persistent|cannot|\.pr' "$d/target2.log"; then
                    echo "run.sh: aptpl-$r: target complained after restart:" >&2
                    grep -Ei 'error|persistent|cannot|\.pr' "$d/target2.log" | head -n 5 >&2
                    torn=$((torn + 1)); ok=0
                fi
            else
                echo "run.sh: aptpl-$r: target did not restart on its APTPL state (torn file?)" >&2
                torn=$((torn + 1)); ok=0
            fi
        fi
        if [ "$ok" = 1 ]; then
            # exactly one registration, the last acknowledged key or the one in flight
            got=${keys#*keys}
            got=$(echo $got)
            if [ "$got" = "$want" ]; then :
            elif [ "$got" = "$inflight" ]; then inflight_won=$((inflight_won + 1))
            elif [ -z "$got" ]; then lost=$((lost + 1)); ok=0
            else stale=$((stale + 1)); ok=0
            fi
            [ "$ok" = 1 ] || echo "run.sh: aptpl-$r: READ KEYS gave [$got], want $want (or $inflight in flight)" >&2
        fi
        echo "  aptpl-$r: k=$k delay_us=$(awk '$1 == "delay_us" {print $2}' "$d/killpr.log" 2>/dev/null) acked_key=${want:-?} inflight_key=${inflight:-?} read_keys=[${got:-}] $([ "$ok" = 1 ] && echo pass || echo FAIL)"
        if [ "$ok" = 1 ]; then PASSED=$((PASSED + 1)); ok_rounds=$((ok_rounds + 1)); else FAILED=$((FAILED + 1)); bad=$((bad + 1)); fi
        [ "$KEEP" = 1 ] || rm -f "$d/lun.img"
    done
    echo "durability(aptpl): rounds=$ran registers_acked=$acked lost=$lost stale=$stale torn=$torn" \
        "inflight_key_kept=$inflight_won failed_rounds=$bad seconds=$((SECONDS - t0))"
}

# ------------------------------------------------------------------ main
# One function, called on the last line: bash has then read the whole file
# before running any of it, so editing this script mid-run cannot derail it.
main() {
    local b p
    if [ ! -x "$BIN" ]; then echo "run.sh: no target binary at $BIN" >&2; exit 1; fi
    TBIN=$TMP/target-rdma
    cp "$BIN" "$TBIN" || exit 1
    # the repository the binary was built in, which need not be this one
    REV=$(git -C "$(dirname "$BIN")" log -1 --format=%h 2>/dev/null || echo unknown)
    echo "run.sh: target $BIN (built $(date -u -r "$BIN" +%FT%TZ), sha256 $(sha256sum "$TBIN" | cut -c1-12), repo at $REV when copied)"
    CFLAGS=$(pkg-config --cflags libiscsi 2>/dev/null)
    LIBS=$(pkg-config --libs libiscsi 2>/dev/null || echo -liscsi)
    for p in killwrite killpr; do
        # shellcheck disable=SC2086
        gcc -O2 -Wall -Werror $CFLAGS -o "$TMP/$p" "$HERE/$p.c" $LIBS || { echo "run.sh: building $p failed" >&2; exit 1; }
    done
    mkdir -p "$TMP/logs"
    if [ -n "$IMGDIR" ]; then IMG=$(mktemp -d "$IMGDIR/durability-img.XXXXXX") || exit 1; else IMG=$TMP/img; mkdir -p "$IMG"; fi
    for b in $BACKENDS; do
        case "$b" in
            gluster|file-direct|file) run_writes "$b" ;;
            aptpl) run_aptpl ;;
            *) echo "run.sh: unknown backend $b" >&2; FAILED=$((FAILED + 1)) ;;
        esac
    done
    echo "run.sh: $((SECONDS - T_START)) s"
    echo "durability: $PASSED passed, $FAILED failed"
    [ "$FAILED" = 0 ]
}

DURABLE_SEEN=
main
exit $?
