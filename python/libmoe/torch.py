"""libmoe's expert layer and grouped GEMM as PyTorch operators.

Both are `torch.library.custom_op`s with fake (meta) implementations and
autograd, so they work under torch.compile(fullgraph=True) and
torch.library.opcheck. Weights are read in place through their strides
(any [E, out, in] view: contiguous, a transposed view of [E, in, out]
storage, ...), and every gradient comes back in the strides of the tensor it
belongs to, so autograd's gradient accumulation never copies a weight.
CUDA work runs on torch.cuda.current_stream(); scratch and the saved
activations are torch tensors from PyTorch's caching allocator.
"""

from __future__ import annotations

import ctypes
import threading

import torch

from . import _lib as L

__all__ = ["experts", "grouped_mm", "plan_explain"]

_INVALID = L.INVALID_TOPK
# expert functions (moe_activation) by name
ACTIVATIONS = {"swiglu": L.MOE_ACT_SWIGLU, "swiglu_clamp": L.MOE_ACT_SWIGLU_CLAMP,
               "gpt_oss": L.MOE_ACT_GPT_OSS,
               "softcap_swiglu": L.MOE_ACT_SOFTCAP_SWIGLU,
               "geglu": L.MOE_ACT_GEGLU, "relu2": L.MOE_ACT_RELU2}
_NO_GATE = (L.MOE_ACT_RELU2,)

# ---- plans ------------------------------------------------------------------


class _Plan:
    """One C plan, made for up to `capacity` tokens; it serves any T up to
    that, with the saved and per-pass workspace sizes of the actual T."""

    def __init__(self, desc: L.moe_layer_desc):
        self.handle = ctypes.c_void_p()
        L.check(L.lib.moe_layer_plan_create(ctypes.byref(self.handle),
                                            ctypes.byref(desc)),
                "moe_layer_plan_create")
        self.desc = desc
        self.capacity = int(desc.max_tokens)
        self._sizes: dict = {}

    def sizes(self, tokens: int) -> L.moe_layer_sizes:
        """moe_layer_plan_pass_sizes(tokens): saved, fwd_workspace,
        bwd_workspace, infer_workspace (cached per token count)."""
        s = self._sizes.get(tokens)
        if s is None:
            s = L.moe_layer_sizes()
            L.check(L.lib.moe_layer_plan_pass_sizes(self.handle, int(tokens),
                                                    ctypes.byref(s)),
                    "moe_layer_plan_pass_sizes")
            if len(self._sizes) >= 256:
                self._sizes.clear()
            self._sizes[tokens] = s
        return s

    def explain(self) -> str:
        return L.lib.moe_layer_plan_explain(self.handle).decode()

    def __del__(self):
        h = getattr(self, "handle", None)
        if h and L is not None and L.lib is not None:
            L.lib.moe_layer_plan_destroy(h)


# Workspace tensors sized at the plan's capacity instead of the call's T:
# every call of a plan then asks the caching allocator for the same sizes,
# at the price of up to 2x the workspace (the plans' capacities double). Off
# by default: issue 16's variable-token bench (bench/gpu/variable_tokens.py
# --ws-capacity) measures whether a trainer whose T changes every step needs
# it; see bench/NOTES.md.
workspace_at_capacity = False

# True: the backward writes its dH over the forward's saved pre-activation
# (desc.backward_overwrites_saved), so it holds no [T*k, 2I] buffer of its
# own (issue 16's activation memory), and then bumps the saved tensor's
# version: a second backward through the same graph (retain_graph=True)
# fails with autograd's in-place error instead of reading overwritten
# bytes (a compiled graph refuses retain_graph anyway: its saved buffers
# are donated). Gradients are bitwise the same either way. The default
# since the sixth round, when the CUDA tests of that path passed on a GPU
# (bench/NOTES.md). False: the backward leaves `saved` intact, at the cost
# of that buffer (for retain_graph, torch.autograd.gradcheck). Read when
# each forward runs (under torch.compile, when it is traced).
overwrite_saved = True

# How the layer trades memory for speed (desc.memory): "balanced" (the
# default: the CUDA layer's hidden-column passes where its model prices them
# under 2% of the layer's time), "lean" (the smallest peak it can reach:
# passes of 256 columns, at one re-read of the product's input per extra
# pass) or "fast" (one pass). The CPU layer has nothing to trade and runs
# the same under each; no policy changes a result bit on the sm_90a path.
# Read at every call (a plan per policy).
memory = "balanced"
_MEMORY = L.MEMORY_POLICIES

# key -> its one plan (capacity grown geometrically: _plan_for)
_plans: dict = {}
_plans_lock = threading.Lock()
_MAX_PLANS = 64
_plans_made = 0  # plans made so far (bench/gpu/variable_tokens.py reads it)
# The smallest capacity a plan is made for; beyond it, the next power of two.
_MIN_CAPACITY = 256


def _capacity_for(tokens: int) -> int:
    c = _MIN_CAPACITY
    while c < tokens:
        c *= 2
    return c


def _plan_for(hidden_shape, k, gu, dn, dtype, device, invalid,
              act=(L.MOE_ACT_SWIGLU, 0.0, 0.0, 0.0, 0.0),
              interleaved=False, overwrite=False) -> _Plan:
    """The plan for (shapes, dtype, layouts, device, policy, activation,
    overwrite, `memory`), whatever the token count: the key's one plan when
    its capacity holds T, else a new one for the next power of two >= T and
    at least twice the old capacity (at least _MIN_CAPACITY), which takes
    the old one's place. A trainer whose T varies step to step makes
    O(log T) plans over a run and holds one per key. A backward may get a
    larger plan than its forward had (another forward grew the key in
    between, as pipelined micro-batches do): both layers lay the saved
    state out by T alone, so any plan of the key with capacity >= T reads
    it. `overwrite`: the plan's desc.backward_overwrites_saved (the forward
    asks with the value its backward will use, so that both take one
    key)."""
    global _plans_made
    T, H = int(hidden_shape[0]), int(hidden_shape[1])
    E, I2 = int(gu.shape[0]), 2 * int(dn.shape[2])
    dev = L.device_of(device)
    if memory not in _MEMORY:
        raise ValueError("libmoe.torch.memory = %r: expected one of %s"
                         % (memory, ", ".join(map(repr, _MEMORY))))
    key = (H, E, I2, int(k), dtype, L.layout_of(gu), L.layout_of(dn),
           dev.type, dev.index, invalid, tuple(act), bool(interleaved),
           bool(overwrite), _MEMORY[memory])
    with _plans_lock:
        old = _plans.get(key)
        if old is not None and old.capacity >= T:
            return old
        d = L.moe_layer_desc()
        d.struct_size = ctypes.sizeof(L.moe_layer_desc)
        d.magic, d.version = L.MOE_LAYER_DESC_MAGIC, L.MOE_LAYER_DESC_VERSION
        d.num_experts, d.hidden, d.intermediate = E, H, I2 // 2
        d.top_k = int(k)
        d.max_tokens = _capacity_for(max(T, 2 * old.capacity if old else 0))
        d.norm_topk_prob = 0  # the caller's weights are used as given
        d.dtype = L.dtype_of(dtype)
        d.gate_up_layout, d.down_layout = key[5], key[6]
        d.method = L.MOE_GMM_AUTO
        d.device = dev
        d.invalid_topk = invalid
        d.activation = int(act[0])
        d.act_alpha, d.act_limit, d.act_gate_cap, d.act_up_cap = (
            float(v) for v in act[1:])
        d.gate_up_interleaved = int(bool(interleaved))
        d.backward_overwrites_saved = int(bool(overwrite))
        d.memory = key[13]
        p = _Plan(d)
        _plans_made += 1
        if old is None and len(_plans) >= _MAX_PLANS:
            _plans.pop(next(iter(_plans)))
        _plans[key] = p  # the old plan lives on while a caller holds it
        return p


def _check_experts(hidden, idx, w, gu, dn, gate=True, bgu=None, bdn=None):
    if hidden.dim() != 2 or idx.dim() != 2 or w.shape != idx.shape:
        raise ValueError(
            "libmoe.experts: hidden_states [T, H], top_k_index [T, k] and "
            f"top_k_weights [T, k] expected; got {tuple(hidden.shape)}, "
            f"{tuple(idx.shape)}, {tuple(w.shape)}")
    if gu.dim() != 3 or dn.dim() != 3:
        raise ValueError("libmoe.experts: gate_up_proj [E, 2I, H] and "
                         "down_proj [E, H, I] expected")
    E, I2, H = gu.shape
    f = 2 if gate else 1
    if (H != hidden.shape[1] or I2 % f or dn.shape[0] != E or dn.shape[1] != H
            or dn.shape[2] != I2 // f):
        raise ValueError(
            f"libmoe.experts: hidden_states {tuple(hidden.shape)}, "
            f"gate_up_proj {tuple(gu.shape)} and down_proj {tuple(dn.shape)} "
            "do not fit [T, H], "
            f"{'[E, 2I, H]' if gate else '[E, I, H] (no gate)'}, [E, H, I]")
    if not (hidden.dtype == gu.dtype == dn.dtype):
        raise TypeError("libmoe.experts: hidden_states and both weights must "
                        f"share a dtype; got {hidden.dtype}, {gu.dtype}, "
                        f"{dn.dtype}")
    if bgu is not None and tuple(bgu.shape) != (E, I2):
        raise ValueError(f"libmoe.experts: gate_up_bias {tuple(bgu.shape)}, "
                         f"expected {(E, I2)}")
    if bdn is not None and tuple(bdn.shape) != (E, H):
        raise ValueError(f"libmoe.experts: down_bias {tuple(bdn.shape)}, "
                         f"expected {(E, H)}")


def _gate_up_views(args, gu, bgu, interleaved, gate, grad=False):
    """Sets the gate/up weight and bias of a (grad_) argument struct. Always
    the one fused tensor: interleaved rows (gate = 0::2, up = 1::2) are the
    plan's desc.gate_up_interleaved, so the projection stays one product in
    the weight's own layout (the sm90 kernel takes gpt-oss's [E, H, 2I]
    storage this way; two stride-2 views of it would have no unit stride)
    and the gradient lands in the one tensor."""
    pre = "grad_" if grad else ""
    setattr(args, pre + "w_gate_up", L.view(gu))
    if bgu is not None:
        setattr(args, pre + "b_gate_up", L.view(bgu))


def _like(t: torch.Tensor, dtype=None) -> torch.Tensor:
    """An uninitialised tensor with t's shape and strides, so a gradient
    comes back in its tensor's own layout (a parameter's gradient is then
    taken by AccumulateGrad without a copy). A gapped view (e.g. every 2nd
    column) gets the same strides over a buffer of the view's extent; only
    an overlapping view (a zero stride) gets a contiguous tensor."""
    dtype = dtype or t.dtype
    if t.is_contiguous() or any(st == 0 and sz > 1
                                for st, sz in zip(t.stride(), t.shape)):
        return torch.empty(t.shape, dtype=dtype, device=t.device)
    return torch.empty_strided(t.shape, t.stride(), dtype=dtype,
                               device=t.device)


# ---- experts: forward ---------------------------------------------------------


def _act_of(act: int, params):
    p = list(params or ()) + [0.0] * (4 - len(params or ()))
    return (int(act), p[0], p[1], p[2], p[3])


# the trailing arguments have defaults, so calls written before they existed
# (the first six arguments) keep working
_EXTRA = ("Tensor? gate_up_bias=None, Tensor? down_bias=None, int act=0, "
          "float[]? act_params=None, bool interleaved=False")


@torch.library.custom_op(
    "libmoe::experts_fwd", mutates_args=(),
    schema="(Tensor hidden, Tensor top_k_index, Tensor top_k_weights, "
    "Tensor gate_up_proj, Tensor down_proj, int invalid, " + _EXTRA +
    ") -> (Tensor, Tensor)")
def _experts_fwd(hidden: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor, gate_up_proj: torch.Tensor,
                 down_proj: torch.Tensor, invalid: int,
                 gate_up_bias: torch.Tensor | None = None,
                 down_bias: torch.Tensor | None = None, act: int = 0,
                 act_params: list[float] | None = None,
                 interleaved: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    gate = act not in _NO_GATE
    _check_experts(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj,
                   gate, gate_up_bias, down_bias)
    T, H = hidden.shape
    dev = hidden.device
    p = _plan_for(hidden.shape, top_k_index.shape[1], gate_up_proj, down_proj,
                  hidden.dtype, dev, invalid, _act_of(act, act_params),
                  interleaved and gate, overwrite_saved)
    out = torch.empty((T, H), dtype=hidden.dtype, device=dev)
    sz = p.sizes(T)
    # `saved` is an op output, so every byte must be defined
    # (torch.library.opcheck compares outputs byte for byte). Both layers
    # write every byte of it (tests/test_layer.c on the CPU,
    # tests/gpu/test_cuda.c's test_saved_bytes on CUDA): no memset.
    saved = torch.empty((sz.saved,), dtype=torch.uint8, device=dev)
    wsz = p.sizes(p.capacity) if workspace_at_capacity else sz
    ws = torch.empty((wsz.fwd_workspace,), dtype=torch.uint8, device=dev)
    a = L.moe_layer_fwd_args()
    a.hidden = L.view(hidden)
    a.topk_index = L.view(top_k_index)
    a.topk_weights = L.view(top_k_weights)
    _gate_up_views(a, gate_up_proj, gate_up_bias, interleaved, gate)
    a.w_down = L.view(down_proj)
    a.b_down = L.view(down_bias)
    a.output = L.view(out)
    L.check(L.lib.moe_layer_forward(p.handle, ctypes.byref(a),
                                    saved.data_ptr() if sz.saved else None,
                                    sz.saved,
                                    ws.data_ptr() if wsz.fwd_workspace else None,
                                    wsz.fwd_workspace, L.stream_of(dev)),
            "moe_layer_forward")
    return out, saved


@_experts_fwd.register_fake
def _(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, invalid,
      gate_up_bias=None, down_bias=None, act=0, act_params=None,
      interleaved=False):
    gate = act not in _NO_GATE
    _check_experts(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj,
                   gate, gate_up_bias, down_bias)
    p = _plan_for(hidden.shape, top_k_index.shape[1], gate_up_proj, down_proj,
                  hidden.dtype, hidden.device, invalid,
                  _act_of(act, act_params), interleaved and gate,
                  overwrite_saved)
    out = hidden.new_empty(hidden.shape, dtype=hidden.dtype).contiguous()
    saved_bytes = p.sizes(int(hidden.shape[0])).saved
    return out, hidden.new_empty((saved_bytes,), dtype=torch.uint8)


# ---- experts: backward --------------------------------------------------------


def _no_grad_like(t: torch.Tensor | None, ref: torch.Tensor) -> torch.Tensor:
    """The bias gradient's buffer, or an empty stand-in (custom ops return
    tensors, never None) when there is no bias."""
    return _like(t) if t is not None else ref.new_empty((0,))


@torch.library.custom_op(
    "libmoe::experts_bwd", mutates_args=(),
    schema="(Tensor grad_out, Tensor hidden, Tensor top_k_index, "
    "Tensor top_k_weights, Tensor gate_up_proj, Tensor down_proj, "
    "Tensor saved, int invalid, " + _EXTRA + ", bool overwrite=False) -> "
    "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
def _experts_bwd(grad_out: torch.Tensor, hidden: torch.Tensor,
                 top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                 saved: torch.Tensor, invalid: int,
                 gate_up_bias: torch.Tensor | None = None,
                 down_bias: torch.Tensor | None = None, act: int = 0,
                 act_params: list[float] | None = None,
                 interleaved: bool = False, overwrite: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                            torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward. With `overwrite` its plan has
    desc.backward_overwrites_saved: the layer may write dH over the
    pre-activation in `saved`, which is undefined afterwards, and the op
    bumps the saved tensor's version counter. The schema does not declare
    that write: `saved` is a forward output, and AOTAutograd's partitioner
    refuses a backward that mutates one; nothing but this op reads it."""
    dev = hidden.device
    gate = act not in _NO_GATE
    p = _plan_for(hidden.shape, top_k_index.shape[1], gate_up_proj, down_proj,
                  hidden.dtype, dev, invalid, _act_of(act, act_params),
                  interleaved and gate, overwrite)
    g_hidden = _like(hidden)
    g_w = _like(top_k_weights)
    g_gu = _like(gate_up_proj)
    g_dn = _like(down_proj)
    g_bgu = _no_grad_like(gate_up_bias, hidden)
    g_bdn = _no_grad_like(down_bias, hidden)
    sz = p.sizes(int(hidden.shape[0]))
    wsz = p.sizes(p.capacity) if workspace_at_capacity else sz
    ws = torch.empty((wsz.bwd_workspace,), dtype=torch.uint8, device=dev)
    if grad_out.dtype != hidden.dtype:
        grad_out = grad_out.to(hidden.dtype)
    b = L.moe_layer_bwd_args()
    b.fwd.hidden = L.view(hidden)
    b.fwd.topk_index = L.view(top_k_index)
    b.fwd.topk_weights = L.view(top_k_weights)
    _gate_up_views(b.fwd, gate_up_proj, gate_up_bias, interleaved, gate)
    b.fwd.w_down = L.view(down_proj)
    b.fwd.b_down = L.view(down_bias)
    b.grad_output = L.view(grad_out)
    b.grad_hidden = L.view(g_hidden)
    b.grad_topk_weights = L.view(g_w)
    _gate_up_views(b, g_gu, g_bgu if gate_up_bias is not None else None,
                   interleaved, gate, grad=True)
    b.grad_w_down = L.view(g_dn)
    if down_bias is not None:
        b.grad_b_down = L.view(g_bdn)
    L.check(L.lib.moe_layer_backward(p.handle, ctypes.byref(b),
                                     saved.data_ptr() if sz.saved else None,
                                     sz.saved,
                                     ws.data_ptr() if wsz.bwd_workspace else None,
                                     wsz.bwd_workspace, L.stream_of(dev)),
            "moe_layer_backward")
    if overwrite:
        # `saved` now holds dH: a second backward through the graph
        # (retain_graph=True) must fail with autograd's in-place error, not
        # read dH as H. Bumped here, where the op runs, so that a compiled
        # backward bumps it too (a bump in the autograd formula would only
        # reach the tensor AOTAutograd traces).
        torch.autograd.graph.increment_version(saved)
    return g_hidden, g_w, g_gu, g_dn, g_bgu, g_bdn


@_experts_bwd.register_fake
def _(grad_out, hidden, top_k_index, top_k_weights, gate_up_proj, down_proj,
      saved, invalid, gate_up_bias=None, down_bias=None, act=0,
      act_params=None, interleaved=False, overwrite=False):
    return (_like(hidden), _like(top_k_weights), _like(gate_up_proj),
            _like(down_proj), _no_grad_like(gate_up_bias, hidden),
            _no_grad_like(down_bias, hidden))


def _experts_setup(ctx, inputs, output):
    (hidden, idx, w, gu, dn, invalid, bgu, bdn, act, act_params,
     interleaved) = inputs
    ctx.invalid, ctx.act, ctx.act_params = invalid, act, act_params
    ctx.interleaved = interleaved
    ctx.overwrite = overwrite_saved  # the forward's plan was made with it
    ctx.has_bgu, ctx.has_bdn = bgu is not None, bdn is not None
    ctx.save_for_backward(hidden, idx, w, gu, dn, output[1], bgu, bdn)


def _experts_backward(ctx, grad_out, _grad_saved):
    hidden, idx, w, gu, dn, saved, bgu, bdn = ctx.saved_tensors
    gh, gw, ggu, gdn, gbgu, gbdn = torch.ops.libmoe.experts_bwd(
        grad_out, hidden, idx, w, gu, dn, saved, ctx.invalid, bgu, bdn,
        ctx.act, ctx.act_params, ctx.interleaved, ctx.overwrite)
    return (gh, None, gw, ggu, gdn, None,
            gbgu if ctx.has_bgu else None, gbdn if ctx.has_bdn else None,
            None, None, None)


_experts_fwd.register_autograd(_experts_backward, setup_context=_experts_setup)


def experts(hidden_states: torch.Tensor, top_k_index: torch.Tensor,
            top_k_weights: torch.Tensor, gate_up_proj: torch.Tensor,
            down_proj: torch.Tensor, *, invalid_topk: str = "error",
            activation: str = "swiglu", alpha: float = 0.0,
            limit: float = 0.0, gate_cap: float = 0.0, up_cap: float = 0.0,
            gate_up_bias: torch.Tensor | None = None,
            down_bias: torch.Tensor | None = None,
            interleaved: bool = False) -> torch.Tensor:
    """The whole expert layer as one differentiable op:
    out[t] = sum_j w[t, j] * (down[e] . act(gate_up[e] . x[t] + bgu[e])
    + bd[e]) with e = top_k_index[t, j].

    hidden_states [T, H]; top_k_index [T, k] int32/int64; top_k_weights
    [T, k] (f32 or the layer dtype, used as given); gate_up_proj [E, 2I, H]
    (gate rows first, or with `interleaved` gate rows 0::2 and up rows 1::2,
    as gpt-oss stores them) and down_proj [E, H, I] as any strided views,
    e.g. `w.transpose(1, 2)` of [E, H, 2I] storage. f32 or bf16.
    activation: "swiglu" (silu(g) u), "swiglu_clamp" (`limit`), "gpt_oss"
    (`alpha`, `limit`), "softcap_swiglu" (`gate_cap`, `up_cap`), "geglu"
    (gelu_tanh(g) u) or "relu2" (relu(u)^2, no gate: gate_up_proj is then
    the [E, I, H] up projection). gate_up_bias [E, 2I] (in the weight's row
    order) and down_bias [E, H] are optional.
    invalid_topk: "error" (an index outside [0, E) raises) or "drop" (such
    slots, e.g. expert-parallel sentinels, contribute nothing and get zero
    gradient). Gradients flow to hidden_states, top_k_weights, both
    weights and both biases, each in the strides of its tensor."""
    if invalid_topk not in _INVALID:
        raise ValueError(f"invalid_topk={invalid_topk!r}: 'error' or 'drop'")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r}: one of "
                         f"{', '.join(ACTIVATIONS)}")
    out, _ = torch.ops.libmoe.experts_fwd(
        hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj,
        _INVALID[invalid_topk], gate_up_bias, down_bias,
        ACTIVATIONS[activation],
        [float(alpha), float(limit), float(gate_cap), float(up_cap)],
        bool(interleaved))
    return out


def plan_explain(hidden_states, top_k_index, gate_up_proj, down_proj,
                 invalid_topk: str = "error") -> str:
    """The planner's choice and reasons for experts() on these tensors
    (the plan experts() takes: overwrite_saved as it is now)."""
    return _plan_for(hidden_states.shape, top_k_index.shape[1], gate_up_proj,
                     down_proj, hidden_states.dtype, hidden_states.device,
                     _INVALID[invalid_topk], overwrite=overwrite_saved
                     ).explain()


# ---- grouped_mm ------------------------------------------------------------
#
# torch._grouped_mm's whole contract on libmoe's three grouped GEMM calls
# (moe_grouped_gemm: y[r] = x[r] . w[e]^T, rows grouped; _dx: dx[r] =
# dy[r] . w[e]; _dw: dw[e] = dy_e^T . x_e, depth grouped). Every variant and
# its gradients is one of them on strided views of the operands, so nothing
# is copied; see _gmm_forward / _gmm_backward_impl for the mapping.

import logging as _logging  # noqa: E402  (this section's own imports)

_gmm_log = _logging.getLogger("libmoe.torch")
_gmm_logged: set = set()
# torch's own operator, captured before patch_grouped_mm() can replace it:
# what a declined call runs.
_torch_grouped_mm = getattr(torch, "_grouped_mm", None)
# dtypes the C grouped GEMM runs, per backend (gemm/problem.c; f16 on the
# CPU's grouped kernel and CUDA's CUDA-core kernel); others are declined.
_GMM_DTYPES = {"cpu": (torch.float32, torch.bfloat16, torch.float16),
               "cuda": (torch.float32, torch.bfloat16, torch.float16)}


def _gmm_kind(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"{a.dim()}d{b.dim()}d"


def _check_gmm(a, b, offs):
    """torch._grouped_mm's shape rules (aten GroupedMMUtils.h, the meta
    function): raises ValueError / TypeError naming the argument."""
    if a.dim() not in (2, 3) or b.dim() not in (2, 3):
        raise ValueError("libmoe.grouped_mm: mat_a and mat_b must be 2-D or "
                         f"3-D; got {a.dim()}-D and {b.dim()}-D")
    kind = _gmm_kind(a, b)
    if kind == "3d3d":
        if offs is not None:
            raise ValueError("libmoe.grouped_mm: offs must be None for 3-D x "
                             "3-D (batched) operands")
        if a.shape[0] != b.shape[0]:
            raise ValueError("libmoe.grouped_mm: batch sizes differ: mat_a "
                             f"{tuple(a.shape)}, mat_b {tuple(b.shape)}")
    else:
        if offs is None:
            raise ValueError(f"libmoe.grouped_mm: {a.dim()}-D x {b.dim()}-D "
                             "operands need offs")
        if offs.dim() != 1 or offs.dtype != torch.int32:
            raise TypeError("libmoe.grouped_mm: offs must be a 1-D int32 "
                            f"tensor; got {offs.dim()}-D {offs.dtype}")
        if offs.device != a.device:
            raise ValueError(f"libmoe.grouped_mm: offs is on {offs.device}, "
                             f"mat_a on {a.device}")
        if kind == "2d3d" and offs.shape[0] != b.shape[0]:
            raise ValueError(f"libmoe.grouped_mm: offs has {offs.shape[0]} "
                             f"groups, mat_b {b.shape[0]}")
        if kind == "3d2d" and offs.shape[0] != a.shape[0]:
            raise ValueError(f"libmoe.grouped_mm: offs has {offs.shape[0]} "
                             f"groups, mat_a {a.shape[0]}")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError("libmoe.grouped_mm: contraction dimensions differ: "
                         f"mat_a {tuple(a.shape)}, mat_b {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError("libmoe.grouped_mm: mat_a and mat_b dtypes differ "
                        f"({a.dtype}, {b.dtype})")
    if a.device != b.device:
        raise ValueError(f"libmoe.grouped_mm: mat_a is on {a.device}, mat_b "
                         f"on {b.device}")


def _gmm_out_shape(a, b, offs):
    kind = _gmm_kind(a, b)
    if kind == "2d2d":  # [G, M, N]: one product per slice of the shared K
        return (offs.shape[0], a.shape[0], b.shape[1])
    if kind == "2d3d":  # [M_total, N]: rows grouped
        return (a.shape[0], b.shape[2])
    if kind == "3d2d":  # [M, N_total]: columns of mat_b grouped
        return (a.shape[1], b.shape[1])
    return (a.shape[0], a.shape[1], b.shape[2])  # batched


def _offsets64(offs: torch.Tensor) -> torch.Tensor:
    """torch's int32 cumulative ends [G] -> libmoe's int64 offsets [G+1]."""
    o = torch.zeros((offs.shape[0] + 1,), dtype=torch.int64, device=offs.device)
    o[1:] = offs
    return o


def _opts(dev: torch.device) -> L.moe_exec_options:
    o = L.moe_exec_options()
    o.method = L.MOE_GMM_AUTO
    o.stream = L.stream_of(dev)
    return o


def _gmm_fn(name: str, dev: torch.device):
    if dev.type == "cuda":
        if not L.HAS_CUDA:
            raise RuntimeError("libmoe was built without the CUDA backend")
        return getattr(L.lib, "moe_cuda_" + name[4:])
    return getattr(L.lib, name)


def _gg(name: str, a, b, o64, c) -> None:
    """One grouped GEMM call (moe_grouped_gemm, _dx or _dw) on views."""
    dev = a.device
    va, vb, vo, vc = L.view(a), L.view(b), L.view(o64), L.view(c)
    opt = _opts(dev)
    L.check(_gmm_fn(name, dev)(ctypes.byref(va), ctypes.byref(vb),
                               ctypes.byref(vo), ctypes.byref(vc),
                               ctypes.byref(opt)), name)


def _fwd(x, w, o, y):  # y[r] = x[r] . w[e]^T   x [R, K], w [E, N, K]
    _gg("moe_grouped_gemm", x, w, o, y)


def _dx(dy, w, o, dx):  # dx[r] = dy[r] . w[e]   dy [R, N], w [E, N, K]
    _gg("moe_grouped_gemm_dx", dy, w, o, dx)


def _dw(x, dy, o, dw):  # dw[e] = dy_e^T . x_e   x [R, K], dy [R, N]
    _gg("moe_grouped_gemm_dw", x, dy, o, dw)


def _flat(t: torch.Tensor):
    """[G, M, X] as the [G*M, X] view over the same memory, or None when
    its strides do not allow one (then the batched product runs group by
    group)."""
    try:
        return t.view(t.shape[0] * t.shape[1], t.shape[2])
    except RuntimeError:
        return None


def _batch_offsets(G: int, M: int, dev) -> torch.Tensor:
    return torch.arange(0, (G + 1) * M, M, dtype=torch.int64,
                        device=dev)[:G + 1]


def _gmm_forward(a, b, offs) -> torch.Tensor:
    """The product of one variant, written through strided views:
      2d3d  out [R, N]     = fwd(x=a, w=b^T [G, N, K]), rows by offs
      2d2d  out [G, M, N]  = dw(x=b [Kt, N], dy=a^T [Kt, M]), depth by offs
      3d2d  out^T [Nt, M]  = fwd(x=b^T [Nt, K], w=a [G, M, K]), rows of b^T
      3d3d  out [G*M, N]   = fwd(x=a flat, w=b^T) with offsets 0, M, 2M, ...
    Rows or columns past offs[-1] are zero (torch leaves them undefined)."""
    kind = _gmm_kind(a, b)
    dev = a.device
    shape = _gmm_out_shape(a, b, offs)
    empty = a.numel() == 0 or b.numel() == 0
    # Zeroed only where the call leaves parts unwritten (the grouped rows or
    # columns past offs[-1]); dW-shaped and batched outputs are written
    # whole (an empty group gets exact zero).
    if empty or kind in ("2d3d", "3d2d"):
        out = torch.zeros(shape, dtype=a.dtype, device=dev)
    else:
        out = torch.empty(shape, dtype=a.dtype, device=dev)
    if empty or out.numel() == 0:
        return out  # an empty product, or a zero-depth one: exact zero
    if kind == "2d3d":
        _fwd(a, b.transpose(1, 2), _offsets64(offs), out)
    elif kind == "2d2d":
        _dw(b, a.t(), _offsets64(offs), out)
    elif kind == "3d2d":
        _fwd(b.t(), a, _offsets64(offs), out.t())
    else:
        G, M = a.shape[0], a.shape[1]
        af = _flat(a)
        if af is not None:
            _fwd(af, b.transpose(1, 2), _batch_offsets(G, M, dev),
                 out.view(G * M, -1))
        else:
            one = _batch_offsets(1, M, dev)
            for g in range(G):
                _fwd(a[g], b[g:g + 1].transpose(1, 2), one, out[g])
    return out


def _gmm_backward_impl(grad, a, b, offs, need_a: bool, need_b: bool):
    """Both gradients, each in its operand's strides (_like), through the
    same three calls:
      2d3d  da = dx(dy=g, w=b^T)               db^T = dw(x=a, dy=g)
      2d2d  da^T = fwd(x=b, w=g [G, M, N])     db = dx(dy=a^T, w=g)
      3d2d  db^T = dx(dy=g^T, w=a)             da = dw(x=b^T, dy=g^T)
      3d3d  da = dx(dy=g, w=b^T) per batch     db^T = dw(x=a, dy=g) per batch
    Parts of an operand no group covers get zero gradient."""
    kind = _gmm_kind(a, b)
    dev = a.device
    if grad.dtype != a.dtype:
        grad = grad.to(a.dtype)
    if any(st == 0 and sz > 1 for st, sz in zip(grad.stride(), grad.shape)):
        # an expanded gradient (e.g. of .sum()): the weight-side operand of
        # a call must not overlap itself; this copies the gradient only
        grad = grad.contiguous()
    empty = a.numel() == 0 or b.numel() == 0 or grad.numel() == 0
    # Zeroed only where the call leaves parts unwritten (the operand's rows
    # or columns past offs[-1]): never the weight gradient of the MoE
    # forward (2d3d's db, written whole by dW), nor 3d3d's or 3d2d's da.
    zero_a = empty or kind in ("2d3d", "2d2d")
    zero_b = empty or kind in ("2d2d", "3d2d")
    da = (_like(a).zero_() if zero_a else _like(a)) if need_a else \
        a.new_empty((0,))
    db = (_like(b).zero_() if zero_b else _like(b)) if need_b else \
        b.new_empty((0,))
    if empty:
        return da, db
    if kind == "2d3d":
        o = _offsets64(offs)
        if need_a:
            _dx(grad, b.transpose(1, 2), o, da)
        if need_b:
            _dw(a, grad, o, db.transpose(1, 2))
    elif kind == "2d2d":
        o = _offsets64(offs)
        if need_a:
            _fwd(b, grad, o, da.t())
        if need_b:
            _dx(a.t(), grad, o, db)
    elif kind == "3d2d":
        o = _offsets64(offs)
        if need_b:
            _dx(grad.t(), a, o, db.t())
        if need_a:
            _dw(b.t(), grad.t(), o, da)
    else:
        G, M = a.shape[0], a.shape[1]
        gf = _flat(grad)
        af, daf = _flat(a), (_flat(da) if need_a else None)
        ob = _batch_offsets(G, M, dev)
        one = _batch_offsets(1, M, dev)
        if need_a:
            if gf is not None and daf is not None:
                _dx(gf, b.transpose(1, 2), ob, daf)
            else:
                for g in range(G):
                    _dx(grad[g], b[g:g + 1].transpose(1, 2), one, da[g])
        if need_b:
            if gf is not None and af is not None:
                _dw(af, gf, ob, db.transpose(1, 2))
            else:
                for g in range(G):
                    _dw(a[g], grad[g], one, db[g:g + 1].transpose(1, 2))
    return da, db


@torch.library.custom_op("libmoe::grouped_mm", mutates_args=())
def _grouped_mm(mat_a: torch.Tensor, mat_b: torch.Tensor,
                offs: torch.Tensor | None) -> torch.Tensor:
    _check_gmm(mat_a, mat_b, offs)
    return _gmm_forward(mat_a, mat_b, offs)


@_grouped_mm.register_fake
def _(mat_a, mat_b, offs):
    _check_gmm(mat_a, mat_b, offs)
    return mat_a.new_empty(_gmm_out_shape(mat_a, mat_b, offs))


@torch.library.custom_op("libmoe::grouped_mm_bwd", mutates_args=())
def _grouped_mm_bwd(grad: torch.Tensor, mat_a: torch.Tensor,
                    mat_b: torch.Tensor, offs: torch.Tensor | None,
                    need_a: bool, need_b: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    return _gmm_backward_impl(grad, mat_a, mat_b, offs, need_a, need_b)


@_grouped_mm_bwd.register_fake
def _(grad, mat_a, mat_b, offs, need_a, need_b):
    return (_like(mat_a) if need_a else mat_a.new_empty((0,)),
            _like(mat_b) if need_b else mat_b.new_empty((0,)))


def _gmm_setup(ctx, inputs, output):
    mat_a, mat_b, offs = inputs
    ctx.save_for_backward(mat_a, mat_b, offs)


def _gmm_backward(ctx, grad):
    mat_a, mat_b, offs = ctx.saved_tensors
    need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_a or need_b):
        return None, None, None
    da, db = torch.ops.libmoe.grouped_mm_bwd(grad, mat_a, mat_b, offs,
                                             need_a, need_b)
    return (da if need_a else None), (db if need_b else None), None


_grouped_mm.register_autograd(_gmm_backward, setup_context=_gmm_setup)


def grouped_mm_decline_reason(mat_a: torch.Tensor, mat_b: torch.Tensor,
                              offs: torch.Tensor | None = None,
                              bias: torch.Tensor | None = None,
                              out_dtype: torch.dtype | None = None
                              ) -> str | None:
    """Why libmoe's C grouped GEMM cannot run this torch._grouped_mm call
    (None: it can). Only capability limits are reasons; a call that breaks
    torch's shape rules is an error, raised by grouped_mm."""
    if not isinstance(mat_a, torch.Tensor) or \
            not isinstance(mat_b, torch.Tensor):
        return "mat_a and mat_b must be tensors"
    if bias is not None:
        return "a bias (torch._grouped_mm does not take one either)"
    if out_dtype is not None and out_dtype != mat_a.dtype:
        return (f"out_dtype {out_dtype} differs from the operands' "
                f"{mat_a.dtype}")
    if mat_a.dtype != mat_b.dtype:
        return f"mixed dtypes {mat_a.dtype} and {mat_b.dtype}"
    dev = mat_a.device
    if dev.type not in ("cpu", "cuda"):
        return f"device {dev.type}"
    if mat_a.dtype not in _GMM_DTYPES[dev.type]:
        return (f"dtype {mat_a.dtype}; libmoe's {dev.type} grouped GEMM runs "
                + ", ".join(str(d) for d in _GMM_DTYPES[dev.type]))
    if dev.type == "cuda" and not L.HAS_CUDA:
        return "this libmoe build has no CUDA backend"
    if max(mat_a.dim(), mat_b.dim()) > L.MOE_MAX_DIMS:
        return f"{max(mat_a.dim(), mat_b.dim())}-D operands"
    return None


def grouped_mm(mat_a: torch.Tensor, mat_b: torch.Tensor,
               offs: torch.Tensor | None = None,
               bias: torch.Tensor | None = None,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """torch._grouped_mm / torch.nn.functional.grouped_mm on libmoe's
    grouped GEMM. Every layout of torch's contract, f32, bf16 and f16:

      mat_a [M_total, K], mat_b [G, K, N], offs [G] -> [M_total, N]
          rows of mat_a grouped by offs (the MoE forward);
      mat_a [M, K_total], mat_b [K_total, N], offs [G] -> [G, M, N]
          the shared K grouped by offs (the weight gradient);
      mat_a [G, M, K], mat_b [K, N_total], offs [G] -> [M, N_total]
          columns of mat_b grouped by offs;
      mat_a [G, M, K], mat_b [G, K, N], offs None -> [G, M, N] (batched).

    offs are int32 cumulative group ends; parts of the grouped dimension
    past offs[-1] give zero output and get zero gradient. Operands are any
    strided views (no 16-byte rule, no copy); both gradients come back in
    their operand's strides. f16 accumulates in f32 and rounds the output
    to nearest even (on CUDA on the CUDA cores: correct, not fast). What the
    C library cannot run (a bias, an out_dtype other than the operands',
    another device) goes to torch's own operator, logging the reason once;
    torch then runs it or raises."""
    reason = grouped_mm_decline_reason(mat_a, mat_b, offs, bias, out_dtype)
    if reason is not None:
        if _torch_grouped_mm is None:
            raise NotImplementedError(
                f"libmoe.grouped_mm: {reason}, and this torch has no "
                "_grouped_mm to fall back to")
        if reason not in _gmm_logged:
            _gmm_logged.add(reason)
            _gmm_log.warning("libmoe.grouped_mm: %s; running torch's "
                             "_grouped_mm", reason)
        return _torch_grouped_mm(mat_a, mat_b, offs=offs, bias=bias,
                                 out_dtype=out_dtype)
    return torch.ops.libmoe.grouped_mm(mat_a, mat_b, offs)


_patched_from = None


def patch_grouped_mm() -> None:
    """torch._grouped_mm := libmoe.torch.grouped_mm, so every caller
    (torch.nn.functional.grouped_mm, transformers' grouped_mm experts,
    torchtitan-style MoE code) runs libmoe; declined calls still reach
    torch's own operator. Idempotent; undo with unpatch_grouped_mm()."""
    global _patched_from
    if _torch_grouped_mm is None:
        raise NotImplementedError("this torch has no _grouped_mm to patch")
    if torch._grouped_mm is grouped_mm:
        return
    _patched_from = torch._grouped_mm
    torch._grouped_mm = grouped_mm


def unpatch_grouped_mm() -> None:
    """Restores the torch._grouped_mm that patch_grouped_mm() replaced."""
    global _patched_from
    if torch._grouped_mm is grouped_mm and _patched_from is not None:
        torch._grouped_mm = _patched_from
    _patched_from = None


__all__ += ["grouped_mm_decline_reason", "patch_grouped_mm",
            "unpatch_grouped_mm"]
