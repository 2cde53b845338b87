"""The 2:4 sparse GEMM's CUDA code (csrc/sparse24/: launcher, mma.sp kernel, split-K reduce) and
its Python glue (fastllm/ops/_sparse24_cuda.py) run for real on CPU tensors through the SIMT
emulator (tests/simt/): the kernel's own source compiled by g++, each CTA's threads as fibers,
ldmatrix / cp.async / mma.sp::ordered_metadata modelled from the PTX ISA.

Checked against the reference (fastllm/ref/sparse24.py) with tests/test_sparse24.py's helpers and
tolerances: fp16 / bf16 within 2x PyTorch's own error + 1 ulp (check_close); int8 -> int32 exact;
the int8 epilogue ((fp32(acc) * a_scale) * w_scale + bias, every operation an _rn one) bit for
bit against the reference (and within assert_epilogue_close's bound). The grid covers every
launcher config (NarrowM / SmallM / LargeM of sparse24_traits.h, asserted through
sparse24_gemm_plan), grid-level split-K with uneven K slices (and the workspace-less single pass
of the same call), N with a tail past every CTA tile (144 = 128 + 16 = 2 x 64 + 16 = 4 x 32 + 16),
K with a tail past the pipeline stage and more stages than the cp.async ring holds (it wraps),
strided / offset x rows, bias dtypes, an sm80-like (108 SMs, 163 KB opt-in: LargeM for M > 64)
and an sm86-like device (84 SMs, 99 KB: SmallM for all M), and the launcher's status codes.

Poisoning: every buffer the glue allocates (output, split-K workspace) starts as NaN / int min /
0xFF bytes, so an unwritten element shows; x's padding columns are NaN (int8: 127), so a read past
K in a row shows; meta sits in front of zero words (an undefined mma.sp nibble, which the emulator
rejects), so a metadata read past the last row block fails the launch.

The emulator's mma.sp model (tests/simt/simt_runtime.cpp) was ported from
python/fastllm/sparse/mma_sp.py: test_mma_sp_model_agrees runs the emulated kernel on random
(valid, not compress()-made) metadata and random values and compares with mma_sp.emulate_gemm.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from simt.backend import DEVICES, emulated_cuda, unavailable_reason  # noqa: E402

pytestmark = pytest.mark.skipif(unavailable_reason() is not None,
                                reason=f"SIMT emulator unavailable: {unavailable_reason()}")

from fastllm import _ext, ref  # noqa: E402
from fastllm.ref.int8 import scale_epilogue  # noqa: E402
from fastllm.ops._sparse24_cuda import cuda_supports, sparse24_cuda  # noqa: E402
from fastllm.sparse import compress, decompress  # noqa: E402
from fastllm.sparse.format import VALID_NIBBLES  # noqa: E402
from fastllm.sparse.mma_sp import emulate_gemm  # noqa: E402
from test_sparse24 import assert_epilogue_close, check_close, sparse_weight  # noqa: E402

SM80, SM86 = (8, 0), (8, 6)
CODES = _ext.DTYPE_CODES
LOW = [torch.float16, torch.bfloat16]
OTHER16 = {torch.float16: torch.bfloat16, torch.bfloat16: torch.float16}
K_ERR_UNSUPPORTED_DTYPE, K_ERR_BAD_SHAPE, K_ERR_MISALIGNED, K_ERR_UNSUPPORTED_ARCH = 10001, 10002, 10003, 10004


# ----------------------------------------------------------------------------------------------
# Harness

def _poison(t):
    if t.dtype.is_floating_point:
        return t.fill_(float("nan"))
    if t.dtype == torch.uint8:                 # the split-K workspace: NaN fp32 / -1 int32 partials
        return t.fill_(0xFF)
    return t.fill_(torch.iinfo(t.dtype).min)


def run(x, values, meta, bias=None, a_scale=None, w_scale=None, out_dtype=None, sm=SM80, sms=None):
    """The glue + launcher + kernel through the emulator (the op layer's checks are the caller's)."""
    assert cuda_supports(x, values, meta, bias, a_scale, w_scale) is None
    with emulated_cuda(sm=sm, sms=sms):   # (its torch.empty poisons the glue's buffers)
        return sparse24_cuda(x, values, meta, bias, a_scale, w_scale, out_dtype)


def plan(dtype, M, N, K, sm=SM80, sms=None):
    """(config, K splits) the launcher picks on the emulated device."""
    d_sms, optin = DEVICES[sm]
    with emulated_cuda(sm=sm, sms=sms) as mod:
        return tuple(mod.sparse24_gemm_plan(CODES[dtype], M, N, K, sms or d_sms, optin))


def weight(N, K, dtype):
    """A 2:4 weight (tests/test_sparse24.py's, with its under-filled groups) and its compressed
    form; meta is followed in memory by zero words (undefined nibbles: a read past it fails)."""
    w = sparse_weight(N, K, dtype, "cpu")
    values, meta = compress(w)
    assert torch.equal(decompress(values, meta), w)   # so the references may use w
    buf = torch.zeros(meta.numel() + 64, dtype=torch.int32)
    buf[:meta.numel()] = meta.flatten()
    return w, values, buf[:meta.numel()].view(meta.shape)


def activations(M, K, dtype, strided):
    """x (M, K); strided: rows of a wider buffer (row stride K + 24 / K + 48 elements, 16-byte
    multiples) at a 16-byte column offset, every element outside x poisoned (NaN / 127)."""
    s8 = dtype == torch.int8
    if s8:
        x = torch.randint(-128, 128, (M, K), dtype=torch.int8)
    else:
        x = torch.randn(M, K).to(dtype)
    if not strided:
        return x
    pad, off = (48, 16) if s8 else (24, 8)
    buf = torch.full((M + 1, K + pad), 127 if s8 else float("nan"), dtype=dtype)
    view = buf[:M, off:off + K]
    view.copy_(x)
    assert view.stride(0) == K + pad and view.data_ptr() % 16 == 0
    return view


# ----------------------------------------------------------------------------------------------
# fp16 / bf16

M_GRID = [1, 2, 7, 16, 17, 31, 33, 64, 65, 100, 130]


@pytest.mark.parametrize("sm", [SM80, SM86], ids=["sm80", "sm86"])
@pytest.mark.parametrize("dtype", LOW, ids=["f16", "bf16"])
def test_float_grid(dtype, sm):
    N, K = 144, 704   # N: a 16-row tail past every tile; K: 5.5 stages of 128 columns (every ring wraps)
    w, values, meta = weight(N, K, dtype)
    configs = set()
    for i, M in enumerate(M_GRID):
        x = activations(M, K, dtype, strided=i % 2 == 1)
        bias = [None, torch.randn(N).to(dtype), torch.randn(N), torch.randn(N).to(OTHER16[dtype])][i % 4]
        out = run(x, values, meta, bias, sm=sm)
        check_close(out, x, w, bias, dtype)
        configs.add(plan(dtype, M, N, K, sm)[0])
    assert configs == ({0, 1, 2} if sm == SM80 else {0, 1}), configs


def test_float_small_device_smallm_at_decode():
    # 2 SMs: N / 64 = 3 CTAs >= SMs, so M <= 16 takes SmallM (not NarrowM), one pass.
    N, K = 144, 576   # 4.5 stages: the 4-stage ring wraps
    w, values, meta = weight(N, K, torch.float16)
    for M in (1, 9, 16):
        assert plan(torch.float16, M, N, K, sms=2) == (1, 1)
        x = activations(M, K, torch.float16, strided=M == 9)
        bias = torch.randn(N).half()
        check_close(run(x, values, meta, bias, sms=2), x, w, bias, torch.float16)


# ----------------------------------------------------------------------------------------------
# int8: exact int32, and the fused epilogue

@pytest.mark.parametrize("sm", [SM80, SM86], ids=["sm80", "sm86"])
def test_int8_grid(sm):
    N, K = 144, 1344  # K: 5.25 stages of 256 columns (every ring wraps; one 64-column slice in the last)
    w, values, meta = weight(N, K, torch.int8)
    configs = set()
    for i, M in enumerate(M_GRID):
        a = activations(M, K, torch.int8, strided=i % 2 == 0)
        acc = run(a, values, meta, sm=sm)
        want = ref.int8_matmul_int32(a, w)   # == ref.sparse24_int8_matmul_int32 (decompress is exact)
        assert acc.dtype == torch.int32 and torch.equal(acc, want), M
        configs.add(plan(torch.int8, M, N, K, sm)[0])

        a_s = torch.rand(M) * 9e-3 + 1e-3 if i % 2 == 0 else torch.tensor([7e-3])
        w_s = torch.rand(N) * 9e-3 + 1e-3
        bias = [None, torch.randn(N), torch.randn(N).to(torch.bfloat16), torch.randn(N).half()][i % 4]
        out_dtype = [torch.bfloat16, torch.float32, torch.float16][i % 3]
        out = run(a, values, meta, bias, a_s, w_s, out_dtype, sm=sm)
        assert torch.equal(out, scale_epilogue(want, a_s, w_s, bias, out_dtype)), M
        assert_epilogue_close(out, want, a_s.expand(M), w_s, bias, out_dtype)
    assert configs == ({0, 1, 2} if sm == SM80 else {0, 1}), configs


# ----------------------------------------------------------------------------------------------
# Split-K: uneven slices of whole stages, the reduce's epilogue, vs the single pass of the same call

SPLIT_K = {torch.float16: 2112, torch.bfloat16: 2112, torch.int8: 4160}   # 17 stages: slices 5, 5, 5, 2


def _direct(lib, x, values, meta, out_dtype, M, N, K, ws, ws_bytes, a_s=None, w_s=None, bias=None):
    """The launcher, called as the glue calls it, into a poisoned output."""
    out = _poison(torch.empty((M, N), dtype=out_dtype))
    code = lib.sparse24_gemm(
        None, CODES[x.dtype], x.data_ptr(), values.data_ptr(), meta.data_ptr(), out.data_ptr(), CODES[out_dtype],
        M, N, K, x.stride(0) if M > 1 else K, bias.data_ptr() if bias is not None else 0,
        CODES[bias.dtype] if bias is not None else -1, a_s.data_ptr() if a_s is not None else 0,
        a_s is not None and a_s.numel() > 1, w_s.data_ptr() if w_s is not None else 0, ws, ws_bytes, 0)
    assert code == 0, lib.error_string(code)
    return out


@pytest.mark.parametrize("sm", [SM80, SM86], ids=["sm80", "sm86"])
@pytest.mark.parametrize("dtype", LOW + [torch.int8], ids=["f16", "bf16", "s8"])
def test_split_k(dtype, sm):
    N, K = 80, SPLIT_K[dtype]
    s8 = dtype == torch.int8
    w, values, meta = weight(N, K, dtype)
    for M in (1, 3, 16, 17, 32, 33):
        config, splits = plan(dtype, M, N, K, sm)
        assert config == (0 if M <= 16 else 1) and splits == (4 if M <= 32 else 1), (M, config, splits)
        x = activations(M, K, dtype, strided=M % 2 == 1)
        a_s = torch.rand(M) * 9e-3 + 1e-3 if M % 2 == 0 else torch.tensor([4e-3])
        w_s = torch.rand(N) * 9e-3 + 1e-3
        bias = torch.randn(N).to([torch.float32, torch.bfloat16, torch.float16][M % 3])
        out_dtype = torch.float32 if M % 2 else torch.bfloat16
        with emulated_cuda(sm=sm):
            lib = _ext.lib()
            ws_bytes = lib.sparse24_gemm_workspace(None, CODES[dtype], M, N, K)
        assert ws_bytes == (splits * M * N * 4 if splits > 1 else 0)
        # Through the glue (which allocates the workspace) ...
        if s8:
            acc = run(x, values, meta, sm=sm)
            assert torch.equal(acc, ref.int8_matmul_int32(x, w)), M
            out = run(x, values, meta, bias, a_s, w_s, out_dtype, sm=sm)
            assert torch.equal(out, scale_epilogue(acc, a_s, w_s, bias, out_dtype)), M
        else:
            out = run(x, values, meta, bias, sm=sm)
            check_close(out, x, w, bias, dtype)
        if splits == 1:
            continue
        # ... and the launcher with and without the workspace: int8 bit-identical (exact sums,
        # the same finish()), 16-bit both within tolerance.
        ws = _poison(torch.empty(ws_bytes, dtype=torch.uint8))
        with emulated_cuda(sm=sm):
            lib = _ext.lib()
            if s8:
                raw = [_direct(lib, x, values, meta, torch.int32, M, N, K, p, n) for p, n in ((0, 0), (ws.data_ptr(),
                                                                                              ws_bytes))]
                scaled = [_direct(lib, x, values, meta, out_dtype, M, N, K, p, n, a_s, w_s, bias)
                          for p, n in ((0, 0), (ws.data_ptr(), ws_bytes))]
            else:
                single = _direct(lib, x, values, meta, dtype, M, N, K, 0, 0, bias=bias)
        if s8:
            assert torch.equal(raw[0], raw[1]) and torch.equal(raw[0], acc), M
            assert torch.equal(scaled[0], scaled[1]) and torch.equal(scaled[0], out), M
        else:
            check_close(single, x, w, bias, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.int8], ids=["f16", "s8"])
def test_split_k_max_splits_fewer_slices(dtype):
    # 129 stages on one 16-row W block (N = 16, under every tile): kMaxSplitK = 16 splits of
    # ceil(129 / 16) = 9 stages -> only 15 slices launched (the workspace holds 16); the reduce
    # must sum exactly the 15 written ones (the 16th plane stays poisoned).
    M, N = 1, 16
    K = 129 * (256 if dtype == torch.int8 else 128) - 64
    assert plan(dtype, M, N, K) == (0, 16)
    w, values, meta = weight(N, K, dtype)
    x = activations(M, K, dtype, strided=False)
    if dtype == torch.int8:
        acc = run(x, values, meta)
        assert torch.equal(acc, ref.int8_matmul_int32(x, w))
        a_s, w_s, bias = torch.tensor([3e-3]), torch.rand(N) * 1e-2, torch.randn(N).half()
        out = run(x, values, meta, bias, a_s, w_s, torch.float16)
        assert torch.equal(out, scale_epilogue(acc, a_s, w_s, bias, torch.float16))
    else:
        bias = torch.randn(N)
        check_close(run(x, values, meta, bias), x, w, bias, dtype)


# ----------------------------------------------------------------------------------------------
# The emulator's mma.sp model vs python/fastllm/sparse/mma_sp.py (it was ported from there)

def _random_meta(N, K):
    """Metadata words of random valid ordered nibbles (not what compress() would write: any of
    the six encodings in any chunk, also where a value is zero)."""
    nib = torch.tensor(VALID_NIBBLES)[torch.randint(0, len(VALID_NIBBLES), (N // 16, K // 2, 8))]
    words = (nib.long() << (4 * torch.arange(8))).sum(-1)
    return (words - ((words >> 31) << 32)).to(torch.int32)   # two's complement into int32


@pytest.mark.parametrize("dtype", LOW + [torch.int8], ids=["f16", "bf16", "s8"])
def test_mma_sp_model_agrees(dtype):
    M, N, K = 16, 32, 192        # 2 n8 token tiles, 2 m16 row blocks, 3 metadata blocks
    meta = _random_meta(N, K)
    if dtype == torch.int8:
        values = torch.randint(-128, 128, (N, K // 2), dtype=torch.int8)
        x = torch.randint(-128, 128, (M, K), dtype=torch.int8)
        got = run(x, values, meta)
        assert torch.equal(got, emulate_gemm(x, values, meta).to(torch.int32))
        return
    # Small integers times powers of two: every fp32 partial sum is exact, so the kernel's
    # output is the exact product (the model's fp64) rounded once to the dtype.
    values = (torch.randint(-8, 9, (N, K // 2)) * 2.0 ** torch.randint(-2, 3, (N, K // 2))).to(dtype)
    x = (torch.randint(-8, 9, (M, K)) * 2.0 ** torch.randint(-2, 3, (M, K))).to(dtype)
    assert torch.equal(run(x, values, meta), emulate_gemm(x, values, meta).to(dtype))
    # Random normals: within the fp32 accumulation (two roundings per m16n8k32 MMA: its sum and
    # the add to C) plus the output's rounding.
    values, x = torch.randn(N, K // 2).to(dtype), torch.randn(M, K).to(dtype)
    model = emulate_gemm(x, values, meta)
    absprod = x.abs().double() @ decompress(values, meta).abs().double().t()
    delta = (2 * K // 32 + 1) * 2.0 ** -24 * absprod
    bound = torch.finfo(dtype).eps / 2 * (model.abs() + delta) + delta + torch.finfo(dtype).tiny
    assert ((run(x, values, meta).double() - model).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.int8], ids=["f16", "s8"])
def test_mma_sp_undefined_nibble_fails_in_both(dtype):
    # A nibble outside the six ordered encodings (i0 >= i1) is undefined behaviour: the Python
    # model raises, the emulated launch fails (never a silent result).
    M, N, K = 8, 32, 128
    _, values, _ = weight(N, K, dtype)
    meta = _random_meta(N, K)
    meta[1, 32 + 5] = meta[1, 32 + 5] ^ (meta[1, 32 + 5] & 0xF0) | 0x50    # nibble 1 = 0b0101
    x = activations(M, K, dtype, strided=False)
    with pytest.raises(ValueError, match="undefined"):
        emulate_gemm(x, values, meta)
    with pytest.raises(_ext.CudaError, match="undefined"):
        run(x, values, meta)


# ----------------------------------------------------------------------------------------------
# The launcher's own checks (what the glue never sends; a status code, never a fault)

def test_launcher_status_codes():
    M, N, K = 4, 32, 128
    _, v16, m16 = weight(N, K, torch.float16)
    _, v8, m8 = weight(N, K, torch.int8)
    x16 = torch.randn(M, K).half()
    x8 = torch.randint(-128, 128, (M, K), dtype=torch.int8)
    out16, out32 = torch.empty(M, N, dtype=torch.float16), torch.empty(M, N, dtype=torch.int32)
    f32 = torch.ones(N)

    def call(lib, x, v, m, out, n=N, k=K, stride=K, bias=0, bias_dtype=-1, a_s=0, w_s=0, x_ptr=None):
        return lib.sparse24_gemm(None, CODES[x.dtype], x.data_ptr() if x_ptr is None else x_ptr, v.data_ptr(),
                                 m.data_ptr(), out.data_ptr(), CODES[out.dtype], M, n, k, stride, bias, bias_dtype,
                                 a_s, False, w_s, 0, 0, 0)

    with emulated_cuda(sm=SM80):
        lib = _ext.lib()
        assert call(lib, x16, v16, m16, out16) == 0
        assert call(lib, x16, v16, m16, out16, n=24) == K_ERR_BAD_SHAPE
        assert call(lib, x16, v16, m16, out16, k=96) == K_ERR_BAD_SHAPE
        assert call(lib, x16, v16, m16, out32) == K_ERR_UNSUPPORTED_DTYPE                # out_dtype != dtype
        assert call(lib, x16, v16, m16, out16, stride=K - 8) == K_ERR_MISALIGNED         # overlapping rows
        assert call(lib, x16, v16, m16, out16, stride=K + 4) == K_ERR_MISALIGNED         # 8-byte row stride
        assert call(lib, x16, v16, m16, out16, x_ptr=x16.data_ptr() + 8) == K_ERR_MISALIGNED
        assert call(lib, x16, v16, m16, out16, bias=f32.data_ptr(), bias_dtype=CODES[torch.int32]) == \
            K_ERR_UNSUPPORTED_DTYPE
        assert call(lib, x8, v8, m8, out32) == 0
        assert call(lib, x8, v8, m8, out32, bias=f32.data_ptr(), bias_dtype=CODES[torch.float32]) == \
            K_ERR_UNSUPPORTED_DTYPE                                                      # raw int32 takes no bias
        assert call(lib, x8, v8, m8, out32, a_s=f32.data_ptr()) == K_ERR_UNSUPPORTED_DTYPE  # scaled -> int32
        assert call(lib, x8, v8, m8, torch.empty(M, N), a_s=f32.data_ptr()) == K_ERR_BAD_SHAPE  # no w_scale
        assert call(lib, x8, v8, m8, out32, k=131072) == K_ERR_BAD_SHAPE                 # int32 could overflow
    with emulated_cuda(sm=(7, 5)):
        assert call(_ext.lib(), x16, v16, m16, out16) == K_ERR_UNSUPPORTED_ARCH
    # The glue: an empty output launches nothing.
    with emulated_cuda(sm=SM80):
        assert sparse24_cuda(x16[:0], v16, m16).shape == (0, N)
