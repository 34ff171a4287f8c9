#!/usr/bin/env python3
"""`moe bench` on any CPU and in any build: a method that cannot run here
(its library lacks the dtype on this CPU, or is not in this build) is a row
`n/a (reason)` -- in --json a row with null timings and a "reason" -- and
the command still exits 0, with --dtype all --layout all.

Run as: test_bench.py path/to/moe. Each configuration runs as the machine
is and with MOE_MAX_CPU_ISA=avx2 (which caps oneDNN too: with oneDNN 2.x its
bf16 matmul is then unavailable, so the n/a path runs on every machine that
has oneDNN). What each library can do is read from the library's own
report (MOE_VERBOSE=1), never assumed here.
"""
import json
import os
import re
import subprocess
import sys

passed = failed = 0


def check(name, ok, detail=""):
    global passed, failed
    if ok:
        passed += 1
    else:
        failed += 1
        print("FAIL %s: %s" % (name, detail), flush=True)


def availability(stderr):
    """{(lib, dtype): (available, reason)} from MOE_VERBOSE's probe lines."""
    out = {}
    for m in re.finditer(r"^libmoe: loop (\S+)\s+(f32|bf16)\s+(available|unavailable): (.*)$",
                         stderr, re.M):
        out[(m.group(1), m.group(2))] = (m.group(3) == "available", m.group(4))
    return out


def loop_lib(avail, dt, method):
    """Whether the bench row `method` of dtype `dt` can run, by the library
    rules of the loop method (default: OpenBLAS for f32, else oneDNN; bf16:
    oneDNN; loop-onednn: oneDNN)."""
    if method == "grouped":
        return True
    one = avail.get(("oneDNN", dt), (False, ""))[0]
    if method == "loop-onednn" or dt == "bf16":
        return one
    return avail.get(("OpenBLAS", dt), (False, ""))[0] or one


def main():
    moe = sys.argv[1]
    for cap in (None, "avx2"):
        env = dict(os.environ)
        env.pop("MOE_LOOP_LIB", None)
        env.pop("MOE_GMM", None)
        env["MOE_VERBOSE"] = "1"
        if cap:
            env["MOE_MAX_CPU_ISA"] = cap
        tag = "MOE_MAX_CPU_ISA=%s" % (cap or env.get("MOE_MAX_CPU_ISA", "(unset)"))
        base = [moe, "bench", "--preset", "tiny", "--tokens", "24", "--dtype", "all",
                "--layout", "all", "--reps", "1"]
        p = subprocess.run(base + ["--json"], capture_output=True, text=True, env=env,
                           timeout=600)
        check("bench --json exit status, %s" % tag, p.returncode == 0,
              "exit %d: %s" % (p.returncode, p.stderr[-2000:]))
        avail = availability(p.stderr)
        check("probe report, %s" % tag, len(avail) == 4,
              "expected 4 probe lines from MOE_VERBOSE=1, got %r" % avail)
        rows = []
        for line in p.stdout.splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                check("json line, %s" % tag, False, "not JSON: %r" % line)
        check("row count, %s" % tag, len(rows) == 28,
              "expected 28 rows (f32: 4 methods, bf16: 3; x 2 layouts x 2 passes), "
              "got %d" % len(rows))
        n_na = 0
        for r in rows:
            name = "%s %s %s %s, %s" % (r.get("dtype"), r.get("layout"), r.get("method"),
                                        r.get("pass"), tag)
            runnable = loop_lib(avail, r.get("dtype"),
                                "loop" if r.get("method") == "loop+copy" else r.get("method"))
            if runnable:
                check(name, isinstance(r.get("median_ms"), (int, float)) and r["median_ms"] > 0
                      and "reason" not in r, "expected a timed row, got %r" % r)
            else:
                n_na += 1
                reason = r.get("reason") or ""
                check(name, r.get("median_ms") is None and r.get("min_ms") is None
                      and r.get("predicted_ms") is None and r.get("dtype") in reason
                      and ("oneDNN" in reason or "OpenBLAS" in reason),
                      "expected an n/a row naming the library and the dtype, got %r" % r)
        if n_na:
            print("INFO: %s: %d n/a rows, e.g. %s" % (
                tag, n_na, next(r["reason"] for r in rows if r.get("reason"))), flush=True)
        else:
            print("SKIP n/a rows, %s: every method can run here (%s)" % (
                tag, "; ".join("%s %s: %s" % (k[0], k[1], v[1]) for k, v in sorted(avail.items()))),
                flush=True)
        # The table form: same exit status, an n/a line per row that cannot run.
        p = subprocess.run(base, capture_output=True, text=True, env=env, timeout=600)
        check("bench table exit status, %s" % tag, p.returncode == 0,
              "exit %d: %s" % (p.returncode, p.stderr[-2000:]))
        na_lines = [l for l in p.stdout.splitlines() if re.search(r"\sn/a \(.+\)$", l)]
        check("bench table n/a lines, %s" % tag, len(na_lines) == n_na,
              "expected %d n/a lines, got %d:\n%s" % (n_na, len(na_lines), p.stdout))
    print("%d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
