"""torch.autocast: fastllm does what autocast does to the torch ops it replaces (SDPA and linear
cast their floating inputs to the autocast dtype), and its backends compute as documented
whatever the ambient autocast (fastllm/ops/_autocast.py)."""
import copy

import pytest
import torch

import fastllm
from fastllm import ops
from fastllm.nn import Int8Linear, Sparse24Linear

from conftest import DEVICE

BACKENDS = ["torch", "triton"] + (["cuda"] if DEVICE == "cuda" else [])
AC = torch.bfloat16


def autocast():
    return torch.autocast(DEVICE, dtype=AC)


def qkv(B, Hq, Hkv, Sq, Skv, D):
    # As in a patched fp32 model under autocast: q / k came through fp32 rotary embeddings,
    # v straight from a (bf16) projection.
    q = torch.randn(B, Hq, Sq, D, device=DEVICE)
    k = torch.randn(B, Hkv, Skv, D, device=DEVICE)
    v = torch.randn(B, Hkv, Skv, D, device=DEVICE).to(AC)
    return q, k, v


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_ops_cast_mixed_inputs_to_the_autocast_dtype(backend):
    q, k, v = qkv(2, 4, 2, 7, 11, 32)
    want = ops.flash_attention(q.to(AC), k.to(AC), v, causal=True, backend=backend)
    with autocast():
        got = ops.flash_attention(q, k, v, causal=True, backend=backend)
    assert got.dtype == AC
    assert torch.equal(got, want)

    cu = torch.tensor([0, 3, 7], dtype=torch.int32, device=DEVICE)
    cuk = torch.tensor([0, 5, 11], dtype=torch.int32, device=DEVICE)
    qp, kp, vp = q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1)
    want = ops.flash_attention_varlen(qp.to(AC), kp.to(AC), vp, cu, cuk, 4, 6, causal=True, backend=backend)
    with autocast():
        got = ops.flash_attention_varlen(qp, kp, vp, cu, cuk, 4, 6, causal=True, backend=backend)
    assert got.dtype == AC and torch.equal(got, want)

    lens = torch.tensor([9, 4], dtype=torch.int32, device=DEVICE)
    want = ops.decode_attention(q[:, :, :1].to(AC), k.to(AC), v, cache_seqlens=lens, backend=backend)
    with autocast():
        got = ops.decode_attention(q[:, :, :1], k, v, cache_seqlens=lens, backend=backend)
    assert got.dtype == AC and torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_compute_outside_autocast(backend):
    # Inputs already in the autocast dtype are not cast: the result must be bit for bit what
    # the backend gives without autocast (the reference upcasts to fp32 and matmuls; under a
    # leaked autocast those matmuls would run in bf16).
    q, k, v = (t.to(AC) for t in qkv(1, 2, 1, 9, 9, 32))
    want = ops.flash_attention(q, k, v, causal=False, backend=backend)
    with autocast():
        assert torch.equal(ops.flash_attention(q, k, v, causal=False, backend=backend), want)
    # Functional linear-type ops take their inputs as given (only the modules cast).
    x = torch.randn(5, 64, device=DEVICE)
    w = torch.randint(-127, 128, (48, 64), dtype=torch.int8, device=DEVICE)
    scale = torch.rand(48, device=DEVICE) / 100
    want = ops.w8a16_matmul(x, w, scale, backend=backend)
    with autocast():
        got = ops.w8a16_matmul(x, w, scale, backend=backend)
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_float64_is_still_refused_under_autocast():
    q = torch.randn(1, 1, 3, 8, dtype=torch.float64, device=DEVICE)
    with autocast(), pytest.raises(TypeError, match="argument 'q' must have dtype"):
        ops.flash_attention(q, q, q, causal=True)


@pytest.mark.parametrize("make", ["w8a8-dynamic", "w8a8-static", "w8a16", "2:4", "2:4-int8"])
def test_linear_modules_cast_their_input_like_nn_linear(make):
    lin = torch.nn.Linear(64, 48).to(DEVICE)
    if make.startswith("2:4"):
        layer = Sparse24Linear.from_linear(lin.to(AC), prune="magnitude", int8=make.endswith("int8"))
    else:
        kw = {"act_amax": torch.rand(64, device=DEVICE) + 1} if make == "w8a8-static" else {}
        layer = Int8Linear.from_linear(lin, make, **kw)
    x = torch.randn(2, 3, 64, device=DEVICE)
    want = layer(x.to(AC))
    with autocast():
        got = layer(x)
    assert got.dtype == AC
    assert torch.equal(got, want)


@pytest.mark.parametrize("use_cache", [False, True])
def test_patched_fp32_model_under_autocast(use_cache):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(cfg).eval().to(DEVICE)
    ids = torch.randint(0, 128, (2, 9), device=DEVICE)
    with torch.no_grad(), autocast():
        want = model(ids, use_cache=use_cache).logits.float()
        patched = fastllm.patch(copy.deepcopy(model))
        # Before: with use_cache=False, q / k (fp32 after the rotary embedding) met a bf16 v:
        # "argument 'v' must have the dtype of 'q'", where SDPA runs.
        got = patched(ids, use_cache=use_cache).logits.float()
    # Both compute attention in bf16 with fp32 accumulation; the logits agree to bf16 rounding.
    assert (got - want).abs().max().item() <= 0.05 * want.abs().max().item()


def test_compiled_call_under_autocast():
    q, k, v = qkv(1, 2, 2, 5, 5, 16)
    f = torch.compile(lambda q, k, v: ops.flash_attention(q, k, v, causal=True), fullgraph=True)
    with autocast():
        got, want = f(q, k, v), ops.flash_attention(q, k, v, causal=True)
    assert got.dtype == AC and torch.equal(got, want)
