#!/usr/bin/env python3
"""Which machine constants the planner uses (`moe plan --explain`).

usage: test_machine.py PATH/TO/moe

The planner must use the constants of the ISA level actually selected
(MOE_MAX_CPU_ISA caps it), never another level's: built-in ones for the
level, or a calibration file (MOE_MACHINE, the deprecated MOE_MACHINE_FILE,
else $XDG_CACHE_HOME/libmoe/machine.json) only when it records that level
and this CPU. Every decision is named in the explanation. A calibration file
that matches must change the predictions; one that does not must not.
Prints one line per check and ends with "N passed, M failed".
"""
import json
import os
import re
import subprocess
import sys
import tempfile

from checks import Checks

check = Checks()


def plan(moe, env_extra, cache, preset="qwen3-30b-a3b"):
    env = {k: v for k, v in os.environ.items()
           if k not in ("MOE_MACHINE", "MOE_MACHINE_FILE", "MOE_MAX_CPU_ISA",
                        "MOE_GMM")}
    env["XDG_CACHE_HOME"] = cache
    env.update(env_extra)
    r = subprocess.run([moe, "plan", "--preset", preset, "--tokens",
                        "256", "--dtype", "f32", "--explain"], env=env,
                       capture_output=True, text=True, timeout=120)
    machine = [l for l in r.stdout.splitlines() if l.startswith("machine:")]
    preds = re.findall(r"grouped: predicted ([0-9.]+) ms", r.stdout)
    return r.returncode, machine[0] if machine else "", preds, r.stdout


def bench_floor(moe, env_extra, cache):
    """moe bench's floor lines (tiny preset, one rep): the text."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MOE_MACHINE", "MOE_MACHINE_FILE", "MOE_MAX_CPU_ISA",
                        "MOE_GMM")}
    env["XDG_CACHE_HOME"] = cache
    env.update(env_extra)
    r = subprocess.run([moe, "bench", "--preset", "tiny", "--tokens", "16",
                        "--dtype", "f32", "--layout", "out_in", "--threads",
                        "2", "--reps", "1"], env=env, capture_output=True,
                       text=True, timeout=120)
    return "\n".join(l for l in r.stdout.splitlines()
                     if l.startswith("floor"))


def calib(isa, cpu, scale):
    """A well-formed calibration file; `scale` sets its grouped rates."""
    d = {"libmoe_machine": 2, "threads": 2, "bandwidth_gbs": 40.0,
         "peak_gflops_f32": 200.0, "peak_gflops_bf16": 400.0,
         "call_us_f32": 0.5, "call_us_bf16": 0.7,
         "rows_at": [2, 8, 32, 128, 512]}
    if isa is not None:
        d["isa"] = isa
    if cpu is not None:
        d["cpu"] = cpu
    for m in ("grouped", "loop"):
        for t in ("f32", "bf16"):
            for k in ("fwd", "dw"):
                base = [3, 11, 37, 53, 61]
                f = scale if m == "grouped" else 1.0
                d["%s_%s_%s" % (m, t, k)] = [x * f for x in base]
    return d


def main():
    moe = sys.argv[1]
    with tempfile.TemporaryDirectory() as tmp:
        empty = os.path.join(tmp, "empty")
        os.mkdir(empty)
        rc, m, base, out = plan(moe, {}, empty)
        check("plan runs", rc == 0, out[-300:])
        isa = re.search(r"built-in constants for isa (\w+)", m)
        check("no file: built-in constants of the selected level named", isa,
              m)
        if not isa:
            return 1
        isa = isa.group(1)
        check("no file: the missing default file is named",
              "no calibration file at " + empty in m, m)
        # The floor's constants (issue 20): without a calibration the peak
        # is measured now at the level in use (or, on a CPU with no peak
        # loop, the level's row, named), the bandwidth a named built-in row.
        check("no file: the floor's peak source is said",
              "floor constants: peak measured now (" in m or
              "floor constants: peak built-in (isa %s row" % isa in m, m)
        check("no file: the floor's bandwidth source is said",
              re.search(r"bandwidth built-in \(isa \w+ row, measured on "
                        r"(this CPU model|.* not this CPU)", m), m)
        # Each level the CPU reaches: built-ins of exactly that level.
        for cap in ("ref", "avx2"):
            rc, m, p, _ = plan(moe, {"MOE_MAX_CPU_ISA": cap}, empty)
            got = re.search(r"built-in constants for isa (\w+)", m)
            check("MOE_MAX_CPU_ISA=%s: constants of the capped level" % cap,
                  rc == 0 and got and (got.group(1) == cap or
                                       (cap == "avx2" and
                                        got.group(1) == "ref")), m)
        # CPU name as the library reports it: from a matching file's echo.
        cpu = None
        path = os.path.join(tmp, "m.json")
        with open(path, "w") as f:
            json.dump(calib(isa, None, 0.5), f)
        rc, m, p, _ = plan(moe, {"MOE_MACHINE": path}, empty)
        check("file at the selected level, no cpu recorded: used",
              rc == 0 and m.startswith("machine: calibration file " + path) and
              "(MOE_MACHINE)" in m, m)
        check("a used file changes the predictions", p and p != base,
              "%s vs %s" % (p, base))
        check("a used file gives the floor's peak and bandwidth",
              "floor constants: peak calibrated; bandwidth calibrated" in m, m)
        fl = bench_floor(moe, {"MOE_MACHINE": path}, empty)
        check("moe bench's floor uses the calibrated peak and bandwidth",
              "FLOPs / peak 200 GFLOP/s" in fl and
              "bandwidth 40.0 GB/s" in fl and
              "floor constants: peak calibrated" in fl, fl)
        d = calib(isa, None, 0.5)
        del d["peak_gflops_f32"], d["peak_gflops_bf16"]
        with open(path + ".nopeak", "w") as f:
            json.dump(d, f)
        rc, m2, _, _ = plan(moe, {"MOE_MACHINE": path + ".nopeak"}, empty)
        check("a file without peaks: the peak is measured now, said",
              rc == 0 and m2.startswith("machine: calibration file ") and
              ("peak measured now" in m2 or "peak built-in" in m2) and
              "bandwidth calibrated" in m2, m2)
        cm = re.search(r"on this CPU \((.*)\) with", m)
        cpu = cm.group(1) if cm else "?"
        # The grouped call's fixed cost counts: 50 ms more per call (qwen3,
        # 128 experts, forward = 1 call) shows in the forward prediction.
        d = calib(isa, None, 0.5)
        d["grouped_call_us_f32"] = 50000.0
        with open(path, "w") as f:
            json.dump(d, f)
        rc, m, p2, _ = plan(moe, {"MOE_MACHINE": path}, empty)
        check("grouped fixed cost per call is in the prediction",
              rc == 0 and p and p2 and
              abs(float(p2[0]) - float(p[0]) - 50.0) < 1.0,
              "%s vs %s" % (p2, p))
        # A method the calibration could not run (rates 0, with its reason,
        # as moe calibrate writes it): the file is still used.
        d = calib(isa, None, 0.5)
        for k in ("fwd", "dw"):
            d["loop_bf16_%s" % k] = [0.0] * 5
        d["loop_bf16_unavailable"] = "no bf16 matmul on this CPU"
        with open(path, "w") as f:
            json.dump(d, f)
        rc, m, _, _ = plan(moe, {"MOE_MACHINE": path}, empty)
        check("file with an unavailable method is used",
              rc == 0 and m.startswith("machine: calibration file " + path),
              m)
        # Small-weight rates: used for small experts (tiny: 8 of 64 x 64),
        # not for a large model's (qwen3: 805M weight elements).
        d = calib(isa, None, 0.5)
        with open(path, "w") as f:
            json.dump(d, f)
        _, _, q0, _ = plan(moe, {"MOE_MACHINE": path}, empty)
        _, _, t0, _ = plan(moe, {"MOE_MACHINE": path}, empty, "tiny")
        for k in ("fwd", "dw"):
            d["grouped_f32_%s_small" % k] = [1, 1, 1, 1, 1]
        with open(path, "w") as f:
            json.dump(d, f)
        _, _, q1, _ = plan(moe, {"MOE_MACHINE": path}, empty)
        _, _, t1, _ = plan(moe, {"MOE_MACHINE": path}, empty, "tiny")
        check("small-weight rates leave a large model's prediction alone",
              q0 and q0 == q1, "%s vs %s" % (q0, q1))
        check("small-weight rates slow a small model's prediction",
              t0 and t1 and float(t1[0]) > 5 * float(t0[0]),
              "%s vs %s" % (t0, t1))
        # Between two samples the time per expert is affine in the rows
        # (h20f): on a row whose grouped rates are bandwidth-bound from 2 to
        # 8 rows/expert (rate in proportion to rows: the same time per
        # expert) and whose loop rates are not, qwen3 at 64 tokens (4.07
        # rows per touched expert) takes the 2-row time per touched expert
        # for grouped, and the loop is the faster. Interpolating the rate in
        # log(rows), as before, predicted grouped 20% faster and picked it.
        d = calib(isa, None, 1.0)
        for t in ("f32", "bf16"):
            for k in ("fwd", "dw"):
                d["grouped_%s_%s" % (t, k)] = [20, 80, 200, 300, 300]
                d["loop_%s_%s" % (t, k)] = [30, 60, 200, 300, 300]
        d["threads"] = 2
        with open(path, "w") as f:
            json.dump(d, f)
        env = {k: v for k, v in os.environ.items()
               if k not in ("MOE_MAX_CPU_ISA", "MOE_GMM", "MOE_MACHINE_FILE")}
        env.update({"MOE_MACHINE": path, "XDG_CACHE_HOME": empty})
        r = subprocess.run([moe, "plan", "--preset", "qwen3-30b-a3b",
                            "--tokens", "64", "--dtype", "f32", "--threads",
                            "2", "--explain"], env=env, capture_output=True,
                           text=True, timeout=120)
        g = re.findall(r"grouped: predicted ([0-9.]+) ms fwd", r.stdout)
        touched = 128 * (1 - (1 - 1 / 128) ** 512)
        want = touched * 2 * 2 * 2048 * 1536 / 20e9 * 1e3  # ms, gate_up fwd
        check("between samples: the time per expert is interpolated",
              r.returncode == 0 and g and abs(float(g[0]) - want) < 0.5,
              "grouped gate_up fwd %s ms, want %.2f" % (g[:1], want))
        if "loop:    declined" in r.stdout:
            print("SKIP the pick between samples: no loop library here")
        else:
            check("between samples: the loop is picked on that row",
                  "gate_up -> loop, down -> loop" in r.stdout,
                  r.stdout.splitlines()[0] if r.stdout else r.stderr[-300:])
        # dX's own rates (h20f): a table at half the forward's rates makes
        # dX take twice the forward's time, so the backward grows by one
        # forward; without the table dX takes the forward's rates.
        fb = []
        for dx in (None, 0.5):
            d = calib(isa, None, 1.0)
            if dx:
                d["grouped_f32_dx"] = [x * dx for x in d["grouped_f32_fwd"]]
            with open(path, "w") as f:
                json.dump(d, f)
            r = subprocess.run([moe, "plan", "--preset", "qwen3-30b-a3b",
                                "--tokens", "256", "--dtype", "f32",
                                "--threads", "2", "--explain"], env=env,
                               capture_output=True, text=True, timeout=120)
            fb.append(re.findall(r"grouped: predicted ([0-9.]+) ms fwd, "
                                 r"([0-9.]+) ms bwd", r.stdout))
        ok = len(fb[0]) == 2 and len(fb[1]) == 2
        for i in range(2 if ok else 0):
            fwd0, bwd0 = map(float, fb[0][i])
            fwd1, bwd1 = map(float, fb[1][i])
            ok = ok and fwd0 == fwd1 and abs(bwd1 - bwd0 - fwd0) < 0.01 * fwd0
        check("dX's own rates: half the rate, one forward more in the "
              "backward", ok, str(fb))
        with open(path, "w") as f:
            json.dump(calib(isa, cpu, 0.5), f)
        rc, m, p, _ = plan(moe, {"MOE_MACHINE_FILE": path}, empty)
        check("deprecated MOE_MACHINE_FILE still honoured",
              m.startswith("machine: calibration file " + path) and
              "(MOE_MACHINE_FILE)" in m, m)
        other = "avx2" if isa != "avx2" else "avx512"
        cases = [
            ("file from another level ignored",
             calib(other, cpu, 0.5), "ignored: measured at isa " + other),
            ("file from another CPU ignored",
             calib(isa, "Some Other CPU 9000", 0.5), "ignored: measured on"),
            ("file without an ISA level ignored",
             calib(None, cpu, 0.5), "ignored: it records no ISA level"),
        ]
        for name, d, want in cases:
            with open(path, "w") as f:
                json.dump(d, f)
            rc, m, p, _ = plan(moe, {"MOE_MACHINE": path}, empty)
            check(name, rc == 0 and want in m and
                  "built-in constants for isa " + isa in m, m)
            check(name + ": predictions are the built-in ones", p == base,
                  "%s vs %s" % (p, base))
        with open(path, "w") as f:
            f.write("{ not json")
        rc, m, p, _ = plan(moe, {"MOE_MACHINE": path}, empty)
        check("malformed file ignored, plan still made",
              rc == 0 and "ignored: not JSON" in m, m)
        rc, m, p, _ = plan(moe, {"MOE_MACHINE": path + ".missing"}, empty)
        check("named missing file reported", rc == 0 and
              "ignored: unreadable" in m, m)
        # The default path ($XDG_CACHE_HOME/libmoe/machine.json) is read.
        cache = os.path.join(tmp, "cache")
        os.makedirs(os.path.join(cache, "libmoe"))
        dflt = os.path.join(cache, "libmoe", "machine.json")
        with open(dflt, "w") as f:
            json.dump(calib(isa, cpu, 0.5), f)
        rc, m, p, _ = plan(moe, {}, cache)
        check("default cache file used",
              m.startswith("machine: calibration file " + dflt), m)
        if isa != "ref":
            rc, m, p, _ = plan(moe, {"MOE_MAX_CPU_ISA": "ref"}, cache)
            check("default cache file of another level ignored under a cap",
                  "built-in constants for isa ref" in m and
                  "ignored: measured at isa " + isa in m, m)
    return check.finish()


if __name__ == "__main__":
    sys.exit(main())
