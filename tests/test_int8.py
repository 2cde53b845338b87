"""int8 matmuls (W8A8 int32 / scaled, W8A16): exact accumulators, bounded epilogue error, odd
shapes, strides, split-K, bad input, opcheck.

Tolerances (W8A8). The accumulator is an exact integer, so the only error is the fp32
epilogue plus the final rounding: converting acc to fp32, two multiplies and the bias add
each round once (<= 2**-24 relative to |acc*a_s*w_s| + |bias|, 4 roundings < 2**-22 with
margin; a fused multiply-add only removes roundings), then one rounding to the output dtype
(<= half an ulp: eps/2 * |exact|, or half the smallest subnormal near zero). Bound:
    |out - exact| <= eps_out/2 * |exact| + 2**-21 * (|acc*a_s*w_s| + |bias|) + tiny_out
which is PyTorch's own error for the same computation (the reference hits it), not a loose
atol: computing the epilogue in 16 bits, or a scale off by one row, fails it.

Tolerances (W8A16). Weights are exact in every float dtype (|w| <= 128) and the products
x*w are exact in fp32 (<= 11 x 8 significant bits); what is left is fp32 summation over K
(any order: <= (K + 2) * 2**-24 * sum|x*w*s|, the standard bound, +2 for the scale multiply
and the bias add) and the final rounding to x.dtype (eps/2 * |exact|).
"""
import pytest
import torch

import fastllm
from fastllm import ref
from fastllm.ops import int8_matmul, int8_matmul_int32, w8a16_matmul, quantize_per_token
from fastllm.ops.int8 import MAX_K, cpu_int_mm_ok
from helpers import poison_

from conftest import DEVICE

KERNEL_BACKENDS = ["triton"]  # the cuda backend: tests/test_int8_cuda.py
ALL = KERNEL_BACKENDS + ["torch"]
OUT_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# The interpreter is slow: a sample of M that covers 1, tile edges (16/17, 32/33) and a
# multi-tile 97; the torch backend gets every M in 1..33.
M_SAMPLE = [1, 2, 7, 16, 17, 33, 97]
M_ALL = list(range(1, 34)) + [97]
KN = [(48, 16), (80, 48), (272, 112)]   # multiples of 16, not of the 32-wide K tile / N tile


def rand_int8(*shape):
    return torch.randint(-128, 128, shape, dtype=torch.int8, device=DEVICE)


def exact_int(a, b):
    """Exact a @ b.T as CPU int64. On CUDA in float64 there (exact: every partial sum of int8
    products is an integer far below 2^53): CPU int64 matmul has no BLAS and took ~10 s per
    GPU-test shape (4112 x 4096 x 1040)."""
    if a.is_cuda and b.is_cuda:
        return (a.double() @ b.double().t()).cpu().long()
    return a.cpu().long() @ b.cpu().long().t()


def quantized_inputs(M, N, K):
    """Realistic operands: per-token activations and per-channel weights from the quantizers."""
    a, a_s = ref.quantize_per_token(torch.randn(M, K) * (torch.rand(M, 1) * 4 + 0.1))
    b, w_s = ref.quantize_per_token(torch.randn(N, K) * 0.05)
    return a.to(DEVICE), a_s.to(DEVICE), b.to(DEVICE), w_s.to(DEVICE)


def assert_epilogue_close(out, acc, a_s, w_s, bias, out_dtype):
    acc, a_s, w_s = acc.double(), a_s.cpu().double().reshape(-1, 1), w_s.cpu().double().reshape(1, -1)
    prod = acc * a_s * w_s
    b = bias.cpu().double().reshape(1, -1) if bias is not None else torch.zeros_like(prod)
    exact = prod + b
    fi = torch.finfo(out_dtype)
    bound = fi.eps / 2 * exact.abs() + 2.0 ** -21 * (prod.abs() + b.abs()) + fi.tiny * fi.eps / 2
    err = (out.cpu().double() - exact).abs()
    assert out.dtype == out_dtype and out.shape == exact.shape
    assert torch.isfinite(out).all()
    assert (err <= bound).all(), f"max err/bound {(err / bound).max().item():.3f}"


# ----------------------------------------------------------------------------------------------
# int32: exact on every backend.

def cases(backend):
    """M values for a backend: all of 1..33 and 97 on the torch backend, a sample on kernels."""
    return M_ALL if backend == "torch" else M_SAMPLE


@pytest.mark.parametrize("K,N", KN)
@pytest.mark.parametrize("backend", ALL)
def test_int32_exact(backend, K, N):
    for M in cases(backend):
        a, b = rand_int8(M, K), rand_int8(N, K)
        acc = int8_matmul_int32(a, b, backend=backend)
        assert acc.dtype == torch.int32 and acc.shape == (M, N)
        assert torch.equal(acc.cpu().long(), exact_int(a, b)), f"M={M}"


@pytest.mark.parametrize("backend", ALL)
def test_int32_extremes_and_max_k(backend):
    # Every product at its extreme (-128 * -128 = 16384), K at the largest allowed value: the
    # accumulator reaches 2147221504, just under 2**31; -128 * 127 rows check the negative side.
    K = MAX_K // 16 * 16
    a = torch.full((3, K), -128, dtype=torch.int8, device=DEVICE)
    a[1] = 127
    a[2, ::2] = 127
    b = torch.full((16, K), -128, dtype=torch.int8, device=DEVICE)
    b[5] = 127
    if backend == "triton" and DEVICE == "cpu":
        # The public op's interpreter config walks K 32 at a time (4096 steps, ~10 s); the
        # kernel is the same with a wider K tile.
        from fastllm.triton_kernels.int8_matmul import Config, int8_matmul as k_int8
        acc = k_int8(a, b, config=Config(16, 16, 2048, GROUP_M=1, num_stages=1))
    else:
        acc = int8_matmul_int32(a, b, backend=backend)
    assert torch.equal(acc.cpu().long(), exact_int(a, b))
    assert acc[0, 0].item() == K * 16384


@pytest.mark.parametrize("backend", ALL)
def test_int32_strided(backend):
    # a: row stride K + 16 (a column slice); b: a transposed view (unit stride along N).
    a = rand_int8(9, 96 + 16)[:, 16:]
    b = rand_int8(96, 32).t()
    assert not a.is_contiguous() and not b.is_contiguous()
    assert torch.equal(int8_matmul_int32(a, b, backend=backend).cpu().long(), exact_int(a, b))


@pytest.mark.parametrize("backend", [b for b in ALL if b != "cuda"])
def test_int32_broadcast_and_overlapping_rows(backend):
    # Regression: CPU torch._int_mm read garbage for zero / overlapping strides (the torch
    # backend now hands it only the probed dense layout). The kernels take any strides.
    row = rand_int8(1, 64)
    a = row.expand(5, 64)                                        # row stride 0
    a_ov = rand_int8(1, 200)[0].as_strided((5, 64), (16, 1))     # rows overlap
    b = rand_int8(16, 64)
    b_bc = rand_int8(1, 64).expand(16, 64)
    # One-row views that count as contiguous but whose row stride is not K: a transposed column
    # (strides (1, 1)) and a row of a wider buffer; CPU _int_mm misread both (silently wrong).
    col_t = rand_int8(64, 1).t()
    wide_row = rand_int8(3, 71)[1:2, 3:67]
    assert col_t.is_contiguous() and col_t.stride() == (1, 1) and wide_row.is_contiguous()
    for x, w in ((a, b), (a_ov, b), (a_ov, b_bc), (col_t, b), (wide_row, b)):
        assert torch.equal(int8_matmul_int32(x, w, backend=backend).cpu().long(), exact_int(x, w))


@pytest.mark.parametrize("backend", ALL)
def test_empty(backend):
    acc = int8_matmul_int32(rand_int8(0, 32), rand_int8(16, 32), backend=backend)
    assert acc.shape == (0, 16)
    out = int8_matmul(rand_int8(0, 32), rand_int8(16, 32), torch.ones(0, device=DEVICE),
                      torch.ones(16, device=DEVICE), backend=backend)
    assert out.shape == (0, 16)
    y = w8a16_matmul(torch.randn(0, 32, device=DEVICE), rand_int8(16, 32), torch.ones(16, device=DEVICE),
                     backend=backend)
    assert y.shape == (0, 16)


@pytest.mark.parametrize("backend", ALL + (["cuda"] if DEVICE == "cuda" else []))
def test_k_zero(backend):
    # K = 0 is a legal empty reduction (PyTorch gives an (M, 0) tensor strides (1, 1)): out is
    # the bias alone, or zeros.
    a, b = rand_int8(4, 0), rand_int8(16, 0)
    assert torch.equal(int8_matmul_int32(a, b, backend=backend).cpu(), torch.zeros(4, 16, dtype=torch.int32))
    bias = torch.randn(16, device=DEVICE)
    out = int8_matmul(a, b, torch.ones(4, device=DEVICE), torch.ones(16, device=DEVICE), bias,
                      out_dtype=torch.float32, backend=backend)
    assert torch.equal(out.cpu(), bias.cpu().expand(4, 16))
    y = w8a16_matmul(torch.randn(2, 0, device=DEVICE), b, torch.ones(16, device=DEVICE), backend=backend)
    assert torch.equal(y.cpu(), torch.zeros(2, 16))


def test_cpu_int_mm_probe():
    # The torch backend uses torch._int_mm on CPU only when it passed the exactness probe.
    if hasattr(torch, "_int_mm"):
        assert isinstance(cpu_int_mm_ok(), bool)
    else:
        assert cpu_int_mm_ok() is False


# ----------------------------------------------------------------------------------------------
# Scaled W8A8.

@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("backend", ALL)
def test_scaled(backend, out_dtype, static, with_bias):
    # Each M with one of the (K, N) shapes in turn (every M 1..33, 97 on torch; a sample on kernels).
    for i, M in enumerate(cases(backend)):
        for K, N in [KN[i % len(KN)]]:
            a, a_s, b, w_s = quantized_inputs(M, N, K)
            if static:
                a_s = torch.tensor(0.0123, device=DEVICE)  # 0-d: one calibrated scale for the tensor
            bias = torch.randn(N, device=DEVICE).to(out_dtype) if with_bias else None
            out = int8_matmul(a, b, a_s, w_s, bias, out_dtype=out_dtype, backend=backend)
            assert_epilogue_close(out, exact_int(a, b), a_s, w_s, bias, out_dtype)


@pytest.mark.parametrize("backend", ALL)
def test_scaled_python_float_scale_and_fp32_bias_with_bf16_out(backend):
    a, _, b, w_s = quantized_inputs(5, 32, 64)
    bias = torch.randn(32, device=DEVICE)
    out = int8_matmul(a, b, 0.05, w_s, bias, out_dtype=torch.bfloat16, backend=backend)
    assert_epilogue_close(out, exact_int(a, b), torch.tensor([0.05]), w_s, bias, torch.bfloat16)


@pytest.mark.parametrize("backend", ALL)
def test_matches_quantize_pipeline(backend):
    # quantize_per_token -> int8_matmul approximates x @ w.T: error of int8 rounding only.
    x, w = torch.randn(7, 128, device=DEVICE), torch.randn(64, 128, device=DEVICE) * 0.1
    qa, sa = quantize_per_token(x)
    qw, sw = ref.quantize_per_token(w)
    y = int8_matmul(qa, qw, sa, sw, out_dtype=torch.float32, backend=backend)
    yref = x.double() @ w.double().t()
    rel = ((y.double() - yref).norm() / yref.norm()).item()
    assert rel < 0.02, rel  # int8 on both sides of a K=128 dot: ~0.5-1% relative error


# ----------------------------------------------------------------------------------------------
# W8A16.

def assert_w8a16_close(out, x, w, s, bias, group_size):
    xd = x.cpu().double()
    wd = ref.int8.dequantize_weight(w.cpu(), s.cpu(), group_size).double()
    exact = xd @ wd.t()
    mag = xd.abs() @ wd.abs().t()
    if bias is not None:
        exact = exact + bias.cpu().double()
        mag = mag + bias.cpu().double().abs()
    K = x.shape[1]
    fi = torch.finfo(x.dtype)
    bound = fi.eps / 2 * exact.abs() + (K + 2) * 2.0 ** -24 * mag + fi.tiny * fi.eps / 2
    err = (out.cpu().double() - exact).abs()
    assert out.dtype == x.dtype and out.shape == exact.shape and torch.isfinite(out).all()
    assert (err <= bound).all(), f"max err/bound {(err / bound).max().item():.3f}"


def w8a16_inputs(M, N, K, dtype, group_size):
    x = torch.randn(M, K, device=DEVICE).to(dtype)
    w = rand_int8(N, K)
    shape = (N,) if not group_size else (N, K // group_size)
    s = (torch.rand(shape, device=DEVICE) + 0.5) * 0.01
    return x, w, s


W8A16_CASES = [(48, 16, None), (80, 48, 16), (272, 112, None), (96, 32, 32), (272, 16, 272), (64, 16, 16)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("backend", ALL)
def test_w8a16(backend, dtype, with_bias):
    for i, M in enumerate(cases(backend)):
        for K, N, group_size in [W8A16_CASES[i % len(W8A16_CASES)]]:
            x, w, s = w8a16_inputs(M, N, K, dtype, group_size)
            bias = torch.randn(N, device=DEVICE).to(dtype) if with_bias else None
            out = w8a16_matmul(x, w, s, bias, group_size=group_size, backend=backend)
            assert_w8a16_close(out, x, w, s, bias, group_size)


@pytest.mark.parametrize("backend", ALL)
def test_view_with_a_huge_k_stride(backend):
    # A (16, 256) view of a 2.15 GB buffer with K stride 8421520: 255 * stride > 2^31. The Triton
    # GEMMs form K offsets in int32 (they read ~2 GB before the tensor on a GPU); the glue now
    # hands them a contiguous copy of such a view. (The interpreter computes in int64: here this
    # checks the copy path's answer; the GPU run checks the kernel.)
    from fastllm.triton_kernels import k_offsets_fit
    big = torch.empty(256, 8421520, dtype=torch.int8, device=DEVICE)     # untouched pages stay unallocated
    b = big.t()[:16]
    b.copy_(rand_int8(16, 256))
    assert b.stride() == (1, 8421520) and k_offsets_fit(b).is_contiguous() and k_offsets_fit(b) is not b
    a = rand_int8(3, 256)
    assert k_offsets_fit(a) is a                          # ordinary tensors pass as they are
    assert torch.equal(int8_matmul_int32(a, b, backend=backend).cpu().long(), exact_int(a, b))
    s = torch.rand(16, device=DEVICE) + 0.5
    x = torch.randn(3, 256, device=DEVICE, dtype=torch.float16)
    assert_w8a16_close(w8a16_matmul(x, b, s, backend=backend), x, b, s, None, None)
    del big


@pytest.mark.parametrize("backend", ALL)
def test_w8a16_strided(backend):
    x = torch.randn(5, 64 + 8, device=DEVICE, dtype=torch.float16)[:, 8:]
    w = rand_int8(64, 32).t()
    s = (torch.rand(32, 2, device=DEVICE) + 0.5).t().contiguous().t()  # (32, 2) with strides (1, 32)
    out = w8a16_matmul(x, w, s, group_size=32, backend=backend)
    assert_w8a16_close(out, x, w, s, None, 32)
    np = pytest.importorskip("numpy")
    assert torch.equal(w8a16_matmul(x, w, s, group_size=np.int64(32), backend=backend), out)


# ----------------------------------------------------------------------------------------------
# Kernel-level: forced configs (split-K, tiles larger/smaller than the shapes), poisoned outputs.

@pytest.mark.parametrize("cfg", [(16, 32, 32, 1, 1), (32, 16, 64, 1, 4), (16, 64, 32, 1, 2)])
def test_triton_int8_configs_poisoned(cfg):
    from fastllm.triton_kernels.int8_matmul import Config, int8_matmul as k_int8
    bm, bn, bk, _, gm = cfg
    M, N, K = 37, 80, 112
    a, a_s, b, w_s = quantized_inputs(M, N, K)
    out = poison_(torch.empty(M, N, dtype=torch.int32, device=DEVICE))
    k_int8(a, b, config=Config(bm, bn, bk, GROUP_M=gm, num_stages=1), out=out)
    assert torch.equal(out.cpu().long(), exact_int(a, b))
    bias = torch.randn(N, device=DEVICE)
    out = poison_(torch.empty(M, N, dtype=torch.float16, device=DEVICE))
    k_int8(a, b, a_s, w_s, bias, torch.float16, config=Config(bm, bn, bk, GROUP_M=gm, num_stages=1), out=out)
    assert_epilogue_close(out, exact_int(a, b), a_s, w_s, bias, torch.float16)


@pytest.mark.parametrize("split,group_size", [(2, None), (3, None), (4, 16), (8, 32)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_triton_w8a16_split_k_poisoned(split, group_size, with_bias):
    from fastllm.triton_kernels.int8_matmul import Config, w8a16_matmul as k_w8a16
    M, N, K = 3, 48, 272 if group_size != 32 else 256
    x, w, s = w8a16_inputs(M, N, K, torch.bfloat16, group_size)
    bias = torch.randn(N, device=DEVICE, dtype=torch.bfloat16) if with_bias else None
    out = poison_(torch.empty(M, N, dtype=torch.bfloat16, device=DEVICE))
    k_w8a16(x, w, s, bias, group_size or 0, config=Config(16, 32, 16, SPLIT_K=split, GROUP_M=1, num_stages=1),
            out=out)
    assert_w8a16_close(out, x, w, s, bias, group_size)


def test_pick_config_rules():
    from fastllm.triton_kernels.int8_matmul import pick_config
    for M in (1, 16, 17, 64, 65, 129, 4096):
        for K in (16, 48, 4096):
            c = pick_config("w8a8", M, 4096, K)
            assert c.BLOCK_K >= 32 and c.BLOCK_M >= 16  # int8 MMA k-width; tl.dot's minimum M
            for g in (0, 16, 48, 128):
                c = pick_config("w8a16", M, 4096, K, group_size=g)
                assert c.BLOCK_K >= 16 and (not g or g % c.BLOCK_K == 0)
    assert pick_config("w8a16", 1, 4096, 4096).SPLIT_K > 1          # decode fills the GPU via split-K
    assert pick_config("w8a16", 1, 4096, 4096, sms=1).SPLIT_K == 1
    # Below sm_90 only tiles that compile spill-free under Triton 3.5 to 3.9
    # (bench/triton_versions_check.sh); sm_90 keeps its 128 x 256 tiles.
    for kind in ("w8a8", "w8a8-static", "w8a16"):
        assert pick_config(kind, 4096, 4096, 4096, arch=90).BLOCK_N == 256
        for arch in (80, 86, 89):
            for M in (33, 64, 65, 128, 4096):
                c = pick_config(kind, M, 4096, 4096, arch=arch)
                assert c.BLOCK_M * c.BLOCK_N <= 128 * 128
                if kind != "w8a16" and M > 32:
                    assert c.num_warps == 8, (kind, M, c)
                if kind == "w8a8-static" and M > 32:
                    assert c.BLOCK_K == 64, (M, c)
    with pytest.raises(ValueError, match="unknown kind"):
        pick_config("w4a16", 1, 16, 16)


# ----------------------------------------------------------------------------------------------
# Bad input: every error names the argument.

def _ok(M=4, N=32, K=64):
    return rand_int8(M, K), rand_int8(N, K), torch.rand(M, device=DEVICE), torch.rand(N, device=DEVICE)


def test_bad_inputs_int8_matmul():
    a, b, sa, sw = _ok()
    cases = [
        (TypeError, r"argument 'a' must have dtype in \(int8\), got float32", (a.float(), b, sa, sw), {}),
        (TypeError, r"argument 'b' must have dtype in \(int8\), got uint8", (a, b.to(torch.uint8), sa, sw), {}),
        (TypeError, "argument 'a' must be a torch.Tensor", ([[1]], b, sa, sw), {}),
        (ValueError, r"argument 'a' must be 2-D", (a[None], b, sa, sw), {}),
        (ValueError, r"argument 'b' must have shape \(N, K\) with K = a.shape\[1\] = 64", (a, b[:, :48], sa, sw), {}),
        (ValueError, r"argument 'a': K = a.shape\[1\] = 40 must be a multiple of 16",
         (a[:, :40], b[:, :40], sa, sw), {}),
        (ValueError, r"argument 'b': N = b.shape\[0\] = 24 must be a multiple of 16", (a, b[:24], sa, sw[:24]), {}),
        (TypeError, r"argument 'a_scale' must have dtype in \(float32\), got float16", (a, b, sa.half(), sw), {}),
        (TypeError, r"argument 'w_scale' must have dtype in \(float32\), got float64", (a, b, sa, sw.double()), {}),
        (ValueError, r"argument 'a_scale' must have shape \(4,\)", (a, b, sa[:3], sw), {}),
        (ValueError, r"argument 'w_scale' must have shape \(32,\)", (a, b, sa, sw[:16]), {}),
        (ValueError, r"argument 'bias' must have shape \(32,\)", (a, b, sa, sw, torch.zeros(31, device=DEVICE)), {}),
        (TypeError, r"argument 'bias' must have dtype",
         (a, b, sa, sw, torch.zeros(32, dtype=torch.int32, device=DEVICE)), {}),
        (TypeError, r"argument 'out_dtype' must be one of", (a, b, sa, sw), {"out_dtype": torch.int32}),
        (ValueError, "argument 'backend' must be one of", (a, b, sa, sw), {"backend": "cublas"}),
    ]
    for exc, msg, args, kw in cases:
        with pytest.raises(exc, match=msg):
            int8_matmul(*args, **kw)
    with pytest.raises(fastllm.BackendUnavailableError, match=r"needs CUDA tensors \(got cpu\)"):
        int8_matmul(a.cpu(), b.cpu(), sa.cpu(), sw.cpu(), backend="cuda")
    with pytest.raises(ValueError, match=r"argument 'a': K = 131072 > 131071"):
        int8_matmul_int32(torch.zeros(1, 131072, dtype=torch.int8), torch.zeros(16, 131072, dtype=torch.int8))
    with pytest.raises(TypeError, match=r"argument 'a' must have dtype in \(int8\)"):
        int8_matmul_int32(a.int(), b)


def test_bad_inputs_w8a16():
    x, w, s = torch.randn(4, 64, dtype=torch.float16), rand_int8(32, 64).cpu(), torch.rand(32)
    cases = [
        (TypeError, r"argument 'x' must have dtype in \(float16, bfloat16, float32\), got int8", (w, w, s), {}),
        (TypeError, r"argument 'w_int8' must have dtype in \(int8\), got float16", (x, x, s), {}),
        (TypeError, r"argument 'w_scale' must have dtype in \(float32\), got float16", (x, w, s.half()), {}),
        (ValueError, r"argument 'w_int8' must have shape \(N, K\) with K = x.shape\[1\] = 64", (x, w[:, :32], s), {}),
        (ValueError, r"argument 'x': K = x.shape\[1\] = 56 must be a multiple of 16", (x[:, :56], w[:, :56], s), {}),
        (ValueError, r"argument 'w_scale' must have shape \(32,\) \(per output channel", (x, w, s[:16]), {}),
        (ValueError, r"argument 'group_size' must be a positive multiple of 16 dividing K = 64, got 24",
         (x, w, torch.rand(32, 2)), {"group_size": 24}),
        (ValueError, r"argument 'group_size' must be a positive multiple of 16 dividing K = 64, got 48",
         (x, w, torch.rand(32, 2)), {"group_size": 48}),
        (ValueError, r"argument 'w_scale' must have shape \(32, 4\) \(N, K // group_size\)",
         (x, w, torch.rand(32, 2)), {"group_size": 16}),
        (ValueError, r"argument 'bias' must have shape \(32,\)", (x, w, s, torch.zeros(16)), {}),
    ]
    for exc, msg, args, kw in cases:
        with pytest.raises(exc, match=msg):
            w8a16_matmul(*args, **kw)


# ----------------------------------------------------------------------------------------------
# Custom-op machinery.

@pytest.mark.parametrize("backend", ALL)
def test_opcheck(backend):
    a, b, sa, sw = _ok(5, 32, 48)
    torch.library.opcheck(torch.ops.fastllm.int8_matmul_int32.default, (a, b, backend))
    torch.library.opcheck(torch.ops.fastllm.int8_matmul.default,
                          (a, b, sa, sw, torch.randn(32, device=DEVICE), torch.bfloat16, backend))
    # fp16 out: scales of real magnitude (|acc| reaches ~1e5 here, past fp16's range unscaled).
    torch.library.opcheck(torch.ops.fastllm.int8_matmul.default,
                          (a, b, sa[:1] * 1e-3, sw, None, torch.float16, backend))
    x = torch.randn(5, 48, device=DEVICE, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.fastllm.w8a16_matmul.default, (x, b, sw, None, 0, backend))
    torch.library.opcheck(torch.ops.fastllm.w8a16_matmul.default,
                          (x, b, torch.rand(32, 3, device=DEVICE), torch.randn(32, device=DEVICE), 16, backend))


def test_torch_compile_fullgraph():
    a, b, sa, sw = _ok(6, 32, 64)
    f = torch.compile(lambda a, b, sa, sw: int8_matmul(a, b, sa, sw, out_dtype=torch.float32, backend="torch"),
                      fullgraph=True, backend="eager")
    assert torch.equal(f(a, b, sa, sw).cpu(), ref.int8_matmul(a.cpu(), b.cpu(), sa.cpu(), sw.cpu(),
                                                               out_dtype=torch.float32))


def test_examples_for_info():
    from fastllm.ops.registry import OPS
    for name in ("int8_matmul", "int8_matmul_int32", "w8a16_matmul"):
        desc, args, kw = OPS[name].example()
        reasons = OPS[name].reasons(torch.device("cpu"), *args, **kw)
        assert reasons["torch"] is None and "needs CUDA tensors" in reasons["cuda"]


# ----------------------------------------------------------------------------------------------
# GPU (skipped without one): real sizes, every M bucket.

@pytest.mark.gpu
@pytest.mark.parametrize("M", list(range(1, 34)) + [64, 97, 128, 1025])
def test_gpu_triton_sizes(M):
    K, N = 4096, 4096 + 16
    a, a_s, b, w_s = quantized_inputs(M, N, K)
    acc = int8_matmul_int32(a, b, backend="triton")
    assert torch.equal(acc.cpu().long(), exact_int(a, b))
    bias = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    out = int8_matmul(a, b, a_s, w_s, bias, out_dtype=torch.bfloat16, backend="triton")
    assert_epilogue_close(out, acc.cpu(), a_s, w_s, bias, torch.bfloat16)
    for g in (None, 128):
        x, w, s = w8a16_inputs(M, N, K, torch.bfloat16, g)
        assert_w8a16_close(w8a16_matmul(x, w, s, bias, group_size=g, backend="triton"), x, w, s, bias, g)
