"""The sm_90a (Hopper) kernels, their launchers and their Python glue, run from their own source on
CPU through the SIMT emulator's Hopper models (tests/simt/simt_hopper.cpp: wgmma dense / sparse
with 128-byte-swizzled descriptors, its fence / commit / wait, fence.proxy.async, mbarrier, TMA)
on an H100-like device (sm_90, 132 SMs, 227 KB of opt-in shared memory):

  * flash_fwd_wgmma.cuh: prefill attention, head dims 64 / 128 / 256, fp16 / bf16, against the
    float64 reference with the GPU tests' check (tests/test_attention_cuda.py), causal / masks /
    window / softcap / GQA / varlen (bit-identical to the dense kernel per sequence), the bias
    kernel (D 64 / 128) and attention sinks;
  * int8_wgmma_kernel.cuh (cp.async ring) and int8_wgmma_tma_kernel.cuh (TMA producer warp,
    FASTLLM_INT8_WGMMA=tma): W8A8 int32 accumulators exact, both tile configs, M / N / K tails,
    strided rows, the split-K path, every output dtype within test_int8.assert_epilogue_close;
  * sparse24_wgmma_kernel.cuh: 2:4 wgmma.sp fp16 / bf16 within test_sparse24.check_close, int8
    exact and its epilogue bit for bit against the reference.

Each test asserts that warpgroup MMAs (and for the TMA kernel, TMA copies) ran: the launcher
chose the Hopper kernel, not its sm80 fallback. The wgmma operand layouts the emulator reads
(descriptors, swizzle, fragments, sparse metadata) are its reading of the PTX ISA, checked
against CUTLASS's layout definitions; a GPU run is still what settles them (README).
"""
import contextlib

import pytest
import torch

import test_attention_cuda as gpu_tests
from fastllm import ref
from fastllm.ops._int8_cuda import int8_gemm_cuda
from fastllm.ops._sparse24_cuda import sparse24_cuda
from fastllm.ref.int8 import scale_epilogue
from simt.backend import emulated_cuda, hopper_counts, unavailable_reason

from test_int8 import assert_epilogue_close, exact_int
from test_simt_attention import qkv, routed_check
from test_simt_sparse24 import activations, weight
from test_sparse24 import check_close

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=f"simt emulator: {unavailable_reason()}")

SM90 = (9, 0)
DTYPES = (torch.float16, torch.bfloat16)


@contextlib.contextmanager
def hopper(tma=False, **kw):
    """The emulated H100; on leaving, asserts that wgmma (and, with tma, TMA copies) ran."""
    w0, t0 = hopper_counts()
    with emulated_cuda(sm=SM90, **kw) as mod:
        yield mod
    w1, t1 = hopper_counts()
    assert w1 > w0, "no warpgroup MMA ran: the launcher did not choose the sm_90a kernel"
    assert not tma or t1 > t0, "no TMA copy landed: the TMA-fed kernel did not run"


# ----------------------------------------------------------------------------------------------
# Prefill flash attention (flash_fwd_wgmma.cuh)

@pytest.fixture
def attention(monkeypatch):
    """gpu_tests.check with its kernel call routed through the emulated H100."""
    return routed_check(monkeypatch, hopper)


@pytest.mark.parametrize("D", (64, 128, 256))
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_matches_reference(attention, dtype, D):
    # Tails in Sq and Skv, two query blocks of 128, causal block skipping, GQA and MQA, a
    # transposed-view q (transformers' layout) and padded K / V rows.
    for (B, Hq, Hkv, Sq, Skv), causal in (((2, 2, 1, 17, 17), True), ((1, 3, 3, 1, 97), False),
                                          ((1, 2, 2, 70, 130), True), ((1, 2, 1, 150, 200), True),
                                          ((2, 4, 2, 33, 75), False)):
        attention(*qkv(B, Hq, Hkv, Sq, Skv, D, dtype), causal=causal)
    attention(*qkv(2, 4, 2, 37, 90, D, dtype, q_layout="padded", kv_layout="padded"), causal=True)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", (64, 128))
def test_attention_masks_window_softcap(attention, D, causal):
    B, Sq, Skv = 3, 37, 150
    q, k, v = qkv(B, 2, 1, Sq, Skv, D, torch.bfloat16)
    keep = torch.ones(B, 1, 1, Skv, dtype=torch.bool)
    keep[1, ..., :70] = False          # left padding past a whole key tile
    keep[2] = False                    # everything padded: every row empty (0, never NaN)
    attention(q, k, v, causal=causal, mask=keep)
    m = torch.rand(1, 1, Sq, Skv) > 0.3
    m[..., ::7, :] = False             # rows with no key, batch stride 0
    attention(q, k, v, causal=causal, mask=m.expand(B, 1, Sq, Skv))
    attention(q, k, v, causal=causal, window=16)
    attention(q, k, v, causal=causal, softcap=5.0, scale=0.3)


@pytest.mark.parametrize("D", (64, 128))
def test_attention_bias_and_sinks(attention, D):
    # The wgmma bias kernel (flash_fwd_kernel<Sm90Mma, true>): every bias case of the GPU test,
    # a masking bias, and bias + mask + window + softcap + sinks.
    B, Hq, Sq, Skv = 2, 2, 37, 150
    q, k, v = qkv(B, Hq, 1, Sq, Skv, D, torch.float16)
    for i, bias in enumerate(gpu_tests.bias_cases(B, Hq, Sq, Skv, torch.float16, device="cpu")):
        attention(q, k, v, causal=i % 2 == 1, bias=bias)
    attention(q, k, v, causal=False, bias=gpu_tests.masking_bias(Hq, Sq, Skv, torch.float16, device="cpu"))
    keep = torch.rand(B, 1, 1, Skv) > 0.2
    attention(q, k, v, causal=True, bias=gpu_tests.bias_cases(B, Hq, Sq, Skv, torch.float16, device="cpu")[1],
              mask=keep, window=50, softcap=20.0, sinks=torch.tensor([1.0, -0.5]))


@pytest.mark.parametrize("D", (64, 256))
def test_attention_sinks(attention, D):
    # Sq > Skv under causal: the first rows see nothing (lse = the sink), a whole 128-row CTA too.
    sinks = torch.tensor([-30.0, 12.0, float("-inf"), 0.5])
    for (Sq, Skv), causal in (((300, 150), True), ((37, 150), False)):
        attention(*qkv(2, 4, 2, Sq, Skv, D, torch.bfloat16), causal=causal, sinks=sinks)


def test_attention_large_scores_no_overflow(attention):
    q, k, v = qkv(1, 2, 2, 70, 130, 64, torch.float16)
    attention(q * 8, k * 8, v, causal=True, scale=1.0)


@pytest.mark.parametrize("D", (64, 256))
def test_attention_varlen_matches_per_sequence(D):
    lens_q, lens_k = [1, 70, 0, 37, 140], [1, 90, 7, 37, 133]
    cu_q = torch.tensor([0] + lens_q).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k).cumsum(0).to(torch.int32)
    q = torch.randn(int(cu_q[-1]), 4, D, dtype=torch.float16)
    k = torch.randn(int(cu_k[-1]), 2, D, dtype=torch.float16)
    v = torch.randn(int(cu_k[-1]), 2, D, dtype=torch.float16)
    with hopper():
        gpu_tests.assert_varlen_matches_per_sequence(q, k, v, cu_q, cu_k, lens_q, lens_k, window=20)


def test_attention_reads_stay_inside_the_tensors(attention):
    from simt.backend import guarded
    for side in ("start", "end"):
        q, k, v = (guarded(t, side) for t in qkv(2, 2, 1, 37, 75, 128, torch.float16, q_layout="bhsd",
                                                 kv_layout="bhsd"))
        attention(q, k, v, causal=True)


# ----------------------------------------------------------------------------------------------
# W8A8 GEMM (int8_wgmma_kernel.cuh, int8_wgmma_tma_kernel.cuh)

def rand_int8(*shape):
    return torch.randint(-128, 128, shape, dtype=torch.int8)


# (M, N, K, SMs): M > kWgmmaMinM = 128 (below it the sm80 kernel serves); M / N / K tails past
# the 128 x 128 / 128 x 256 tiles and the 128-wide K step (K = 16: one partial step); K steps
# past the ring (it wraps); 9 M tiles (the grouped raster's partial last group); 4 SMs make
# 128 x 256 tiles (config 1) cover the device.
GEMM_CASES = [(129, 48, 80, 132), (130, 272, 144, 132), (200, 16, 1040, 132), (257, 528, 208, 4),
              (300, 272, 656, 4), (385, 144, 1040, 132), (129, 16, 16, 132), (1040, 48, 80, 132)]


@pytest.mark.parametrize("variant", ["cp.async", "tma"])
def test_int8_gemm_int32_exact(monkeypatch, variant):
    monkeypatch.setenv("FASTLLM_INT8_WGMMA", variant)
    for i, (M, N, K, sms) in enumerate(GEMM_CASES):
        a = rand_int8(M, K + 32)[:, 16:16 + K] if i % 2 else rand_int8(M, K)   # strided rows, 16-byte aligned
        b = rand_int8(N, K + 16)[:, :K] if i % 3 == 1 else rand_int8(N, K)
        with hopper(tma=variant == "tma", sms=sms):
            acc = int8_gemm_cuda(a, b, None, None, None, torch.int32)
        assert acc.dtype == torch.int32 and torch.equal(acc.long(), exact_int(a, b)), (M, N, K, sms)


@pytest.mark.parametrize("variant", ["cp.async", "tma"])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_int8_gemm_epilogue(monkeypatch, variant, out_dtype):
    monkeypatch.setenv("FASTLLM_INT8_WGMMA", variant)
    for M, N, K, sms in ((131, 144, 272, 132), (260, 528, 80, 4)):
        a, b = rand_int8(M, K), rand_int8(N, K)
        a_s = torch.rand(M) * 0.02 + 1e-3 if M % 2 else torch.tensor([6e-3])
        w_s = torch.rand(N) * 0.01 + 1e-4
        bias = [None, torch.randn(N).half(), torch.randn(N)][M % 3]
        with hopper(tma=variant == "tma", sms=sms):
            out = int8_gemm_cuda(a, b, a_s, w_s, bias, out_dtype)
        assert_epilogue_close(out, exact_int(a, b), a_s.expand(M), w_s, bias, out_dtype)


def test_int8_gemm_split_k():
    # M in (128, 256] on a narrow layer: the cp.async wgmma kernel splits K (int32 partials in
    # the workspace, then the reduce kernel's epilogue).
    for M, N, K in ((200, 48, 1040), (256, 16, 2064)):
        with emulated_cuda(sm=SM90) as mod:
            assert mod.int8_gemm_workspace(0, M, N, K) > 0, (M, N, K)
        a, b = rand_int8(M, K), rand_int8(N, K)
        with hopper():
            acc = int8_gemm_cuda(a, b, None, None, None, torch.int32)
            out = int8_gemm_cuda(a, b, torch.rand(M) * 0.01, torch.rand(N) * 0.01, None, torch.bfloat16)
        assert torch.equal(acc.long(), exact_int(a, b)), (M, N, K)
        assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------------
# 2:4 sparse GEMM (sparse24_wgmma_kernel.cuh): M > 64 and K whole stages (128 fp16 / bf16
# columns, 256 int8); N tails past the 128-row W tile; more stages than the 4-slot ring.

@pytest.mark.parametrize("dtype", DTYPES, ids=["f16", "bf16"])
def test_sparse24_float(dtype):
    N, K = 144, 640
    w, values, meta = weight(N, K, dtype)
    for i, M in enumerate((65, 130, 257)):
        x = activations(M, K, dtype, strided=i % 2 == 1)
        bias = [None, torch.randn(N).to(dtype), torch.randn(N)][i % 3]
        with hopper():
            out = sparse24_cuda(x, values, meta, bias, None, None, None)
        check_close(out, x, w, bias, dtype)


def test_sparse24_int8():
    N, K = 144, 1280
    w, values, meta = weight(N, K, torch.int8)
    for i, M in enumerate((65, 130, 257)):
        a = activations(M, K, torch.int8, strided=i % 2 == 0)
        want = ref.int8_matmul_int32(a, w)
        a_s = torch.rand(M) * 9e-3 + 1e-3 if i % 2 == 0 else torch.tensor([7e-3])
        w_s = torch.rand(N) * 9e-3 + 1e-3
        bias = [None, torch.randn(N), torch.randn(N).half()][i % 3]
        out_dtype = [torch.bfloat16, torch.float32, torch.float16][i % 3]
        with hopper():
            acc = sparse24_cuda(a, values, meta, None, None, None, None)
            out = sparse24_cuda(a, values, meta, bias, a_s, w_s, out_dtype)
        assert acc.dtype == torch.int32 and torch.equal(acc, want), M
        assert torch.equal(out, scale_epilogue(want, a_s, w_s, bias, out_dtype)), M
