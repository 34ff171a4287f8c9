"""Issue 17's GPU workloads: Hugging Face MoE blocks (router + experts) whose
experts need the new expert functions, forward+backward, bf16, one GPU,
experts_implementation = libmoe against transformers' grouped_mm:

  gpt_oss_20b     GptOssMLP: E=32, H=2880, I=2880, k=4, biases, gpt-oss
                  gating with clamps, interleaved gate/up in [E, H, 2I]
                  storage (is_transposed); 16k tokens
  qwen3_30b_geglu Qwen3MoeSparseMoeBlock at Qwen3-30B-A3B's shape (E=128,
                  H=2048, I=768, k=8) with GeGLU experts
                  (hidden_act="gelu_pytorch_tanh"); 16k tokens

    python3 bench/gpu/hf_act_block.py     # JSON lines; $OUT/hf_act_block.json
    HF_ACT_ONLY=gpt_oss_20b python3 ...   # one workload
    HF_ACT_SMOKE=1 python3 ...            # tiny sizes, f32, on the CPU

Timings: CUDA events (wall clock in the CPU smoke run), median of REP runs
after warm-up. Each libmoe row reports its output's relative difference
from grouped_mm's on the same weights and tokens, and the speedup.
"""

import json
import os

import torch
import transformers

import libmoe
import libmoe.hf
from timing import median_ms

SMOKE = os.environ.get("HF_ACT_SMOKE") == "1"
DEV = "cpu" if SMOKE else "cuda"
DT = torch.float32 if SMOKE else torch.bfloat16
REP = int(os.environ.get("HF_ACT_REP", "5"))
WORK = {  # name: (H, I, E, k, tokens)
    "gpt_oss_20b": (2880, 2880, 32, 4, 16384),
    "qwen3_30b_geglu": (2048, 768, 128, 8, 16384),
}
if SMOKE:
    WORK = {"gpt_oss_20b": (64, 32, 8, 4, 256),
            "qwen3_30b_geglu": (64, 32, 16, 4, 256)}


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def bench(fn, warm=2, rep=REP):
    return median_ms(fn, warm, rep, DEV)


def make_block(name, H, I, E, k):
    torch.manual_seed(0)
    if name == "gpt_oss_20b":
        from transformers import GptOssConfig
        from transformers.models.gpt_oss import modeling_gpt_oss as m
        cfg = GptOssConfig(hidden_size=H, intermediate_size=I,
                           num_local_experts=E, num_experts_per_tok=k,
                           num_hidden_layers=1)
        blk = m.GptOssMLP(cfg)
    else:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe import modeling_qwen3_moe as m
        cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I,
                             num_experts=E, num_experts_per_tok=k,
                             norm_topk_prob=True, intermediate_size=4 * H,
                             num_hidden_layers=1,
                             hidden_act="gelu_pytorch_tanh")
        blk = m.Qwen3MoeSparseMoeBlock(cfg)
    blk = blk.to(DEV, DT)
    with torch.no_grad():
        for n, p in blk.named_parameters():
            p.normal_(0, 0.02 if "bias" not in n else 0.1)
    cfg._experts_implementation = "grouped_mm"
    return cfg, blk


def main():
    libmoe.hf.register()
    dev = torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu (smoke)"
    print("transformers", transformers.__version__, "torch", torch.__version__,
          dev, "libmoe", libmoe.__version__, flush=True)
    only = os.environ.get("HF_ACT_ONLY")
    res = {}
    out_path = os.path.join(os.environ.get("OUT", "."), "hf_act_block.json")
    for name, (H, I, E, k, T) in WORK.items():
        if only and name != only:
            continue
        cfg, blk = make_block(name, H, I, E, k)
        reason = libmoe.hf.unsupported_reason(blk.experts)
        print(name, "libmoe serves it" if reason is None else
              f"libmoe declines: {reason}", flush=True)
        x = torch.randn(1, T, H, device=DEV, dtype=DT, requires_grad=True)
        g = torch.randn(1, T, H, device=DEV, dtype=DT)
        ref = base = None
        for impl in ("grouped_mm", "libmoe"):
            cfg._experts_implementation = impl
            os.environ["LIBMOE_HF"] = "1"  # a decline raises, never hides

            def fwd():
                with torch.no_grad():
                    o = blk(x)
                return o[0] if isinstance(o, tuple) else o

            def fb():
                x.grad = None
                blk.zero_grad(set_to_none=True)
                o = blk(x)
                o = o[0] if isinstance(o, tuple) else o
                o.backward(g)

            r = {}
            try:
                r["fwd_ms"] = bench(fwd)
                out = fwd().float()
                if ref is None:
                    ref = out
                else:
                    r["rel_vs_grouped_mm"] = ((out - ref).abs().max() /
                                              ref.abs().max()).item()
                r["fwdbwd_ms"] = bench(fb, warm=1)
                if base is None:
                    base = r["fwdbwd_ms"]
                else:
                    r["speedup_fwdbwd"] = round(base / r["fwdbwd_ms"], 3)
            except Exception as e:  # report, keep going
                r["error"] = repr(e)[:300]
            key = f"{name}/{impl}"
            res[key] = r
            print(key, json.dumps(r), flush=True)
            with open(out_path, "w") as f:
                json.dump(res, f, indent=1)
        del blk, x, g, ref
        if DEV == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
