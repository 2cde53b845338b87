"""Reference 2:4 sparse matmuls: decompress the weight, multiply densely. The tests' ground
truth and the CPU fallback.

    out = sparse24_matmul(x, values, meta, bias)          # x (M, K) fp16/bf16 -> (M, N) x.dtype
        = round_to(x.dtype, fp32(x) @ fp32(W).T + bias)   # W = decompress(values, meta), fp32 sum
    acc = sparse24_int8_matmul_int32(a, values, meta)     # a (M, K) int8, int8 W -> exact int32
    out = sparse24_int8_matmul(a, values, meta, a_scale, w_scale, bias, out_dtype)
        = int8 epilogue of fastllm/ref/int8.py: (fp32(acc) * a_scale[m]) * w_scale[n] + bias[n]

values (N, K // 2) and meta (N // 16, K // 2) int32 are fastllm.sparse.compress's format
(python/fastllm/sparse/format.py). Decompression is exact, so every backend must match the
dense product of the decompressed weight: int32 bit for bit, floats to summation order.
"""
from typing import Optional

import torch

from ..sparse.format import decompress
from .int8 import int8_matmul_int32, scale_epilogue


def sparse24_matmul(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    w = decompress(values, meta)
    out = x.to(torch.float32) @ w.to(torch.float32).t()
    if bias is not None:
        out = out + bias.to(torch.float32).reshape(1, -1)
    return out.to(x.dtype)


def sparse24_int8_matmul_int32(a: torch.Tensor, values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    return int8_matmul_int32(a, decompress(values, meta))


def sparse24_int8_matmul(a: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, a_scale: torch.Tensor,
                         w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
                         out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return scale_epilogue(sparse24_int8_matmul_int32(a, values, meta), a_scale, w_scale, bias, out_dtype)
