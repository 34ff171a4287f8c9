"""Audit a Hugging Face MoE model's expert layers: the copy cliff made visible.

    import libmoe.hf
    report = libmoe.hf.audit(model)              # or audit(model, batch=ids)
    print(report)                                # a table
    report.to_json(); report.plot("layers.png")

    python -m libmoe.audit CONFIG.json [--json] [--plot FILE] [--tokens N]

For each experts module (a class transformers decorated with
`use_experts_implementation`) it reports: the class; the implementation in
effect (config._experts_implementation) and, for "libmoe", whether the
binding serves the module or falls back and why (libmoe.hf's recogniser);
each weight's shape, strides and layout as libmoe reads it; whether one
forward + backward of the layer copies a weight-sized tensor (torch.profiler:
aten::copy_ / clone / contiguous / _to_copy events whose tensor holds at
least as many bytes as the layer's smallest expert weight); libmoe's planner
(method per projection and predicted time, from a CPU plan, or an offline
GPU plan with gpu="h100"/"h200"); and, given a batch, the measured forward +
backward time of each layer under libmoe and under transformers'
grouped_mm, on the inputs the model really routes.

A model built on the meta device (no weights; how the command line builds
one from a config) is audited without running anything: layouts, strides,
the recogniser and the plans only.
"""

from __future__ import annotations

import ctypes
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field

import torch

from . import _lib as L

__all__ = ["audit", "AuditReport", "main"]

_COPY_OPS = ("aten::copy_", "aten::clone", "aten::contiguous",
             "aten::_to_copy")
_LAYOUTS = {L.MOE_LAYOUT_OUT_IN: "out_in", L.MOE_LAYOUT_IN_OUT: "in_out",
            L.MOE_LAYOUT_STRIDED: "strided"}

# plan queries the binding does not declare (moe.h)
_q = L.lib
_q.moe_layer_plan_method.restype = ctypes.c_int
_q.moe_layer_plan_method.argtypes = [ctypes.c_void_p, ctypes.c_int]
_q.moe_layer_plan_predict.restype = ctypes.c_int
_q.moe_layer_plan_predict.argtypes = [
    ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
    ctypes.POINTER(ctypes.c_double), ctypes.POINTER(ctypes.c_double)]
_q.moe_gmm_method_name.restype = ctypes.c_char_p
_q.moe_gmm_method_name.argtypes = [ctypes.c_int]


def experts_modules(model):
    """(name, module) of every transformers experts module."""
    return [(n, m) for n, m in model.named_modules()
            if hasattr(m, "is_transposed") and hasattr(m, "has_gate")
            and hasattr(m, "config")]


def _top_k(module, model) -> int | None:
    for cfg in (getattr(module, "config", None), getattr(model, "config", None)):
        for src in (cfg, getattr(cfg, "text_config", None)):
            for a in ("num_experts_per_tok", "top_k", "moe_topk",
                      "num_experts_per_token", "moe_top_k"):
                v = getattr(src, a, None)
                if isinstance(v, int) and v > 0:
                    return v
    return None


def _impl(module) -> str:
    return str(getattr(module.config, "_experts_implementation", None)
               or "eager")


def _weights(module):
    """The module's own expert tensors (3-D parameters, biases)."""
    out = {}
    for n, p in module.named_parameters(recurse=False):
        out[n] = p
    return out


def _logical(module, name, w):
    """libmoe's logical [E, out, in] view of a gate_up / up / down weight."""
    if w.dim() == 3 and getattr(module, "is_transposed", False):
        return w.transpose(1, 2)
    return w


def _recognise(module) -> str | None:
    """hf's recogniser; a meta-device module's only objection, its device,
    is dropped (the weights will be on a CPU or CUDA device). The recogniser
    checks the device last, so other reasons are not hidden behind it."""
    from . import hf
    reason = hf.unsupported_reason(module)
    on_meta = any(p.device.type == "meta" for p in module.parameters(False))
    if reason is not None and on_meta and "meta" in reason:
        return None
    return reason


# ---- planner --------------------------------------------------------------

_plans: dict = {}


def _plan(E, H, I, k, T, dtype, lay_gu, lay_dn, device, gpu):
    """Method and predicted ms per projection of an offline plan: a CPU
    plan, or with `gpu` ("h100", "h200") a CUDA plan of that card's built-in
    table (needs a build with the CUDA backend)."""
    key = (E, H, I, k, T, dtype, lay_gu, lay_dn, device, gpu)
    if key in _plans:
        return _plans[key]
    from .torch import _Plan
    d = L.moe_layer_desc()
    d.struct_size = ctypes.sizeof(L.moe_layer_desc)
    d.magic, d.version = L.MOE_LAYER_DESC_MAGIC, L.MOE_LAYER_DESC_VERSION
    d.num_experts, d.hidden, d.intermediate = E, H, I
    d.top_k, d.max_tokens = k, max(T, 1)
    d.dtype = L.dtype_of(dtype)
    d.gate_up_layout, d.down_layout = lay_gu, lay_dn
    d.method = L.MOE_GMM_AUTO
    d.invalid_topk = L.MOE_TOPK_INVALID_DROP
    if gpu:
        d.device = L.moe_device(L.MOE_DEVICE_CUDA, 0)
        d.plan_gpu = gpu.encode()
    elif device.type == "cuda":
        d.device = L.device_of(device)
    else:
        d.device = L.moe_device(L.MOE_DEVICE_CPU, 0)
    res = {"device": gpu or ("cuda" if device.type == "cuda" else "cpu"),
           "tokens": T}
    try:
        p = _Plan(d)
    except L.LibmoeError as e:
        res["error"] = str(e)
        _plans[key] = res
        return res
    total = 0.0
    for proj, name in ((0, "gate_up"), (1, "down")):
        m = _q.moe_layer_plan_method(p.handle, proj)
        f, b = ctypes.c_double(), ctypes.c_double()
        st = _q.moe_layer_plan_predict(p.handle, proj, m, ctypes.byref(f),
                                       ctypes.byref(b))
        res[name] = {"method": _q.moe_gmm_method_name(m).decode(),
                     "fwd_ms": f.value if st == 0 else None,
                     "bwd_ms": b.value if st == 0 else None}
        if st == 0:
            total += f.value + b.value
    res["predicted_ms"] = total
    res["explain"] = p.explain()
    _plans[key] = res
    return res


# ---- running the layer ----------------------------------------------------


def _random_inputs(module, T, k, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    gu = module.gate_up_proj if hasattr(module, "gate_up_proj") else \
        module.up_proj
    E = gu.shape[0]
    H = gu.shape[1] if module.is_transposed else gu.shape[2]
    x = torch.randn(T, H, generator=g).to(device, dtype)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    w = torch.softmax(torch.randn(T, k, generator=g), -1)
    return x, idx.to(device), w.to(device, dtype)


def _fwd_bwd(fn, module, x, idx, w):
    """One forward + backward through fn, gradients accumulated into the
    parameters as in training (AccumulateGrad's copies count too)."""
    x = x.detach().requires_grad_()
    out = fn(module, x, idx, w)
    out.backward(torch.ones_like(out) * 0.01)


def _with_clean_grads(module, run):
    """Runs `run` with the module's parameter .grad cleared, then puts the
    caller's gradients back."""
    saved = {n: p.grad for n, p in module.named_parameters()}
    for p in module.parameters():
        p.grad = None
    try:
        return run()
    finally:
        for n, p in module.named_parameters():
            p.grad = saved[n]


def _module_call(module, x, idx, w):
    return module(x, idx, w)


def _copies(module, x, idx, w, min_bytes):
    """copy-like profiler events of one fwd + bwd whose tensor holds at
    least min_bytes."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU]
    if x.device.type == "cuda":
        acts.append(ProfilerActivity.CUDA)
    with profile(activities=acts, record_shapes=True) as prof:
        _with_clean_grads(module,
                          lambda: _fwd_bwd(_module_call, module, x, idx, w))
    found = []
    item = x.element_size()
    for ev in prof.events():
        if ev.name not in _COPY_OPS:
            continue
        shapes = [s for s in (ev.input_shapes or []) if s]
        if not shapes:
            continue
        s = shapes[0]
        nbytes = math.prod(s) * item
        if nbytes >= min_bytes:
            found.append({"op": ev.name, "shape": list(s), "bytes": nbytes})
    return found


def _time(fn, module, x, idx, w, reps=5):
    """Best-of-`reps` wall ms of one forward + backward, and (on the CPU)
    best-of-`reps` process CPU ms (summed over threads, OpenMP spin-waits
    included). The minimum: on a shared machine interference only ever
    adds time."""
    def once():
        _fwd_bwd(fn, module, x, idx, w)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
    once()  # warm-up: plans, kernels, caches
    ts, cs = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        once()
        ts.append((time.perf_counter() - t0) * 1e3)
        cs.append((time.process_time() - c0) * 1e3)
    return min(ts), (min(cs) if x.device.type == "cpu" else None)


def _capture(model, batch):
    """Runs the model once on `batch` and returns each experts module's
    inputs (hidden_states, top_k_index, top_k_weights)."""
    got = {}
    hooks = []
    for name, m in experts_modules(model):
        def pre(mod, args, kwargs, name=name):
            vals = list(args) + [kwargs[k] for k in
                                 ("hidden_states", "top_k_index",
                                  "top_k_weights") if k in kwargs]
            got.setdefault(name, tuple(v.detach() for v in vals[:3]))
        hooks.append(m.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            if isinstance(batch, dict):
                model(**batch)
            else:
                model(batch)
    finally:
        for h in hooks:
            h.remove()
    return got


# ---- the report -----------------------------------------------------------


def _collapse(rows):
    """Consecutive rows equal but for a layer number in the name become one
    row named with the range, e.g. model.layers.{0..47}.mlp.experts (x48)."""
    out = []
    for row in rows:
        if out:
            prev, names = out[-1]
            a, b = re.split(r"(\d+)", prev[0]), re.split(r"(\d+)", row[0])
            diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
            if prev[1:] == row[1:] and len(a) == len(b) and len(diff) == 1 \
                    and diff[0] % 2 == 1 and \
                    (names[-1][0] == diff[0] or len(names) == 1):
                names.append((diff[0], row[0]))
                continue
        out.append((row, [(None, row[0])]))
    res = []
    for row, names in out:
        if len(names) > 1:
            i = names[1][0]
            parts = re.split(r"(\d+)", row[0])
            lo = parts[i]
            hi = re.split(r"(\d+)", names[-1][1])[i]
            parts[i] = "{" + lo + ".." + hi + "}"
            row = ("".join(parts) + f" (x{len(names)})",) + tuple(row[1:])
        res.append(row)
    return res


@dataclass
class AuditReport:
    model: str
    tokens: int
    layers: list = field(default_factory=list)

    def to_dict(self):
        return {"model": self.model, "tokens": self.tokens,
                "layers": self.layers}

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def table(self) -> str:
        rows = [("layer", "experts class", "implementation", "weights "
                 "(shape strides layout)", "copies", "plan", "ms pred",
                 "ms libmoe", "ms grouped_mm")]
        for r in self.layers:
            ws = "; ".join(f"{n} {tuple(v['shape'])} {tuple(v['stride'])} "
                           f"{v['layout']}" for n, v in r["weights"].items())
            if r["copies_weight"] is None:
                cp = "n/a (" + r["copy_check"] + ")"
            else:
                cp = ("COPIES " + ",".join(sorted({c["op"] for c in
                                                   r["copies"]}))
                      if r["copies_weight"] else "none")
            pl = r.get("plan") or {}
            if "error" in pl:
                plan, pred = "error", "-"
            elif pl:
                plan = f"{pl['gate_up']['method']}/{pl['down']['method']}"
                pred = f"{pl['predicted_ms']:.3g}"
            else:
                plan, pred = "-", "-"
            meas = r.get("measured") or {}
            f = (lambda v: f"{v:.3g}" if v is not None else "-")
            eff = r["effective"]
            if r["implementation"] != "libmoe":
                eff += (" (libmoe could serve)" if r["libmoe_can_serve"]
                        else " (libmoe would decline)")
            rows.append((r["name"], r["class"], eff, ws, cp, plan,
                         pred, f(meas.get("libmoe_ms")),
                         f(meas.get("grouped_mm_ms"))))
        rows = rows[:1] + _collapse(rows[1:])
        widths = [max(len(str(row[i])) for row in rows)
                  for i in range(len(rows[0]))]
        lines = ["  ".join(str(c).ljust(wd) for c, wd in zip(row, widths))
                 .rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * wd for wd in widths))
        notes = sorted({r["reason"] for r in self.layers if r["reason"]})
        for n in notes:
            lines.append(f"fallback reason: {n}")
        plans = [r["plan"] for r in self.layers if r.get("plan")]
        if plans and "error" not in plans[0]:
            lines.append(f"plans: {plans[0]['device']}, "
                         f"{plans[0]['tokens']} tokens, forward + backward")
        for p in plans:
            if "error" in p:
                lines.append("plan error: " + p["error"])
                break
        return "\n".join(lines)

    __str__ = table

    def plot(self, path: str) -> None:
        """A bar chart of time per layer: predicted, and measured when a
        batch was given. Needs matplotlib."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except Exception as e:  # a broken install fails with more than
            # ImportError (seen: SystemError from a mismatched extension)
            raise RuntimeError(
                "libmoe.audit --plot needs matplotlib, which cannot be "
                "imported here (%s: %s; pip install matplotlib); the table "
                "and --json need nothing" % (type(e).__name__, e)) from None
        names = [r["name"] for r in self.layers]
        series = {
            "libmoe predicted": [(r.get("plan") or {}).get("predicted_ms")
                                 for r in self.layers],
            "libmoe measured": [(r.get("measured") or {}).get("libmoe_ms")
                                for r in self.layers],
            "grouped_mm measured": [(r.get("measured") or {})
                                    .get("grouped_mm_ms")
                                    for r in self.layers]}
        series = {k: [v if v is not None else 0.0 for v in vals]
                  for k, vals in series.items()
                  if any(v is not None for v in vals)}
        fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names) + 2), 4))
        n = max(1, len(series))
        wd = 0.8 / n
        for i, (lab, vals) in enumerate(series.items()):
            ax.bar([j + i * wd for j in range(len(names))], vals, wd,
                   label=lab)
        ax.set_xticks([j + 0.4 - wd / 2 for j in range(len(names))])
        ax.set_xticklabels(names, rotation=90, fontsize=6)
        ax.set_ylabel("ms, forward + backward")
        ax.set_title(f"{self.model}: expert layers, {self.tokens} tokens")
        for r_i, r in enumerate(self.layers):
            if r["copies_weight"]:
                ax.annotate("copy", (r_i, 0), color="red", fontsize=6)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def audit(model, batch=None, *, tokens: int | None = None,
          copy_tokens: int = 16, gpu: str | None = None) -> AuditReport:
    """Audits every experts module of `model` (see the module docstring).

    batch: model inputs (input_ids tensor or a dict of keyword inputs);
        with it, each layer is timed (forward + backward, libmoe against
        transformers' grouped_mm) on the inputs the model routes to it.
    tokens: the token count of the plans (default: the batch's routed
        tokens, else 4096).
    copy_tokens: tokens of the random batch the copy check runs.
    gpu: "h100" / "h200": plan offline for that card instead of the CPU.
    """
    captured = _capture(model, batch) if batch is not None else {}
    if tokens is None:
        tokens = next((int(v[0].shape[0]) for v in captured.values()), 4096)
    rep = AuditReport(type(model).__name__, int(tokens))
    for name, m in experts_modules(model):
        ws = _weights(m)
        meta = any(p.device.type == "meta" for p in ws.values())
        impl = _impl(m)
        reason = _recognise(m)
        if impl == "libmoe":
            effective = "libmoe" if reason is None else "grouped_mm (fallback)"
        else:
            effective = impl
        row = {"name": name, "class": type(m).__name__,
               "implementation": impl, "effective": effective,
               "reason": reason, "libmoe_can_serve": reason is None,
               "weights": {}, "copies": [], "copies_weight": None,
               "copy_check": "", "plan": None, "measured": None}
        for n, p in ws.items():
            v = {"shape": list(p.shape), "stride": list(p.stride()),
                 "dtype": str(p.dtype).replace("torch.", ""),
                 "device": p.device.type,
                 "contiguous": p.is_contiguous()}
            lg = _logical(m, n, p)
            v["layout"] = _LAYOUTS[L.layout_of(lg)] if lg.dim() == 3 else "-"
            row["weights"][n] = v
        k = _top_k(m, model)
        gu = ws.get("gate_up_proj")
        dn = ws.get("down_proj")
        if gu is not None and dn is not None and gu.dim() == 3 and \
                dn.dim() == 3 and k and gu.dtype in (torch.float32,
                                                     torch.bfloat16) \
                and reason is None:
            lgu, ldn = _logical(m, "gate_up_proj", gu), _logical(m, "down_proj",
                                                                 dn)
            E, I2, H = lgu.shape
            row["plan"] = _plan(int(E), int(H), int(I2) // 2, int(k),
                                int(tokens), gu.dtype, L.layout_of(lgu),
                                L.layout_of(ldn), gu.device, gpu)
        if meta:
            row["copy_check"] = "meta device: no weights to run"
        elif not k:
            row["copy_check"] = "top-k unknown"
        else:
            min_bytes = min(p.numel() * p.element_size()
                            for p in ws.values() if p.dim() == 3)
            dev, dt = next(iter(ws.values())).device, \
                next(iter(ws.values())).dtype
            x, idx, w = _random_inputs(m, copy_tokens, k, dt, dev)
            row["copies"] = _copies(m, x, idx, w, min_bytes)
            row["copies_weight"] = bool(row["copies"])
            row["copy_check"] = f"{copy_tokens} random tokens"
            if name in captured:
                from . import hf
                from .hf import _moe_module
                x, idx, w = captured[name]
                lib, lib_cpu = _with_clean_grads(
                    m, lambda: _time(hf.experts_forward, m, x, idx, w))
                gmm, gmm_cpu = _with_clean_grads(
                    m, lambda: _time(
                        _moe_module().grouped_mm_experts_forward, m, x,
                        idx, w))
                row["measured"] = {"tokens": int(x.shape[0]),
                                   "libmoe_ms": lib, "grouped_mm_ms": gmm,
                                   "libmoe_cpu_ms": lib_cpu,
                                   "grouped_mm_cpu_ms": gmm_cpu}
        rep.layers.append(row)
    return rep


# ---- command line ---------------------------------------------------------


def _model_from_config(path: str, impl: str):
    import transformers
    from . import hf
    hf.register()
    try:
        cfg = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"libmoe.audit: cannot read a config from {path}: "
                         f"{e}") from None
    dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        dtype = torch.bfloat16
    errs = []
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        try:
            with torch.device("meta"):
                return auto.from_config(cfg, experts_implementation=impl,
                                        dtype=dtype)
        except (ValueError, KeyError) as e:
            errs.append(f"{auto.__name__}: {e}")
    raise SystemExit("libmoe.audit: cannot build a model from "
                     f"{path}: " + "; ".join(errs))


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(
        prog="python -m libmoe.audit",
        description="Audit the expert layers of a Hugging Face MoE model "
        "built from its config on the meta device (no weights): the "
        "implementation in effect, weight layouts, libmoe's plans.")
    ap.add_argument("config", help="config.json, or a directory holding one")
    ap.add_argument("--json", action="store_true", help="print JSON")
    ap.add_argument("--plot", metavar="FILE",
                    help="bar chart of time per layer (needs matplotlib)")
    ap.add_argument("--tokens", type=int, default=4096,
                    help="tokens the plans are made for (default 4096)")
    ap.add_argument("--gpu", choices=["h100", "h200"],
                    help="plan offline for this card instead of this CPU")
    ap.add_argument("--impl", default="libmoe",
                    help="experts_implementation to build the model with "
                    "(default libmoe)")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    model = _model_from_config(a.config, a.impl)
    rep = audit(model, tokens=a.tokens, gpu=a.gpu)
    rep.model = f"{type(model).__name__} ({a.config})"
    if a.json:
        print(rep.to_json(indent=1))
    else:
        print(rep.table())
        print(f"audited {len(rep.layers)} expert layers: "
              f"{time.perf_counter() - t0:.2f} s wall (model build + audit), "
              f"{time.process_time():.2f} s CPU (whole process)")
    if a.plot:
        try:
            rep.plot(a.plot)
        except RuntimeError as e:
            print(e, file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
