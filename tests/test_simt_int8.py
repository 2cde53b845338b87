"""The sm80 int8 CUDA kernels (csrc/int8/), their launchers and their Python glue
(fastllm/ops/_int8_cuda.py, the quantize op's cuda impl), run from their own source on CPU
through the SIMT emulator (tests/simt/), on an A100-like (sm80, 108 SMs) and an sm86-like
(84 SMs, 99 KB of shared memory) device, against fastllm/ref with the GPU tests' checks:

  * W8A8 GEMM (int8_gemm_kernel.cuh): int32 accumulators exact for every M of 1..33 and a
    sample up to 130 and 1040 (tile configs 0-3, config 4 on a 4-SM device; N and K tails,
    strided rows, extreme values, the CTA raster past one group), the split-K path (int32
    partials in the workspace + the reduce kernel) bit-identical to the single pass;
    fp16/bf16/fp32 outputs with per-row or per-tensor a_scale, w_scale and every bias dtype
    within test_int8.assert_epilogue_close.
  * W8A16 decode GEMM (w8a16_gemm_kernel.cuh; the cuda backend's W8A16 serves M <= 16, larger M
    go to triton): M 1..16, per-channel and group scales, 4 / 8 warps, 1 / 2 token tiles, K
    tails, strided x, w and scales, within test_int8.assert_w8a16_close.
  * K = 0 on every kernel (zeros / bias / scale 1).
  * quantize_static.cu and quantize_per_token.cu: bit-identical to ref.quantize_static /
    ref.quantize_per_token (ties to even, NaN / inf / zero / tiny rows, vector and scalar paths).
  * the fused W8A8 decode kernel (w8a8_decode_kernel.cuh), dynamic (with / without SmoothQuant)
    and static (per-tensor / per-channel multiplier): quantization bits exact (identity weights),
    bit-identical to the two-launch path (quantize kernel + GEMM) and within the epilogue bound
    of the reference.

Every output buffer the glue allocates is poisoned first (NaN / the integer minimum), so an
element the kernels never write shows. The emulator runs the kernels' C++ with ldmatrix / mma /
cp.async modelled per the PTX ISA; not covered: the hardware itself (memory ordering, timing,
registers); the sm_90a wgmma kernels: tests/test_simt_hopper.py. Shapes are small (each CTA's threads are fibers).
"""
import contextlib

import pytest
import torch

from fastllm import _ext, ref
from fastllm.ops import _int8_cuda
from fastllm.ops import quantize as quantize_op
from fastllm.ops.int8_static import input_multiplier
from fastllm.ops._int8_cuda import int8_gemm_cuda, quantize_static_cuda, w8a16_cuda, w8a8_fused_cuda
from simt.backend import DEVICES as SIMT_DEVICES, emulated_cuda, unavailable_reason

from test_int8 import assert_epilogue_close, assert_w8a16_close, exact_int

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=f"simt emulator: {unavailable_reason()}")

DEVICES = [(8, 0), (8, 6)]
FLOATS = [torch.float16, torch.bfloat16, torch.float32]


@pytest.fixture(params=DEVICES, ids=lambda sm: f"sm{sm[0]}{sm[1]}")
def emu(request):
    """Context manager factory: the emulated device of this test (whose torch.empty fills the
    glue's outputs and workspace with NaN / the integer minimum / 0xFF bytes)."""
    sm = request.param

    @contextlib.contextmanager
    def ctx(sms=None):
        with emulated_cuda(sm=sm, sms=sms) as mod:
            yield mod
    ctx.sm = sm
    ctx.sms = SIMT_DEVICES[sm][0]
    return ctx


def rand_int8(*shape):
    return torch.randint(-128, 128, shape, dtype=torch.int8)


def strided_int8(M, K, pad=16):
    """(M, K) int8 with row stride K + pad and a 16-byte aligned start (a column slice)."""
    return rand_int8(M, K + pad)[:, pad:]


# ----------------------------------------------------------------------------------------------
# W8A8 GEMM, int32.

# (M, N, K): every M bucket (configs 0..3 and M > 128), N / K not multiples of the tiles
# (BN 32..128, BK 64..256), several M tiles and N tiles.
INT32_CASES = [(1, 16, 16), (1, 48, 80), (2, 272, 144), (7, 112, 272), (15, 48, 1040), (16, 64, 208),
               (17, 48, 80), (31, 112, 272), (32, 16, 48), (33, 144, 80), (50, 48, 272), (64, 272, 144),
               (65, 48, 80), (97, 112, 272), (127, 48, 208), (128, 16, 80), (129, 48, 80), (130, 272, 144)]


def test_gemm_int32_exact(emu):
    with emu() as mod:
        for i, (M, N, K) in enumerate(INT32_CASES):
            a = strided_int8(M, K) if i % 3 == 1 else rand_int8(M, K)
            b = strided_int8(N, K, 32) if i % 4 == 2 else rand_int8(N, K)
            acc = int8_gemm_cuda(a, b, None, None, None, torch.int32)
            assert acc.dtype == torch.int32 and acc.shape == (M, N)
            assert torch.equal(acc.long(), exact_int(a, b)), (M, N, K, mod.int8_gemm_plan(M, N, K, emu.sms))


def test_gemm_int32_m_sweep(emu):
    # Every M of 1..33 (configs 0-2, each tile edge), and 9 M tiles of 128 (config 3 past one
    # kGroupM = 8 raster group: the last group is partial).
    K, N = 80, 48
    b = rand_int8(N, K)
    with emu() as mod:
        for M in list(range(1, 34)) + [1040]:
            a = rand_int8(M, K)
            acc = int8_gemm_cuda(a, b, None, None, None, torch.int32)
            assert torch.equal(acc.long(), exact_int(a, b)), (M, mod.int8_gemm_plan(M, N, K, emu.sms))


@pytest.mark.parametrize("out_dtype", [torch.int32, torch.bfloat16])
def test_gemm_large_tiles(emu, out_dtype):
    # A device with 4 SMs: M > 128 whose 128 x 256 tiles cover the SMs takes config 4 (8 warps,
    # 3 stages, 72 KB); N tails inside a 256-wide tile, several M tiles, strided a.
    with emu(sms=4) as mod:
        for M, N, K in ((257, 272, 80), (1100, 528, 48), (520, 16, 208)):
            a, b = strided_int8(M, K), rand_int8(N, K)
            assert mod.int8_gemm_plan(M, N, K, 4)[0] == 4, (M, N, K)
            a_s, w_s = torch.rand(M) * 0.02 + 1e-3, torch.rand(N) * 0.01 + 1e-4
            bias = torch.randn(N).half()
            out = int8_gemm_cuda(a, b, a_s, w_s, bias, out_dtype)
            if out_dtype == torch.int32:
                assert torch.equal(out.long(), exact_int(a, b)), (M, N, K)
            else:
                assert_epilogue_close(out, exact_int(a, b), a_s, w_s, bias, out_dtype)


def test_k_zero(emu):
    # K = 0 (an empty reduction): int32 zeros, scaled outputs = bias, per-token scale 1.
    N = 48
    b = torch.empty(N, 0, dtype=torch.int8)
    bias = torch.randn(N)
    for M in (1, 9, 20):
        a = torch.empty(M, 0, dtype=torch.int8)
        x = torch.empty(M, 0, dtype=torch.bfloat16)
        want = bias.to(torch.bfloat16).expand(M, N)
        with emu():
            acc = int8_gemm_cuda(a, b, None, None, None, torch.int32)
            assert torch.equal(acc, torch.zeros(M, N, dtype=torch.int32))
            assert torch.equal(int8_gemm_cuda(a, b, torch.rand(M), torch.rand(N), bias, torch.bfloat16), want)
            q, s = _quantize_per_token(x)
            assert q.shape == (M, 0) and torch.equal(s, torch.ones(M))
            assert quantize_static_cuda(x, torch.tensor([2.0])).shape == (M, 0)
            if M <= 16:
                assert torch.equal(w8a16_cuda(x, b, torch.rand(N), bias, None), want)
                assert torch.equal(w8a8_fused_cuda(x, b, None, None, torch.rand(N), bias, True), want)
                assert torch.equal(w8a8_fused_cuda(x, b, torch.tensor([2.0]), torch.tensor([0.5]), torch.rand(N), bias,
                                                   False), want)


def test_gemm_int32_extremes(emu):
    # Every product at its extreme (-128 * -128), both signs; K = 16 tiles of 256 split 4 ways on
    # one output tile (int32 partials, then the reduce kernel).
    K = 4096
    a = torch.full((3, K), -128, dtype=torch.int8)
    a[1] = 127
    a[2, ::2] = 127
    b = torch.full((16, K), -128, dtype=torch.int8)
    b[5] = 127
    b[7, 1::2] = 127
    with emu() as mod:
        assert mod.int8_gemm_plan(3, 16, K, emu.sms)[1] == 4
        acc = int8_gemm_cuda(a, b, None, None, None, torch.int32)
    assert acc[0, 0].item() == K * 16384
    assert torch.equal(acc.long(), exact_int(a, b))


# (M, N, K) whose plan splits K on both emulated devices: configs 0 (BK 256), 1 (128), 2 and 3
# (64), with a K tail in the last slice and slices of unequal length.
SPLIT_CASES = [(1, 48, 2064), (5, 16, 4096 + 16), (20, 64, 1040), (50, 112, 1040), (100, 112, 1040)]


@pytest.mark.parametrize("out_dtype", [torch.int32, torch.float16, torch.bfloat16, torch.float32])
def test_gemm_split_k_equals_single_pass(emu, out_dtype):
    # The launcher called directly with and without the workspace: int32 bit-identical (and
    # exact), scaled outputs identical (the epilogue sees the same int32 sum).
    with emu() as mod:
        lib = _ext.lib()
        for i, (M, N, K) in enumerate(SPLIT_CASES):
            config, splits = mod.int8_gemm_plan(M, N, K, emu.sms)
            assert splits > 1, (M, N, K, config)
            a = strided_int8(M, K) if i % 2 else rand_int8(M, K)
            b = rand_int8(N, K)
            a_s = torch.rand(M if i % 2 else 1) * 0.02 + 1e-3
            w_s = torch.rand(N) * 0.01 + 1e-4
            bias = torch.randn(N).to(FLOATS[i % 3]) if i % 2 == 0 else None
            ws_bytes = lib.int8_gemm_workspace(None, M, N, K)
            assert ws_bytes == splits * M * N * 4
            ws = torch.empty(ws_bytes, dtype=torch.uint8)
            scaled = out_dtype != torch.int32
            outs = []
            for wsp, nb in ((0, 0), (ws.data_ptr(), ws_bytes)):
                out = torch.empty((M, N), dtype=out_dtype)
                code = lib.int8_gemm(None, a.data_ptr(), a.stride(0), b.data_ptr(), b.stride(0), out.data_ptr(),
                                     _ext.DTYPE_CODES[out_dtype], a_s.data_ptr() if scaled else 0, a_s.numel(),
                                     w_s.data_ptr() if scaled else 0,
                                     bias.data_ptr() if scaled and bias is not None else 0,
                                     _ext.DTYPE_CODES[bias.dtype] if scaled and bias is not None else 0,
                                     M, N, K, wsp, nb, 0)
                _ext.check(code, "int8_gemm")
                outs.append(out)
            assert torch.equal(outs[0], outs[1]), (M, N, K, out_dtype)
            if scaled:
                assert_epilogue_close(outs[1], exact_int(a, b), a_s, w_s, bias, out_dtype)
            else:
                assert torch.equal(outs[1].long(), exact_int(a, b)), (M, N, K)
            # The glue takes the split path (it asks for the workspace) with the same result.
            via_glue = int8_gemm_cuda(a, b, a_s, w_s, bias, out_dtype)
            assert torch.equal(via_glue, outs[1]), (M, N, K, out_dtype)


# ----------------------------------------------------------------------------------------------
# W8A8 GEMM, scaled outputs.

@pytest.mark.parametrize("static", [False, True], ids=["per-row", "per-tensor"])
@pytest.mark.parametrize("out_dtype", FLOATS)
def test_gemm_scaled(emu, out_dtype, static):
    for i, (M, N, K) in enumerate([(1, 48, 80), (2, 112, 272), (16, 48, 2064), (17, 64, 208), (33, 48, 1040),
                                   (64, 112, 80), (65, 48, 272), (97, 144, 80), (129, 48, 144)]):
        a = strided_int8(M, K) if i % 2 else rand_int8(M, K)
        b = rand_int8(N, K)
        a_s = torch.rand(M) * 0.02 + 1e-3
        if static:   # one calibrated scale: 0-d, (1,) and (1, 1) all mean per tensor
            a_s = (torch.tensor(0.0123), torch.tensor([0.0071]), torch.tensor([[0.031]]))[i % 3]
        w_s = torch.rand(N) * 0.01 + 1e-4
        bias = None if i % 4 == 0 else torch.randn(N).to(FLOATS[i % 3])
        with emu():
            out = int8_gemm_cuda(a, b, a_s, w_s, bias, out_dtype)
        assert_epilogue_close(out, exact_int(a, b), a_s, w_s, bias, out_dtype)


def test_gemm_scaled_realistic_and_strided_vectors(emu):
    # Operands from the quantizers (per-token a, per-channel b), a_scale / w_scale / bias given as
    # strided views (the glue makes them contiguous), large biases.
    M, N, K = 37, 80, 208
    a, a_s = ref.quantize_per_token(torch.randn(M, K) * (torch.rand(M, 1) * 4 + 0.1))
    b, w_s = ref.quantize_per_token(torch.randn(N, K) * 0.05)
    a_s2 = torch.stack([a_s, torch.zeros(M)], 1)[:, 0]
    w_s2 = torch.stack([w_s, torch.zeros(N)], 1)[:, 0]
    bias = (torch.randn(2 * N) * 100).to(torch.bfloat16)[::2]
    assert not a_s2.is_contiguous() and not bias.is_contiguous()
    for od in FLOATS:
        with emu():
            out = int8_gemm_cuda(a, b, a_s2, w_s2, bias, od)
        assert_epilogue_close(out, exact_int(a, b), a_s, w_s, bias, od)


# ----------------------------------------------------------------------------------------------
# W8A16 decode GEMM.

@pytest.mark.parametrize("group_size", [None, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_w8a16(emu, dtype, group_size):
    # M 1..16 (1 and 2 token tiles); K < 1024 (4 warps) and >= 1024 (8 warps), K > 2048 (a
    # warp's second pass of kW8A16Unroll blocks); K % 64 != 0 (a tail block) where the group
    # allows it; bias of each dtype.
    Ks = {None: (2064, 208, 640, 1040), 64: (2112, 192, 640, 1152), 128: (2176, 256, 640, 1280)}[group_size]
    for i, M in enumerate(range(1, 17)):
        K, N = Ks[i % 4], (32, 48, 16, 32)[i % 4]
        x = torch.randn(M, K).to(dtype)
        w = rand_int8(N, K)
        shape = (N,) if not group_size else (N, K // group_size)
        s = (torch.rand(shape) + 0.5) * 0.01
        bias = torch.randn(N).to(FLOATS[M % 3]) if M % 2 else None
        with emu():
            out = w8a16_cuda(x, w, s, bias, group_size)
        assert_w8a16_close(out, x, w, s, bias, group_size)


def test_w8a16_strided(emu):
    for dtype in (torch.float16, torch.bfloat16):
        # Strided x (row stride K + 8), K not a multiple of 64, strided w.
        x = torch.randn(5, 208 + 8).to(dtype)[:, 8:]
        w = strided_int8(32, 208)
        s = torch.rand(32) + 0.5
        # Transposed-storage group scales: (32, 3) with strides (1, 32).
        s2 = (torch.rand(3, 32) + 0.5).t()
        w2 = rand_int8(32, 192)
        x2 = torch.randn(11, 192).to(dtype)
        b2 = torch.randn(32).to(torch.float32)
        # Per-channel scales as a (N, 1) column of a wider tensor.
        s3 = (torch.rand(32, 2) + 0.5)[:, :1]
        with emu():
            out = w8a16_cuda(x, w, s, None, None)
            out2 = w8a16_cuda(x2, w2, s2, b2, 64)
            out3 = w8a16_cuda(x, w, s3, None, None)
        assert_w8a16_close(out, x, w, s, None, None)
        assert_w8a16_close(out2, x2, w2, s2, b2, 64)
        assert_w8a16_close(out3, x, w, s3.reshape(-1), None, None)
    assert "M = 17 > 16" in _int8_cuda.w8a16_supports(torch.randn(17, 64).half(), rand_int8(16, 64),
                                                     torch.rand(16), None, 0)


# ----------------------------------------------------------------------------------------------
# Quantization kernels.

def _ties_and_specials(x, dtype, scale):
    """Row 0: exact ties (x * scale = k + 0.5) and the clamp edges; row 1: NaN, +-inf, huge."""
    x[0, :8] = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 126.5, -126.5, 3.5]) / scale
    x[1, :5] = torch.tensor([float("nan"), float("inf"), -float("inf"), 6e4, -6e4])
    return x.to(dtype)


@pytest.mark.parametrize("dtype", FLOATS)
def test_quantize_static(emu, dtype):
    # Vector path (aligned rows, K % (16 / size) == 0) and scalar path (odd K, odd row stride,
    # misaligned start); per-tensor and per-channel multipliers; a broadcast (row stride 0) x.
    cases = [(5, 80, 0, 0), (3, 17, 0, 0), (2, 1, 0, 0), (4, 40, 3, 0), (2, 64, 0, 1), (33, 136, 8, 0)]
    for M, K, pad, shift in cases:
        x = (torch.randn(M, K + pad + shift) * 40).to(dtype)[:, shift:shift + K]
        x[:2, :8] = _ties_and_specials(torch.zeros(2, 8), dtype, 8.0)[:, :K]
        for in_mul in (torch.tensor([8.0]), torch.rand(K) * 4 + 0.25, torch.tensor(8.0)):
            if in_mul.dim() == 1 and in_mul.numel() == K:
                in_mul[:3] = 8.0   # keep the ties of row 0 (x * 8 = k + 0.5 exactly)
            with emu():
                q = quantize_static_cuda(x, in_mul)
            want = ref.quantize_static(x, in_mul.reshape(-1))
            assert q.dtype == torch.int8 and q.is_contiguous()
            assert torch.equal(q, want), (M, K, pad, shift, in_mul.numel())
            if K >= 8:
                assert want[0, :3].tolist() == [0, 2, 2] and want[1, :3].tolist() == [0, 127, -127]
    row = torch.randn(1, 96).to(dtype)
    with emu():
        q = quantize_static_cuda(row.expand(6, 96), torch.tensor([30.0]))
    assert torch.equal(q, ref.quantize_static(row.expand(6, 96), torch.tensor([30.0])))


def _near_ties(M):
    """(M, 256) fp32 rows of amax a holding fp32(+-a * (j + 0.5) / 127), j = 0..126: x * (127 / a)
    lands within an ulp or two of a tie, so q depends on 127 / a being the IEEE quotient (not
    127 * (1 / a), an ulp off for some a), on the single rounding of the product and on
    round-half-even."""
    a = torch.rand(M) * 10 + 0.1
    half = (a.double()[:, None] * (torch.arange(127, dtype=torch.float64) + 0.5) / 127).float()
    return torch.cat([a[:, None], half, -half, torch.zeros(M, 1)], 1)


def _quantize_per_token(x):
    """The quantize op's cuda implementation (the glue of csrc/int8/quantize_per_token.cu)."""
    return quantize_op.OP.impls["cuda"](x)


def _assert_per_token_exact(q, s, x):
    rq, rs = ref.quantize_per_token(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and q.shape == x.shape and q.is_contiguous()
    torch.testing.assert_close(q, rq, rtol=0, atol=0)
    torch.testing.assert_close(s, rs, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", FLOATS)
def test_quantize_per_token(emu, dtype):
    # Vector and scalar paths, K past one pass of the 256-thread block (K > 256 vectors), strided,
    # misaligned and broadcast rows, and the edge rows: zero, NaN, inf, tiny, exact ties.
    for M, K, pad, shift in ((1, 1, 0, 0), (3, 17, 0, 0), (17, 97, 0, 0), (2, 4096 + 8, 0, 0), (7, 45, 7, 0),
                             (4, 64, 0, 3), (9, 256, 8, 0)):
        base = torch.randn(M, K + pad + shift) * torch.rand(M, 1) * 10
        x = base.to(dtype)[:, shift:shift + K]
        with emu():
            q, s = _quantize_per_token(x)
        _assert_per_token_exact(q, s, x)
    x = torch.randn(7, 80)
    x[0, :8] = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 126.5, -126.5, 127.0])   # amax 127: ties at inv 1
    x[0, 8:] = 0
    x[1] = 0.0                      # all-zero row: scale 1, q 0
    x[2, 3] = float("nan")          # NaN row: scale NaN, q 0
    x[3, 0] = -float("inf")         # inf row: likewise
    x[4] = 1e-30 if dtype != torch.float16 else 1e-6
    x[5, :4] = torch.tensor([1e-38, -2e-38, 0.0, 5e-39])   # amax < 127 / FLT_MAX: 127 / amax = inf
    x[5, 4:] = 0.0
    x = x.to(dtype)
    with emu():
        q, s = _quantize_per_token(x)
    _assert_per_token_exact(q, s, x)
    assert q[0, :8].tolist() == [0, 2, 2, 0, -2, 126, -126, 127] and s[0].item() == 1.0
    assert s[1].item() == 1.0 and (q[1] == 0).all()
    assert torch.isnan(s[2:4]).all() and (q[2:4] == 0).all()
    if dtype != torch.float16:
        assert q[5, :4].tolist() == [127, -127, 0, 127] and (q[5, 4:] == 0).all()
    x = _near_ties(32).to(dtype)
    with emu():
        q, s = _quantize_per_token(x)
    _assert_per_token_exact(q, s, x)
    row = torch.randn(1, 96).to(dtype)
    with emu():
        q, s = _quantize_per_token(row.expand(5, 96))
    _assert_per_token_exact(q, s, row.expand(5, 96).contiguous())


# ----------------------------------------------------------------------------------------------
# Fused W8A8 decode kernel.

def _act(M, K, dtype, strided):
    x = torch.randn(M, K + 8) * 3 if strided else torch.randn(M, K) * 3
    x[0, :: max(K // 5, 1)] *= 40            # outlier channels (static clamps)
    x = x.to(dtype)
    return x[:, 8:] if strided else x


def _two_launch(x, b, w_s, bias, smooth, act_scale, in_mul, dynamic):
    """The unfused cuda path of the same call: the quantize kernel, then the GEMM."""
    if dynamic:
        q, a_s = _quantize_per_token(x if smooth is None else x.to(torch.float32) * smooth)
    else:
        q, a_s = quantize_static_cuda(x, in_mul), act_scale
    return int8_gemm_cuda(q, b, a_s, w_s, bias, x.dtype)


FUSED_MODES = ["dynamic", "dynamic-smooth", "static", "static-per-channel"]


@pytest.mark.parametrize("mode", FUSED_MODES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_fused_matches_two_launches_and_reference(emu, dtype, mode):
    # M 1..16 (1 and 2 token tiles), K < 1024 (4 warps) and > 2048 (8 warps, a second pass of
    # the unrolled loads), K % 64 != 0, padded x rows, a NaN row (dynamic: the whole output row
    # NaN, as on the two-launch path).
    dynamic = mode.startswith("dynamic")
    for M in (1, 2, 3, 7, 8, 9, 12, 16):
        K, N = ((208, 48), (2064, 32), (272, 16))[M % 3]
        x = _act(M, K, dtype, strided=M % 2 == 1)
        nan_row = dynamic and M > 3
        if nan_row:
            x[M - 1, 5] = float("nan")
        b = rand_int8(N, K)
        w_s = torch.rand(N) * 0.01 + 1e-4
        bias = torch.randn(N).to(FLOATS[M % 3]) if M % 3 != 0 else None
        smooth = torch.rand(K) + 0.5 if mode in ("dynamic-smooth", "static-per-channel") else None
        act_scale = torch.tensor([0.05])
        in_mul = None if dynamic else input_multiplier(act_scale, smooth)
        with emu():
            out = w8a8_fused_cuda(x, b, smooth if dynamic else in_mul, None if dynamic else act_scale, w_s, bias,
                                  dynamic)
            two = _two_launch(x, b, w_s, bias, smooth, act_scale, in_mul, dynamic)
        torch.testing.assert_close(out, two, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"M={M}: {m}")
        if dynamic:
            q, a_s = ref.quantize_per_token(x if smooth is None else x.float() * smooth)
        else:
            q, a_s = ref.quantize_static(x, in_mul), act_scale
        rows = slice(0, M - 1) if nan_row else slice(0, M)
        assert_epilogue_close(out[rows], exact_int(q, b)[rows], a_s[rows] if dynamic else a_s, w_s, bias, dtype)
        if nan_row:
            assert torch.isnan(out[M - 1]).all()


@pytest.mark.parametrize("dtype", FLOATS)
def test_fused_quantization_bits(emu, dtype):
    # Identity weights, unit w_scale: out = rn(q * a_scale) exactly, so the quantized activations
    # are checked bit for bit: ties to even, zero / NaN / inf / huge rows, tiny rows (127 / amax
    # = inf: the clamped dynamic mode), static saturation and NaN -> 0. Both token tiles.
    K = 80
    eye = torch.eye(K, dtype=torch.int8)
    ones = torch.ones(K)
    for M in (6, 11):
        x = torch.randn(M, K) * 40
        x[0, :8] = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 126.5, -126.5, 127.0])   # amax 127
        x[0, 8:] = 0
        x[1, 3] = float("nan")
        x[2, 7] = -float("inf")
        x[3] = 0
        x[4, :3] = torch.tensor([6e4, -6e4, 3.0])
        if dtype != torch.float16:   # fp16 cannot hold a value below 127 / FLT_MAX
            x[5] = 0
            x[5, :3] = torch.tensor([1e-38, -3e-38, 2e-39])
        x = x.to(dtype)
        for smooth in (None, torch.rand(K) + 0.5):
            with emu():
                out = w8a8_fused_cuda(x, eye, smooth, None, ones, None, True)
            q, a_s = ref.quantize_per_token(x if smooth is None else x.float() * smooth)
            want = (q.float() * a_s[:, None]).to(dtype)
            torch.testing.assert_close(out, want, rtol=0, atol=0, equal_nan=True,
                                       msg=lambda m: f"dynamic M={M} smooth={smooth is not None}: {m}")
            if smooth is None and dtype != torch.float16:
                assert q[5, :3].tolist() == [127, -127, 127] and (q[5, 3:] == 0).all()
        # Near-tie rows (_near_ties): the kernel's 127 / amax and its rounding bit for bit.
        xt = _near_ties(M).to(dtype)
        eye_t = torch.eye(xt.shape[1], dtype=torch.int8)
        with emu():
            out = w8a8_fused_cuda(xt, eye_t, None, None, torch.ones(xt.shape[1]), None, True)
        q, a_s = ref.quantize_per_token(xt)
        torch.testing.assert_close(out, (q.float() * a_s[:, None]).to(dtype), rtol=0, atol=0,
                                   msg=lambda m: f"near ties M={M}: {m}")
        # Static: a power-of-two act_scale keeps in_mul = smooth * 8 and out * 8 exact.
        xs = _ties_and_specials(torch.randn(M, K) * 40, dtype, 8.0)
        act_scale = torch.tensor([0.125])
        for smooth in (None, torch.rand(K) + 0.5):
            in_mul = input_multiplier(act_scale, smooth)
            with emu():
                out = w8a8_fused_cuda(xs, eye, in_mul, act_scale, ones, None, False)
            want = ref.quantize_static(xs, in_mul)
            assert torch.equal(out.double() * 8, want.double()), f"static M={M} smooth={smooth is not None}"
