"""The CUDA prefill flash-attention kernel, its launcher and its Python glue, run from their own
source on CPU through the SIMT emulator (tests/simt/), against the float64 reference with the
GPU tests' checks (tests/test_attention_cuda.py `check`: error at most 2x PyTorch's own in the
same dtype, rows without keys exactly 0 / -inf, no NaN).

The emulator executes the kernel's C++ with ldmatrix / mma / cp.async modelled per the PTX ISA
(cp.async data only visible after the issuing thread's wait_group; unwritten shared memory reads
as NaN), so index math, fragment layouts, swizzles, the pipeline's waits, masking, the online
softmax and the epilogue all run as written. Not covered: the hardware itself (memory ordering,
timing, registers); the sm_90a wgmma kernel: tests/test_simt_hopper.py. Shapes are small (each CTA's threads are fibers).
"""
import pytest
import torch

import test_attention_cuda as gpu_tests
from simt.backend import emulated_cuda, unavailable_reason
from fastllm.ops._attention_cuda import HEAD_DIMS, flash_attention_cuda

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=f"simt emulator: {unavailable_reason()}")

DTYPES = (torch.float16, torch.bfloat16)
DEVICES = ((8, 0), (8, 6))   # A100-like (163 KB opt-in shared memory), sm86-like (99 KB)


def routed_check(monkeypatch, emulator):
    """gpu_tests.check with its kernel call run on CPU tensors inside `emulator()` (a context
    manager: the emulated device)."""
    def run(q, k, v, *, causal, scale=None, mask=None, window=None, softcap=None):
        with emulator():
            return flash_attention_cuda(q, k, v, mask, causal, scale if scale else q.shape[-1] ** -0.5,
                                        window or 0, softcap or 0.0)
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
