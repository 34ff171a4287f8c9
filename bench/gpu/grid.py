"""The issue-16 grid through Hugging Face's Qwen3MoeSparseMoeBlock, one GPU,
bf16: libmoe against its peers, all in one process.

    python3 bench/gpu/grid.py                      # the grid, all three peers
    python3 bench/gpu/grid.py --impl libmoe,grouped_mm --shapes qwen3_30b
    python3 bench/gpu/grid.py --tokens-scale 0.125 # quick: T/8 at every shape
    python3 bench/gpu/grid.py --scaling            # the "scaling runs" check
    python3 bench/gpu/grid.py --device cpu --tiny  # code paths only, no GPU
    bash bench/gpu/grid.sh [args]                  # builds libmoe, installs Liger

Implementations (--impl, any subset, in this order: grouped_mm first, as
the reference of the rel_* columns):
  grouped_mm  transformers' experts_implementation="grouped_mm"
  libmoe      experts_implementation="libmoe" (python/libmoe; libmoe.hf.register)
              (its default: libmoe.torch.overwrite_saved = True, the
              backward writes dH over the saved pre-activation,
              desc.backward_overwrites_saved)
  libmoe_keep the same with overwrite_saved = False: the backward keeps
              the saved state and holds its own dH buffer; not in the
              default set
  libmoe_same libmoe with MOE_CUDA_COLS=same: the forward's and the
              backward's hidden-column passes at one width, as before the
              planner chose them apart (the side-by-side check of that
              choice); not in the default set
  libmoe_lean libmoe with libmoe.torch.memory = "lean" (desc.memory: the
              smallest peak, passes of 256 columns); not in the default set
  libmoe_mpp  libmoe with MOE_CUDA_SM90_MPP=1: the forward and dX products
              on the M-grouped ping-pong tile (its epilogue stores under
              the other warpgroup's mainloop); not in the default set
  libmoe_pack libmoe with MOE_CUDA_ACT_PACK=1: the backward's activation
              pass with several slots a block (the same bits); not in the
              default set
  liger       Liger-Kernel's LigerFusedMoEFunction (PyPI liger-kernel 0.8.5,
              Triton), registered here in transformers' ExpertsInterface as
              "liger_fused_moe": it runs on the block's own routing (the
              router GEMM, softmax, top-k and renormalisation stay in the HF
              block, inside the timed region, as for the other two), with
              the block's [E, 2n, d] / [E, d, n] weights in place. So all
              three measure the same work: router in torch, experts in the
              implementation. (--layout transposed hands Liger transposed
              views, which its ensure_contiguous copies on every call.)
              Its autotuning is off unless --liger-autotune
              (LIGER_FUSED_MOE_AUTOTUNE=0; autotuning costs ~4 min a shape):
              its speed is then not its best, its memory is.
  On the GPU image Liger is installed from the wheel in .whl/ (downloaded in
  /work/main with `pip download --no-deps --only-binary=:all:
  --python-version 3.12 ... liger-kernel==0.8.5`; py3-none-any; needs only
  torch and triton, which the image has):
      pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
      PYTHONPATH=/tmp/site:python python3 bench/gpu/grid.py
  (bench/gpu/grid.sh does this and builds libmoe when needed.)

Measured per cell (shape x implementation), fresh block per shape, the same
weights, tokens and grad_output for every implementation:
  fwd_ms     the block's forward with autograd on (a training forward; the
             graph is dropped), CUDA events, median of --reps after
             --warmup; --fwd-nograd times it under torch.no_grad instead
  fwdbwd_ms  forward + backward(grad_output), same clock
  TFLOP/s    the field's count: fwd = 6*T*K*d*n, bwd = 12*T*K*d*n, bwd time
             = fwdbwd_ms - fwd_ms; the router is timed, not counted
  act_GiB    activation memory: the peak allocated (torch's caching
             allocator, max_memory_allocated after reset_peak_memory_stats)
             during one fwd+bwd, above what was allocated before it
             (weights, input, grad_output), minus the parameter gradients'
             bytes (router and experts). The input gradient is counted in
             it (dx_GiB says how much). Memory a library takes outside
             torch's allocator (cudaMalloc / cudaMallocAsync of its own)
             is not seen here.
  rel_*      max |impl - grouped_mm| / max |grouped_mm| of the output, the
             input gradient and each parameter gradient (a wiring check,
             bf16: expect ~1e-2)
A cell that runs out of memory prints OOM; memory is freed between cells.
On --device cpu the clock is the process CPU time (all threads summed) and
there is no memory figure: the CPU run checks code paths, not speed.

SonicMoE's published H100 numbers (arXiv 2512.14080, Fig. 13/14, read from
the plots, +-5) are printed beside; see /work/shared/notes/io-aware-moe.md.
The table goes to stdout, the JSON to --json (default $OUT/grid.json, or
grid_scaling.json with --scaling), rewritten after every cell.
"""

import argparse
import gc
import json
import os
import sys
import time

GRID = [  # name, d, T, n, E, K
    ("7b_n256", 1536, 24576, 256, 128, 8),
    ("7b_n1024", 1536, 24576, 1024, 32, 2),
    ("30b_n256", 4096, 32768, 256, 256, 16),
    ("30b_n512", 4096, 32768, 512, 128, 8),
    ("30b_n1024", 4096, 32768, 1024, 64, 4),
    ("120b_n1024", 4096, 32768, 1024, 128, 8),
    ("qwen3_30b", 2048, 32768, 768, 128, 8),
]
SCALING = [  # libmoe vs grouped_mm, fwd+bwd; issue target >= 2.5x, memory <=
    ("qwen3_30b_4k", 2048, 4096, 768, 128, 8),
    ("qwen3_30b_8k", 2048, 8192, 768, 128, 8),
    ("qwen3_30b_16k", 2048, 16384, 768, 128, 8),
    ("qwen35_397b_8k", 4096, 8192, 1024, 512, 10),
]
TINY = [  # --tiny: odd token counts, d and n multiples of 8 (grouped_mm)
    ("tiny_a", 96, 333, 40, 8, 2),
    ("tiny_b", 136, 257, 24, 16, 4),
]
# SonicMoE, H100, published: fwd TFLOP/s, bwd TFLOP/s, activation GiB
SONIC = {
    "7b_n256": (363, 403, 0.60),
    "7b_n1024": (465, 465, None),
    "30b_n256": (427, 459, 2.44),
    "30b_n512": (502, 510, 2.44),
    "30b_n1024": (551, 553, None),
    "120b_n1024": (557, 566, 4.44),
}
# Liger's own benchmark CSV (v0.7.0, H100) at the Qwen3-30B-A3B shape
LIGER_PUB = {"qwen3_30b": (337, 242)}
IMPLS = ("grouped_mm", "libmoe", "libmoe_keep", "libmoe_same", "libmoe_lean",
         "libmoe_mpp", "libmoe_pack", "liger")
LIBMOE_IMPLS = ("libmoe", "libmoe_keep", "libmoe_same", "libmoe_lean",
                "libmoe_mpp", "libmoe_pack")
# environment each libmoe variant runs under (read by the library at every
# call)
LIBMOE_ENV = {"libmoe_same": ("MOE_CUDA_COLS", "same"),
              "libmoe_mpp": ("MOE_CUDA_SM90_MPP", "1"),
              "libmoe_pack": ("MOE_CUDA_ACT_PACK", "1")}
DEFAULT_IMPLS = ("grouped_mm", "libmoe", "liger")
LIGER_NAME = "liger_fused_moe"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", default=None,
                    help="comma list of %s (default: %s; with --scaling: "
                    "libmoe,grouped_mm)" % (",".join(IMPLS),
                                            ",".join(DEFAULT_IMPLS)))
    ap.add_argument("--shapes", default="all",
                    help="comma list of shape names or 'all'")
    ap.add_argument("--tokens-scale", type=float, default=1.0,
                    help="multiply every shape's T by this (quick runs)")
    ap.add_argument("--scaling", action="store_true",
                    help="the scaling runs (Qwen3-30B-A3B 4k/8k/16k, "
                    "Qwen3.5-397B 8k) instead of the grid")
    ap.add_argument("--tiny", action="store_true",
                    help="tiny shapes instead (code-path check)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--layout", default="contiguous",
                    choices=("contiguous", "transposed"),
                    help="expert weight storage (transposed: is_transposed)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--fwd-nograd", action="store_true",
                    help="time the forward under torch.no_grad")
    ap.add_argument("--liger-autotune", action="store_true",
                    help="let Liger autotune (minutes per shape)")
    ap.add_argument("--no-check", action="store_true",
                    help="skip the rel_* comparison with grouped_mm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true",
                    help="after the timed runs, one more fwd+bwd per cell "
                    "between cudaProfilerStart/Stop (for ncu "
                    "--profile-from-start off: bench/gpu/ncu.sh)")
    ap.add_argument("--json", default=None, help="output JSON path")
    a = ap.parse_args(argv)
    if a.reps < 1 or a.warmup < 0 or a.tokens_scale <= 0:
        ap.error("--reps >= 1, --warmup >= 0, --tokens-scale > 0")
    impls = (a.impl or ("libmoe,grouped_mm" if a.scaling else
                        ",".join(DEFAULT_IMPLS))).split(",")
    impls = [s.strip() for s in impls if s.strip()]
    bad = [s for s in impls if s not in IMPLS]
    if bad or not impls:
        ap.error("--impl: unknown %s; choose from %s" % (bad, ",".join(IMPLS)))
    a.impls = [s for s in IMPLS if s in impls]  # grouped_mm first
    table = TINY if a.tiny else (SCALING if a.scaling else GRID)
    if a.shapes != "all":
        want = [s.strip() for s in a.shapes.split(",") if s.strip()]
        known = {s[0] for s in table}
        bad = [s for s in want if s not in known]
        if bad:
            ap.error("--shapes: unknown %s; this mode has %s"
                     % (bad, ",".join(s[0] for s in table)))
        table = [s for s in table if s[0] in want]
    a.table = [(nm, d, max(1, int(round(T * a.tokens_scale))), n, E, K)
               for nm, d, T, n, E, K in table]
    if a.json is None:
        a.json = os.path.join(os.environ.get("OUT", "."),
                              "grid_scaling.json" if a.scaling else
                              "grid.json")
    return a


# ---- implementations ----------------------------------------------------------


def setup_impls(args, torch, hf_moe):
    """Imports and registers each requested implementation; returns
    {impl: None (ready) | reason it is skipped}."""
    state = {}
    for impl in args.impls:
        if impl == "grouped_mm":
            state[impl] = None
        elif impl in LIBMOE_IMPLS:
            try:
                import libmoe
                import libmoe.hf
                libmoe.hf.register()
                if args.device == "cuda" and not libmoe._lib.HAS_CUDA:
                    state[impl] = ("this libmoe build has no CUDA backend "
                                   "(LIBMOE_LIBRARY=%s)"
                                   % os.environ.get("LIBMOE_LIBRARY", "-"))
                else:
                    state[impl] = None
            except Exception as e:  # a missing build is reported, not fatal
                state[impl] = "import libmoe failed: %r" % (e,)
        elif impl == "liger":
            if args.device != "cuda":
                state[impl] = ("Liger's fused MoE is Triton code: it needs a "
                               "CUDA GPU")
                continue
            # read by liger_kernel at import; an exported value is kept
            # unless --liger-autotune asks for autotuning
            if args.liger_autotune:
                os.environ["LIGER_FUSED_MOE_AUTOTUNE"] = "1"
            else:
                os.environ.setdefault("LIGER_FUSED_MOE_AUTOTUNE", "0")
            try:
                from liger_kernel.ops.fused_moe import LigerFusedMoEFunction
            except Exception as e:
                state[impl] = ("import liger_kernel failed: %r (install its "
                               "wheel: see this file's header)" % (e,))
                continue
            hf_moe.ExpertsInterface.register(
                LIGER_NAME, make_liger_forward(torch, LigerFusedMoEFunction))
            state[impl] = None
    return state


def make_liger_forward(torch, fn):
    def liger_experts_forward(self, hidden_states, top_k_index,
                              top_k_weights):
        """ExpertsInterface entry: Liger's autograd function on the block's
        routing and weights ([E, 2n, d] gate_up, [E, d, n] down)."""
        gu, dn = self.gate_up_proj, self.down_proj
        if getattr(self, "is_transposed", False):
            gu, dn = gu.transpose(1, 2), dn.transpose(1, 2)
        w = top_k_weights
        if w.dtype != hidden_states.dtype:
            w = w.to(hidden_states.dtype)
        return fn.apply(hidden_states, gu, dn, top_k_index.to(torch.int32), w)
    return liger_experts_forward


def hf_name(impl):
    return LIGER_NAME if impl == "liger" else \
        "libmoe" if impl in LIBMOE_IMPLS else impl


# ---- measurement ----------------------------------------------------------------


class Clock:
    def __init__(self, torch, device):
        self.torch, self.cuda = torch, device == "cuda"

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def median_ms(self, fn, warmup, reps):
        for _ in range(warmup):
            fn()
        self.sync()
        ts = []
        for _ in range(reps):
            if self.cuda:
                a = self.torch.cuda.Event(enable_timing=True)
                b = self.torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                self.torch.cuda.synchronize()
                ts.append(a.elapsed_time(b))
            else:
                t0 = time.process_time()
                fn()
                ts.append((time.process_time() - t0) * 1e3)
        ts.sort()
        return ts[len(ts) // 2]


def make_block(torch, qm, Qwen3MoeConfig, d, n, E, K, dev, transposed, seed):
    cfg = Qwen3MoeConfig(hidden_size=d, moe_intermediate_size=n,
                         num_experts=E, num_experts_per_tok=K,
                         norm_topk_prob=True, intermediate_size=4 * d,
                         num_hidden_layers=1)
    cfg._experts_implementation = "grouped_mm"
    torch.manual_seed(seed)
    blk = qm.Qwen3MoeSparseMoeBlock(cfg).to(dev, torch.bfloat16)
    for p in blk.parameters():
        torch.nn.init.normal_(p, std=0.02)
    if transposed:
        ex = blk.experts
        with torch.no_grad():
            ex.gate_up_proj = torch.nn.Parameter(
                ex.gate_up_proj.transpose(1, 2).contiguous())
            ex.down_proj = torch.nn.Parameter(
                ex.down_proj.transpose(1, 2).contiguous())
        ex.is_transposed = True
    return cfg, blk


def rel_err(torch, a, ref):
    """max |a - ref| / max |ref|, in slices along dim 0 (no full f32 copy)."""
    num, den = 0.0, 0.0
    a = a.reshape(-1, a.shape[-1]) if a.dim() < 3 else a
    ref = ref.reshape(a.shape)
    step = max(1, (1 << 24) // max(1, a[0].numel()))
    for i in range(0, a.shape[0], step):
        x, r = a[i:i + step].float(), ref[i:i + step].float()
        num = max(num, (x - r).abs().max().item())
        den = max(den, r.abs().max().item())
    return num / den if den > 0 else float("nan") if num > 0 else 0.0


def nbytes(t):
    return t.numel() * t.element_size() if t is not None else 0


def run_cell(args, torch, clock, cfg, blk, x, g, impl, shape, ref):
    if impl not in LIBMOE_IMPLS:
        return run_cell_as(args, torch, clock, cfg, blk, x, g, impl, shape,
                           ref)
    import libmoe.torch as lt
    env = LIBMOE_ENV.get(impl)
    keep = lt.overwrite_saved, lt.memory, env and os.environ.get(env[0])
    lt.overwrite_saved = impl != "libmoe_keep"
    lt.memory = "lean" if impl == "libmoe_lean" else "balanced"
    if env:
        os.environ[env[0]] = env[1]
    try:
        return run_cell_as(args, torch, clock, cfg, blk, x, g, impl, shape,
                           ref)
    finally:
        lt.overwrite_saved, lt.memory = keep[0], keep[1]
        if env and keep[2] is None:
            os.environ.pop(env[0], None)
        elif env:
            os.environ[env[0]] = keep[2]


def run_cell_as(args, torch, clock, cfg, blk, x, g, impl, shape, ref):
    nm, d, T, n, E, K = shape
    cfg._experts_implementation = hf_name(impl)
    params = list(blk.parameters())
    cuda = args.device == "cuda"

    def fwd():
        if args.fwd_nograd:
            with torch.no_grad():
                blk(x)
        else:
            blk(x)

    def fb():
        x.grad = None
        blk.zero_grad(set_to_none=True)
        o = blk(x)
        o = o[0] if isinstance(o, tuple) else o
        o.backward(g)

    r = {}
    t0 = time.time()
    r["fwd_ms"] = clock.median_ms(fwd, args.warmup, args.reps)
    r["fwdbwd_ms"] = clock.median_ms(fb, max(1, args.warmup), args.reps)
    flop = T * K * d * n
    r["fwd_TFLOPs"] = 6 * flop / (r["fwd_ms"] * 1e9)
    bwd_ms = r["fwdbwd_ms"] - r["fwd_ms"]
    r["bwd_TFLOPs"] = 12 * flop / (bwd_ms * 1e9) if bwd_ms > 0 else None
    if cuda:
        x.grad = None
        blk.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fb()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        pg = sum(nbytes(p.grad) for p in params)
        r["peak_GiB"] = peak / 2**30
        r["param_grad_GiB"] = pg / 2**30
        r["dx_GiB"] = nbytes(x.grad) / 2**30
        r["act_GiB"] = (peak - pg) / 2**30
    if cuda and args.profile:
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        fb()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
    if not args.no_check:
        x.grad = None
        blk.zero_grad(set_to_none=True)
        o = blk(x)
        o = o[0] if isinstance(o, tuple) else o
        o.backward(g)
        got = {"out": o.detach(), "dx": x.grad}
        for pn, p in blk.named_parameters():  # gate.weight: the router
            got[pn.replace("experts.", "").replace("gate.weight", "router")
                ] = p.grad
        if impl == "grouped_mm":
            ref.clear()
            ref.update({k: v.clone() for k, v in got.items()
                        if v is not None})
        elif ref:
            for k, v in got.items():
                if k in ref and v is not None:
                    r["rel_" + k] = rel_err(torch, v, ref[k])
        del o, got
    x.grad = None
    blk.zero_grad(set_to_none=True)
    r["wall_s"] = round(time.time() - t0, 1)
    return r


def free(torch, cuda):
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ---- output -------------------------------------------------------------------------


def fmt_tf(v):
    return "n/a" if v is None else ("%.0f" % v if v >= 10 else "%.2g" % v)


def fmt_cell(r):
    if r is None:
        return "-"
    if "skipped" in r:
        return "skipped"
    if "error" in r:
        return "OOM" if r["error"] == "OOM" else "error"
    s = "%s / %s" % (fmt_tf(r["fwd_TFLOPs"]), fmt_tf(r.get("bwd_TFLOPs")))
    if "act_GiB" in r:
        s += ", %.2f" % r["act_GiB"]
    return s


def fmt_ms(r):
    if r is None or "fwd_ms" not in r:
        return fmt_cell(r)
    return "%.3f / %.3f" % (r["fwd_ms"], r["fwdbwd_ms"])


def ratio(a, b):
    """a / b as "0.87x", or "-" where either is missing."""
    return "%.2fx" % (a / b) if a is not None and b else "-"


def mem_vs(la, other, missing="-"):
    """Activation GiB la against another's: "yes" at or under, else by how
    much over; `missing` where either is missing."""
    if la is None or other is None:
        return missing
    return "yes" if la <= other else "no (+%.0f%%)" % (100 * (la / other - 1))


def print_targets(args, res, lms, names, p):
    """Issue 16's targets per grid shape and libmoe variant: fwd and bwd
    TFLOP/s over SonicMoE's published (target >= 1.00x), activation GiB
    against SonicMoE's published figure, Liger's and grouped_mm's of the
    same run (target: at or under each)."""
    p("\nissue 16 targets: libmoe / SonicMoE (pub., H100) fwd and bwd "
      "(target >= 1.00x); activation GiB at or under SonicMoE's, Liger's "
      "and grouped_mm's")
    p("| shape | libmoe | fwd | bwd | GiB | <= SonicMoE | <= Liger | "
      "<= grouped_mm |")
    p("|---|---|---|---|---|---|---|---|")
    for nm, *_ in args.table:
        c = res["cells"].get(nm, {})
        s = SONIC.get(nm) or (None, None, None)
        lg, gm = c.get("liger") or {}, c.get("grouped_mm") or {}
        for li in lms:
            r = c.get(li) or {}
            if "fwd_TFLOPs" not in r:
                p("| %s | %s | %s | | | | | |" % (nm, names[li],
                                                 fmt_cell(r or None)))
                continue
            la = r.get("act_GiB")
            p("| %s | %s | %s | %s | %s | %s | %s | %s |" % (
                nm, names[li], ratio(r["fwd_TFLOPs"], s[0]),
                ratio(r.get("bwd_TFLOPs"), s[1]),
                "%.2f" % la if la is not None else "-", mem_vs(la, s[2]),
                mem_vs(la, lg.get("act_GiB")), mem_vs(la, gm.get("act_GiB"))))


def print_tables(args, res, out=sys.stdout):
    names = {"grouped_mm": "HF grouped_mm", "libmoe": "libmoe",
             "libmoe_keep": "libmoe, saved kept",
             "libmoe_same": "libmoe, passes at one width",
             "libmoe_lean": "libmoe, memory lean",
             "libmoe_mpp": "libmoe, M ping-pong tile",
             "libmoe_pack": "libmoe, act. pass packed",
             "liger": "Liger fused_moe"}
    cols = [names[i] for i in args.impls]
    unit = "TFLOP/s" if args.device == "cuda" else "TFLOP/s (CPU time)"
    mem = ", activation GiB" if args.device == "cuda" else ""
    p = lambda s: print(s, file=out)  # noqa: E731
    p("\nfwd / bwd %s%s (%s)" % (unit, mem, res["meta"]["device_name"]))
    hdr = ["shape (d, T, n, E, K)"] + cols
    if not args.scaling and not args.tiny:
        hdr.append("SonicMoE (pub., H100)")
    p("| " + " | ".join(hdr) + " |")
    p("|" + "---|" * len(hdr))
    for nm, d, T, n, E, K in args.table:
        row = ["%s: %d, %d, %d, %d, %d" % (nm, d, T, n, E, K)]
        cells = res["cells"].get(nm, {})
        row += [fmt_cell(cells.get(i)) for i in args.impls]
        if not args.scaling and not args.tiny:
            s = SONIC.get(nm)
            c = "%d / %d" % s[:2] + (", %.2f" % s[2] if s and s[2] else "") \
                if s else "-"
            if nm in LIGER_PUB:
                c += " (Liger pub. v0.7.0: %d / %d)" % LIGER_PUB[nm]
            row.append(c)
        p("| " + " | ".join(row) + " |")
    p("\nfwd ms / fwd+bwd ms")
    p("| " + " | ".join(["shape"] + cols) + " |")
    p("|" + "---|" * (len(cols) + 1))
    for nm, *_ in args.table:
        cells = res["cells"].get(nm, {})
        p("| " + " | ".join([nm] + [fmt_ms(cells.get(i))
                                     for i in args.impls]) + " |")
    lms = [i for i in LIBMOE_IMPLS if i in args.impls]
    if not args.scaling and not args.tiny and args.device == "cuda" and lms:
        print_targets(args, res, lms, names, p)
    if args.scaling and lms and "grouped_mm" in args.impls:
        p("\nscaling runs: libmoe vs HF grouped_mm, fwd+bwd "
          "(issue target: speedup >= 2.5x, activation GiB <= grouped_mm's)")
        p("| shape | libmoe | speedup fwd+bwd | libmoe act GiB | grouped_mm "
          "act GiB | speedup ok | memory ok |")
        p("|---|---|---|---|---|---|---|")
        for nm, *_ in args.table:
            c = res["cells"].get(nm, {})
            gm = c.get("grouped_mm") or {}
            for li in lms:
                lm = c.get(li) or {}
                if "fwdbwd_ms" not in lm or "fwdbwd_ms" not in gm:
                    p("| %s | %s | %s | | | | |" % (
                        nm, names[li], "n/a (%s / %s)" % (
                        fmt_cell(lm or None), fmt_cell(gm or None))))
                    continue
                sp = gm["fwdbwd_ms"] / lm["fwdbwd_ms"]
                la, ga = lm.get("act_GiB"), gm.get("act_GiB")
                mem_ok = mem_vs(la, ga, "n/a")
                p("| %s | %s | %.2fx | %s | %s | %s | %s |" % (
                    nm, names[li], sp,
                    "%.2f" % la if la is not None else "n/a",
                    "%.2f" % ga if ga is not None else "n/a",
                    "yes" if sp >= 2.5 else "no (%.2fx short)" % (2.5 / sp),
                    mem_ok))


def write_json(args, res):
    d = os.path.dirname(os.path.abspath(args.json))
    os.makedirs(d, exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)


def main(argv=None):
    args = parse_args(argv)
    import torch
    import transformers
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe import modeling_qwen3_moe as qm
    import importlib
    hf_moe = importlib.import_module("transformers.integrations.moe")

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("skipped: no CUDA device (use --device cpu --tiny for the "
              "code paths)")
        return 0
    dev = torch.device(args.device)
    state = setup_impls(args, torch, hf_moe)
    meta = {
        "torch": torch.__version__, "transformers": transformers.__version__,
        "device_name": torch.cuda.get_device_name(0) if cuda else "cpu",
        "mode": "scaling" if args.scaling else ("tiny" if args.tiny else
                                                "grid"),
        "impls": args.impls, "tokens_scale": args.tokens_scale,
        "reps": args.reps, "warmup": args.warmup, "layout": args.layout,
        "fwd_timed": "no_grad" if args.fwd_nograd else "autograd on",
        "clock": "cuda events" if cuda else "process CPU time",
        "skipped": {k: v for k, v in state.items() if v},
        "sonicmoe_published_h100": SONIC,
        "definitions": "fwd FLOP 6TKdn, bwd 12TKdn, bwd ms = fwdbwd - fwd; "
                       "act_GiB = peak allocated during one fwd+bwd above "
                       "weights+input+grad_output minus parameter grads",
    }
    if "libmoe" in state and state["libmoe"] is None:
        import libmoe
        meta["libmoe"] = libmoe.__version__
    if "liger" in args.impls:
        meta["liger_autotune"] = os.environ.get("LIGER_FUSED_MOE_AUTOTUNE")
        try:
            from importlib.metadata import version
            meta["liger_kernel"] = version("liger-kernel")
        except Exception:
            pass
    res = {"meta": meta, "cells": {}}
    print("grid.py:", json.dumps({k: meta[k] for k in (
        "torch", "transformers", "device_name", "mode", "impls",
        "tokens_scale", "fwd_timed", "clock")}), flush=True)
    for k, v in state.items():
        if v:
            print("skipped %s: %s" % (k, v), flush=True)
    clock = Clock(torch, args.device)
    for shape in args.table:
        nm, d, T, n, E, K = shape
        cells = res["cells"].setdefault(nm, {})
        cfg = blk = x = g = None
        ref = {}
        try:
            cfg, blk = make_block(torch, qm, Qwen3MoeConfig, d, n, E, K, dev,
                                  args.layout == "transposed", args.seed)
            gen = torch.Generator(device=dev).manual_seed(args.seed + 1)
            x = torch.randn(1, T, d, device=dev, dtype=torch.bfloat16,
                            generator=gen).requires_grad_(True)
            g = torch.randn(1, T, d, device=dev, dtype=torch.bfloat16,
                            generator=gen)
        except torch.OutOfMemoryError:
            for impl in args.impls:
                cells[impl] = {"error": "OOM", "where": "allocating the block"}
            print("%s: OOM allocating the block" % nm, flush=True)
            cfg = blk = x = g = None
            free(torch, cuda)
            continue
        for impl in args.impls:
            if state[impl]:
                cells[impl] = {"skipped": state[impl]}
                continue
            try:
                r = run_cell(args, torch, clock, cfg, blk, x, g, impl, shape,
                             ref)
            except torch.OutOfMemoryError:
                r = {"error": "OOM"}
            except Exception as e:  # report and go on with the next cell
                r = {"error": repr(e)[:400]}
            x.grad = None
            blk.zero_grad(set_to_none=True)
            free(torch, cuda)
            cells[impl] = r
            print("%s/%s %s" % (nm, impl, json.dumps(r)), flush=True)
            write_json(args, res)
        del cfg, blk, x, g, ref
        free(torch, cuda)
    print_tables(args, res)
    write_json(args, res)
    print("\njson:", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
