"""Pruning to 2:4 along K (the reduction dim of an nn.Linear weight (N, K)).

    w24, rep = prune_24(w)                                  # magnitude: keep the 2 largest |w| of 4
    w24, rep = prune_24(w, method="wanda", act_norm=norm)   # Wanda: keep the 2 largest |w| * ||x_k||
    norms = collect_act_norms(model, batches)               # {linear name: (K,) ||x_k||_2 over tokens}

Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs") scores each weight
by |W[n, k]| * ||X[:, k]||_2, the column norm of the layer's input over calibration tokens: a
small weight on a channel with large activations (LLMs have a few such outlier channels)
matters more than a large weight on a quiet one. Comparing within each group of 4 along K is
the 2:4 version of its per-output-row comparison.

The report of every prune: norm_removed = ||W - W24||_F / ||W||_F (the fraction of the
layer's Frobenius norm that was removed; 2:4 on Gaussian weights removes ~0.38, magnitude
is the minimum of this number under 2:4, Wanda trades it for lower output error).
Ties keep the lower column (a stable sort), so results are deterministic.
"""
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Tuple, Union

import torch
from torch import nn

from ..ops._checks import check_channel_stats
from .format import GROUP

METHODS = ("magnitude", "wanda")


@dataclass
class PruneReport:
    method: str
    shape: Tuple[int, int]
    norm_removed: float      # ||W - W24||_F / ||W||_F (0 when W is 0)

    def __str__(self):
        return f"{self.method} 2:4 on {self.shape[0]}x{self.shape[1]}: removed {self.norm_removed:.1%} of the norm"


def mask_24(scores: torch.Tensor) -> torch.Tensor:
    """bool (N, K): True on the 2 highest scores of every group of 4 along K (ties: lower column)."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or scores.shape[1] % GROUP:
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"mask_24: argument 'scores' must be a 2-D (N, K) tensor with K a multiple of {GROUP}, "
                         f"got {got}")
    N, K = scores.shape
    g = scores.reshape(N, K // GROUP, GROUP)
    keep = torch.argsort(g, dim=-1, descending=True, stable=True)[..., :2]
    mask = torch.zeros_like(g, dtype=torch.bool)
    mask.scatter_(-1, keep, True)
    return mask.reshape(N, K)


def prune_24(w: torch.Tensor, method: str = "magnitude", act_norm: Optional[torch.Tensor] = None
             ) -> Tuple[torch.Tensor, PruneReport]:
    """2:4-pruned copy of `w` (N, K) (same dtype/device) and a PruneReport.
    method "magnitude" (score |w|) or "wanda" (score |w| * act_norm[k]; act_norm (K,) needed)."""
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"prune_24: argument 'w' must be a 2-D tensor (N, K), got "
                         f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
    N, K = w.shape
    if K % GROUP:
        raise ValueError(f"prune_24: argument 'w': K = {K} is not a multiple of {GROUP} (2:4 groups along K)")
    if method not in METHODS:
        raise ValueError(f"prune_24: argument 'method' must be one of {', '.join(METHODS)}, got {method!r}")
    score = w.detach().float().abs()   # float first: int8's abs(-128) wraps to -128
    if method == "wanda":
        if act_norm is None:
            raise ValueError("prune_24: method 'wanda' needs act_norm (K,) (fastllm.sparse.collect_act_norms)")
        # Negative or NaN norms would keep the smallest weights, or tie every group.
        norm = check_channel_stats("prune_24", "act_norm", act_norm, K)
        score = score * norm.to(score.device).reshape(1, K)
    elif act_norm is not None:
        raise ValueError("prune_24: act_norm is for method 'wanda'")
    mask = mask_24(score)
    out = torch.where(mask, w.detach(), torch.zeros((), dtype=w.dtype, device=w.device))
    total = w.detach().double().norm().item()
    removed = (w.detach().double() - out.double()).norm().item()
    return out, PruneReport(method, (N, K), removed / total if total > 0 else 0.0)


def collect_act_norms(model: nn.Module, batches: Iterable,
                      layers: Optional[Iterable[Union[str, nn.Module]]] = None) -> Dict[str, torch.Tensor]:
    """Per-input-channel L2 norm of each chosen nn.Linear's input over all calibration tokens:
    {name: (K,) fp32} = sqrt(sum over batches and tokens of x[..., k]**2), Wanda's ||X_k||_2.

    layers / batches as fastllm.quant.calibrate (None: every Linear that runs; a dict batch is
    model(**batch), a tuple model(*batch)). The hooks are removed afterwards, also on error."""
    from ..quant.calibrate import observe_inputs
    sq = observe_inputs(model, batches, layers, lambda x: x.float().pow(2).sum(0), torch.add, "collect_act_norms")
    return {name: s.sqrt() for name, s in sq.items()}
