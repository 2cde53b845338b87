"""2:4 sparse GEMM in Triton: out = x @ W.T with W stored compressed (fastllm.sparse.compress).
Semantics: fastllm/ref/sparse24.py. Tests: `pytest tests/test_sparse24.py` (the Triton
interpreter runs these kernels on CPU tensors when there is no GPU).

    C[m, n] = sum_k X[m, k] * W[n, k] (+ bias[n])            fp16 / bf16 / fp32, fp32 accumulate
    C[m, n] = (fp32(sum_k A[m, k] * W[n, k]) * a_scale[m]) * w_scale[n] + bias[n]   int8 (or raw int32)

W (N, K) arrives as values (N, K/2) (the 2 kept elements of every 4 along K) and meta
(N/16, K/2) int32: 2-bit positions packed in the register layout of `mma.sp` (format.py).
Each program owns a BLOCK_M x BLOCK_N tile of C and walks K in BLOCK_K steps (a multiple of
64, the metadata block). Per step it reads the values tile (BLOCK_N, BLOCK_K/2) as one
contiguous block, and per 4-wide chunk the metadata word that holds its nibble (a gather that
stays in L1: 8 chunks share a word), splits the values into the chunk's first and second kept
element, and expands them in registers into the dense (BLOCK_N, BLOCK_K) tile:
    dense[n, 4j + p] = v0[n, j] if p == i0 else v1[n, j] if p == i1 else 0
which tl.dot then multiplies densely. No sparse tensor cores (Triton has no mma.sp), but only
~56% of the weight bytes cross DRAM (K/2 values + K/8 bytes of metadata per row vs K): the
win for bandwidth-bound decode (M <= 16), where the kernel uses BLOCK_M = 16 and split-K so
every SM streams weights. Bytes (16-bit): 2MK + N*K*(1 + 1/8) + out; FLOPs (dense-equivalent)
2MNK.

Interpreter: a bf16 tl.dot multiplies raw bits there, so under INTERPRET bf16 operands are
upcast to fp32 (exact products); fp16 and int8 dots are exact there. Out-of-range rows and
columns wrap (offs % M) so loads stay in bounds and are never stored; K tails are masked
only when BLOCK_K does not divide K (EVEN_K).

Tile configs live in one place, pick_config().
"""
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from . import interpreting, k_offsets_fit, sm_count
from .int8_matmul import _store_out, _tile_ids, split_k


class Config(NamedTuple):
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int          # multiple of 64: whole metadata blocks
    SPLIT_K: int = 1
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 3


def pick_config(M: int, N: int, K: int, *, s8: bool, sms: int = 132, interpret: bool = False) -> Config:
    """Tile config for this (M bucket, N, K). Decode sizes (M <= 16): BLOCK_M = 16 (tl.dot's
    minimum), wide K steps and split-K until the grid covers the SMs (weights are the cost);
    larger M: the usual 16-bit / int8 GEMM tiles. The interpreter gets fixed small tiles
    (below the test shapes, so partial M / N tiles run; K tails and split-K need a config
    passed in: tests/test_sparse24.py::test_triton_k_tail_and_split_k)."""
    if interpret:
        cfg = Config(16 if M <= 16 else 32, 32, 64, GROUP_M=2, num_stages=1)
    elif M <= 16:   # 3 stages: fits the ~99 KB of shared memory of sm_86 / sm_89
        cfg = Config(16, 64, 256 if s8 else 128, num_warps=4, num_stages=3)
    elif M <= 64:
        cfg = Config(triton.next_power_of_2(max(M, 32)), 64, 128, num_warps=4, num_stages=3)
    elif M <= 128:
        cfg = Config(128, 128, 128 if s8 else 64, num_warps=8, num_stages=3)
    else:   # (128, 256) int8 tiles spill: the in-register expansion needs the room
        cfg = Config(128, 128, 128 if s8 else 64, num_warps=8, num_stages=3)
    cfg = cfg._replace(BLOCK_K=max(64, min(cfg.BLOCK_K, triton.next_power_of_2(K))))
    if M <= 16:
        cfg = cfg._replace(SPLIT_K=split_k(M, N, K, cfg, sms, interpret))
    return cfg


@triton.jit
def _dense_tile(v_ptr, m_ptr, rn, k0, K, stride_vn, stride_vk, stride_mr, stride_mk,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, S8: tl.constexpr):
    """The dense (BLOCK_N, BLOCK_K) tile W[rn, k0:k0 + BLOCK_K], expanded from values + meta."""
    cj = tl.arange(0, BLOCK_K // 4)
    gc = k0 // 4 + cj                                      # global chunk index
    kb = gc // 16                                          # 64-column metadata block
    c16 = gc % 16                                          # chunk in the block
    r = rn % 16
    g = r % 8
    h = r // 8
    # Which lane's word and which nibble hold (row-in-tile r, chunk c16): format.py's layout.
    if S8:
        t = 2 * (c16 // 8)[None, :] + h[:, None]
        q = (c16 % 8)[None, :] + 0 * h[:, None]
    else:
        t = (c16 // 4)[None, :] + 0 * h[:, None]
        q = 4 * h[:, None] + (c16 % 4)[None, :]
    m_ptrs = m_ptr + (rn // 16)[:, None] * stride_mr + (kb * 32)[None, :] * stride_mk \
        + (4 * g[:, None] + t) * stride_mk
    vk = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    v_ptrs = v_ptr + rn[:, None] * stride_vn + vk[None, :] * stride_vk
    if EVEN_K:
        word = tl.load(m_ptrs)
        vals = tl.load(v_ptrs)
    else:
        word = tl.load(m_ptrs, mask=(gc < K // 4)[None, :], other=0)
        vals = tl.load(v_ptrs, mask=(vk < K // 2)[None, :], other=0)
    nib = (word >> (4 * q)) & 0xF
    i0 = nib & 3
    i1 = nib >> 2
    v0, v1 = tl.split(tl.reshape(vals, (BLOCK_N, BLOCK_K // 4, 2)))
    zero = tl.zeros_like(v0)
    d0 = tl.where(i0 == 0, v0, zero)                       # i0 < i1: position 0 can only be i0
    d1 = tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, zero))
    d2 = tl.where(i0 == 2, v0, tl.where(i1 == 2, v1, zero))
    d3 = tl.where(i1 == 3, v1, zero)                       # ... and position 3 only i1
    # tl.join appends the new axis last, so join(join(d0, d2), join(d1, d3))[n, j, a, b] = d_{2a + b}:
    # flattening (j, a, b) row-major puts d_p at column 4j + p.
    return tl.reshape(tl.join(tl.join(d0, d2), tl.join(d1, d3)), (BLOCK_N, BLOCK_K))


@triton.jit
def sparse24_kernel(x_ptr, v_ptr, m_ptr, c_ptr, a_scale_ptr, w_scale_ptr, bias_ptr,
                    M, N, K,
                    stride_xm, stride_xk, stride_vn, stride_vk, stride_mr, stride_mk,
                    stride_cs, stride_cm, stride_cn, stride_as, stride_ws, stride_bias,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
                    S8: tl.constexpr, SCALED: tl.constexpr, A_SCALE_PER_ROW: tl.constexpr,
                    HAS_BIAS: tl.constexpr, DOT_IEEE: tl.constexpr, INTERPRET: tl.constexpr):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % N).to(tl.int64)
    x_offs = rm[:, None] * stride_xm + offs_k[None, :] * stride_xk

    if S8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # A scalar base pointer advanced per tile: k0 * stride_xk in int32 passes 2^31 for a
    # column-major x (stride_xk = M) at large M.
    x_k = x_ptr + (pid_k * BLOCK_K) * stride_xk
    for kt in range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K):
        k0 = kt * BLOCK_K
        if EVEN_K:
            x = tl.load(x_k + x_offs)
        else:
            x = tl.load(x_k + x_offs, mask=(offs_k < K - k0)[None, :], other=0)
        x_k += SPLIT_K * BLOCK_K * stride_xk
        w = tl.trans(_dense_tile(v_ptr, m_ptr, rn, k0, K, stride_vn, stride_vk, stride_mr, stride_mk,
                                 BLOCK_N, BLOCK_K, EVEN_K, S8))
        if S8:
            acc = tl.dot(x, w, acc, out_dtype=tl.int32)
        elif INTERPRET and x.dtype == tl.bfloat16:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc)
        elif DOT_IEEE:
            acc = tl.dot(x, w, acc, input_precision="ieee")   # fp32: no TF32 rounding
        else:
            acc = tl.dot(x, w, acc)

    c_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    c_ptrs = c_ptr + pid_k * stride_cs + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    if SPLIT_K > 1:
        tl.store(c_ptrs, acc, mask=c_mask)                 # fp32 / int32 partials; the wrapper sums
    elif S8 and not SCALED:
        tl.store(c_ptrs, acc, mask=c_mask)
    else:
        out = acc.to(tl.float32)
        if SCALED:
            if A_SCALE_PER_ROW:
                out = out * tl.load(a_scale_ptr + rm * stride_as)[:, None]
            else:
                out = out * tl.load(a_scale_ptr)
            out = out * tl.load(w_scale_ptr + rn * stride_ws)[None, :]
        if HAS_BIAS:
            out = out + tl.load(bias_ptr + rn * stride_bias).to(tl.float32)[None, :]
        _store_out(c_ptrs, out, c_mask, INTERPRET)


def sparse24_matmul(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: Optional[torch.Tensor] = None,
                    a_scale: Optional[torch.Tensor] = None, w_scale: Optional[torch.Tensor] = None,
                    out_dtype: Optional[torch.dtype] = None, config: Optional[Config] = None,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (M, K) fp16/bf16/fp32 (values the same dtype) or int8 (int8 values), any strides; values
    (N, K/2), meta (N/16, K/2) int32 (fastllm.sparse.compress). Float x: -> x.dtype (+ bias).
    int8 x: a_scale None -> raw int32; else a_scale (M,) or 1 element fp32, w_scale (N,) fp32,
    bias -> out_dtype. config overrides pick_config; out (M, N) is written in place."""
    x, values, meta = k_offsets_fit(x), k_offsets_fit(values), k_offsets_fit(meta)
    M, K = x.shape
    N = values.shape[0]
    s8 = x.dtype == torch.int8
    scaled = s8 and a_scale is not None
    dtype = (out_dtype if scaled else torch.int32) if s8 else x.dtype
    if out is None:
        out = torch.empty((M, N), dtype=dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    interp = interpreting()
    cfg = config or pick_config(M, N, K, s8=s8, sms=sm_count(x.device), interpret=interp)
    split = cfg.SPLIT_K
    c = out if split == 1 else torch.empty((split, M, N), dtype=torch.int32 if s8 else torch.float32,
                                           device=x.device)
    per_row = scaled and a_scale.numel() > 1
    grid = (triton.cdiv(M, cfg.BLOCK_M) * triton.cdiv(N, cfg.BLOCK_N), split)
    dummy = c
    sparse24_kernel[grid](
        x, values, meta, c, a_scale if scaled else dummy, w_scale if scaled else dummy,
        bias if bias is not None else dummy,
        M, N, K, x.stride(0), x.stride(1), values.stride(0), values.stride(1), meta.stride(0), meta.stride(1),
        c.stride(0) if split > 1 else 0, c.stride(-2), c.stride(-1),
        a_scale.stride(0) if per_row else 0, w_scale.stride(0) if scaled else 0,
        bias.stride(0) if bias is not None else 0,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, SPLIT_K=split, GROUP_M=cfg.GROUP_M,
        EVEN_K=K % cfg.BLOCK_K == 0, S8=s8, SCALED=scaled, A_SCALE_PER_ROW=per_row, HAS_BIAS=bias is not None,
        DOT_IEEE=x.dtype == torch.float32, INTERPRET=interp, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split > 1:
        acc = c.sum(0)                                     # int32 partials: exact
        if s8:
            if scaled:
                from ..ref.int8 import scale_epilogue
                acc = scale_epilogue(acc.to(torch.int32), a_scale, w_scale, bias, out_dtype)
            out.copy_(acc)
        else:
            if bias is not None:
                acc += bias.to(torch.float32)
            out.copy_(acc)
    return out
