"""Hugging Face Qwen3MoeSparseMoeBlock (router + experts), bf16, one GPU:
forward and forward+backward with experts_implementation = libmoe /
grouped_mm / eager, and transformers' grouped_mm path with _grouped_mm
patched to libmoe.torch.grouped_mm ("grouped_mm+patch"), in both weight
layouts (contiguous [E, 2I, H] and is_transposed [E, H, 2I]), with the peak
memory of a forward+backward above the block's weights, inputs and grads.

    python3 bench/gpu/hf_block.py            # JSON lines; $OUT/hf_block.json
    HF_BLOCK_ONLY=qwen3_30b_a3b python3 ...  # one workload

Timings: CUDA events, median of REP runs after warm-up. Eager (a Python loop
over experts) is time-boxed: at Qwen3.5 (512 experts) forward only, once.
Each libmoe row also reports its output's relative difference from
grouped_mm's on the same weights and tokens.
"""

import json
import os
import time

import torch
import transformers
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe import modeling_qwen3_moe as qm

import libmoe
import libmoe.hf
from timing import median_ms

DEV = "cuda"
REP = int(os.environ.get("HF_BLOCK_REP", "5"))
WORK = [  # name, H, I, E, k, tokens
    ("qwen3_30b_a3b", 2048, 768, 128, 8, 16384),
    ("qwen35_397b_a17b", 4096, 1024, 512, 10, 8192),
]


def bench(fn, warm=2, rep=REP):
    return median_ms(fn, warm, rep)


def make_block(H, I, E, k, transposed):
    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E,
                         num_experts_per_tok=k, norm_topk_prob=True,
                         intermediate_size=4 * H, num_hidden_layers=1)
    cfg._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    blk = qm.Qwen3MoeSparseMoeBlock(cfg).to(DEV, torch.bfloat16)
    for p in blk.parameters():
        torch.nn.init.normal_(p, std=0.02)
    if transposed:
        ex = blk.experts
        with torch.no_grad():
            ex.gate_up_proj = torch.nn.Parameter(
                ex.gate_up_proj.transpose(1, 2).contiguous())
            ex.down_proj = torch.nn.Parameter(
                ex.down_proj.transpose(1, 2).contiguous())
        ex.is_transposed = True
    return cfg, blk


def main():
    libmoe.hf.register()
    print("transformers", transformers.__version__, "torch", torch.__version__,
          torch.cuda.get_device_name(0), "libmoe", libmoe.__version__,
          flush=True)
    only = os.environ.get("HF_BLOCK_ONLY")
    res = {}
    out_path = os.path.join(os.environ.get("OUT", "."), "hf_block.json")
    for name, H, I, E, k, T in WORK:
        if only and name != only:
            continue
        for layout in ("contiguous", "transposed"):
            cfg, blk = make_block(H, I, E, k, layout == "transposed")
            x = torch.randn(1, T, H, device=DEV, dtype=torch.bfloat16,
                            requires_grad=True)
            g = torch.randn(1, T, H, device=DEV, dtype=torch.bfloat16)
            ref_out = None
            impls = ["grouped_mm", "libmoe", "grouped_mm+patch"]
            if layout == "contiguous":  # eager ignores is_transposed
                impls.append("eager")
            for impl in impls:
                key = f"{name}/{layout}/{impl}"
                cfg._experts_implementation = impl.split("+")[0]
                if impl.endswith("+patch"):
                    libmoe.hf.patch_grouped_mm()

                def fwd():
                    with torch.no_grad():
                        return blk(x)

                def fb():
                    x.grad = None
                    blk.zero_grad(set_to_none=True)
                    o = blk(x)
                    o = o[0] if isinstance(o, tuple) else o
                    o.backward(g)

                r = {}
                try:
                    slow = impl == "eager" and E > 128
                    t0 = time.time()
                    r["fwd_ms"] = bench(fwd, warm=0 if slow else 2,
                                        rep=1 if slow else REP)
                    out = fwd()
                    out = out[0] if isinstance(out, tuple) else out
                    if impl == "grouped_mm":
                        ref_out = out.float()
                    elif ref_out is not None:
                        r["rel_vs_grouped_mm"] = ((out.float() - ref_out).abs()
                                                  .max() / ref_out.abs().max()
                                                  ).item()
                    del out
                    if not slow:
                        r["fwdbwd_ms"] = bench(fb, warm=1,
                                               rep=3 if impl == "eager" else REP)
                        x.grad = None
                        blk.zero_grad(set_to_none=True)
                        torch.cuda.synchronize()
                        base = torch.cuda.memory_allocated()
                        torch.cuda.reset_peak_memory_stats()
                        fb()
                        torch.cuda.synchronize()
                        # above weights + x + g (grads are part of the peak)
                        r["peak_fwdbwd_GiB"] = (torch.cuda.max_memory_allocated()
                                                - base) / 2**30
                    r["wall_s"] = round(time.time() - t0, 1)
                except Exception as e:  # report, keep going
                    r["error"] = repr(e)[:300]
                finally:
                    if impl.endswith("+patch"):
                        libmoe.hf.unpatch_grouped_mm()
                x.grad = None
                blk.zero_grad(set_to_none=True)
                res[key] = r
                print(key, json.dumps(r), flush=True)
                with open(out_path, "w") as f:
                    json.dump(res, f, indent=1)
            del blk, x, g, ref_out
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
