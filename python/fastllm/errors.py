"""Exception types. Bad arguments raise the built-in TypeError / ValueError (naming the
argument and what was expected); these cover what is not the caller's argument."""


class FastllmError(RuntimeError):
    """Base of fastllm's own runtime errors."""


class BackendUnavailableError(FastllmError):
    """A forced backend (backend= or FASTLLM_BACKEND) cannot serve this call."""


class CudaError(FastllmError):
    """A CUDA launcher returned an error code; the message carries CUDA's error string."""


class CudaUnavailableError(CudaError):
    """No usable CUDA driver/device, or fastllm._C was not built / cannot be loaded."""


class UnsupportedModelError(FastllmError, ValueError):
    """fastllm.patch cannot serve this model; the model was left untouched."""


class OriginalsDiscardedError(FastllmError):
    """unpatch cannot restore quantized / pruned layers: patch dropped the originals."""


class CheckpointFormatError(FastllmError, TypeError):
    """transformers' save_pretrained called on a model only fastllm.save_pretrained can write."""
