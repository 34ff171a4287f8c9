"""Whole tiny models (our configs, no download) of the families whose
experts needed issue 17's pieces, run with experts_implementation="libmoe"
under LIBMOE_HF=1 (a decline raises) against "eager": gpt-oss (biases,
interleaved gate/up in [E, H, 2I] storage, gpt-oss gating with clamps) and
Nemotron-H (ReLU² experts without a gate). Logits, loss and every
parameter gradient, f32 on the CPU; the experts' gradients keep their
parameters' strides (no weight copy)."""

import copy

import pytest
import torch

import libmoe.hf
from conftest import DEVICE, rel


def _gpt_oss():
    from transformers import GptOssConfig, GptOssForCausalLM
    return GptOssForCausalLM, GptOssConfig(
        vocab_size=97, hidden_size=40, intermediate_size=24,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, num_local_experts=5, num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"], sliding_window=8,
        swiglu_limit=0.9)  # small: the clamps act at these weight scales


def _nemotron_h():
    from transformers import NemotronHConfig, NemotronHForCausalLM
    return NemotronHForCausalLM, NemotronHConfig(
        vocab_size=97, hidden_size=40, num_hidden_layers=2,
        layers_block_type=["moe", "full_attention"], num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, intermediate_size=48,
        n_routed_experts=5, num_experts_per_tok=2, moe_intermediate_size=24,
        moe_shared_expert_intermediate_size=24, n_group=1, topk_group=1)


MODELS = {"gpt_oss": _gpt_oss, "nemotron_h": _nemotron_h}


def _run(cls, cfg, impl):
    torch.manual_seed(0)
    m = cls._from_config(copy.deepcopy(cfg), experts_implementation=impl,
                         dtype=torch.float32)
    with torch.no_grad():  # HF leaves expert weights to init: make them sane
        for n, p in m.named_parameters():
            if "experts" in n:
                p.normal_(0, 0.3)
    m = m.to(DEVICE)
    ids = torch.randint(0, cfg.vocab_size, (2, 11),
                        generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out = m(input_ids=ids, labels=ids)
    out.loss.backward()
    return m, out


@pytest.mark.parametrize("family", list(MODELS))
def test_whole_model(family, monkeypatch):
    if DEVICE.type != "cpu":
        pytest.skip("f32 against eager on the CPU")
    libmoe.hf.register()
    monkeypatch.setenv("LIBMOE_HF", "1")
    cls, cfg = MODELS[family]()
    ref, o_r = _run(cls, cfg, "eager")
    m, o_m = _run(cls, cfg, "libmoe")
    assert rel(o_m.logits, o_r.logits) < 1e-4
    assert abs(o_m.loss.item() - o_r.loss.item()) < 1e-4 * abs(o_r.loss.item())
    pr = dict(ref.named_parameters())
    n_exp = 0
    for n, p in m.named_parameters():
        assert p.grad is not None, n
        assert rel(p.grad, pr[n].grad) < 1e-4, n
        if ".experts." in n:
            n_exp += 1
            assert p.grad.stride() == p.stride(), n
    assert n_exp >= 2


@pytest.mark.parametrize("family", list(MODELS))
def test_compile_fullgraph(family, monkeypatch):
    """torch.compile(fullgraph=True) through the binding: the probe is a
    constant under dynamo, the extended op (biases, activation, interleaved)
    traces; results as eager libmoe."""
    if DEVICE.type != "cpu":
        pytest.skip("f32 on the CPU (test_hf.py compiles on the GPU)")
    libmoe.hf.register()
    monkeypatch.setenv("LIBMOE_HF", "1")
    cls, cfg = MODELS[family]()
    m, o_m = _run(cls, cfg, "libmoe")
    torch.manual_seed(0)
    c = cls._from_config(copy.deepcopy(cfg), experts_implementation="libmoe",
                         dtype=torch.float32).to(DEVICE)
    c.load_state_dict(m.state_dict())
    torch._dynamo.reset()
    cm = torch.compile(c, fullgraph=True, backend="aot_eager")
    ids = torch.randint(0, cfg.vocab_size, (2, 11),
                        generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out = cm(input_ids=ids, labels=ids)
    out.loss.backward()
    assert rel(out.logits, o_m.logits) < 1e-5
    pm = dict(m.named_parameters())
    for n, p in c.named_parameters():
        assert rel(p.grad, pm[n].grad) < 1e-4, n
