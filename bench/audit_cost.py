"""Issue 17's audit target, measured (not a test: timings belong here):
`python -m libmoe.audit` on the Qwen3-30B-A3B config (48 layers, 128
experts, bf16 on the meta device) in a fresh process pinned to two cores,
and the audit's own work on the same model in this process.

    PYTHONPATH=python LIBMOE_LIBRARY=build/libmoe.so python3 bench/audit_cost.py [--reps 3]

Prints, per repetition, the child's process CPU time (user + system over
its threads: imports, model build, plans) and its wall time, then the
medians against the 10 s target on a 2-core CPU."""

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_30B = ROOT / "tests" / "python" / "configs" / "qwen3-30b-a3b.json"
TARGET_S = 10.0


def cli_once(cpus):
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    w0 = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS=str(len(cpus)))
    p = subprocess.run([sys.executable, "-m", "libmoe.audit", str(CONFIG_30B),
                        "--json", "--tokens", "8192"], capture_output=True,
                       text=True, env=env, timeout=300,
                       preexec_fn=lambda: os.sched_setaffinity(0, cpus))
    wall = time.perf_counter() - w0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        sys.exit(f"audit_cost: the audit failed:\n{p.stderr}")
    layers = len(json.loads(p.stdout)["layers"])
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return cpu, wall, layers


def own_cost():
    import libmoe.audit as la
    model = la._model_from_config(str(CONFIG_30B), "libmoe")
    t0 = time.process_time()
    rep = la.audit(model, tokens=8192)
    return time.process_time() - t0, len(rep.layers)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))[:2]
    print(f"cpus {cpus} of {os.cpu_count()}, load {os.getloadavg()[0]:.2f}")
    cpu_s, wall_s = [], []
    for i in range(args.reps):
        cpu, wall, n = cli_once(cpus)
        cpu_s.append(cpu)
        wall_s.append(wall)
        print(f"run {i}: {n} layers, {cpu:.2f} s CPU, {wall:.2f} s wall")
    own, n = own_cost()
    med = statistics.median(cpu_s)
    verdict = ("met" if med < TARGET_S else
               f"missed by {med / TARGET_S:.2f}x")
    print(f"python -m libmoe.audit Qwen3-30B-A3B: median {med:.2f} s CPU, "
          f"{statistics.median(wall_s):.2f} s wall (target < {TARGET_S:.0f} s "
          f"on 2 cores: {verdict}); the audit itself ({n} layers): "
          f"{own:.3f} s CPU")


if __name__ == "__main__":
    main()
