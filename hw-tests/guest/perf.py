#!/usr/bin/env python3
"""CPU snapshots and fio figures for the VM benchmarks (runs in the guest).

  perf.py run LABEL JOB PID FIO_ARGS...
        runs fio (JSON output) between two CPU snapshots and prints one
        "RESULT key=value ..." line: IOPS, MB/s, and CPU seconds of the
        target (PID's process; for LIO, PID 0, all kernel threads), of all
        kernel threads, of fio itself, and of everything but fio

LIO has no process of its own: its work runs in kernel threads (iscsi_trx,
iscsi_ttx, isert and completion workqueues, kworkers), so "kthreads" is what
LIO costs, but it also holds the initiator's kernel-side work; "other" (the
CPU of every task but fio: target, kernel threads, daemons) is the same
measure for every target, and the fairest to compare.
"""
import json
import os
import resource
import subprocess
import sys
import time

CLK = os.sysconf("SC_CLK_TCK")


def stat_fields(path):
    with open(path) as f:
        s = f.read()
    # comm may hold spaces and parentheses: split after the last ')'
    return s[s.rindex(")") + 2:].split()


def snap(pid):
    """CPU ticks of PID's process, of every kernel thread, and of every task
    alive now (by pid), all from per-task accounting: /proc/stat's tick
    sampling undercounts under emulation."""
    me = os.getpid()
    proc = -1
    kthreads = 0
    tasks = {}
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            f = stat_fields(f"/proc/{d}/stat")
        except OSError:
            continue
        ticks = int(f[11]) + int(f[12])  # utime, stime (whole process)
        tasks[d] = ticks
        if d == "2" or int(f[1]) == 2:
            kthreads += ticks
        if int(d) == pid:
            proc = ticks
    return {"t": time.monotonic(), "proc": proc, "kthreads": kthreads, "tasks": tasks}


def others(a, b):
    """CPU ticks used between two snapshots by the tasks alive at the second:
    fio has exited by then, so this is everything but fio."""
    return sum(t - a["tasks"].get(pid, 0) for pid, t in b["tasks"].items())


def run(label, job, pid, fio_args):
    a = snap(pid)
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run(["fio", "--output-format=json", *fio_args],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    b = snap(pid)
    if p.returncode != 0:
        sys.stderr.write(p.stderr[-2000:])
        print(f"RESULT {label} job={job} status=failed fio_exit={p.returncode}")
        return 1
    txt = p.stdout
    # fio may print warnings before the JSON
    data = json.loads(txt[txt.index("{"):])
    j = data["jobs"][0]
    runtime_s = max(j["read"]["runtime"], j["write"]["runtime"]) / 1000.0
    ios = j["read"]["total_ios"] + j["write"]["total_ios"]
    iops = j["read"]["iops"] + j["write"]["iops"]
    mbps = (j["read"]["bw_bytes"] + j["write"]["bw_bytes"]) / 1e6
    # fio's whole CPU, start-up included: the snapshots bracket all of it
    fio_cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    wall = b["t"] - a["t"]
    kth = (b["kthreads"] - a["kthreads"]) / CLK
    other = others(a, b) / CLK
    if pid > 0:
        target = (b["proc"] - a["proc"]) / CLK if a["proc"] >= 0 and b["proc"] >= 0 else float("nan")
    else:
        target = kth
    per_io = target / ios * 1e6 if ios else float("nan")
    other_per_io = other / ios * 1e6 if ios else float("nan")
    err = j.get("error", 0)
    print(
        f"RESULT {label} job={job} iops={iops:.0f} MBps={mbps:.1f} ios={ios} runtime_s={runtime_s:.1f} "
        f"wall_s={wall:.1f} target_cpu_s={target:.2f} kthreads_cpu_s={kth:.2f} other_cpu_s={other:.2f} "
        f"fio_cpu_s={fio_cpu:.2f} target_us_per_io={per_io:.1f} other_us_per_io={other_per_io:.1f} errors={err}"
    )
    return 0 if ios > 0 and err == 0 else 1


def main(argv):
    if len(argv) >= 6 and argv[1] == "run":
        return run(argv[2], argv[3], int(argv[4]), argv[5:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
