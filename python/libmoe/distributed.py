"""libmoe's expert parallelism from Python.

    comm = libmoe.distributed.nccl_comm(group)   # collective over `group`
    ... moe_layer_desc.comm = comm.handle ...    # libmoe's expert parallelism
    comm.close()

    comms = libmoe.distributed.virtual_comms(4)  # 4 ranks on one GPU
    outs = libmoe.distributed.run_ranks(step, comms)  # step(rank, comm)

`EPExperts` is one rank's expert layer over a communicator (its shard of
the experts, its own tokens): forward and backward are collective, every
rank calls them in the same order (with virtual ranks, each from its own
thread: `run_ranks`).

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

__all__ = ["NcclComm", "nccl_comm", "load_nccl", "VirtualComm",
           "virtual_comms", "run_ranks", "EPExperts"]

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


# ---- virtual ranks ------------------------------------------------------------


class VirtualComm:
    """One of P virtual ranks sharing one GPU (moe_comm_create_virtual):
    the expert-parallel exchange becomes device-to-device copies ordered by
    CUDA events; drive each rank from its own thread (run_ranks). Results
    are those of P GPUs; timings measure kernels and bookkeeping, not a
    network. close() after every plan that uses it."""

    def __init__(self, handle: ctypes.c_void_p, device: int):
        self.handle, self.device = handle, device

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

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def virtual_comms(P: int, device: int | None = None) -> list[VirtualComm]:
    """P virtual expert-parallel ranks on one GPU (default: the current
    CUDA device); element q is rank q."""
    if not L.HAS_CUDA:
        raise RuntimeError("libmoe.distributed.virtual_comms: this libmoe "
                           "build has no CUDA backend")
    if not isinstance(P, int) or P < 1:
        raise ValueError(f"libmoe.distributed.virtual_comms: P = {P!r}, "
                         "need an int >= 1")
    if device is None:
        device = torch.cuda.current_device() if torch.cuda.is_available() \
            else 0
    arr = (ctypes.c_void_p * P)()
    L.check(L.lib.moe_comm_create_virtual(P, device, arr),
            "moe_comm_create_virtual")
    return [VirtualComm(ctypes.c_void_p(arr[q]), device) for q in range(P)]


def run_ranks(fn, comms) -> list:
    """Runs fn(rank, comm) for every rank at once, each in its own thread
    under its own CUDA stream (torch.cuda.stream), and returns the results
    in rank order; the first exception is re-raised after all threads end.
    libmoe's calls release the GIL, so the ranks meet inside them."""
    import threading

    n = len(comms)
    out, err = [None] * n, [None] * n
    dev = [getattr(c, "device", None) for c in comms]

    def body(q):
        try:
            with torch.cuda.device(dev[q]):
                s = torch.cuda.Stream()
                with torch.cuda.stream(s):
                    out[q] = fn(q, comms[q])
                s.synchronize()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            err[q] = e

    th = [threading.Thread(target=body, args=(q,)) for q in range(n)]
    for t in th:
        t.start()
    for t in th:
        t.join()
    for e in err:
        if e is not None:
            raise e
    return out


# ---- one rank's expert layer ---------------------------------------------------

_EXCHANGE = {"auto": L.MOE_EP_EXCHANGE_AUTO, "exact": L.MOE_EP_EXCHANGE_EXACT,
             "capacity": L.MOE_EP_EXCHANGE_CAPACITY}
_OVERFLOW = {"error": L.MOE_EP_OVERFLOW_ERROR, "drop": L.MOE_EP_OVERFLOW_DROP}
_INVALID = L.INVALID_TOPK
_METHOD = {"auto": 0, "grouped": 1, "loop": 2}
_MEMORY = L.MEMORY_POLICIES


class EPExperts:
    """One rank's expert layer under expert parallelism (no autograd: call
    backward yourself). With P ranks the rank owns experts
    [rank*E/P, (rank+1)*E/P): forward takes this rank's tokens (any count up
    to max_tokens) with their global top-k routing and this rank's weight
    shards gate_up [E/P, 2I, H] and down [E/P, H, I] (any strided views).

    exchange: "auto" (the planner picks), "exact" (one host sync per pass)
    or "capacity" (fixed blocks, no sync; capacity_factor and overflow as
    in moe.h). invalid_topk "drop" drops routing slots outside [0, E) (the
    sentinels of an expert-parallel framework). method "grouped" makes the
    results bitwise those of one GPU running all the tokens. memory "lean"
    (desc.memory) saves no copy of the rows this rank's experts receive:
    the backward has their owners send them again (one more exchange of
    [T*k, H], the same bits); "balanced" and "fast" keep them."""

    def __init__(self, comm, num_experts: int, hidden: int,
                 intermediate: int, top_k: int, max_tokens: int,
                 dtype=torch.bfloat16, device=None, *, exchange="auto",
                 capacity_factor: float = 0.0, overflow="error",
                 invalid_topk="drop", method="grouped", strict=False,
                 layout=None, memory="balanced"):
        for name, val, table in (("exchange", exchange, _EXCHANGE),
                                 ("overflow", overflow, _OVERFLOW),
                                 ("invalid_topk", invalid_topk, _INVALID),
                                 ("method", method, _METHOD),
                                 ("memory", memory, _MEMORY)):
            if val not in table:
                raise ValueError(f"EPExperts: {name}={val!r}, one of "
                                 f"{sorted(table)}")
        if device is None:
            device = torch.device("cuda", getattr(comm, "device", 0) or 0) \
                if comm is not None else torch.device("cuda")
        device = torch.device(device)
        d = L.moe_layer_desc()
        d.struct_size = ctypes.sizeof(L.moe_layer_desc)
        d.magic, d.version = L.MOE_LAYER_DESC_MAGIC, L.MOE_LAYER_DESC_VERSION
        d.num_experts, d.hidden, d.intermediate = num_experts, hidden, \
            intermediate
        d.top_k, d.max_tokens = top_k, max_tokens
        d.norm_topk_prob = 0  # the routing weights are used as given
        d.dtype = L.dtype_of(dtype)
        d.gate_up_layout = d.down_layout = L.MOE_LAYOUT_OUT_IN \
            if layout is None else layout
        d.method = _METHOD[method]
        d.strict = int(bool(strict))
        d.device = L.device_of(device)
        d.comm = comm.handle if comm is not None else None
        d.invalid_topk = _INVALID[invalid_topk]
        d.ep_exchange = _EXCHANGE[exchange]
        d.ep_capacity_factor = float(capacity_factor)
        d.ep_overflow = _OVERFLOW[overflow]
        d.memory = _MEMORY[memory]
        self.comm, self.device, self.dtype = comm, device, dtype
        self.handle = ctypes.c_void_p()
        L.check(L.lib.moe_layer_plan_create(ctypes.byref(self.handle),
                                            ctypes.byref(d)),
                "moe_layer_plan_create")
        ws, sv = ctypes.c_size_t(), ctypes.c_size_t()
        L.check(L.lib.moe_layer_plan_sizes(self.handle, max_tokens,
                                           ctypes.byref(ws), ctypes.byref(sv)),
                "moe_layer_plan_sizes")
        self._ws = torch.empty((max(ws.value, 1),), dtype=torch.uint8,
                               device=device)
        self._sv = torch.zeros((max(sv.value, 1),), dtype=torch.uint8,
                               device=device)
        self._fwd = None

    def explain(self) -> str:
        return L.lib.moe_layer_plan_explain(self.handle).decode()

    def forward(self, hidden, top_k_index, top_k_weights, gate_up, down):
        """This rank's output [T, H]; keeps the inputs for backward."""
        out = torch.empty(hidden.shape, dtype=hidden.dtype,
                          device=hidden.device)
        a = L.moe_layer_fwd_args()
        a.hidden = L.view(hidden)
        a.topk_index = L.view(top_k_index)
        a.topk_weights = L.view(top_k_weights)
        a.w_gate_up = L.view(gate_up)
        a.w_down = L.view(down)
        a.output = L.view(out)
        self._fwd = (hidden, top_k_index, top_k_weights, gate_up, down)
        L.check(L.lib.moe_layer_forward(
            self.handle, ctypes.byref(a), self._sv.data_ptr(),
            self._sv.numel(), self._ws.data_ptr(), self._ws.numel(),
            L.stream_of(hidden.device)), "moe_layer_forward")
        return out

    def backward(self, grad_out):
        """(grad_hidden, grad_top_k_weights, grad_gate_up, grad_down) of the
        last forward, the weight gradients this rank's shards."""
        if self._fwd is None:
            raise RuntimeError("EPExperts.backward: no forward to go back "
                               "through")
        hidden, idx, w, gu, dn = self._fwd
        gh = torch.empty_like(hidden)
        gw = torch.empty(w.shape, dtype=w.dtype, device=w.device)
        ggu = torch.empty(gu.shape, dtype=gu.dtype, device=gu.device)
        gdn = torch.empty(dn.shape, dtype=dn.dtype, device=dn.device)
        b = L.moe_layer_bwd_args()
        b.fwd.hidden = L.view(hidden)
        b.fwd.topk_index = L.view(idx)
        b.fwd.topk_weights = L.view(w)
        b.fwd.w_gate_up = L.view(gu)
        b.fwd.w_down = L.view(dn)
        b.grad_output = L.view(grad_out.to(hidden.dtype))
        b.grad_hidden = L.view(gh)
        b.grad_topk_weights = L.view(gw)
        b.grad_w_gate_up = L.view(ggu)
        b.grad_w_down = L.view(gdn)
        L.check(L.lib.moe_layer_backward(
            self.handle, ctypes.byref(b), self._sv.data_ptr(),
            self._sv.numel(), self._ws.data_ptr(), self._ws.numel(),
            L.stream_of(hidden.device)), "moe_layer_backward")
        return gh, gw, ggu, gdn

    def dropped(self) -> int:
        """Rows this rank cut at the capacity so far (moe_cuda_ep_dropped;
        waits for the current stream). Raises under overflow="error" when
        rows were cut."""
        n = ctypes.c_int64()
        L.check(L.lib.moe_cuda_ep_dropped(self.handle,
                                          L.stream_of(self.device),
                                          ctypes.byref(n)),
                "moe_cuda_ep_dropped")
        return n.value

    def close(self) -> None:
        if getattr(self, "handle", None):
            L.lib.moe_layer_plan_destroy(self.handle)
            self.handle = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
