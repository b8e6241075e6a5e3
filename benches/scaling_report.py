#!/usr/bin/env python3
"""Figures of benches/scaling.sh: one line per run (--line) or the summary and CSV (--raw).

A raw line is tab-separated:
    round workload cores order wall-ns process-ticks threads sessions load1 "ios=N ... errors=N"
where threads is "name/tid/ticks;name/tid/ticks..." for each reactor thread in reactor
order, ticks are the growth of utime+stime over the run, in units of 1/--tick s, and
sessions is "ios,ios" (the I/Os of each client session), load1 the 1-minute load average
at the end of the run.

projected = ios / (CPU seconds of the busiest reactor): the IOPS at which that reactor
would be busy all the time.  With poll = "interrupt" a reactor's CPU time is the time it
spent working.  The scaling figure is projected(2 reactors) / projected(1 reactor) of the
same round.  Only the standard library is used.
"""
import argparse
import csv
import math
import statistics
import sys


def parse(line, tick):
    f = line.rstrip("\n").split("\t")
    if len(f) != 10:
        raise ValueError(f"expected 10 tab-separated fields, got {len(f)}: {line!r}")
    rnd, wl, cores, order, wall_ns, pticks, threads, sessions, load1, res = f
    kv = dict(p.split("=", 1) for p in res.split())
    wall = int(wall_ns) / 1e9
    reactors = []
    for t in threads.split(";"):
        name, tid, ticks = t.split("/")
        cpu = int(ticks) / tick
        reactors.append({"name": name, "tid": int(tid), "cpu_s": cpu, "busy": cpu / wall})
    ios = int(kv["ios"])
    max_cpu = max(r["cpu_s"] for r in reactors)
    proc_cpu = int(pticks) / tick
    return {
        "round": int(rnd), "workload": wl, "cores": cores, "order": int(order),
        "reactors": reactors, "n_reactors": len(reactors), "wall_s": wall, "ios": ios,
        "session_ios": [int(x) for x in sessions.split(",")], "load1": float(load1),
        "iops": float(kv["iops"]), "mbps": float(kv["mbps"]),
        "lat_mean_us": float(kv["lat_mean_us"]), "lat_p99_us": float(kv["lat_p99_us"]),
        "process_cpu_s": proc_cpu, "max_reactor_cpu_s": max_cpu,
        "projected_iops": ios / max_cpu if max_cpu > 0 else math.nan,
        "ios_per_cpu_s": ios / proc_cpu if proc_cpu > 0 else math.nan,
    }


def n(v, d=0):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:,.{d}f}"


def run_line(r):
    reac = "  ".join(f"{x['name']} {x['cpu_s']:.2f} s ({x['busy']:.2f} busy)" for x in r["reactors"])
    return (f"  {r['workload']:<11} cores {r['cores']:<3}  {n(r['iops']):>7} IOPS  "
            f"projected {n(r['projected_iops']):>7}  {n(r['ios_per_cpu_s']):>7} I/Os per CPU-s  "
            f"sessions {session_split(r)}  | {reac}")


def session_split(r):
    """Each session's share of the I/Os in percent, e.g. "49/51%"."""
    tot = sum(r["session_ios"]) or 1
    text = "/".join(f"{100 * x / tot:.0f}" for x in r["session_ios"]) + "%"
    return text + (" (uneven)" if uneven(r) else "")


UNEVEN = 0.6   # a session with more than this share of the I/Os: the client was lopsided


def uneven(r):
    tot = sum(r["session_ios"])
    return len(r["session_ios"]) > 1 and tot > 0 and max(r["session_ios"]) / tot > UNEVEN


def spread(vals):
    vals = [v for v in vals if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan, math.nan
    return statistics.median(vals), min(vals), max(vals)


def summary(runs, goal, csv_path, stamp):
    workloads = list(dict.fromkeys(r["workload"] for r in runs))
    # the 1- and 2-reactor runs of the same round and workload
    by = {(r["round"], r["workload"], r["n_reactors"]): r for r in runs}
    ratio = {}
    for (rnd, wl, nr), r in by.items():
        if nr != 1:
            continue
        two = by.get((rnd, wl, 2))
        if two:
            ratio[(rnd, wl)] = (two["projected_iops"] / r["projected_iops"], two["iops"] / r["iops"])

    print("== summary (median over rounds, min-max in brackets)")
    head = ["workload", "reactors", "IOPS", "projected IOPS", "busiest reactor busy",
            "per-reactor busy", "I/Os per target CPU-s", "p99 latency us"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for wl in workloads:
        for nr in sorted({r["n_reactors"] for r in runs if r["workload"] == wl}):
            rs = [r for r in runs if r["workload"] == wl and r["n_reactors"] == nr]

            def col(key):
                m, lo, hi = spread([r[key] for r in rs])
                return f"{n(m)} [{n(lo)}-{n(hi)}]" if len(rs) > 1 else n(m)

            busiest = spread([max(x["busy"] for x in r["reactors"]) for r in rs])[0]
            names = [x["name"] for x in rs[0]["reactors"]]
            per = ", ".join(
                f"{name} {statistics.median(r['reactors'][i]['busy'] for r in rs):.2f}"
                for i, name in enumerate(names))
            print(f"| {wl} | {nr} ({rs[0]['cores']}) | {col('iops')} | {col('projected_iops')} | "
                  f"{busiest:.2f} | {per} | {col('ios_per_cpu_s')} | {col('lat_p99_us')} |")
    print()
    lop = [r for r in runs if uneven(r)]
    if lop:
        print(f"NOTE: in {len(lop)} of {len(runs)} runs one client session did more than "
              f"{UNEVEN:.0%} of the I/Os: the client\n"
              "      threads did not get equal CPU, usually because other work was running. With two\n"
              "      reactors that loads one reactor more than the other and lowers the projected\n"
              "      figure for reasons outside the target.")
        print()
    print(f"== scaling, 2 reactors / 1 reactor (goal: >= {goal}x; projected IOPS, or raw IOPS for\n"
          f"   verify-* workloads, where the client is not the bottleneck)")
    verdicts = {}
    for wl in workloads:
        pr = [v[0] for (rnd, w), v in sorted(ratio.items()) if w == wl]
        raw = [v[1] for (rnd, w), v in sorted(ratio.items()) if w == wl]
        if not pr:
            print(f"  {wl}: no complete round")
            continue
        pm, plo, phi = spread(pr)
        rm, rlo, rhi = spread(raw)
        # A verify-* load keeps the client nearly idle (one block sent per
        # 256 KiB the target reads and compares): its raw IOPS are the target's.
        ok = (rm if wl.startswith("verify") else pm) >= goal
        verdicts[wl] = ok
        per_round = " ".join(f"{v:.2f}" for v in pr)
        print(f"  {wl:<11}  projected {pm:.2f}x [{plo:.2f}-{phi:.2f}]  raw IOPS {rm:.2f}x "
              f"[{rlo:.2f}-{rhi:.2f}]  per round: {per_round}  -> "
              f"{'meets' if ok else 'BELOW'} the {goal}x goal")
    print()

    max_r = max(r["n_reactors"] for r in runs)
    fields = ["stamp", "round", "order_in_round", "workload", "cores", "reactors", "wall_s",
              "ios", "session_ios", "iops", "mbps", "lat_mean_us", "lat_p99_us", "process_cpu_s"]
    for i in range(max_r):
        fields += [f"reactor{i}_thread", f"reactor{i}_cpu_s", f"reactor{i}_busy"]
    fields += ["max_reactor_cpu_s", "projected_iops", "ios_per_process_cpu_s",
               "round_scaling_projected", "round_scaling_raw_iops", "loadavg_1m_after"]
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields)
        for r in runs:
            row = [stamp, r["round"], r["order"], r["workload"], r["cores"], r["n_reactors"],
                   f"{r['wall_s']:.3f}", r["ios"], ";".join(map(str, r["session_ios"])),
                   f"{r['iops']:.0f}", f"{r['mbps']:.1f}",
                   f"{r['lat_mean_us']:.1f}", f"{r['lat_p99_us']:.1f}", f"{r['process_cpu_s']:.2f}"]
            for i in range(max_r):
                if i < r["n_reactors"]:
                    x = r["reactors"][i]
                    row += [x["name"], f"{x['cpu_s']:.2f}", f"{x['busy']:.3f}"]
                else:
                    row += ["", "", ""]
            sc = ratio.get((r["round"], r["workload"]))
            row += [f"{r['max_reactor_cpu_s']:.2f}", f"{r['projected_iops']:.0f}",
                    f"{r['ios_per_cpu_s']:.0f}",
                    f"{sc[0]:.3f}" if sc else "", f"{sc[1]:.3f}" if sc else "", r["load1"]]
            w.writerow(row)
    print(f"CSV: {csv_path}")
    return verdicts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tick", type=int, required=True)
    ap.add_argument("--line", help="print the figures of one raw line")
    ap.add_argument("--raw", help="raw file of all runs: print the summary, write --csv")
    ap.add_argument("--goal", type=float, default=1.7)
    ap.add_argument("--csv")
    ap.add_argument("--stamp", default="")
    a = ap.parse_args()
    if a.line:
        print(run_line(parse(a.line, a.tick)))
    if a.raw:
        if not a.csv:
            ap.error("--raw needs --csv")
        with open(a.raw) as f:
            runs = [parse(line, a.tick) for line in f if line.strip()]
        if not runs:
            sys.exit("scaling_report: no runs in " + a.raw)
        summary(runs, a.goal, a.csv, a.stamp)


if __name__ == "__main__":
    main()
