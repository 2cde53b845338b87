"""Glue between fastllm.ops.flash_attention and the hand-written CUDA kernel (csrc/attention/).

Imported lazily by python/fastllm/ops/attention.py (the "cuda" backend). Functions:

    cuda_supports(q, k, v, mask, causal, scale, window, softcap, sinks, bias) -> None or a reason
    flash_attention_cuda(q, k, v, mask, causal, scale, window, softcap, sinks, bias) -> (out, lse)

Arguments arrive normalized by the op layer (scale a float, window an int <= 0 for none,
softcap a float 0.0 for none, mask None or a bool tensor broadcastable to (B, 1, Sq, Skv), sinks
None or (Hq,) float32, bias None or a float tensor broadcastable to (B, Hq, Sq, Skv));
the backend registry has already checked that the tensors are on CUDA and that the extension
has code for this GPU. q (B, Hq, Sq, D) and k, v (B, Hkv, Skv, D) are read in place through
their strides (typically transposed views of (B, S, H, D) buffers), never copied; the mask and
the bias are read through their (possibly zero, i.e. broadcast) strides. out is (B, Sq, Hq, D) contiguous,
lse (B, Hq, Sq) float32. The kernel's tile sizes live in C++ only (csrc/attention/flash_traits.h).
"""
import math
from typing import Optional

import torch

from .. import _ext
from ._checks import FLOAT_DTYPES, GRID_YZ_MAX, broadcast_strides, exp2_scalars_reason, misaligned16
from ._sinks import sinks_reason

# Head dims with a compiled instantiation (csrc/attention/generate_instantiations.py
# HEAD_DIMS; the launcher rejects any other with a status code).
HEAD_DIMS = (64, 80, 96, 128, 256)
DTYPES = (torch.float16, torch.bfloat16)
# Head dims with a bias kernel (csrc/attention/flash_traits.h FlashFwdBiasTraits: none at 256,
# where the plain kernel is already at the register cap).
BIAS_HEAD_DIMS = (64, 80, 96, 128)
_SEQ_MAX = (2 ** 31 - 1) // 2  # positions are int32 in the kernel


def _dt(dtype):
    return str(dtype).replace("torch.", "")


def _strides(t, n=3):
    return broadcast_strides(t, range(n))


def _mask_view(mask, B, Sq, Skv):
    """The mask as a (B, Sq, Skv) view (zero strides where broadcast), no copy."""
    m = torch.broadcast_to(mask, (B, 1, Sq, Skv))[:, 0]
    return m


def _bias_reason(bias, q, B, Hq, Sq, Skv) -> Optional[str]:
    D = q.shape[-1]
    if D not in BIAS_HEAD_DIMS:
        return (f"an additive score bias at head dim {D} (the CUDA bias kernels have "
                f"{', '.join(str(d) for d in BIAS_HEAD_DIMS)}; the Triton kernel adds it)")
    if bias.dtype not in FLOAT_DTYPES:
        return f"bias dtype {_dt(bias.dtype)} (the CUDA kernel reads fp16 / bf16 / fp32 biases)"
    if bias.device != q.device:
        return f"bias on {bias.device}, q on {q.device}"
    try:
        torch.broadcast_to(bias, (B, Hq, Sq, Skv))
    except RuntimeError:
        return f"bias shape {tuple(bias.shape)} not broadcastable to ({B}, {Hq}, {Sq}, {Skv})"
    return None


def cuda_supports(q, k, v, mask, causal, scale, window, softcap, sinks=None, bias=None) -> Optional[str]:
    """None if the CUDA kernel can serve this call, else a short reason (metadata only: works
    on meta and CPU tensors)."""
    if q.dtype not in DTYPES:
        return f"dtype {_dt(q.dtype)} not supported by the CUDA kernel (fp16/bf16)"
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            return f"'{name}' dtype {_dt(t.dtype)} differs from q's {_dt(q.dtype)}"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q, k, v must be 4-D (B, H, S, D)"
    B, Hq, Sq, D = q.shape
    if D not in HEAD_DIMS:
        return (f"head dim {D} not compiled (CUDA kernel has "
                f"{', '.join(str(d) for d in HEAD_DIMS)})")
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        return f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}"
    Hkv, Skv = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        return f"query heads ({Hq}) not a multiple of kv heads ({Hkv})"
    if B > GRID_YZ_MAX or Hq > GRID_YZ_MAX:
        return f"batch {B} or heads {Hq} above the kernel's grid limit {GRID_YZ_MAX}"
    if Sq > _SEQ_MAX or Skv > _SEQ_MAX:
        return f"sequence length above {_SEQ_MAX}"
    why = exp2_scalars_reason(scale, softcap)
    if why:
        return why
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(3) != 1:
            return f"'{name}' needs unit stride in the head dim (strides {tuple(t.stride())})"
        if t.numel() == 0:
            continue
        if misaligned16(t):
            return f"'{name}' data pointer is not 16-byte aligned (16-byte vector loads along D)"
        if any(s % 8 != 0 for s in _strides(t)):
            return (f"'{name}' strides {tuple(t.stride())} are not multiples of 8 elements "
                    f"(16-byte vector loads along D)")
    if mask is not None:
        if mask.dtype != torch.bool:
            return f"mask dtype {_dt(mask.dtype)} (the CUDA kernel reads bool masks)"
        if mask.device != q.device:
            return f"mask on {mask.device}, q on {q.device}"
        try:
            _mask_view(mask, B, Sq, Skv)
        except RuntimeError:
            return f"mask shape {tuple(mask.shape)} not broadcastable to ({B}, 1, {Sq}, {Skv})"
    return (_bias_reason(bias, q, B, Hq, Sq, Skv) if bias is not None else None) or sinks_reason(sinks, q, Hq)


def flash_attention_cuda(q, k, v, mask, causal, scale, window, softcap, sinks=None, bias=None):
    """(out (B, Sq, Hq, D) contiguous q.dtype, lse (B, Hq, Sq) float32) from the CUDA kernel."""
    B, Hq, Sq, D = q.shape
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    window = int(window) if window is not None and window > 0 else 0
    softcap = float(softcap) if softcap is not None and softcap > 0 else 0.0
    reason = cuda_supports(q, k, v, mask, causal, scale, window, softcap, sinks, bias)
    if reason is not None:
        raise ValueError(f"flash_attention (cuda backend): {reason}")
    Hkv, Skv = k.shape[1], k.shape[2]
    out = torch.empty((B, Sq, Hq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    m_ptr, m_strides = 0, (0, 0, 0)
    if mask is not None:
        m = _mask_view(mask, B, Sq, Skv)
        m_ptr, m_strides = m.data_ptr(), _strides(m)
    b_ptr, b_dtype, b_strides = 0, 0, (0, 0, 0, 0)
    if bias is not None:
        b = torch.broadcast_to(bias, (B, Hq, Sq, Skv))
        b_ptr, b_dtype, b_strides = b.data_ptr(), _ext.DTYPE_CODES[b.dtype], _strides(b, 4)
    qs, ks, vs = _strides(q), _strides(k), _strides(v)
    z_ptr = 0 if sinks is None else sinks.data_ptr()
    code = _ext.lib().flash_attention_fwd(
        q.device.index, _ext.DTYPE_CODES[q.dtype], q.data_ptr(), k.data_ptr(), v.data_ptr(),
        out.data_ptr(), lse.data_ptr(), m_ptr, B, Hq, Hkv, Sq, Skv, D, *qs, *ks, *vs, *m_strides,
        z_ptr, b_ptr, b_dtype, *b_strides, float(scale), window, softcap, bool(causal), _ext.stream_of(q))
    _ext.check(code, "flash_attention")
    return out, lse


def cuda_varlen_supports(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window, softcap,
                         sinks=None) -> Optional[str]:
    """None if the CUDA kernel can serve this packed (varlen) call, else a short reason."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        return "q, k, v must be 3-D (total, H, D) for varlen"
    # The (total, H, D) tensors seen as (1, H, total, D) views: the dense checks apply.
    as4 = [t.transpose(0, 1)[None] for t in (q, k, v)]
    reason = cuda_supports(*as4, None, causal, scale, window, softcap, sinks)
    if reason is not None:
        return reason
    B = cu_q.shape[0] - 1
    if B > GRID_YZ_MAX:
        return f"{B} sequences above the kernel's grid limit {GRID_YZ_MAX}"
    if max(max_q, max_k, q.shape[0], k.shape[0]) > _SEQ_MAX:
        return f"sequence length above {_SEQ_MAX}"
    for name, t in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if t.device != q.device or t.dtype != torch.int32 or (t.numel() > 1 and t.stride(0) != 1):
            return f"'{name}' must be a contiguous int32 tensor on q's device"
    return None


def flash_attention_varlen_cuda(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window, softcap, sinks=None):
    """(out (total_q, Hq, D) contiguous, lse (Hq, total_q) float32) from the CUDA kernel."""
    total_q, Hq, D = q.shape
    window = int(window) if window is not None and window > 0 else 0
    softcap = float(softcap) if softcap is not None and softcap > 0 else 0.0
    reason = cuda_varlen_supports(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window, softcap, sinks)
    if reason is not None:
        raise ValueError(f"flash_attention_varlen (cuda backend): {reason}")
    # Rows no sequence covers (past cu_q[-1]) stay out 0 / lse -inf, as in the reference (sinks
    # or not: the sink joins the rows of a sequence).
    out = torch.zeros((total_q, Hq, D), dtype=q.dtype, device=q.device)
    lse = torch.full((Hq, total_q), float("-inf"), dtype=torch.float32, device=q.device)
    B = cu_q.shape[0] - 1
    if out.numel() == 0 or B == 0 or max_q == 0:
        return out, lse
    # (head, row) strides as cuda_varlen_supports checked them: 0 for a dim of size 1.
    hs = [_strides(t.transpose(0, 1)[None])[1:] for t in (q, k, v)]
    code = _ext.lib().flash_attention_varlen_fwd(
        q.device.index, _ext.DTYPE_CODES[q.dtype], q.data_ptr(), k.data_ptr(), v.data_ptr(),
        out.data_ptr(), lse.data_ptr(), cu_q.data_ptr(), cu_k.data_ptr(), 0 if sinks is None else sinks.data_ptr(),
        B, total_q, k.shape[0], Hq, k.shape[1], int(max_q), int(max_k), D, *hs[0], *hs[1], *hs[2],
        float(scale), window, softcap, bool(causal), _ext.stream_of(q))
    _ext.check(code, "flash_attention_varlen")
    return out, lse
