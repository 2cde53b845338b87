"""Shared by fastllm's linear layers: dtype names in messages, the (..., K) -> (rows, K) input
check every layer's forward starts with, and fp32 scale buffers that survive model.half()."""
from typing import Tuple

import torch
from torch import nn

from ..ops._autocast import to_autocast_dtype
from ..ops._checks import FLOAT_DTYPES


def fmt(dtype) -> str:
    return str(dtype).replace("torch.", "")


def as_rows(layer: str, x, in_features: int) -> Tuple[torch.Tensor, torch.Size]:
    """x (..., in_features) float16/bfloat16/float32 -> (x as (rows, in_features), leading shape)."""
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{layer}: input must be a float16/bfloat16/float32 tensor, got "
                        f"{fmt(x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__}")
    x, = to_autocast_dtype(x)   # as autocast does for nn.Linear (fastllm/ops/_autocast.py)
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"{layer}: input must have shape (..., {in_features}), got {tuple(x.shape)}")
    return x.reshape(-1, in_features), x.shape[:-1]


def in_weight_dtype(w: torch.Tensor, bias) -> torch.Tensor:
    """A quantized / compressed layer's effective weight (fp32 math) as model code reading
    `.weight` gets it: in the bias's dtype, float32 without a bias."""
    return w.to(bias.dtype if bias is not None else torch.float32)


class KeepsFp32Scales(nn.Module):
    """Its buffers named in _FP32_BUFFERS stay float32 through .half() / .bfloat16() / .to(dtype)
    (the kernels take fp32 scales; a 16-bit round trip would lose their precision) while still
    following device moves. Everything else converts as in any nn.Module."""
    _FP32_BUFFERS: Tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        kept = {n: self._buffers[n] for n in self._FP32_BUFFERS if self._buffers.get(n) is not None}
        out = super()._apply(fn, recurse)
        for n, old in kept.items():
            new = self._buffers[n]
            if new.dtype != torch.float32:
                self._buffers[n] = old.to(device=new.device)
        return out
