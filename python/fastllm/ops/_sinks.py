"""Attention sinks (gpt-oss's `s_aux`): one learned logit per query head that joins every row's
softmax as an extra key without a value. With sink z_h for query head h:

    L_i   = log(exp(lse_i) + exp(z_h))              the row's log-normaliser, sink included
    out_i = sum_j exp(s_ij - L_i) v_j  =  out'_i * sigmoid(lse_i - z_h)

where (out', lse) is attention without the sink. The reference adds the sink as a score
column; the Triton kernels fold it into their softmax epilogue (softmax_finish_sinks in
triton_kernels/flash_attention.py); the CUDA kernels do not take sinks yet, and their
(out', lse) gets this epilogue: out' rescaled, L returned as the lse. Exact up to one rounding
of out (the factor is fp32), at the price of one more elementwise pass over out. A row with no
allowed key keeps out = 0 and gets L = z_h; z_h = -inf is "no sink" for that head.
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


def apply_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor, head_dim: int):
    """(out, lse) without sinks -> with them (see the module docstring). lse's heads are on
    dim `head_dim` (1: (B, Hq, Sq) with out (B, Sq, Hq, D); 0: varlen (Hq, total_q) with out
    (total_q, Hq, D)). sinks: (Hq,), or lse-shaped (a sink per row; -inf: none)."""
    z = sinks if sinks.dim() == lse.dim() else sinks.view(-1, *([1] * (lse.dim() - 1 - head_dim)))
    factor = torch.where(lse == float("-inf"), 0.0, torch.sigmoid(lse - z))   # empty row: stays 0
    new_lse = torch.logaddexp(lse, z)
    f = factor.transpose(0, 1) if head_dim == 0 else factor.transpose(1, 2)  # out's (..., Hq) order
    return (out.float() * f.unsqueeze(-1)).to(out.dtype), new_lse
