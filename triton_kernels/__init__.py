"""Triton kernels, installed as fastllm.triton_kernels (the top-level name `triton_kernels`
belongs to another project). Importing this module imports triton; the registry treats an
ImportError here as "Triton backend unavailable"."""
import functools
import os

import torch
import triton  # noqa: F401  (fail here, not at first launch, when Triton is missing)


def _interpreted(fn) -> bool:
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(fn, InterpretedFunction)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 was set
    before triton was imported): CPU tensors then work, bf16 tl.dot does not. Decided by what
    @triton.jit produced, so it agrees with the kernels whatever the environment says now."""
    from .quantize_per_token import quantize_per_token_kernel
    return _interpreted(quantize_per_token_kernel)


@functools.lru_cache(None)   # both decorations are fixed once the kernels are imported
def mode_reason():
    """None, or why Triton cannot run fastllm's kernels at all: TRITON_INTERPRET changed between
    importing triton (whose own @jit helpers, tl.sum / tl.max / ..., were decorated then) and
    importing fastllm's kernels. `import fastllm` imports triton (through torch), so the variable
    must be set before `import fastllm`; a mix fails inside the launch ("Cannot call @triton.jit'd
    outside of the scope of a kernel")."""
    from triton.language import standard
    ours, theirs = interpreting(), _interpreted(standard.sum)
    if ours == theirs:
        return None
    return (f"TRITON_INTERPRET changed after triton was imported (triton's helpers are "
            f"{'interpreted' if theirs else 'compiled'}, fastllm's kernels {'interpreted' if ours else 'compiled'}): "
            "set it before `import fastllm` (which imports triton), in a fresh process")


@functools.lru_cache(None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """SMs of the GPU (the tile / split-K choices fill them); 132 (an H100) for the CPU under
    the interpreter, where it only has to be a plausible number."""
    if device.type != "cuda":
        return 132
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def capability(device: torch.device) -> int:
    """Compute capability as 80 / 86 / 90 ... of the GPU (90 under the interpreter, where the
    tiles do not depend on it). Asked even for the CPU when compiling for a GPU:
    bench/triton_compile_check.py answers for the arch it compiles."""
    if interpreting():
        return 90
    major, minor = torch.cuda.get_device_capability(device if device.type == "cuda" else None)
    return 10 * major + minor


INTERPRET_ENV = os.environ.get("TRITON_INTERPRET", "0") == "1"


#: The GEMM kernels form K-direction offsets (k * stride_k, BLOCK_K * stride_k) in int32, as
#: Triton types int arguments below 2^31; only row offsets are widened to int64.
_I32 = 2 ** 31 - 1


def k_offsets_fit(t, k_dim: int = -1, pad: int = 512):
    """t itself, or a contiguous copy when walking its K dim (plus a block of slack) would
    overflow int32 offsets: a small view of a huge buffer (a transposed weight, a column
    slice) with a K stride of millions. Contiguous, the K stride is 1."""
    if t is None or t.dim() == 0:
        return t
    if abs(t.stride(k_dim)) * (t.shape[k_dim] + pad) > _I32:
        return t.contiguous()
    return t
