"""Shared helpers of the Python tests.

LIBMOE_TEST_DEVICE=cuda runs them on the GPU (bf16 against transformers'
grouped_mm); the default is the CPU (f32 and bf16 against eager).
"""

import os

import pytest
import torch

DEVICE = torch.device(os.environ.get("LIBMOE_TEST_DEVICE", "cpu"))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (b the reference), in float64."""
    a, b = a.detach().double(), b.detach().double()
    den = b.abs().max().item()
    return (a - b).abs().max().item() / (den if den > 0 else 1.0)


def tiny_qwen3_moe_config(hidden=44, inter=22, experts=7, top_k=3, norm=True,
                          layers=2):
    from transformers import Qwen3MoeConfig
    return Qwen3MoeConfig(
        vocab_size=97, hidden_size=hidden, intermediate_size=3 * hidden,
        moe_intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=3, num_key_value_heads=1, head_dim=8,
        num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=norm,
        decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=64,
        router_aux_loss_coef=0.0, output_router_logits=False,
        tie_word_embeddings=False)


def make_model(cfg, impl, dtype=torch.float32, seed=0, transposed=False):
    """A random-weight Qwen3-MoE on DEVICE. With transposed=True the experts
    store their weights as [E, H, 2I] / [E, I, H] (is_transposed) holding
    the same values."""
    from transformers import Qwen3MoeForCausalLM
    import libmoe.hf
    libmoe.hf.register()
    import copy
    cfg = copy.deepcopy(cfg)  # the model keeps (and edits) its config
    torch.manual_seed(seed)
    m = Qwen3MoeForCausalLM._from_config(cfg, experts_implementation=impl,
                                         dtype=torch.float32)
    with torch.no_grad():  # HF leaves expert weights to init: make them sane
        for mod in m.modules():
            if hasattr(mod, "gate_up_proj"):
                mod.gate_up_proj.normal_(0, 0.2)
                mod.down_proj.normal_(0, 0.2)
    m = m.to(device=DEVICE, dtype=dtype)
    if transposed:
        for mod in m.modules():
            if hasattr(mod, "gate_up_proj") and hasattr(mod, "is_transposed"):
                mod.gate_up_proj = torch.nn.Parameter(
                    mod.gate_up_proj.detach().transpose(1, 2).contiguous())
                mod.down_proj = torch.nn.Parameter(
                    mod.down_proj.detach().transpose(1, 2).contiguous())
                mod.is_transposed = True
    assert m.config._experts_implementation == impl
    return m


def experts_modules(model):
    return [m for m in model.modules()
            if hasattr(m, "gate_up_proj") and hasattr(m, "is_transposed")]


@pytest.fixture
def device():
    return DEVICE
