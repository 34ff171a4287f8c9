"""libmoe: the Mixture-of-Experts expert layer (C library) from PyTorch.

    import libmoe.torch     # experts(), grouped_mm(): custom ops + autograd
    import libmoe.hf        # register(): experts_implementation="libmoe"
    import libmoe.distributed  # nccl_comm(group)

torch is imported before libmoe's shared library is loaded, so the process
uses torch's NCCL and CUDA runtime.
"""

# torch first: one NCCL / cudart in the process. Not bound as `torch` here,
# where that name belongs to the submodule libmoe.torch.
import torch as _torch  # noqa: F401

from . import _lib

__version__ = _lib.version()
has_cuda = _lib.HAS_CUDA

__all__ = ["__version__", "has_cuda"]
