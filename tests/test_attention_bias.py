"""flash_attention(bias=...): an additive score bias (relative position biases: Swin, BEiT,
Parakeet; ALiBi), every backend vs the float64 reference with the tolerance rule of
test_attention.py. The CUDA kernels take a bias at head dims 64 / 80 / 96 / 128; at 256 they
refuse (forced: a skip on a GPU machine, see conftest.py) and auto picks Triton."""
import pytest
import torch

import fastllm
from fastllm.ops import flash_attention
from fastllm.ops.attention import OP

from conftest import DEVICE
from test_attention import BACKENDS, DTYPES, LOW, padding_mask, qkv, rand, run_and_check

B, HQ, HKV, SQ, SKV, D = 2, 4, 2, 19, 150, 64   # Skv > the interpreter's 64-key blocks: rescaling runs


def _bias(shape, dtype, scale=3.0):
    return rand(*shape, dtype=dtype, scale=scale)


SHAPES = {
    "full": (B, HQ, SQ, SKV),
    "per_head": (1, HQ, SQ, SKV),     # BEiT / Swin: one (Sq, Skv) table per head
    "per_key": (B, 1, 1, SKV),        # ALiBi-like slopes on key positions, per sequence
    "per_row": (1, 1, SQ, 1),         # constant per row: softmax-invariant, lse shifts
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bias_matches_reference(backend, dtype, shape):
    q, k, v = qkv(B, HQ, HKV, SQ, SKV, D, dtype)
    run_and_check(backend, q, k, v, causal=True, bias=_bias(SHAPES[shape], dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_views_and_float32_bias(backend):
    # A transposed view (stride 1 along queries), an expanded one (stride 0 along the batch),
    # and an fp32 bias on fp16 inputs (the kernels read any float dtype).
    q, k, v = qkv(B, HQ, HKV, SQ, SKV, D, torch.float16)
    t = _bias((1, HQ, SKV, SQ), torch.float16).transpose(2, 3)
    assert not t.is_contiguous()
    out, _ = run_and_check(backend, q, k, v, causal=False, bias=t)
    assert torch.equal(out, flash_attention(q, k, v, causal=False, bias=t.contiguous(), backend=backend))
    run_and_check(backend, q, k, v, causal=False, bias=_bias((1, HQ, SQ, SKV), torch.float16).expand(B, -1, -1, -1))
    run_and_check(backend, q, k, v, causal=True, bias=_bias((B, HQ, SQ, SKV), torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
def test_bias_with_mask_window_softcap_sinks(backend, dtype):
    q, k, v = qkv(B, HQ, HKV, SQ, SKV, D, dtype, q_scale=2.0)
    sinks = torch.tensor([-1.0, 0.5, 2.0, float("-inf")], device=DEVICE)
    mask = padding_mask(B, SQ, SKV, "left", causal=False)
    run_and_check(backend, q, k, v, causal=True, mask=mask, window=40, softcap=30.0, sinks=sinks,
                  bias=_bias((B, HQ, SQ, SKV), dtype))
    # A mask attending only the first keys (a StaticCache's filled part: the torch backend
    # narrows to them, the bias with it).
    filled = torch.zeros(B, 1, SQ, SKV, dtype=torch.bool, device=DEVICE)
    filled[..., :37] = True
    run_and_check(backend, q, k, v, causal=False, mask=filled, bias=_bias((1, HQ, SQ, SKV), dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_masking_values_in_the_bias(backend, dtype):
    """-inf masks its key; a row of only -inf is empty (out 0, lse -inf); a row whose keys all carry
    the dtype's minimum (transformers' masked value, Parakeet's padding rows) averages V uniformly
    as eager attention does: the floor at -2^126 keeps the kernels' exp2 arithmetic finite."""
    q, k, v = qkv(1, 2, 1, 5, 70, 64, dtype)
    bias = _bias((1, 2, 5, 70), dtype)
    bias[..., 0, 3:] = float("-inf")                       # row 0: keys 0..2 only
    bias[..., 1, :] = float("-inf")                        # row 1: nothing
    bias[..., 2, :] = torch.finfo(dtype).min               # row 2: all "masked" -> uniform average
    bias[..., 3, 10:] = torch.finfo(dtype).min             # row 3: keys 0..9 (and no others)
    out, lse = run_and_check(backend, q, k, v, causal=False, bias=bias)
    if backend == "triton":   # the kernel's floor is the reference's
        from fastllm.ref.attention import SCORE_FLOOR
        from fastllm.triton_kernels import flash_attention as kernel
        assert kernel.SCORE_FLOOR.value == SCORE_FLOOR
    assert (out[0, 1] == 0).all() and torch.isneginf(lse[0, :, 1]).all()
    assert torch.isfinite(lse[0, :, 2]).all()
    if dtype != torch.float16:   # fp16's minimum (-65504) is a shift the softmax undoes, not a mask
        mean = v[0, 0].double().mean(0)
        tol = 4 * torch.finfo(dtype).eps * v.abs().max().item()
        assert (out[0, 2].double() - mean).abs().max() <= tol
        want = flash_attention(q[:, :, 3:4], k[:, :, :10], v[:, :, :10], causal=False,
                               bias=bias[..., 3:4, :10], backend=backend)
        assert (out[:, 3:4].double() - want.double()).abs().max() <= tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_bias_changes_nothing(backend):
    q, k, v = qkv(B, HQ, HKV, SQ, SKV, D, torch.bfloat16)
    mask = padding_mask(B, SQ, SKV, "right", causal=False)
    zero = torch.zeros(1, 1, 1, 1, dtype=torch.bfloat16, device=DEVICE)
    for kw in (dict(causal=True), dict(causal=False, mask=mask, window=30)):
        want = flash_attention(q, k, v, backend=backend, return_lse=True, **kw)
        got = flash_attention(q, k, v, bias=zero, backend=backend, return_lse=True, **kw)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_bad_bias():
    q, k, v = qkv(2, 4, 2, 5, 7, 16, torch.float16)
    with pytest.raises(TypeError, match="argument 'bias' must have dtype in .float16, bfloat16, float32"):
        flash_attention(q, k, v, causal=True, bias=torch.zeros(1, 1, 5, 7, dtype=torch.int32, device=DEVICE))
    with pytest.raises(TypeError, match="argument 'bias' must be a torch.Tensor"):
        flash_attention(q, k, v, causal=True, bias=0.5)
    for shape in [(5, 7), (1, 2, 5, 7), (2, 4, 7, 5), (3, 1, 1, 1), (1, 1, 1, 5, 7)]:
        # (1, 2, ...): kv heads, not query heads; (2, 4, 7, 5): transposed
        with pytest.raises(ValueError, match=r"argument 'bias' must be broadcastable as \(2 or 1, 4 or 1, 5 or 1, "
                                             r"7 or 1\)"):
            flash_attention(q, k, v, causal=True, bias=torch.zeros(shape, dtype=torch.float16, device=DEVICE))
    if DEVICE == "cuda":
        with pytest.raises(ValueError, match="argument 'bias' must be on the device of 'q'"):
            flash_attention(q, k, v, causal=True, bias=torch.zeros(1, 1, 5, 7))


def test_cuda_takes_a_bias_below_head_dim_256_auto_moves_on_above():
    t = lambda *s: torch.empty(*s, dtype=torch.float16, device="meta")  # noqa: E731
    q, k = t(1, 4, 16, 64), t(1, 2, 16, 64)
    assert OP.supports["cuda"](q, k, k, None, True, 0.125, 0, 0.0, None, t(1, 4, 16, 16)) is None
    q, k = t(1, 4, 16, 256), t(1, 2, 16, 256)
    why = OP.supports["cuda"](q, k, k, None, True, 0.0625, 0, 0.0, None, t(1, 4, 16, 16))
    assert "additive score bias at head dim 256" in why
    if DEVICE == "cuda":
        q, k, v = qkv(1, 4, 2, 16, 16, 256, torch.float16)
        bias = _bias((1, 4, 16, 16), torch.float16)
        with pytest.raises(fastllm.BackendUnavailableError, match="additive score bias"):
            OP.select("cuda", q.device, q, k, v, None, True, 0.0625, 0, 0.0, None, bias)
        assert OP.select("auto", q.device, q, k, v, None, True, 0.0625, 0, 0.0, None, bias) != "cuda"


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_opcheck_and_compile(backend):
    q, k, v = qkv(2, 4, 2, 9, 20, 64, torch.float16)
    bias = _bias((1, 4, 9, 20), torch.float16)
    torch.library.opcheck(torch.ops.fastllm.flash_attention.default,
                          (q, k, v, None, False, 0.125, 0, 0.0, None, bias, backend))

    def f(q, k, v, bias):
        return flash_attention(q, k, v, causal=True, bias=bias, backend=backend) * 2

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, bias)
    assert torch.equal(got, f(q, k, v, bias))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("D", [64, 80, 128, 256])
def test_gpu_bias(dtype, D):
    q, k, v = qkv(3, 8, 2, 300, 1025, D, dtype)
    mask = padding_mask(3, 300, 1025, "left", causal=False)
    run_and_check("triton", q, k, v, causal=True, mask=mask, bias=_bias((3, 8, 300, 1025), dtype))
    run_and_check("auto", q, k, v, causal=False, bias=_bias((1, 8, 300, 1025), dtype))
