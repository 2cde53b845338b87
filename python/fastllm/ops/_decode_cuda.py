"""Glue between fastllm.ops.decode_attention and the CUDA split-KV decode kernel (csrc/decode/).

UNVERIFIED: the kernel has been compiled (sm_80, sm_90a, 0 spills) but never run on a GPU.

Imported lazily by python/fastllm/ops/decode.py (the "cuda" backend):

    cuda_supports(q, k_cache, v_cache, cache_seqlens, block_table, mask, scale, window, softcap,
                  num_splits, sinks) -> None or a reason string (metadata only: CPU / meta tensors work)
    decode_attention_cuda(same arguments, num_splits >= 1) -> (out, lse)

Arguments arrive normalized by the op (scale float, window int <= 0 for none, softcap 0.0 for
none, sinks None or (Hq,) float32: the kernels fold them into their softmax). Tensors are read in
place through their strides (unit stride in D); the mask through its (possibly zero) strides. The
fp32 partials of the splits (B, Hq, Sq, splits, D) and (B, Hq, Sq, splits) are allocated here
(the extension allocates nothing). Tile sizes live in C++ only (csrc/decode/decode_traits.h); the
split count comes from ops/decode.py.
"""
from typing import Optional

import torch

from .. import _ext
from ._checks import GRID_YZ_MAX, broadcast_strides, exp2_scalars_reason, misaligned16
from ._sinks import sinks_reason
from .decode import capacity_of, kv_heads_of

# Head dims with a compiled instantiation (csrc/decode/generate_instantiations.py HEAD_DIMS).
HEAD_DIMS = (64, 80, 96, 128, 256)
DTYPES = (torch.float16, torch.bfloat16)
MAX_SPLITS = 256            # the launcher's bound (decode_launcher.cu)
_INT_MAX = 2 ** 31 - 1


def _dt(dtype):
    return str(dtype).replace("torch.", "")


def _kv_strides(t, paged):
    """(batch or page, head, seq or slot) strides in elements, 0 for a dim of size 1."""
    return broadcast_strides(t, (0, 2, 1) if paged else (0, 1, 2))


def _q_strides(q):
    return broadcast_strides(q, range(3))


def cuda_supports(q, k_cache, v_cache, cache_seqlens, block_table, mask, scale, window, softcap,
                  num_splits, sinks=None) -> Optional[str]:
    """None if the CUDA decode kernel can serve this call, else a short reason."""
    if q.dtype not in DTYPES:
        return f"dtype {_dt(q.dtype)} not supported by the CUDA kernel (fp16/bf16)"
    B, Hq, Sq, D = q.shape
    if D not in HEAD_DIMS:
        return f"head dim {D} not compiled (CUDA decode kernel has {', '.join(map(str, HEAD_DIMS))})"
    paged = block_table is not None
    Hkv, capacity = kv_heads_of(k_cache, block_table), capacity_of(k_cache, block_table)
    if Hkv == 0 or Hq % Hkv:
        return f"query heads ({Hq}) not a multiple of kv heads ({Hkv})"
    rows = (Hq // Hkv) * Sq
    if B * Hkv > _INT_MAX or -(-rows // 16) > GRID_YZ_MAX:
        return f"grid too large (batch x kv heads {B * Hkv}, packed rows {rows})"
    if capacity > _INT_MAX // 2:
        return f"cache capacity {capacity} above {_INT_MAX // 2}"
    if num_splits > MAX_SPLITS:
        return f"num_splits {num_splits} above {MAX_SPLITS}"
    why = exp2_scalars_reason(scale, softcap)
    if why:
        return why
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            return f"'{name}' dtype {_dt(t.dtype)} differs from q's {_dt(q.dtype)}"
        if t.stride(-1) != 1:
            return f"'{name}' needs unit stride in the head dim (strides {tuple(t.stride())})"
        if t.numel() == 0:
            continue
        strides = _q_strides(t) if name == "q" else _kv_strides(t, paged)
        if any(s % 8 for s in strides):
            return (f"'{name}' strides {tuple(t.stride())} are not multiples of 8 elements "
                    f"(16-byte vector loads along D)")
        if t.device.type != "meta" and misaligned16(t):
            return f"'{name}' data pointer is not 16-byte aligned (16-byte vector loads along D)"
    for name, t in (("cache_seqlens", cache_seqlens), ("block_table", block_table)):
        if t is not None and t.numel() > 1 and t.stride(-1) != 1:
            return f"'{name}' needs unit stride in its last dim"
    if mask is not None and mask.dtype != torch.bool:
        return f"mask dtype {_dt(mask.dtype)} (the CUDA kernel reads bool masks)"
    return sinks_reason(sinks, q, Hq)


def decode_attention_cuda(q, k_cache, v_cache, cache_seqlens, block_table, mask, scale, window, softcap,
                          num_splits, sinks=None):
    """(out (B, Sq, Hq, D) contiguous q.dtype, lse (B, Hq, Sq) float32) from the CUDA kernel."""
    reason = cuda_supports(q, k_cache, v_cache, cache_seqlens, block_table, mask, scale, window, softcap,
                           num_splits, sinks)
    if reason is not None:
        raise ValueError(f"decode_attention (cuda backend): {reason}")
    B, Hq, Sq, D = q.shape
    paged = block_table is not None
    if paged:
        num_pages, page_size, Hkv, _ = k_cache.shape
        capacity = block_table.shape[1] * page_size
    else:
        num_pages, page_size = 0, 0
        Hkv, capacity = k_cache.shape[1], k_cache.shape[2]
    splits = max(1, int(num_splits))
    out = torch.empty((B, Sq, Hq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if splits > 1:
        o_part = torch.empty((B, Hq, Sq, splits, D), dtype=torch.float32, device=q.device)
        l_part = torch.empty((B, Hq, Sq, splits), dtype=torch.float32, device=q.device)
        part_ptrs = (o_part.data_ptr(), l_part.data_ptr())
    else:
        part_ptrs = (0, 0)
    if mask is not None:
        m = torch.broadcast_to(mask, (B, 1, Sq, capacity))[:, 0]
        m_ptr, m_strides = m.data_ptr(), broadcast_strides(m, range(3))
    else:
        m_ptr, m_strides = 0, (0, 0, 0)
    code = _ext.lib().decode_attention_fwd(
        q.device.index, _ext.DTYPE_CODES[q.dtype], q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
        out.data_ptr(), lse.data_ptr(), *part_ptrs,
        cache_seqlens.data_ptr() if cache_seqlens is not None else 0,
        block_table.data_ptr() if paged else 0, m_ptr,
        B, Hq, Hkv, Sq, D, capacity, page_size, num_pages, block_table.stride(0) if paged else 0,
        *_q_strides(q), *_kv_strides(k_cache, paged), *_kv_strides(v_cache, paged), *m_strides,
        0 if sinks is None else sinks.data_ptr(), float(scale), int(window), float(softcap), splits, _ext.stream_of(q))
    _ext.check(code, "decode_attention")
    return out, lse
