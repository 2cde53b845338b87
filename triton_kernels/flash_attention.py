"""Exact prefill attention in Triton: FlashAttention-2 forward (semantics: fastllm/ref/attention.py).

What it computes, per batch b, query head h (kv head h // (Hq // Hkv)) and query row i:

    s_ij  = scale * <q_i, k_j>                      (then c * tanh(s / c) with softcap c)
    s_ij  = max(s_ij + bias[b, h, i, j], -2^126)    with an additive bias (-inf stays -inf)
    allowed_ij = j < Skv & mask[b, 0, i, j] & (j <= p_i if causal) & (j > p_i - W if window)
    lse_i = log sum_{allowed j} exp(s_ij)           out_i = sum_j exp(s_ij - lse_i) v_j
    p_i   = i + Skv - Sq   (bottom-right aligned queries: a continuation against a KV cache)

The naive version writes and reads the (Sq, Skv) score matrix per head: O(Sq * Skv) bytes
per head on top of the O((Sq + Skv) * D) of q, k, v, o. This kernel never materializes it:

    one program per (block of BLOCK_M query rows, batch * query head):
      load the Q tile once (BLOCK_M x BLOCK_D, D padded to a power of 2 and masked)
      for each K/V block of BLOCK_N keys inside [lo, hi)  (causal / window bounds, and with a
      mask the first / last key any row of the block attends, found by one pass over its mask
      rows: blocks entirely outside are skipped by the loop bounds, not by masking):
          s   = scale * Q K^T (fp32 accumulate), softcapped
          s   = -inf where not allowed (padding mask loaded per tile through its strides)
          online softmax: m_new = max(m, rowmax s); p = 2^(s log2e - m_new log2e);
                          l = l * 2^((m - m_new) log2e) + rowsum p;  acc = acc * (same) + p V
      out = acc / l, lse = m + ln l; a row with l == 0 (nothing allowed) gets
      out = 0 and lse = -inf, never NaN. With attention sinks (gpt-oss: a logit z_h per head,
      no value) the epilogue first folds e^(z_h - m) into l (softmax_finish_sinks).

GQA / MQA map the query head to its kv head in the address computation: K/V are never
repeated. Varlen (flash-attn's packed layout) is the same kernel with VARLEN: each program
reads its sequence's start and length from cu_seqlens; batch strides are then 0.

Precision: on a GPU the dots take fp16/bf16 operands natively (P is rounded to V's dtype
before P V, as FlashAttention does) and accumulate in fp32; fp32 inputs use IEEE fp32 dots (no
TF32). In Triton's CPU interpreter a bf16 tl.dot multiplies raw bits (triton#11584), so under
INTERPRET both operands are upcast to fp32 after the same rounding (P to V's dtype): the
interpreter reproduces the GPU's numerics up to summation order.

Run: the tests run it on CPU through the interpreter:
    python -m pytest -q tests/test_attention.py
On a GPU the same tests (plus the `gpu` marked grid) run it natively. The GPU tile configs
in _CONFIGS are educated starting points that have NOT been tuned or run on a GPU yet.
"""

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import capability


# Tile configs: (BLOCK_M, BLOCK_N, num_warps, num_stages) per padded head dim, per GPU
# family. The one place these live. Shared memory per stage is (BLOCK_M + ...) tiles:
# Q (BLOCK_M x D) stays resident, each pipeline stage holds one K and one V tile
# (BLOCK_N x D); sm80/sm90 have ~164/228 KB, sm86/sm89 only ~100 KB, hence smaller tiles.
# Compiled for sm_80 / sm_86 / sm_90 by bench/triton_compile_check.py (registers, spills, shared
# memory checked in the tests); never run on a GPU: timings UNVERIFIED, to be tuned.
_CONFIGS = {
    "sm80": {64: (128, 64, 8, 3), 128: (128, 32, 8, 3), 256: (64, 32, 8, 2)},
    "sm86": {64: (128, 64, 8, 3), 128: (128, 32, 8, 3), 256: (64, 32, 8, 2)},
    "sm90": {64: (128, 64, 8, 3), 128: (128, 32, 8, 3), 256: (128, 32, 8, 3)},
}
# float32 inputs (IEEE fp32 dots, no tensor cores: a correctness path, not a fast one). ptxas
# register use of these FMA dots is erratic; these are the smallest-spill configs found by
# bench/triton_compile_check.py (sm_90: none; sm_80 / sm_86 D >= 128: a few hundred bytes).
_CONFIGS_FP32 = {
    "sm80": {64: (16, 64, 4, 2), 128: (16, 32, 2, 2), 256: (16, 32, 2, 2)},
    "sm86": {64: (16, 64, 4, 2), 128: (16, 32, 2, 2), 256: (16, 32, 2, 2)},
    "sm90": {64: (16, 64, 4, 2), 128: (16, 64, 4, 2), 256: (16, 64, 4, 2)},
}
#: Floor of finite biased scores: fastllm.ref.attention.SCORE_FLOOR (-2^126; times log2(e) it is
#: still a normal fp32 number, where the dtype minimum a bias may hold overflows to -inf).
SCORE_FLOOR = tl.constexpr(-2.0 ** 126)

# The interpreter runs each tl op as a numpy call per program: bigger tiles mean fewer
# programs and less Python overhead; 64 keeps causal block skipping meaningful.
_INTERPRET_CONFIG = (64, 64, 4, 1)


def tile_config(head_dim: int, dtype: torch.dtype, max_seqlen_q: int, device: torch.device,
                interpret: bool, bias: bool = False):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) for this call."""
    block_d = max(16, triton.next_power_of_2(head_dim))   # tl.dot needs >= 16
    if interpret:
        bm, bn, warps, stages = _INTERPRET_CONFIG
    else:
        cc = capability(device)
        family = "sm90" if cc >= 90 else ("sm86" if cc in (86, 87, 89) else "sm80")
        table = (_CONFIGS_FP32 if dtype == torch.float32 else _CONFIGS)[family]
        bm, bn, warps, stages = table[min(d for d in table if d >= block_d)]
        if bias and block_d >= 256:   # the bias tile's registers: sm_90's 128-row D 256 tile spilled
            bm, stages = min(bm, 64), min(stages, 2)
    # Short query blocks (decode-like or tiny prefill): do not compute rows that do not exist.
    bm = min(bm, max(16, triton.next_power_of_2(max(max_seqlen_q, 1))))
    return bm, bn, block_d, warps, stages


@triton.jit
def _tanh(x, INTERPRET: tl.constexpr):
    if INTERPRET:
        # The interpreter has no libdevice. tanh x = 1 - 2 / (e^{2x} + 1) saturates cleanly,
        # but in fp32 it loses relative precision near 0 (cancellation; with softcap c the
        # score error would be ~c * eps), so it is evaluated in fp64 and rounded once.
        x64 = x.to(tl.float64)
        return (1.0 - 2.0 / (tl.exp(2.0 * x64) + 1.0)).to(tl.float32)
    else:
        return libdevice.tanh(x)


@triton.jit
def online_softmax_step(s, m_i, l_i, acc):
    """One key block of the online softmax (shared by the prefill and decode kernels): s the
    (rows, keys) fp32 scores, -inf where not allowed -> (p, acc rescaled to the new max, l_i,
    m_new); the caller adds p V to acc. Scores stay in natural units, log2(e) is folded into the
    exponent (one FMA); a row with nothing allowed so far keeps m = -inf and p = 0, never NaN."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    m_log2 = m_safe * 1.4426950408889634
    p = tl.math.exp2(s * 1.4426950408889634 - m_log2[:, None])
    alpha = tl.math.exp2(m_i * 1.4426950408889634 - m_log2)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    return p, acc, l_i, m_new


@triton.jit
def softmax_finish(acc, l_i, m_i):
    """(out = acc / l, lse = m + ln l); a row with nothing allowed (l = 0): out 0, lse -inf."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    return acc / l_safe[:, None], tl.where(empty, float("-inf"), m_i + tl.log(l_safe))


@triton.jit
def softmax_finish_sinks(acc, l_i, m_i, z):
    """softmax_finish with attention sinks: z (per row, or one for all rows; fp32, -inf = none)
    joins the normaliser as one more score without a value: m = max(m_i, z),
    l = l_i e^(m_i - m) + e^(z - m), out = acc e^(m_i - m) / l, lse = m + ln l. Bit-identical to
    softmax_finish where z = -inf; a row with no key but a sink: out 0, lse z."""
    m_f = tl.maximum(m_i, z)
    m_safe = tl.where(m_f == float("-inf"), 0.0, m_f)
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.exp(z - m_safe)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    return acc * alpha[:, None] / l_safe[:, None], tl.where(empty, float("-inf"), m_safe + tl.log(l_safe))


#: Mask bytes per chunk of the key-range scan (rows x keys): 16 per thread at 4 warps.
MASK_SCAN_ELEMS = 2048


def mask_scan_keys(rows: int) -> int:
    """Keys per chunk of mask_key_range for a scan over `rows` (a power of 2) mask rows."""
    return max(16, MASK_SCAN_ELEMS // rows)


@triton.jit
def mask_key_range(row_ptrs, row_ok, stride_mk, n_keys, SCAN: tl.constexpr):
    """(first, last): the first key and one past the last key that any row_ok row of the mask
    attends (row_ptrs: a pointer per row; first >= last: none). One pass over those mask
    bytes, so that a kernel loops over [first, last) only: the unwritten tail of a StaticCache
    and left padding cost neither K/V reads nor FLOPs (the mask still decides inside)."""
    first = tl.zeros([], dtype=tl.int32) + n_keys
    last = tl.zeros([], dtype=tl.int32)
    for c0 in tl.range(0, n_keys, SCAN, num_stages=1):   # not pipelined: registers
        offs = c0 + tl.arange(0, SCAN)
        mk = tl.load(row_ptrs[:, None] + offs.to(tl.int64)[None, :] * stride_mk,
                     mask=row_ok[:, None] & (offs < n_keys)[None, :], other=0)
        hit = tl.max((mk != 0).to(tl.int32), 0) != 0
        first = tl.minimum(first, tl.min(tl.where(hit, offs, n_keys), 0))
        last = tl.maximum(last, tl.max(tl.where(hit, offs + 1, 0), 0))
    return first, last


@triton.jit
def _attn_blocks(acc, l_i, m_i, q, k_base, v_base, m_base, bias_base, start, end, pos, row_ok, d_ok, offs_d,
                 seqlen_k, stride_ks, stride_vs, stride_mk, stride_bk, scale, softcap, window,
                 BLOCK_N: tl.constexpr, BOUNDARY: tl.constexpr, CAUSAL: tl.constexpr,
                 HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_MASK: tl.constexpr,
                 HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """Online-softmax update over key blocks [start, end). BOUNDARY: the blocks may hold keys
    past seqlen_k or outside the causal / window range, so those are masked; interior blocks
    skip that work (the padding mask, if any, applies everywhere)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + offs_n0
        col_ok = offs_n < seqlen_k                  # all true on interior blocks
        kt = tl.load(k_base + offs_n.to(tl.int64)[None, :] * stride_ks + offs_d[:, None],
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)      # (BLOCK_D, BLOCK_N)
        if INTERPRET:
            s = tl.dot(q, kt.to(tl.float32))
        else:
            s = tl.dot(q, kt, input_precision=DOT_PRECISION)
        # Scores and the running max m stay in natural units, log2(e) is folded into the
        # exponent (one FMA: s * log2e - m * log2e) rather than into the scale: lse = m + ln l
        # then has PyTorch's precision (folding it into the scale costs lse ~2 more ulps).
        if HAS_SOFTCAP:
            s = softcap * _tanh(s * (scale / softcap), INTERPRET)
        else:
            s = s * scale
        if HAS_BIAS:   # floored: dtype-minimum biases must not overflow s * log2(e) to -inf
            bias = tl.load(bias_base + offs_n.to(tl.int64)[None, :] * stride_bk,
                           mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            s = s + bias.to(tl.float32)
            s = tl.where(s == float("-inf"), s, tl.maximum(s, SCORE_FLOOR))
        if BOUNDARY:
            allowed = col_ok[None, :]
            if CAUSAL:
                allowed = allowed & (offs_n[None, :] <= pos[:, None])
            if HAS_WINDOW:
                allowed = allowed & (offs_n[None, :] > pos[:, None] - window)
            s = tl.where(allowed, s, float("-inf"))
        if HAS_MASK:
            mk = tl.load(m_base + offs_n.to(tl.int64)[None, :] * stride_mk,
                         mask=row_ok[:, None] & col_ok[None, :], other=0)
            s = tl.where(mk != 0, s, float("-inf"))

        p, acc, l_i, m_new = online_softmax_step(s, m_i, l_i, acc)
        v = tl.load(v_base + offs_n.to(tl.int64)[:, None] * stride_vs + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)       # (BLOCK_N, BLOCK_D)
        if INTERPRET:
            acc += tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32))
        else:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    return acc, l_i, m_i


@triton.jit
def flash_attention_fwd_kernel(
    Q, K, V, Mask, Out, Lse, CuQ, CuK, Sinks, Bias,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_mb, stride_mq, stride_mk,
    stride_bb, stride_bh, stride_bq, stride_bk,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    Hq, GROUP, Sq, Skv, D,
    scale, softcap, window,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_MASK: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr, MASK_SCAN: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    start_m = tl.program_id(0)
    h = tl.program_id(1)     # heads on y and sequences on z (each <= 65535): B * Hq on one
    b = tl.program_id(2)     # axis broke the launch at 2048 x 32
    hk = h // GROUP                                  # GQA: the kv head this query head reads
    if VARLEN:   # Sq / Skv are total_q / total_k: offsets clamped into them (bad cu_seqlens
        # give wrong rows, never accesses out of bounds; the wrapper checks values when asked)
        q_lo = tl.minimum(tl.maximum(tl.load(CuQ + b), 0), Sq)
        seqlen_q = tl.minimum(tl.maximum(tl.load(CuQ + b + 1), q_lo), Sq) - q_lo
        k_lo = tl.minimum(tl.maximum(tl.load(CuK + b), 0), Skv)
        seqlen_k = tl.minimum(tl.maximum(tl.load(CuK + b + 1), k_lo), Skv) - k_lo
        q_start = q_lo.to(tl.int64)
        k_start = k_lo.to(tl.int64)
    else:
        q_start = 0
        seqlen_q = Sq
        k_start = 0
        seqlen_k = Skv
    if start_m * BLOCK_M >= seqlen_q:                 # varlen: this sequence is shorter
        return

    b64 = b.to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seqlen_q
    d_ok = offs_d < D

    if HAS_MASK:   # first / one past the last key any row attends (before Q is live: registers)
        m_first, m_last = mask_key_range(Mask + b64 * stride_mb + offs_m.to(tl.int64) * stride_mq,
                                         row_ok, stride_mk, seqlen_k, MASK_SCAN)
    q_ptrs = (Q + b64 * stride_qb + h.to(tl.int64) * stride_qh
              + (q_start + offs_m).to(tl.int64)[:, None] * stride_qs + offs_d[None, :])
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if INTERPRET:
        q = q.to(tl.float32)
    k_base = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh + k_start * stride_ks
    v_base = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh + k_start * stride_vs
    m_base = Mask + b64 * stride_mb + offs_m.to(tl.int64)[:, None] * stride_mq   # used if HAS_MASK
    bias_base = (Bias + b64 * stride_bb + h.to(tl.int64) * stride_bh
                 + offs_m.to(tl.int64)[:, None] * stride_bq)                        # used if HAS_BIAS

    # Absolute position of each query row; the key range [lo, hi) any row of this block may
    # see (blocks outside are never loaded), and inside it the interior [full_lo, full_hi) of
    # key blocks that every row may see whole: no bounds / causal / window masking there.
    offset = seqlen_k - seqlen_q
    pos = offs_m + offset
    lo = 0
    hi = seqlen_k
    full_lo = 0
    full_hi = (seqlen_k // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(seqlen_k, (start_m + 1) * BLOCK_M + offset)
        full_hi = tl.minimum(full_hi, (tl.maximum(start_m * BLOCK_M + offset + 1, 0) // BLOCK_N) * BLOCK_N)
    if HAS_WINDOW:
        lo = (tl.maximum(0, start_m * BLOCK_M + offset - window + 1) // BLOCK_N) * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(0, (start_m + 1) * BLOCK_M - 1 + offset - window + 1), BLOCK_N) * BLOCK_N
    if HAS_MASK:
        # Only key blocks holding a key some row of this block attends (whole blocks: the
        # interior / boundary split below stays block aligned); none -> every loop is empty.
        lo = tl.maximum(lo, (m_first // BLOCK_N) * BLOCK_N)
        hi = tl.minimum(hi, tl.cdiv(m_last, BLOCK_N) * BLOCK_N)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _attn_blocks(acc, l_i, m_i, q, k_base, v_base, m_base, bias_base, lo, full_lo, pos,
                                 row_ok, d_ok, offs_d, seqlen_k, stride_ks, stride_vs, stride_mk, stride_bk,
                                 scale, softcap, window, BLOCK_N, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP,
                                 HAS_MASK, HAS_BIAS, DOT_PRECISION, INTERPRET)
    acc, l_i, m_i = _attn_blocks(acc, l_i, m_i, q, k_base, v_base, m_base, bias_base, full_lo, full_hi, pos,
                                 row_ok, d_ok, offs_d, seqlen_k, stride_ks, stride_vs, stride_mk, stride_bk,
                                 scale, softcap, window, BLOCK_N, False, CAUSAL, HAS_WINDOW, HAS_SOFTCAP,
                                 HAS_MASK, HAS_BIAS, DOT_PRECISION, INTERPRET)
    acc, l_i, m_i = _attn_blocks(acc, l_i, m_i, q, k_base, v_base, m_base, bias_base, full_hi, hi, pos,
                                 row_ok, d_ok, offs_d, seqlen_k, stride_ks, stride_vs, stride_mk, stride_bk,
                                 scale, softcap, window, BLOCK_N, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP,
                                 HAS_MASK, HAS_BIAS, DOT_PRECISION, INTERPRET)

    if HAS_SINKS:
        out, lse = softmax_finish_sinks(acc, l_i, m_i, tl.load(Sinks + h))
    else:
        out, lse = softmax_finish(acc, l_i, m_i)    # a row with nothing allowed: 0, -inf
    o_ptrs = (Out + b64 * stride_ob + h.to(tl.int64) * stride_oh
              + (q_start + offs_m).to(tl.int64)[:, None] * stride_os + offs_d[None, :])
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start + offs_m, lse, mask=row_ok)


def broadcast_strides(t, dims):
    """t's strides in `dims`, 0 where a dim has size 1: a broadcast dim is read at stride 0
    whatever stride its size-1 dim reports."""
    return tuple(t.stride(i) if t.size(i) > 1 else 0 for i in dims)


def _launch(q, k, v, mask, out, lse, cu_q, cu_k, q_strides, k_strides, v_strides, o_strides,
            l_strides, B, Hq, Hkv, max_q, Sq, Skv, causal, scale, window, softcap, sinks, bias=None):
    from . import interpreting
    interp = interpreting()
    if window >= Skv:
        # A window as long as the keys restricts nothing; and the kernel's int32 bounds
        # (query position - window) must not wrap for windows up to 2^31 - 1.
        window = 0
    D = q.shape[-1]
    bm, bn, bd, warps, stages = tile_config(D, q.dtype, max_q, q.device, interp, bias is not None)
    if mask is not None:
        m = mask.view(torch.uint8)                    # same bytes; strides kept (expanded views too)
        m_strides = broadcast_strides(m, (0, 2, 3))
    else:
        m, m_strides = out, (0, 0, 0)
    b_strides = broadcast_strides(bias, range(4)) if bias is not None else (0,) * 4
    varlen = cu_q is not None
    grid = (triton.cdiv(max_q, bm), Hq, B)
    extra = {} if interp else {"num_warps": warps, "num_stages": stages}
    flash_attention_fwd_kernel[grid](
        q, k, v, m, out, lse, cu_q if varlen else out, cu_k if varlen else out,
        sinks if sinks is not None else lse, bias if bias is not None else lse,
        *q_strides, *k_strides, *v_strides, *m_strides, *b_strides, *o_strides, *l_strides,
        Hq, Hq // Hkv, Sq, Skv, D,
        scale, softcap, window,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, CAUSAL=causal, HAS_WINDOW=window > 0,
        HAS_SOFTCAP=softcap > 0, HAS_MASK=mask is not None, VARLEN=varlen,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", INTERPRET=interp,
        MASK_SCAN=mask_scan_keys(bm), HAS_SINKS=sinks is not None, HAS_BIAS=bias is not None, **extra)


def flash_attention(q, k, v, mask, causal: bool, scale: float, window: int, softcap: float, sinks=None,
                    bias=None):
    """q (B, Hq, Sq, D), k/v (B, Hkv, Skv, D), unit stride in D (checked by the caller); mask
    None or bool broadcastable to (B, 1, Sq, Skv); window <= 0 / softcap == 0 mean none; sinks
    None or (Hq,) float32 contiguous; bias None or float broadcastable to (B, Hq, Sq, Skv), any
    strides. Returns (out (B, Sq, Hq, D) contiguous, lse (B, Hq, Sq) float32)."""
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    out = torch.empty((B, Sq, Hq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    if B * Hq * Sq == 0:
        return out, lse
    _launch(q, k, v, mask, out, lse, None, None,
            (q.stride(0), q.stride(1), q.stride(2)), (k.stride(0), k.stride(1), k.stride(2)),
            (v.stride(0), v.stride(1), v.stride(2)), (Sq * Hq * D, D, Hq * D), (Hq * Sq, Sq),
            B, Hq, Hkv, Sq, Sq, Skv, causal, scale, window, softcap, sinks, bias)
    return out, lse


def flash_attention_varlen(q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool,
                           scale: float, window: int, softcap: float, sinks=None):
    """q (total_q, Hq, D), k/v (total_k, Hkv, D), cu_* int32 (B + 1,). Returns
    (out (total_q, Hq, D) contiguous, lse (Hq, total_q) float32)."""
    total_q, Hq, D = q.shape
    Hkv = k.shape[1]
    B = cu_q.shape[0] - 1
    # Rows no sequence covers (past cu_q[-1]) stay out 0 / lse -inf, as in the reference.
    out = torch.zeros((total_q, Hq, D), dtype=q.dtype, device=q.device)
    lse = torch.full((Hq, total_q), float("-inf"), dtype=torch.float32, device=q.device)
    if B * Hq * total_q == 0 or max_q == 0:
        return out, lse
    _launch(q, k, v, None, out, lse, cu_q.contiguous(), cu_k.contiguous(),   # read as cu[b]
            (0, q.stride(1), q.stride(0)), (0, k.stride(1), k.stride(0)), (0, v.stride(1), v.stride(0)),
            (0, D, Hq * D), (0, total_q), B, Hq, Hkv, max_q, total_q, k.shape[0], causal, scale, window, softcap,
            sinks)
    return out, lse
