"""fastllm: hand-written CUDA and Triton kernels for Hugging Face LLMs.

    import fastllm
    model = fastllm.patch(model)

Importing fastllm never fails because the CUDA extension or a GPU is missing; the backend
registry (fastllm.ops.registry) says which backend serves each call and why.
"""
from . import ops
from ._version import __version__
from .errors import BackendUnavailableError, CudaError, CudaUnavailableError, FastllmError
# The patch layer imports transformers only when called: `import fastllm` works without it.
from .patch import from_pretrained, patch, patch_report, save_pretrained, unpatch

__all__ = ["ops", "__version__", "BackendUnavailableError", "CudaError", "CudaUnavailableError",
           "FastllmError", "patch", "unpatch", "patch_report", "save_pretrained", "from_pretrained"]
