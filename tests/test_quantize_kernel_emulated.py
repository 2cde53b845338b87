"""The CUDA activation-quantization kernels (csrc/int8/quantize_per_token.cu, quantize_static.cu),
emulated thread by thread on CPU.

The kernels have never run on a GPU. This file mirrors their constants, index math and fp32
arithmetic in NumPy, vectorized over CTAs x threads:

quantize_per_token (one CTA of kThreads = 256 per row): the launcher's checks and its vec_ok choice
(16-byte Vec<T, 16 / sizeof(T)> loads when x, the row stride, K and q allow them, scalar otherwise),
the row pointers xr = x + row * stride_x / qr = q + row * K, both per-thread strided loops over
nvec = K / VEC vectors, pass 1's per-thread fabsf / fmaxf and NaN-inf flag, block_max (5 rounds of
__shfl_xor_sync within each warp, lane 0 of each warp to smem[warp], lanes < kWarps read it back,
5 more rounds), row_bad, inv = 127.f / amax (IEEE division), thread 0's scale store, and pass 2's
__float2int_rn(__fmul_rn(x, inv)) clamped to [-127, 127] with its Vec<int8_t, VEC> stores.
quantize_static: the launcher's checks, vec_ok, blocks = min(ceil(M * nvec / 256), 8192), the
grid-stride loop (row = i / nvec, col = (i - row * nvec) * VEC), mul0 / per-channel
__ldg(mul + col + j), __fmul_rn, the NaN test before fminf / fmaxf, __float2int_rn, the stores.
And the Python glue that calls them (python/fastllm/ops/quantize.py, ops/_int8_cuda.py): the row
stride passed (x.stride(0) if M > 1 else K), data_ptr with the storage offset, fresh q / scale.

Device memory is modelled per allocation (byte address, element size): every load and store is
checked for alignment (the Vec's alignas(sizeof(T) * N)), for bounds, and loads for reading only
elements of the (M, K) view (row padding is NaN poison and not readable), and every store is counted.
fp32 arithmetic is np.float32 (one IEEE rounding per operation, no flush to zero, as nvcc without
--use_fast_math compiles it); to_float of fp16 / bf16 is exact (torch's .float()).

Proven here, given that mirror (fp16, bf16, fp32; M in {1, 2, 3, 4, 5, 6, 7, 12, 24, 33}; K in
{0, 1, 8, 13, 16, 17, 24, 64, 96, 200, 521, 600, 1031, 2056, 4104}, i.e. 0 to 3 loop trips per
thread, partial last trips, and K tails that force the scalar path; contiguous rows, row strides
padded to keep or to break 16-byte alignment (and aligned strides with a K tail), a storage offset
of one element, broadcast rows (stride 0), M == 1 with the glue's stride and with a negative one,
a misaligned q):
  * every q byte and every scale is written exactly once, nothing outside q / scale, every load
    inside the view's own elements, every vector load / store aligned; block_max writes each
    smem slot once before any read, and leaves every thread of the CTA with the row maximum;
  * q and scale are bit-identical to python/fastllm/ref/quantize.py on fresh random rows and on
    all-zero rows (with -0.0), one-huge-outlier rows, rows whose largest magnitude is negative,
    rows at the dtype's max, rows with NaN / +inf / -inf (scale NaN, q 0), tiny rows (fp32 / bf16
    amax < 127 / FLT_MAX, where 127 / amax overflows to inf; fp16 subnormals), and ties: rows with
    amax 127 (inv 1) or 63.5 (inv 2) whose products are exactly k + 0.5 (round half to even);
  * quantize_static: q bit-identical to python/fastllm/ref/int8.py quantize_static for per-tensor
    and per-channel multipliers (from ops.int8_static.input_multiplier, with and without smooth
    factors, and power-of-two ones that keep .5 ties exact), NaN / +-inf / out-of-range / .5
    values, the same layouts, K == 1 (mul_len 1), and one fp32 case of 2^21 + 1 elements where
    the 8192-block cap makes the grid-stride loop take a second trip; again every byte once,
    loads / stores aligned and in bounds;
  * the launchers' early returns and error codes (M == 0, K == 0, negative sizes / strides, bad
    mul_len, mul == 0, unknown dtype) as mirrored.
Not proven: that the .cu says what is mirrored here (by hand; test_kernel_source_matches_mirror
checks that the mirrored lines are still in the sources verbatim, whitespace-normalized, so an edit
of them fails here until the mirror is updated); the hardware semantics taken as given:
__shfl_xor_sync (full mask, width 32), __syncthreads as a barrier, and cvt.rni.s32.f32
(__float2int_rn) rounding half to even, saturating to the int32 range, NaN -> 0. The per-token
kernel relies on that last one: a NaN / inf row's q is __float2int_rn(x * 0) = __float2int_rn(NaN)
and a tiny row's zeros give __float2int_rn(0 * inf); the CUDA Math API only calls out-of-range
inputs "undefined", the PTX cvt semantics give 0 (the static kernel filters NaN itself). Also not
covered: the reference's own NaN -> int8 cast in those rows (torch CPU gives 0 here), launch
limits, L2 residency between the passes, speed.
test_mutant_*_fails shows that deliberately wrong kernels (reduction width, rounding, scale
formula, row stride, indexing, NaN handling, grid-stride loop) make these checks fail.
"""
import pathlib
import re

import numpy as np
import pytest
import torch

from fastllm import _ext, ref
from helpers import assert_mirrored, norm_source
from fastllm.ops.int8_static import input_multiplier

ROOT = pathlib.Path(__file__).resolve().parents[1]
INT8_DIR = ROOT / "csrc" / "int8"
PER_TOKEN_SRC = INT8_DIR / "quantize_per_token.cu"
STATIC_SRC = INT8_DIR / "quantize_static.cu"
CONVERT_SRC = INT8_DIR / "quantize_convert.cuh"
COMMON_SRC = ROOT / "csrc" / "common" / "common.h"
CMAKE_SRC = ROOT / "CMakeLists.txt"
GLUE_PER_TOKEN = ROOT / "python" / "fastllm" / "ops" / "quantize.py"
GLUE_STATIC = ROOT / "python" / "fastllm" / "ops" / "_int8_cuda.py"

K_THREADS = 256                          # kThreads (both kernels)
K_WARPS = K_THREADS // 32                # kWarps
SHFL_OFFSETS = (16, 8, 4, 2, 1)          # for (int off = 16; off > 0; off >>= 1)
STATIC_MAX_BLOCKS = 8192                 # std::min<int64_t>(..., 8192)
FLT_MAX_LIT = np.float32(3.402823466e38)  # the literal 3.402823466e38f
K_OK, K_ERR_UNSUPPORTED_DTYPE, K_ERR_BAD_SHAPE = 0, 10001, 10002
DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}   # enum DType (common.h)
ITEMSIZE = {0: 2, 1: 2, 2: 4}            # sizeof(__half), sizeof(__nv_bfloat16), sizeof(float)
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
BASE_X, BASE_Q, BASE_S, BASE_MUL = 1 << 20, 1 << 24, 1 << 26, 1 << 27   # allocations, 512-aligned
F32 = np.float32


# ---------------------------------------------------------------------------------------------
# Device memory and the few PTX-level operations the kernels use.

class Buffer:
    """One device allocation of `size` elements of `itemsize` bytes at byte address `addr`.
    `readable` marks the elements a kernel may load; `writes` counts the stores per element."""

    def __init__(self, name, addr, itemsize, values, readable=None):
        self.name, self.addr, self.itemsize, self.values = name, addr, itemsize, values
        self.size = len(values)
        self.readable = np.ones(self.size, bool) if readable is None else readable
        self.writes = np.zeros(self.size, np.int64)

    def _index(self, elem, vec, what):
        elem = np.asarray(elem, np.int64).reshape(-1)
        addr = self.addr + elem * self.itemsize
        bad = addr % (vec * self.itemsize) != 0
        assert not bad.any(), f"misaligned {vec * self.itemsize}-byte {what} of {self.name} at {addr[bad][:4]}"
        idx = elem[:, None] + np.arange(vec)
        oob = (idx < 0) | (idx >= self.size)
        assert not oob.any(), f"{what} outside {self.name}: elements {idx[oob][:4]} of {self.size}"
        return idx

    def load(self, elem, vec):
        idx = self._index(elem, vec, "load")
        assert self.readable[idx].all(), f"load of {self.name} elements outside the tensor: {idx[~self.readable[idx]][:4]}"
        return self.values[idx]

    def store(self, elem, vec, vals):
        idx = self._index(elem, vec, "store")
        np.add.at(self.writes, idx.reshape(-1), 1)
        self.values[idx] = vals


def float2int_rn(y):
    """__float2int_rn (cvt.rni.s32.f32): round half to even, saturate to int32, NaN -> 0."""
    r = np.rint(np.asarray(y, np.float64))
    return np.where(np.isnan(r), 0, np.clip(r, -2.0 ** 31, 2.0 ** 31 - 1)).astype(np.int64)


def float2int_rz(y):     # mutant: truncation
    r = np.trunc(np.asarray(y, np.float64))
    return np.where(np.isnan(r), 0, np.clip(r, -2.0 ** 31, 2.0 ** 31 - 1)).astype(np.int64)


def float2int_half_away(y):     # mutant: round half away from zero (C's roundf)
    y = np.asarray(y, np.float64)
    r = np.sign(y) * np.floor(np.abs(y) + 0.5)
    return np.where(np.isnan(r), 0, np.clip(r, -2.0 ** 31, 2.0 ** 31 - 1)).astype(np.int64)


def shfl_xor(v, off):
    """__shfl_xor_sync(0xffffffff, v, off) for every warp of every CTA: v is (CTAs, kThreads)."""
    lane = np.arange(v.shape[1])
    return v[:, lane ^ off]      # off < 32: the partner stays in the same warp


# ---------------------------------------------------------------------------------------------
# quantize_per_token.cu

def block_max(v, mut):
    """block_max(v, smem) for all CTAs at once; returns (CTAs, kThreads)."""
    offsets = mut.get("shfl_offsets", SHFL_OFFSETS)
    n_cta = v.shape[0]
    tid = np.arange(K_THREADS)
    for off in offsets:
        v = np.fmax(v, shfl_xor(v, off))
    warp, lane = tid // 32, tid % 32
    smem = np.zeros((n_cta, K_WARPS), F32)
    written = np.zeros(K_WARPS, np.int64)
    writers = lane == 0                              # if (lane == 0) smem[warp] = v;
    assert ((warp[writers] >= 0) & (warp[writers] < K_WARPS)).all()
    np.add.at(written, warp[writers], 1)
    smem[:, warp[writers]] = v[:, writers]
    assert (written == 1).all(), "each smem slot written once"          # then __syncthreads()
    n_read = mut.get("smem_warps", K_WARPS)
    readers = lane < n_read                          # v = lane < kWarps ? smem[lane] : 0.f;
    assert (lane[readers] < K_WARPS).all() and (written[lane[readers]] == 1).all()
    v = np.where(readers[None, :], smem[:, np.minimum(lane, K_WARPS - 1)], F32(0))
    for off in offsets:
        v = np.fmax(v, shfl_xor(v, off))
    return v


def per_token_kernel(grid, x, x0, stride_x, q, q0, scale, s0, K, VEC, mut):
    """quantize_per_token_kernel<T, VEC><<<grid, kThreads>>>: all CTAs x threads at once.
    x0 / q0 / s0: the element index of the kernel's pointer argument inside its allocation."""
    row = np.arange(grid, dtype=np.int64)[:, None]               # const int64_t row = blockIdx.x;
    tid = np.arange(K_THREADS, dtype=np.int64)[None, :]
    xr = x0 + row * (stride_x + mut.get("row_stride_delta", 0))  # const T* xr = x + row * stride_x;
    qr = q0 + row * K                                            # int8_t* qr = q + row * K;
    nvec = K // VEC
    shape = (grid, K_THREADS)
    amax = np.zeros(shape, F32)
    bad = np.zeros(shape, bool)
    # Pass 1. Trip t of `for (i = threadIdx.x; i < nvec; i += kThreads)` is i = t * kThreads + tid.
    for t0 in range(0, nvec, K_THREADS):
        i = np.broadcast_to(t0 + tid, shape)
        cta, th = np.nonzero(i < nvec)
        vx = x.load(xr[cta, 0] + i[cta, th] * VEC, VEC)
        for j in range(VEC):
            f = np.abs(vx[:, j])
            bad[cta, th] |= ~(f <= FLT_MAX_LIT)
            if mut.get("amax_sum"):
                amax[cta, th] = amax[cta, th] + f
            else:
                amax[cta, th] = np.fmax(amax[cta, th], f)
    if mut.get("no_bad_flag"):
        bad[:] = False
    amax = block_max(np.where(bad, F32(np.inf), amax), mut)
    assert (amax == amax[:, :1]).all(), "block_max: every thread holds the block's max"
    row_bad = ~(amax <= FLT_MAX_LIT)
    ok = (amax > 0) & ~row_bad
    safe = np.where(ok, amax, F32(1))
    if mut.get("inv_by_reciprocal"):
        inv = np.where(ok, F32(127) * (F32(1) / safe), F32(0))
    else:
        inv = np.where(ok, F32(127) / safe, F32(0))
    if mut.get("scale_by_reciprocal"):
        sc = np.where(row_bad, F32(np.nan), np.where(amax > 0, amax * (F32(1) / F32(127)), F32(1)))
    else:
        sc = np.where(row_bad, F32(np.nan), np.where(amax > 0, amax / F32(127), F32(1)))
    assert inv.dtype == np.float32 and sc.dtype == np.float32
    scale.store(s0 + row[:, 0], 1, sc[:, 0:1])       # if (threadIdx.x == 0) scale[row] = ...
    # Pass 2.
    to_int = mut.get("to_int", float2int_rn)
    for t0 in range(0, nvec, K_THREADS):
        i = np.broadcast_to(t0 + tid, shape)
        cta, th = np.nonzero(i < nvec)
        vx = x.load(xr[cta, 0] + i[cta, th] * VEC, VEC)
        prod = vx * inv[cta, th][:, None]            # __fmul_rn: one fp32 rounding
        assert prod.dtype == np.float32
        r = to_int(prod)
        vq = np.clip(r, -127, 127).astype(np.int8)   # max(-127, min(127, r))
        q.store(qr[cta, 0] + i[cta, th] * VEC, VEC, vq)


def launch_per_token(x, x0, dtype, M, K, stride_x, q, scale, mut):
    """quantize_per_token() and launch<T>(): returns (status, VEC or None)."""
    if M < 0 or K < 0 or M > 0x7fffffff or (M > 1 and stride_x < 0):
        return K_ERR_BAD_SHAPE, None
    if M == 0:
        return K_OK, None
    if dtype not in ITEMSIZE:
        return K_ERR_UNSUPPORTED_DTYPE, None
    size = ITEMSIZE[dtype]
    kvec = 16 // size                                            # constexpr int kVec = 16 / sizeof(T);
    x_addr = x.addr + x0 * size
    vec_ok = (x_addr % 16 == 0 and (stride_x * size) % 16 == 0
              and (mut.get("ignore_k_tail") or K % kvec == 0) and q.addr % kvec == 0)
    vec = kvec if vec_ok else 1
    per_token_kernel(M, x, x0, stride_x, q, 0, scale, 0, K, vec, mut)
    return K_OK, vec


# ---------------------------------------------------------------------------------------------
# quantize_static.cu

def static_kernel(grid, x, x0, stride_x, mul, per_channel, q, M, K, VEC, mut):
    """quantize_static_kernel<T, VEC><<<grid, kThreads>>>: every thread of the grid at once, one
    grid-stride trip at a time."""
    nvec = K // VEC
    total = M * nvec
    n_threads = grid * K_THREADS
    gtid = np.arange(n_threads, dtype=np.int64)     # blockIdx.x * kThreads + threadIdx.x
    mul0 = F32(0) if per_channel else mul.load(np.zeros(n_threads, np.int64), 1)[:, 0]   # every thread
    i = gtid
    while True:
        act = i < total
        if not act.any():
            break
        ii = i[act]
        row = ii // (K if mut.get("row_from_k") else nvec)
        col = (ii - row * nvec) * VEC
        vx = x.load(x0 + row * stride_x + col, VEC)
        if per_channel:
            j = np.zeros(VEC, np.int64) if mut.get("mul_no_j") else np.arange(VEC)
            m = mul.load((col[:, None] + j).reshape(-1), 1).reshape(-1, VEC)      # __ldg(mul + col + j)
        else:
            m = mul0[act][:, None]
        y = vx * m                                   # __fmul_rn
        assert y.dtype == np.float32
        if mut.get("no_nan_check"):                  # fminf / fmaxf drop NaN
            y = np.fmin(np.fmax(y, F32(-127)), F32(127))
        else:
            y = np.where(y != y, F32(0), np.fmin(np.fmax(y, F32(-127)), F32(127)))
        vq = mut.get("to_int", float2int_rn)(y).astype(np.int8)
        q.store(row * K + col, VEC, vq)
        if mut.get("no_grid_stride"):
            break
        i = i + n_threads                            # i += gridDim.x * kThreads


def launch_static(x, x0, dtype, M, K, stride_x, mul, mul_len, q, mut, max_blocks=STATIC_MAX_BLOCKS):
    """quantize_static() and launch<T>(): returns (status, VEC or None, grid or None)."""
    if M < 0 or K < 0 or (M > 1 and stride_x < 0) or (mul_len != 1 and mul_len != K):
        return K_ERR_BAD_SHAPE, None, None
    if M == 0 or K == 0:
        return K_OK, None, None
    if mul is None:                                  # mul == 0 (a null pointer)
        return K_ERR_BAD_SHAPE, None, None
    if dtype not in ITEMSIZE:
        return K_ERR_UNSUPPORTED_DTYPE, None, None
    per_channel = mul_len == K and K > 1
    size = ITEMSIZE[dtype]
    kvec = 16 // size
    x_addr = x.addr + x0 * size
    vec_ok = x_addr % 16 == 0 and (stride_x * size) % 16 == 0 and K % kvec == 0 and q.addr % kvec == 0
    vec = kvec if vec_ok else 1
    blocks = min((M * (K // vec) + K_THREADS - 1) // K_THREADS, max_blocks)
    grid = max(blocks, 1)
    static_kernel(grid, x, x0, stride_x, mul, per_channel, q, M, K, vec, mut)
    return K_OK, vec, grid


# ---------------------------------------------------------------------------------------------
# Inputs: an (M, K) view into a flat storage whose padding is NaN poison.

def make_view(vals, dtype, layout):
    """vals (M, K) float64 -> (storage, view) laid out as `layout` says."""
    M, K = vals.shape
    isz = torch.empty((), dtype=dtype).element_size()
    offset = 1 if layout == "offset1" else 0
    kvec = 16 // isz
    # pad_vec: a 16-byte multiple past K (vector loads stay legal when K allows them); pad_scalar: odd
    stride = {"pad_vec": -(-K // kvec) * kvec + kvec, "pad_scalar": K + 3, "bcast": 0}.get(layout, K)
    rows = 1 if layout == "bcast" else M
    n = offset + ((rows - 1) * stride + K if rows > 0 else 0)
    storage = torch.full((n + 16,), float("nan"), dtype=dtype)       # trailing poison too
    view = storage.as_strided((M, K), (stride, 1), offset)
    if layout == "bcast":
        storage[offset:offset + K] = vals[0].to(dtype)
    elif M and K:
        view.copy_(vals.to(dtype))
    return storage, view


def x_buffer(storage, view):
    """The x allocation as the kernel sees it: storage values as fp32 (to_float, exact), readable
    only where the view has elements."""
    values = storage.float().numpy().copy()
    readable = np.zeros(len(values), bool)
    M, K = view.shape
    for r in range(M):
        start = view.storage_offset() + r * view.stride(0)
        readable[start:start + K] = True
    return Buffer("x", BASE_X, storage.element_size(), values, readable)


def glue_stride(view):
    M, K = view.shape
    return view.stride(0) if M > 1 else K            # x.stride(0) if M > 1 else K


def run_per_token(view, storage, mut=None, q_addr=BASE_Q):
    """ops/quantize.py _cuda(x) on the emulated device: returns (q, scale, VEC, status)."""
    M, K = view.shape
    x = x_buffer(storage, view)
    q = Buffer("q", q_addr, 1, np.full(M * K, 0x5A, np.int8))        # torch.empty: garbage
    scale = Buffer("scale", BASE_S, 4, np.full(M, 12345.0, F32))
    with np.errstate(all="ignore"):          # inf / NaN arithmetic is the point
        status, vec = launch_per_token(x, view.storage_offset(), DTYPE_CODES[view.dtype], M, K, glue_stride(view),
                                       q, scale, mut or {})
    assert status == K_OK
    assert (q.writes == 1).all(), f"q bytes written {np.unique(q.writes)} times"
    assert (scale.writes == 1).all(), f"scales written {np.unique(scale.writes)} times"
    return q.values.reshape(M, K), scale.values, vec


def assert_per_token_matches(view, storage, mut=None, q_addr=BASE_Q):
    qe, se, vec = run_per_token(view, storage, mut, q_addr)
    rq, rs = ref.quantize_per_token(view)
    rq, rs = rq.numpy(), rs.numpy()
    assert np.array_equal(qe, rq), f"q differs at {np.argwhere(qe != rq)[:5].tolist()}"
    assert np.array_equal(np.isnan(se), np.isnan(rs)), "NaN scales differ"
    fin = ~np.isnan(rs)
    assert np.array_equal(se[fin].view(np.uint32), rs[fin].view(np.uint32)), \
        f"scale bits differ in rows {np.nonzero(fin)[0][se[fin].view(np.uint32) != rs[fin].view(np.uint32)]}"
    return vec


def run_static(view, storage, in_mul, mut=None, max_blocks=STATIC_MAX_BLOCKS):
    """ops/_int8_cuda.py quantize_static_cuda(x, in_mul) on the emulated device."""
    M, K = view.shape
    if M == 0 or K == 0:                             # the glue returns before calling the kernel
        return np.zeros((M, K), np.int8), None, None
    in_mul = in_mul.reshape(-1).contiguous()         # in_mul = in_mul.reshape(-1).contiguous()
    x = x_buffer(storage, view)
    mul = Buffer("mul", BASE_MUL, 4, in_mul.numpy().astype(F32).copy())
    q = Buffer("q", BASE_Q, 1, np.full(M * K, 0x5A, np.int8))
    with np.errstate(all="ignore"):
        status, vec, grid = launch_static(x, view.storage_offset(), DTYPE_CODES[view.dtype], M, K,
                                          glue_stride(view), mul, in_mul.numel(), q, mut or {}, max_blocks)
    assert status == K_OK
    assert (q.writes == 1).all(), f"q bytes written {np.unique(q.writes)} times"
    assert (mul.writes == 0).all()
    return q.values.reshape(M, K), vec, grid


def assert_static_matches(view, storage, in_mul, mut=None, max_blocks=STATIC_MAX_BLOCKS):
    qe, vec, grid = run_static(view, storage, in_mul, mut, max_blocks)
    rq = ref.quantize_static(view, in_mul).numpy()
    assert np.array_equal(qe, rq), f"q differs at {np.argwhere(qe != rq)[:5].tolist()}"
    return vec, grid


BIG = {torch.float16: 6.0e4, torch.bfloat16: 1.0e30, torch.float32: 1.0e30}
ROW_KINDS = ["randn", "zero", "outlier", "ties127", "ties63_5", "nan", "inf", "neginf", "negmax",
             "tiny", "dtype_max", "randn"]


def per_token_values(M, K, dtype, seed):
    """(M, K) float64 rows, row r of kind ROW_KINDS[(r + seed) % len]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g, dtype=torch.float64)
    x *= 10.0 ** (torch.rand(M, 1, generator=g, dtype=torch.float64) * 4 - 2)
    if K == 0:
        return x
    for r in range(M):
        kind = ROW_KINDS[(r + seed) % len(ROW_KINDS)]
        p = int(torch.randint(K, (1,), generator=g))
        sign = 1.0 if torch.rand(1, generator=g).item() < 0.5 else -1.0
        if kind == "zero":
            x[r] = 0.0
            x[r, ::2] = -0.0
        elif kind == "outlier":
            x[r] *= 1e-3
            x[r, p] = sign * BIG[dtype]
        elif kind == "ties127":        # amax 127: inv = 1, every k + 0.5 a tie
            x[r] = torch.randint(-127, 127, (K,), generator=g).double() + 0.5
            x[r, p] = sign * 127.0
        elif kind == "ties63_5":       # amax 63.5: inv = 2, multiples of 0.25 give ties
            x[r] = torch.randint(-254, 255, (K,), generator=g).double() * 0.25
            x[r, p] = sign * 63.5
        elif kind == "nan":
            x[r, p] = float("nan")
        elif kind == "inf":
            x[r, p] = float("inf")
        elif kind == "neginf":
            x[r, p] = float("-inf")
        elif kind == "negmax":
            x[r, p] = -4.0 * x[r].abs().max() - 1.0
        elif kind == "tiny":           # fp32 / bf16: 127 / amax overflows; fp16: subnormals
            x[r] *= 1e-38 if dtype != torch.float16 else 1e-6
            x[r, ::3] = 0.0
        elif kind == "dtype_max":
            x[r, p] = sign * torch.finfo(dtype).max
    return x


# M, K, layout: 0 to 3 trips per thread, K tails, both paths, strided / offset / broadcast rows.
PER_TOKEN_CASES = [(1, 1, "contig"), (1, 8, "contig"), (1, 13, "offset1"), (2, 24, "contig"), (3, 17, "contig"),
                   (5, 2056, "contig"), (4, 4104, "pad_vec"), (7, 1031, "pad_scalar"), (2, 600, "pad_scalar"),
                   (33, 96, "contig"), (6, 200, "offset1"), (4, 64, "bcast"), (3, 64, "q_misaligned"),
                   (2, 0, "contig"), (12, 64, "pad_vec"), (3, 1031, "pad_vec")]


def expect_vec(dtype, K, layout):
    kvec = 16 // torch.empty((), dtype=dtype).element_size()
    return kvec if layout in ("contig", "pad_vec", "bcast") and K % kvec == 0 else 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", PER_TOKEN_CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}")
def test_per_token_emulated_matches_reference(dtype, case):
    M, K, layout = case
    seed = 1000 * M + K
    vals = per_token_values(M, K, dtype, seed)
    storage, view = make_view(vals, dtype, "contig" if layout == "q_misaligned" else layout)
    q_addr = BASE_Q + 1 if layout == "q_misaligned" else BASE_Q
    vec = assert_per_token_matches(view, storage, q_addr=q_addr)
    assert vec == expect_vec(dtype, K, layout)


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_token_all_row_kinds(dtype):
    # Every row kind, in both paths, with 2 or 3 trips per thread (tail trip partial).
    M = 2 * len(ROW_KINDS)
    for K, layout in ((2056, "contig"), (521, "pad_scalar")):
        vals = per_token_values(M, K, dtype, seed=7)
        storage, view = make_view(vals, dtype, layout)
        assert assert_per_token_matches(view, storage) == expect_vec(dtype, K, layout)


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_token_rounds_ties_to_even(dtype):
    # amax 127 -> inv 1: products are the half-integers themselves; RNE must pick the even side.
    K = 256
    row = torch.arange(K, dtype=torch.float64) - 127.5       # -127.5 .. 127.5 would set amax 127.5
    row = row.clamp(-126.5, 126.5)
    row[0] = 127.0
    storage, view = make_view(row[None, :], dtype, "contig")
    qe, se, _ = run_per_token(view, storage)
    assert se[0] == 1.0
    x = view.float().numpy()[0]
    ties = x[1:] - np.floor(x[1:]) == 0.5
    assert ties.sum() > 100
    assert np.array_equal(qe[0, 1:][ties], np.rint(x[1:][ties]).astype(np.int8))
    assert (qe[0, 1:][ties] % 2 == 0).all()
    assert_per_token_matches(view, storage)


def test_per_token_tiny_rows_overflow_inv_like_reference():
    # 0 < amax < 127 / FLT_MAX: inv = 127 / amax is +inf in fp32, so every non-zero element maps to
    # +-127 (saturating cvt) and zeros to __float2int_rn(0 * inf) = 0; the reference does the same
    # (its NaN -> int8 cast gives 0 on this CPU). Emulation == reference; the behaviour is shared.
    row = torch.tensor([[2e-37, 1e-45, 0.0, -3e-38, 0.0, 1e-40, -1e-44, 0.0]], dtype=torch.float64)
    storage, view = make_view(row, torch.float32, "contig")
    qe, se, _ = run_per_token(view, storage)
    assert qe.tolist() == [[127, 127, 0, -127, 0, 127, -127, 0]]
    assert_per_token_matches(view, storage)


def test_block_max_model():
    # The row max at every one of the 256 threads (one CTA each) reaches every thread.
    v = np.random.default_rng(0).random((K_THREADS, K_THREADS)).astype(F32)
    v[np.arange(K_THREADS), np.arange(K_THREADS)] = F32(2)
    assert (block_max(v, {}) == F32(2)).all()
    assert (block_max(np.zeros((1, K_THREADS), F32), {}) == 0).all()


def test_per_token_launcher_edges():
    dummy = Buffer("dummy", BASE_Q, 1, np.zeros(1, np.int8))
    assert launch_per_token(dummy, 0, 0, -1, 8, 8, dummy, dummy, {}) == (K_ERR_BAD_SHAPE, None)
    assert launch_per_token(dummy, 0, 0, 2, -1, 8, dummy, dummy, {}) == (K_ERR_BAD_SHAPE, None)
    assert launch_per_token(dummy, 0, 0, 2 ** 31, 8, 8, dummy, dummy, {}) == (K_ERR_BAD_SHAPE, None)
    assert launch_per_token(dummy, 0, 0, 2, 8, -8, dummy, dummy, {}) == (K_ERR_BAD_SHAPE, None)
    assert launch_per_token(dummy, 0, 0, 0, 8, 8, dummy, dummy, {}) == (K_OK, None)   # nothing launched
    assert launch_per_token(dummy, 0, 3, 1, 8, 8, dummy, dummy, {}) == (K_ERR_UNSUPPORTED_DTYPE, None)
    # M == 1 with a negative stride is allowed: row 0 is the only row read.
    vals = per_token_values(1, 16, torch.float16, 3)
    storage, view = make_view(vals, torch.float16, "contig")
    x = x_buffer(storage, view)
    q = Buffer("q", BASE_Q, 1, np.zeros(16, np.int8))
    s = Buffer("scale", BASE_S, 4, np.zeros(1, F32))
    assert launch_per_token(x, 0, 0, 1, 16, -16, q, s, {}) == (K_OK, 8)      # -32 bytes % 16 == 0
    assert (q.writes == 1).all() and (s.writes == 1).all()
    assert np.array_equal(q.values, ref.quantize_per_token(view)[0].numpy()[0])
    # K == 0: one CTA per row still stores scale 1, as the reference.
    storage, view = make_view(torch.zeros(3, 0, dtype=torch.float64), torch.float32, "contig")
    qe, se, _ = run_per_token(view, storage)
    assert qe.shape == (3, 0) and se.tolist() == [1.0, 1.0, 1.0]
    assert_per_token_matches(view, storage)


# ---------------------------------------------------------------------------------------------
# quantize_static

def static_values(M, K, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g, dtype=torch.float64) * 60
    specials = [float("nan"), float("inf"), float("-inf"), 127.5, -127.5, 126.5, -126.5, 0.5, -0.5, 1.5, 2.5,
                -2.5, BIG[dtype], -BIG[dtype], -0.0, 0.0, 127.0, -128.0, 3e-41]
    flat = x.view(-1)
    if flat.numel():
        pos = torch.randperm(flat.numel(), generator=g)[:min(flat.numel(), 3 * len(specials))]
        for n, p in enumerate(pos.tolist()):
            flat[p] = specials[n % len(specials)]
    # a row of half-integers: ties under a multiplier of 1 (or of 2 for quarter values)
    if M > 1 and K:
        x[1] = torch.randint(-140, 140, (K,), generator=g).double() * 0.5
    return x


def static_multiplier(K, kind, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "unit":             # act_scale 1 -> in_mul 1: the products are x itself (ties kept)
        return input_multiplier(torch.tensor([1.0]), None)
    if kind == "tensor":           # a calibrated per-tensor scale, 1 / act_scale
        return input_multiplier(torch.tensor([float(torch.rand(1, generator=g)) * 0.9 + 0.1]), None)
    if kind == "channel":          # SmoothQuant: smooth / act_scale, per input channel
        smooth = (torch.rand(K, generator=g) * 3.75 + 0.25).float()
        return input_multiplier(torch.tensor([0.37]), smooth)
    if kind == "channel_pow2":     # per channel, but exact: .5 ties survive
        smooth = 2.0 ** torch.randint(-1, 2, (K,), generator=g).float()
        return input_multiplier(torch.tensor([1.0]), smooth)
    raise AssertionError(kind)


STATIC_CASES = [(1, 1, "contig"), (1, 8, "contig"), (1, 13, "offset1"), (2, 24, "contig"), (3, 17, "contig"),
                (5, 2056, "contig"), (4, 4104, "pad_vec"), (7, 1031, "pad_scalar"), (33, 96, "contig"),
                (6, 200, "offset1"), (4, 64, "bcast"), (2, 0, "contig"), (0, 16, "contig")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mul_kind", ["unit", "tensor", "channel", "channel_pow2"])
def test_static_emulated_matches_reference(dtype, mul_kind):
    for M, K, layout in STATIC_CASES:
        seed = 1000 * M + K
        vals = static_values(M, K, dtype, seed)
        storage, view = make_view(vals, dtype, layout)
        in_mul = static_multiplier(K, mul_kind, seed)
        vec, grid = assert_static_matches(view, storage, in_mul)
        if M and K:
            assert vec == expect_vec(dtype, K, layout), (M, K, layout)
            assert grid == max(1, -(-M * (K // vec) // K_THREADS))


def test_static_ties_round_to_even():
    vals = (torch.arange(-300, 300, dtype=torch.float64) * 0.5)[None, :].repeat(2, 1)
    storage, view = make_view(vals, torch.float16, "contig")
    qe, _, _ = run_static(view, storage, static_multiplier(600, "unit", 0))
    x = vals[0].numpy()
    assert np.array_equal(qe[0], np.clip(np.rint(x), -127, 127).astype(np.int8))
    assert not np.array_equal(qe[0], np.clip(float2int_half_away(x), -127, 127).astype(np.int8))
    assert_static_matches(view, storage, static_multiplier(600, "unit", 0))


def test_static_grid_stride_second_trip():
    # fp32, K odd (scalar path): M * K = 2^21 + 1 vectors > 8192 blocks x 256 threads, so the
    # grid is capped and thread 0 takes a second trip of the grid-stride loop.
    M, K = 3, 699051
    g = torch.Generator().manual_seed(5)
    vals = torch.randn(M, K, generator=g, dtype=torch.float64) * 50
    storage, view = make_view(vals, torch.float32, "contig")
    vec, grid = assert_static_matches(view, storage, static_multiplier(K, "tensor", 5))
    assert vec == 1 and grid == STATIC_MAX_BLOCKS and M * K == grid * K_THREADS + 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_static_grid_stride_small_grid(dtype):
    # The same loop, vector path included, with the cap lowered to 3 blocks (many trips per thread).
    for M, K, layout in ((5, 2056, "contig"), (4, 1031, "pad_scalar"), (33, 200, "pad_vec")):
        vals = static_values(M, K, dtype, 11)
        storage, view = make_view(vals, dtype, layout)
        _, grid = assert_static_matches(view, storage, static_multiplier(K, "channel", 11), max_blocks=3)
        assert grid == 3


def test_static_launcher_edges():
    mul = Buffer("mul", BASE_MUL, 4, np.ones(8, F32))
    x = Buffer("x", BASE_X, 2, np.zeros(64, F32))
    q = Buffer("q", BASE_Q, 1, np.zeros(64, np.int8))
    assert launch_static(x, 0, 0, -1, 8, 8, mul, 8, q, {})[0] == K_ERR_BAD_SHAPE
    assert launch_static(x, 0, 0, 2, -1, 8, mul, 8, q, {})[0] == K_ERR_BAD_SHAPE
    assert launch_static(x, 0, 0, 2, 8, -8, mul, 8, q, {})[0] == K_ERR_BAD_SHAPE
    assert launch_static(x, 0, 0, 2, 8, 8, mul, 3, q, {})[0] == K_ERR_BAD_SHAPE       # mul_len not 1 or K
    assert launch_static(x, 0, 0, 2, 8, 8, None, 8, q, {})[0] == K_ERR_BAD_SHAPE      # mul == 0
    assert launch_static(x, 0, 0, 0, 8, 8, None, 8, q, {}) == (K_OK, None, None)      # M == 0 first
    assert launch_static(x, 0, 0, 2, 0, 8, mul, 1, q, {}) == (K_OK, None, None)       # K == 0
    assert launch_static(x, 0, 5, 2, 8, 8, mul, 8, q, {})[0] == K_ERR_UNSUPPORTED_DTYPE
    assert (q.writes == 0).all()
    # K == 1 with mul_len 1 == K: per-tensor (mul0), one scalar per row.
    vals = static_values(5, 1, torch.bfloat16, 2)
    storage, view = make_view(vals, torch.bfloat16, "contig")
    assert assert_static_matches(view, storage, torch.tensor([0.75]))[0] == 1


# ---------------------------------------------------------------------------------------------
# Mutants: each must make the checks above fail.

PER_TOKEN_MUTANTS = {
    "half_warp_reduction": dict(shfl_offsets=(8, 4, 2, 1)),
    "smem_skips_last_warp": dict(smem_warps=K_WARPS - 1),
    "truncate": dict(to_int=float2int_rz),
    "round_half_away": dict(to_int=float2int_half_away),
    "scale_from_sum": dict(amax_sum=True),
    "row_stride_off_by_one": dict(row_stride_delta=1),
    "scale_times_reciprocal": dict(scale_by_reciprocal=True),    # amax * fl(1 / 127), not amax / 127
    "inv_times_reciprocal": dict(inv_by_reciprocal=True),        # 127 * fl(1 / amax), not 127 / amax
    "no_nan_flag": dict(no_bad_flag=True),
    "vec_path_ignores_k_tail": dict(ignore_k_tail=True),
}


@pytest.mark.parametrize("mutant", list(PER_TOKEN_MUTANTS))
def test_mutant_per_token_fails(mutant):
    # K: 2 trips for thread 0, every warp holding data (the last warp too), ties / NaN / zero rows.
    M, K = 64, 2060 if mutant == "vec_path_ignores_k_tail" else 2056
    vals = per_token_values(M, K, torch.float16, seed=3)
    storage, view = make_view(vals, torch.float16, "pad_vec")
    assert_per_token_matches(view, storage)              # the real kernel passes
    with pytest.raises(AssertionError):
        assert_per_token_matches(view, storage, mut=PER_TOKEN_MUTANTS[mutant])


STATIC_MUTANTS = {
    "no_nan_check": dict(no_nan_check=True),
    "truncate": dict(to_int=float2int_rz),
    "round_half_away": dict(to_int=float2int_half_away),
    "mul_index_without_j": dict(mul_no_j=True),
    "row_from_k_not_nvec": dict(row_from_k=True),
    "no_grid_stride": dict(no_grid_stride=True),
}


@pytest.mark.parametrize("mutant", list(STATIC_MUTANTS))
def test_mutant_static_fails(mutant):
    M, K = 9, 520
    vals = static_values(M, K, torch.float16, 4)
    storage, view = make_view(vals, torch.float16, "contig")
    in_mul = static_multiplier(K, "channel_pow2", 4)
    assert_static_matches(view, storage, in_mul, max_blocks=2)
    with pytest.raises(AssertionError):
        assert_static_matches(view, storage, in_mul, mut=STATIC_MUTANTS[mutant], max_blocks=2)


# ---------------------------------------------------------------------------------------------
# Lines of the sources the emulation above mirrors (whitespace-normalized); if one changes,
# update the mirror and this list together.

MIRRORED_PER_TOKEN_LINES = [
    "constexpr int kThreads = 256;",
    "constexpr int kWarps = kThreads / 32;",
    "for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));",
    "const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;",
    "if (lane == 0) smem[warp] = v;",
    "__syncthreads();",
    "v = lane < kWarps ? smem[lane] : 0.f;",
    "return v;  // every thread holds the block's max",
    "__shared__ float smem[kWarps];",
    "const int64_t row = blockIdx.x;",
    "const T* xr = x + row * stride_x;",
    "int8_t* qr = q + row * K;",
    "const int64_t nvec = K / VEC;",
    "float amax = 0.f;",
    "bool bad = false;",
    "for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {",
    "Vec<T, VEC> vx = reinterpret_cast<const Vec<T, VEC>*>(xr)[i];",
    "for (int j = 0; j < VEC; ++j) {",
    "const float f = fabsf(to_float(vx.v[j]));",
    "bad |= !(f <= 3.402823466e38f);  // true for NaN and inf",
    "amax = fmaxf(amax, f);",
    "amax = block_max(bad ? INFINITY : amax, smem);",
    "const bool row_bad = !(amax <= 3.402823466e38f);",
    "const float inv = (amax > 0.f && !row_bad) ? 127.f / amax : 0.f;",
    "if (threadIdx.x == 0) scale[row] = row_bad ? NAN : (amax > 0.f ? amax / 127.f : 1.f);",
    "Vec<int8_t, VEC> vq;",
    "const int r = __float2int_rn(__fmul_rn(to_float(vx.v[j]), inv));",
    "vq.v[j] = static_cast<int8_t>(max(-127, min(127, r)));",
    "reinterpret_cast<Vec<int8_t, VEC>*>(qr)[i] = vq;",
    "constexpr int kVec = 16 / sizeof(T);",
    "const bool vec_ok = reinterpret_cast<uintptr_t>(x) % 16 == 0 && (stride_x * sizeof(T)) % 16 == 0 &&",
    "K % kVec == 0 && reinterpret_cast<uintptr_t>(q) % kVec == 0;",
    "const dim3 grid(static_cast<unsigned>(M));",
    "quantize_per_token_kernel<T, kVec><<<grid, kThreads, 0, stream>>>(",
    "static_cast<const T*>(x), stride_x, static_cast<int8_t*>(q), scale, K);",
    "quantize_per_token_kernel<T, 1><<<grid, kThreads, 0, stream>>>(",
    "if (M < 0 || K < 0 || M > 0x7fffffff || (M > 1 && stride_x < 0)) return kErrBadShape;",
    "if (M == 0) return kOk;",
    "case kFloat16: return launch<__half>(xp, M, K, stride_x, qp, sp, s);",
    "case kBFloat16: return launch<__nv_bfloat16>(xp, M, K, stride_x, qp, sp, s);",
    "case kFloat32: return launch<float>(xp, M, K, stride_x, qp, sp, s);",
    "default: return kErrUnsupportedDtype;",
]

MIRRORED_STATIC_LINES = [
    "constexpr int kThreads = 256;",
    "const int64_t nvec = K / VEC;",
    "const int64_t total = M * nvec;",
    "const float mul0 = per_channel ? 0.f : mul[0];",
    "for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < total;",
    "i += static_cast<int64_t>(gridDim.x) * kThreads) {",
    "const int64_t row = i / nvec;",
    "const int64_t col = (i - row * nvec) * VEC;",
    "const Vec<T, VEC> vx = *reinterpret_cast<const Vec<T, VEC>*>(x + row * stride_x + col);",
    "float y = __fmul_rn(to_float(vx.v[j]), per_channel ? __ldg(mul + col + j) : mul0);",
    "y = (y != y) ? 0.f : fminf(fmaxf(y, -127.f), 127.f);  // NaN first: fminf/fmaxf drop it",
    "vq.v[j] = static_cast<int8_t>(__float2int_rn(y));",
    "*reinterpret_cast<Vec<int8_t, VEC>*>(q + row * K + col) = vq;",
    "constexpr int kVec = 16 / sizeof(T);",
    "const bool vec_ok = reinterpret_cast<uintptr_t>(x) % 16 == 0 && (stride_x * sizeof(T)) % 16 == 0 &&",
    "K % kVec == 0 && reinterpret_cast<uintptr_t>(q) % kVec == 0;",
    "const int vec = vec_ok ? kVec : 1;",
    "const int64_t blocks = std::min<int64_t>((M * (K / vec) + kThreads - 1) / kThreads, 8192);",
    "const dim3 grid(static_cast<unsigned>(std::max<int64_t>(blocks, 1)));",
    "quantize_static_kernel<T, kVec><<<grid, kThreads, 0, stream>>>(",
    "quantize_static_kernel<T, 1><<<grid, kThreads, 0, stream>>>(",
    "static_cast<const T*>(x), stride_x, mul, per_channel, static_cast<int8_t*>(q), M, K);",
    "if (M < 0 || K < 0 || (M > 1 && stride_x < 0) || (mul_len != 1 && mul_len != K)) return kErrBadShape;",
    "if (M == 0 || K == 0) return kOk;",
    "if (mul == 0) return kErrBadShape;",
    "const bool per_channel = mul_len == K && K > 1;",
    "case kFloat16: return launch<__half>(xp, M, K, stride_x, mp, per_channel, qp, s);",
    "case kBFloat16: return launch<__nv_bfloat16>(xp, M, K, stride_x, mp, per_channel, qp, s);",
    "case kFloat32: return launch<float>(xp, M, K, stride_x, mp, per_channel, qp, s);",
    "default: return kErrUnsupportedDtype;",
]

MIRRORED_CONVERT_LINES = [
    "template <> __device__ __forceinline__ float to_float(float v) { return v; }",
    "template <> __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }",
    "template <> __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }",
    "struct alignas(sizeof(T) * N) Vec {",
    "T v[N];",
]

MIRRORED_COMMON_LINES = [
    "kOk = 0,",
    "kErrUnsupportedDtype = 10001,",
    "kErrBadShape = 10002,",
    "enum DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kInt8 = 3, kInt32 = 4 };",
]

# Bit-exactness needs IEEE fp32 division / multiplication and no flush to zero.
MIRRORED_CMAKE_LINES = [
    "set(_cuda_flags -O3 -lineinfo --expt-relaxed-constexpr -Xptxas=-v -Xptxas=--warn-on-spills)",
]

MIRRORED_GLUE_PER_TOKEN_LINES = [
    "return unit_stride_reason(\"x\", x, 1)",
    "q = torch.empty((M, K), dtype=torch.int8, device=x.device)",
    "scale = torch.empty((M,), dtype=torch.float32, device=x.device)",
    "code = _ext.lib().quantize_per_token(x.device.index, x.data_ptr(), _ext.DTYPE_CODES[x.dtype], M, K,",
    "x.stride(0) if M > 1 else K, q.data_ptr(), scale.data_ptr(),",
]

MIRRORED_GLUE_STATIC_LINES = [
    "if K > 1 and x.stride(1) != 1:",
    "if in_mul.dtype != torch.float32 or not (in_mul.numel() == 1 or in_mul.numel() == K):",
    "q = torch.empty((M, K), dtype=torch.int8, device=x.device)",
    "if M == 0 or K == 0:",
    "in_mul = in_mul.reshape(-1).contiguous()",
    "code = _ext.lib().quantize_static(x.device.index, x.data_ptr(), _ext.DTYPE_CODES[x.dtype], M, K,",
    "x.stride(0) if M > 1 else K, in_mul.data_ptr(), in_mul.numel(),",
]


def test_kernel_source_matches_mirror():
    assert_mirrored(((PER_TOKEN_SRC, MIRRORED_PER_TOKEN_LINES), (STATIC_SRC, MIRRORED_STATIC_LINES),
                     (CONVERT_SRC, MIRRORED_CONVERT_LINES), (COMMON_SRC, MIRRORED_COMMON_LINES),
                     (CMAKE_SRC, MIRRORED_CMAKE_LINES), (GLUE_PER_TOKEN, MIRRORED_GLUE_PER_TOKEN_LINES),
                     (GLUE_STATIC, MIRRORED_GLUE_STATIC_LINES)))
    # Each mirrored loop / launch appears exactly where expected: one of each kernel's loops.
    per_token = norm_source(PER_TOKEN_SRC.read_text())
    assert per_token.count("for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {") == 2
    assert per_token.count("for (int off = 16; off > 0; off >>= 1)") == 2
    assert norm_source(STATIC_SRC.read_text()).count("__float2int_rn(") == 1
    setup_src = (ROOT / "setup.py").read_text()   # less the code that refuses such flags (and names them)
    setup_src = (setup_src[:setup_src.index("#: Flags that change fp32 rounding")]
                 + setup_src[setup_src.index("def git_commit"):])
    flags = CMAKE_SRC.read_text() + setup_src
    assert not re.search(r"fast.math|ftz|prec.div|prec.sqrt|fmad", flags), "fp32 flags changed"
    assert all(_ext.DTYPE_CODES[dt] == code for dt, code in DTYPE_CODES.items())
