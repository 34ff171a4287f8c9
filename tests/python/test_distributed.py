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
