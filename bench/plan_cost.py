"""Issue 16's plan-creation target, measured (not a test: timings belong
here): moe_layer_plan_create + moe_layer_plan_destroy of the Qwen3-30B-A3B
layer (E 128, H 2048, I 768, top-8, bf16) at a 16k-token capacity, for the
CPU layer, for the built-in H100 planned offline (desc.plan_gpu, no device
needed) and, where a CUDA device is usable, for a plan on GPU 0.

    PYTHONPATH=python LIBMOE_LIBRARY=build/libmoe.so python3 bench/plan_cost.py [--reps 500]

Prints per kind the median and the 10th/90th percentiles of thread CPU
time and of wall time per create + destroy (the first call of a kind, which
reads the machine file or queries the device, is reported apart), against
the 100 us target."""

import argparse
import ctypes
import statistics
import sys
import time

TARGET_US = 100.0


def desc_for(L, torch, kind):
    d = L.moe_layer_desc()
    d.struct_size = ctypes.sizeof(L.moe_layer_desc)
    d.magic, d.version = L.MOE_LAYER_DESC_MAGIC, L.MOE_LAYER_DESC_VERSION
    d.num_experts, d.hidden, d.intermediate, d.top_k = 128, 2048, 768, 8
    d.max_tokens = 16384
    d.dtype = L.dtype_of(torch.bfloat16)
    if kind == "cpu":
        d.device = L.device_of(torch.device("cpu"))
    else:
        d.device = L.device_of(torch.device("cuda", 0)) if kind == "cuda" \
            else L.moe_device(L.MOE_DEVICE_CUDA, 0)
        if kind == "h100 offline":
            d.plan_gpu = b"h100"
    return d


def measure(L, d, reps):
    h = ctypes.c_void_p()
    cpu, wall = [], []
    for _ in range(reps + 1):
        c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
        L.check(L.lib.moe_layer_plan_create(ctypes.byref(h), ctypes.byref(d)),
                "moe_layer_plan_create")
        L.lib.moe_layer_plan_destroy(h)
        cpu.append((time.thread_time_ns() - c0) / 1e3)
        wall.append((time.perf_counter_ns() - w0) / 1e3)
    return cpu, wall


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=500)
    args = ap.parse_args(argv)
    import torch
    from libmoe import _lib as L
    kinds = ["cpu", "h100 offline"]
    if torch.cuda.is_available():
        kinds.append("cuda")
    print(f"plan create + destroy, Qwen3-30B-A3B bf16 at 16384 tokens, "
          f"{args.reps} reps (target < {TARGET_US:.0f} us)")
    print(f"{'kind':<14} {'first_us':>9} {'cpu_med':>8} {'cpu_p10':>8} "
          f"{'cpu_p90':>8} {'wall_med':>9} {'wall_p90':>9}  verdict")
    bad = 0
    for kind in kinds:
        try:
            cpu, wall = measure(L, desc_for(L, torch, kind), args.reps)
        except L.LibmoeError as e:  # e.g. a library built without CUDA
            print(f"{kind:<14} not planned: {e}")
            continue
        first, cpu, wall = wall[0], cpu[1:], wall[1:]
        med = statistics.median(cpu)
        ok = med < TARGET_US
        bad += not ok
        print(f"{kind:<14} {first:9.1f} {med:8.1f} {pct(cpu, 0.1):8.1f} "
              f"{pct(cpu, 0.9):8.1f} {statistics.median(wall):9.1f} "
              f"{pct(wall, 0.9):9.1f}  {'under' if ok else 'OVER'} the target")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
