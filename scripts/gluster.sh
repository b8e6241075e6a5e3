#!/usr/bin/env bash
# A real GlusterFS for the tests: glusterd bound to a loopback address with
# its state in one directory, a one-brick volume and a replica-2 volume.
#
#   scripts/gluster.sh start DIR     start glusterd, create and start the
#                                    volumes, wait until every brick is
#                                    Online; writes DIR/env (see below)
#   scripts/gluster.sh stop DIR      stop glusterd, bricks and helpers by
#                                    the pids in DIR (never by name)
#   scripts/gluster.sh brick-pids DIR VOLUME
#                                    the brick processes' pids, one a line
#   scripts/gluster.sh cli DIR ARGS  the gluster CLI against this glusterd
#
# DIR/env (shell syntax, also read by scripts/test.sh):
#   GLUSTER_ADDR=127.0.0.2           where glusterd and the bricks listen
#   GLUSTER_VOLUME=gv0               one brick
#   GLUSTER_REPLICA_VOLUME=gvr       replica 2, both bricks on GLUSTER_ADDR
#   TARGET_RDMA_GLUSTER_TEST=gluster://127.0.0.2/gv0
#                                    the volume backstore-gfapi's cargo tests use
#   TARGET_RDMA_GLUSTER_REPLICA_TEST=gluster://127.0.0.2/gvr
#
# Environment: GLUSTER_ADDR (default 127.0.0.2; the CLI refuses bricks on
# 127.0.0.1 and localhost, and bricks fetch their volfile from glusterd at
# the brick's address, so both share one address), GLUSTER_PORT (24007).
# Needs root (glusterd), packages glusterfs-server and glusterfs-client.
set -euo pipefail

ADDR=${GLUSTER_ADDR:-127.0.0.2}
PORT=${GLUSTER_PORT:-24007}

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' >&2; exit 2; }
[ $# -ge 2 ] || usage
CMD=$1
DIR=$(mkdir -p "$2" && cd "$2" && pwd)
shift 2

SOCK=$DIR/run/glusterd.socket
cli() {
    # --mode=script answers the CLI's questions (volume stop asks one).
    timeout 120 gluster --glusterd-sock="$SOCK" --mode=script "$@"
}

# Every pid file glusterd or its children wrote under DIR.
pid_files() {
    find "$DIR/run" -name '*.pid' 2>/dev/null || true
}

stop_pid() {
    local pid=$1
    [[ "$pid" =~ ^[0-9]+$ ]] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

brick_pids() {
    # From the bricks' pid files, in brick order (volume status wraps long
    # brick paths over two lines, which makes its table awkward to parse).
    local vol=$1 f pid
    for f in $(find "$DIR/run/vols/$vol" -name '*.pid' 2>/dev/null | sort); do
        pid=$(cat "$f" 2>/dev/null || true)
        if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then echo "$pid"; fi
    done
}

bricks_online() {
    # every brick line of `volume status VOL detail` says Online : Y
    local vol=$1 want=$2 out n
    out=$(cli volume status "$vol" detail 2>/dev/null) || return 1
    n=$(grep -Ec '^Online +: Y' <<<"$out" || true)
    [ "$n" = "$want" ]
}

do_stop() {
    local f pid
    # Bricks and helper daemons first, glusterd last, so that nothing
    # restarts what was just stopped.
    if [ -f "$DIR/run/glusterd.pid" ]; then
        local gd
        gd=$(cat "$DIR/run/glusterd.pid" 2>/dev/null || true)
    fi
    for f in $(pid_files); do
        [ "$f" = "$DIR/run/glusterd.pid" ] && continue
        pid=$(cat "$f" 2>/dev/null || true)
        stop_pid "$pid"
    done
    # Bricks that were started again by `volume start force` may have pid
    # files outside the ones seen above; the ones recorded at start too.
    if [ -f "$DIR/pids" ]; then
        while read -r pid; do stop_pid "$pid"; done <"$DIR/pids"
    fi
    stop_pid "${gd:-}"
    rm -f "$DIR/pids"
}

do_start() {
    command -v glusterd >/dev/null || { echo "gluster.sh: glusterd not installed (apt-get install glusterfs-server)" >&2; exit 1; }
    if [ -f "$DIR/run/glusterd.pid" ] && kill -0 "$(cat "$DIR/run/glusterd.pid")" 2>/dev/null; then
        echo "gluster.sh: glusterd already running from $DIR; stop it first" >&2
        exit 1
    fi
    if timeout 2 bash -c "exec 3<>/dev/tcp/$ADDR/$PORT" 2>/dev/null; then
        echo "gluster.sh: something already listens on $ADDR:$PORT (a packaged glusterd on all" \
            "addresses? systemctl stop glusterd, or set GLUSTER_ADDR to another loopback address)" >&2
        exit 1
    fi
    rm -rf "$DIR/state" "$DIR/run" "$DIR/bricks" "$DIR/log" "$DIR/env" "$DIR/pids"
    mkdir -p "$DIR/state" "$DIR/run" "$DIR/bricks" "$DIR/log"
    cat >"$DIR/glusterd.vol" <<EOF
volume management
    type mgmt/glusterd
    option working-directory $DIR/state
    option run-directory $DIR/run
    option glusterd-sockfile $SOCK
    option transport-type socket
    option transport.address-family inet
    option transport.socket.bind-address $ADDR
    option transport.socket.listen-port $PORT
    option transport.socket.keepalive-time 10
    option transport.socket.keepalive-interval 2
    option transport.socket.read-fail-log off
    option ping-timeout 0
    option event-threads 1
end-volume
EOF
    local t0=$SECONDS
    glusterd -f "$DIR/glusterd.vol" -p "$DIR/run/glusterd.pid" -l "$DIR/log/glusterd.log" \
        --log-level=WARNING
    local up=0
    for _ in $(seq 1 150); do
        if cli volume list >/dev/null 2>&1; then up=1; break; fi
        sleep 0.2
    done
    if [ "$up" = 0 ]; then
        echo "gluster.sh: glusterd did not answer within 30 s; log:" >&2
        tail -n 20 "$DIR/log/glusterd.log" >&2 || true
        do_stop
        exit 1
    fi
    local b=$DIR/bricks
    if ! { cli volume create gv0 "$ADDR:$b/gv0" force >/dev/null &&
           cli volume create gvr replica 2 "$ADDR:$b/gvr1" "$ADDR:$b/gvr2" force >/dev/null; }; then
        echo "gluster.sh: volume create failed; glusterd log:" >&2
        tail -n 20 "$DIR/log/glusterd.log" >&2 || true
        do_stop
        exit 1
    fi
    local v
    for v in gv0 gvr; do
        # A short ping-timeout so a hung brick is noticed quickly in the
        # failure tests (clients of target-rdma set their own anyway).
        cli volume set "$v" network.ping-timeout 5 >/dev/null
        if ! cli volume start "$v" >/dev/null; then
            echo "gluster.sh: volume start $v failed; glusterd log:" >&2
            tail -n 20 "$DIR/log/glusterd.log" >&2 || true
            do_stop
            exit 1
        fi
    done
    local ok=0
    for _ in $(seq 1 150); do
        if bricks_online gv0 1 && bricks_online gvr 2; then ok=1; break; fi
        sleep 0.2
    done
    if [ "$ok" = 0 ]; then
        echo "gluster.sh: bricks not Online within 30 s:" >&2
        cli volume status >&2 || true
        do_stop
        exit 1
    fi
    { cat "$DIR/run/glusterd.pid"; brick_pids gv0; brick_pids gvr; } >"$DIR/pids"
    cat >"$DIR/env" <<EOF
GLUSTER_ADDR=$ADDR
GLUSTER_DIR=$DIR
GLUSTER_VOLUME=gv0
GLUSTER_REPLICA_VOLUME=gvr
TARGET_RDMA_GLUSTER_TEST=gluster://$ADDR/gv0
TARGET_RDMA_GLUSTER_REPLICA_TEST=gluster://$ADDR/gvr
EOF
    echo "gluster.sh: glusterd on $ADDR:$PORT (pid $(cat "$DIR/run/glusterd.pid")), volumes gv0 and gvr online after $((SECONDS - t0)) s; env in $DIR/env"
}

case "$CMD" in
    start) do_start ;;
    stop) do_stop ;;
    brick-pids) [ $# = 1 ] || usage; brick_pids "$1" ;;
    cli) cli "$@" ;;
    *) usage ;;
esac
