"""Triton kernels, installed as fastllm.triton_kernels (the top-level name `triton_kernels`
belongs to another project). Importing this module imports triton; the registry treats an
ImportError here as "Triton backend unavailable"."""
import os

import triton  # noqa: F401  (fail here, not at first launch, when Triton is missing)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 was set
    before triton was imported): CPU tensors then work, bf16 tl.dot does not. Decided by what
    @triton.jit produced, so it agrees with the kernels whatever the environment says now."""
    from triton.runtime.interpreter import InterpretedFunction

    from .quantize_per_token import quantize_per_token_kernel
    return isinstance(quantize_per_token_kernel, InterpretedFunction)


INTERPRET_ENV = os.environ.get("TRITON_INTERPRET", "0") == "1"
