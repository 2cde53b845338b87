"""The CUDA prefill flash-attention kernel, its launcher and its Python glue, run from their own
source on CPU through the SIMT emulator (tests/simt/), against the float64 reference with the
GPU tests' checks (tests/test_attention_cuda.py `check`: error at most 2x PyTorch's own in the
same dtype, rows without keys exactly 0 / -inf, no NaN).

The emulator executes the kernel's C++ with ldmatrix / mma / cp.async modelled per the PTX ISA
(cp.async data only visible after the issuing thread's wait_group; unwritten shared memory reads
as NaN), so index math, fragment layouts, swizzles, the pipeline's waits, masking, the online
softmax and the epilogue all run as written. Not covered: the hardware itself (memory ordering,
timing, registers); the sm_90a wgmma kernel: tests/test_simt_hopper.py. Also the bias kernels
(flash_fwd_kernel<Mma, true>, head dims 64 / 80 / 96 / 128) and the sinks of the epilogue. Shapes
are small (each CTA's threads are fibers).
"""
import pytest
import torch

import test_attention_cuda as gpu_tests
from simt.backend import emulated_cuda, unavailable_reason
from fastllm.ops._attention_cuda import BIAS_HEAD_DIMS, HEAD_DIMS, flash_attention_cuda

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=f"simt emulator: {unavailable_reason()}")

DTYPES = (torch.float16, torch.bfloat16)
DEVICES = ((8, 0), (8, 6))   # A100-like (163 KB opt-in shared memory), sm86-like (99 KB)


def routed_check(monkeypatch, emulator):
    """gpu_tests.check with its kernel call run on CPU tensors inside `emulator()` (a context
    manager: the emulated device)."""
    def run(q, k, v, *, causal, scale=None, mask=None, window=None, softcap=None, sinks=None, bias=None):
        with emulator():
            return flash_attention_cuda(q, k, v, mask, causal, scale if scale else q.shape[-1] ** -0.5,
                                        window or 0, softcap or 0.0, sinks, bias)
    monkeypatch.setattr(gpu_tests, "run_cuda", run)
    return gpu_tests.check


@pytest.fixture
def emulated(monkeypatch, request):
    """gpu_tests.check with its kernel call routed through the emulator on CPU tensors."""
    sm = getattr(request, "param", (8, 0))
    return routed_check(monkeypatch, lambda: emulated_cuda(sm=sm))


def qkv(B, Hq, Hkv, Sq, Skv, D, dtype, **kw):
    return gpu_tests.make_qkv(B, Hq, Hkv, Sq, Skv, D, dtype, device="cpu", **kw)


@pytest.mark.parametrize("emulated", DEVICES, indirect=True)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(emulated, dtype, D):
    # Tails in Sq and Skv, a query block past the first, causal block skipping, GQA and MQA.
    for (B, Hq, Hkv, Sq, Skv), causal in (((2, 2, 1, 17, 17), True), ((1, 3, 3, 1, 97), False),
                                          ((1, 2, 2, 70, 130), True), ((2, 4, 2, 33, 75), False)):
        emulated(*qkv(B, Hq, Hkv, Sq, Skv, D, dtype), causal=causal)


@pytest.mark.parametrize("q_layout,kv_layout", [("bhsd", "bhsd"), ("padded", "padded"), ("bhsd", "padded")])
@pytest.mark.parametrize("D", (64, 80))
def test_layouts(emulated, q_layout, kv_layout, D):
    emulated(*qkv(2, 4, 2, 37, 90, D, torch.float16, q_layout=q_layout, kv_layout=kv_layout), causal=True)


@pytest.mark.parametrize("Sq,Skv", [(17, 1), (70, 33)])
def test_causal_more_queries_than_keys(emulated, Sq, Skv):
    emulated(*qkv(2, 2, 1, Sq, Skv, 64, torch.bfloat16), causal=True)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", (64, 96))
@pytest.mark.parametrize("dtype", DTYPES)
def test_padding_mask(emulated, dtype, D, causal):
    B, Sq, Skv = 3, 37, 150
    q, k, v = qkv(B, 2, 1, Sq, Skv, D, dtype)
    keep = torch.ones(B, 1, 1, Skv, dtype=torch.bool)
    keep[1, ..., :70] = False          # left padding past a whole key tile: the scan narrows the loop
    keep[2] = False                    # everything padded: every row empty
    emulated(q, k, v, causal=causal, mask=keep)
    m = torch.rand(1, 1, Sq, Skv) > 0.3
    m[..., ::7, :] = False             # rows with no key, batch stride 0
    emulated(q, k, v, causal=causal, mask=m.expand(B, 1, Sq, Skv))
    mt = (torch.rand(B, 1, Skv, Sq) > 0.5).transpose(-1, -2)   # non-contiguous
    emulated(q, k, v, causal=causal, mask=mt)
    mid = torch.zeros(B, 1, Sq, Skv, dtype=torch.bool)
    mid[..., 65:131] = True            # only a middle range of keys, unaligned at both ends
    emulated(q, k, v, causal=False, mask=mid)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [1, 16, 100])
def test_window(emulated, window, causal):
    for Sq, Skv in ((33, 150), (140, 140)):
        emulated(*qkv(1, 2, 1, Sq, Skv, 64, torch.float16), causal=causal, window=window)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softcap(emulated, dtype):
    q, k, v = qkv(2, 2, 1, 33, 140, 128, dtype)
    emulated(q, k, v, causal=True, softcap=5.0, scale=0.3)
    keep = torch.rand(2, 1, 1, 140) > 0.2
    emulated(q, k, v, causal=False, softcap=50.0, window=64, mask=keep)


def test_large_scores_no_overflow(emulated):
    q, k, v = qkv(1, 2, 2, 70, 130, 64, torch.float16)
    emulated(q * 8, k * 8, v, causal=True, scale=1.0)


def test_no_keys():
    q = torch.randn(2, 4, 17, 64, dtype=torch.float16)
    k = torch.randn(2, 4, 0, 64, dtype=torch.float16)
    with emulated_cuda():
        out, lse = flash_attention_cuda(q, k, k, None, False, 0.125, 0, 0.0)
    assert (out == 0).all() and torch.isinf(lse).all() and (lse < 0).all()
    sinks = torch.tensor([-1.0, 0.5, 2.0, float("-inf")])
    with emulated_cuda():
        out, lse = flash_attention_cuda(q, k, k, None, False, 0.125, 0, 0.0, sinks)   # the fill kernel
    assert (out == 0).all() and torch.equal(lse, sinks.view(1, 4, 1).expand(2, 4, 17))


@pytest.mark.parametrize("emulated", DEVICES, indirect=True)
@pytest.mark.parametrize("D", BIAS_HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bias(emulated, dtype, D):
    # Every bias shape / view / dtype of the GPU test, on tails in Sq and Skv and two key tiles.
    B, Hq, Hkv, Sq, Skv = 2, 2, 1, 37, 75
    q, k, v = qkv(B, Hq, Hkv, Sq, Skv, D, dtype)
    for i, bias in enumerate(gpu_tests.bias_cases(B, Hq, Sq, Skv, dtype, device="cpu")):
        emulated(q, k, v, causal=i % 2 == 0, bias=bias)
    emulated(q, k, v, causal=False, bias=gpu_tests.masking_bias(Hq, Sq, Skv, dtype, device="cpu"))


@pytest.mark.parametrize("causal", [False, True])
def test_bias_with_everything(emulated, causal):
    # bias + padding mask (a row without keys) + window + softcap + sinks, GQA, Sq > Skv.
    B, Hq, Hkv, Sq, Skv = 2, 4, 2, 80, 70
    q, k, v = qkv(B, Hq, Hkv, Sq, Skv, 64, torch.bfloat16)
    keep = torch.rand(B, 1, Sq, Skv) > 0.2
    keep[1, 0, 3] = False
    sinks = torch.tensor([-2.0, 0.0, 3.0, float("-inf")])
    bias = gpu_tests.bias_cases(B, Hq, Sq, Skv, torch.bfloat16, device="cpu")[1]
    emulated(q, k, v, causal=causal, mask=keep, window=40, softcap=20.0, sinks=sinks, bias=bias)
    emulated(q, k, v, causal=causal, mask=keep, sinks=sinks, bias=bias.float(), scale=0.3)


def test_bias_declined_at_head_dim_256():
    q, k, v = qkv(1, 2, 1, 17, 33, 256, torch.float16)
    with pytest.raises(ValueError, match="bias at head dim 256"):
        flash_attention_cuda(q, k, v, None, True, 0.0625, 0, 0.0, None, torch.zeros(1, 2, 17, 33))


@pytest.mark.parametrize("emulated", DEVICES, indirect=True)
@pytest.mark.parametrize("D", (64, 80, 256))
@pytest.mark.parametrize("dtype", DTYPES)
def test_sinks(emulated, dtype, D):
    # Sinks from far below the scores to far above; -inf: none. Causal with Sq > Skv: rows
    # without keys (lse = the sink); a CTA whose rows see nothing (the early exit).
    sinks = torch.tensor([-30.0, 12.0, float("-inf"), 0.5])
    for (Sq, Skv), causal in (((37, 75), True), ((150, 33), True), ((17, 90), False)):
        q, k, v = qkv(2, 4, 2, Sq, Skv, D, dtype)
        out, lse = emulated(q, k, v, causal=causal, sinks=sinks)
        if Sq > Skv:
            assert (out[:, :Sq - Skv] == 0).all()
            assert torch.equal(lse[:, :, :Sq - Skv], sinks.view(1, 4, 1).expand(2, 4, Sq - Skv))
    keep = torch.rand(2, 1, 1, 90) > 0.3
    keep[1] = False                              # every row of the second sequence empty
    emulated(q, k, v, causal=False, sinks=sinks, mask=keep, softcap=30.0)


def test_varlen_sinks():
    # The sink joins each sequence's rows (a sequence without keys: lse = the sink); rows no
    # sequence covers keep out 0 / lse -inf.
    from fastllm import ref
    lens_q, lens_k = [3, 40, 0, 9, 20], [0, 70, 5, 3, 33]
    cu_q = torch.tensor([0] + lens_q).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k).cumsum(0).to(torch.int32)
    q = torch.randn(int(cu_q[-1]) + 2, 4, 64, dtype=torch.float16)
    k = torch.randn(int(cu_k[-1]), 2, 64, dtype=torch.float16)
    v = torch.randn(int(cu_k[-1]), 2, 64, dtype=torch.float16)
    sinks = torch.tensor([-2.0, 0.0, 3.0, float("-inf")])
    from fastllm.ops._attention_cuda import flash_attention_varlen_cuda
    with emulated_cuda():
        out, lse = flash_attention_varlen_cuda(q, k, v, cu_q, cu_k, 40, 70, True, 0.125, 9, 0.0, sinks)
    want, want_lse = ref.flash_attention_varlen(q.double(), k.double(), v.double(), cu_q, cu_k, causal=True,
                                                scale=0.125, window=9, sinks=sinks)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse)) and torch.isneginf(lse[:, -2:]).all()
    assert torch.equal(lse[:, :3], sinks.view(4, 1).expand(4, 3))      # sequence 0 has no keys
    torch.testing.assert_close(out.double(), want, atol=2e-3, rtol=0)
    ok = ~torch.isneginf(want_lse)
    torch.testing.assert_close(lse.double()[ok], want_lse[ok], atol=1e-5, rtol=0)


@pytest.mark.parametrize("D", (64, 128))
@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_matches_per_sequence(dtype, D):
    # Packed sequences (one without queries, one without keys, q longer than k) == the dense
    # kernel on each sequence alone, bit for bit.
    lens_q, lens_k = [1, 70, 0, 37, 40, 5], [1, 90, 7, 37, 33, 0]
    cu_q = torch.tensor([0] + lens_q).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k).cumsum(0).to(torch.int32)
    q = torch.randn(int(cu_q[-1]), 4, D, dtype=dtype)
    k = torch.randn(int(cu_k[-1]), 2, D, dtype=dtype)
    v = torch.randn(int(cu_k[-1]), 2, D, dtype=dtype)
    with emulated_cuda():
        gpu_tests.assert_varlen_matches_per_sequence(q, k, v, cu_q, cu_k, lens_q, lens_k, window=20)


@pytest.mark.parametrize("side", ["start", "end"])
@pytest.mark.parametrize("D", (64, 80))
def test_reads_stay_inside_the_tensors(emulated, side, D):
    # q, k, v and the mask against inaccessible pages: a read past either edge (a tail row, a
    # clamped tile, a mask byte) fails the launch. Contiguous (B, H, S, D) tensors, so the last
    # row of the last head is the tensors' end.
    from simt.backend import guarded
    q, k, v = (guarded(t, side) for t in qkv(2, 2, 1, 37, 75, D, torch.float16, q_layout="bhsd", kv_layout="bhsd"))
    emulated(q, k, v, causal=True)
    mask = guarded(torch.rand(2, 1, 37, 75) > 0.3, side)
    emulated(q, k, v, causal=False, mask=mask)
    bias = guarded(torch.randn(2, 2, 37, 75).half(), side)
    emulated(q, k, v, causal=True, bias=bias, sinks=guarded(torch.tensor([0.5, -1.0]), side))
