#!/usr/bin/env python3
"""A plain PyTorch expert-parallel MoE layer over NCCL: the reference for
`moe bench --device cuda --ep N` (bench/gpu/run.sh runs both on the same GPUs
in the same call).

    torchrun --nproc_per_node N bench/gpu/torch_ep.py [--shape NAME] [--tokens T]

Every rank holds T tokens. Three forms of the same layer, bf16, Hugging Face
weight layout (gate_up [E, 2I, H], down [E, H, I]):
  ep1    all E experts on every GPU, no exchange (data-parallel replicas);
  local  the EP=N local work alone: E/N experts, routing over them, no
         exchange (what the exchange adds = epN - local);
  epN    E/N experts per GPU: the routed rows travel by all_to_all.
One step: router (x @ Wg^T, f32 softmax, top-k, renormalised), rows sorted by
expert (stable), the per-expert counts exchanged by all_to_all and read on the
host (the split sizes), the rows by an autograd all_to_all, regrouped by local
expert, torch._grouped_mm gate_up -> SwiGLU -> grouped_mm down, back to
arrival order, all_to_all back, weighted sum per token. Backward by autograd.
Times: CUDA events around each step, every step started together on all
ranks (barrier), the slowest rank per step, median over the repetitions.
Rank 0 prints one line per (layout, pass) and, with $OUT set, writes
torch_ep_<shape>_p<N>.json there.
"""
import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.nn.functional import all_to_all_single as a2a_grad

SHAPES = {  # E, H, I, top_k
    "qwen35": (512, 4096, 1024, 10),
    "qwen3_30b": (128, 2048, 768, 8),
}


def moe_step(x, wg, w1, w2, k, E, P, ep):
    """The layer's forward; autograd gives the backward."""
    T, H = x.shape
    El = E // P if ep else E
    logits = x @ wg.t()
    probs = logits.float().softmax(dim=-1)
    topw, topi = probs.topk(k, dim=-1)
    topw = topw / topw.sum(dim=-1, keepdim=True)
    flat = topi.reshape(-1)
    order = flat.argsort(stable=True)
    tok = order // k
    xs = x[tok]  # this rank's routed rows, sorted by global expert
    counts = torch.bincount(flat, minlength=E)
    if ep:
        got = torch.empty_like(counts)
        dist.all_to_all_single(got, counts)  # El counts per rank pair
        got = got.view(P, El)
        send = counts.view(P, El).sum(dim=1).tolist()  # host reads the sizes
        recv = got.sum(dim=1).tolist()
        xr = a2a_grad(x.new_empty(sum(recv), H), xs, recv, send)
        # arrival order is (source rank, expert): regroup by expert
        eid = torch.repeat_interleave(
            torch.arange(El, device=x.device).repeat(P), got.reshape(-1))
        perm = eid.argsort(stable=True)
        xe = xr[perm]
        offs = got.sum(dim=0).cumsum(0).to(torch.int32)
    else:
        xe = xs
        offs = counts.cumsum(0).to(torch.int32)
    h = torch._grouped_mm(xe, w1.transpose(-2, -1), offs=offs)
    gate, up = h.chunk(2, dim=-1)
    ye = torch._grouped_mm(F.silu(gate) * up, w2.transpose(-2, -1), offs=offs)
    if ep:
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=x.device)
        ys = a2a_grad(x.new_empty(xs.shape[0], H), ye[inv], send, recv)
    else:
        ys = ye
    w = topw.reshape(-1)[order].to(x.dtype).unsqueeze(1)
    return torch.zeros_like(x).index_add(0, tok, ys * w)


def timed(fn, warm, reps):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        dist.barrier()
        torch.cuda.synchronize()
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    t = torch.tensor(times, device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank per step
    t = t.sort().values.tolist()
    return t[len(t) // 2], t[0], t[-1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen35", choices=list(SHAPES))
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    dist.init_process_group("nccl")
    rank, P = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    E, H, I, k = SHAPES[args.shape]
    T = args.tokens
    dev, dt = "cuda", torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(1234 + rank)
    x = torch.randn(T, H, device=dev, dtype=dt, generator=gen).requires_grad_()
    g = torch.randn(T, H, device=dev, dtype=dt, generator=gen)
    wg = (torch.randn(E, H, device=dev, dtype=dt) * 0.05).requires_grad_()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "gpus": P, "shape": args.shape, "E": E, "H": H, "I": I, "k": k,
           "tokens_per_gpu": T}
    flops = 6.0 * T * k * H * I  # expert GEMMs per GPU, forward
    # ep1: all experts; local: the EP=P local work alone (E/P experts, no
    # exchange); epP: expert parallel
    modes = [("ep1", E, False)]
    if P > 1:
        modes += [("local", E // P, False), (f"ep{P}", E, True)]
    for tag, Eg, ep in modes:
        El = E // P if ep else Eg
        w1 = (torch.randn(El, 2 * I, H, device=dev, dtype=dt) * 0.03).requires_grad_()
        w2 = (torch.randn(El, H, I, device=dev, dtype=dt) * 0.03).requires_grad_()
        wr = wg[:Eg].detach().clone().requires_grad_()

        def fwd():
            with torch.no_grad():
                moe_step(x, wr, w1, w2, k, Eg, P, ep)

        def fwdbwd():
            for p in (x, wr, w1, w2):
                p.grad = None
            moe_step(x, wr, w1, w2, k, Eg, P, ep).backward(g)

        for name, fn, f in (("fwd", fwd, flops), ("fwd+bwd", fwdbwd, 3 * flops)):
            med, mn, mx = timed(fn, 3, args.reps)
            res[f"{tag}/{name}"] = {"median_ms": med, "min_ms": mn, "max_ms": mx}
            if rank == 0:
                print(f"torch_ep {args.shape} gpus={P} {tag:5s} {name:8s} "
                      f"median {med:8.3f} ms  min {mn:8.3f}  max {mx:8.3f}  "
                      f"({f / med / 1e9:5.0f} TFLOP/s per GPU)", flush=True)
        del w1, w2, wr
        torch.cuda.empty_cache()
    out = os.environ.get("OUT")
    if rank == 0 and out:
        with open(os.path.join(out, f"torch_ep_{args.shape}_p{P}.json"), "w") as f:
            json.dump(res, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
