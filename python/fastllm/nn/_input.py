"""Shared by fastllm's linear layers: dtype names in messages and the (..., K) -> (rows, K) input
check every layer's forward starts with."""
from typing import Tuple

import torch

from ..ops._checks import FLOAT_DTYPES


def fmt(dtype) -> str:
    return str(dtype).replace("torch.", "")


def as_rows(layer: str, x, in_features: int) -> Tuple[torch.Tensor, torch.Size]:
    """x (..., in_features) float16/bfloat16/float32 -> (x as (rows, in_features), leading shape)."""
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{layer}: input must be a float16/bfloat16/float32 tensor, got "
                        f"{fmt(x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"{layer}: input must have shape (..., {in_features}), got {tuple(x.shape)}")
    return x.reshape(-1, in_features), x.shape[:-1]
