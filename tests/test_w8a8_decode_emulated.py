"""The fused-quantization W8A8 decode kernel (csrc/int8/w8a8_decode_kernel.cuh), emulated bit for bit.

The kernel has never run on a GPU. This file mirrors, in NumPy vectorized over CTAs x warps x lanes:
the Python glue (python/fastllm/ops/_int8_cuda.py: fused_supports is called for real, on CPU
tensors; w8a8_fused_cuda's arguments, row strides `x.stride(0) if M > 1 else K`, in_mul_len,
act_scale) and w8a8_decode_gemm (int8_launcher.cu: every check and return code, K == 0 strides,
p.ldx = 0 for M == 1 (p.ldw = K for N == 1 is dead: N % 16 == 0), the variant from
choose_w8a16_config); and the kernel
w8a8_decode_kernel<T, kTokenTiles, kWarps, kDynamic> with T = fp16 / bf16 / fp32: the load
lambda's 16-byte ld_stream_16 / __ldg loads (kXWords = sizeof(T) words per token, kUnroll 2 for
fp32 else 4, masks ok / t_ok, padding tokens at row offset 0), token_scales (per-thread strided
Vec<T, kVec> loads and scalar in_mul loads, fabsf / fmaxf with the NaN-inf flag, the 5-round
__shfl_xor_sync butterfly, s_red, s_inv / s_scale), the per-channel float4 in_mul loads,
quantize16 (__fmul_rn as one np.float32 product, the static clamp with its NaN select via
fmaxf / fminf = np.fmax / np.fmin, __fadd_rn(v, 1.5 * 2^23), pack_int8x4's __byte_perm), the A / B
registers of mma.sync m16n8k32 .s8 (mma_m16n8k32_s8 of test_int8_kernel_emulated, from the PTX
ISA), the int32 reduction through red[kWarps][kTok][16], the epilogue loop and its store.
Device buffers have the minimal extent of their view ((rows - 1) * ld + K), the row gaps holding
NaN (x) or random bytes (w); each load is checked for bounds and 16-byte alignment.

Proven here, given that mirror (fp16 / bf16 / fp32 x; M in {1, 5, 8, 9, 16}; K = 1072, 208 and
2160 with a K tail, 0; N = 32 / 48; padded strides; dynamic with / without SmoothQuant factors,
static per tensor / per channel; bias None / fp16 / fp32; all four variants, forced too, with
the b0 loop taking 2 or 3 trips):
  * every load is in bounds and aligned; padding tokens and K-tail chunks are never read;
  * every (token, k) is quantized once per CTA and its q byte equals fastllm.ref's
    quantize_per_token (of fp32(x) * smooth) / quantize_static bit for bit, including .5 ties,
    clamps, an all-zero row, and (static) NaN -> 0, +-inf -> +-127; each k reaches the MMA with
    the same permutation in A and B, so the int32 sums equal q @ w.T exactly (no overflow);
  * each reduction slot is written once, each output once, nothing past M * N, and the outputs
    equal fmaf(fp32(q @ w.T) * a_scale, w_scale, bias) rounded to x's dtype bit for bit; a dynamic
    row holding NaN / inf is NaN throughout (its q bits are arbitrary, as documented);
  * quantize16 alone rounds like quantize_static on every half-integer of [-130, 130], ties,
    -0.0, +-inf, NaN; the launcher's checks (mirrored) return the codes expected of them, and
    for the layouts tried fused_supports is None exactly where the launcher accepts the
    arguments w8a8_fused_cuda would pass (M = 17, misaligned / strided in_mul, 16-byte-misaligned
    x or w rows, a misaligned x, static without in_mul: a reason).
Found by this file and fixed in the kernel: a dynamic row whose amax < 127 / FLT_MAX (~3.7e-37;
fp32 / bf16 x, or x * smooth) has inv = 127 / amax = inf, and the unclamped quantize16 packed
inf's low byte (q = 0 where the two-launch path gives +-127); token_scales now flags such rows
(__syncthreads_or) and the CTA runs the clamped main loop (test_tiny_row_matches_two_launch_path,
mutant tiny_rows_unclamped).
Not proven: that the .cuh says what is mirrored here (by hand; test_kernel_source_matches_mirror
fails when a mirrored line changes); the hardware's mma / __byte_perm / shuffle semantics (PTX
ISA), fp32 arithmetic without flush-to-zero (nvcc without --use_fast_math), canonical NaN
0x7FFFFFFF (only matters for q bits the docs call arbitrary); token_scales is emulated once per
launch (every CTA computes the same values); __syncthreads placement, launch limits, speed.
test_mutant_kernel_fails shows that deliberately wrong kernels make these checks fail.
"""
import numpy as np
import pytest
import torch
from test_int8_kernel_emulated import (C, G, INT8_DIR, LANE, LAUNCHER_SRC, ROOT, TRAITS_SRC, W8A16_MAX_M,
                                       W8A16_ROWS, W8A16_UNROLL, Out, bias_at, byte_perm, choose_w8a16_config,
                                       fma_f32, gread, ld16, mma_m16n8k32_s8, scaled, strided, to_out)

from fastllm.ops._int8_cuda import fused_supports
from helpers import assert_mirrored
from fastllm.ops.int8_static import input_multiplier
from fastllm.ref import quantize_per_token
from fastllm.ref.int8 import quantize_static

OK, E_DTYPE, E_SHAPE, E_ALIGN = 0, 10001, 10002, 10003     # common.h
F16, BF16, F32 = 0, 1, 2                                    # DType codes
MAX_K, MAX_DIM = (2 ** 31 - 1) // (128 * 128), 2 ** 31 - 1 - 1024
FLT_MAX = np.float32(3.402823466e38)
KIND = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32"}
CODE = {torch.float16: F16, torch.bfloat16: BF16, torch.float32: F32}
SIZE = {"f16": 2, "bf16": 2, "f32": 4}


def canon(v):
    """An fp32 result as the GPU leaves it: NaN is the canonical 0x7FFFFFFF."""
    b = np.array(v, np.float32).view(np.uint32)
    b[np.isnan(np.asarray(v, np.float32))] = 0x7FFFFFFF
    return b.view(np.float32)


def to_f32(words, kind):
    """quant::to_float of the elements in (..., words, 4) uint32 -> (..., elements) float32."""
    b = np.ascontiguousarray(words, np.uint32).reshape(words.shape[:-2] + (4 * words.shape[-2],))
    if kind == "f32":
        return b.view(np.float32)
    h = b.view(np.uint16)
    return h.view(np.float16).astype(np.float32) if kind == "f16" else (h.astype(np.uint32) << 16).view(np.float32)


KERNEL = dict(    # mutants replace entries
    magic=np.float32(12582912.0),
    sel_lo=0x0040, sel_hi=0x5410,
    a_regs=lambda w0, w8, s: (w0[..., 2 * s], w8[..., 2 * s], w0[..., 2 * s + 1], w8[..., 2 * s + 1]),
    b_regs=lambda q, s: (q[..., 2 * s], q[..., 2 * s + 1]),
    clamp=lambda v: np.where(v != v, np.float32(0), np.fmin(np.fmax(v, np.float32(-127)), np.float32(127))),
    clamps=lambda mode: mode != "dynamic",           # if (kMode != kQuantDynamic)
    x_row_off=lambda m, t_ok, ldx: np.where(t_ok, m * ldx, 0),
    x_ok=lambda ok, t_ok: ok & t_ok,
    chunk_ok=lambda k, c, K: k + 16 * c < K,
    mul_off=lambda blk, c: blk * 64 + 16 * c,
    bad_flag=lambda f: ~(f <= FLT_MAX),
    amax_mul=lambda f, mul: f * mul,
    red_rows=lambda g: (g, g + 8),
    skip=lambda m, M: m >= M,
)


def quantize16(e, mul, per_channel, m0, inv, mode, k):
    """quantize16<T, kMode> (mode "static", "dynamic" or "clamped" = kQuantDynamicClamped): e, mul
    (..., 16) float32, inv (...) -> q (..., 4) uint32."""
    with np.errstate(all="ignore"):
        v = e
        if mode != "static":
            if per_channel:
                v = canon(v * mul)
            v = canon(v * inv[..., None])
        else:
            v = canon(v * (mul if per_channel else m0))
        if k["clamps"](mode):
            v = k["clamp"](v)
        u = canon(v + k["magic"]).view(np.uint32)
    lo = byte_perm(u[..., 0::4], u[..., 1::4], k["sel_lo"])
    hi = byte_perm(u[..., 2::4], u[..., 3::4], k["sel_lo"])
    return byte_perm(lo, hi, k["sel_hi"])                  # word i = pack_int8x4(r[4i .. 4i + 3])


def token_scales(p, kTok, kWarps, kind, k):
    """token_scales<T, kTok, kWarps>: (s_inv, s_scale) float32 (kTok,), and the __syncthreads_or
    flag: some token's inv is inf (amax < 127 / FLT_MAX)."""
    M, K, xb, nthr = p["M"], p["K"], SIZE[kind], kWarps * 32
    kVec = 16 // xb
    i = strided(K // kVec, nthr)                            # every i of every thread
    tid, kk = i % nthr, i * kVec
    amax, bad = np.zeros((kTok, nthr), np.float32), np.zeros((kTok, nthr), bool)
    if p["has_in_mul"]:
        mul = gread(p["in_mul"], kk[:, None] + np.arange(kVec), "in_mul")   # __ldg(p.in_mul + k + j)
    for t in range(min(kTok, M)):                           # if (t >= p.M) break;
        f = to_f32(ld16(p["x"], xb * (t * p["ldx"] + kk), np.ones(i.size, bool), "x")[:, None], kind)
        with np.errstate(all="ignore"):
            f = np.abs(canon(k["amax_mul"](f, mul)) if p["has_in_mul"] else f)
        np.logical_or.at(bad[t], tid, k["bad_flag"](f).any(1))
        np.fmax.at(amax[t], tid, np.fmax.reduce(f, 1))       # fmaxf drops a NaN
    v = np.where(bad, np.float32(np.inf), amax).reshape(kTok, kWarps, 32)
    for off in (16, 8, 4, 2, 1):
        v = np.fmax(v, v[..., LANE ^ off])
    a = np.zeros(kTok, np.float32)
    for w in range(kWarps):                                 # s_red[w][tid], lane 0's value
        a = np.fmax(a, v[:, w, 0])
    row_bad = ~(a <= FLT_MAX)
    with np.errstate(all="ignore"):
        s_inv = np.where((np.arange(kTok) < M) & (a > 0) & ~row_bad, np.float32(127) / a, np.float32(0))
        s_scale = np.where(row_bad, np.float32(np.nan), np.where(a > 0, a / np.float32(127), np.float32(1)))
    return s_inv.astype(np.float32), s_scale.astype(np.float32), bool(np.isinf(s_inv).any())


def kernel(p, T, kWarps, kind, k, out, qrec):
    """All CTAs of w8a8_decode_kernel<kind, T, kWarps, p.dynamic> (T token tiles); stores into out (Out of M * N);
    qrec[0] / qrec[1]: (CTAs, M, K) q bytes quantized and how often."""
    M, N, K, xb, dyn = p["M"], p["N"], p["K"], SIZE[kind], p["dynamic"]
    U, kTok, NB = (W8A16_UNROLL // 2 if xb == 4 else W8A16_UNROLL), 8 * T, N // W8A16_ROWS
    n0 = np.arange(NB)[:, None, None] * W8A16_ROWS                    # (NB, 1, 1)
    warp = np.arange(kWarps)[None, :, None]                          # (1, W, 1)
    w_g = (n0 + G) * p["ldw"] + 16 * C                               # bytes, (NB, 1, 32)
    m_t = G[None, :] + 8 * np.arange(T)[:, None]                     # (T, 32)
    t_ok = m_t < M
    x_t = k["x_row_off"](m_t, t_ok, p["ldx"]) + 16 * C              # elements
    per_channel = p["in_mul_len"] == K and p["in_mul_len"] > 1
    m0 = gread(p["in_mul"], 0, "in_mul") if not dyn and not per_channel and K > 0 else np.float32(1)
    s_inv, s_scale, tiny = token_scales(p, kTok, kWarps, kind, k) if dyn else (None, None, False)
    mode = "static" if not dyn else ("clamped" if tiny else "dynamic")   # the main_loop instantiation
    inv = s_inv[m_t] if dyn else np.zeros((T, 32), np.float32)
    acc = np.zeros((T, NB, kWarps, 32, 4), np.int64)
    nblocks = (K + 63) // 64
    full = (NB, kWarps, 32)
    for it in range(0, nblocks, kWarps * U):
        for u in range(U):
            blk = warp + it + u * kWarps                             # b0 + u * kWarps, (1, W, 1)
            kk = blk * 64
            ok = np.broadcast_to((blk < nblocks) & k["chunk_ok"](kk, C, K), full)
            w0 = ld16(p["w"], w_g + kk, ok, "w")
            w8 = ld16(p["w"], w_g + 8 * p["ldw"] + kk, ok, "w")
            run = np.broadcast_to(blk < nblocks, full)               # `if (blk >= nblocks) break;`
            kq = k["mul_off"](blk, C)
            mul = None
            if per_channel:
                lk = run & (kq < K)
                mul = np.concatenate([ld16(p["in_mul"].view(np.uint8), 4 * (kq + j), lk, "in_mul").view(np.float32)
                                      for j in range(0, 16, 4)], -1)
            q = []
            for t in range(T):
                okt = k["x_ok"](ok, t_ok[t])
                xv = np.stack([ld16(p["x"], xb * (x_t[t] + kk) + 16 * i, okt, "x") for i in range(xb)], -2)
                q.append(quantize16(to_f32(xv, kind), mul, per_channel, m0, inv[t], mode, k))
                rec = okt & run & t_ok[t]                           # q bytes that reach a stored output
                kb = np.broadcast_to(kk + 16 * C, full)[rec][:, None] + np.arange(16)
                mb, cb = np.broadcast_to(m_t[t], full)[rec][:, None], np.broadcast_to(n0 // 16, full)[rec][:, None]
                qrec[0][cb, mb, kb] = q[t].view(np.int8).reshape(full + (16,))[rec]
                np.add.at(qrec[1], (cb, mb, kb), 1)
            for s in range(2):
                a = np.stack(k["a_regs"](w0, w8, s), -1)
                for t in range(T):
                    b0, b1 = k["b_regs"](q[t], s)
                    acc[t] = np.where(run[..., None], mma_m16n8k32_s8(a, b0, b1, acc[t]), acc[t])
    red = np.zeros((NB, kWarps, kTok, W8A16_ROWS), np.int64)
    cnt = np.zeros(red.shape, np.int64)
    rg, rg8 = k["red_rows"](G)
    for t in range(T):
        for reg, tok, ch in ((0, 8 * t + 2 * C, rg), (1, 8 * t + 2 * C + 1, rg), (2, 8 * t + 2 * C, rg8),
                             (3, 8 * t + 2 * C + 1, rg8)):
            red[:, :, tok, ch] = acc[t][..., reg]
            np.add.at(cnt, (slice(None), slice(None), tok, ch), 1)
    assert (cnt == 1).all(), "every reduction slot written exactly once"
    i = strided(kTok * W8A16_ROWS, kWarps * 32)
    m, r = i // W8A16_ROWS, i % W8A16_ROWS
    m, r = m[~k["skip"](m, M)], r[~k["skip"](m, M)]
    v = red[:, :, m, r].sum(1)                                       # (NB, len)
    assert np.abs(v).max(initial=0) < 2 ** 31, "int32 reduction overflow"
    n = n0[:, 0] + r
    a_s = s_scale[m] if dyn else gread(p["act_scale"], 0, "act_scale")
    with np.errstate(all="ignore"):
        y = fma_f32(v.astype(np.float32) * a_s, gread(p["w_scale"], n, "w_scale"), bias_at(p, n))
    dst = m * N + n
    assert dst.size == 0 or (dst.min() >= 0 and dst.max() < out.size), "store outside the output"
    np.add.at(out.count, dst, 1)
    out.v[dst] = to_out(y, kind)


def launcher(dtype, x, ldx, w, ldw, w_scale, bias, bias_dtype, in_mul, in_mul_len, act_scale, dynamic, out, M, N, K):
    """w8a8_decode_gemm up to the launch: (code, params or None). Pointers are integers."""
    fl, al = (lambda d: d in (F16, BF16, F32)), (lambda ptr, b: ptr % b == 0)
    if not fl(dtype):
        return E_DTYPE, None
    if M < 0 or M > W8A16_MAX_M or N < 0 or K < 0 or N > MAX_DIM or K > MAX_K or N % 16 or K % 16:
        return E_SHAPE, None
    if (in_mul_len not in (0, K)) if dynamic else (in_mul_len not in (1, K)):
        return E_SHAPE, None
    if M == 0 or N == 0:
        return OK, None
    if K == 0:
        ldx = ldw = 0
    if (M > 1 and ldx < K) or (ldw < K and N > 1):
        return E_SHAPE, None
    xb = 4 if dtype == F32 else 2
    if not al(x, 16) or not al(w, 16) or (ldx * xb) % 16 or ldw % 16 or not al(out, xb):
        return E_ALIGN, None
    if w_scale == 0 or not al(w_scale, 4):
        return E_ALIGN, None
    if in_mul_len > 0 and (in_mul == 0 or not al(in_mul, 16 if in_mul_len > 1 else 4)):
        return E_ALIGN, None
    if not dynamic and (act_scale == 0 or not al(act_scale, 4)):
        return E_ALIGN, None
    if bias != 0 and (not fl(bias_dtype) or not al(bias, 4 if bias_dtype == F32 else 2)):
        return E_DTYPE, None
    return OK, dict(ldx=ldx if M > 1 else 0, ldw=ldw if N > 1 else K, in_mul_len=in_mul_len, has_in_mul=in_mul_len > 0,
                    dynamic=bool(dynamic), M=M, N=N, K=K)


def glue_args(x, b, in_mul, act_scale, w_scale, bias, dynamic, out):
    """w8a8_fused_cuda's w8a8_decode_gemm arguments (act_scale / w_scale / bias made contiguous)."""
    M, K = x.shape
    N = b.shape[0]
    ptr = lambda t: t.data_ptr() if t is not None else 0    # noqa: E731
    return (CODE[x.dtype], x.data_ptr(), x.stride(0) if M > 1 else K, b.data_ptr(), b.stride(0) if N > 1 else K,
            w_scale.data_ptr(), ptr(bias), CODE[bias.dtype] if bias is not None else 0, ptr(in_mul),
            in_mul.numel() if in_mul is not None else 0, ptr(act_scale), int(dynamic), out.data_ptr(), M, N, K)


def flat_bytes(t, ld, rows, cols):
    """The bytes of view t's minimal extent (rows - 1) * ld + cols (its row gaps included)."""
    n = (rows - 1) * ld + cols if rows and cols else 0
    return torch.as_strided(t, (n,), (1,)).contiguous().view(torch.uint8).numpy()


def fused(x, b, in_mul, act_scale, w_scale, bias, dynamic, *, variant=None, k=KERNEL):
    """w8a8_fused_cuda -> w8a8_decode_gemm -> the kernel: (Out, variant, (q, q counts))."""
    assert fused_supports(x, b, in_mul, w_scale, bias, dynamic) is None
    M, K = x.shape
    N = b.shape[0]
    out_t = torch.empty((M, N), dtype=x.dtype)
    code, p = launcher(*glue_args(x, b, in_mul, act_scale, w_scale, bias, dynamic, out_t))
    assert code == OK
    p.update(x=flat_bytes(x, p["ldx"], M, K), w=flat_bytes(b, p["ldw"], N, K), w_scale=w_scale.numpy(),
             bias=None if bias is None else bias.float().numpy(),
             in_mul=in_mul.reshape(-1).numpy() if p["has_in_mul"] else np.zeros(0, np.float32),
             act_scale=np.zeros(0, np.float32) if dynamic else act_scale.reshape(-1).numpy())
    T, warps = choose_w8a16_config(M, N, K, 132) if variant is None else variant
    out = Out(M * N)
    qrec = (np.zeros((N // 16, M, K), np.int8), np.zeros((N // 16, M, K), np.int64))
    kernel(p, T, warps, KIND[x.dtype], k, out, qrec)
    return out, (T, warps), qrec


def padded(t, ld, poison):
    """t (rows, cols) copied into a (rows, ld) storage filled with poison: a view of stride (ld, 1)."""
    s = torch.full((t.shape[0], ld), poison, dtype=t.dtype)
    s[:, :t.shape[1]] = t
    return s[:, :t.shape[1]]


def decode_data(M, N, K, dtype, mode, seed, bias_dtype, ldx, ldw):
    """x with a ties row (multiples of 1 / 8, amax 127), outliers, an all-zero (-0.0) row, a NaN
    and an inf row (the inf in the K tail); smooth factors 1 on the first 64 k (ties survive)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen) * 3
    x[:, ::97] *= 40
    if K:
        x[0] = torch.randint(-1016, 1017, (K,), generator=gen) / 8
        x[0, 1] = 127.0
    if M >= 5:
        x[M - 1], x[M - 2, 3], x[M - 3, K - 5] = -0.0, float("nan"), -float("inf")
    w = torch.randint(-128, 128, (N, K), generator=gen, dtype=torch.int8)
    w[0, :16] = -128
    w_scale = torch.rand(N, generator=gen) / 64 + 1 / 512
    bias = None if bias_dtype is None else torch.randn(N, generator=gen).to(bias_dtype)
    smooth = torch.rand(K, generator=gen) * 0.75 + 0.25
    smooth[:64] = 1.0
    act = torch.tensor([0.25 if mode == "static_tensor" else 0.5])
    in_mul = {"dynamic": None, "dynamic_smooth": smooth, "static_tensor": input_multiplier(act, None),
              "static_channel": input_multiplier(act, smooth)}[mode]
    return (padded(x.to(dtype), ldx, float("nan")), padded(w, ldw, 77), in_mul,
            None if mode.startswith("dynamic") else act, w_scale, bias)


def check(res, x, w, in_mul, act, w_scale, bias, dynamic):
    """q bytes and outputs == the reference composition, bit for bit."""
    out, _, (qv, qn) = res
    M, K = x.shape
    N = w.shape[0]
    assert (qn == 1).all(), "every (token, k) quantized exactly once per CTA"
    assert (qv == qv[:1]).all(), "every CTA quantizes alike"
    if dynamic:
        q, a_s = quantize_per_token(x if in_mul is None else x.float() * in_mul.reshape(1, -1))
        a_s = a_s.numpy()[:, None]
    else:
        q, a_s = quantize_static(x, in_mul), act.numpy()
    fin = np.ones(M, bool)                                      # static: every row
    if dynamic:
        fin = torch.isfinite(x.float() * (1 if in_mul is None else in_mul)).all(1).numpy()
    assert np.array_equal(qv[0][fin], q.numpy()[fin]), "q bytes differ from the reference"
    assert (out.count[:M * N] == 1).all() and not out.count[M * N:].any(), "every output stored once"
    exact = q.long().numpy() @ w.long().numpy().T
    b_row = np.zeros((1, N), np.float32) if bias is None else bias.float().numpy()[None]
    ref = scaled(exact, a_s, w_scale.numpy()[None], b_row, KIND[x.dtype])
    assert np.isnan(ref[~fin]).all() and not np.isnan(ref[fin]).any()
    assert np.array_equal(out.v[:M * N].reshape(M, N), ref, equal_nan=True), "output differs from the reference"


MODES = ["dynamic", "dynamic_smooth", "static_tensor", "static_channel"]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def run_case(M, N, K, dtype, mode, seed, bias_dtype, pad, variant=None, k=KERNEL):
    per16 = 16 // torch.tensor([], dtype=dtype).element_size()
    args = decode_data(M, N, K, dtype, mode, seed, bias_dtype, K + per16 * pad, K + 16 * (1 + pad % 2))
    res = fused(*args, mode.startswith("dynamic"), variant=variant, k=k)
    check(res, *args, mode.startswith("dynamic"))
    return res[1]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("M", [1, 5, 8, 9, 16])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f16", "bf16", "f32"])
def test_fused_matches_reference(dtype, M, mode):
    K = 1072 if M % 2 else 208                        # 17 blocks, the last 3 of 4 chunks; 4 blocks, 1 chunk
    bias_dtype = [None, torch.float16, torch.float32][(M + MODES.index(mode)) % 3]
    variant = run_case(M, 48 if M in (5, 16) else 32, K, dtype, mode, M + 7 * MODES.index(mode), bias_dtype, M % 3)
    assert variant == ((1 if M <= 8 else 2), (8 if K >= 1024 else 4))


@pytest.mark.parametrize("variant", [(1, 4), (1, 8), (2, 4), (2, 8)], ids=lambda v: f"{v[0]}x{v[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=["f16", "bf16", "f32"])
def test_forced_variants_multi_trip(dtype, variant):
    # 34 blocks: the b0 loop takes 2 (8 warps x 4 blocks) or 3 trips (4 x 4, fp32's 8 x 2 / 4 x 2).
    mode = MODES[(variant[0] + variant[1] + DTYPES.index(dtype)) % 4]
    run_case(5 if variant[0] == 1 else 9, 32, 2160, dtype, mode, sum(variant), torch.float32, 1, variant=variant)


@pytest.mark.parametrize("mode", MODES)
def test_k_zero_gives_bias(mode):
    # K == 0: no load, s_scale 1; static with in_mul_len 1, or 0 (m0 never read: an empty in_mul buffer).
    x, w = torch.empty(3, 0, dtype=torch.bfloat16), torch.empty(32, 0, dtype=torch.int8)
    bias, w_scale = torch.randn(32).to(torch.float16), torch.rand(32)
    in_mul = {"static_tensor": torch.tensor([2.0]), "static_channel": torch.empty(0)}.get(mode)
    out, _, _ = fused(x, w, in_mul, torch.tensor([0.5]), w_scale, bias, mode.startswith("dynamic"))
    assert np.array_equal(out.v[:96].reshape(3, 32), np.broadcast_to(to_out(bias.float().numpy(), "bf16"), (3, 32)))


def test_quantize16_rounds_as_reference():
    # Every half-integer step through the int8 range and past it, -0.0, ties, +-inf, NaN, tiny values.
    v = np.concatenate([np.arange(-260, 261) / 2, np.arange(-40, 41) / 16, [-0.0, 127.49, -127.51, 1e-30, -1e-45],
                        [np.inf, -np.inf, np.nan]]).astype(np.float32)
    v = np.pad(v, (0, -v.size % 16)).reshape(-1, 16)
    for m0 in (1.0, 0.75):
        q = quantize16(v, None, False, np.float32(m0), None, "static", KERNEL).view(np.int8).reshape(-1)
        assert np.array_equal(q, quantize_static(torch.from_numpy(v.reshape(1, -1)), torch.tensor([m0]))[0].numpy())


def test_tiny_row_matches_two_launch_path():
    # A dynamic row with amax < 127 / FLT_MAX: 127 / amax = inf, x * inf = +-inf (and 0 * inf =
    # NaN); the two-launch path (quantize_per_token.cu's saturating __float2int_rn, and
    # fastllm.ref) gives q = +-127 (0 for x == 0). Unclamped, inf + 1.5 * 2^23 = inf would pack
    # inf's low byte 0 (found by this test); the kernel's `tiny` flag runs the clamped main loop.
    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(3, 64, generator=gen) + 1) * 1e-37 * (torch.randint(0, 2, (3, 64), generator=gen) * 2 - 1)
    x[0, 5] = 0                      # 0 * inf = NaN -> q 0
    x[1] *= 1e36                     # an ordinary row beside the tiny ones, through the clamped loop
    w, w_scale = torch.ones(16, 64, dtype=torch.int8), torch.ones(16)
    for smooth in (None, torch.full((64,), 0.5)):
        res = fused(x, w, smooth, None, w_scale, None, True)
        check(res, x, w, smooth, None, w_scale, None, True)


def test_launcher_checks():
    base = dict(dtype=F16, x=4096, ldx=1088, w=8192, ldw=1072, w_scale=64, bias=0, bias_dtype=0, in_mul=256,
                in_mul_len=1072, act_scale=0, dynamic=1, out=512, M=9, N=32, K=1072)
    cases = [({}, OK), (dict(dtype=3), E_DTYPE), (dict(M=17), E_SHAPE), (dict(M=-1), E_SHAPE), (dict(N=40), E_SHAPE),
             (dict(K=1080, in_mul_len=0), E_SHAPE), (dict(K=MAX_K + 16 - MAX_K % 16, in_mul_len=0, ldx=10 ** 6,
                                                        ldw=10 ** 6), E_SHAPE),
             (dict(in_mul_len=1), E_SHAPE), (dict(dynamic=0, in_mul_len=0), E_SHAPE), (dict(in_mul_len=0), OK),
             (dict(dynamic=0, act_scale=4, in_mul_len=1, in_mul=260), OK), (dict(dynamic=0, in_mul_len=1), E_ALIGN),
             (dict(M=0, ldx=0), OK), (dict(N=0), OK), (dict(ldx=1064), E_SHAPE), (dict(ldw=1056), E_SHAPE),
             (dict(x=4104), E_ALIGN), (dict(ldx=1076), E_ALIGN), (dict(dtype=F32, ldx=1076), OK),
             (dict(ldw=1080), E_ALIGN), (dict(out=513), E_ALIGN), (dict(dtype=F32, out=514), E_ALIGN),
             (dict(w_scale=0), E_ALIGN), (dict(in_mul=0), E_ALIGN), (dict(in_mul=260), E_ALIGN),
             (dict(bias=96, bias_dtype=3), E_DTYPE), (dict(bias=98, bias_dtype=F32), E_DTYPE),
             (dict(bias=98, bias_dtype=BF16), OK), (dict(K=0, in_mul_len=0, ldx=1, ldw=1), OK)]
    for mut, code in cases:
        args = dict(base, **mut)
        got, p = launcher(**args)
        assert got == code, mut
    assert launcher(**dict(base, M=1, ldx=8))[1]["ldx"] == 0                      # one row: ldx unused
    assert launcher(**dict(base, K=0, in_mul_len=0, ldw=3))[1]["ldw"] == 0        # K == 0: strides 0
    assert launcher(**dict(base, N=16))[1]["ldw"] == 1072


def _layout(case):
    """(x, b, in_mul, dynamic) for fused_supports / the launcher, CPU tensors."""
    K = 208
    x, b, sm = torch.randn(5, K, dtype=torch.float16), torch.zeros(32, K, dtype=torch.int8), torch.rand(K)
    return {"ok_dynamic": (x, b, None, True), "ok_smooth": (x, b, sm, True), "ok_static": (x, b, sm[:1], False),
            "ok_f32_row_k_plus_4": (padded(x.float(), K + 4, 0.0), b, sm, False),
            "m17": (torch.randn(17, K, dtype=torch.float16), b, None, True),
            "in_mul_misaligned": (x, b, torch.rand(K + 1)[1:], True),
            "in_mul_strided": (x, b, torch.rand(2 * K)[::2], False),
            "x_row_k_plus_4": (padded(x, K + 4, 0.0), b, None, True),
            "x_misaligned": (torch.randn(5 * K + 1, dtype=torch.float16)[1:].view(5, K), b, None, True),
            "x_k_stride": (torch.randn(K, 5, dtype=torch.float16).t(), b, None, True),
            "b_row_k_plus_8": (x, padded(b, K + 8, 0), None, True),
            "static_no_in_mul": (x, b, None, False), "dynamic_one_in_mul": (x, b, sm[:1], True)}[case]


@pytest.mark.parametrize("case", ["ok_dynamic", "ok_smooth", "ok_static", "ok_f32_row_k_plus_4", "m17",
                                  "in_mul_misaligned", "in_mul_strided", "x_row_k_plus_4", "x_misaligned",
                                  "x_k_stride", "b_row_k_plus_8", "static_no_in_mul", "dynamic_one_in_mul"])
def test_glue_supports_matches_launcher(case):
    x, b, in_mul, dynamic = _layout(case)
    w_scale, act = torch.rand(b.shape[0]), torch.tensor([0.5])
    why = fused_supports(x, b, in_mul, w_scale, None, dynamic)
    assert (why is None) == case.startswith("ok"), why
    code, _ = launcher(*glue_args(x, b, in_mul, act, w_scale, None, dynamic, torch.empty(x.shape[0], 32, dtype=x.dtype)))
    if case not in ("x_k_stride", "in_mul_strided"):              # unit strides: the glue's check alone
        assert (code == OK) == (why is None), "the glue and the launcher disagree"


def _tiny_mutant(**mut):
    x = torch.full((2, 64), 1.5e-37)
    x[1] = 2.0
    w = torch.ones(16, 64, dtype=torch.int8)
    check(fused(x, w, None, None, torch.ones(16), None, True, k=dict(KERNEL, **mut)), x, w, None, None,
          torch.ones(16), None, True)


def _mutant(mode="dynamic", dtype=torch.float16, **mut):
    run_case(9, 32, 1072, dtype, mode, 3, torch.float32, 1, k=dict(KERNEL, **mut))


MUTANTS = {
    "a_registers_rows_swapped": lambda: _mutant(a_regs=lambda w0, w8, s: (w0[..., 2 * s], w0[..., 2 * s + 1],
                                                                          w8[..., 2 * s], w8[..., 2 * s + 1])),
    "b_registers_swapped": lambda: _mutant(b_regs=lambda q, s: (q[..., 2 * s + 1], q[..., 2 * s])),
    "magic_2_pow_23": lambda: _mutant(magic=np.float32(2 ** 23)),
    "byte_perm_lo_selector": lambda: _mutant(sel_lo=0x0004),
    "byte_perm_hi_selector": lambda: _mutant("static_channel", sel_hi=0x1054),
    "static_clamp_without_nan_select": lambda: _mutant(
        "static_tensor", clamp=lambda v: np.fmin(np.fmax(v, np.float32(-127)), np.float32(127))),
    "padding_tokens_loaded": lambda: _mutant(x_row_off=lambda m, t_ok, ldx: m * ldx, x_ok=lambda ok, t_ok: ok),
    "k_tail_chunks_loaded": lambda: _mutant(chunk_ok=lambda k, c, K: np.ones(32, bool)),
    "in_mul_chunk_offset_dropped": lambda: _mutant("static_channel", mul_off=lambda blk, c: blk * 64 + 0 * c),
    "nan_inf_flag_dropped": lambda: _mutant(bad_flag=lambda f: np.zeros(f.shape, bool)),
    "amax_without_smooth": lambda: _mutant("dynamic_smooth", amax_mul=lambda f, mul: f),
    "red_channels_swapped": lambda: _mutant(red_rows=lambda g: (g + 8, g)),
    "epilogue_stores_padding_tokens": lambda: _mutant(skip=lambda m, M: np.zeros(m.shape, bool)),
    "tiny_rows_unclamped": lambda: _tiny_mutant(clamps=lambda mode: mode == "static"),
}


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_mutant_kernel_fails(mutant):
    with pytest.raises(AssertionError):
        MUTANTS[mutant]()


# Lines of the sources mirrored above (whitespace-normalized); if one changes, update the mirror.
MIRRORED = {
    "w8a8_decode_kernel.cuh": [
        "constexpr float kRoundMagic = 12582912.f;",
        "const uint32_t lo = __byte_perm(__float_as_uint(a), __float_as_uint(b), 0x0040);",
        "const uint32_t hi = __byte_perm(__float_as_uint(c), __float_as_uint(d), 0x0040);",
        "return __byte_perm(lo, hi, 0x5410);", "if (per_channel) v = __fmul_rn(v, mul[j]);", "v = __fmul_rn(v, inv);",
        "v = __fmul_rn(v, per_channel ? mul[j] : m0);",
        "r[j] = __fadd_rn(v, kRoundMagic);",
        "for (int i = 0; i < 4; ++i) q[i] = pack_int8x4(r[4 * i], r[4 * i + 1], r[4 * i + 2], r[4 * i + 3]);",
        "for (int i = tid; i < p.K / kVec; i += kWarps * 32) {",
        "for (int j = 0; j < kVec; ++j) mul[j] = p.in_mul != nullptr ? __ldg(p.in_mul + k + j) : 1.f;",
        "if (t >= p.M) break;",
        "const quant::Vec<T, kVec> v = *reinterpret_cast<const quant::Vec<T, kVec>*>(x + t * p.ldx + k);",
        "if (p.in_mul != nullptr) f = __fmul_rn(f, mul[j]);", "bad[t] |= !(f <= 3.402823466e38f);",
        "amax[t] = fmaxf(amax[t], f);", "float v = bad[t] ? INFINITY : amax[t];",
        "for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));",
        "for (int w = 0; w < kWarps; ++w) a = fmaxf(a, s_red[w][tid]);",
        "const bool row_bad = !(a <= 3.402823466e38f);",
        "s_scale[tid] = row_bad ? NAN : (a > 0.f ? a / 127.f : 1.f);",
        "constexpr int kUnroll = sizeof(T) == 4 ? kW8A16Unroll / 2 : kW8A16Unroll;",
        "constexpr int kXWords = sizeof(T);", "__shared__ int red[kWarps][kTok][kW8A16RowsPerCta];",
        "const int n0 = blockIdx.x * kW8A16RowsPerCta;",
        "const int8_t* w_g = p.w + static_cast<int64_t>(n0 + g) * p.ldw + 16 * c;",
        "const int64_t w_next8 = 8 * p.ldw;",
        "decode_token_rows<T, kTokenTiles>(p.x, p.ldx, p.M, g, c, x_t, t_ok);",
        "const bool per_channel = p.in_mul_len == p.K && p.in_mul_len > 1;",
        "const float m0 = !kDynamic && !per_channel && p.K > 0 ? p.in_mul[0] : 1.f;",
        "const int nblocks = (p.K + 63) / 64;", "const int k = (b0 + u * kWarps) * 64;",
        "const bool ok = b0 + u * kWarps < nblocks && k + 16 * c < p.K;",
        "decode_block_loads<T, kTokenTiles>(w_g, w_next8, x_t, t_ok, k, ok, wv[u], xv[u]);",
        "const bool tiny = kDynamic && token_scales<T, kTok, kWarps>(p, s_red, s_inv, s_scale);",
        "inv = (tid < p.M && a > 0.f && !row_bad) ? 127.f / a : 0.f;", "s_inv[tid] = inv;",
        "return __syncthreads_or(isinf(inv)) != 0;",
        "if (kMode != kQuantStatic) {", "if (kMode != kQuantDynamic) v = (v != v) ? 0.f : fminf(fmaxf(v, -127.f), 127.f);",
        "main_loop(std::integral_constant<int, kQuantStatic>{});", "} else if (!tiny) {",
        "main_loop(std::integral_constant<int, kQuantDynamic>{});",
        "main_loop(std::integral_constant<int, kQuantDynamicClamped>{});",
        "for (int t = 0; t < kTokenTiles; ++t) inv[t] = kDynamic ? s_inv[g + 8 * t] : 0.f;",
        "for (int b0 = warp; b0 < nblocks; b0 += kWarps * kUnroll) {", "if (b0 != warp) load(b0);",
        "if (blk >= nblocks) break;", "const int k = blk * 64 + 16 * c;",
        "const float4 f = k < p.K ? __ldg(reinterpret_cast<const float4*>(p.in_mul + k + j)) : make_float4(0, 0, 0, 0);",
        "quantize16<T, kMode>(xv[u][t], mul, per_channel, m0, inv[t], q[t]);",
        "const uint32_t a[4] = {w0[2 * s], w8[2 * s], w0[2 * s + 1], w8[2 * s + 1]};",
        "for (int t = 0; t < kTokenTiles; ++t) mma_s8_16832(acc[t], a, q[t][2 * s], q[t][2 * s + 1]);",
        "stash_d_fragments(red[warp], acc, g, c);",
        "for (int i = tid; i < kTok * kW8A16RowsPerCta; i += kWarps * 32) {", "if (m >= p.M) continue;",
        "for (int w = 0; w < kWarps; ++w) v += red[w][m][r];",
        "const float as = kDynamic ? s_scale[m] : p.act_scale[0];",
        "const float y = fmaf(__fmul_rn(__int2float_rn(v), as), p.w_scale[n], bias_at(p.bias, p.bias_dtype, n));",
        "static_cast<T*>(p.out)[static_cast<int64_t>(m) * p.N + n] = from_float<T>(y);",
    ],
    "int8_launcher.cu": [
        "if (!float_dtype(dtype)) return kErrUnsupportedDtype;",
        "if (M < 0 || M > kW8A16MaxM || N < 0 || K < 0 || N > kMaxDim || K > kMaxK || N % 16 || K % 16)",
        "if (dynamic ? (in_mul_len != 0 && in_mul_len != K) : (in_mul_len != 1 && in_mul_len != K)) return kErrBadShape;",
        "if (M == 0 || N == 0) return kOk;", "if (K == 0) ldx = ldw = 0;",
        "if (!aligned(x, 16) || !aligned(w, 16) || (ldx * xb) % 16 || ldw % 16 || !aligned(out, xb)) return kErrMisaligned;",
        "if (w_scale == 0 || !aligned(w_scale, 4)) return kErrMisaligned;",
        "if (in_mul_len > 0 && (in_mul == 0 || !aligned(in_mul, in_mul_len > 1 ? 16 : 4))) return kErrMisaligned;",
        "if (!dynamic && (act_scale == 0 || !aligned(act_scale, 4))) return kErrMisaligned;",
        "p.in_mul = in_mul_len > 0 ? reinterpret_cast<const float*>(in_mul) : nullptr;", "p.ldx = M > 1 ? ldx : 0;",
        "p.ldw = N > 1 ? ldw : K;",
        "if (c.token_tiles == 1) return c.warps == 4 ? run_w8a8_decode<T, 1, 4>(p, s) : run_w8a8_decode<T, 1, 8>(p, s);",
        "return c.warps == 4 ? run_w8a8_decode<T, 2, 4>(p, s) : run_w8a8_decode<T, 2, 8>(p, s);",
        "constexpr int64_t kMaxK = (static_cast<int64_t>(INT_MAX)) / (128 * 128);",
    ],
    "int8_traits.h": [
        "W8A16Choice c{M <= 8 ? 1 : 2, 8};", "if (K < 8 * 64 * 2) c.warps = 4;", "constexpr int kW8A16Unroll = 4;",
        "constexpr int kW8A16RowsPerCta = 16;",
    ],
    "int8_ptx.cuh": [
        "template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }",
        "return __float2bfloat16_rn(v);",
        "const int m = g + 8 * t;", "t_ok[t] = m < M;", "x_t[t] = static_cast<const T*>(x) + (t_ok[t] ? static_cast<int64_t>(m) * ldx : 0) + 16 * c;", "wv[0] = ok ? ld_stream_16(w_g + k) : z;", "wv[1] = ok ? ld_stream_16(w_g + w_next8 + k) : z;", "for (int i = 0; i < static_cast<int>(sizeof(T)); ++i)", "xv[t][i] = ok && t_ok[t] ? __ldg(reinterpret_cast<const uint4*>(x_t[t] + k) + i) : z;",
        "red[8 * t + 2 * c][g] = acc[t][0];", "red[8 * t + 2 * c + 1][g] = acc[t][1];",
        "red[8 * t + 2 * c][g + 8] = acc[t][2];", "red[8 * t + 2 * c + 1][g + 8] = acc[t][3];",
    ],
    "_int8_cuda.py": [
        "x.device.index, _ext.DTYPE_CODES[x.dtype], x.data_ptr(), x.stride(0) if M > 1 else K,",
        "b.data_ptr(), b.stride(0) if N > 1 else K, w_scale.data_ptr(),",
        "in_mul.data_ptr() if in_mul is not None else 0, in_mul.numel() if in_mul is not None else 0,",
        "act_scale.data_ptr() if act_scale is not None else 0, int(dynamic), out.data_ptr(), M, N, K,",
    ],
}


def test_kernel_source_matches_mirror():
    paths = {"w8a8_decode_kernel.cuh": INT8_DIR / "w8a8_decode_kernel.cuh", "int8_launcher.cu": LAUNCHER_SRC,
             "int8_traits.h": TRAITS_SRC, "int8_ptx.cuh": INT8_DIR / "int8_ptx.cuh",
             "_int8_cuda.py": ROOT / "python" / "fastllm" / "ops" / "_int8_cuda.py"}
    assert_mirrored((paths[name], lines) for name, lines in MIRRORED.items())
