#!/usr/bin/env python3
"""`moe calibrate` writes only positive, finite constants (issue 20).

usage: test_calibrate.py PATH/TO/moe

A quick one-thread calibration must write a file in which every number is
a positive finite value (methods that cannot run here are marked
unavailable, with no rates), and the library must then use it. A quantity
that comes out 0 (MOE_CALIBRATE_TEST_ZERO forces one) must make calibrate
fail with a message naming the quantity, and leave the file untouched:
before this check a slow sample was printed as 0.0 and the library read
the table as not measured. Prints one line per check and ends with
"N passed, M failed".
"""
import json
import math
import os
import subprocess
import sys
import tempfile

from checks import Checks

check = Checks()


def env_for(cache, extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("MOE_MACHINE", "MOE_MACHINE_FILE",
                        "MOE_CALIBRATE_TEST_ZERO")}
    env["XDG_CACHE_HOME"] = cache
    env.update(extra)
    return env


def calibrate(moe, out, cache, extra=None):
    return subprocess.run([moe, "calibrate", "--quick", "--threads", "1",
                           "--out", out], env=env_for(cache, extra or {}),
                          capture_output=True, text=True, timeout=300)


def main():
    moe = sys.argv[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "machine.json")
        r = calibrate(moe, out, tmp)
        if not check("calibrate --quick runs", r.returncode == 0,
                     r.stderr[-400:]):
            return check.finish()
        with open(out) as f:
            d = json.load(f)
        unavailable = {k[:-len("_unavailable")] for k in d
                       if k.endswith("_unavailable")}
        bad = []
        for k, v in d.items():
            vals = v if isinstance(v, list) else [v]
            for x in vals:
                if isinstance(x, (int, float)) and not isinstance(x, bool):
                    if not (x > 0 and math.isfinite(x)):
                        bad.append("%s=%r" % (k, x))
        check("every number written is positive and finite", not bad,
              ", ".join(bad))
        missing = []
        for m in ("grouped", "loop"):
            for t in ("f32", "bf16"):
                if "%s_%s" % (m, t) in unavailable:
                    continue
                for k in ("fwd", "dw"):
                    for sm in ("", "_small"):
                        key = "%s_%s_%s%s" % (m, t, k, sm)
                        if len(d.get(key, [])) != 5:
                            missing.append(key)
        check("every runnable method has both rate tables", not missing,
              ", ".join(missing))
        check("grouped is never unavailable",
              not {"grouped_f32", "grouped_bf16"} & unavailable,
              str(unavailable))
        p = subprocess.run([moe, "plan", "--preset", "tiny", "--explain"],
                           env=env_for(tmp, {"MOE_MACHINE": out}),
                           capture_output=True, text=True, timeout=120)
        line = [l for l in p.stdout.splitlines() if l.startswith("machine:")]
        check("the library uses the file it wrote",
              line and line[0].startswith("machine: calibration file " + out)
              and "peak calibrated; bandwidth calibrated" in line[0],
              line[0] if line else p.stdout[-300:])
        # A zero is refused, named, and nothing is overwritten.
        with open(out) as f:
            before = f.read()
        r = calibrate(moe, out, tmp,
                      {"MOE_CALIBRATE_TEST_ZERO": "grouped_f32_dw_small"})
        check("a 0 rate fails the run", r.returncode != 0,
              "rc=%d" % r.returncode)
        check("the message names the quantity and the refusal",
              "grouped_f32_dw_small at 2 rows/expert came out 0" in r.stderr
              and "refusing to write " + out in r.stderr, r.stderr[-400:])
        with open(out) as f:
            check("the existing file is left as it was", f.read() == before)
    return check.finish()


if __name__ == "__main__":
    sys.exit(main())
