"""Hugging Face transformers integration.

    import libmoe.hf
    libmoe.hf.register()
    model = AutoModelForCausalLM.from_pretrained(..., experts_implementation="libmoe")
    # or: Qwen3MoeForCausalLM._from_config(cfg, experts_implementation="libmoe")
    # or: model.set_experts_implementation("libmoe")

The "libmoe" experts implementation runs transformers' experts modules
(those decorated with `use_experts_implementation`) through
libmoe.torch.experts: weights read in place in either `is_transposed`
layout, concatenated or interleaved gate/up rows (stride-2 views, no copy),
with or without biases and gate, expert-parallel sentinel indices (>= the
local expert count, weight 0) dropped. The expert function is recognised by
what the module computes: its `_apply_gate` (or, with no gate, `act_fn`) is
probed on random values and matched against libmoe's members (SwiGLU,
clamped SwiGLU, gpt-oss gating, soft-capped SwiGLU, GeGLU, ReLU^2) under
the limits, alphas and softcaps the module or its config holds.
Configurations libmoe cannot run (an expert function it does not have, a
post-expert norm, a dtype other than f32/bf16) are handled by the
environment variable LIBMOE_HF:
    auto (default)  fall back to transformers' grouped_mm, logging the reason once
    1               raise with the reason
    0               always use transformers' grouped_mm

`patch_grouped_mm()` instead replaces transformers.integrations.moe._grouped_mm
(the hook some frameworks patch) with libmoe.torch.grouped_mm;
`unpatch_grouped_mm()` restores the original.
"""

from __future__ import annotations

import logging
import os
import weakref

import torch

from . import _lib
from . import torch as moe_torch

__all__ = ["register", "patch_grouped_mm", "unpatch_grouped_mm",
           "experts_forward", "unsupported_reason"]

NAME = "libmoe"
_log = logging.getLogger("libmoe.hf")
_logged: set = set()


_hf_moe = None


def _moe_module():
    """transformers.integrations.moe, imported once: the experts forward
    runs under torch.compile, where an import statement breaks the graph
    (transformers' lazy modules are not plain modules to dynamo)."""
    global _hf_moe
    if _hf_moe is None:
        import importlib
        _hf_moe = importlib.import_module("transformers.integrations.moe")
    return _hf_moe


def _mode() -> str:
    m = os.environ.get("LIBMOE_HF", "auto").strip().lower()
    if m not in ("auto", "0", "1"):
        raise ValueError(f"LIBMOE_HF={m!r}: expected auto, 1 or 0")
    return m


# ---- recognising the expert function ----------------------------------------
#
# The binding reads what a module computes, not what its class is called:
# the gate function (`_apply_gate`, the default or an override) or, without
# a gate, `act_fn` is run on random probe values on the CPU and compared
# with each libmoe member (float64 math) under the parameters the module
# or its config carries. Whatever matches none is declined with the reason.

_ACT_PARAM_WORDS = ("limit", "alpha", "cap")


def _param_candidates(module):
    """Float parameters the module, its act_fn's submodules and its config
    hold, by kind: limits, alphas, caps."""
    found = {w: set() for w in _ACT_PARAM_WORDS}
    objs = [module, getattr(module, "config", None)]
    act = getattr(module, "act_fn", None)
    if isinstance(act, torch.nn.Module):
        objs += [m for _, m in act.named_modules()]
    for o in objs:
        if o is None:
            continue
        for name, v in list(vars(o).items()):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            for w in _ACT_PARAM_WORDS:
                if w in name.lower():
                    found[w].add(float(v))
    found["alpha"].add(1.702)  # gpt-oss's published value
    return found


def _ref_member(name, g, u, alpha=0.0, limit=0.0, gcap=0.0, ucap=0.0):
    """libmoe's members in float64 (the definitions of include/moe.h)."""
    F = torch.nn.functional
    if name == "swiglu":
        return F.silu(g) * u
    if name == "swiglu_clamp":
        return F.silu(g.clamp(max=limit)) * u.clamp(-limit, limit)
    if name == "gpt_oss":
        g = g.clamp(max=limit)
        return g * torch.sigmoid(alpha * g) * (u.clamp(-limit, limit) + 1)
    if name == "softcap_swiglu":
        return (gcap * torch.tanh(g / gcap) * torch.sigmoid(g) * ucap *
                torch.tanh(u / ucap))
    if name == "geglu":
        return F.gelu(g, approximate="tanh") * u
    if name == "relu2":
        return F.relu(u).square()
    raise ValueError(name)


def _candidates(found, gate):
    if not gate:
        yield ("relu2", 0.0, 0.0, 0.0, 0.0)
        return
    yield ("swiglu", 0.0, 0.0, 0.0, 0.0)
    yield ("geglu", 0.0, 0.0, 0.0, 0.0)
    for lim in sorted(found["limit"]):
        if lim > 0:
            yield ("swiglu_clamp", 0.0, lim, 0.0, 0.0)
            for al in sorted(found["alpha"]):
                yield ("gpt_oss", al, lim, 0.0, 0.0)
    caps = sorted(c for c in found["cap"] if 0 < c < float("inf"))
    for gc in caps:
        for uc in caps:
            yield ("softcap_swiglu", 0.0, 0.0, gc, uc)


_PROBE_VALUES = 8192  # per probe; under torch's intra-op grain (32768)


def _probe(fn, width, scale):
    """fn on random f32 probe rows (CPU); returns (input, output) or None
    when fn cannot run on them. 4 to 64 rows, about _PROBE_VALUES values:
    every op of the probe and of the comparison stays under torch's
    parallel grain, so it runs on the calling thread (at a real model's
    width, 64 rows made each op an OpenMP region whose spinning threads cost
    the audit of a 48-layer model up to 3 s of CPU on 2 loaded cores)."""
    gen = torch.Generator().manual_seed(1234)
    rows = max(4, min(64, _PROBE_VALUES // max(width, 1)))
    x = torch.randn((rows, width), generator=gen) * scale
    x[0] = torch.linspace(-scale, scale, width)  # both tails, and near 0
    try:
        with torch.no_grad():
            y = fn(x)
    except Exception:  # noqa: BLE001 -- a probe failure is a decline
        return None
    if not isinstance(y, torch.Tensor):
        return None
    return x, y


def _matches(y, ref, mag):
    """Elementwise, within f32 rounding of the module's own arithmetic: its
    error grows with the operands (gelu(g) at large |g| cancels to ~1e-7 |g|
    absolute), so the bound is 1e-5 (1 + |g|)(1 + |u|) -- far below the
    differences between members (exact vs tanh GELU: ~1e-3 at |g| ~ 2)."""
    return (y.shape == ref.shape and
            bool(((y.double() - ref).abs() <= 1e-5 * mag).all()))


def _identify(module, gate, I):
    """(member, alpha, limit, gate_cap, up_cap, interleaved) the module
    computes, or a reason string."""
    found = _param_candidates(module)
    scale = 2.0 * max([3.0] + [v for w in ("limit", "cap") for v in found[w]
                               if v < float("inf")])
    if gate:
        width = 2 * max(int(I), 1)
        fn = getattr(module, "_apply_gate", None)
        if fn is None:  # transformers without _apply_gate: the default one
            def fn(x):
                g, u = x.chunk(2, dim=-1)
                return module.act_fn(g) * u
        pr = _probe(fn, width, scale)
        what = f"{type(module).__name__}._apply_gate"
    else:
        width = max(int(I), 1)
        pr = _probe(getattr(module, "act_fn", None), width, scale)
        what = ("the no-gate activation "
                f"{type(getattr(module, 'act_fn', None)).__name__}")
    if pr is None:
        return f"{what} could not be probed on CPU float32 values"
    x, y = pr
    xd = x.double()
    layouts = (False, True) if gate else (False,)  # both row orders
    for interleaved in layouts:
        if gate:
            g, u = ((xd[:, 0::2], xd[:, 1::2]) if interleaved
                    else xd.chunk(2, dim=-1))
        else:
            g, u = None, xd
        mag = (1 + u.abs()) * (1 + (g.abs() if g is not None else u.abs()))
        for cand in _candidates(found, gate):
            if _matches(y, _ref_member(cand[0], g, u, *cand[1:]), mag):
                return cand + (interleaved,)
    return (f"{what} matches none of libmoe's expert functions (SwiGLU, "
            "clamped SwiGLU, gpt-oss gating, soft-capped SwiGLU, GeGLU, "
            "ReLU^2 without gate) on probe values")


_specs = weakref.WeakKeyDictionary()     # module -> (key, spec)
_modules_by_id = weakref.WeakValueDictionary()  # id(module) -> module


def _spec(module):
    """What libmoe runs for this module: (None, member, alpha, limit,
    gate_cap, up_cap, interleaved) or (reason,). Computed once per module
    and act_fn, always outside any graph, so that under torch.compile the
    traced code only reads a constant.

    Eagerly this is _spec_of(module). Under dynamo the probe cannot be
    traced (it runs the gate function on random values and compares on the
    host), so it is evaluated at trace time through
    torch._dynamo.assume_constant_result. That decorator's arguments must be
    Python constants: torch 2.15's dynamo accepts an nn.Module argument
    (guarding its identity), torch 2.11's refuses it
    (AsPythonConstantNotImplementedError). Both trace id(module) to a
    constant with an ID_MATCH guard on the module, so the traced call passes
    the id and _traced_spec resolves it back to the live module."""
    if torch.compiler.is_compiling():
        return _traced_spec(id(module))
    _modules_by_id[id(module)] = module
    return _spec_of(module)


@torch._dynamo.assume_constant_result
def _traced_spec(module_id):
    """_spec of the module whose id dynamo traced; runs at trace time, never
    in the graph. The module is the one being traced, so it is alive: it is
    in _modules_by_id if the binding saw it eagerly, else it is found once
    among the objects the garbage collector tracks (a compiled first call)."""
    m = _modules_by_id.get(module_id)
    if m is None:
        m = _find_experts_module(module_id)
    if m is None:  # not expected: the id is of a module being traced
        return ("the experts module could not be found at torch.compile "
                "trace time; run the model once eagerly first",)
    return _spec_of(m)


def _find_experts_module(module_id):
    """The live nn.Module with this id, recording every experts-shaped
    module met on the way (one scan serves a whole model's layers)."""
    import gc
    found = None
    for o in gc.get_objects():
        if not issubclass(type(o), torch.nn.Module):
            continue
        d = vars(o)  # no getattr: nothing of the object's own code runs
        if not any("down_proj" in c for c in
                   (d, d.get("_parameters", {}), d.get("_buffers", {}))):
            continue
        _modules_by_id[id(o)] = o
        if id(o) == module_id:
            found = o
    return found


def _spec_of(module):
    key = (id(getattr(module, "act_fn", None)),
           getattr(type(module), "_apply_gate", None),
           bool(getattr(module, "has_gate", True)),
           bool(getattr(module, "is_concatenated", True)))
    hit = _specs.get(module)
    if hit is not None and hit[0] == key:
        return hit[1]
    gate = bool(getattr(module, "has_gate", True))
    dn = getattr(module, "down_proj", None)
    if not isinstance(dn, torch.Tensor) or dn.dim() != 3:
        res = ("down_proj is not a 3-D expert weight",)
    else:
        I = dn.shape[1] if getattr(module, "is_transposed", False) \
            else dn.shape[2]
        r = _identify(module, gate, I)
        res = (r,) if isinstance(r, str) else (None,) + r
    _specs[module] = (key, res)
    return res


def _weights(module):
    """gate_up (or up) and down as logical [E, out, in] views, and the
    biases (None when absent)."""
    gate = getattr(module, "has_gate", True)
    gu = module.gate_up_proj if gate else module.up_proj
    dn = module.down_proj
    if module.is_transposed:  # [E, H, 2I] / [E, I, H] storage: logical views
        gu, dn = gu.transpose(1, 2), dn.transpose(1, 2)
    bgu = bdn = None
    if getattr(module, "has_bias", False):
        bgu = getattr(module, "gate_up_proj_bias" if gate else "up_proj_bias",
                      None)
        bdn = getattr(module, "down_proj_bias", None)
    return gu, dn, bgu, bdn


def unsupported_reason(module, hidden_states=None) -> str | None:
    """Why libmoe cannot run this experts module (None: it can)."""
    if getattr(module, "has_post_expert_norm", False):
        return "the experts have a post-expert norm"
    gate = getattr(module, "has_gate", True)
    for n in ("gate_up_proj" if gate else "up_proj", "down_proj"):
        w = getattr(module, n, None)
        if not isinstance(w, torch.Tensor) or w.dim() != 3:
            return f"{n} is not a 3-D expert weight"
    if getattr(module, "has_bias", False):
        for n in ("gate_up_proj_bias" if gate else "up_proj_bias",
                  "down_proj_bias"):
            b = getattr(module, n, None)
            if not isinstance(b, torch.Tensor) or b.dim() != 2:
                return f"has_bias is set but {n} is not a 2-D expert bias"
    spec = _spec(module)
    if spec[0] is not None:
        return spec[0]
    w = module.gate_up_proj if gate else module.up_proj
    if w.dtype not in (torch.float32, torch.bfloat16):
        return f"weights are {w.dtype}; libmoe runs float32 and bfloat16"
    if w.device.type not in ("cpu", "cuda"):
        return f"weights are on {w.device.type}"
    if w.device.type == "cuda":
        if not _lib.HAS_CUDA:
            return "this libmoe build has no CUDA backend"
    return None


def experts_forward(self, hidden_states: torch.Tensor,
                    top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """The "libmoe" entry of transformers' ExpertsInterface."""
    mode = _mode()
    reason = None if mode == "0" else unsupported_reason(self, hidden_states)
    if mode == "0" or reason is not None:
        if reason is not None:
            if mode == "1":
                raise NotImplementedError(
                    f"libmoe experts implementation: {reason} (LIBMOE_HF=1)")
            if reason not in _logged:
                _logged.add(reason)
                _log.warning("libmoe: %s; falling back to transformers' "
                             "grouped_mm (LIBMOE_HF=auto)", reason)
        return _moe_module().grouped_mm_experts_forward(
            self, hidden_states, top_k_index, top_k_weights)
    _, act, alpha, limit, gcap, ucap, interleaved = _spec(self)
    gu, dn, bgu, bdn = _weights(self)
    x = hidden_states
    if x.dtype != gu.dtype:  # autocast may hand f32 activations
        x = x.to(gu.dtype)
    w = top_k_weights
    if w.dtype not in (torch.float32, gu.dtype):
        w = w.to(torch.float32)
    out = moe_torch.experts(x, top_k_index, w, gu, dn, invalid_topk="drop",
                            activation=act, alpha=alpha, limit=limit,
                            gate_cap=gcap, up_cap=ucap, gate_up_bias=bgu,
                            down_bias=bdn, interleaved=interleaved)
    return out.to(hidden_states.dtype)


def register() -> None:
    """Registers "libmoe" in transformers' ExpertsInterface (idempotent)."""
    hf_moe = _moe_module()
    iface = hf_moe.ExpertsInterface
    cur = iface._global_mapping.get(NAME)
    if cur is experts_forward:
        return
    iface.register(NAME, experts_forward)


_original_grouped_mm = None


def _patched_grouped_mm(input: torch.Tensor, weight: torch.Tensor,
                        offs: torch.Tensor) -> torch.Tensor:
    if input.dtype != weight.dtype:
        input = input.to(weight.dtype)
    return moe_torch.grouped_mm(input, weight, offs)


def patch_grouped_mm() -> None:
    """transformers.integrations.moe._grouped_mm := libmoe.torch.grouped_mm
    (copy-free for `weight.transpose(-2, -1)`, with and without EP).
    Idempotent; undo with unpatch_grouped_mm()."""
    global _original_grouped_mm
    hf_moe = _moe_module()
    if hf_moe._grouped_mm is _patched_grouped_mm:
        return
    _original_grouped_mm = hf_moe._grouped_mm
    hf_moe._grouped_mm = _patched_grouped_mm


def unpatch_grouped_mm() -> None:
    """Restores the _grouped_mm that patch_grouped_mm() replaced."""
    global _original_grouped_mm
    hf_moe = _moe_module()
    if hf_moe._grouped_mm is _patched_grouped_mm and \
            _original_grouped_mm is not None:
        hf_moe._grouped_mm = _original_grouped_mm
    _original_grouped_mm = None


def audit(model, batch=None, **kwargs):
    """Audits the model's expert layers (libmoe.audit.audit): per layer the
    experts class, the implementation in effect or the fallback and why,
    weight layouts and strides, whether a forward + backward copies a
    weight-sized tensor, libmoe's plan, and with `batch` the measured time
    against transformers' grouped_mm. Returns an AuditReport (print it,
    .to_json(), .plot(FILE)). Works on a meta-device model (no weights)."""
    from .audit import audit as _audit
    return _audit(model, batch, **kwargs)
