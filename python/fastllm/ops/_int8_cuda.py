"""Glue between fastllm.ops int8 matmuls and the hand-written CUDA kernels (csrc/int8/).

UNVERIFIED: the kernels compile for sm_80 / sm_90a with 0 spills but have not run on a GPU
yet; tests/test_int8_cuda.py holds the GPU tests that will check them.

Imported lazily by python/fastllm/ops/int8.py (the "cuda" backend). Functions:

    gemm_supports(a, b, out_dtype, a_scale=None, w_scale=None, bias=None) -> None or a reason
    int8_gemm_cuda(a, b, a_scale, w_scale, bias, out_dtype) -> (M, N) out_dtype (int32 = raw)
    w8a16_supports(x, w, w_scale, bias, group_size) -> None or a reason
    w8a16_cuda(x, w, w_scale, bias, group_size) -> (M, N) x.dtype
    quantize_static_supports(x, in_mul) -> None or a reason
    quantize_static_cuda(x, in_mul) -> (M, K) int8 (csrc/int8/quantize_static.cu)
    fused_supports(x, b, in_mul, w_scale, bias, dynamic) -> None or a reason
    w8a8_fused_cuda(x, b, in_mul, act_scale, w_scale, bias, dynamic) -> (M, N) x.dtype
        (csrc/int8/w8a8_decode_kernel.cuh: activation quantization fused into the GEMM, M <= 16)

Arguments arrive checked by the op layer (dtypes, shapes, K and N multiples of 16, K bound,
same device); the backend registry has checked that the tensors are on CUDA and that the
extension has code for this GPU. The supports functions look at metadata only (dtypes,
shapes, strides, data-pointer alignment), so they work on CPU and meta tensors.

What the kernels need: int8 operands with unit stride along K, 16-byte aligned rows (row
strides multiples of 16 elements for int8, of 8 for fp16/bf16 activations); the small vectors
(a_scale, w_scale, bias) are made contiguous here (O(M + N) copies, none when already
contiguous). Tile sizes live in C++ only (csrc/int8/int8_traits.h).
"""
import os
from typing import Optional

import torch

from .. import _ext
from ._checks import misaligned16

# Mirrors of the launchers' limits (csrc/int8/int8_launcher.cu, int8_traits.h).
W8A16_MAX_M = 16          # kW8A16MaxM: the W8A16 kernel is for decode; triton serves more tokens
W8A16_GROUP_MULTIPLE = 64  # a 64-k block must lie in one scale group
SPLIT_K_MAX_M = 256        # max(kSplitKMaxM, kWgmmaSplitMaxM) (int8_traits.h): larger M never splits K
FUSED_MAX_M = 16           # kW8A16MaxM: the fused-quantization W8A8 kernel shares W8A16's decode tiling
MAX_DIM = 2 ** 31 - 1 - 1024
GEMM_OUT = (torch.int32, torch.float16, torch.bfloat16, torch.float32)
FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _dt(dtype):
    return str(dtype).replace("torch.", "")


def _operand_reason(name, t, elems_per_16b):
    """Unit stride along K, 16-byte aligned base and rows (metadata only)."""
    rows, cols = t.shape
    if cols > 1 and t.stride(1) != 1:
        return f"'{name}' needs unit stride along K (strides {tuple(t.stride())})"
    if t.numel() == 0:
        return None
    if misaligned16(t):
        return f"'{name}' data pointer is not 16-byte aligned (the kernel loads 16-byte chunks)"
    if rows > 1 and t.stride(0) < cols:
        return f"'{name}' rows overlap (row stride {t.stride(0)} < {cols} columns)"
    if rows > 1 and t.stride(0) % elems_per_16b:
        return (f"'{name}' row stride {t.stride(0)} is not a multiple of {elems_per_16b} elements "
                f"(16-byte aligned rows)")
    return None


def gemm_supports(a, b, out_dtype, a_scale=None, w_scale=None, bias=None) -> Optional[str]:
    """None if the CUDA W8A8 kernel can serve this call, else a short reason."""
    if a.dtype != torch.int8 or b.dtype != torch.int8 or a.dim() != 2 or b.dim() != 2:
        return "a and b must be 2-D int8"
    M, K = a.shape
    N = b.shape[0]
    if b.shape[1] != K or K % 16 or N % 16:
        return f"K ({K}) and N ({N}) must be multiples of 16"
    if M > MAX_DIM or N > MAX_DIM:
        return f"M ({M}) or N ({N}) above the kernel's int32 index range"
    if out_dtype not in GEMM_OUT:
        return f"out dtype {out_dtype} not supported (int32, float16, bfloat16, float32)"
    for name, t in (("a", a), ("b", b)):
        why = _operand_reason(name, t, 16)
        if why:
            return why
    if out_dtype != torch.int32:
        if a_scale is None or w_scale is None:
            return "scaled output needs a_scale and w_scale"
        if a_scale.dtype != torch.float32 or w_scale.dtype != torch.float32:
            return "a_scale and w_scale must be float32"
        if not (a_scale.numel() == 1 or a_scale.numel() == M):
            return f"a_scale must have 1 or M = {M} elements, got {a_scale.numel()}"
        if w_scale.numel() != N:
            return f"w_scale must have N = {N} elements, got {w_scale.numel()}"
        if bias is not None and (bias.dtype not in FLOATS or bias.numel() != N):
            return "bias must be (N,) float16/bfloat16/float32"
    return None


def int8_gemm_cuda(a, b, a_scale, w_scale, bias, out_dtype):
    """(M, N) out_dtype: raw int32 accumulators (out_dtype int32, scales ignored) or the scaled
    epilogue fmaf(fp32(acc) * a_scale[m or 0], w_scale[n], bias[n]) rounded to out_dtype."""
    reason = gemm_supports(a, b, out_dtype, a_scale, w_scale, bias)
    if reason is not None:
        raise ValueError(f"int8_matmul (cuda backend): {reason}")
    M, K = a.shape
    N = b.shape[0]
    out = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return out
    scaled = out_dtype != torch.int32
    if scaled:
        a_scale, w_scale = a_scale.reshape(-1).contiguous(), w_scale.reshape(-1).contiguous()
        bias = bias.contiguous() if bias is not None else None
    lib = _ext.lib()
    # Split-K workspace (small M on a GPU the N tiles alone do not fill): the launcher says how
    # much; PyTorch's caching allocator makes the allocation cheap.
    ws_bytes = lib.int8_gemm_workspace(a.device.index, M, N, K) if M <= SPLIT_K_MAX_M else 0
    ws = torch.empty(ws_bytes, dtype=torch.uint8, device=a.device) if ws_bytes > 0 else None
    code = lib.int8_gemm(
        a.device.index, a.data_ptr(), a.stride(0) if M > 1 else K, b.data_ptr(), b.stride(0) if N > 1 else K,
        out.data_ptr(), _ext.DTYPE_CODES[out_dtype],
        a_scale.data_ptr() if scaled else 0, a_scale.numel() if scaled else 1,
        w_scale.data_ptr() if scaled else 0,
        bias.data_ptr() if scaled and bias is not None else 0,
        _ext.DTYPE_CODES[bias.dtype] if scaled and bias is not None else 0,
        M, N, K, ws.data_ptr() if ws is not None else 0, ws_bytes, _ext.stream_of(a))
    _ext.check(code, "int8_matmul")
    return out


def w8a16_supports(x, w, w_scale, bias, group_size) -> Optional[str]:
    """None if the CUDA W8A16 kernel can serve this call, else a short reason."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"x dtype {_dt(x.dtype)} not supported by the CUDA W8A16 kernel (float16/bfloat16)"
    if w.dtype != torch.int8 or x.dim() != 2 or w.dim() != 2:
        return "x must be 2-D float16/bfloat16 and w_int8 2-D int8"
    M, K = x.shape
    N = w.shape[0]
    if M > W8A16_MAX_M:
        return f"M = {M} > {W8A16_MAX_M}: the CUDA W8A16 kernel is for decode (M <= {W8A16_MAX_M})"
    if w.shape[1] != K or K % 16 or N % 16 or N > MAX_DIM or K > MAX_DIM:
        return f"K ({K}) and N ({N}) must be multiples of 16"
    if group_size and group_size % W8A16_GROUP_MULTIPLE:
        return (f"group_size {group_size} is not a multiple of {W8A16_GROUP_MULTIPLE} (the CUDA kernel "
                f"scales 64-column blocks)")
    for name, t, per16 in (("x", x, 8), ("w_int8", w, 16)):
        why = _operand_reason(name, t, per16)
        if why:
            return why
    if w_scale.dtype != torch.float32 or any(s < 0 for s in w_scale.stride()):
        return "w_scale must be float32 with non-negative strides"
    if bias is not None and (bias.dtype not in FLOATS or bias.numel() != N):
        return "bias must be (N,) float16/bfloat16/float32"
    return None


def w8a16_cuda(x, w, w_scale, bias, group_size):
    """(M, N) in x.dtype = x @ (w * scale).T + bias, fp32 accumulation."""
    group_size = int(group_size or 0)
    reason = w8a16_supports(x, w, w_scale, bias, group_size)
    if reason is not None:
        raise ValueError(f"w8a16_matmul (cuda backend): {reason}")
    M, K = x.shape
    N = w.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    s_n = w_scale.stride(0) if N > 1 else 0
    s_g = w_scale.stride(1) if group_size and w_scale.dim() == 2 and w_scale.shape[1] > 1 else 0
    bias = bias.contiguous() if bias is not None else None
    code = _ext.lib().w8a16_gemm(
        x.device.index, _ext.DTYPE_CODES[x.dtype], x.data_ptr(), x.stride(0) if M > 1 else K,
        w.data_ptr(), w.stride(0) if N > 1 else K, w_scale.data_ptr(), s_n, s_g, group_size,
        bias.data_ptr() if bias is not None else 0, _ext.DTYPE_CODES[bias.dtype] if bias is not None else 0,
        out.data_ptr(), M, N, K, _ext.stream_of(x))
    _ext.check(code, "w8a16_matmul")
    return out


def quantize_static_supports(x, in_mul) -> Optional[str]:
    """None if csrc/int8/quantize_static.cu can quantize x with multiplier in_mul."""
    if x.dtype not in FLOATS or x.dim() != 2:
        return "x must be 2-D float16/bfloat16/float32"
    M, K = x.shape
    if K > 1 and x.stride(1) != 1:
        return f"'x' needs unit stride along K (strides {tuple(x.stride())})"
    if M > 1 and x.stride(0) < 0:
        return f"'x' has a negative row stride ({x.stride(0)})"
    if in_mul.dtype != torch.float32 or not (in_mul.numel() == 1 or in_mul.numel() == K):
        return f"in_mul must be float32 with 1 or K = {K} elements"
    return None


def quantize_static_cuda(x, in_mul):
    """(M, K) int8 = rne(clamp(x * in_mul, -127, 127)), NaN -> 0 (fastllm/ref/int8.py quantize_static)."""
    reason = quantize_static_supports(x, in_mul)
    if reason is not None:
        raise ValueError(f"int8_matmul_static (cuda backend): {reason}")
    M, K = x.shape
    q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    if M == 0 or K == 0:
        return q
    in_mul = in_mul.reshape(-1).contiguous()
    code = _ext.lib().quantize_static(x.device.index, x.data_ptr(), _ext.DTYPE_CODES[x.dtype], M, K,
                                      x.stride(0) if M > 1 else K, in_mul.data_ptr(), in_mul.numel(),
                                      q.data_ptr(), _ext.stream_of(x))
    _ext.check(code, "int8_matmul_static")
    return q


def fused_enabled() -> bool:
    """FASTLLM_INT8_FUSED=0 sends decode-sized W8A8 calls to the two-launch path (quantize, then
    the GEMM): for comparing the two (bench) and as a way around the fused kernel."""
    return os.environ.get("FASTLLM_INT8_FUSED", "1") != "0"


def fused_supports(x, b, in_mul, w_scale, bias, dynamic) -> Optional[str]:
    """None if the fused-quantization W8A8 kernel can serve this call, else a short reason.
    in_mul: None (dynamic without SmoothQuant), (K,) or, static only, (1,) fp32."""
    if x.dtype not in FLOATS or x.dim() != 2 or b.dtype != torch.int8 or b.dim() != 2:
        return "x must be 2-D float16/bfloat16/float32 and b 2-D int8"
    M, K = x.shape
    N = b.shape[0]
    if M > FUSED_MAX_M:
        return f"M = {M} > {FUSED_MAX_M}: the fused kernel is for decode"
    if b.shape[1] != K or K % 16 or N % 16 or N > MAX_DIM:
        return f"K ({K}) and N ({N}) must be multiples of 16"
    for name, t, per16 in (("x", x, 16 // x.element_size()), ("b", b, 16)):
        why = _operand_reason(name, t, per16)
        if why:
            return why
    if in_mul is not None:
        if in_mul.dtype != torch.float32 or not (in_mul.numel() == K or (not dynamic and in_mul.numel() == 1)):
            return "in_mul must be float32 with K elements (or one, static)"
        if in_mul.numel() > 1 and (not in_mul.is_contiguous() or misaligned16(in_mul)):
            return "per-channel in_mul must be contiguous and 16-byte aligned (float4 loads)"
    elif not dynamic:
        return "static quantization needs in_mul"
    if w_scale.dtype != torch.float32 or w_scale.numel() != N:
        return f"w_scale must be float32 with N = {N} elements"
    if bias is not None and (bias.dtype not in FLOATS or bias.numel() != N):
        return "bias must be (N,) float16/bfloat16/float32"
    return None


def w8a8_fused_cuda(x, b, in_mul, act_scale, w_scale, bias, dynamic):
    """(M, N) in x.dtype: quantize x (dynamic per token, or static with in_mul) and the W8A8 GEMM
    in one kernel; bit-identical to quantize_*_cuda followed by int8_gemm_cuda."""
    reason = fused_supports(x, b, in_mul, w_scale, bias, dynamic)
    if reason is not None:
        raise ValueError(f"int8_matmul_{'dynamic' if dynamic else 'static'} (cuda backend, fused): {reason}")
    M, K = x.shape
    N = b.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    w_scale = w_scale.reshape(-1).contiguous()
    bias = bias.contiguous() if bias is not None else None
    act_scale = act_scale.reshape(-1).contiguous() if act_scale is not None else None
    code = _ext.lib().w8a8_decode_gemm(
        x.device.index, _ext.DTYPE_CODES[x.dtype], x.data_ptr(), x.stride(0) if M > 1 else K,
        b.data_ptr(), b.stride(0) if N > 1 else K, w_scale.data_ptr(),
        bias.data_ptr() if bias is not None else 0, _ext.DTYPE_CODES[bias.dtype] if bias is not None else 0,
        in_mul.data_ptr() if in_mul is not None else 0, in_mul.numel() if in_mul is not None else 0,
        act_scale.data_ptr() if act_scale is not None else 0, int(dynamic), out.data_ptr(), M, N, K,
        _ext.stream_of(x))
    _ext.check(code, "int8_matmul_dynamic" if dynamic else "int8_matmul_static")
    return out
