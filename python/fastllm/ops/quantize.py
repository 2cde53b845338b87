"""fastllm.ops.quantize_per_token: row-wise symmetric int8 quantization, three backends.

    q, scale = quantize_per_token(x)          # x: (M, K) fp16/bf16/fp32
    x ~= q.float() * scale[:, None]

Semantics (edge rows included) are those of fastllm/ref/quantize.py; every backend is
bit-identical to it. Registered as the custom op fastllm::quantize_per_token.
"""
from typing import Tuple

import torch

from .. import _ext, ref
from ._checks import FLOAT_DTYPES, check_tensor, unit_stride_reason
from .registry import new_op

OP = new_op("quantize_per_token")


def _kernel_supports(x):
    return unit_stride_reason("x", x, 1)


OP.example = lambda: ("x (4096, 4096) bf16", (torch.empty(4096, 4096, dtype=torch.bfloat16, device="meta"),), {})


@OP.register("torch")
def _torch(x):
    return ref.quantize_per_token(x)


@OP.register("triton", supports=_kernel_supports)
def _triton(x):
    from ..triton_kernels.quantize_per_token import quantize_per_token
    return quantize_per_token(x)


def _cuda_supports(x):
    if x.shape[0] > 2 ** 31 - 1:     # the launcher's bound (rows on a 32-bit grid)
        return f"{x.shape[0]} rows: the CUDA kernel takes at most 2^31 - 1"
    return _kernel_supports(x)


@OP.register("cuda", supports=_cuda_supports)
def _cuda(x):
    M, K = x.shape
    q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    scale = torch.empty((M,), dtype=torch.float32, device=x.device)
    code = _ext.lib().quantize_per_token(x.device.index, x.data_ptr(), _ext.DTYPE_CODES[x.dtype], M, K,
                                         x.stride(0) if M > 1 else K, q.data_ptr(), scale.data_ptr(),
                                         _ext.stream_of(x))
    _ext.check(code, "quantize_per_token")
    return q, scale


@OP.bind
@torch.library.custom_op("fastllm::quantize_per_token", mutates_args=())
def _op(x: torch.Tensor, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    return OP.impls[backend](x)


@_op.register_fake
def _(x, backend):
    return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0],), dtype=torch.float32))


def quantize_per_token(x: torch.Tensor, *, backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8: returns (q int8 (M, K) contiguous, scale fp32 (M,)).

    scale = max|x[m]| / 127 (1 for an all-zero row, NaN for a row with NaN/inf, whose q is 0);
    q = round-half-even(x * fl(127 / max|x[m]|)), the reciprocal rounded to fp32 first.
    backend: "auto" | "cuda" | "triton" | "torch".
    """
    check_tensor("quantize_per_token", "x", x, ndim=2, dtypes=FLOAT_DTYPES)
    return OP.call(OP.select(backend, x.device, x), x)
