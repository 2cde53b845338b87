"""Weight quantization to int8: symmetric, per output channel or per (channel, group of K).

    q, scale = quantize_weight_per_channel(w)             # w (N, K) -> q (N, K) int8, scale (N,) fp32
    q, scale = quantize_weight_per_group(w, group_size)   # scale (N, K // group_size) fp32
    w ~= q * scale  (dequantize_weight in fastllm.ref.int8)

scale = amax / 127 over the row (or group); q = round-half-even(w * fl(127 / amax)) in [-127, 127];
an all-zero row (group), or one whose amax / 127 underflows (denormal weights), gets scale 1 and
q 0 -- never 0 or NaN, so no division by zero can follow. The arithmetic is
fastllm.ref.quantize_per_token's (the same rounding as the activations), in fp32 whatever the
weight's dtype. Non-finite weights are rejected.
"""
import numbers

import torch

from ..ops._checks import FLOAT_DTYPES, check_tensor
from ..ref.quantize import quantize_per_token as _rowwise


def _check_weight(op, w):
    check_tensor(op, "w", w, ndim=2, dtypes=FLOAT_DTYPES)
    if not torch.isfinite(w).all():
        raise ValueError(f"{op}: argument 'w' has NaN or inf entries; cannot quantize")


def _quantize_rows(w2: torch.Tensor):
    q, scale = _rowwise(w2)
    # A row whose amax is a denormal below 127 * 2^-149 gets scale amax / 127 = 0: its values
    # are zero for any purpose, so it is quantized as zero (scale 1, q 0), as the docstring says.
    tiny = scale == 0
    if bool(tiny.any()):
        q = q.masked_fill(tiny[:, None], 0)
        scale = scale.masked_fill(tiny, 1.0)
    return q, scale


def quantize_weight_per_channel(w: torch.Tensor):
    """w (N, K) float -> (q int8 (N, K), scale fp32 (N,)), one symmetric scale per output row."""
    _check_weight("quantize_weight_per_channel", w)
    return _quantize_rows(w.detach().float())


def quantize_weight_per_group(w: torch.Tensor, group_size: int):
    """w (N, K) float -> (q int8 (N, K), scale fp32 (N, K // group_size)); group_size divides K."""
    op = "quantize_weight_per_group"
    _check_weight(op, w)
    N, K = w.shape
    if not isinstance(group_size, numbers.Integral) or isinstance(group_size, bool) or group_size <= 0 \
            or K % group_size:
        raise ValueError(f"{op}: argument 'group_size' must be a positive int dividing K = {K}, got {group_size!r}")
    group_size = int(group_size)
    q, scale = _quantize_rows(w.detach().float().reshape(N * (K // group_size), group_size))
    return q.reshape(N, K), scale.reshape(N, K // group_size)
