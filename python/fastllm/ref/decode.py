"""Reference decode attention: a few new queries against a KV cache (the semantics every
decode_attention backend matches).

    out, lse = decode_attention(q, k_cache, v_cache, cache_seqlens=lens)
    q        (B, Hq, Sq, D)       Sq small (1..16: a decode step, speculative verification)
    k_cache  (B, Hkv, S_max, D)   contiguous cache (DynamicCache / StaticCache layout), or with
             (num_pages, page_size, Hkv, D) plus block_table (B, max_pages) int32: paged cache
    out      (B, Sq, Hq, D) contiguous, q.dtype     lse (B, Hq, Sq) float32 (float64 for float64)

Capacity: S_cap = S_max (contiguous) or max_pages * page_size (paged). Logical key position j
of sequence b lives at k_cache[b, :, j] or at k_cache[block_table[b, j // page_size],
j % page_size].

Which keys a query sees, with L_b the valid length of sequence b:
  * cache_seqlens (B,) int32 given: keys [0, L_b) are valid. The Sq queries are the LAST Sq of
    those positions (already written into the cache): query i sits at p_i = L_b - Sq + i and
    sees keys j <= p_i (causal among the new queries, bottom-right aligned), and with a window
    W only j > p_i - W (W keys, its own included). With L_b < Sq the first rows see nothing.
  * mask (B or 1, 1, Sq, S_cap) bool given (True = attend; what transformers' sdpa_mask builds,
    e.g. for left-padded batches): exactly the keys the mask allows; no causal, length or
    window logic on top (the mask holds them). Not combinable with cache_seqlens or window.
  * neither: every sequence has length S_cap (L_b = S_cap, causal as above). For Sq == 1 that is
    "attend to every key".
Then, as in ref/attention.py: s = scale * <q_i, k_j> (scale defaults to 1/sqrt(D)), softcap c:
s = c * tanh(s / c); lse_i = log sum_allowed exp(s_ij); out_i = sum_allowed exp(s_ij - lse_i) v_j
(sinks (Hq,): one more exp(z_h) in each row's sum, as in ref/attention.py).
A row with nothing allowed gets out = 0 and lse = -inf. Query head h reads kv head
h // (Hq // Hkv).

Out-of-range metadata (what every backend does, so results agree; the op's validate=True
raises instead): L_b is clamped into [0, S_cap], and a block_table entry that is read (page
j // page_size for j < L_b) is clamped into [0, num_pages). Entries past a sequence's last page
are never read (they may hold -1 or anything).

Computed the plain way: the pages are gathered into a dense (B, Hkv, S_cap, D) cache, the
allowed keys become a bool mask (fastllm.ref.attention.allowed_keys per sequence) and
fastllm.ref.flash_attention does the rest.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .attention import allowed_keys, flash_attention


def gather_pages(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """Paged cache (num_pages, page_size, Hkv, D) -> dense (B, Hkv, max_pages * page_size, D)
    through block_table (B, max_pages), page ids clamped into [0, num_pages)."""
    num_pages, page_size, Hkv, D = cache.shape
    B, max_pages = block_table.shape
    ids = block_table.long().clamp(0, max(num_pages - 1, 0))
    dense = cache[ids.reshape(-1)].reshape(B, max_pages * page_size, Hkv, D)
    return dense.transpose(1, 2)


def length_mask(lengths, Sq: int, capacity: int, window: Optional[int] = None, device=None) -> torch.Tensor:
    """Bool (B, 1, Sq, capacity): sequence b has lengths[b] valid keys (clamped into
    [0, capacity]); its queries are the last Sq of them, causal bottom-right aligned, window W."""
    rows = []
    for L in lengths:
        L = min(max(int(L), 0), capacity)
        m = allowed_keys(Sq, L, causal=True, window=window, device=device)   # (1, 1, Sq, L)
        rows.append(F.pad(m, (0, capacity - L), value=False))
    if not rows:
        return torch.zeros(0, 1, Sq, capacity, dtype=torch.bool, device=device)
    return torch.cat(rows)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
                     cache_seqlens: Optional[torch.Tensor] = None,
                     block_table: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                     mask: Optional[torch.Tensor] = None, window: Optional[int] = None,
                     softcap: Optional[float] = None, sinks: Optional[torch.Tensor] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Sq, Hq, D) contiguous in q.dtype, lse (B, Hq, Sq) float32/float64); see the
    module docstring."""
    B, Hq, Sq, D = q.shape
    if block_table is not None:
        k, v = gather_pages(k_cache, block_table), gather_pages(v_cache, block_table)
    else:
        k, v = k_cache, v_cache
    capacity = k.shape[2]
    if mask is None:
        lengths = cache_seqlens.tolist() if cache_seqlens is not None else [capacity] * B
        mask = length_mask(lengths, Sq, capacity, window=window, device=q.device)
    return flash_attention(q, k, v, causal=False, scale=scale, mask=mask, softcap=softcap, sinks=sinks)
