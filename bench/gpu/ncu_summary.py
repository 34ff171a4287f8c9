"""Summary of an ncu raw CSV (bench/gpu/ncu.sh): one line per kernel name,
its launches, total duration and share, and the Speed-of-Light percentages
(SM, memory, L2, DRAM, tensor pipe where the report has it), then the three
largest warp stall reasons (cycles per issued instruction).

    python3 bench/gpu/ncu_summary.py ncu_run.csv
"""
import csv
import re
import sys

COLS = [  # label, metric name (raw page)
    ("SM%", "sm__throughput.avg.pct_of_peak_sustained_elapsed"),
    ("mem%", "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed"),
    ("L2%", "lts__throughput.avg.pct_of_peak_sustained_elapsed"),
    ("DRAM%", "dram__throughput.avg.pct_of_peak_sustained_elapsed"),
]
STALL = re.compile(
    r"smsp__average_warps?_(?:latency_)?issue_stalled_(\w+?)_per_issue_active\.ratio$")


def num(v):
    try:
        return float(str(v).replace(",", ""))
    except ValueError:
        return None


def short(name):
    name = re.sub(r"\(.*", "", name)          # drop the argument list
    name = re.sub(r"^void ", "", name)
    return name[:60]


def main(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    # the header row is the one naming "Kernel Name"
    h = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
    head = rows[h]
    data = [r for r in rows[h + 2:] if len(r) == len(head)]
    ix = {c: i for i, c in enumerate(head)}
    dur = ix.get("gpu__time_duration.sum")
    # the tensor pipe's active cycles (wgmma and mma.sync alike), else any
    # tensor-pipe percentage the report has
    pref = "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active"
    tensor = [pref] if pref in ix else [
        c for c in head if "tensor" in c and "pct" in c]
    agg = {}
    for r in data:
        k = short(r[ix["Kernel Name"]])
        a = agg.setdefault(k, {"n": 0, "us": 0.0, "w": {}, "stall": {}})
        d = num(r[dur]) or 0.0
        unit = rows[h + 1][dur]
        scale = {"nsecond": 1e-3, "ns": 1e-3, "msecond": 1e3, "ms": 1e3,
                 "second": 1e6, "s": 1e6}
        us = d * scale.get(unit, 1.0)  # usecond / us as given
        a["n"] += 1
        a["us"] += us
        for lab, m in COLS + [("TC%", c) for c in tensor[:1]]:
            if m in ix and num(r[ix[m]]) is not None:
                a["w"][lab] = a["w"].get(lab, 0.0) + num(r[ix[m]]) * us
        for c, i in ix.items():
            s = STALL.match(c)
            if s and num(r[i]) is not None:
                a["stall"][s.group(1)] = a["stall"].get(s.group(1), 0.0) + num(r[i]) * us
    total = sum(a["us"] for a in agg.values()) or 1.0
    labs = [l for l, _ in COLS] + (["TC%"] if tensor else [])
    print(f"{'kernel':60} {'n':>3} {'us':>9} {'share':>6} " +
          " ".join(f"{l:>6}" for l in labs) + "  top stalls (cycles/issue)")
    for k, a in sorted(agg.items(), key=lambda kv: -kv[1]["us"]):
        us = a["us"] or 1e-9
        w = " ".join(f"{a['w'][l] / us:6.1f}" if l in a["w"] else f"{'-':>6}" for l in labs)
        st = sorted(a["stall"].items(), key=lambda kv: -kv[1])[:3]
        sts = ", ".join(f"{n} {v / us:.1f}" for n, v in st)
        print(f"{k:60} {a['n']:3d} {a['us']:9.1f} {100 * a['us'] / total:5.1f}% {w}  {sts}")
    print(f"{'total':60} {'':3} {total:9.1f}")
    if tensor:
        print(f"(TC% = {tensor[0]})")


if __name__ == "__main__":
    main(sys.argv[1])
