#!/usr/bin/env python3
"""PyTorch baselines for bench/gpu/bench_cuda.c, measured on the same card in
the same run (bench/gpu/run.sh calls both).

Expert GEMMs (bf16, rows already sorted by expert, as bench_cuda's "experts"
rows): forward = gate_up grouped GEMM + SwiGLU + down grouped GEMM;
forward+backward adds autograd through both (dX of the input, dW of both).
  gmm_view  torch._grouped_mm on the Hugging Face layout [E, N, K] passed as
            the transposed view [E, K, N] (no copy asked for)
  gmm_kn    torch._grouped_mm on weights stored [E, K, N]
  gmm_copy  the view made contiguous every call (the transposed-copy cliff)
Whole layer: transformers' Qwen3MoeSparseMoeBlock (router + experts) with the
grouped_mm experts backend, forward and forward+backward.

Prints one table; with $OUT set, writes torch_baselines.json there.
usage: torch_baselines.py [shape ...]   (qwen35_ep1 qwen35_ep4_local qwen3_30b)
"""
import json
import os
import sys

import torch
import torch.nn.functional as F
from timing import median_ms as _median_ms

SHAPES = {  # E, H, I, top_k, tokens
    "qwen35_ep1": (512, 4096, 1024, 10, 8192),
    "qwen35_ep4_local": (128, 4096, 1024, 10, 8192),
    "qwen3_30b": (128, 2048, 768, 8, 16384),
}
DEV = "cuda"


def median_ms(fn, warm=3, reps=10):
    return _median_ms(fn, warm, reps)


def act(h):
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def expert_gemms(name, E, H, I, k, T, out):
    gen = torch.Generator(device=DEV).manual_seed(7)
    picks = torch.rand(T, E, device=DEV, generator=gen).topk(k, dim=-1).indices
    counts = torch.bincount(picks.flatten(), minlength=E)
    R = int(counts.sum())
    offs = torch.cumsum(counts, 0).to(torch.int32)
    flops = 2 * R * H * 2 * I + 2 * R * I * H
    x = torch.randn(R, H, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(R, H, device=DEV, dtype=torch.bfloat16)
    res = {"rows": R, "fwd_gflop": flops / 1e9}

    def measure(tag, w1, w2, prep):
        def fwd():
            a = torch._grouped_mm(x, prep(w1), offs=offs)
            return torch._grouped_mm(act(a), prep(w2), offs=offs)

        def fwdbwd():
            x.grad = None
            w1.grad = None
            w2.grad = None
            fwd().backward(g)

        with torch.no_grad():
            tf = median_ms(fwd)
        tb = median_ms(fwdbwd, warm=2, reps=6)
        res[tag] = {"fwd_ms": tf, "fwdbwd_ms": tb}
        row(name, "experts", tag, tf, tb, flops)

    # Hugging Face layout: gate_up [E, 2I, H], down [E, H, I] (out, in)
    w1 = (torch.randn(E, 2 * I, H, device=DEV, dtype=torch.bfloat16) * 0.02).requires_grad_()
    w2 = (torch.randn(E, H, I, device=DEV, dtype=torch.bfloat16) * 0.02).requires_grad_()
    measure("gmm_view", w1, w2, lambda w: w.transpose(-2, -1))
    measure("gmm_copy", w1, w2, lambda w: w.transpose(-2, -1).contiguous())
    del w1, w2
    torch.cuda.empty_cache()
    w1 = (torch.randn(E, H, 2 * I, device=DEV, dtype=torch.bfloat16) * 0.02).requires_grad_()
    w2 = (torch.randn(E, I, H, device=DEV, dtype=torch.bfloat16) * 0.02).requires_grad_()
    measure("gmm_kn", w1, w2, lambda w: w)
    del w1, w2, x, g
    torch.cuda.empty_cache()
    out[name + "/experts"] = res


def hf_block(name, E, H, I, k, T, out):
    try:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe import modeling_qwen3_moe as qm
    except Exception as ex:  # transformers missing: say so, keep going
        print(f"{name}: no transformers ({ex!r})")
        return
    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E,
                         num_experts_per_tok=k, norm_topk_prob=True,
                         intermediate_size=4 * H, num_hidden_layers=1)
    cfg._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    block = qm.Qwen3MoeSparseMoeBlock(cfg).to(DEV, torch.bfloat16)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(1, T, H, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(1, T, H, device=DEV, dtype=torch.bfloat16)

    def fwd():
        o = block(x)
        return o[0] if isinstance(o, tuple) else o

    def fwdbwd():
        x.grad = None
        block.zero_grad(set_to_none=True)
        fwd().backward(g)

    with torch.no_grad():
        tf = median_ms(fwd)
    tb = median_ms(fwdbwd, warm=2, reps=6)
    flops = 2 * T * k * H * 2 * I + 2 * T * k * I * H
    out[name + "/hf_block_grouped_mm"] = {"fwd_ms": tf, "fwdbwd_ms": tb}
    row(name, "layer", "hf_block", tf, tb, flops)
    del block, x, g
    torch.cuda.empty_cache()


def row(name, what, tag, tf, tb, flops):
    print(f"{name:16s} {what:8s} {tag:10s} fwd {tf:8.3f} ms ({flops / tf / 1e9:4.0f} TF)"
          f"  fwd+bwd {tb:8.3f} ms ({3 * flops / tb / 1e9:4.0f} TF)", flush=True)


def main():
    want = sys.argv[1:] or list(SHAPES)
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    print(f"device: {out['device']}, torch {out['torch']}", flush=True)
    for name in want:
        E, H, I, k, T = SHAPES[name]
        expert_gemms(name, E, H, I, k, T, out)
        if name != "qwen35_ep4_local":
            hf_block(name, E, H, I, k, T, out)
    dest = os.environ.get("OUT")
    if dest:
        with open(os.path.join(dest, "torch_baselines.json"), "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
