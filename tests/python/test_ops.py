"""libmoe.torch.experts and libmoe.torch.grouped_mm against float64
references, on random inputs of odd sizes, every weight layout, empty
experts, one expert taking every row, and out-of-range routing indices."""

import pytest
import torch
import torch.nn.functional as F

import libmoe.torch as lt
from conftest import DEVICE, rel

E, H, I, K, T = 7, 37, 19, 3, 41
# f32: 1e-5 on the CPU; the CUDA kernels' f32 path sums in another order
# (tensor-core tiles), 1e-4 there. bf16: 2e-2.
TOL = {torch.float32: 1e-5 if DEVICE.type == "cpu" else 1e-4,
       torch.bfloat16: 2e-2}


def ref_experts(x, idx, w, gu, dn):
    """float64 loop over tokens and slots; indices outside [0, E) skipped."""
    x, w, gu, dn = x.double(), w.double(), gu.double(), dn.double()
    out = torch.zeros_like(x)
    n = gu.shape[0]
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            if e < 0 or e >= n:
                continue
            g, u = (gu[e] @ x[t]).chunk(2)
            out[t] = out[t] + w[t, j] * (dn[e] @ (F.silu(g) * u))
    return out


def weights(layout, dtype, e=E):
    """gate_up [E, 2I, H] and down [E, H, I] as views of the requested
    storage: "out_in" (contiguous), "in_out" (transposed views of [E, H, 2I]
    and [E, I, H] storage), "strided" (every 2nd column of a wider buffer)."""
    g = torch.Generator().manual_seed(7)
    def mk(shape):
        return (torch.rand(shape, generator=g) - 0.5) * 0.6
    if layout == "out_in":
        gu, dn = mk((e, 2 * I, H)), mk((e, H, I))
    elif layout == "in_out":
        gu, dn = mk((e, H, 2 * I)).transpose(1, 2), mk((e, I, H)).transpose(1, 2)
    else:
        gu = mk((e, 2 * I, 2 * H))[:, :, ::2]
        dn = mk((e, H, 2 * I))[:, :, ::2]
    gu = gu.to(DEVICE, dtype).detach().requires_grad_()
    dn = dn.to(DEVICE, dtype).detach().requires_grad_()
    return gu, dn


def routing(pattern, t=T, e=E, k=K, seed=3):
    g = torch.Generator().manual_seed(seed)
    if pattern == "random":  # experts 0 and E-1 never chosen: empty experts
        idx = torch.stack([torch.randperm(e - 2, generator=g)[:k] + 1
                           for _ in range(t)])
    elif pattern == "one":  # expert 2 takes every token's first slot
        idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
        idx[:, 0] = 2
        idx[:, 1:] = torch.where(idx[:, 1:] == 2, 0, idx[:, 1:])
    w = torch.rand((t, k), generator=g) + 0.1
    return idx.to(DEVICE), w.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["out_in", "in_out", "strided"])
@pytest.mark.parametrize("pattern", ["random", "one"])
def test_experts_vs_float64(dtype, layout, pattern):
    gu, dn = weights(layout, dtype)
    idx, w = routing(pattern)
    w = w.to(dtype).requires_grad_()
    g = torch.Generator().manual_seed(5)
    x = (torch.rand((T, H), generator=g) - 0.5).to(DEVICE, dtype).requires_grad_()
    go = (torch.rand((T, H), generator=g) - 0.5).to(DEVICE, dtype)
    y = lt.experts(x, idx, w, gu, dn)
    grads = torch.autograd.grad(y, (x, w, gu, dn), go)
    leaves = [t.detach().double().requires_grad_() for t in (x, w, gu, dn)]
    yr = ref_experts(leaves[0], idx, *leaves[1:])
    grads_r = torch.autograd.grad(yr, leaves, go.double())
    tol = TOL[dtype]
    assert rel(y, yr) < tol
    for name, a, b, src in zip(("x", "w", "gate_up", "down"), grads, grads_r,
                               (x, w, gu, dn)):
        assert rel(a, b) < tol, name
        assert a.stride() == src.stride(), name  # the tensor's own strides
    if pattern == "random":  # experts nobody chose: exact zero gradients
        assert grads[2][0].abs().max().item() == 0
        assert grads[3][E - 1].abs().max().item() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_invalid_topk(dtype):
    """Sentinels (>= E, weight 0) and negatives: "error" raises naming the
    slot, "drop" ignores them (zero output contribution, zero gradient)."""
    gu, dn = weights("in_out", dtype)
    idx, w = routing("random")
    idx = idx.clone()
    idx[3, 1] = E  # HF EP sentinel
    idx[7, :] = E + 5  # a token routed entirely elsewhere
    idx[9, 2] = -1
    w = w.clone()
    w[idx >= E] = 0.0
    w = w.to(dtype).requires_grad_()
    x = torch.rand((T, H), device=DEVICE).to(dtype).requires_grad_()
    with pytest.raises(RuntimeError, match=r"topk_index\[3\]\[1\]"):
        lt.experts(x, idx, w, gu, dn)
    y = lt.experts(x, idx, w, gu, dn, invalid_topk="drop")
    yr = ref_experts(x.detach(), idx, w.detach(), gu.detach(), dn.detach())
    assert rel(y, yr) < TOL[dtype]
    assert y[7].abs().max().item() == 0
    gx, gw = torch.autograd.grad(y.sum(), (x, w))
    assert gx[7].abs().max().item() == 0
    assert gw[idx >= E].abs().max().item() == 0 and gw[9, 2].item() == 0


def ref_grouped_mm(x, w, offs):
    out = torch.zeros(x.shape[0], w.shape[2], dtype=torch.float64,
                      device=x.device)
    start = 0
    for e, end in enumerate(offs.tolist()):
        out[start:end] = x[start:end].double() @ w[e].double()
        start = end
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
def test_grouped_mm_vs_float64(dtype, transposed):
    S, Kd, N = 53, 37, 23
    g = torch.Generator().manual_seed(11)
    if transposed:  # what transformers passes: weight.transpose(-2, -1)
        wt = (torch.rand((E, N, Kd), generator=g) - 0.5).to(DEVICE, dtype)
        wt.requires_grad_()
        w = wt.transpose(-2, -1)
        leaf = wt
    else:
        w = (torch.rand((E, Kd, N), generator=g) - 0.5).to(DEVICE, dtype)
        w.requires_grad_()
        leaf = w
    # groups: an empty one, uneven sizes, 5 tail rows past offs[-1]
    sizes = [9, 0, 13, 1, 17, 4, 4]
    offs = torch.tensor(sizes, dtype=torch.int32).cumsum(0).to(torch.int32)
    offs = offs.to(DEVICE)
    x = (torch.rand((S, Kd), generator=g) - 0.5).to(DEVICE, dtype)
    x.requires_grad_()
    go = (torch.rand((S, N), generator=g) - 0.5).to(DEVICE, dtype)
    y = lt.grouped_mm(x, w, offs)
    gx, gl = torch.autograd.grad(y, (x, leaf), go)
    xd = x.detach().double().requires_grad_()
    ld = leaf.detach().double().requires_grad_()
    yr = ref_grouped_mm(xd, ld.transpose(-2, -1) if transposed else ld, offs)
    gxr, glr = torch.autograd.grad(yr, (xd, ld), go.double())
    tol = TOL[dtype]
    assert rel(y, yr) < tol and rel(gx, gxr) < tol and rel(gl, glr) < tol
    assert y[offs[-1]:].abs().max().item() == 0  # tail rows: zero
    assert gx[offs[-1]:].abs().max().item() == 0
    assert gl.stride() == leaf.stride()
    assert gl[1].abs().max().item() == 0  # empty group: zero gradient


def test_opcheck():
    from torch.library import opcheck
    gu, dn = weights("in_out", torch.float32)
    idx, w = routing("random")
    x = torch.rand((T, H), device=DEVICE).requires_grad_()
    w = w.requires_grad_()
    opcheck(torch.ops.libmoe.experts_fwd.default, (x, idx, w, gu, dn, 0),
            test_utils=("test_schema", "test_autograd_registration",
                        "test_faketensor", "test_aot_dispatch_dynamic"))
    offs = torch.tensor([5, 5, 20, 30, 31, 40, 41], dtype=torch.int32,
                        device=DEVICE)
    xw = torch.rand((41, H), device=DEVICE).requires_grad_()
    wt = torch.rand((E, 13, H), device=DEVICE).requires_grad_()
    opcheck(torch.ops.libmoe.grouped_mm.default,
            (xw, wt.transpose(-2, -1), offs))


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA streams")
def test_side_stream():
    """On a side stream, the ops enqueue on torch.cuda.current_stream() and
    their results (and gradients) are bitwise those of the default stream."""
    gu, dn = weights("in_out", torch.bfloat16)
    idx, w = routing("random")
    w = w.to(torch.bfloat16).requires_grad_()
    x = torch.rand((T, H), device=DEVICE).to(torch.bfloat16).requires_grad_()
    y0 = lt.experts(x, idx, w, gu, dn)
    g0 = torch.autograd.grad(y0.sum(), (x, w, gu, dn))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        # a big matmul first, so a result read from the wrong stream would
        # not be ready yet
        big = torch.randn(4096, 4096, device=DEVICE)
        for _ in range(4):
            big = big @ big / 64
        y1 = lt.experts(x, idx, w, gu, dn)
        g1 = torch.autograd.grad(y1.sum(), (x, w, gu, dn))
        offs = torch.tensor([5, 5, 20, 30, 31, 40, 41], dtype=torch.int32,
                            device=DEVICE)
        wt = gu.detach()[:, :11, :].transpose(1, 2)  # [E, H, 11] view
        z1 = lt.grouped_mm(x.detach(), wt, offs)
    torch.cuda.current_stream().wait_stream(s)
    z0 = lt.grouped_mm(x.detach(), wt, offs)
    assert torch.equal(z0, z1)
    assert torch.equal(y0, y1)
    for a, b in zip(g0, g1):
        assert torch.equal(a, b)


def test_one_plan_per_capacity():
    """A varying token count reuses one plan per key: the plan's max_tokens
    is a capacity (the next power of two >= T, at least 256) that serves
    every T up to it, with saved and workspace sized for the actual T; a
    larger T replaces it with one of twice the capacity or more, which then
    serves every smaller T too. Results stay those of the float64 reference
    at every T."""
    e, k = 5, 2  # a key no other test uses
    gu, dn = weights("in_out", torch.float32, e=e)
    made0 = lt._plans_made
    # T -> the capacity of the key's plan after the call: 256 up to T = 256,
    # 512 from T = 300 on (T = 7 included), 1024 from T = 513 on (twice
    # 512, and the next power of two >= 513)
    want = {5: 256, 37: 256, 200: 256, 1: 256, 256: 256, 300: 512, 7: 512,
            513: 1024, 2: 1024}
    for t in want:
        idx, w = routing("random", t=t, e=e, k=k, seed=t)
        w = w.requires_grad_()
        g = torch.Generator().manual_seed(t)
        x = (torch.rand((t, H), generator=g) - 0.5).to(DEVICE).requires_grad_()
        y = lt.experts(x, idx, w, gu, dn)
        gx, gw = torch.autograd.grad(y.sum(), (x, w))
        leaves = [v.detach().double().requires_grad_() for v in (x, w)]
        yr = ref_experts(leaves[0], idx, leaves[1], gu.detach(), dn.detach())
        gxr, gwr = torch.autograd.grad(yr.sum(), leaves)
        tol = TOL[torch.float32]
        assert rel(y, yr) < tol and rel(gx, gxr) < tol and rel(gw, gwr) < tol
        p = lt._plan_for(x.shape, k, gu, dn, torch.float32, x.device, 0,
                         overwrite=lt.overwrite_saved)
        assert [q for q in lt._plans.values() if q is p] == [p]
        assert p.capacity == want[t], t
        s = p.sizes(t)
        es, S = 4, t * k
        # Issue 16's bound on the saved state, both layers
        assert S * 2 * I * es <= s.saved <= S * 2 * I * es + 16 * S + 64 * e
        assert min(s.fwd_workspace, s.bwd_workspace, s.infer_workspace) > 0
    assert lt._plans_made - made0 == 3


def test_backward_after_the_plan_grew():
    """Two micro-batches in flight (pipeline parallelism, gradient
    accumulation): the second forward grows the key's plan before the
    first's backward runs, which then takes the larger plan. The saved
    state is laid out by T alone, so the gradients are those of the
    float64 reference, and on the CPU (whose plan does not depend on its
    capacity) those of a run where the plan never grew, bit for bit."""
    e, k, t1 = 6, 3, 41
    gu, dn = weights("out_in", torch.float32, e=e)
    gu, dn = gu.detach().requires_grad_(), dn.detach().requires_grad_()

    def batch(t, seed):
        idx, w = routing("random", t=t, e=e, k=k, seed=seed)
        g = torch.Generator().manual_seed(seed)
        x = (torch.rand((t, H), generator=g) - 0.5).to(DEVICE)
        return x.requires_grad_(), idx, w.requires_grad_()

    def grads(y, x, w):
        return torch.autograd.grad(y.sum(), (x, w, gu, dn))

    x, idx, w = batch(t1, 3)
    alone = grads(lt.experts(x, idx, w, gu, dn), x, w)
    p0 = lt._plan_for(x.shape, k, gu, dn, torch.float32, x.device, 0,
                      overwrite=lt.overwrite_saved)
    made = lt._plans_made
    y1 = lt.experts(x, idx, w, gu, dn)
    x2, idx2, w2 = batch(p0.capacity + 1, 4)
    y2 = lt.experts(x2, idx2, w2, gu, dn)  # grows the key
    assert lt._plans_made == made + 1
    p = lt._plan_for(x.shape, k, gu, dn, torch.float32, x.device, 0,
                      overwrite=lt.overwrite_saved)
    assert p is not p0 and p.capacity >= 2 * p0.capacity
    late = grads(y1, x, w)  # the backward on the larger plan
    if DEVICE == "cpu":  # CUDA: the larger plan's passes may differ
        for a, b in zip(alone, late):
            assert torch.equal(a, b)
    del y2
    leaves = [v.detach().double().requires_grad_() for v in (x, w, gu, dn)]
    yr = ref_experts(leaves[0], idx, leaves[1], leaves[2], leaves[3])
    refs = torch.autograd.grad(yr.sum(), leaves)
    for a, r in zip(late, refs):
        assert rel(a, r) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_every_byte_written(dtype):
    """The forward op's `saved` output comes from torch.empty (no memset):
    every byte of it must be the layer's. The memory it lands in is first
    filled with 0xff, then with 0x00 (a freed block of that size is what
    the allocator hands out next); the two outputs must be the same bytes.
    Odd sizes, dropped slots (rows no GEMM writes) and a plan made for more
    tokens than the call has."""
    t, e, k = 37, 7, 3
    gu, dn = weights("out_in", dtype, e=e)
    idx, w = routing("random", t=t, e=e, k=k, seed=11)
    idx = idx.clone()
    idx[::4, 1] = -1  # dropped slots
    idx[1::5, 2] = e + 2
    g = torch.Generator().manual_seed(5)
    x = (torch.rand((t, H), generator=g) - 0.5).to(DEVICE, dtype)
    drop = lt._INVALID["drop"]
    lt._plan_for((300, H), k, gu, dn, dtype, x.device, drop)  # capacity 512
    p = lt._plan_for(x.shape, k, gu, dn, dtype, x.device, drop)
    assert p.capacity >= 512
    n = p.sizes(t).saved
    outs = []
    for fill in (0xFF, 0x00):
        junk = torch.full((n,), fill, dtype=torch.uint8, device=DEVICE)
        del junk
        out, saved = torch.ops.libmoe.experts_fwd(x, idx, w, gu.detach(),
                                                  dn.detach(), drop)
        outs.append((out, saved))
    assert outs[0][1].numel() == n
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])


def test_workspace_at_capacity():
    """libmoe.torch.workspace_at_capacity (workspace sized at the plan's
    capacity, not T) changes no bit of the output or the gradients."""
    t, e, k = 45, 5, 2
    gu, dn = weights("in_out", torch.float32, e=e)
    idx, w = routing("random", t=t, e=e, k=k, seed=9)
    g = torch.Generator().manual_seed(9)
    x0 = (torch.rand((t, H), generator=g) - 0.5).to(DEVICE)
    res = []
    for at_cap in (False, True):
        lt.workspace_at_capacity = at_cap
        try:
            x = x0.clone().requires_grad_()
            y = lt.experts(x, idx, w, gu, dn)
            grads = torch.autograd.grad((y * y).sum(), (x, gu, dn))
        finally:
            lt.workspace_at_capacity = False
        res.append((y.detach(),) + grads)
    for a, b in zip(*res):
        assert torch.equal(a, b)


def test_memory_policy():
    """libmoe.torch.memory (desc.memory) reaches the C plan, one plan per
    policy, and a name that is not a policy is refused naming the knob. On
    the CPU (no passes to trade) the sizes are the same under each policy.
    On CUDA, at a hidden size with room for passes (H = 1024, I = 512,
    with the backward overwriting saved, the binding's default): "fast"
    runs one pass, "lean" passes of 256 columns forward and a smaller peak
    than "balanced", and the three give the same bits for the output and
    every gradient."""
    t, e, k = 41, 5, 2
    gu, dn = weights("in_out", torch.bfloat16, e=e)
    idx, w = routing("random", t=t, e=e, k=k, seed=21)
    g = torch.Generator().manual_seed(21)
    x0 = (torch.rand((t, H), generator=g) - 0.5).to(DEVICE, torch.bfloat16)
    keep = lt.memory
    try:
        plans = []
        for m in ("balanced", "lean", "fast"):
            lt.memory = m
            p = lt._plan_for(x0.shape, k, gu, dn, x0.dtype, x0.device,
                             lt._INVALID["error"])
            assert p.desc.memory == lt._MEMORY[m]
            plans.append(p)
        assert len({id(p) for p in plans}) == 3
        if DEVICE.type == "cpu":
            sz = [tuple(getattr(p.sizes(t), f) for f in
                        ("saved", "fwd_workspace", "bwd_workspace",
                         "infer_workspace")) for p in plans]
            assert sz[0] == sz[1] == sz[2], sz
        lt.memory = "small"
        with pytest.raises(ValueError, match="libmoe.torch.memory"):
            lt.experts(x0, idx, w, gu, dn)
        if DEVICE.type != "cuda":
            return
        h, i, e2, t2 = 1024, 512, 4, 600
        g = torch.Generator().manual_seed(22)
        gub = ((torch.rand((e2, 2 * i, h), generator=g) - 0.5) * 0.1).to(
            DEVICE, torch.bfloat16)
        dnb = ((torch.rand((e2, h, i), generator=g) - 0.5) * 0.1).to(
            DEVICE, torch.bfloat16)
        xb = (torch.rand((t2, h), generator=g) - 0.5).to(DEVICE,
                                                         torch.bfloat16)
        ib, wb = routing("random", t=t2, e=e2, k=k, seed=22)
        peaks, res = {}, []
        for m in ("balanced", "lean", "fast"):
            lt.memory = m
            p = lt._plan_for(xb.shape, k, gub, dnb, torch.bfloat16, DEVICE,
                             lt._INVALID["error"], overwrite=True)
            ex, z = p.explain(), p.sizes(t2)
            peaks[m] = z.saved + max(z.fwd_workspace, z.bwd_workspace)
            if m == "lean":
                assert " x 256, backward" in ex, ex
            if m == "fast":
                assert "one pass (desc.memory = fast)" in ex, ex
            x = xb.clone().requires_grad_()
            gw, dw = gub.clone().requires_grad_(), dnb.clone().requires_grad_()
            y = lt.experts(x, ib, wb, gw, dw)
            res.append((y.detach(),) + torch.autograd.grad(
                (y.float() ** 2).sum(), (x, gw, dw)))
        assert peaks["lean"] < peaks["balanced"] <= peaks["fast"], peaks
        for r in res[1:]:
            for a, b in zip(res[0], r):
                assert torch.equal(a, b)
    finally:
        lt.memory = keep


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_overwrite_saved(dtype):
    """libmoe.torch.overwrite_saved (the backward writes dH over the
    forward's saved pre-activation, desc.backward_overwrites_saved)
    changes no bit of the output or any gradient, with biases and dropped
    slots too; the backward that overwrites bumps the saved tensor's
    version, so a second backward through the graph (retain_graph=True)
    raises autograd's in-place error instead of reading overwritten bytes,
    while with overwrite_saved off it runs and gives the same gradients
    again. The flag reaches the C plan: its backward workspace is smaller
    by the [T*k, 2I] dH buffer."""
    t, e, k = 43, 6, 3
    gu, dn = weights("in_out", dtype, e=e)
    idx, w = routing("random", t=t, e=e, k=k, seed=13)
    idx = idx.clone()
    idx[::5, 1] = -1  # dropped slots
    g = torch.Generator().manual_seed(13)
    x0 = (torch.rand((t, H), generator=g) - 0.5).to(DEVICE, dtype)
    bgu = ((torch.rand((e, 2 * I), generator=g) - 0.5) * 0.2).to(DEVICE, dtype)
    bdn = ((torch.rand((e, H), generator=g) - 0.5) * 0.2).to(DEVICE, dtype)
    res = []
    keep = lt.overwrite_saved
    for ow in (False, True):
        lt.overwrite_saved = ow
        try:
            x = x0.clone().requires_grad_()
            wr = w.clone().requires_grad_()
            bg, bd = bgu.clone().requires_grad_(), bdn.clone().requires_grad_()
            y = lt.experts(x, idx, wr, gu, dn, invalid_topk="drop",
                           gate_up_bias=bg, down_bias=bd)
            loss = (y.float() * y.float()).sum()
            leaves = (x, wr, gu, dn, bg, bd)
            grads = torch.autograd.grad(loss, leaves, retain_graph=True)
            if ow:
                with pytest.raises(RuntimeError, match="inplace"):
                    torch.autograd.grad(loss, leaves)
            else:
                again = torch.autograd.grad(loss, leaves)
                for a, b in zip(grads, again):
                    assert torch.equal(a, b)
        finally:
            lt.overwrite_saved = keep
        res.append((y.detach(),) + grads)
    for a, b in zip(*res):
        assert torch.equal(a, b)
    sz = [lt._plan_for(x0.shape, k, gu, dn, dtype, x0.device,
                       lt._INVALID["drop"], overwrite=ow).sizes(t)
          for ow in (False, True)]
    es = torch.tensor([], dtype=dtype).element_size()
    cut = sz[0].bwd_workspace - sz[1].bwd_workspace
    dh = t * k * 2 * I * es
    # the CPU's cut is dH itself; CUDA's dH buffer also holds the router's
    # logits and their gradient ([t, e] f32 and layer dtype, 256-aligned),
    # which stay: the cut there is dH less those, to the 256 bytes the
    # workspace's size is rounded to
    keep = 0
    if x0.device.type == "cuda":
        keep = (t * e * 4 + 255) // 256 * 256 + t * e * es + 256
    assert dh - keep <= cut <= dh + 256, (cut, dh, keep)
    assert sz[0].saved == sz[1].saved


def test_overwrite_saved_compiled(monkeypatch):
    """overwrite_saved under torch.compile(fullgraph=True): the same bits as
    eager without it; and with the compiled graph's donated buffers off (so
    that retain_graph is allowed there), a second backward refused by the
    version the op bumped where it ran, not computed from dH read as H."""
    import torch._functorch.config as functorch_config
    monkeypatch.setattr(functorch_config, "donated_buffer", False)
    t, e, k = 29, 5, 2
    gu, dn = weights("out_in", torch.float32, e=e)
    idx, w = routing("random", t=t, e=e, k=k, seed=17)
    g = torch.Generator().manual_seed(17)
    x0 = (torch.rand((t, H), generator=g) - 0.5).to(DEVICE)

    def f(x, wr):
        return (lt.experts(x, idx, wr, gu, dn) ** 2).sum()

    res = []
    keep = lt.overwrite_saved
    torch._dynamo.reset()
    try:
        for ow, fn in ((False, f), (True, torch.compile(
                f, fullgraph=True, backend="aot_eager"))):
            lt.overwrite_saved = ow
            x = x0.clone().requires_grad_()
            wr = w.clone().requires_grad_()
            loss = fn(x, wr)
            res.append(torch.autograd.grad(loss, (x, wr, gu, dn)))
            if ow:
                loss = fn(x, wr)
                torch.autograd.grad(loss, (x, wr, gu, dn), retain_graph=True)
                with pytest.raises(RuntimeError, match="inplace"):
                    torch.autograd.grad(loss, (x, wr, gu, dn))
    finally:
        lt.overwrite_saved = keep
        torch._dynamo.reset()
    for a, b in zip(*res):
        assert torch.equal(a, b)
