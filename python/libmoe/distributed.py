"""libmoe's own NCCL communicator for a torch.distributed process group.

    comm = libmoe.distributed.nccl_comm(group)   # collective over `group`
    ... moe_layer_desc.comm = comm.handle ...    # libmoe's expert parallelism
    comm.close()

PyTorch has no public handle to its ProcessGroupNCCL communicator, so libmoe
makes its own: group rank 0 calls ncclGetUniqueId, the 128-byte id travels
by torch.distributed.broadcast over the group, every rank calls
ncclCommInitRank on its current CUDA device, and moe_comm_create_nccl wraps
the result. The NCCL used is the one torch loaded (torch is imported first,
and libnccl.so.2 is opened by its soname, which resolves to the loaded copy).
"""

from __future__ import annotations

import ctypes

import torch

from . import _lib as L

__all__ = ["NcclComm", "nccl_comm", "load_nccl"]

NCCL_UNIQUE_ID_BYTES = 128


class ncclUniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_char * NCCL_UNIQUE_ID_BYTES)]


_nccl = None


def load_nccl(name: str = "libnccl.so.2"):
    """The NCCL library torch loaded (ctypes handle with the calls we use)."""
    global _nccl
    if _nccl is None:
        if torch.cuda.is_available():
            torch.cuda.init()  # torch's CUDA stack (and its NCCL) first
        try:
            lib = ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            raise RuntimeError(f"libmoe.distributed: cannot load {name}: {e}"
                               ) from None
        lib.ncclGetUniqueId.restype = ctypes.c_int
        lib.ncclGetUniqueId.argtypes = [ctypes.POINTER(ncclUniqueId)]
        lib.ncclCommInitRank.restype = ctypes.c_int
        lib.ncclCommInitRank.argtypes = [ctypes.POINTER(ctypes.c_void_p),
                                         ctypes.c_int, ncclUniqueId,
                                         ctypes.c_int]
        lib.ncclCommDestroy.restype = ctypes.c_int
        lib.ncclCommDestroy.argtypes = [ctypes.c_void_p]
        lib.ncclGetErrorString.restype = ctypes.c_char_p
        lib.ncclGetErrorString.argtypes = [ctypes.c_int]
        _nccl = lib
    return _nccl


def _nccl_check(rc: int, what: str) -> None:
    if rc != 0:
        msg = load_nccl().ncclGetErrorString(rc).decode()
        raise RuntimeError(f"libmoe.distributed: {what} failed: {msg} ({rc})")


def id_to_tensor(uid: ncclUniqueId) -> torch.Tensor:
    raw = ctypes.string_at(ctypes.addressof(uid), NCCL_UNIQUE_ID_BYTES)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()


def id_from_tensor(t: torch.Tensor) -> ncclUniqueId:
    raw = bytes(t.cpu().tolist())
    if len(raw) != NCCL_UNIQUE_ID_BYTES:
        raise ValueError(f"unique id of {len(raw)} bytes")
    uid = ncclUniqueId()
    ctypes.memmove(ctypes.addressof(uid), raw, NCCL_UNIQUE_ID_BYTES)
    return uid


class NcclComm:
    """libmoe's moe_comm over its own ncclComm_t; `handle` goes into
    moe_layer_desc.comm. close() (or garbage collection) destroys the libmoe
    wrapper, then the NCCL communicator: after every plan that uses it."""

    def __init__(self, handle: ctypes.c_void_p, nccl: ctypes.c_void_p,
                 device: int):
        self.handle, self._nccl, self.device = handle, nccl, device

    @property
    def rank(self) -> int:
        return L.lib.moe_comm_rank(self.handle)

    @property
    def size(self) -> int:
        return L.lib.moe_comm_size(self.handle)

    def close(self) -> None:
        if self.handle:
            L.lib.moe_comm_destroy(self.handle)
            self.handle = None
        if self._nccl:
            load_nccl().ncclCommDestroy(self._nccl)
            self._nccl = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def nccl_comm(group=None, device: int | None = None) -> NcclComm:
    """A libmoe NCCL communicator over `group` (default: the world), on
    `device` (default: the current CUDA device). Collective: every rank of
    the group calls it."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("libmoe.distributed.nccl_comm: torch.distributed "
                           "is not initialised")
    if not L.HAS_CUDA:
        raise RuntimeError("libmoe.distributed.nccl_comm: this libmoe build "
                           "has no CUDA backend")
    if group is None:
        group = dist.group.WORLD
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    if device is None:
        device = torch.cuda.current_device()
    nccl = load_nccl()
    uid = ncclUniqueId()
    if rank == 0:
        _nccl_check(nccl.ncclGetUniqueId(ctypes.byref(uid)), "ncclGetUniqueId")
    # the id travels over the group; NCCL groups need a device tensor
    backend = dist.get_backend(group)
    on = torch.device("cuda", device) if backend == "nccl" else "cpu"
    buf = id_to_tensor(uid).to(on)
    dist.broadcast(buf, src=dist.get_global_rank(group, 0), group=group)
    uid = id_from_tensor(buf)
    comm = ctypes.c_void_p()
    with torch.cuda.device(device):
        _nccl_check(nccl.ncclCommInitRank(ctypes.byref(comm), size, uid, rank),
                    "ncclCommInitRank")
    mc = ctypes.c_void_p()
    st = L.lib.moe_comm_create_nccl(ctypes.byref(mc), comm, device)
    if st != L.MOE_SUCCESS:
        nccl.ncclCommDestroy(comm)
        L.check(st, "moe_comm_create_nccl")
    return NcclComm(mc, comm, device)
