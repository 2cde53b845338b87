"""Reference exact attention (prefill): the semantics every flash-attention backend matches.

    out, lse = flash_attention(q, k, v, causal=True)
    q: (B, Hq, Sq, D)   k, v: (B, Hkv, Skv, D)   Hq a multiple of Hkv (GQA / MQA)
    out: (B, Sq, Hq, D) contiguous, q.dtype     lse: (B, Hq, Sq) float32 (float64 for float64)

Computed the plain way, with the whole (Sq, Skv) score matrix materialized, in float32
(float64 when the inputs are float64: the tests' ground truth):

    s[i, j] = scale * <q_i, k_j>                       scale defaults to 1/sqrt(D)
    s       = softcap * tanh(s / softcap)              if softcap (Gemma 2)
    s       = max(s + bias[b, h, i, j], SCORE_FLOOR)   if bias (an additive score bias: relative
              positions of Swin / BEiT / Parakeet); -inf stays -inf (masks the key), finite
              sums are floored at -2^126 so that the kernels' exp2 arithmetic cannot overflow:
              a row whose keys all carry the dtype's minimum (transformers' "masked" value)
              then averages them uniformly, as eager attention does
    allowed[i, j] = mask[b, 0, i, j]                   mask: bool, True = attend
                  & (j <= p_i)                         if causal
                  & (j > p_i - window)                 if window (W keys, own included)
    with p_i = i + Skv - Sq the absolute position of query i (bottom-right alignment: the
    queries are the last Sq tokens of a sequence whose first Skv tokens are the keys).
    lse_i = log sum_{allowed j} exp(s[i, j])           (-inf when nothing is allowed)
    out_i = sum_{allowed j} exp(s[i, j] - lse_i) v_j   (0 when nothing is allowed)
    sinks (Hq,) given (gpt-oss): one more score z_h per row, with no value; computed here as
    an extra column of the score matrix (the kernels fold it into their epilogue instead)
    lse_i = log(sum_{allowed j} exp(s[i, j]) + exp(z_h)),  out_i as above with that lse

Query head h reads kv head h // (Hq // Hkv).
Keys that no query attends (padding, slots past a cache's length: often uninitialized memory)
never contribute, even if they hold NaN / inf. The kernels guarantee that for keys past the
sequence / cache length (never loaded); keys inside it that the mask, causality or the window
exclude are still loaded with their tile (p = 0 times V), so their V must be finite there.
"""
import math
from typing import Optional, Tuple

import torch


#: Finite biased scores are floored here (see the module docstring): -2^126 times log2(e) is
#: still a normal fp32 number, the dtype minimum (-3.4e38) times log2(e) is -inf.
SCORE_FLOOR = -2.0 ** 126


def add_bias(s: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Scores plus an additive bias (broadcast), finite results floored at SCORE_FLOOR."""
    s = s + bias.to(s.dtype)
    return torch.where(s == float("-inf"), s, s.clamp_min(SCORE_FLOOR))


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def allowed_keys(Sq: int, Skv: int, *, causal: bool, window: Optional[int] = None,
                 mask: Optional[torch.Tensor] = None, device=None) -> torch.Tensor:
    """Bool (B or 1, 1, Sq, Skv): which key each query may attend to (see module docstring)."""
    pos = torch.arange(Sq, device=device)[:, None] + (Skv - Sq)   # absolute query positions
    key = torch.arange(Skv, device=device)[None, :]
    allowed = torch.ones(Sq, Skv, dtype=torch.bool, device=device)
    if causal:
        allowed &= key <= pos
    if window is not None and window > 0:
        allowed &= key > pos - window
    allowed = allowed[None, None]
    if mask is not None:
        allowed = allowed & mask.to(device=device, dtype=torch.bool)
    return allowed


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                    scale: Optional[float] = None, mask: Optional[torch.Tensor] = None,
                    window: Optional[int] = None, softcap: Optional[float] = None,
                    sinks: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Sq, Hq, D) contiguous in q.dtype, lse (B, Hq, Sq) float32/float64). bias: float,
    broadcastable to (B, Hq, Sq, Skv)."""
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    acc = _acc_dtype(q.dtype)
    group = Hq // Hkv
    # GQA without repeating K/V: the `group` query heads of kv head j are rows of one matmul,
    # (B, Hkv, group * Sq, D) @ (B, Hkv, D, Skv), viewed back as (B, Hq, Sq, Skv).
    qf = q.to(acc).reshape(B, Hkv, group * Sq, D)
    kf, vf = k.to(acc), v.to(acc)

    s = torch.matmul(qf, kf.transpose(-1, -2)).view(B, Hq, Sq, Skv) * scale   # (B, Hq, Sq, Skv)
    if softcap is not None and softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = add_bias(s, bias)
    allowed = allowed_keys(Sq, Skv, causal=causal, window=window, mask=mask, device=q.device)
    s = s.masked_fill(~allowed, float("-inf"))
    # p = 0 there, but 0 * NaN = NaN: keys nobody attends are zeroed (unused cache slots).
    vf = vf.masked_fill(~allowed.any(dim=-2, keepdim=True).transpose(-1, -2), 0.0)
    if sinks is not None:   # the sink column joins the softmax, then is dropped (it has no value)
        z = sinks.to(acc).view(1, Hq, 1, 1).expand(B, Hq, Sq, 1)
        s = torch.cat([s, z], dim=-1)

    # Softmax relative to the row max, normalized by the sum (not exp(s - lse): where scores sit
    # at the bias floor, ~-1e38, lse has lost ln(n) to rounding). Only an empty row (max -inf)
    # is made safe; a +inf score must give NaN as the kernels and SDPA do.
    m = s.amax(dim=-1, keepdim=True) if s.shape[-1] else s.new_full((*s.shape[:-1], 1), float("-inf"))
    e = torch.exp(s - torch.where(m == float("-inf"), torch.zeros_like(m), m))   # exp(-inf) = 0
    den = e.sum(dim=-1, keepdim=True)
    lse = (m + torch.log(den)).squeeze(-1)                                    # -inf: empty row
    p = e / torch.where(den == 0, torch.ones_like(den), den)
    p = p[..., :Skv].contiguous() if sinks is not None else p
    out = torch.matmul(p.view(B, Hkv, group * Sq, Skv), vf).view(B, Hq, Sq, D)
    out = out.transpose(1, 2).to(q.dtype).contiguous()
    return out, lse.contiguous()


def flash_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, *, causal: bool,
                           scale: Optional[float] = None, window: Optional[int] = None,
                           softcap: Optional[float] = None, sinks: Optional[torch.Tensor] = None
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Packed sequences (flash-attn's varlen layout): q (total_q, Hq, D), k/v (total_k, Hkv, D),
    cu_seqlens_* int32 (B + 1,) prefix sums. Sequence b is q[cu_q[b]:cu_q[b+1]] against
    k/v[cu_k[b]:cu_k[b+1]], with the semantics of flash_attention (causal bottom-right aligned
    per sequence). Returns (out (total_q, Hq, D), lse (Hq, total_q) float32) as flash-attn.
    Rows no sequence covers: out 0, lse -inf. Offsets are read clamped (start into [0, total],
    end into [start, total]) as the kernels read them; fastllm.ops checks them on CPU."""
    total_q, Hq, D = q.shape
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.full((Hq, total_q), float("-inf"), dtype=_acc_dtype(q.dtype), device=q.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    clamp = lambda x, lo, hi: min(max(x, lo), hi)  # noqa: E731 - the kernels' reading of bad offsets
    for b in range(len(cq) - 1):
        q0 = clamp(cq[b], 0, total_q)
        q1 = clamp(cq[b + 1], q0, total_q)
        k0 = clamp(ck[b], 0, k.shape[0])
        k1 = clamp(ck[b + 1], k0, k.shape[0])
        if q1 == q0:
            continue
        o, l = flash_attention(q[q0:q1].transpose(0, 1)[None], k[k0:k1].transpose(0, 1)[None],
                               v[k0:k1].transpose(0, 1)[None], causal=causal, scale=scale,
                               window=window, softcap=softcap, sinks=sinks)
        out[q0:q1] = o[0]
        lse[:, q0:q1] = l[0]
    return out, lse
