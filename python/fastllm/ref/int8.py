"""Reference int8 matmuls (W8A8 and W8A16): the tests' ground truth and the CPU fallback.

    acc = int8_matmul_int32(a, b)                       # a (M, K) int8, b (N, K) int8 -> (M, N) int32
    out = int8_matmul(a, b, a_scale, w_scale, bias, out_dtype)
        = round_to(out_dtype, (float32(acc) * a_scale[m]) * w_scale[n] + bias[n])   # all fp32
    out = w8a16_matmul(x, w, w_scale, bias, group_size)
        = round_to(x.dtype, sum_k x[m, k] * (w[n, k] * w_scale[n, k // group]) + bias[n])  # fp32
    q = quantize_static(x, in_mul) = rne(clamp(fp32(x[m, k]) * in_mul[k], -127, 127))   # NaN -> 0
    out = int8_matmul_static(x, b, in_mul, a_scale, w_scale, bias)
        = int8_matmul(quantize_static(x, in_mul), b, a_scale, w_scale, bias, out_dtype=x.dtype)

Semantics every backend follows:
- b / w is in nn.Linear layout (N, K): out = a @ b.T.
- The int32 accumulator is exact (|a|, |b| <= 128 and K * 128 * 128 < 2**31, which the public
  ops check), so every backend must return the same int32 bits.
- The epilogue runs in fp32 in this order: acc converted to fp32, times a_scale (one value for
  the whole tensor, or one per row), times w_scale[n], plus bias[n] (converted to fp32), then one
  rounding to the output dtype. Kernels may fuse the multiply-add (one rounding fewer); tests
  allow that.
- W8A16: the weights are exact in every float dtype (|w| <= 128), so dequantization loses
  nothing; the sum is fp32 (summation order is the backend's), rounded once to x.dtype.
"""
from typing import Optional

import torch


def int8_matmul_int32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact a @ b.T in int32. a: (M, K) int8, b: (N, K) int8."""
    if a.device.type == "cpu":
        return a.to(torch.int32) @ b.to(torch.int32).t()
    # CUDA has no integer matmul in PyTorch outside torch._int_mm (which needs M > 16 and was
    # once wrong at M = 17, pytorch#107671). float64 is exact here: every partial sum is an
    # integer of magnitude < 2**31 < 2**53.
    return (a.to(torch.float64) @ b.to(torch.float64).t()).to(torch.int32)


def scale_epilogue(acc: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                   bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """(acc fp32 * a_scale[m]) * w_scale[n] + bias[n], rounded once to out_dtype.
    a_scale: (M,) or one element; w_scale: (N,); bias: (N,) any float dtype or None."""
    out = acc.to(torch.float32) * a_scale.to(torch.float32).reshape(-1, 1)
    out = out * w_scale.to(torch.float32).reshape(1, -1)
    if bias is not None:
        out = out + bias.to(torch.float32).reshape(1, -1)
    return out.to(out_dtype)


def int8_matmul(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """W8A8: a (M, K) int8 with a_scale (M,) or one element fp32; b (N, K) int8 with w_scale (N,)."""
    return scale_epilogue(int8_matmul_int32(a, b), a_scale, w_scale, bias, out_dtype)


def int8_matmul_dynamic(x: torch.Tensor, b: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
                        smooth: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W8A8 with per-token dynamic quantization, in x.dtype: quantize_per_token of fp32(x) * smooth
    (or x), then the int8 GEMM with those per-row scales."""
    from .quantize import quantize_per_token
    xs = x if smooth is None else x.to(torch.float32) * smooth.to(torch.float32).reshape(1, -1)
    q, a_scale = quantize_per_token(xs)
    return int8_matmul(q, b, a_scale, w_scale, bias, out_dtype=x.dtype)


def dequantize_weight(w: torch.Tensor, w_scale: torch.Tensor, group_size: Optional[int] = None) -> torch.Tensor:
    """fp32 (N, K) = w * scale, scale per row (N,) or per (row, group of group_size columns)."""
    if not group_size:
        return w.to(torch.float32) * w_scale.to(torch.float32).reshape(-1, 1)
    return w.to(torch.float32) * w_scale.to(torch.float32).repeat_interleave(group_size, dim=1)


def w8a16_matmul(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 group_size: Optional[int] = None) -> torch.Tensor:
    """Weight-only int8: x (M, K) float, w (N, K) int8, w_scale (N,) or (N, K // group_size) fp32."""
    out = x.to(torch.float32) @ dequantize_weight(w, w_scale, group_size).t()
    if bias is not None:
        out = out + bias.to(torch.float32).reshape(1, -1)
    return out.to(x.dtype)


def quantize_static(x: torch.Tensor, in_mul: torch.Tensor) -> torch.Tensor:
    """Static (calibrated) activation quantization: x (M, K) float, in_mul fp32 (K,) per channel
    or one element -> int8 rne(clamp(fp32(x) * in_mul, -127, 127)); NaN -> 0, +-inf -> +-127.
    One fp32 product per element (rounded once), then an exact clamp and round-half-even."""
    y = x.to(torch.float32) * in_mul.to(torch.float32).reshape(1, -1)
    y = torch.nan_to_num(y, nan=0.0, posinf=127.0, neginf=-127.0).clamp_(-127.0, 127.0)
    return torch.round(y).to(torch.int8)


def int8_matmul_static(x: torch.Tensor, b: torch.Tensor, in_mul: torch.Tensor, a_scale: torch.Tensor,
                       w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W8A8 with static activation quantization, in x.dtype: the int8 GEMM of quantize_static(x)."""
    return int8_matmul(quantize_static(x, in_mul), b, a_scale, w_scale, bias, out_dtype=x.dtype)
