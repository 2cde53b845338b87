"""Attention sinks (gpt-oss's `s_aux`): one learned logit per query head that joins every row's
softmax as an extra key without a value. With sink z_h for query head h:

    L_i   = log(exp(lse_i) + exp(z_h))              the row's log-normaliser, sink included
    out_i = sum_j exp(s_ij - L_i) v_j  =  out'_i * sigmoid(lse_i - z_h)

where (out', lse) is attention without the sink. The reference adds the sink as a score
column; the kernels fold it into their softmax epilogue (Triton: softmax_finish_sinks in
triton_kernels/flash_attention.py; CUDA: fold_sink in csrc/attention/flash_fwd_kernel.cuh, and
the decode combine kernel as one more partial). A row with no allowed key keeps out = 0 and
gets L = z_h; z_h = -inf is "no sink" for that head. This module validates the argument.
"""
from typing import Optional

import torch

from ._checks import FLOAT_DTYPES, check_tensor, check_values


def check_sinks(op: str, sinks: Optional[torch.Tensor], q: torch.Tensor, Hq: int) -> Optional[torch.Tensor]:
    """Validate `sinks` ((Hq,) float, on q's device, no NaN / +inf: checked on CPU) -> fp32 or None."""
    if sinks is None:
        return None
    check_tensor(op, "sinks", sinks, ndim=1, dtypes=FLOAT_DTYPES)
    if sinks.shape[0] != Hq:
        raise ValueError(f"{op}: argument 'sinks' must have one logit per query head ({Hq}), got shape "
                         f"{tuple(sinks.shape)}")
    if sinks.device != q.device:
        raise ValueError(f"{op}: argument 'sinks' must be on the device of 'q' ({q.device}), got {sinks.device}")
    check_values(op, "sinks", sinks, lambda z: ~torch.isnan(z) & (z != float("inf")),
                 "hold finite logits (or -inf: no sink)")
    return sinks.float().contiguous()


def sinks_reason(sinks: Optional[torch.Tensor], q: torch.Tensor, Hq: int) -> Optional[str]:
    """Why a CUDA kernel cannot read these (normalized) sinks, or None: it takes (Hq,)
    contiguous float32 on q's device, what check_sinks returns."""
    if sinks is None:
        return None
    if (sinks.dtype != torch.float32 or tuple(sinks.shape) != (Hq,) or sinks.device != q.device
            or (Hq > 1 and sinks.stride(0) != 1)):
        return f"sinks must be ({Hq},) contiguous float32 on q's device (the op layer converts them)"
    return None
