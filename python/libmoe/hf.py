"""Hugging Face transformers integration.

    import libmoe.hf
    libmoe.hf.register()
    model = AutoModelForCausalLM.from_pretrained(..., experts_implementation="libmoe")
    # or: Qwen3MoeForCausalLM._from_config(cfg, experts_implementation="libmoe")
    # or: model.set_experts_implementation("libmoe")

The "libmoe" experts implementation runs transformers' experts modules
(those decorated with `use_experts_implementation`) through
libmoe.torch.experts: weights read in place in either `is_transposed`
layout, expert-parallel sentinel indices (>= the local expert count, weight
0) dropped. Configurations libmoe cannot run (bias, an activation other
than SiLU, no gate, interleaved gate/up, a post-expert norm, a custom
`_apply_gate`, a dtype other than f32/bf16) are handled by the environment
variable LIBMOE_HF:
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


def unsupported_reason(module, hidden_states=None) -> str | None:
    """Why libmoe cannot run this experts module (None: it can)."""
    hf_moe = _moe_module()
    if getattr(module, "has_bias", False):
        return "the experts have biases"
    if not getattr(module, "has_gate", True):
        return "the experts have no gate (up projection only)"
    if not getattr(module, "is_concatenated", True):
        return "gate/up weights are interleaved, not concatenated"
    if getattr(module, "has_post_expert_norm", False):
        return "the experts have a post-expert norm"
    default_gate = getattr(hf_moe, "_default_apply_gate", None)
    own_gate = getattr(type(module), "_apply_gate", default_gate)
    if own_gate is not default_gate:
        return f"{type(module).__name__} overrides _apply_gate"
    act = getattr(module, "act_fn", None)
    cfg_act = getattr(getattr(module, "config", None), "hidden_act", None)
    if not (isinstance(act, torch.nn.SiLU) or
            type(act).__name__ in ("SiLUActivation", "SiLU")) or \
            cfg_act not in (None, "silu", "swish"):
        return f"activation {cfg_act or type(act).__name__} is not SiLU"
    for n in ("gate_up_proj", "down_proj"):
        w = getattr(module, n, None)
        if not isinstance(w, torch.Tensor) or w.dim() != 3:
            return f"{n} is not a 3-D expert weight"
    w = module.gate_up_proj
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
    gu, dn = self.gate_up_proj, self.down_proj
    if self.is_transposed:  # [E, H, 2I] / [E, I, H] storage: logical views
        gu, dn = gu.transpose(1, 2), dn.transpose(1, 2)
    x = hidden_states
    if x.dtype != gu.dtype:  # autocast may hand f32 activations
        x = x.to(gu.dtype)
    w = top_k_weights
    if w.dtype not in (torch.float32, gu.dtype):
        w = w.to(torch.float32)
    out = moe_torch.experts(x, top_k_index, w, gu, dn, invalid_topk="drop")
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
