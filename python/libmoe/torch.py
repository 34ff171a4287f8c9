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

_INVALID = {"error": L.MOE_TOPK_INVALID_ERROR, "drop": L.MOE_TOPK_INVALID_DROP}
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


# key -> plans of growing capacity (each twice the one before, or more)
_plans: dict = {}
_plans_lock = threading.Lock()
_MAX_PLANS = 64
# The smallest capacity a plan is made for; beyond it, the next power of two.
_MIN_CAPACITY = 256


def _capacity_for(tokens: int) -> int:
    c = _MIN_CAPACITY
    while c < tokens:
        c *= 2
    return c


def _plan_for(hidden_shape, k, gu, dn, dtype, device, invalid,
              act=(L.MOE_ACT_SWIGLU, 0.0, 0.0, 0.0, 0.0),
              interleaved=False) -> _Plan:
    """The plan for (shapes, dtype, layouts, device, policy, activation),
    whatever the token count: the smallest-capacity plan of that key that
    holds T, else a new one for the next power of two >= T (at least
    _MIN_CAPACITY). A trainer whose T varies step to step makes O(log T)
    plans, not one per T; and the forward and backward of one step pick the
    same plan (plans are only ever added above every capacity the key
    already has)."""
    T, H = int(hidden_shape[0]), int(hidden_shape[1])
    E, I2 = int(gu.shape[0]), 2 * int(dn.shape[2])
    dev = L.device_of(device)
    key = (H, E, I2, int(k), dtype, L.layout_of(gu), L.layout_of(dn),
           dev.type, dev.index, invalid, tuple(act), bool(interleaved))
    with _plans_lock:
        ps = _plans.get(key)
        if ps is not None:
            for p in ps:
                if p.capacity >= T:
                    return p
        d = L.moe_layer_desc()
        d.struct_size = ctypes.sizeof(L.moe_layer_desc)
        d.magic, d.version = L.MOE_LAYER_DESC_MAGIC, L.MOE_LAYER_DESC_VERSION
        d.num_experts, d.hidden, d.intermediate = E, H, I2 // 2
        d.top_k, d.max_tokens = int(k), _capacity_for(T)
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
        p = _Plan(d)
        if ps is None:
            if len(_plans) >= _MAX_PLANS:
                _plans.pop(next(iter(_plans)))
            ps = _plans[key] = []
        ps.append(p)
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
                  interleaved and gate)
    out = torch.empty((T, H), dtype=hidden.dtype, device=dev)
    sz = p.sizes(T)
    # `saved` is an op output, so every byte must be defined
    # (torch.library.opcheck compares outputs byte for byte). The CPU layer
    # writes every byte (tests/test_layer.c checks it): no memset. The CUDA
    # layer's guarantee comes with its own saved-state work; until then one
    # memset there.
    if dev.type == "cpu":
        saved = torch.empty((sz.saved,), dtype=torch.uint8, device=dev)
    else:
        saved = torch.zeros((sz.saved,), dtype=torch.uint8, device=dev)
    ws = torch.empty((sz.fwd_workspace,), dtype=torch.uint8, device=dev)
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
                                    ws.data_ptr() if sz.fwd_workspace else None,
                                    sz.fwd_workspace, L.stream_of(dev)),
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
                  _act_of(act, act_params), interleaved and gate)
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
    "Tensor saved, int invalid, " + _EXTRA + ") -> (Tensor, Tensor, Tensor, "
    "Tensor, Tensor, Tensor)")
def _experts_bwd(grad_out: torch.Tensor, hidden: torch.Tensor,
                 top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                 saved: torch.Tensor, invalid: int,
                 gate_up_bias: torch.Tensor | None = None,
                 down_bias: torch.Tensor | None = None, act: int = 0,
                 act_params: list[float] | None = None,
                 interleaved: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                            torch.Tensor, torch.Tensor, torch.Tensor]:
    dev = hidden.device
    gate = act not in _NO_GATE
    p = _plan_for(hidden.shape, top_k_index.shape[1], gate_up_proj, down_proj,
                  hidden.dtype, dev, invalid, _act_of(act, act_params),
                  interleaved and gate)
    g_hidden = _like(hidden)
    g_w = _like(top_k_weights)
    g_gu = _like(gate_up_proj)
    g_dn = _like(down_proj)
    g_bgu = _no_grad_like(gate_up_bias, hidden)
    g_bdn = _no_grad_like(down_bias, hidden)
    sz = p.sizes(int(hidden.shape[0]))
    ws = torch.empty((sz.bwd_workspace,), dtype=torch.uint8, device=dev)
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
                                     ws.data_ptr() if sz.bwd_workspace else None,
                                     sz.bwd_workspace, L.stream_of(dev)),
            "moe_layer_backward")
    return g_hidden, g_w, g_gu, g_dn, g_bgu, g_bdn


@_experts_bwd.register_fake
def _(grad_out, hidden, top_k_index, top_k_weights, gate_up_proj, down_proj,
      saved, invalid, gate_up_bias=None, down_bias=None, act=0,
      act_params=None, interleaved=False):
    return (_like(hidden), _like(top_k_weights), _like(gate_up_proj),
            _like(down_proj), _no_grad_like(gate_up_bias, hidden),
            _no_grad_like(down_bias, hidden))


def _experts_setup(ctx, inputs, output):
    (hidden, idx, w, gu, dn, invalid, bgu, bdn, act, act_params,
     interleaved) = inputs
    ctx.invalid, ctx.act, ctx.act_params = invalid, act, act_params
    ctx.interleaved = interleaved
    ctx.has_bgu, ctx.has_bdn = bgu is not None, bdn is not None
    ctx.save_for_backward(hidden, idx, w, gu, dn, output[1], bgu, bdn)


def _experts_backward(ctx, grad_out, _grad_saved):
    hidden, idx, w, gu, dn, saved, bgu, bdn = ctx.saved_tensors
    gh, gw, ggu, gdn, gbgu, gbdn = torch.ops.libmoe.experts_bwd(
        grad_out, hidden, idx, w, gu, dn, saved, ctx.invalid, bgu, bdn,
        ctx.act, ctx.act_params, ctx.interleaved)
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
    """The planner's choice and reasons for experts() on these tensors."""
    return _plan_for(hidden_states.shape, top_k_index.shape[1], gate_up_proj,
                     down_proj, hidden_states.dtype, hidden_states.device,
                     _INVALID[invalid_topk]).explain()


# ---- grouped_mm ------------------------------------------------------------


def _offsets64(offs: torch.Tensor) -> torch.Tensor:
    """torch's int32 cumulative ends [E] -> libmoe's int64 offsets [E+1]."""
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


def _check_gmm(input, weight, offs):
    if input.dim() != 2 or weight.dim() != 3 or offs.dim() != 1:
        raise ValueError("libmoe.grouped_mm: input [S, K], weight [E, K, N], "
                         "offs [E] expected")
    if input.shape[1] != weight.shape[1] or offs.shape[0] != weight.shape[0]:
        raise ValueError(
            f"libmoe.grouped_mm: input {tuple(input.shape)}, weight "
            f"{tuple(weight.shape)}, offs {tuple(offs.shape)} do not fit")
    if input.dtype != weight.dtype:
        raise TypeError("libmoe.grouped_mm: input and weight dtypes differ "
                        f"({input.dtype}, {weight.dtype})")
    if offs.dtype != torch.int32:
        raise TypeError("libmoe.grouped_mm: offs must be int32")


@torch.library.custom_op("libmoe::grouped_mm", mutates_args=())
def _grouped_mm(input: torch.Tensor, weight: torch.Tensor,
                offs: torch.Tensor) -> torch.Tensor:
    _check_gmm(input, weight, offs)
    dev = input.device
    # rows at or past offs[-1] belong to no group: zero, not left undefined
    out = torch.zeros((input.shape[0], weight.shape[2]), dtype=input.dtype,
                      device=dev)
    o64 = _offsets64(offs)
    wt = weight.transpose(1, 2)  # libmoe's [E, N, K] view: no data moves
    x, w, o, y = L.view(input), L.view(wt), L.view(o64), L.view(out)
    opt = _opts(dev)
    L.check(_gmm_fn("moe_grouped_gemm", dev)(
        ctypes.byref(x), ctypes.byref(w), ctypes.byref(o), ctypes.byref(y),
        ctypes.byref(opt)), "moe_grouped_gemm")
    return out


@_grouped_mm.register_fake
def _(input, weight, offs):
    _check_gmm(input, weight, offs)
    return input.new_empty((input.shape[0], weight.shape[2]))


@torch.library.custom_op("libmoe::grouped_mm_bwd", mutates_args=())
def _grouped_mm_bwd(grad: torch.Tensor, input: torch.Tensor,
                    weight: torch.Tensor, offs: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    dev = input.device
    if grad.dtype != input.dtype:
        grad = grad.to(input.dtype)
    o64 = _offsets64(offs)
    opt = _opts(dev)
    wt = weight.transpose(1, 2)
    dx = torch.zeros(input.shape, dtype=input.dtype, device=dev)
    gw = _like(weight)  # the weight's own strides
    gwt = gw.transpose(1, 2)  # [E, N, K] view the C dW writes through
    d, w, o, x = L.view(grad), L.view(wt), L.view(o64), L.view(input)
    vdx, vgw = L.view(dx), L.view(gwt)
    L.check(_gmm_fn("moe_grouped_gemm_dx", dev)(
        ctypes.byref(d), ctypes.byref(w), ctypes.byref(o), ctypes.byref(vdx),
        ctypes.byref(opt)), "moe_grouped_gemm_dx")
    L.check(_gmm_fn("moe_grouped_gemm_dw", dev)(
        ctypes.byref(x), ctypes.byref(d), ctypes.byref(o), ctypes.byref(vgw),
        ctypes.byref(opt)), "moe_grouped_gemm_dw")
    return dx, gw


@_grouped_mm_bwd.register_fake
def _(grad, input, weight, offs):
    return torch.empty_like(input, memory_format=torch.contiguous_format), \
        _like(weight)


def _gmm_setup(ctx, inputs, output):
    input, weight, offs = inputs
    ctx.save_for_backward(input, weight, offs)


def _gmm_backward(ctx, grad):
    input, weight, offs = ctx.saved_tensors
    dx, gw = torch.ops.libmoe.grouped_mm_bwd(grad, input, weight, offs)
    return dx, gw, None


_grouped_mm.register_autograd(_gmm_backward, setup_context=_gmm_setup)


def grouped_mm(input: torch.Tensor, weight: torch.Tensor,
               offs: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm's contract: input [S, K], weight [E, K, N] (any
    strided view, e.g. w.transpose(-2, -1) of [E, N, K] storage), offs int32
    [E] cumulative row ends; out[r] = input[r] . weight[e] for the rows of
    group e; rows at or past offs[-1] are zero. Differentiable; the weight
    gradient has the weight's strides; the weight is never copied."""
    return torch.ops.libmoe.grouped_mm(input, weight, offs)
