"""The one timing helper of the bench/gpu scripts: the median of CUDA-event
timings (or of wall-clock ones on the CPU) of fn() after a warm-up.

Imported as `from timing import median_ms` by the scripts beside it (they
run as `python3 bench/gpu/<script>.py`, so this folder is on sys.path).
"""

import time

import torch


def median_ms(fn, warm=2, reps=5, device="cuda"):
    """Median milliseconds of `reps` calls of fn() after `warm` untimed
    ones; CUDA events on a GPU, time.perf_counter on the CPU."""
    cuda = device == "cuda"
    for _ in range(warm):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if cuda:
            start = torch.cuda.Event(enable_timing=True)
            stop = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]
