#!/usr/bin/env python3
"""CPU snapshots and fio figures for the VM benchmarks (runs in the guest).

  perf.py snap PID          JSON snapshot: PID's CPU (0 = none), all kernel
                            threads' CPU, the whole VM's busy CPU
  perf.py report LABEL JOB FIO_JSON SNAP0 SNAP1
                            one "RESULT key=value ..." line

LIO has no process of its own: its work runs in kernel threads (iscsi_trx,
iscsi_ttx, isert and completion workqueues, kworkers), so "kthreads" is what
LIO costs, but it also holds the initiator's kernel-side work; "other" (the
VM's busy CPU minus fio's own) is the same measure for every target, and the
fairest to compare.
"""
import json
import os
import sys
import time

CLK = os.sysconf("SC_CLK_TCK")


def stat_fields(path):
    with open(path) as f:
        s = f.read()
    # comm may hold spaces and parentheses: split after the last ')'
    return s[s.rindex(")") + 2:].split()


def snap(pid):
    proc = 0
    if pid > 0:
        try:
            f = stat_fields(f"/proc/{pid}/stat")
            proc = int(f[11]) + int(f[12])  # utime, stime (whole process)
        except (OSError, ValueError):
            proc = -1
    kthreads = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            f = stat_fields(f"/proc/{d}/stat")
        except OSError:
            continue
        ppid = int(f[1])
        if d == "2" or ppid == 2:
            kthreads += int(f[11]) + int(f[12])
    with open("/proc/stat") as fh:
        cpu = [int(x) for x in fh.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...
    busy = cpu[0] + cpu[1] + cpu[2] + cpu[5] + cpu[6] + cpu[7]
    return {"t": time.monotonic(), "proc": proc, "kthreads": kthreads, "busy": busy}


def report(label, job, fio_json, s0, s1):
    with open(fio_json) as f:
        txt = f.read()
    # fio may print warnings before the JSON
    data = json.loads(txt[txt.index("{"):])
    j = data["jobs"][0]
    runtime_s = max(j["read"]["runtime"], j["write"]["runtime"]) / 1000.0
    ios = j["read"]["total_ios"] + j["write"]["total_ios"]
    iops = j["read"]["iops"] + j["write"]["iops"]
    mbps = (j["read"]["bw_bytes"] + j["write"]["bw_bytes"]) / 1e6
    fio_cpu = (j["usr_cpu"] + j["sys_cpu"]) / 100.0 * runtime_s
    with open(s0) as f:
        a = json.load(f)
    with open(s1) as f:
        b = json.load(f)
    wall = b["t"] - a["t"]
    proc = (b["proc"] - a["proc"]) / CLK if a["proc"] >= 0 and b["proc"] >= 0 else float("nan")
    kth = (b["kthreads"] - a["kthreads"]) / CLK
    # The snapshots bracket fio's start-up too; scale to fio's measured time.
    scale = runtime_s / wall if wall > 0 else 1.0
    other = (b["busy"] - a["busy"]) / CLK * scale - fio_cpu
    kind = label.split(":")[0]
    target = proc * scale if kind == "target-rdma" else kth * scale
    per_io = target / ios * 1e6 if ios else float("nan")
    print(
        f"RESULT {label} job={job} iops={iops:.0f} MBps={mbps:.1f} runtime_s={runtime_s:.1f} "
        f"target_cpu_s={target:.2f} kthreads_cpu_s={kth * scale:.2f} other_cpu_s={other:.2f} "
        f"fio_cpu_s={fio_cpu:.2f} target_us_per_io={per_io:.1f} errors={j.get('error', 0)}"
    )
    return 0 if ios > 0 and j.get("error", 0) == 0 else 1


def main(argv):
    if len(argv) == 3 and argv[1] == "snap":
        json.dump(snap(int(argv[2])), sys.stdout)
        return 0
    if len(argv) == 7 and argv[1] == "report":
        return report(*argv[2:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
