"""fastllm: hand-written CUDA and Triton kernels for Hugging Face LLMs.

    import fastllm
    model = fastllm.patch(model)

Importing fastllm never fails because the CUDA extension or a GPU is missing; the backend
registry (fastllm.ops.registry) says which backend serves each call and why.
"""
from . import ops
from ._version import __version__
from .errors import BackendUnavailableError, CudaError, CudaUnavailableError, FastllmError

__all__ = ["ops", "__version__", "BackendUnavailableError", "CudaError", "CudaUnavailableError",
           "FastllmError"]
