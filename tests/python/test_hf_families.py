"""Every model family of the installed transformers whose experts use the
experts interface (`@use_experts_implementation`), found by reading the
modeling files: each family's experts module, built from its own config
class shrunk to odd tiny sizes (our sizes, no download), runs through
experts_implementation="libmoe" with LIBMOE_HF=1 (a decline raises) and is
compared with its own eager forward, output and every gradient (hidden
states, routing weights, weights, biases): f32 at 1e-4, bf16 at 3e-2. The
families libmoe declines are listed in DECLINED with their reason; the
test checks that exactly those decline, with that reason.
"""

import functools
import importlib
import os
import re

import pytest
import torch

import libmoe.hf
from conftest import DEVICE, rel

# family -> the words of the reason it is declined with
DECLINED = {
    "muse_spark": "post-expert norm",
}

E, H, I, K, T = 6, 37, 13, 2, 29

_SIZES = {
    "hidden_size": H, "moe_hidden_size": H, "intermediate_size": I, "moe_intermediate_size": I,
    "expert_intermediate_size": I, "ffn_hidden_size": I,
    "num_experts": E, "num_local_experts": E, "n_routed_experts": E,
    "moe_num_experts": E, "num_experts_per_tok": K, "moe_k": K,
    "moe_latent_size": None,
}


def _root():
    import transformers
    return os.path.join(os.path.dirname(transformers.__file__), "models")


@functools.lru_cache(maxsize=None)
def families():
    """family -> [experts class names], from the modeling files."""
    out = {}
    root = _root()
    for f in sorted(os.listdir(root)):
        p = os.path.join(root, f, f"modeling_{f}.py")
        if not os.path.exists(p):
            continue
        src = open(p).read()
        cls = re.findall(r"@use_experts_implementation(?:\([^)]*\))?\s*\n"
                         r"class (\w+)", src)
        if cls:
            out[f] = cls
    return out


def _shrink(cfg):
    for n, v in _SIZES.items():
        if hasattr(cfg, n):
            cur = getattr(cfg, n)
            if isinstance(cur, (list, tuple)):  # per-layer sizes
                v = type(cur)(v for _ in cur) if v is not None else cur
            try:
                setattr(cfg, n, v)
            except Exception:  # noqa: BLE001 -- read-only property
                pass
    return cfg


def _configs(family):
    """Candidate config instances, text configs first."""
    from transformers import PretrainedConfig
    mod = importlib.import_module(
        f"transformers.models.{family}.configuration_{family}")
    classes = [c for c in vars(mod).values()
               if isinstance(c, type) and issubclass(c, PretrainedConfig)
               and c.__module__ == mod.__name__]
    classes.sort(key=lambda c: (0 if "Text" in c.__name__ else 1, c.__name__))
    for c in classes:
        try:
            cfg = c()
        except Exception:  # noqa: BLE001
            continue
        yield cfg
        tc = cfg.get_text_config() if hasattr(cfg, "get_text_config") else None
        if tc is not None and tc is not cfg:
            yield tc


def build_experts(family, cls_name, dtype=torch.float32, seed=0):
    """The family's experts module at tiny sizes with random weights."""
    mod = importlib.import_module(
        f"transformers.models.{family}.modeling_{family}")
    cls = getattr(mod, cls_name)
    err = None
    for cfg in _configs(family):
        cfg = _shrink(cfg)
        m = None
        for kw in ({}, {"intermediate_size": I}):  # ernie4_5_vl: per-call I
            try:
                torch.manual_seed(seed)
                m = cls(cfg, **kw)
                break
            except Exception as e:  # noqa: BLE001
                err = e
        if m is None:
            continue
        if sum(p.numel() for p in m.parameters()) > 200_000:
            err = RuntimeError("sizes did not shrink")
            continue
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n.endswith("_bias"):
                    p.normal_(0, 0.3)
                elif "norm" in n:
                    p.normal_(1, 0.1)
                else:
                    p.normal_(0, 0.25)
        return m.to(DEVICE, dtype)
    raise RuntimeError(f"{family}.{cls_name}: no config builds it: {err}")


def all_cases():
    return [(f, c) for f, cs in families().items() for c in cs]


def _routing(m, seed=1):
    g = torch.Generator().manual_seed(seed)
    n = m.down_proj.shape[0]
    idx = torch.stack([torch.randperm(n - 1, generator=g)[:K] + 1
                       for _ in range(T)])  # expert 0 stays empty
    idx[:3, 0] = n - 1
    w = torch.rand((T, K), generator=g) + 0.1
    x = torch.randn((T, m.down_proj.shape[1] if not m.is_transposed
                     else m.down_proj.shape[2]), generator=g)
    return x.to(DEVICE), idx.to(DEVICE), w.to(DEVICE)


def _run(m, impl, x, idx, w, dtype):
    m.config._experts_implementation = impl
    m.zero_grad(set_to_none=True)
    x = x.to(dtype).detach().requires_grad_()
    w = w.to(dtype).detach().requires_grad_()
    y = m(x, idx, w)
    gy = torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)
    (y.float() * gy).sum().backward()
    grads = {"x": x.grad, "w": w.grad}
    grads.update({n: p.grad for n, p in m.named_parameters()})
    return y.detach(), grads


@pytest.mark.parametrize("family,cls", all_cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_family(family, cls, dtype, monkeypatch):
    libmoe.hf.register()
    m = build_experts(family, cls, dtype)
    x, idx, w = _routing(m)
    reason = libmoe.hf.unsupported_reason(m)
    if family in DECLINED:
        assert reason is not None and DECLINED[family] in reason, reason
        return
    assert reason is None, f"{family}: declined: {reason}"
    monkeypatch.setenv("LIBMOE_HF", "1")
    y_ref, g_ref = _run(m, "eager", x, idx, w, dtype)
    y, g = _run(m, "libmoe", x, idx, w, dtype)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert rel(y, y_ref) < tol, f"{family}: output {rel(y, y_ref):.2e}"
    for n in g_ref:
        assert g[n] is not None, f"{family}: no gradient for {n}"
        assert g[n].stride() == g_ref[n].stride() or n in ("x", "w"), n
        assert rel(g[n], g_ref[n]) < tol, \
            f"{family}: grad {n} {rel(g[n], g_ref[n]):.2e}"
