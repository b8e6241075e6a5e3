#!/usr/bin/env python3
"""Table and ratios from the RESULT lines of a VM benchmark's serial log.

  vm_iser_report.py SERIAL_LOG

target_cpu is target-rdma's process CPU, or for LIO all kernel threads' CPU
(which also holds the initiator's kernel-side work, so it overstates LIO);
other_cpu is the whole VM's busy CPU minus fio's, the same measure for every
target. Ratios are target-rdma / LIO over the same transport, and target-rdma
over TCP / LIO over iSER (what the iSER work is measured against).
"""
import math
import statistics
import sys


def num(kv, k):
    try:
        return float(kv[k])
    except (KeyError, ValueError, TypeError):
        return math.nan


def parse(path):
    rows, failed = {}, []
    # a failed job's line has no figures; a failed case's has no job
    with open(path, errors="replace") as f:
        for line in f:
            line = line.strip().replace("\r", "")
            if not line.startswith("RESULT "):
                continue
            parts = line.split()
            label = parts[1]
            kv = dict(p.split("=", 1) for p in parts[2:] if "=" in p)
            if kv.get("status") == "failed":
                failed.append(label + (" " + kv["job"] if "job" in kv else ""))
                continue
            rows.setdefault((label, kv["job"]), []).append(kv)
    # several passes (VM_BENCH_ROUNDS): medians, and IOPS min-max kept aside
    merged = {}
    for key, kvs in rows.items():
        m = {}
        for k in kvs[0]:
            vals = [num(kv, k) for kv in kvs]
            m[k] = statistics.median(vals) if not any(math.isnan(v) for v in vals) else kvs[0][k]
        iops = [num(kv, "iops") for kv in kvs]
        m["n"] = len(kvs)
        m["iops_range"] = f"{min(iops):.0f}-{max(iops):.0f}" if len(kvs) > 1 else ""
        merged[key] = m
    return merged, sorted(set(failed))


def main(argv):
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    rows, failed = parse(argv[1])
    if not rows:
        print("no RESULT lines in", argv[1])
        return 1
    labels = []
    jobs = []
    for (label, job) in rows:
        if label not in labels:
            labels.append(label)
        if job not in jobs:
            jobs.append(job)
    w = max(18, max(len(lb) for lb in labels))
    print(f"{'target':<{w}} {'job':<13} {'IOPS':>8} {'MB/s':>8} {'tgt CPU s':>9} "
          f"{'tgt us/IO':>9} {'kthr s':>7} {'other s':>8} {'oth us/IO':>9} {'fio s':>6}")
    for job in jobs:
        for label in labels:
            kv = rows.get((label, job))
            if not kv:
                continue
            print(f"{label:<{w}} {job:<13} {num(kv, 'iops'):>8.0f} {num(kv, 'MBps'):>8.1f} "
                  f"{num(kv, 'target_cpu_s'):>9.2f} {num(kv, 'target_us_per_io'):>9.1f} "
                  f"{num(kv, 'kthreads_cpu_s'):>7.2f} {num(kv, 'other_cpu_s'):>8.2f} "
                  f"{num(kv, 'other_us_per_io'):>9.1f} "
                  f"{num(kv, 'fio_cpu_s'):>6.2f}  {kv['n']} {kv['iops_range'] and 'IOPS ' + kv['iops_range']}")
    for label in failed:
        print(f"{label} failed (see the serial log)")

    pairs = [("target-rdma:iser", "lio:iser"), ("target-rdma:tcp", "lio:tcp"),
             ("target-rdma:tcp", "lio:iser")]
    print()
    print("ratios target-rdma / LIO (IOPS: >1 is faster; CPU per I/O: <1 is cheaper)")
    for ours, theirs in pairs:
        have = [j for j in jobs if (ours, j) in rows and (theirs, j) in rows]
        if not have:
            continue
        print(f"  {ours} / {theirs}:")
        for job in have:
            a, b = rows[(ours, job)], rows[(theirs, job)]

            def ratio(x, y):
                return x / y if y and not math.isnan(x) and not math.isnan(y) else math.nan
            print(f"    {job:<13} IOPS x{ratio(num(a, 'iops'), num(b, 'iops')):.2f}  "
                  f"MB/s x{ratio(num(a, 'MBps'), num(b, 'MBps')):.2f}  "
                  f"target CPU/IO x{ratio(num(a, 'target_us_per_io'), num(b, 'target_us_per_io')):.2f}  "
                  f"other CPU/IO x{ratio(num(a, 'other_us_per_io'), num(b, 'other_us_per_io')):.2f}")
    print("\n(under TCG emulation: compare within one run only; ratios are rough)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
