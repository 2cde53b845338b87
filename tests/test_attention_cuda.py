"""The CUDA prefill flash-attention kernel (csrc/attention/) against a float64 reference.

GPU tests (marked gpu) require the kernel's error vs float64 to be at most 2x the error of
plain PyTorch attention computed in the same dtype (matmuls in fp16/bf16, softmax in fp32),
plus a tiny floor; rows with no allowed key must give out = 0 and lse = -inf, never NaN.
The tests without the marker check cuda_supports on CPU / meta tensors (metadata only).
"""
import math
import os
import re

import pytest
import torch

from fastllm.ref.attention import allowed_keys, flash_attention as ref_attention
from fastllm.ops._attention_cuda import (BIAS_HEAD_DIMS, HEAD_DIMS, cuda_supports, cuda_varlen_supports,
                                         flash_attention_cuda)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = (torch.float16, torch.bfloat16)
SEQS = (1, 17, 97, 128, 1025)
SEQ_PAIRS = [(sq, skv) for sq in SEQS for skv in SEQS if sq <= skv]
HEADS = ((8, 8), (8, 2), (8, 1))
OUT_FLOOR = 1e-4   # absolute floor on |out - ref| (outputs are O(1); fp16's ulp at 1 is 1e-3)
LSE_FLOOR = 1e-4


# ------------------------------------------------------------------------------------------
# Reference and baseline.

def reference(q, k, v, **kw):
    """(out (B, Sq, Hq, D), lse (B, Hq, Sq)) in float64 from float64 copies of the inputs."""
    return ref_attention(q.double(), k.double(), v.double(), **kw)


def torch_lowp(q, k, v, *, causal, scale, mask=None, window=None, softcap=None, sinks=None, bias=None):
    """Plain PyTorch attention in q.dtype: PyTorch's own error sets the tolerance. The bias is added
    in q.dtype, as eager attention adds a float mask; sinks as an extra score column (gpt-oss)."""
    B, Hq, Sq, D = q.shape
    Skv, g = k.shape[2], q.shape[1] // k.shape[1]
    kf, vf = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ kf.transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias.to(s.dtype)
    s = s.masked_fill(~allowed_keys(Sq, Skv, causal=causal, window=window, mask=mask, device=q.device), float("-inf"))
    s = s.float()
    if sinks is not None:
        s = torch.cat([s, sinks.float().view(1, -1, 1, 1).expand(*s.shape[:3], 1)], -1)
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)[..., :Skv].to(q.dtype)
    return (p @ vf).transpose(1, 2), lse


# ------------------------------------------------------------------------------------------
# Running the kernel.

def _poison_allocator(device, *nbytes):
    """Fill freed blocks of these sizes with NaN so the caching allocator hands NaN-filled
    memory to the kernel's outputs: rows the kernel forgets to write then show as NaN."""
    blocks = [torch.full((n // 4 + 1,), float("nan"), dtype=torch.float32, device=device) for n in nbytes]
    del blocks


def run_cuda(q, k, v, *, causal, scale=None, mask=None, window=None, softcap=None, sinks=None, bias=None):
    B, Hq, Sq, D = q.shape
    _poison_allocator(q.device, B * Sq * Hq * D * q.element_size(), B * Hq * Sq * 4)
    try:
        from fastllm.ops import flash_attention
    except ImportError:
        flash_attention = None
    if flash_attention is not None:
        out, lse = flash_attention(q, k, v, causal=causal, scale=scale, mask=mask, window=window,
                                   softcap=softcap, sinks=sinks, bias=bias, return_lse=True, backend="cuda")
    else:
        out, lse = flash_attention_cuda(q, k, v, mask, causal, scale if scale else D ** -0.5,
                                        window or 0, softcap or 0.0, sinks, bias)
    torch.cuda.synchronize()
    return out, lse


def make_qkv(B, Hq, Hkv, Sq, Skv, D, dtype, *, q_layout="bshd", kv_layout="bshd", device="cuda"):
    """q (B, Hq, Sq, D), k/v (B, Hkv, Skv, D) as views of the given memory layout:
    'bshd' = transposed view of a (B, S, H, D) buffer (what transformers passes), 'bhsd' =
    contiguous, 'padded' = (B, S, H, D + 8) buffer sliced to D (row stride != D)."""
    def one(H, S, layout):
        if layout == "bhsd":
            return torch.randn(B, H, S, D, device=device, dtype=dtype)
        if layout == "padded":
            return torch.randn(B, S, H, D + 8, device=device, dtype=dtype)[..., :D].transpose(1, 2)
        return torch.randn(B, S, H, D, device=device, dtype=dtype).transpose(1, 2)
    return one(Hq, Sq, q_layout), one(Hkv, Skv, kv_layout), one(Hkv, Skv, kv_layout)


def check(q, k, v, *, causal, scale=None, mask=None, window=None, softcap=None, sinks=None, bias=None):
    """The kernel vs float64 (2x PyTorch's own error + a floor). Rows with nothing allowed: out 0
    and lse -inf, or with a sink lse = the sink (the reference's lse decides which)."""
    D = q.shape[-1]
    scale_ = scale if scale is not None else 1.0 / math.sqrt(D)
    kw = dict(causal=causal, mask=mask, window=window, softcap=softcap, sinks=sinks, bias=bias)
    out, lse = run_cuda(q, k, v, scale=scale, **kw)
    out_ref, lse_ref = reference(q, k, v, scale=scale_, **kw)
    out_pt, lse_pt = torch_lowp(q, k, v, scale=scale_, **kw)

    B, Hq, Sq, _ = q.shape
    assert out.shape == (B, Sq, Hq, D) and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == (B, Hq, Sq) and lse.dtype == torch.float32
    assert not torch.isnan(out).any(), "NaN in out"
    assert not torch.isnan(lse).any(), "NaN in lse"

    empty = torch.isinf(lse_ref) & (lse_ref < 0)                    # (B, Hq, Sq)
    assert torch.equal(torch.isinf(lse) & (lse < 0), empty), "lse = -inf exactly on rows with no key"
    empty_o = empty.transpose(1, 2)                                   # (B, Sq, Hq)
    assert (out.float()[empty_o] == 0).all(), "rows with no allowed key must be 0"
    ok = ~empty_o
    if ok.any():
        err = (out.double() - out_ref)[ok].abs().max().item()
        err_pt = (out_pt.double() - out_ref)[ok].abs().max().item()
        assert err <= 2 * err_pt + OUT_FLOOR, f"out error {err:.3g} > 2 x PyTorch's {err_pt:.3g} + floor"
        lok = ~empty
        lerr = (lse.double() - lse_ref)[lok].abs().max().item()
        lerr_pt = (lse_pt.double() - lse_ref)[lok].abs().max().item()
        assert lerr <= 2 * lerr_pt + LSE_FLOOR, f"lse error {lerr:.3g} > 2 x PyTorch's {lerr_pt:.3g} + floor"
    return out, lse


# ------------------------------------------------------------------------------------------
# GPU tests.

@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Hq,Hkv", HEADS)
@pytest.mark.parametrize("Sq,Skv", SEQ_PAIRS)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(dtype, D, Sq, Skv, Hq, Hkv, causal):
    q, k, v = make_qkv(2, Hq, Hkv, Sq, Skv, D, dtype)
    check(q, k, v, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("q_layout,kv_layout", [("bhsd", "bhsd"), ("bshd", "bhsd"), ("padded", "padded"),
                                                ("bhsd", "padded")])
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_layouts(q_layout, kv_layout, D):
    q, k, v = make_qkv(3, 8, 2, 97, 130, D, torch.float16, q_layout=q_layout, kv_layout=kv_layout)
    check(q, k, v, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("Sq,Skv", [(17, 1), (128, 97), (1025, 128)])
@pytest.mark.parametrize("D", (64, 128))
def test_causal_more_queries_than_keys(Sq, Skv, D):
    # bottom-right alignment: the first Sq - Skv query rows see nothing (out 0, lse -inf)
    q, k, v = make_qkv(2, 8, 2, Sq, Skv, D, torch.bfloat16)
    check(q, k, v, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_padding_mask(dtype, D, causal):
    # Left padding as transformers builds it ((B, 1, 1, Skv) expanded), batch 1 fully padded
    # on its first 40 keys, batch 2 entirely padded (every row empty).
    B, Sq, Skv = 3, 97, 1025
    q, k, v = make_qkv(B, 8, 2, Sq, Skv, D, dtype)
    keep = torch.ones(B, 1, 1, Skv, dtype=torch.bool, device="cuda")
    keep[1, ..., :40] = False
    keep[2] = False
    check(q, k, v, causal=causal, mask=keep)
    # A full (B, 1, Sq, Skv) random mask with some rows entirely masked, as an expanded view
    # of a (1, 1, Sq, Skv) tensor (batch stride 0).
    m = torch.rand(1, 1, Sq, Skv, device="cuda") > 0.3
    m[..., ::7, :] = False
    check(q, k, v, causal=causal, mask=m.expand(B, 1, Sq, Skv))
    # A non-contiguous mask: a transposed buffer.
    mt = (torch.rand(B, 1, Skv, Sq, device="cuda") > 0.5).transpose(-1, -2)
    check(q, k, v, causal=causal, mask=mt)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [1, 16, 100, 5000])
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_window(D, window, causal):
    for Sq, Skv in ((97, 1025), (1025, 1025), (17, 17)):
        q, k, v = make_qkv(2, 8, 2, Sq, Skv, D, torch.float16)
        check(q, k, v, causal=causal, window=window)


@pytest.mark.gpu
@pytest.mark.parametrize("softcap", [5.0, 50.0])
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_softcap(dtype, D, softcap):
    q, k, v = make_qkv(2, 8, 1, 97, 1025, D, dtype)
    check(q, k, v, causal=True, softcap=softcap, scale=0.3)
    keep = torch.rand(2, 1, 1, 1025, device="cuda") > 0.2
    check(q, k, v, causal=False, softcap=softcap, window=64, mask=keep)


@pytest.mark.gpu
def test_large_scores_no_overflow():
    # scores ~ +-300: the running max must keep exp2 finite; fp16 inputs near their limit
    q, k, v = make_qkv(1, 4, 4, 128, 257, 64, torch.float16)
    check(q * 8, k * 8, v, causal=True, scale=1.0)


@pytest.mark.gpu
def test_no_keys():
    q = torch.randn(2, 4, 17, 64, device="cuda", dtype=torch.float16)
    k = torch.randn(2, 4, 0, 64, device="cuda", dtype=torch.float16)
    out, lse = flash_attention_cuda(q, k, k, None, False, 0.125, 0, 0.0)
    torch.cuda.synchronize()
    assert (out == 0).all() and torch.isinf(lse).all() and (lse < 0).all()
    sinks = torch.tensor([-1.0, 0.5, 2.0, float("-inf")], device="cuda")
    out, lse = flash_attention_cuda(q, k, k, None, False, 0.125, 0, 0.0, sinks)   # the fill kernel
    torch.cuda.synchronize()
    assert (out == 0).all() and torch.equal(lse, sinks.view(1, 4, 1).expand(2, 4, 17))


# Bias shapes the kernel reads through strides: full, per head (BEiT / Swin tables), per key
# (ALiBi-like, per sequence), per row; then a transposed view and an fp32 bias on 16-bit inputs.
def bias_cases(B, Hq, Sq, Skv, dtype, device="cuda"):
    r = lambda *shape, dt=dtype: (torch.randn(*shape, device=device) * 3).to(dt)   # noqa: E731
    return [r(B, Hq, Sq, Skv), r(1, Hq, Sq, Skv), r(B, 1, 1, Skv), r(1, 1, Sq, 1),
            r(1, Hq, Skv, Sq).transpose(2, 3), r(B, Hq, Sq, Skv, dt=torch.float32)]


def masking_bias(Hq, Sq, Skv, dtype, device="cuda"):
    """A bias that masks: row 0 keys 0..2 only (-inf), row 1 nothing (-inf: empty row), row 2 every
    key the dtype's minimum (uniform average, the -2^126 floor), row 3 keys 0..9 (the rest minimum)."""
    bias = (torch.randn(1, Hq, Sq, Skv, device=device) * 3).to(dtype)
    bias[..., 0, 3:] = float("-inf")
    bias[..., 1, :] = float("-inf")
    bias[..., 2, :] = torch.finfo(dtype).min
    bias[..., 3, 10:] = torch.finfo(dtype).min
    return bias


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", BIAS_HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bias(dtype, D, causal):
    B, Hq, Hkv, Sq, Skv = 2, 8, 2, 97, 1025
    q, k, v = make_qkv(B, Hq, Hkv, Sq, Skv, D, dtype)
    for bias in bias_cases(B, Hq, Sq, Skv, dtype):
        check(q, k, v, causal=causal, bias=bias)
    check(q, k, v, causal=False, bias=masking_bias(Hq, Sq, Skv, dtype))
    keep = torch.rand(B, 1, 1, Skv, device="cuda") > 0.2
    sinks = torch.linspace(-2.0, 4.0, Hq, device="cuda")
    check(q, k, v, causal=causal, bias=bias_cases(B, Hq, Sq, Skv, dtype)[1], mask=keep, window=200,
          softcap=30.0, sinks=sinks)


@pytest.mark.gpu
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sinks(dtype, D):
    # Causal with Sq > Skv: the first rows see no key (out 0, lse = the sink); -inf: no sink.
    sinks = torch.tensor([-30.0, -1.0, 0.5, 2.0, 12.0, float("-inf"), 0.0, 3.0], device="cuda")
    for Sq, Skv, causal in ((97, 1025, True), (130, 97, True), (1025, 1025, False)):
        q, k, v = make_qkv(2, 8, 2, Sq, Skv, D, dtype)
        check(q, k, v, causal=causal, sinks=sinks)
    keep = torch.rand(2, 1, 1, 1025, device="cuda") > 0.2
    check(q, k, v, causal=True, sinks=sinks, mask=keep, window=64, softcap=20.0)


# ------------------------------------------------------------------------------------------
# CPU tests: what cuda_supports accepts and the reasons it gives (metadata only).

def _q(D=64, dtype=torch.float16, S=17, H=8, B=2, device="cpu"):
    return torch.empty(B, S, H, D, dtype=dtype, device=device).transpose(1, 2)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_supports_common_calls(device):
    for D in HEAD_DIMS:
        for dtype in DTYPES:
            q, kv = _q(D, dtype, device=device), _q(D, dtype, H=2, S=33, device=device)
            assert cuda_supports(q, kv, kv, None, True, D ** -0.5, 0, 0.0) is None
            m = torch.ones(2, 1, 1, 33, dtype=torch.bool, device=device)
            assert cuda_supports(q, kv, kv, m, False, 0.1, 16, 30.0) is None


def test_supports_reasons():
    q = _q()
    assert "head dim 72" in cuda_supports(_q(72), _q(72), _q(72), None, True, 0.1, 0, 0.0)
    assert "head dim 32" in cuda_supports(_q(32), _q(32), _q(32), None, True, 0.1, 0, 0.0)
    f32 = _q(dtype=torch.float32)
    assert "float32" in cuda_supports(f32, f32, f32, None, True, 0.1, 0, 0.0)
    # The kernel works with scale * log2(e) and softcap * log2(e) in fp32: 0 gave NaN on masked
    # tiles (-inf * 0), inf gave NaN everywhere, where the reference is finite.
    for scale in (1e-46, 3e38):
        assert "normal fp32" in cuda_supports(q, q, q, None, True, scale, 0, 0.0)
    assert "softcap" in cuda_supports(q, q, q, None, True, 3.0, 0, 3e38)
    # strides not a multiple of 8 elements: rows of 68 elements
    odd = torch.empty(2, 17, 8, 68, dtype=torch.float16)[..., :64].transpose(1, 2)
    assert "multiples of 8" in cuda_supports(odd, q, q, None, True, 0.1, 0, 0.0)
    # a data pointer 2 bytes past a 16-byte boundary
    flat = torch.empty(2 * 17 * 8 * 64 + 8, dtype=torch.float16)
    mis = flat[1:1 + 2 * 17 * 8 * 64].view(2, 17, 8, 64).transpose(1, 2)
    assert "aligned" in cuda_supports(mis, q, q, None, True, 0.1, 0, 0.0)
    # non-unit stride in D
    nd = torch.empty(2, 8, 17, 128, dtype=torch.float16)[..., ::2]
    assert "unit stride" in cuda_supports(nd, nd, nd, None, True, 0.1, 0, 0.0)
    # masks: bool only, broadcastable only
    assert "mask dtype" in cuda_supports(q, q, q, torch.zeros(2, 1, 17, 17), True, 0.1, 0, 0.0)
    bad = torch.ones(2, 2, 17, 17, dtype=torch.bool)
    assert "broadcastable" in cuda_supports(q, q, q, bad, True, 0.1, 0, 0.0)
    # heads and scale
    assert "multiple" in cuda_supports(q, _q(H=3), _q(H=3), None, True, 0.1, 0, 0.0)
    assert "scale" in cuda_supports(q, q, q, None, True, -0.1, 0, 0.0)
    assert "scale" in cuda_supports(q, q, q, None, True, 0.0, 0, 0.0)
    assert "dtype" in cuda_supports(q, _q(dtype=torch.bfloat16), q, None, True, 0.1, 0, 0.0)


def test_supports_bias_and_sinks():
    q = _q()
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        for shape in ((2, 8, 17, 17), (1, 8, 17, 17), (2, 1, 1, 17), (1, 1, 17, 1)):
            assert cuda_supports(q, q, q, None, True, 0.1, 0, 0.0, None, torch.empty(shape, dtype=dt)) is None
    t = torch.empty(1, 8, 17, 17)
    assert "head dim 256" in cuda_supports(_q(256), _q(256), _q(256), None, True, 0.1, 0, 0.0, None, t)
    assert "bias dtype float64" in cuda_supports(q, q, q, None, True, 0.1, 0, 0.0, None, t.double())
    assert "broadcastable" in cuda_supports(q, q, q, None, True, 0.1, 0, 0.0, None, torch.empty(1, 3, 17, 17))
    assert "bias on meta" in cuda_supports(q, q, q, None, True, 0.1, 0, 0.0, None, t.to("meta"))
    z = torch.zeros(8)
    assert cuda_supports(q, q, q, None, True, 0.1, 0, 0.0, z) is None
    assert cuda_supports(q, q, q, None, True, 0.1, 0, 0.0, z, t) is None
    for bad in (z.half(), torch.zeros(4), torch.zeros(16)[::2], z.to("meta")):
        assert "sinks must be (8,) contiguous float32" in cuda_supports(q, q, q, None, True, 0.1, 0, 0.0, bad)
    assert "sinks must be" in cuda_supports(q, q, q, None, True, 0.1, 0, 0.0, z.half(), t)


def test_bias_head_dims_match_the_traits():
    # BIAS_HEAD_DIMS = the head dims whose FlashFwdBiasTraits (and the Hopper ones) keep kBias.
    text = open(os.path.join(ROOT, "csrc", "attention", "flash_traits.h")).read()
    off = {int(d) for d in re.findall(r"struct FlashFwdBiasTraits(?:Sm90)?<(\d+)>[^{;]*\{\s*static constexpr bool "
                                       r"kBias = false;", text)}
    assert off == {256} and set(BIAS_HEAD_DIMS) == set(HEAD_DIMS) - off


def test_varlen_supports():
    t = torch.empty(40, 8, 64, dtype=torch.float16)
    cu = torch.tensor([0, 17, 40], dtype=torch.int32)
    assert cuda_varlen_supports(t, t, t, cu, cu, 23, 23, True, 0.1, 0, 0.0) is None
    assert "3-D" in cuda_varlen_supports(t[None], t, t, cu, cu, 23, 23, True, 0.1, 0, 0.0)
    assert "head dim 72" in cuda_varlen_supports(*[torch.empty(40, 8, 72, dtype=torch.float16)] * 3, cu, cu,
                                                 23, 23, True, 0.1, 0, 0.0)
    assert "int32" in cuda_varlen_supports(t, t, t, cu.long(), cu, 23, 23, True, 0.1, 0, 0.0)
    assert "multiple" in cuda_varlen_supports(t, t[:, :3], t[:, :3], cu, cu, 23, 23, True, 0.1, 0, 0.0)
    wide = torch.empty(40, 8, 68, dtype=torch.float16)[..., :64]     # rows of 68: misaligned
    assert "multiples of 8" in cuda_varlen_supports(wide, t, t, cu, cu, 23, 23, True, 0.1, 0, 0.0)


def test_varlen_passes_the_strides_it_checked(monkeypatch):
    # Regression: the check zeroed the stride of a size-1 dim (never stepped over) but the raw
    # stride went to C++, whose alignment check then failed at launch after supports said yes.
    from fastllm import _ext
    from fastllm.ops import _attention_cuda as ac
    seen = {}

    class FakeLib:
        def flash_attention_varlen_fwd(self, *args):
            seen["args"] = args
            return 0
    monkeypatch.setattr(_ext, "lib", lambda: FakeLib())
    monkeypatch.setattr(_ext, "stream_of", lambda t: 0)
    q = torch.empty(40, 8, 64, dtype=torch.float16)
    kv = torch.empty(40 * 64, dtype=torch.float16).as_strided((40, 1, 64), (64, 3, 1))  # MQA, odd head stride
    cu = torch.tensor([0, 17, 40], dtype=torch.int32)
    assert cuda_varlen_supports(q, kv, kv, cu, cu, 23, 23, True, 0.1, 0, 0.0) is None
    ac.flash_attention_varlen_cuda(q, kv, kv, cu, cu, 23, 23, True, 0.1, 0, 0.0)
    strides = seen["args"][18:24]  # q head, q row, k head, k row, v head, v row
    assert seen["args"][11:13] == (40, 40)  # total_q, total_k
    assert strides == (64, 8 * 64, 0, 64, 0, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_matches_per_sequence(dtype, D):
    # Packed sequences (one without queries, one without keys, q longer than k) == the dense
    # kernel run on each sequence alone.
    lens_q, lens_k = [1, 130, 0, 97, 40, 5], [1, 200, 7, 97, 33, 0]
    cu_q = torch.tensor([0] + lens_q, device="cuda").cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k, device="cuda").cumsum(0).to(torch.int32)
    q = torch.randn(int(cu_q[-1]), 8, D, device="cuda", dtype=dtype)
    k = torch.randn(int(cu_k[-1]), 2, D, device="cuda", dtype=dtype)
    v = torch.randn(int(cu_k[-1]), 2, D, device="cuda", dtype=dtype)
    assert_varlen_matches_per_sequence(q, k, v, cu_q, cu_k, lens_q, lens_k, window=50)


def assert_varlen_matches_per_sequence(q, k, v, cu_q, cu_k, lens_q, lens_k, window):
    """The varlen kernel's rows of each sequence == the dense kernel on that sequence alone, bit
    for bit (causal and not; causal with `window` and a softcap)."""
    from fastllm.ops._attention_cuda import flash_attention_varlen_cuda
    D = q.shape[-1]
    for causal, win, softcap in ((True, 0, 0.0), (False, 0, 0.0), (True, window, 20.0)):
        out, lse = flash_attention_varlen_cuda(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal,
                                               D ** -0.5, win, softcap)
        for b in range(len(lens_q)):
            q0, q1, k0, k1 = cu_q[b].item(), cu_q[b + 1].item(), cu_k[b].item(), cu_k[b + 1].item()
            if q1 == q0:
                continue
            o, l = flash_attention_cuda(q[q0:q1].transpose(0, 1)[None], k[k0:k1].transpose(0, 1)[None],
                                        v[k0:k1].transpose(0, 1)[None], None, causal, D ** -0.5, win, softcap)
            assert torch.equal(out[q0:q1], o[0]), (b, causal)
            assert torch.equal(lse[:, q0:q1], l[0]), (b, causal)


def test_head_dims_match_the_compiled_instantiations():
    # Python's list of head dims is the generator's, and every instantiation unit exists.
    gen = open(os.path.join(ROOT, "csrc", "attention", "generate_instantiations.py")).read()
    dims = tuple(int(d) for d in re.search(r"^HEAD_DIMS = \(([^)]*)\)", gen, re.M).group(1).split(","))
    assert dims == HEAD_DIMS
    for d in HEAD_DIMS:
        for name in ("fp16", "bf16"):
            assert os.path.exists(os.path.join(ROOT, "csrc", "attention", f"flash_fwd_hdim{d}_{name}.cu"))


def _sm90_head_dims():
    """The wgmma kernel's head dims: SM90_HEAD_DIMS of csrc/attention/generate_instantiations.py."""
    gen = open(os.path.join(ROOT, "csrc", "attention", "generate_instantiations.py")).read()
    return tuple(int(d) for d in re.search(r"^SM90_HEAD_DIMS = \(([^)]*)\)", gen, re.M).group(1).split(","))


def test_hopper_head_dims_match_traits_units_and_launcher():
    # The wgmma kernel's head dims: the generator's SM90_HEAD_DIMS, one FlashFwdTraitsSm90
    # specialization and two _sm90a.cu units each, the launcher's Hopper switch and use_wgmma.
    src = lambda name: open(os.path.join(ROOT, "csrc", "attention", name)).read()
    dims = _sm90_head_dims()
    assert dims and set(dims) <= set(HEAD_DIMS) and all(d % 64 == 0 for d in dims)
    traits = src("flash_traits.h")
    assert sorted(int(d) for d in re.findall(r"struct FlashFwdTraitsSm90<(\d+)>", traits)) == sorted(dims)
    launcher = src("flash_fwd_launcher.cu")
    hopper = launcher[launcher.index("int run_sm90_head_dim"):launcher.index("bool use_wgmma")]
    assert sorted(int(d) for d in re.findall(r"run_flash_fwd_sm90<T, (\d+)>", hopper)) == sorted(dims)
    use = launcher[launcher.index("bool use_wgmma"):launcher.index("int dispatch")]
    assert sorted(int(d) for d in re.findall(r"head_dim == (\d+)", use)) == sorted(dims)
    for d in dims:
        for name in ("fp16", "bf16"):
            assert os.path.exists(os.path.join(ROOT, "csrc", "attention", f"flash_fwd_hdim{d}_{name}_sm90a.cu"))


@pytest.mark.gpu
@pytest.mark.timeout(300)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_wgmma_and_sm80_kernels_on_hopper(dtype, monkeypatch):
    # Hopper: the wgmma kernel (D 64 / 128 / 256) and the sm80 kernel of the same calls
    # (FASTLLM_ATTN_WGMMA=0) both within the reference tolerance, on the cases that exercise the
    # wgmma path's tiles: tails in Sq and Skv, causal skipping, GQA, a padding mask with a fully
    # masked row, window, softcap, a q with row stride != D; then the route itself.
    from fastllm.bench.switches import hopper_90a
    if not hopper_90a(torch.device("cuda")):
        pytest.skip("the wgmma kernel runs on sm_90 GPUs with a 90a build")
    for D in _sm90_head_dims():
        cases = [
            dict(shape=(2, 8, 2, 97, 1025), causal=True),
            dict(shape=(1, 8, 8, 1025, 1025), causal=False, q_layout="padded"),
            dict(shape=(3, 8, 1, 17, 129), causal=True, softcap=30.0),
            dict(shape=(2, 8, 2, 300, 300), causal=True, window=100),
            dict(shape=(2, 8, 2, 200, 333), causal=False, masked=True),
        ]
        for case in cases:
            B, Hq, Hkv, Sq, Skv = case["shape"]
            q, k, v = make_qkv(B, Hq, Hkv, Sq, Skv, D, dtype, q_layout=case.get("q_layout", "bshd"))
            mask = None
            if case.get("masked"):
                mask = torch.rand(B, 1, Sq, Skv, device="cuda") > 0.3
                mask[0, 0, 5] = False                         # one row sees nothing
                mask[1, 0, :, :40] = False                    # left padding of the second sequence
            for flag in ("1", "0"):
                monkeypatch.setenv("FASTLLM_ATTN_WGMMA", flag)
                check(q, k, v, causal=case["causal"], mask=mask, window=case.get("window"),
                      softcap=case.get("softcap"))
    q, k, v = make_qkv(1, 8, 8, 256, 256, 128, dtype)
    for flag, policy in (("1", "Sm90Mma"), ("0", "Sm80Mma")):
        monkeypatch.setenv("FASTLLM_ATTN_WGMMA", flag)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            run_cuda(q, k, v, causal=True)
        names = [e.name for e in prof.events()]
        assert any("flash_fwd_kernel" in n and policy in n for n in names), (flag, names)
