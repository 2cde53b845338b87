"""torch.autocast and fastllm's ops.

What autocast does to the torch ops fastllm stands in for, fastllm does at the same place:
scaled_dot_product_attention and linear are on autocast's lower-precision list, so under
`torch.autocast(device_type, dtype)` the attention ops (flash_attention, flash_attention_varlen,
decode_attention) and the Int8Linear / Sparse24Linear forwards first cast their floating inputs
to the autocast dtype (`to_autocast_dtype`). Without it, a patched fp32 model under autocast
failed wherever the model mixes dtypes (fp32 rotary embeddings meet bf16 value projections:
"argument 'v' must have the dtype of 'q'"), where SDPA and eager attention run.

The implementations themselves run with autocast off (`outside_autocast`, applied to every
registered backend): an ambient autocast would otherwise turn the torch reference's fp32
matmuls into bf16 ones and silently change what a backend computes.
"""
import functools

import torch

# Device types whose autocast state is read (torch.is_autocast_enabled raises for "meta").
_DEVICE_TYPES = ("cuda", "cpu")
_any_enabled = getattr(torch._C, "_is_any_autocast_enabled", None)


def _may_be_on() -> bool:
    """False only when no autocast is on anywhere: a ~0.4 us check that spares eager calls the
    device lookup (~2 us). While torch.compile traces, the per-device calls below are what
    dynamo understands."""
    return _any_enabled is None or torch.compiler.is_compiling() or _any_enabled()


def _on_for(t: torch.Tensor):
    """The device type of `t` if autocast is on there, else None."""
    if not _may_be_on():
        return None
    kind = t.device.type
    return kind if kind in _DEVICE_TYPES and torch.is_autocast_enabled(kind) else None


def autocast_dtype(t: torch.Tensor):
    """The autocast dtype in force for tensors on `t`'s device, or None."""
    kind = _on_for(t)
    return torch.get_autocast_dtype(kind) if kind else None


def to_autocast_dtype(*tensors):
    """The tensors, floating ones cast to the autocast dtype of the first one's device when
    autocast is on there. As autocast itself: float64, integer tensors, None and non-tensors
    pass through (the ops' checks then say what they expected)."""
    first = tensors[0]
    dtype = autocast_dtype(first) if isinstance(first, torch.Tensor) else None  # not a tensor: checks say so
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype not in (dtype, torch.float64)
                 and t.is_floating_point() else t for t in tensors)


def outside_autocast(fn):
    """Wrap a backend implementation (first argument a tensor) to run with autocast off."""
    @functools.wraps(fn)
    def run(*args):
        kind = _on_for(args[0])
        if kind is None:
            return fn(*args)
        with torch.autocast(kind, enabled=False):
            return fn(*args)
    return run
