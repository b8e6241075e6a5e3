# Helpers shared by the benchmark scripts (sourced, not run).

stop_pid() { # pid [wrapper pid]: TERM, wait up to 5 s, then KILL
    local pid=$1 wrap=${2:-}
    [[ -n $pid ]] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    [[ -n $wrap ]] && { wait "$wrap" 2>/dev/null || true; }
    return 0
}
free_port() {
    timeout 10 python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
child_of() { # the single child of a `timeout` wrapper
    local wrap=$1 c
    for _ in $(seq 50); do
        c=$(cat "/proc/$wrap/task/$wrap/children" 2>/dev/null || true)
        c=${c%% *}
        [[ -n $c ]] && { echo "$c"; return 0; }
        sleep 0.1
    done
    return 1
}
wait_port() {
    local port=$1
    for _ in $(seq 100); do
        timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$port" 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}
steal_ticks() { # CPU time the hypervisor gave other guests, all CPUs, in clock ticks
    awk '/^cpu / {print $9; exit}' /proc/stat
}

cpu_ticks() { # utime+stime of the whole process (all threads), in clock ticks
    local s
    s=$(<"/proc/$1/stat")
    s=${s##*) }
    awk '{print $12 + $13}' <<<"$s"
}
