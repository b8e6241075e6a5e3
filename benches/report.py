#!/usr/bin/env python3
"""Turn the raw figures of benches/compare-tgt.sh into a table, a CSV and an SVG chart.

Input (--raw): tab-separated lines
    workload  target  target-flags  cpu-ticks  "ios=N bytes=N seconds=S iops=X ..."
where cpu-ticks is the growth of utime+stime of the whole target process over
the run (from /proc/PID/stat, in units of 1/--tick seconds).

Only the standard library is used; the chart is written as SVG by hand.
"""
import argparse
import csv
import math
import os
import sys
from xml.sax.saxutils import escape

COLOURS = {"target-rdma": "#1f6fb4", "target-rdma --cores 0": "#1f6fb4",
           "target-rdma --cores 0-1": "#7fb2e0", "tgt": "#e8891c"}


def parse(path, tick):
    """Read the raw lines; runs of the same workload and target (BENCH_ROUNDS > 1) are pooled:
    I/Os, bytes, wall seconds and CPU ticks are summed, latencies weighted by I/Os."""
    pooled = {}
    order = []
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            wl, target, flags, ticks, res = line.split("\t")
            kv = dict(p.split("=", 1) for p in res.split())
            key = (wl, target, flags)
            if key not in pooled:
                order.append(key)
                pooled[key] = {"runs": 0, "ios": 0, "bytes": 0, "seconds": 0.0, "ticks": 0,
                               "lat_sum": 0.0, "lat_p50": [], "lat_p99": [], "run_ratio_src": []}
            p = pooled[key]
            ios = int(kv["ios"])
            p["runs"] += 1
            p["ios"] += ios
            p["bytes"] += int(kv["bytes"])
            p["seconds"] += float(kv["seconds"])
            p["ticks"] += int(ticks)
            p["lat_sum"] += float(kv["lat_mean_us"]) * ios
            p["lat_p50"].append(float(kv["lat_p50_us"]))
            p["lat_p99"].append(float(kv["lat_p99_us"]))
            p["run_ratio_src"].append(ios / (int(ticks) / tick) if int(ticks) else float("nan"))
    rows = []
    for (wl, target, flags) in order:
        p = pooled[(wl, target, flags)]
        ios, secs, cpu = p["ios"], p["seconds"], p["ticks"] / tick
        rows.append({
            "workload": wl,
            "target": target,
            "target_flags": flags,
            "label": (target + " " + flags).strip(),
            "runs": p["runs"],
            "seconds": secs,
            "ios": ios,
            "iops": ios / secs if secs else 0.0,
            "mbps": p["bytes"] / secs / 1e6 if secs else 0.0,
            "target_cpu_s": cpu,
            "target_cores_busy": cpu / secs if secs else 0.0,
            "ios_per_cpu_s": ios / cpu if cpu > 0 else float("nan"),
            "cpu_us_per_io": cpu * 1e6 / ios if ios else float("nan"),
            "lat_mean_us": p["lat_sum"] / ios if ios else float("nan"),
            # medians over runs of each run's percentile (percentiles do not pool exactly)
            "lat_p50_us": sorted(p["lat_p50"])[len(p["lat_p50"]) // 2],
            "lat_p99_us": sorted(p["lat_p99"])[len(p["lat_p99"]) // 2],
            "per_run_ios_per_cpu_s": p["run_ratio_src"],
        })
    # ratio of I/Os per CPU-second against tgt in the same workload
    tgt = {r["workload"]: r for r in rows if r["target"] == "tgt"}
    for r in rows:
        t = tgt.get(r["workload"])
        r["ratio_vs_tgt"] = None
        r["ratio_range"] = ""
        if r["target"] == "tgt" or not t:
            continue
        if not math.isnan(t["ios_per_cpu_s"]) and not math.isnan(r["ios_per_cpu_s"]):
            r["ratio_vs_tgt"] = r["ios_per_cpu_s"] / t["ios_per_cpu_s"]
        pr = [a / b for a, b in zip(r["per_run_ios_per_cpu_s"], t["per_run_ios_per_cpu_s"])
              if not math.isnan(a) and not math.isnan(b) and b > 0]
        if len(pr) > 1:
            r["ratio_range"] = f"{min(pr):.2f}-{max(pr):.2f}"
    return rows


def workloads_in_order(rows):
    seen = []
    for r in rows:
        if r["workload"] not in seen:
            seen.append(r["workload"])
    return seen


def ordered(rows):
    """Per workload: target-rdma rows first (in run order), then tgt."""
    out = []
    for wl in workloads_in_order(rows):
        group = [r for r in rows if r["workload"] == wl]
        out += [r for r in group if r["target"] != "tgt"] + [r for r in group if r["target"] == "tgt"]
    return out


def fmt_num(v, digits=0):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:,.{digits}f}"


def table(rows):
    head = ["workload", "target", "IOPS", "MB/s", "target CPU-s", "target cores busy",
            "I/Os per target CPU-s", "target CPU us per I/O", "ours/tgt (I/Os per CPU-s)",
            "mean latency us", "p99 latency us"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in ordered(rows):
        ratio = r["ratio_vs_tgt"]
        lines.append("| " + " | ".join([
            r["workload"], r["label"], fmt_num(r["iops"]), fmt_num(r["mbps"], 1),
            fmt_num(r["target_cpu_s"], 2), fmt_num(r["target_cores_busy"], 2),
            fmt_num(r["ios_per_cpu_s"]), fmt_num(r["cpu_us_per_io"], 1),
            (f"{ratio:.2f}x" + (f" (runs {r['ratio_range']})" if r["ratio_range"] else ""))
            if ratio is not None else "",
            fmt_num(r["lat_mean_us"], 1), fmt_num(r["lat_p99_us"], 1),
        ]) + " |")
    return "\n".join(lines)


def write_csv(rows, path, stamp):
    cols = ["timestamp", "workload", "target", "target_flags", "runs", "seconds", "ios", "iops", "mbps",
            "target_cpu_s", "target_cores_busy", "ios_per_cpu_s", "cpu_us_per_io",
            "ratio_vs_tgt", "ratio_range_over_runs", "lat_mean_us", "lat_p50_us", "lat_p99_us"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in ordered(rows):
            out = []
            for c in cols:
                v = stamp if c == "timestamp" else r["ratio_range"] if c == "ratio_range_over_runs" else r[c]
                if isinstance(v, float):
                    v = "" if math.isnan(v) else f"{v:.4g}" if c == "ratio_vs_tgt" else f"{v:.3f}"
                out.append("" if v is None else v)
            w.writerow(out)


def nice_step(vmax, nticks=4):
    if vmax <= 0:
        return 1
    raw = vmax / nticks
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def short(v):
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    if v >= 1e4:
        return f"{v / 1e3:.0f}k"
    if v >= 1e3:
        return f"{v / 1e3:.1f}k"
    return f"{v:.0f}"


def svg_chart(rows, path, title, subtitle):
    wls = workloads_in_order(rows)
    cols = 3
    nrows = math.ceil(len(wls) / cols)
    pw, ph = 330, 290            # panel size
    top = 92
    width, height = cols * pw + 20, top + nrows * ph + 40
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
         f'viewBox="0 0 {width} {height}" font-family="DejaVu Sans, Arial, sans-serif">',
         f'<rect width="{width}" height="{height}" fill="white"/>',
         f'<text x="{width / 2}" y="28" font-size="19" font-weight="bold" text-anchor="middle">'
         f'{escape(title)}</text>',
         f'<text x="{width / 2}" y="50" font-size="12" text-anchor="middle" fill="#444">'
         f'{escape(subtitle)}</text>']
    # legend
    labels = []
    for r in ordered(rows):
        if r["label"] not in labels:
            labels.append(r["label"])
    labels = [lab for lab in labels if lab != "target-rdma --cores 0"]  # same colour as target-rdma
    widths = [34 + 7.5 * len(lab) for lab in labels]
    x = width / 2 - sum(widths) / 2
    for lab, w in zip(labels, widths):
        o.append(f'<rect x="{x:.1f}" y="62" width="14" height="14" fill="{COLOURS.get(lab, "#888")}"/>')
        o.append(f'<text x="{x + 19:.1f}" y="74" font-size="12">{escape(lab)}</text>')
        x += w

    for i, wl in enumerate(wls):
        group = [r for r in ordered(rows) if r["workload"] == wl]
        px, py = 10 + (i % cols) * pw, top + (i // cols) * ph
        # plot area inside the panel
        ax, ay, aw, ah = px + 62, py + 48, pw - 80, ph - 100
        vals = [r["ios_per_cpu_s"] for r in group if not math.isnan(r["ios_per_cpu_s"])]
        vmax = max(vals) if vals else 1
        step = nice_step(vmax)
        top_v = step * math.ceil(vmax * 1.12 / step)
        o.append(f'<text x="{px + pw / 2}" y="{py + 16}" font-size="14" font-weight="bold" '
                 f'text-anchor="middle">{escape(wl)}</text>')
        ratios = [f'{r["ratio_vs_tgt"]:.2f}x' + (f' ({r["target_flags"]})' if r["target_flags"] else "")
                  for r in group if r["ratio_vs_tgt"] is not None]
        if ratios:
            o.append(f'<text x="{px + pw / 2}" y="{py + 34}" font-size="12" text-anchor="middle" '
                     f'fill="#333">target-rdma / tgt: {escape(", ".join(ratios))}</text>')
        # grid and ticks
        v = 0.0
        while v <= top_v + 1e-9:
            y = ay + ah - ah * v / top_v
            o.append(f'<line x1="{ax}" y1="{y:.1f}" x2="{ax + aw}" y2="{y:.1f}" stroke="#ddd"/>')
            o.append(f'<text x="{ax - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end" '
                     f'fill="#555">{short(v)}</text>')
            v += step
        o.append(f'<line x1="{ax}" y1="{ay}" x2="{ax}" y2="{ay + ah}" stroke="#888"/>')
        o.append(f'<line x1="{ax}" y1="{ay + ah}" x2="{ax + aw}" y2="{ay + ah}" stroke="#888"/>')
        n = len(group)
        slot = aw / max(n, 1)
        bw = min(70, slot * 0.62)
        for j, r in enumerate(group):
            val = r["ios_per_cpu_s"]
            if math.isnan(val):
                val = 0
            h = ah * val / top_v
            x = ax + slot * j + (slot - bw) / 2
            y = ay + ah - h
            o.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bw:.1f}" height="{h:.1f}" '
                     f'fill="{COLOURS.get(r["label"], "#888")}"/>')
            o.append(f'<text x="{x + bw / 2:.1f}" y="{y - 5:.1f}" font-size="12" '
                     f'text-anchor="middle">{short(val)}</text>')
            name = "tgt" if r["target"] == "tgt" else "ours"
            under = [(name, 11, "#000")]
            if r["target_flags"]:
                under.append((r["target_flags"], 10, "#000"))
            under.append((f'{short(r["iops"])} IOPS', 10, "#666"))
            for k, (text, size, colour) in enumerate(under):
                o.append(f'<text x="{x + bw / 2:.1f}" y="{ay + ah + 15 + 13 * k}" font-size="{size}" '
                         f'text-anchor="middle" fill="{colour}">{escape(text)}</text>')
        o.append(f'<text x="{px + 14}" y="{ay + ah / 2}" font-size="11" fill="#555" '
                 f'text-anchor="middle" transform="rotate(-90 {px + 14} {ay + ah / 2})">'
                 f'I/Os per target CPU-s</text>')
    o.append(f'<text x="{width / 2}" y="{height - 14}" font-size="11" text-anchor="middle" '
             f'fill="#555">Higher is better. Target CPU = utime+stime of the whole target process '
             f'(/proc/PID/stat) during the run. Small grey figures: raw IOPS (machine-dependent).</text>')
    o.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(o) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--raw", required=True)
    ap.add_argument("--tick", type=float, required=True)
    ap.add_argument("--seconds", default="?")
    ap.add_argument("--out", required=True)
    ap.add_argument("--stamp", required=True)
    ap.add_argument("--context", default="")
    a = ap.parse_args()
    rows = parse(a.raw, a.tick)
    if not rows:
        sys.exit("report.py: no results")
    csv_path = os.path.join(a.out, f"compare-tgt-{a.stamp}.csv")
    svg_path = os.path.join(a.out, f"compare-tgt-{a.stamp}.svg")
    write_csv(rows, csv_path, a.stamp)
    svg_chart(rows, svg_path, "target-rdma vs tgt: I/Os per target CPU-second",
              f"{a.stamp}, loopback, RAM-backed 1 GiB LUNs, libiscsi client (iobench), "
              f"{a.seconds} s per run; {a.context}")
    print(table(rows))
    print()
    print("target cores busy = target CPU-s / wall seconds; ours/tgt > 1 means target-rdma does "
          "more I/O per CPU-second than tgt.")
    print(f"CSV:   {csv_path}")
    print(f"chart: {svg_path}")


if __name__ == "__main__":
    main()
