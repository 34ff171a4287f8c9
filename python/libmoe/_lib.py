"""ctypes binding of libmoe's public C API (include/moe.h, include/moe_cuda.h).

Only what the Python layer calls is declared. The shared library is loaded
after torch (libmoe/__init__.py imports torch first) so that the process has
one libnccl / libcudart: the ones torch brought.
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import re

import torch  # noqa: F401  (loaded first on purpose: one NCCL, one cudart)

# ---- enums (moe.h) --------------------------------------------------------
MOE_SUCCESS = 0
MOE_ERR_INVALID_ARGUMENT = 1
MOE_ERR_UNIMPLEMENTED = 2

MOE_F32, MOE_BF16, MOE_F16, MOE_I32, MOE_I64, MOE_F64 = range(6)
MOE_DEVICE_CPU, MOE_DEVICE_CUDA = 0, 1
MOE_GMM_AUTO = 0
MOE_LAYOUT_OUT_IN, MOE_LAYOUT_IN_OUT, MOE_LAYOUT_STRIDED = 0, 1, 2
MOE_TOPK_INVALID_ERROR, MOE_TOPK_INVALID_DROP = 0, 1
MOE_EP_EXCHANGE_AUTO, MOE_EP_EXCHANGE_EXACT, MOE_EP_EXCHANGE_CAPACITY = 0, 1, 2
MOE_EP_OVERFLOW_ERROR, MOE_EP_OVERFLOW_DROP = 0, 1
MOE_LAYER_DESC_MAGIC = 0x4D4F454C
MOE_LAYER_DESC_VERSION = 5
# moe_memory_policy
MOE_MEMORY_BALANCED, MOE_MEMORY_LEAN, MOE_MEMORY_FAST = 0, 1, 2
# the Python names of moe_memory_policy and moe_topk_invalid (torch.py's
# knob and experts(), distributed.py's EPExperts)
MEMORY_POLICIES = {"balanced": MOE_MEMORY_BALANCED, "lean": MOE_MEMORY_LEAN,
                   "fast": MOE_MEMORY_FAST}
INVALID_TOPK = {"error": MOE_TOPK_INVALID_ERROR, "drop": MOE_TOPK_INVALID_DROP}
# moe_activation
(MOE_ACT_SWIGLU, MOE_ACT_SWIGLU_CLAMP, MOE_ACT_GPT_OSS, MOE_ACT_SOFTCAP_SWIGLU,
 MOE_ACT_GEGLU, MOE_ACT_RELU2) = range(6)
MOE_MAX_DIMS = 4


class moe_device(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("index", ctypes.c_int)]


class moe_tensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("dtype", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("shape", ctypes.c_int64 * MOE_MAX_DIMS),
        ("stride", ctypes.c_int64 * MOE_MAX_DIMS),
        ("device", moe_device),
    ]


class moe_layer_desc(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("magic", ctypes.c_uint32),
        ("version", ctypes.c_uint32),
        ("num_experts", ctypes.c_int64),
        ("hidden", ctypes.c_int64),
        ("intermediate", ctypes.c_int64),
        ("top_k", ctypes.c_int64),
        ("max_tokens", ctypes.c_int64),
        ("norm_topk_prob", ctypes.c_int),
        ("dtype", ctypes.c_int),
        ("gate_up_layout", ctypes.c_int),
        ("down_layout", ctypes.c_int),
        ("method", ctypes.c_int),
        ("strict", ctypes.c_int),
        ("num_threads", ctypes.c_int),
        ("device", moe_device),
        ("comm", ctypes.c_void_p),
        ("invalid_topk", ctypes.c_int),
        ("plan_gpu", ctypes.c_char_p),
        ("ep_exchange", ctypes.c_int),
        ("ep_capacity_factor", ctypes.c_double),
        ("ep_overflow", ctypes.c_int),
        ("ep_chunks", ctypes.c_int),
        ("activation", ctypes.c_int),
        ("act_alpha", ctypes.c_float),
        ("act_limit", ctypes.c_float),
        ("act_gate_cap", ctypes.c_float),
        ("act_up_cap", ctypes.c_float),
        ("gate_up_interleaved", ctypes.c_int),
        ("backward_overwrites_saved", ctypes.c_int),
        ("memory", ctypes.c_int),
    ]


class moe_layer_sizes(ctypes.Structure):
    _fields_ = [
        ("saved", ctypes.c_size_t),
        ("fwd_workspace", ctypes.c_size_t),
        ("bwd_workspace", ctypes.c_size_t),
        ("infer_workspace", ctypes.c_size_t),
    ]


class moe_layer_fwd_args(ctypes.Structure):
    _fields_ = [
        (n, moe_tensor)
        for n in (
            "hidden", "gate_weight", "topk_index", "topk_weights", "w_gate_up",
            "w_gate", "w_up", "w_down", "output", "router_logits",
            "b_gate_up", "b_gate", "b_up", "b_down",
        )
    ]


class moe_layer_bwd_args(ctypes.Structure):
    _fields_ = [("fwd", moe_layer_fwd_args)] + [
        (n, moe_tensor)
        for n in (
            "grad_output", "grad_hidden", "grad_gate_weight",
            "grad_topk_weights", "grad_w_gate_up", "grad_w_gate", "grad_w_up",
            "grad_w_down", "grad_b_gate_up", "grad_b_gate", "grad_b_up",
            "grad_b_down",
        )
    ]


class moe_exec_options(ctypes.Structure):
    _fields_ = [
        ("method", ctypes.c_int),
        ("num_threads", ctypes.c_int),
        ("strict", ctypes.c_int),
        ("stream", ctypes.c_void_p),
    ]


# ---- loading --------------------------------------------------------------


def _candidates():
    env = os.environ.get("LIBMOE_LIBRARY")
    if env:
        yield pathlib.Path(env)
    here = pathlib.Path(__file__).resolve().parent
    for name in ("libmoe.so", "libmoe.dylib"):
        yield here / "lib" / name
        yield here / name


def _load_error(path, err):
    """An ImportError message for a libmoe.so that exists but does not load:
    says which library is missing and what to install instead."""
    msg = str(err)
    m = re.search(r"(lib(?:cudart|cublas|cublasLt|nccl)\.so\.(\d+))", msg)
    if m:
        cuda = getattr(torch.version, "cuda", None)
        return (
            "libmoe: %s has the CUDA backend and needs %s (CUDA %s), which "
            "torch's CUDA wheels bring (the nvidia-* packages); this torch "
            "(%s) is built for %s. Install a torch built for CUDA %s, or "
            "libmoe's CPU wheel (README, Install). Loader: %s"
            % (path, m.group(1), m.group(2), torch.__version__,
               "CUDA %s" % cuda if cuda else "the CPU only", m.group(2), msg))
    return ("libmoe: cannot load %s: %s (README, Install: the wheel, or "
            "`pip install .` from the source)" % (path, msg))


def _load():
    tried = []
    for p in _candidates():
        tried.append(str(p))
        if p.exists():
            try:
                return ctypes.CDLL(str(p), mode=ctypes.RTLD_GLOBAL), p
            except OSError as e:
                raise ImportError(_load_error(p, e)) from e
    raise ImportError(
        "libmoe: shared library not found (tried %s); install libmoe's "
        "wheel or `pip install .` (README, Install), or set LIBMOE_LIBRARY"
        % ", ".join(tried)
    )


# The loaded file: the wheel's or source build's libmoe/lib/libmoe.so, or
# LIBMOE_LIBRARY. A wheel's libmoe.so finds its vendored OpenMP runtime in
# libmoe.libs/ (RPATH) and the CUDA libraries torch loaded above.
lib, LIBRARY_PATH = _load()

P = ctypes.POINTER
_c = ctypes
_sig = {
    "moe_version": (_c.c_char_p, []),
    "moe_last_error": (_c.c_char_p, []),
    "moe_status_name": (_c.c_char_p, [_c.c_int]),
    "moe_layer_plan_create": (_c.c_int, [P(_c.c_void_p), P(moe_layer_desc)]),
    "moe_layer_plan_destroy": (_c.c_int, [_c.c_void_p]),
    "moe_layer_plan_sizes": (
        _c.c_int, [_c.c_void_p, _c.c_int64, P(_c.c_size_t), P(_c.c_size_t)]),
    "moe_layer_plan_pass_sizes": (
        _c.c_int, [_c.c_void_p, _c.c_int64, P(moe_layer_sizes)]),
    "moe_layer_plan_explain": (_c.c_char_p, [_c.c_void_p]),
    "moe_layer_forward": (
        _c.c_int,
        [_c.c_void_p, P(moe_layer_fwd_args), _c.c_void_p, _c.c_size_t,
         _c.c_void_p, _c.c_size_t, _c.c_void_p]),
    "moe_layer_backward": (
        _c.c_int,
        [_c.c_void_p, P(moe_layer_bwd_args), _c.c_void_p, _c.c_size_t,
         _c.c_void_p, _c.c_size_t, _c.c_void_p]),
    "moe_comm_destroy": (_c.c_int, [_c.c_void_p]),
    "moe_comm_rank": (_c.c_int, [_c.c_void_p]),
    "moe_comm_size": (_c.c_int, [_c.c_void_p]),
}
_gmm = [P(moe_tensor)] * 4 + [P(moe_exec_options)]
for _n in ("moe_grouped_gemm", "moe_grouped_gemm_dx", "moe_grouped_gemm_dw"):
    _sig[_n] = (_c.c_int, _gmm)
# CUDA entry points exist only in builds with the CUDA backend.
_cuda_sig = {
    "moe_cuda_device_count": (_c.c_int, [P(_c.c_int)]),
    "moe_cuda_grouped_gemm": (_c.c_int, _gmm),
    "moe_cuda_grouped_gemm_dx": (_c.c_int, _gmm),
    "moe_cuda_grouped_gemm_dw": (_c.c_int, _gmm),
    "moe_comm_create_nccl": (_c.c_int, [P(_c.c_void_p), _c.c_void_p, _c.c_int]),
    "moe_comm_create_virtual": (_c.c_int, [_c.c_int, _c.c_int,
                                           P(_c.c_void_p)]),
    "moe_cuda_ep_dropped": (_c.c_int, [_c.c_void_p, _c.c_void_p,
                                       P(_c.c_int64)]),
    "moe_cuda_ep_dropped_reset": (_c.c_int, [_c.c_void_p, _c.c_void_p]),
}
for _n, (_r, _a) in _sig.items():
    _f = getattr(lib, _n)
    _f.restype, _f.argtypes = _r, _a
HAS_CUDA = True
for _n, (_r, _a) in _cuda_sig.items():
    _f = getattr(lib, _n, None)
    if _f is None:
        HAS_CUDA = False
        continue
    _f.restype, _f.argtypes = _r, _a


class LibmoeError(RuntimeError):
    """A libmoe call failed; `status` is the moe_status name."""

    def __init__(self, status: int, what: str):
        name = lib.moe_status_name(status).decode()
        msg = lib.moe_last_error().decode()
        super().__init__(f"{what}: {name}: {msg}")
        self.status = name


def check(status: int, what: str) -> None:
    if status != MOE_SUCCESS:
        raise LibmoeError(status, what)


def version() -> str:
    return lib.moe_version().decode()


# ---- tensors --------------------------------------------------------------

_DTYPES = {
    torch.float32: MOE_F32,
    torch.bfloat16: MOE_BF16,
    torch.float16: MOE_F16,
    torch.int32: MOE_I32,
    torch.int64: MOE_I64,
    torch.float64: MOE_F64,
}


def dtype_of(t: torch.dtype) -> int:
    try:
        return _DTYPES[t]
    except KeyError:
        raise TypeError(f"libmoe: dtype {t} is not supported") from None


def device_of(dev: torch.device) -> moe_device:
    if dev.type == "cuda":
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        return moe_device(MOE_DEVICE_CUDA, idx)
    if dev.type == "cpu":
        return moe_device(MOE_DEVICE_CPU, 0)
    raise ValueError(f"libmoe: device {dev} is not supported (cpu or cuda)")


def view(t: torch.Tensor | None) -> moe_tensor:
    """The moe_tensor view of a torch tensor: same memory, same strides
    (data_ptr includes the storage offset). None gives an absent tensor."""
    v = moe_tensor()
    if t is None:
        return v
    if t.dim() > MOE_MAX_DIMS:
        raise ValueError(f"libmoe: {t.dim()}-D tensor, at most {MOE_MAX_DIMS}")
    v.data = t.data_ptr()
    v.dtype = dtype_of(t.dtype)
    v.ndim = t.dim()
    for i, (s, st) in enumerate(zip(t.shape, t.stride())):
        v.shape[i] = s
        v.stride[i] = st
    v.device = device_of(t.device)
    return v


def layout_of(w: torch.Tensor) -> int:
    """moe_weight_layout of a logical [E, out, in] view."""
    if w.stride(2) == 1:
        return MOE_LAYOUT_OUT_IN
    if w.stride(1) == 1:
        return MOE_LAYOUT_IN_OUT
    return MOE_LAYOUT_STRIDED


def stream_of(dev: torch.device):
    if dev.type == "cuda":
        return ctypes.c_void_p(torch.cuda.current_stream(dev).cuda_stream)
    return None
