"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before int8.

LLM activations have a few input channels 10-100x larger than the rest; per-token int8 then
spends its 255 levels on those channels and rounds the others to a handful of levels. With a
per-input-channel factor s (K,),  X W^T = (X / s) (W * s)^T  exactly, and
    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)       (alpha = migration strength, 0.5 default)
balances the channel ranges of X / s and W * s so both quantize well.

Where X / s goes:
- smooth_norm_linears(norm, linears, act_amax): folded into the weight (and bias) of the norm
  that produces X, when every consumer of that norm's output is in `linears` (e.g. an
  attention block's q/k/v projections after input_layernorm). Free at run time. The caller
  says it is allowed: the norm must compute `normalized * weight (+ bias)` (LayerNorm,
  RMSNorm, Llama/Mistral/Qwen RMSNorm; NOT Gemma's `* (1 + weight)`), and nothing else may read
  its output.
- otherwise Int8Linear.from_linear(..., act_amax=..., smooth_alpha=alpha) keeps 1 / s as an
  input-scale buffer and multiplies X by it before quantizing (one elementwise pass).
"""
from typing import Iterable, Sequence, Union

import torch
from torch import nn

from ..ops._checks import check_channel_stats

_EPS = 1e-5  # floor for both maxima: an all-zero channel must not give s = 0 or inf


def _weight_amax(weights) -> torch.Tensor:
    ws = [weights] if isinstance(weights, torch.Tensor) else list(weights)
    if not ws:
        raise ValueError("smooth_scales: argument 'weights' is empty")
    K = ws[0].shape[-1]
    for w in ws:
        if w.dim() != 2 or w.shape[1] != K:
            raise ValueError(f"smooth_scales: every weight must be (N, K) with K = {K}, got {tuple(w.shape)}")
    amax = torch.stack([w.detach().abs().float().amax(dim=0) for w in ws]).amax(dim=0)
    bad = ~torch.isfinite(amax)     # would make s NaN, inf or 0, folded into the model's weights
    if bool(bad.any()):
        raise ValueError(f"smooth_scales: argument 'weights' holds NaN or inf (first at input channel "
                         f"{int(bad.nonzero()[0, 0])})")
    return amax


def smooth_scales(act_amax: torch.Tensor, weights: Union[torch.Tensor, Sequence[torch.Tensor]],
                  alpha: float = 0.5) -> torch.Tensor:
    """s (K,) fp32: s_j = max|X_j|^alpha / max|W_j|^(1-alpha), the weight maximum taken over the
    rows of every given (N_i, K) weight (linears sharing one input share one s)."""
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smooth_scales: argument 'alpha' must be a number in [0, 1], got {alpha!r}")
    w_amax = _weight_amax(weights)
    a = check_channel_stats("smooth_scales", "act_amax", act_amax, w_amax.shape[0]).to(w_amax.device)
    a = a.clamp(min=_EPS)
    w = w_amax.clamp(min=_EPS)
    return a.pow(alpha) / w.pow(1.0 - alpha)


@torch.no_grad()
def smooth_norm_linears(norm: nn.Module, linears: Iterable[nn.Linear], act_amax: torch.Tensor,
                        alpha: float = 0.5) -> torch.Tensor:
    """Fold SmoothQuant into `norm` (weight /= s, bias /= s) and `linears` (weight[:, j] *= s_j),
    in place; the float model computes the same function (up to rounding). `act_amax` is the
    calibrated max |input| per channel of the linears (all read the norm's output). Returns the
    s applied (the norm weight's rounding folded in: divide_norm_weight); the smoothed
    activations' maxima are act_amax / s (for static activation scales)."""
    linears = list(linears)
    if not linears or not all(isinstance(m, nn.Linear) for m in linears):
        raise TypeError("smooth_norm_linears: argument 'linears' must be a non-empty list of nn.Linear")
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        raise TypeError(f"smooth_norm_linears: argument 'norm' ({type(norm).__name__}) must have a 1-D "
                        "elementwise 'weight' to fold the smoothing into")
    s = smooth_scales(act_amax, [m.weight for m in linears], alpha)
    if weight.shape[0] != s.shape[0]:
        raise ValueError(f"smooth_norm_linears: norm.weight has {weight.shape[0]} channels, the linears take "
                         f"{s.shape[0]}")
    new_w, s = divide_norm_weight(weight, s.to(weight.device))
    weight.copy_(new_w)
    bias = getattr(norm, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.copy_((bias.float() / s).to(bias.dtype))
    for m in linears:
        m.weight.copy_((m.weight.float() * s.to(m.weight.device)).to(m.weight.dtype))
    return s


def divide_norm_weight(weight: torch.Tensor, s: torch.Tensor):
    """(weight / s' in weight's dtype, s') for folding smoothing factors s into a norm: s' is s
    rounded to the nearest power of two, so dividing the norm and multiplying the linears by it
    are exact in any float dtype (bf16 / fp16 models too, where a rounded weight * s moved the
    float model by about its own error). Within sqrt(2) of s: the smoothing is as good. Where
    the division still rounds (a subnormal result), s' is the factor really applied."""
    s = torch.exp2(torch.round(torch.log2(s)))
    new_w = (weight.float() / s).to(weight.dtype)
    s_eff = torch.where((new_w != 0) & (weight != 0), weight.float() / new_w.float(), s)
    return new_w, s_eff
