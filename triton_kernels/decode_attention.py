"""Decode attention against a KV cache in Triton: split-KV ("flash-decoding") with GQA packing.
Semantics: fastllm/ref/decode.py.

A decode step has Sq (1..16) new queries per sequence and a long cache: attention is a
bandwidth problem (every K/V byte is read once; a few FLOPs each). One program per
(sequence, head) leaves most SMs idle at small batch, so the key range is cut into
`num_splits` pieces, each program reduces its piece to a partial (out_s, lse_s), and a
combine kernel merges them exactly:

    lse = log sum_s exp(lse_s)          out = sum_s exp(lse_s - lse) out_s

Split kernel, one program per (batch * kv head, split, block of M rows):
  * GQA packing: the M dimension holds all GROUP = Hq / Hkv query heads times the Sq queries
    of one kv head (row r = g * Sq + i), so each K/V tile is loaded once for all of them and
    Q K^T is a real (M x D) @ (D x BLOCK_N) tl.dot (M padded to 16). More than BLOCK_M_MAX
    rows go to more programs along grid axis 2 (they read the same K/V, mostly from L2).
  * key range of sequence b: [lo, hi) with hi = L_b (clamped into [0, capacity]), lo = 0 or,
    with a window, the first key the first query can see; split s takes its share, rounded
    to whole BLOCK_N tiles. With a mask, [lo, hi) is the first / one past the last key any of
    the Sq mask rows attends (each program scans those Sq x capacity mask bytes first, mostly
    from L2), and the mask decides per key inside: a StaticCache filled to 10% or a
    left-padded batch reads only the K/V it attends, split over all programs.
  * paged caches: key j is row j % page_size of page block_table[b, j // page_size] (page id
    clamped into [0, num_pages): a bad table reads a wrong page, never out of bounds); one
    pointer per key row, so any page size >= 1 works. Contiguous caches read rows through
    their batch / head / seq strides (StaticCache slices, transposed views).
  * online softmax in fp32 as in flash_attention.py (scores in natural units, log2(e) folded
    into the exponent); a row with nothing allowed gives out 0 and lse -inf.
  * with one split the program writes the final out (q.dtype) and lse directly, otherwise
    fp32 partials (B, Hq, Sq, splits, D) / (B, Hq, Sq, splits) for the combine kernel.

Combine kernel, one program per output row (b, h, i): max of the lse_s, weights
exp(lse_s - max), a loop over the splits accumulating weight * out_s; out in q.dtype,
lse = max + log(sum of weights); all splits empty -> out 0, lse -inf. Attention sinks (a logit
z_h per head, no value) are one more weight there: with sinks the combine runs even after one
split.

Bytes: the naive kernel (one program per query head) reads K/V GROUP times; this one reads
them once: 2 * L * Hkv * D * sizeof(dtype) per sequence, plus O(B Hq Sq splits D) fp32 of
partials written and read back.

Precision: as flash_attention.py (fp32 accumulation, P rounded to V's dtype before P V; under
the CPU interpreter bf16 dot operands are upcast to fp32 after that rounding, since the
interpreter's bf16 tl.dot multiplies raw bits).

Run: python -m pytest -q tests/test_decode.py (CPU: Triton's interpreter). The GPU tile configs
in _CONFIGS compile for sm_80 / sm_86 / sm_90 with 0 spills and shared memory within each
arch's limit (fp16 / bf16, 16 and 64 rows per program, every feature on; checked through
Triton's NVIDIA backend without a GPU by bench/triton_compile_check.py) but are starting points,
never run or tuned on a GPU (UNVERIFIED timings).
"""
import torch
import triton
import triton.language as tl

from .flash_attention import (_tanh, broadcast_strides, mask_key_range, mask_scan_keys, online_softmax_step,
                              softmax_finish)

# Keys per tile and warps per program, by padded head dim. Decode is bandwidth bound: tiles
# big enough for 16-byte loads and a few loads in flight (num_stages), small enough that many
# programs fit an SM. (BLOCK_N, num_warps, num_stages); D 256 keeps 2 stages so 64 rows fit
# sm_86/89's 99 KB of shared memory.
_CONFIGS = {64: (64, 4, 3), 128: (64, 4, 3), 256: (32, 4, 2)}
_CONFIGS_FP32 = {64: (32, 4, 2), 128: (32, 8, 2), 256: (16, 8, 2)}
# Rows per program (GROUP * Sq packed in M); more rows take more programs.
BLOCK_M_MAX = 64
# Interpreter: bigger key tiles mean fewer numpy calls.
_INTERPRET_BLOCK_N = 64


def tile_config(head_dim: int, dtype: torch.dtype, rows: int, interpret: bool):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) for this call."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    fp32 = dtype == torch.float32
    max_m = BLOCK_M_MAX // 2 if fp32 and not interpret else BLOCK_M_MAX   # fp32 tiles spill at 64 rows
    block_m = min(max_m, max(16, triton.next_power_of_2(max(rows, 1))))   # tl.dot needs >= 16
    if interpret:
        return block_m, _INTERPRET_BLOCK_N, block_d, 4, 1
    table = _CONFIGS_FP32 if fp32 else _CONFIGS
    bn, warps, stages = table[min(d for d in table if d >= block_d)]
    if block_m * block_d > 32 * 128:
        # 64 rows x D >= 128 spills on 4 warps (accumulator + score tile): 8 warps, 32 keys.
        bn, warps = min(bn, 32), 8
    return block_m, bn, block_d, warps, stages


@triton.jit
def decode_split_kernel(
    Q, K, V, Lens, BlockTable, Mask, O, Lse,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,          # paged: page, head, slot strides
    stride_vb, stride_vh, stride_vs,
    stride_btb, stride_mb, stride_mq, stride_mk,
    stride_ob, stride_oh, stride_oq, stride_os,   # o row (b, h, i, split); unit stride in D
    stride_lb, stride_lh, stride_lq, stride_ls,
    Hkv, GROUP, Sq, D, capacity, page_size, num_pages, num_splits,
    scale, softcap, window,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LENS: tl.constexpr, PAGED: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr, SQ_PAD: tl.constexpr, MASK_SCAN: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    mblk = tl.program_id(2)
    b = bh // Hkv
    hk = bh % Hkv
    b64 = b.to(tl.int64)

    # Rows of this program: r = g * Sq + i (query head hk * GROUP + g, query i).
    offs_m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < GROUP * Sq
    g = offs_m // Sq
    qi = offs_m % Sq
    h = hk * GROUP + g                               # query head of each row
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    # Valid length (clamped: bad lengths never read past the cache) and key range.
    if HAS_LENS:
        L = tl.minimum(tl.maximum(tl.load(Lens + b), 0), capacity)
    else:
        L = capacity
    pos = L - Sq + qi                                # absolute position of each row's query
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(L - Sq - window + 1, 0)      # first key the first query sees
    hi = L
    if HAS_MASK:                                     # only keys some query row attends
        offs_sq = tl.arange(0, SQ_PAD)
        m_first, m_last = mask_key_range(Mask + b64 * stride_mb + offs_sq.to(tl.int64) * stride_mq,
                                         offs_sq < Sq, stride_mk, capacity, MASK_SCAN)
        lo = tl.maximum(lo, m_first)
        hi = tl.maximum(tl.minimum(hi, m_last), lo)  # within [0, L) still (lengths + mask: both hold)
    # This split's share, whole tiles: [start, end).
    per_split = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), num_splits), BLOCK_N) * BLOCK_N
    start = lo + split * per_split
    end = tl.minimum(start + per_split, hi)

    q_ptrs = (Q + b64 * stride_qb + h.to(tl.int64)[:, None] * stride_qh
              + qi.to(tl.int64)[:, None] * stride_qs + offs_d[None, :])
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if INTERPRET:
        q = q.to(tl.float32)
    if PAGED:
        k_base = K + hk.to(tl.int64) * stride_kh
        v_base = V + hk.to(tl.int64) * stride_vh
    else:
        k_base = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh
        v_base = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + offs_n0
        col_ok = offs_n < end
        if PAGED:
            page = tl.load(BlockTable + b64 * stride_btb + offs_n // page_size, mask=col_ok, other=0)
            page = tl.minimum(tl.maximum(page, 0), num_pages - 1).to(tl.int64)
            k_rows = k_base + page * stride_kb + (offs_n % page_size).to(tl.int64) * stride_ks
            v_rows = v_base + page * stride_vb + (offs_n % page_size).to(tl.int64) * stride_vs
        else:
            k_rows = k_base + offs_n.to(tl.int64) * stride_ks
            v_rows = v_base + offs_n.to(tl.int64) * stride_vs
        kt = tl.load(k_rows[None, :] + offs_d[:, None], mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        if INTERPRET:
            s = tl.dot(q, kt.to(tl.float32))
        else:
            s = tl.dot(q, kt, input_precision=DOT_PRECISION)
        if HAS_SOFTCAP:
            s = softcap * _tanh(s * (scale / softcap), INTERPRET)
        else:
            s = s * scale
        allowed = col_ok[None, :]
        if HAS_MASK:
            mk = tl.load(Mask + b64 * stride_mb + qi.to(tl.int64)[:, None] * stride_mq
                         + offs_n.to(tl.int64)[None, :] * stride_mk,
                         mask=row_ok[:, None] & col_ok[None, :], other=0)
            allowed = allowed & (mk != 0)
        else:
            allowed = allowed & (offs_n[None, :] <= pos[:, None])
            if HAS_WINDOW:
                allowed = allowed & (offs_n[None, :] > pos[:, None] - window)
        s = tl.where(allowed, s, float("-inf"))

        p, acc, l_i, m_new = online_softmax_step(s, m_i, l_i, acc)
        v = tl.load(v_rows[:, None] + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if INTERPRET:
            acc += tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32))
        else:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    out, lse = softmax_finish(acc, l_i, m_i)        # a row with nothing allowed: 0, -inf
    o_ptrs = (O + b64 * stride_ob + h.to(tl.int64)[:, None] * stride_oh + qi.to(tl.int64)[:, None] * stride_oq
              + split * stride_os + offs_d[None, :])
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + b64 * stride_lb + h.to(tl.int64) * stride_lh + qi.to(tl.int64) * stride_lq + split * stride_ls,
             lse, mask=row_ok)


@triton.jit
def decode_combine_kernel(
    OPart, LsePart, Out, Lse, Sinks,
    Hq, Sq, D, num_splits,
    stride_ob, stride_oq, stride_oh,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    """One program per output row; partials are (rows, splits, D) / (rows, splits) contiguous
    with rows ordered (b, h, i); lse (B, Hq, Sq) contiguous has the same row order. A sink z_h
    is one more term of the merge, with lse z_h and no value."""
    row = tl.program_id(0)
    b = row // (Hq * Sq)
    h = (row // Sq) % Hq
    i = row % Sq
    row64 = row.to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    lse_s = tl.load(LsePart + row64 * num_splits + offs_s, mask=offs_s < num_splits, other=float("-inf"))
    m = tl.max(lse_s, 0)
    if HAS_SINKS:
        z = tl.load(Sinks + h)
        m = tl.maximum(m, z)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_safe)                         # 0 for empty splits
    total = tl.sum(w, 0)
    if HAS_SINKS:
        total += tl.exp(z - m_safe)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s in range(0, num_splits):
        ws = tl.exp(tl.load(LsePart + row64 * num_splits + s) - m_safe)
        o = tl.load(OPart + (row64 * num_splits + s) * D + offs_d, mask=d_ok, other=0.0)
        acc += ws * o                                  # empty split: weight 0, o 0
    empty = total == 0.0
    out = acc / tl.where(empty, 1.0, total)
    tl.store(Out + b.to(tl.int64) * stride_ob + i.to(tl.int64) * stride_oq + h.to(tl.int64) * stride_oh + offs_d,
             out.to(Out.dtype.element_ty), mask=d_ok)
    tl.store(Lse + row64, tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, total))))


def decode_attention(q, k_cache, v_cache, cache_seqlens, block_table, mask, scale: float, window: int,
                     softcap: float, num_splits: int, sinks=None):
    """Launch. Arguments as the op normalizes them (fastllm/ops/decode.py): q (B, Hq, Sq, D);
    caches (B, Hkv, S_max, D) or paged (num_pages, page_size, Hkv, D) with block_table
    (B, max_pages) int32; cache_seqlens (B,) int32 or None; mask None or bool broadcastable to
    (B, 1, Sq, capacity); window <= 0 / softcap == 0: none; num_splits >= 1; sinks None or (Hq,)
    float32 contiguous.
    Returns (out (B, Sq, Hq, D) contiguous, lse (B, Hq, Sq) float32)."""
    from . import interpreting
    interp = interpreting()
    B, Hq, Sq, D = q.shape
    paged = block_table is not None
    if paged:
        num_pages, page_size, Hkv, _ = k_cache.shape
        capacity = block_table.shape[1] * page_size
        ks = (k_cache.stride(0), k_cache.stride(2), k_cache.stride(1))
        vs = (v_cache.stride(0), v_cache.stride(2), v_cache.stride(1))
        bt_stride = block_table.stride(0)
    else:
        Hkv, capacity = k_cache.shape[1], k_cache.shape[2]
        num_pages, page_size = 1, 1
        ks = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2))
        vs = (v_cache.stride(0), v_cache.stride(1), v_cache.stride(2))
        bt_stride = 0
    group = Hq // Hkv
    if window >= capacity:
        window = 0      # restricts nothing; and L - Sq - window stays far from int32's range
    out = torch.empty((B, Sq, Hq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    bm, bn, bd, warps, stages = tile_config(D, q.dtype, group * Sq, interp)
    if mask is not None:
        m = torch.broadcast_to(mask, (B, 1, Sq, capacity)).view(torch.uint8)
        m_strides = broadcast_strides(m, (0, 2, 3))
    else:
        m, m_strides = out, (0, 0, 0)
    # More pieces than key tiles would only be empty partials (memory, combine work).
    splits = max(1, min(int(num_splits), triton.cdiv(capacity, bn)))
    # Sinks join in the combine kernel, so with them even one split writes a partial (folding
    # them into the split kernel's epilogue made it spill at sm_80, D 64).
    partials = splits > 1 or sinks is not None
    if not partials:
        o, o_strides = out, (Sq * Hq * D, D, Hq * D, 0)
        l, l_strides = lse, (Hq * Sq, Sq, 1, 0)
    else:
        o = torch.empty((B, Hq, Sq, splits, D), dtype=torch.float32, device=q.device)
        o_strides = (Hq * Sq * splits * D, Sq * splits * D, splits * D, D)
        l = torch.empty((B, Hq, Sq, splits), dtype=torch.float32, device=q.device)
        l_strides = (Hq * Sq * splits, Sq * splits, splits, 1)
    if cache_seqlens is not None:
        cache_seqlens = cache_seqlens.contiguous()     # read as lens[b]
    extra = {} if interp else {"num_warps": warps, "num_stages": stages}
    grid = (B * Hkv, splits, triton.cdiv(group * Sq, bm))
    decode_split_kernel[grid](
        q, k_cache, v_cache, cache_seqlens if cache_seqlens is not None else out,
        block_table if paged else out, m, o, l,
        q.stride(0), q.stride(1), q.stride(2), *ks, *vs, bt_stride, *m_strides, *o_strides, *l_strides,
        Hkv, group, Sq, D, capacity, page_size, num_pages, splits,
        scale, softcap, window,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, HAS_LENS=cache_seqlens is not None, PAGED=paged,
        HAS_MASK=mask is not None, HAS_WINDOW=window > 0, HAS_SOFTCAP=softcap > 0,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", INTERPRET=interp,
        SQ_PAD=triton.next_power_of_2(Sq), MASK_SCAN=mask_scan_keys(triton.next_power_of_2(Sq)), **extra)
    if partials:
        decode_combine_kernel[(B * Hq * Sq,)](
            o, l, out, lse, sinks if sinks is not None else lse, Hq, Sq, D, splits, Sq * Hq * D, Hq * D, D,
            BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=bd, HAS_SINKS=sinks is not None,
            **({} if interp else {"num_warps": 1}))
    return out, lse
