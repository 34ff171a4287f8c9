"""libmoe.torch.experts with every expert function, expert biases and
interleaved gate/up rows, against a float64 autograd reference of the
models' eager code, at odd sizes, f32 and bf16, concatenated and
interleaved, both layouts; the gradient at the exact clamp bounds (libmoe's
open-interval convention exactly; the running torch's autograd of gpt-oss's
and DeepSeek-V4's own _apply_gate off the bounds); opcheck of the extended op;
and the HF binding's recognition by probing (a plain-function SiLU is
served, an unknown gate function is declined with the reason)."""

import pytest
import torch
import torch.nn.functional as F

import libmoe.hf
import libmoe.torch as lt
from conftest import DEVICE, rel

E, H, I, K, T = 5, 23, 11, 2, 31
TOL = {torch.float32: 1e-5 if DEVICE.type == "cpu" else 1e-4,
       torch.bfloat16: 3e-2}
PARAMS = dict(alpha=1.702, limit=0.7, gate_cap=0.8, up_cap=1.3)


def ref_act(name, g, u, alpha, limit, gate_cap, up_cap):
    if name == "swiglu":
        return F.silu(g) * u
    if name == "swiglu_clamp":  # deepseek_v4 / glm5_next / hy_v4
        return F.silu(g.clamp(max=limit)) * u.clamp(min=-limit, max=limit)
    if name == "gpt_oss":
        g = g.clamp(min=None, max=limit)
        u = u.clamp(min=-limit, max=limit)
        return (u + 1) * (g * torch.sigmoid(g * alpha))
    if name == "softcap_swiglu":  # inkling2
        return (torch.tanh(g / gate_cap) * gate_cap * torch.sigmoid(g) *
                torch.tanh(u / up_cap) * up_cap)
    if name == "geglu":
        return F.gelu(g, approximate="tanh") * u
    if name == "relu2":
        return torch.square(F.relu(u))
    raise ValueError(name)


def ref_experts(x, idx, w, gu, dn, bgu, bdn, act, interleaved, dtype=None):
    """float64 loop (autograd gives the reference gradients). With a bf16
    `dtype` the projection outputs are rounded to it where the layer stores
    them (as transformers' grouped_mm path does too), so a clamp or a relu
    decides on the same side of its kink as the layer does."""
    def rd(v):
        return v.to(dtype).double() if dtype == torch.bfloat16 else v
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            a = rd(gu[e] @ x[t])
            if bgu is not None:
                a = rd(a + bgu[e])
            if act == "relu2":
                g, u = None, a
            elif interleaved:
                g, u = a[0::2], a[1::2]
            else:
                g, u = a.chunk(2)
            h = ref_act(act, g, u, **PARAMS)
            y = dn[e] @ h + (bdn[e] if bdn is not None else 0)
            out[t] = out[t] + w[t, j] * y
    return out


def make(act, layout, dtype, bias, seed=5):
    g = torch.Generator().manual_seed(seed)
    rows = I if act == "relu2" else 2 * I

    def mk(shape, s=0.5):
        return (torch.rand(shape, generator=g) - 0.5) * 2 * s
    if layout == "out_in":
        gu, dn = mk((E, rows, H)), mk((E, H, I))
    else:
        gu = mk((E, H, rows)).transpose(1, 2)
        dn = mk((E, I, H)).transpose(1, 2)
    bgu = mk((E, rows), 0.3) if bias else None
    bdn = mk((E, H), 0.3) if bias else None
    idx = torch.stack([torch.randperm(E - 1, generator=g)[:K] + 1
                       for _ in range(T)])  # expert 0 empty
    w = torch.rand((T, K), generator=g)
    x = mk((T, H), 1.0)
    ts = [x, w, gu, dn, bgu, bdn]
    ts = [t.to(DEVICE, dtype if i != 1 else torch.float32)
          .detach().requires_grad_() if t is not None else None
          for i, t in enumerate(ts)]
    return ts, idx.to(DEVICE)


@pytest.mark.parametrize("act", list(lt.ACTIVATIONS))
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_act(act, layout, interleaved, bias, dtype):
    if act == "relu2" and interleaved:
        pytest.skip("relu2 has no gate to interleave")
    (x, w, gu, dn, bgu, bdn), idx = make(act, layout, dtype, bias)
    y = lt.experts(x, idx, w, gu, dn, activation=act, gate_up_bias=bgu,
                   down_bias=bdn, interleaved=interleaved, **PARAMS)
    gy = torch.linspace(-1, 1, y.numel(), device=DEVICE).view_as(y)
    ins = [t for t in (x, w, gu, dn, bgu, bdn) if t is not None]
    grads = torch.autograd.grad((y.float() * gy).sum(), ins)
    d = [t.detach().double().requires_grad_() for t in ins]
    dd = dict(zip(["x", "w", "gu", "dn"], d[:4]))
    if bias:
        dd["bgu"], dd["bdn"] = d[4], d[5]
    yr = ref_experts(dd["x"], idx, dd["w"], dd["gu"], dd["dn"],
                     dd.get("bgu"), dd.get("bdn"), act, interleaved, dtype)
    rgrads = torch.autograd.grad((yr * gy.double()).sum(), d)
    tol = TOL[dtype]
    assert rel(y, yr) < tol
    for name, a, b, t in zip(["x", "w", "gu", "dn", "bgu", "bdn"], grads,
                             rgrads, ins):
        assert rel(a, b) < tol, (name, rel(a, b))
        assert a.stride() == t.stride(), name  # the tensor's own strides


# The clamp bound's gradient. The clamped members (swiglu_clamp, gpt_oss)
# are not differentiable at g = L or u = +-L; libmoe's convention, one in C
# on both backends (src/backend/cpu/act.h, src/backend/cuda/act.cuh), is the
# open interval: the gradient passes only strictly inside the clamp's range
# (g < L; -L < u < L) and is 0 at the bound itself -- the minimum-norm
# subgradient, what F.hardtanh / F.relu6 / F.relu give in every torch.
# torch autograd's clamp with scalar bounds changed at 2.14: up to 2.13
# (measured: 2.11.0, 2.12.1, 2.13.0) it passes the gradient at the bound
# (closed interval, since pytorch/pytorch#7049); from 2.14 (measured: 2.14.1,
# 2.15.0) it gives 0 there, as libmoe does (pytorch/pytorch#184574, fixed
# by PR #191142). Off the bound every torch agrees with libmoe.
CLAMP_L = 0.75  # exact in f32 and bf16
CLAMP_GATES = {
    # member: (the family's eager gate function, interleaved rows)
    "gpt_oss": ("transformers.models.gpt_oss.modeling_gpt_oss",
                "GptOssExperts", True),
    "swiglu_clamp": ("transformers.models.deepseek_v4.modeling_deepseek_v4",
                     "DeepseekV4Experts", False),
}


def _clamp_edge_points(dtype):
    """(g, u) pairs: at the bounds, one ulp inside and outside them, and
    clear of them; returns (g, u, at_edge mask)."""
    L = torch.tensor(CLAMP_L, dtype=dtype)
    inf = torch.tensor(float("inf"), dtype=dtype)
    below, above = torch.nextafter(L, -inf), torch.nextafter(L, inf)
    nb, na = torch.nextafter(-L, inf), torch.nextafter(-L, -inf)
    gs = [L, L, L, below, above, below, above, -L, 0.5, -3.0, 2.0, L]
    us = [-L, L, 0.3, nb, na, -below, above, 0.3, -0.25, L + 1, -2.0, -0.6]
    g = torch.tensor([float(v) for v in gs], dtype=torch.float64)
    u = torch.tensor([float(v) for v in us], dtype=torch.float64)
    gate_edge = g == CLAMP_L  # the gate clamp is one-sided: -L is no bound
    up_edge = u.abs() == CLAMP_L
    return g, u, gate_edge, up_edge


def _open_interval_ref(act, g, u):
    """libmoe's convention in float64: the clamp's value, with the gradient
    of torch.where (1 where the condition holds, else 0) -- strictly inside
    passes, the bound is clamped. Independent of the torch version."""
    L = CLAMP_L
    gc = torch.where(g < L, g, torch.full_like(g, L))
    uc = torch.where((u > -L) & (u < L), u, u.detach().clamp(-L, L))
    if act == "gpt_oss":
        return gc * torch.sigmoid(1.702 * gc) * (uc + 1)
    return F.silu(gc) * uc


@pytest.mark.parametrize("act", list(CLAMP_GATES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clamp_edges_match_autograd(act, dtype):
    """Pre-activations exactly at the clamp bounds, one ulp either side and
    clear of them, through lt.experts (one token, x = 1, so the projection
    output is gate_up exactly). (1) libmoe's convention exactly: gradients
    of every input equal a float64 open-interval reference, and every
    gradient at a bound is exactly 0. (2) The running torch's autograd of
    the family's own eager gate function (gpt-oss, DeepSeek-V4) agrees with
    libmoe everywhere off the bounds; at the bounds it gives 0 from torch
    2.14 on and passes the gradient before (see the note above)."""
    import importlib
    modname, clsname, interleaved = CLAMP_GATES[act]
    cls = getattr(importlib.import_module(modname), clsname)

    class Mod:  # the attributes the eager gate functions read
        alpha, limit, act_fn = 1.702, CLAMP_L, staticmethod(F.silu)

    g64, u64, gate_edge, up_edge = _clamp_edge_points(dtype)
    n = g64.numel()
    rows = (torch.stack([g64, u64], 1).reshape(-1) if interleaved
            else torch.cat([g64, u64]))
    gen = torch.Generator().manual_seed(7)
    dn64 = (torch.rand((1, 1, n), generator=gen, dtype=torch.float64) - 0.3)
    x = torch.ones((1, 1), device=DEVICE, dtype=dtype, requires_grad=True)
    gu = rows.to(DEVICE, dtype).view(1, 2 * n, 1).requires_grad_()
    dn = dn64.to(DEVICE, dtype).requires_grad_()
    w = torch.ones((1, 1), device=DEVICE, requires_grad=True)
    idx = torch.zeros((1, 1), dtype=torch.int64, device=DEVICE)
    y = lt.experts(x, idx, w, gu, dn, activation=act, alpha=1.702,
                   limit=CLAMP_L, interleaved=interleaved)
    got = [t.detach().double().cpu().reshape(-1)
           for t in torch.autograd.grad(y.float().sum(), (x, gu, dn, w))]
    ggu = got[1].view(n, 2) if interleaved else got[1].view(2, n).t()

    def grads_of(gate_fn):
        ins = [t.detach().double().cpu().requires_grad_()
               for t in (x, gu, dn, w)]
        a = ins[1][0, :, 0] * ins[0][0, 0]
        if interleaved:
            g, u = a[0::2], a[1::2]
        else:
            g, u = a.chunk(2)
        h = gate_fn(g, u)
        yr = (ins[2][0] @ h) * ins[3][0, 0]
        out = [t.reshape(-1) for t in torch.autograd.grad(yr.sum(), ins)]
        gg = out[1].view(n, 2) if interleaved else out[1].view(2, n).t()
        return out, gg

    tol = TOL[dtype]  # per element; the bound checks below are exact
    # (1) libmoe's convention, every input, every point
    want, wgu = grads_of(lambda g, u: _open_interval_ref(act, g, u))
    for name, a, b in zip(("x", "gate_up", "down", "w"), got, want):
        assert torch.allclose(a, b, rtol=tol, atol=tol * 1e-2), (name, a, b)
    assert (ggu[gate_edge, 0] == 0).all(), ggu[:, 0]  # exactly 0 at g = L
    assert (ggu[up_edge, 1] == 0).all(), ggu[:, 1]    # and at u = +-L
    # strictly inside it passes (no point here has a zero factor besides)
    assert (ggu[g64 < CLAMP_L, 0] != 0).all(), ggu[:, 0]
    assert (ggu[u64.abs() < CLAMP_L, 1] != 0).all(), ggu[:, 1]

    # (2) the running torch's autograd of the family's own gate function
    def eager(g, u):
        gu_ = (torch.stack([g, u], 1).reshape(-1) if interleaved
               else torch.cat([g, u]))
        return cls._apply_gate(Mod(), gu_)
    tref, tgu = grads_of(eager)
    assert torch.allclose(got[2], tref[2], rtol=tol, atol=tol * 1e-2)
    assert torch.allclose(got[3], tref[3], rtol=tol, atol=tol * 1e-2)
    assert torch.allclose(ggu[~gate_edge, 0], tgu[~gate_edge, 0], rtol=tol,
                          atol=tol * 1e-2)
    assert torch.allclose(ggu[~up_edge, 1], tgu[~up_edge, 1], rtol=tol,
                          atol=tol * 1e-2)
    ver = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    edge_t = torch.cat([tgu[gate_edge, 0], tgu[up_edge, 1]])
    if ver >= (2, 14):  # torch's clamp gives 0 at the bound too
        assert (edge_t == 0).all(), (torch.__version__, edge_t)
    else:  # closed interval: the gradient passes at the bound
        assert (edge_t != 0).all(), (torch.__version__, edge_t)


def test_opcheck_extended():
    from torch.library import opcheck
    (x, w, gu, dn, bgu, bdn), idx = make("gpt_oss", "in_out", torch.float32,
                                         True)
    opcheck(torch.ops.libmoe.experts_fwd.default,
            (x, idx, w, gu, dn, 0, bgu, bdn, lt.ACTIVATIONS["gpt_oss"],
             [1.702, 0.7, 0.0, 0.0], True),
            test_utils=("test_schema", "test_autograd_registration",
                        "test_faketensor", "test_aot_dispatch_dynamic"))


class _Experts(torch.nn.Module):
    """A minimal experts module in the shape of transformers' decorated
    classes (attributes only; forward comes from the binding)."""

    def __init__(self, act_fn=None, gate=None):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.gate_up_proj = torch.nn.Parameter(torch.randn((E, 2 * I, H),
                                                           generator=g) * 0.3)
        self.down_proj = torch.nn.Parameter(torch.randn((E, H, I),
                                                        generator=g) * 0.3)
        self.act_fn = act_fn
        self.has_gate, self.has_bias, self.is_transposed = True, False, False
        self.is_concatenated, self.has_post_expert_norm = True, False
        if gate is not None:
            self._apply_gate = gate.__get__(self)

    def _apply_gate(self, gu):
        g, u = gu.chunk(2, dim=-1)
        return self.act_fn(g) * u


def test_probe_plain_function_and_decline():
    m = _Experts(act_fn=F.silu)  # lfm2_moe holds F.silu as a function
    assert libmoe.hf.unsupported_reason(m) is None
    assert libmoe.hf._spec(m)[1] == "swiglu"
    m = _Experts(act_fn=torch.nn.GELU(approximate="tanh"))
    assert libmoe.hf._spec(m)[1] == "geglu"

    # transformers' own activation modules; GELUTanh's f32 rounding at large
    # |g| must not read as a mismatch (it did with a fixed 1e-6 bound)
    from transformers.activations import ACT2FN
    for name, member in (("gelu_pytorch_tanh", "geglu"), ("silu", "swiglu"),
                         ("swish", "swiglu"), ("gelu_new", "geglu")):
        m = _Experts(act_fn=ACT2FN[name])
        assert libmoe.hf._spec(m)[1:2] == (member,), (name, libmoe.hf._spec(m))
    m = _Experts(act_fn=ACT2FN["gelu"])  # exact (erf) GELU: not a member
    assert "matches none" in libmoe.hf.unsupported_reason(m)

    def odd_gate(self, gu):  # a gate function libmoe does not have
        g, u = gu.chunk(2, dim=-1)
        return torch.tanh(g) * u
    m = _Experts(act_fn=F.silu, gate=odd_gate)
    r = libmoe.hf.unsupported_reason(m)
    assert r is not None and "matches none" in r, r


def _softcap_gate(self, gu):  # inkling2's form, caps on the module
    g, u = gu.chunk(2, dim=-1)
    return (self.gate_softcap * torch.tanh(g / self.gate_softcap) *
            torch.sigmoid(g) * self.up_softcap *
            torch.tanh(u / self.up_softcap))


def _relu2(x):
    return torch.square(F.relu(x))


@pytest.mark.parametrize("width_i", [11, 768, 1407])
def test_probe_at_model_widths(width_i):
    """The recogniser at a real model's width (I = 768: Qwen3-30B-A3B; 1407
    odd), where the probe has few rows (hf._PROBE_VALUES values in all):
    every member is identified with its parameters and row order, and exact
    GELU (1e-3 from the tanh form) is still declined."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import \
        DeepseekV4Experts
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    def mk(act_fn=F.silu, gate=None, gate_fn=True, **attrs):
        m = _Experts(act_fn=act_fn, gate=gate)
        m.down_proj = torch.nn.Parameter(torch.zeros((2, 3, width_i)))
        m.has_gate = gate_fn
        for k, v in attrs.items():
            setattr(m, k, v)
        return m
    cases = [
        (mk(), ("swiglu", 0.0, 0.0, 0.0, 0.0, False)),
        (mk(act_fn=torch.nn.GELU(approximate="tanh")),
         ("geglu", 0.0, 0.0, 0.0, 0.0, False)),
        (mk(gate=DeepseekV4Experts._apply_gate, limit=10.0),
         ("swiglu_clamp", 0.0, 10.0, 0.0, 0.0, False)),
        (mk(gate=GptOssExperts._apply_gate, alpha=1.702, limit=7.0),
         ("gpt_oss", 1.702, 7.0, 0.0, 0.0, True)),
        (mk(gate=_softcap_gate, gate_softcap=4.0, up_softcap=25.0),
         ("softcap_swiglu", 0.0, 0.0, 4.0, 25.0, False)),
        (mk(act_fn=_relu2, gate_fn=False),
         ("relu2", 0.0, 0.0, 0.0, 0.0, False)),
    ]
    for m, want in cases:
        got = libmoe.hf._spec(m)
        assert got[0] is None and got[1:] == want, (want, got)
    m = mk(act_fn=torch.nn.GELU())  # exact (erf) GELU: not a member
    assert "matches none" in libmoe.hf._spec(m)[0]


def test_traced_spec_resolves_module_ids():
    """What dynamo calls at trace time (hf._traced_spec, given id(module)):
    a module the binding met eagerly comes from the registry; one never met
    (a compiled first call) is found by the one scan of live objects, which
    also records its siblings; both give the eager answer."""
    seen = _Experts(act_fn=F.silu)
    assert libmoe.hf._spec(seen)[1] == "swiglu"
    assert libmoe.hf._modules_by_id.get(id(seen)) is seen
    assert libmoe.hf._traced_spec(id(seen)) == libmoe.hf._spec(seen)
    fresh = [_Experts(act_fn=torch.nn.GELU(approximate="tanh"))
             for _ in range(3)]
    assert all(id(m) not in libmoe.hf._modules_by_id for m in fresh)
    assert libmoe.hf._traced_spec(id(fresh[0]))[1] == "geglu"
    assert all(libmoe.hf._modules_by_id.get(id(m)) is m for m in fresh)
    assert libmoe.hf._traced_spec(id(fresh[2])) == libmoe.hf._spec(fresh[2])


@pytest.mark.parametrize("act", list(lt.ACTIVATIONS))
def test_saved_bound_per_member(act):
    """Issue 16's saved-state bound at the member's real gate_up width W
    (2I, or I for relu2 without a gate): W*T*k*es <= saved <= that + 16*T*k
    + 64*E, on the plan the binding makes (its forward returns `saved` of
    exactly that size)."""
    (x, w, gu, dn, bgu, bdn), idx = make(act, "out_in", torch.float32, False)
    p = lt._plan_for(x.shape, K, gu, dn, torch.float32, x.device, 0,
                     lt._act_of(lt.ACTIVATIONS[act],
                                [PARAMS[n] for n in ("alpha", "limit",
                                                     "gate_cap", "up_cap")]))
    W = I if act == "relu2" else 2 * I
    S, es = T * K, 4
    s = p.sizes(T)
    assert S * W * es <= s.saved <= S * W * es + 16 * S + 64 * E
    y = lt.experts(x, idx, w, gu, dn, activation=act, **PARAMS)
    assert y.shape == x.shape
