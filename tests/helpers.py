"""Shared test helpers."""
import torch


def poison_(t):
    """Fill an output buffer with NaN (or an extreme int) so unwritten elements show."""
    if t.dtype.is_floating_point:
        return t.fill_(float("nan"))
    return t.fill_(torch.iinfo(t.dtype).min)


def strided_rows(M, K, dtype, device, pad=7):
    """(M, K) view with a row stride of K + pad: kernels must not assume contiguity."""
    base = torch.randn(M, K + pad, dtype=torch.float32, device=device).to(dtype)
    return base[:, :K]
