"""Glue between fastllm.ops.sparse24_* and the hand-written mma.sp kernel (csrc/sparse24/).
UNVERIFIED: the kernel has been compiled (sm_80, sm_90a, 0 spills) but never run on a GPU.

    cuda_supports(x, values, meta, bias, a_scale, w_scale) -> None or a reason (metadata only:
        works on CPU and meta tensors)
    sparse24_cuda(x, values, meta, bias=None, a_scale=None, w_scale=None, out_dtype=None) -> out

x (M, K) fp16/bf16 (values the same dtype) -> x.dtype; or int8 -> int32 when a_scale is None,
else the int8 epilogue in out_dtype. Arguments arrive checked by the op layer (shapes, dtypes,
devices); this adds what the kernel needs: 16-byte aligned rows (cp.async moves 16 bytes),
contiguous values / meta (their row strides are implied by K), unit-stride vectors. The tile
sizes live in C++ only (csrc/sparse24/sparse24_traits.h).
"""
from typing import Optional

import torch

from .. import _ext
from ._checks import GRID_YZ_MAX, misaligned16

DTYPES = (torch.float16, torch.bfloat16, torch.int8)
_INT_MAX = 2 ** 31 - 1


def _dt(dtype):
    return str(dtype).replace("torch.", "")


def _contiguous(t):
    return t.numel() == 0 or t.is_contiguous()


def cuda_supports(x, values, meta, bias, a_scale, w_scale) -> Optional[str]:
    """None if the CUDA kernel can serve this call, else a short reason."""
    if x.dtype not in DTYPES:
        return f"dtype {_dt(x.dtype)} not supported by the CUDA kernel (float16, bfloat16, int8)"
    M, K = x.shape
    N = values.shape[0]
    if K == 0:
        return "K = 0 (nothing to multiply: the other backends serve it)"
    if M > _INT_MAX or N > _INT_MAX or K > _INT_MAX:
        return "a dimension above 2**31 - 1"
    if -(-N // 64) > GRID_YZ_MAX:   # grid y walks N in tiles of 64 (or 128) weight rows
        return f"N = {N}: more than {GRID_YZ_MAX} tiles of 64 output channels (the CUDA grid's y limit)"
    if x.stride(1) != 1 and K > 1:
        return f"'x' needs unit stride along K (strides {tuple(x.stride())})"
    if (x.stride(0) * x.element_size()) % 16 and M > 1:
        return f"'x' row stride {x.stride(0)} is not a multiple of 16 bytes (cp.async 16-byte copies)"
    if M > 1 and x.stride(0) < K:
        return f"'x' row stride {x.stride(0)} < K = {K} (overlapping or broadcast rows)"
    for name, t in (("x", x), ("values", values), ("meta", meta)):
        if t.numel() and misaligned16(t):
            return f"'{name}' data pointer is not 16-byte aligned"
    for name, t in (("values", values), ("meta", meta)):
        if not _contiguous(t):
            return f"'{name}' must be contiguous for the CUDA kernel (strides {tuple(t.stride())})"
    for name, t in (("bias", bias), ("a_scale", a_scale), ("w_scale", w_scale)):
        if t is not None and t.numel() > 1 and t.stride(-1) != 1:
            return f"'{name}' needs unit stride (strides {tuple(t.stride())})"
    return None


def sparse24_cuda(x, values, meta, bias=None, a_scale=None, w_scale=None, out_dtype=None):
    reason = cuda_supports(x, values, meta, bias, a_scale, w_scale)
    if reason is not None:
        raise ValueError(f"sparse24_matmul (cuda backend): {reason}")
    M, K = x.shape
    N = values.shape[0]
    s8 = x.dtype == torch.int8
    scaled = s8 and a_scale is not None
    dtype = (out_dtype if scaled else torch.int32) if s8 else x.dtype
    out = torch.empty((M, N), dtype=dtype, device=x.device)
    if out.numel() == 0:
        return out
    lib = _ext.lib()
    # Split-K workspace (decode-sized M on a layer whose output tiles leave SMs idle): the
    # launcher says how much; PyTorch's caching allocator makes the allocation cheap.
    ws_bytes = lib.sparse24_gemm_workspace(x.device.index, _ext.DTYPE_CODES[x.dtype], M, N, K)
    ws = torch.empty(ws_bytes, dtype=torch.uint8, device=x.device) if ws_bytes > 0 else None
    code = lib.sparse24_gemm(
        x.device.index, _ext.DTYPE_CODES[x.dtype], x.data_ptr(), values.data_ptr(), meta.data_ptr(),
        out.data_ptr(), _ext.DTYPE_CODES[out.dtype], M, N, K, x.stride(0) if M > 1 else K,
        bias.data_ptr() if bias is not None else 0, _ext.DTYPE_CODES[bias.dtype] if bias is not None else -1,
        a_scale.data_ptr() if scaled else 0, bool(scaled and a_scale.numel() > 1),
        w_scale.data_ptr() if scaled else 0, ws.data_ptr() if ws is not None else 0, ws_bytes,
        _ext.stream_of(x))
    _ext.check(code, "sparse24_matmul")
    return out

