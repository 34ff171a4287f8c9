"""libmoe.distributed without GPUs: the module imports, the unique id
round-trips through a tensor, and nccl_comm refuses clearly when
torch.distributed is not initialised or the build has no CUDA. (The NCCL
path itself needs several GPUs: tests/gpu.)"""

import ctypes

import pytest
import torch

import libmoe
import libmoe.distributed as ld


def test_unique_id_roundtrip():
    uid = ld.ncclUniqueId()
    raw = bytes((i * 37 + 11) % 256 for i in range(ld.NCCL_UNIQUE_ID_BYTES))
    ctypes.memmove(ctypes.addressof(uid), raw, len(raw))
    t = ld.id_to_tensor(uid)
    assert t.dtype == torch.uint8 and t.numel() == 128
    back = ld.id_from_tensor(t)
    assert ctypes.string_at(ctypes.addressof(back), 128) == raw
    with pytest.raises(ValueError):
        ld.id_from_tensor(t[:100])


def test_needs_initialised_process_group():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already initialised")
    with pytest.raises(RuntimeError, match="not initialised"):
        ld.nccl_comm()


def test_single_rank_gloo_group():
    """With a 1-rank gloo group: a CPU-only build says it has no CUDA
    backend; a CUDA build on a GPU machine makes a 1-rank communicator."""
    import torch.distributed as dist
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29517",
                            rank=0, world_size=1)
    try:
        if not libmoe.has_cuda or not torch.cuda.is_available():
            if not libmoe.has_cuda:
                with pytest.raises(RuntimeError, match="no CUDA backend"):
                    ld.nccl_comm()
            return
        c = ld.nccl_comm()
        assert (c.rank, c.size) == (0, 1)
        c.close()
    finally:
        dist.destroy_process_group()


# ---- virtual ranks and EPExperts ---------------------------------------------

_GPU = libmoe.has_cuda and torch.cuda.is_available()
_NO_GPU = ("needs the CUDA backend and a GPU (virtual ranks run P "
           "expert-parallel ranks on one GPU)")


def test_virtual_comms_refuse_without_cuda():
    if _GPU:
        pytest.skip("this machine has the CUDA backend and a GPU")
    if not libmoe.has_cuda:
        with pytest.raises(RuntimeError, match="no CUDA backend"):
            ld.virtual_comms(2)
    else:  # CUDA build, no usable device: the library says why
        with pytest.raises(libmoe._lib.LibmoeError, match="CUDA device"):
            ld.virtual_comms(2)


def test_virtual_comms_bad_count():
    if not libmoe.has_cuda:
        pytest.skip("no CUDA backend in this build: virtual_comms refuses "
                    "before looking at P")
    with pytest.raises(ValueError, match="P = 0"):
        ld.virtual_comms(0)


def test_ep_experts_bad_options():
    for kw, msg in (({"exchange": "fast"}, "exchange"),
                    ({"overflow": "wrap"}, "overflow"),
                    ({"invalid_topk": "keep"}, "invalid_topk"),
                    ({"method": "magic"}, "method"),
                    ({"memory": "tiny"}, "memory")):
        with pytest.raises(ValueError, match=msg):
            ld.EPExperts(None, 8, 16, 8, 2, 4, **kw)


def test_desc_mirror_has_the_ep_fields():
    # moe.h's order: plan_gpu, the EP fields (issue 18), then the expert
    # function's (issue 17, version 3), then backward_overwrites_saved
    # (issue 16, version 4) and memory (issue 16, version 5)
    names = [n for n, _ in libmoe._lib.moe_layer_desc._fields_]
    i = names.index("plan_gpu")
    assert names[i:] == ["plan_gpu", "ep_exchange", "ep_capacity_factor",
                         "ep_overflow", "ep_chunks", "activation", "act_alpha",
                         "act_limit", "act_gate_cap", "act_up_cap",
                         "gate_up_interleaved", "backward_overwrites_saved",
                         "memory"]


def _problem(E, H, I, k, T, seed, sentinels=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).bfloat16()
    gu = (torch.randn(E, 2 * I, H, generator=g) * 0.2).bfloat16()
    dn = (torch.randn(E, H, I, generator=g) * 0.2).bfloat16()
    idx = torch.stack([torch.randperm(E, generator=g)[:k]
                       for _ in range(T)]).int()
    if sentinels:  # framework-style sentinels, dropped
        cut = torch.rand(T, k, generator=g) < 0.25
        idx[cut] = -1
    w = torch.rand(T, k, generator=g) * 0.75 + 0.25
    gy = torch.randn(T, H, generator=g).bfloat16()
    return [t.cuda() for t in (x, gu, dn, idx, w, gy)]


def _one_gpu(E, H, I, k, T, x, gu, dn, idx, w, gy):
    m = ld.EPExperts(None, E, H, I, k, T, torch.bfloat16, "cuda")
    out = m.forward(x, idx, w, gu, dn)
    grads = m.backward(gy)
    torch.cuda.synchronize()
    m.close()
    return out, grads


@pytest.mark.skipif(not _GPU, reason=_NO_GPU)
@pytest.mark.parametrize("P,exchange,memory", [
    (2, "exact", "balanced"), (3, "capacity", "balanced"),
    (4, "auto", "balanced"), (2, "exact", "lean"), (3, "capacity", "lean")])
def test_virtual_ranks_bitwise(P, exchange, memory):
    """P virtual ranks, consecutive token slices (one rank with none),
    sentinel slots dropped: outputs and gradients bitwise those of one
    GPU. memory "lean": the received rows are sent again in the backward
    instead of saved, and the plan says so."""
    E, H, I, k = 12, 72, 40, 3
    Ts = [23, 0, 17, 9][:P]
    T = sum(Ts)
    x, gu, dn, idx, w, gy = _problem(E, H, I, k, T, 5 + P, sentinels=True)
    ref_out, (rgh, rgw, rggu, rgdn) = _one_gpu(E, H, I, k, T, x, gu, dn,
                                               idx, w, gy)
    comms = ld.virtual_comms(P)
    El = E // P
    starts = [sum(Ts[:q]) for q in range(P)]

    def step(q, comm):
        a, b = starts[q], starts[q] + Ts[q]
        m = ld.EPExperts(comm, E, H, I, k, max(Ts[q], 1), torch.bfloat16,
                         exchange=exchange, memory=memory)
        if exchange != "auto":
            assert f"{exchange} mode" in m.explain()
        assert ("sent again in the backward" in m.explain()) == \
            (memory == "lean")
        out = m.forward(x[a:b], idx[a:b], w[a:b], gu[q * El:(q + 1) * El],
                        dn[q * El:(q + 1) * El])
        grads = m.backward(gy[a:b])
        dropped = m.dropped()
        m.close()
        return out, grads, dropped

    torch.cuda.synchronize()
    res = ld.run_ranks(step, comms)
    for c in comms:
        c.close()
    out = torch.cat([r[0] for r in res])
    assert torch.equal(out, ref_out)
    assert torch.equal(torch.cat([r[1][0] for r in res]), rgh)
    assert torch.equal(torch.cat([r[1][1] for r in res]), rgw)
    assert torch.equal(torch.cat([r[1][2] for r in res]), rggu)
    assert torch.equal(torch.cat([r[1][3] for r in res]), rgdn)
    assert all(r[2] == 0 for r in res)


@pytest.mark.skipif(not _GPU, reason=_NO_GPU)
def test_world_of_one_nccl_with_hf_libmoe():
    """A torch.distributed NCCL world of 1: nccl_comm makes a 1-rank
    communicator, an EPExperts over it equals one GPU bitwise, and a
    transformers model with experts_implementation="libmoe" trains in the
    same process (the path HF's expert-parallel plan uses, sentinels
    dropped)."""
    import torch.distributed as dist
    from conftest import make_model, tiny_qwen3_moe_config
    if not dist.is_available() or not dist.is_nccl_available():
        pytest.skip("torch.distributed with NCCL is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29519",
                            rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    try:
        c = ld.nccl_comm()
        assert (c.rank, c.size) == (0, 1)
        E, H, I, k, T = 8, 48, 24, 2, 19
        x, gu, dn, idx, w, gy = _problem(E, H, I, k, T, 11, sentinels=True)
        ref_out, ref_g = _one_gpu(E, H, I, k, T, x, gu, dn, idx, w, gy)
        m = ld.EPExperts(c, E, H, I, k, T, torch.bfloat16, "cuda")
        out = m.forward(x, idx, w, gu, dn)
        g = m.backward(gy)
        torch.cuda.synchronize()
        m.close()
        assert torch.equal(out, ref_out)
        for a, b in zip(g, ref_g):
            assert torch.equal(a, b)
        model = make_model(tiny_qwen3_moe_config(), "libmoe",
                           dtype=torch.bfloat16).cuda()
        ids = torch.randint(0, 97, (2, 11), device="cuda")
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert torch.isfinite(loss)
        c.close()
    finally:
        dist.destroy_process_group()


def _cpu_desc(**kw):
    d = libmoe._lib.moe_layer_desc()
    L = libmoe._lib
    d.struct_size = ctypes.sizeof(L.moe_layer_desc)
    d.magic, d.version = L.MOE_LAYER_DESC_MAGIC, L.MOE_LAYER_DESC_VERSION
    d.num_experts, d.hidden, d.intermediate, d.top_k, d.max_tokens = \
        8, 16, 8, 2, 4
    d.dtype = L.MOE_F32
    for k, v in kw.items():
        setattr(d, k, v)
    return d


@pytest.mark.parametrize("field,value", [
    ("ep_exchange", 3), ("ep_overflow", 2),
    ("ep_capacity_factor", -1.0), ("ep_capacity_factor", float("nan")),
    ("ep_capacity_factor", float("inf")), ("ep_chunks", -1),
    ("ep_chunks", 65)])
def test_desc_rejects_bad_ep_fields(field, value):
    """The expert-parallel fields are checked on every device, the message
    naming the field."""
    L = libmoe._lib
    h = ctypes.c_void_p()
    st = L.lib.moe_layer_plan_create(ctypes.byref(h),
                                     ctypes.byref(_cpu_desc(**{field: value})))
    assert st == L.MOE_ERR_INVALID_ARGUMENT
    assert f"desc.{field}" in L.lib.moe_last_error().decode()


def test_desc_ep_defaults_plan_on_cpu():
    """Defaults (auto, factor 0, error) and explicit values plan on the
    CPU, where one rank ignores them."""
    L = libmoe._lib
    for kw in ({}, {"ep_exchange": L.MOE_EP_EXCHANGE_CAPACITY,
                    "ep_capacity_factor": 1.25,
                    "ep_overflow": L.MOE_EP_OVERFLOW_DROP},
               {"ep_chunks": 3}):
        h = ctypes.c_void_p()
        L.check(L.lib.moe_layer_plan_create(ctypes.byref(h),
                                            ctypes.byref(_cpu_desc(**kw))),
                "moe_layer_plan_create")
        L.lib.moe_layer_plan_destroy(h)
