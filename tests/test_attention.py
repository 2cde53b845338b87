"""flash_attention / flash_attention_varlen: every backend vs a float64 reference.

Tolerance (STYLE.md, FlashAttention's rule): a backend's max error vs the float64 reference is
at most 2x the max error of PyTorch's own computation in the same dtype (the materialized
attention computed in that dtype: scores, softmax and P V all in q.dtype, as FlashAttention's
tests do), plus one ulp of the dtype at the output's magnitude (so that an exact baseline,
e.g. a single key, does not demand a bit-exact kernel). The same rule holds for lse (an fp32
output: one fp32 ulp). For float32 inputs both errors are summation-order noise of a few ulps
(PyTorch's BLAS and the kernel's tiles add in different orders), so their ratio means
nothing: there the floor is FP32_FLOOR_ULPS ulps. Rows with no allowed key must be exactly 0
with lse = -inf.

Triton runs through the CPU interpreter here (tests/conftest.py); the grid is chosen to keep
this file around a minute on a 2-core machine. The `gpu` tests run a bigger grid natively.
"""
import math

import pytest
import torch

import fastllm
from fastllm import ref
from fastllm.ops import flash_attention, flash_attention_varlen
from fastllm.ref.attention import allowed_keys

from conftest import DEVICE

KERNEL_BACKENDS = ["triton"] + (["cuda"] if DEVICE == "cuda" else [])
BACKENDS = KERNEL_BACKENDS + ["torch"]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
LOW = [torch.float16, torch.bfloat16]
FP32_FLOOR_ULPS = 8   # observed: up to ~6 ulps for lse, ~11 for out at D=128 (both backends)


# ----------------------------------------------------------------------------------------------
# Helpers

def rand(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


def qkv(B, Hq, Hkv, Sq, Skv, D, dtype, q_scale=1.0):
    return (rand(B, Hq, Sq, D, dtype=dtype, scale=q_scale), rand(B, Hkv, Skv, D, dtype=dtype),
            rand(B, Hkv, Skv, D, dtype=dtype))


def pytorch_same_dtype(q, k, v, *, causal, scale=None, mask=None, window=None, softcap=None, sinks=None,
                       bias=None):
    """PyTorch's own attention in q.dtype (materialized; the baseline error to beat); sinks as
    transformers' eager gpt-oss does them (an extra score column, dropped after the softmax),
    bias added as eager attention adds a float mask."""
    B, Hq, Sq, D = q.shape
    g = Hq // k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.matmul(q, kk.transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias.to(s.dtype)
    allowed = allowed_keys(q.shape[2], k.shape[2], causal=causal, window=window, mask=mask, device=q.device)
    s = s.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.to(s.dtype).view(1, -1, 1, 1).expand(*s.shape[:3], 1)], -1)
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)[..., :k.shape[2]]
    return torch.matmul(p, vv).transpose(1, 2), lse


def truth(q, k, v, **kw):
    return ref.flash_attention(q.double(), k.double(), v.double(), **kw)   # (sinks: read in float64 there)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check(out, lse, exact, base, dtype):
    """out/lse of a backend vs the float64 `exact` and the same-dtype PyTorch `base`."""
    t_out, t_lse = exact
    b_out, b_lse = base
    assert out.shape == t_out.shape and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == t_lse.shape and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    ulp = torch.finfo(dtype).eps * (FP32_FLOOR_ULPS if dtype == torch.float32 else 1)
    err, b_err = max_err(out, t_out), max_err(b_out, t_out)
    assert err <= 2 * b_err + ulp * max(1.0, t_out.abs().max().item()), \
        f"out error {err:.3g} > 2 x PyTorch's {b_err:.3g} ({dtype})"
    empty = torch.isinf(t_lse)
    assert torch.equal(torch.isneginf(lse.cpu()), empty.cpu()), "lse must be -inf exactly on empty rows"
    rows = ~empty
    if rows.any():
        err, b_err = max_err(lse[rows], t_lse[rows]), max_err(b_lse[rows], t_lse[rows])
        ulps = FP32_FLOOR_ULPS if dtype == torch.float32 else 1
        floor = torch.finfo(torch.float32).eps * ulps * max(1.0, t_lse[rows].abs().max().item())
        assert err <= 2 * b_err + floor, f"lse error {err:.3g} > 2 x PyTorch's {b_err:.3g} ({dtype})"


def run_and_check(backend, q, k, v, **kw):
    out, lse = flash_attention(q, k, v, backend=backend, return_lse=True, **kw)
    check(out, lse, truth(q, k, v, **kw), pytorch_same_dtype(q, k, v, **kw), q.dtype)
    return out, lse


# ----------------------------------------------------------------------------------------------
# Numerics on a representative grid (B, Hq, Hkv, Sq, Skv, D, causal)

CASES = [
    (1, 8, 8, 1, 1, 64, True),
    (2, 8, 2, 1, 128, 128, True),       # decode-like row against a cache
    (3, 8, 1, 17, 17, 80, True),        # MQA
    (2, 8, 2, 17, 97, 96, True),        # continuation: bottom-right causal
    (1, 8, 8, 97, 97, 64, False),
    (2, 4, 1, 97, 128, 40, True),       # odd head dim (padded tile)
    (1, 8, 2, 128, 128, 128, True),
    (1, 2, 1, 17, 128, 256, False),
    (1, 4, 2, 128, 17, 72, True),       # Sq > Skv: the first rows see nothing
    (2, 2, 2, 97, 1, 64, False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_H{}/{}_S{}x{}_D{}_{}".format(*c[:6], "causal" if c[6] else "full"))
def test_matches_reference(backend, dtype, case):
    B, Hq, Hkv, Sq, Skv, D, causal = case
    q, k, v = qkv(B, Hq, Hkv, Sq, Skv, D, dtype)
    out, lse = run_and_check(backend, q, k, v, causal=causal)
    if causal and Sq > Skv:
        assert (out[:, :Sq - Skv] == 0).all() and torch.isneginf(lse[:, :, :Sq - Skv]).all()


def test_reference_matches_sdpa():
    # The reference's semantics vs PyTorch's SDPA (float64): causal bottom-right, GQA, scale, mask.
    q, k, v = qkv(2, 6, 2, 9, 23, 32, torch.float64)
    mask = torch.rand(2, 1, 9, 23, device=DEVICE) > 0.3
    mask[..., -1] = True
    for kw in (dict(causal=False), dict(causal=False, mask=mask), dict(causal=False, scale=0.3)):
        out, _ = ref.flash_attention(q, k, v, **kw)
        want = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=kw.get("mask"), scale=kw.get("scale"), enable_gqa=True).transpose(1, 2)
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    causal = torch.ones(9, 23, dtype=torch.bool, device=DEVICE).tril(23 - 9)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal, enable_gqa=True)
    torch.testing.assert_close(ref.flash_attention(q, k, v, causal=True)[0], want.transpose(1, 2),
                               rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Masks, windows, softcap, strides

def padding_mask(B, Sq, Skv, side, causal):
    """transformers-style (B, 1, Sq, Skv) bool mask: sequence b has b * 5 padding tokens on the
    left or right; with left padding the padded query rows see nothing under causal."""
    keep = torch.ones(B, Skv, dtype=torch.bool, device=DEVICE)
    for b in range(B):
        n = min(5 * b, Skv - 1)
        if n:
            if side == "left":
                keep[b, :n] = False
            else:
                keep[b, Skv - n:] = False
    mask = keep[:, None, None, :].expand(B, 1, Sq, Skv)
    if causal:
        mask = mask & torch.ones(Sq, Skv, dtype=torch.bool, device=DEVICE).tril(Skv - Sq)
    return mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("causal", [True, False])
def test_padding_mask(backend, dtype, side, causal):
    B, Sq, Skv = 3, 17, 33
    q, k, v = qkv(B, 4, 2, Sq, Skv, 64, dtype)
    mask = padding_mask(B, Sq, Skv, side, causal=False)
    if side == "left":
        mask = mask.clone()
        mask[2, 0, :3] = False           # fully masked query rows (padding queries)
    out, lse = run_and_check(backend, q, k, v, causal=causal, mask=mask)
    if side == "left":
        assert (out[2, :3] == 0).all() and torch.isneginf(lse[2, :, :3]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_broadcast_and_expanded(backend):
    dtype = torch.float16
    q, k, v = qkv(2, 4, 4, 17, 40, 64, dtype)
    keys = torch.rand(1, 1, 1, 40, device=DEVICE) > 0.5
    keys[..., 0] = True
    run_and_check(backend, q, k, v, causal=False, mask=keys)                       # (1, 1, 1, Skv)
    run_and_check(backend, q, k, v, causal=True, mask=keys.expand(2, 1, 17, 40))   # stride-0 view
    rows = torch.rand(2, 1, 17, 1, device=DEVICE) > 0.3                             # whole rows off
    out, lse = run_and_check(backend, q, k, v, causal=False, mask=rows)
    assert (out.transpose(1, 2)[~rows.expand(2, 4, 17, 1).squeeze(-1)] == 0).all()
    everything_off = torch.zeros(2, 1, 17, 40, dtype=torch.bool, device=DEVICE)
    out, lse = run_and_check(backend, q, k, v, causal=False, mask=everything_off)
    assert (out == 0).all() and torch.isneginf(lse).all()



@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_mask_skips_key_blocks_nobody_attends(backend):
    # A padded batch prefilled into a StaticCache: 200 queries against 600 slots, of which only
    # the first 200 are written; sequence 1 has 130 padding tokens in front (its first 130
    # query rows see nothing). The kernels loop only over key blocks some row of their query
    # block attends, so K/V there are never read: NaN in whole unattended 128-key blocks
    # (every kernel's tile divides 128) must not reach the output, which must equal the
    # unpoisoned run bit for bit.
    dtype, B, Sq, Skv, pad = torch.float16, 2, 200, 600, 130
    q, k, v = qkv(B, 4, 2, Sq, Skv, 64, dtype)
    keep = torch.ones(B, Skv, dtype=torch.bool, device=DEVICE)
    keep[:, Sq:] = False
    keep[1, :pad] = False
    mask = keep[:, None, None, :] & torch.ones(Sq, Skv, dtype=torch.bool, device=DEVICE).tril()
    clean, clean_lse = run_and_check(backend, q, k, v, causal=False, mask=mask)
    kp, vp = k.clone(), v.clone()
    for t in (kp, vp):
        t[:, :, 256:] = float("nan")
        t[1, :, :128] = float("nan")
    out, lse = flash_attention(q, kp, vp, causal=False, mask=mask, backend=backend, return_lse=True)
    assert torch.equal(out, clean) and torch.equal(lse, clean_lse)
    assert (out[1, :pad] == 0).all() and torch.isneginf(lse[1, :, :pad]).all()

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("causal,window,Sq,Skv", [
    (True, 1, 17, 17), (True, 16, 97, 128), (True, 50, 17, 97), (False, 20, 97, 97), (False, 7, 1, 128),
])
def test_sliding_window(backend, dtype, causal, window, Sq, Skv):
    q, k, v = qkv(2, 4, 2, Sq, Skv, 64, dtype)
    run_and_check(backend, q, k, v, causal=causal, window=window)


@pytest.mark.parametrize("backend", BACKENDS)
def test_overflowing_score_gives_nan_as_sdpa(backend):
    # Regression: an attended score of +inf made the reference's lse +inf, which it then treated
    # like an empty row's -inf (exp(s - 0)): outputs +-inf where the kernels and SDPA give NaN.
    q = torch.zeros(1, 1, 2, 16, device=DEVICE)
    k = torch.zeros(1, 1, 3, 16, device=DEVICE)
    v = torch.randn(1, 1, 3, 16, device=DEVICE)
    q[..., 0, 0], k[..., 0, 0] = 1e30, 1e30          # row 0: score 1e60 -> +inf in fp32
    want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=1e-30)
    got = flash_attention(q, k, v, causal=False, scale=1.0, backend=backend)   # (B, Sq, Hq, D)
    assert torch.isnan(got[0, 0]).all()
    assert torch.allclose(got[0, 1, 0].double(), want[0, 0, 1], atol=1e-6)    # row 1 unaffected


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_window_at_the_int32_limit_restricts_nothing(backend, causal):
    # Regression: the op caps window at 2^31 - 1 ("no restriction"), but the Triton kernel's
    # int32 bound (query position - window + 1) wrapped when Sq > Skv: rows came out all zero.
    q, k, v = qkv(1, 2, 1, 24, 16, 16, torch.float16)
    want = flash_attention(q, k, v, causal=causal, backend=backend)
    got = flash_attention(q, k, v, causal=causal, window=2 ** 31 - 1, backend=backend)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
def test_softcap(backend, dtype, causal):
    # Scores scaled up so tanh saturates on many entries (Gemma 2 uses softcap 50 on logits
    # that size); scale given explicitly, as Gemma does (query_pre_attn_scalar).
    q, k, v = qkv(2, 4, 2, 33, 65, 80, dtype, q_scale=4.0)
    run_and_check(backend, q, k, v, causal=causal, softcap=5.0, scale=0.25)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
def test_everything_together(backend, dtype):
    B, Sq, Skv = 2, 33, 70
    q, k, v = qkv(B, 8, 2, Sq, Skv, 96, dtype, q_scale=2.0)
    mask = padding_mask(B, Sq, Skv, "left", causal=False)
    run_and_check(backend, q, k, v, causal=True, mask=mask, window=20, softcap=30.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
def test_strided_views(backend, dtype):
    # transformers hands q as a transposed view of a (B, S, H, D) projection output; k/v
    # here are slices of a wider buffer (row stride D + 8) transposed the same way.
    B, Sq, Skv, D = 2, 17, 45, 64
    q = rand(B, Sq, 8, D, dtype=dtype).transpose(1, 2)
    k = rand(B, Skv, 2, D + 8, dtype=dtype)[..., :D].transpose(1, 2)
    v = rand(B, Skv, 2, D + 8, dtype=dtype)[..., 8:].transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    out, _ = run_and_check(backend, q, k, v, causal=True)
    contiguous = flash_attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True, backend=backend)
    assert torch.equal(out, contiguous)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_no_keys(backend):
    q, k, v = qkv(2, 4, 2, 0, 9, 64, torch.float16)
    out, lse = flash_attention(q, k, v, causal=True, backend=backend, return_lse=True)
    assert out.shape == (2, 0, 4, 64) and lse.shape == (2, 4, 0)
    q, k, v = qkv(2, 4, 2, 5, 0, 64, torch.float16)
    out, lse = flash_attention(q, k, v, causal=False, backend=backend, return_lse=True)
    assert out.shape == (2, 5, 4, 64) and (out == 0).all() and torch.isneginf(lse).all()
    mask = torch.ones(2, 1, 5, 0, dtype=torch.bool, device=DEVICE)   # regression: the torch path crashed
    out, lse = flash_attention(q, k, v, causal=False, mask=mask, backend=backend, return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
def test_sinks(backend, dtype, causal):
    """Attention sinks (gpt-oss's s_aux): one more softmax logit per query head, without a value.
    Sinks far below the scores (no effect) to far above (out ~ 0), and -inf (no sink); with
    causal, Sq > Skv: the first rows see no key and get out 0, lse = the sink."""
    q, k, v = qkv(2, 6, 2, 19, 13, 64, dtype)   # D 64: a head dim the CUDA kernels have (GPU run)
    sinks = torch.tensor([-30.0, -1.0, 0.5, 2.0, 12.0, float("-inf")], device=DEVICE).to(dtype)
    out, lse = run_and_check(backend, q, k, v, causal=causal, sinks=sinks)
    plain, plain_lse = flash_attention(q, k, v, causal=causal, backend=backend, return_lse=True)
    assert torch.equal(out[:, :, 5], plain[:, :, 5]) and torch.equal(lse[:, 5], plain_lse[:, 5])   # -inf: no sink
    assert out[:, :, 4].abs().max() < 1e-3 * plain[:, :, 4].abs().max()                          # sink dominates
    if causal:
        assert (out[:, :6] == 0).all()
        assert torch.equal(lse[:, :5, :6], sinks[:5].float().view(1, 5, 1).expand(2, 5, 6))
    # With a padding mask, and as a sliding window / softcap model (gpt-oss alternates windows).
    mask = padding_mask(2, 19, 13, "left", False)
    run_and_check(backend, q, k, v, causal=False, mask=mask, window=5, softcap=30.0, sinks=sinks)


def test_cuda_backends_hand_sinks_and_bias_to_the_kernels(monkeypatch):
    """The CUDA kernels fold sinks (and the prefill kernel a bias) in themselves: the backends pass
    the normalized arguments through, with no epilogue of their own. Checked on any machine with
    the glue's kernel calls replaced by the reference (the kernels themselves: test_simt_*.py)."""
    from fastllm.ops import _attention_cuda, _decode_cuda
    from fastllm.ops import decode as decode_ops
    from fastllm.ops.attention import OP, OP_VARLEN
    seen = []

    def prefill(q, k, v, mask, causal, scale, window, softcap, sinks=None, bias=None):
        seen.append((sinks, bias))
        return ref.flash_attention(q, k, v, causal=causal, scale=scale, mask=mask, sinks=sinks, bias=bias)

    def varlen(q, k, v, cu_q, cu_k, mq, mk, causal, scale, window, softcap, sinks=None):
        seen.append((sinks, None))
        return ref.flash_attention_varlen(q, k, v, cu_q, cu_k, causal=causal, scale=scale, sinks=sinks)

    def decode(q, k, v, lens, table, mask, scale, window, softcap, splits, sinks=None):
        seen.append((sinks, None))
        return ref.decode_attention(q, k, v, cache_seqlens=lens, scale=scale, sinks=sinks)
    monkeypatch.setattr(_attention_cuda, "flash_attention_cuda", prefill)
    monkeypatch.setattr(_attention_cuda, "flash_attention_varlen_cuda", varlen)
    monkeypatch.setattr(_decode_cuda, "decode_attention_cuda", decode)
    sinks = torch.tensor([-1.0, 0.5, 3.0, float("-inf")], device=DEVICE)
    q, k, v = qkv(2, 4, 2, 9, 6, 32, torch.float32)
    bias = rand(1, 4, 9, 6, dtype=torch.float32)
    got = OP.impls["cuda"](q, k, v, None, True, 0.2, 0, 0.0, sinks, bias)
    want = ref.flash_attention(q, k, v, causal=True, scale=0.2, sinks=sinks, bias=bias)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and seen[-1] == (sinks, bias)
    lens_q, lens_k = [3, 0, 5], [2, 4, 7]
    q, k, v, cu_q, cu_k = varlen_inputs(lens_q, lens_k, 4, 2, 32, torch.float32)
    got = OP_VARLEN.impls["cuda"](q, k, v, cu_q, cu_k, 5, 7, True, 0.2, 0, 0.0, sinks)
    assert seen[-1][0] is sinks
    q = rand(2, 4, 1, 32, dtype=torch.float32)
    lens = torch.tensor([0, 5], dtype=torch.int32, device=DEVICE)
    kc, vc = (t[None, :8].transpose(1, 2).expand(2, -1, -1, -1) for t in (k, v))   # (2, 2, 8, 32) caches
    decode_ops.OP.impls["cuda"](q, kc, vc, lens, None, None, 0.2, 0, 0.0, 1, sinks)
    assert seen[-1][0] is sinks


def test_return_lse_flag_and_default_scale():
    q, k, v = qkv(1, 2, 2, 5, 7, 64, torch.float32)
    out = flash_attention(q, k, v, causal=True)
    assert isinstance(out, torch.Tensor)
    out2, _ = flash_attention(q, k, v, causal=True, scale=1 / 8, return_lse=True)
    assert torch.equal(out, out2)


# ----------------------------------------------------------------------------------------------
# Varlen

def varlen_inputs(lens_q, lens_k, Hq, Hkv, D, dtype):
    cu_q = torch.tensor([0] + lens_q, device=DEVICE).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k, device=DEVICE).cumsum(0).to(torch.int32)
    q = rand(int(cu_q[-1]), Hq, D, dtype=dtype)
    k = rand(int(cu_k[-1]), Hkv, D, dtype=dtype)
    v = rand(int(cu_k[-1]), Hkv, D, dtype=dtype)
    return q, k, v, cu_q, cu_k


def varlen_same_dtype(q, k, v, cu_q, cu_k, **kw):
    out = torch.zeros_like(q)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=q.dtype, device=q.device)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if q1 > q0:
            o, l = pytorch_same_dtype(q[q0:q1].transpose(0, 1)[None], k[k0:k1].transpose(0, 1)[None],
                                      v[k0:k1].transpose(0, 1)[None], **kw)
            out[q0:q1], lse[:, q0:q1] = o[0], l[0]
    return out, lse


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kw", [dict(causal=True), dict(causal=False), dict(causal=True, window=9, softcap=20.0)],
                         ids=["causal", "full", "window_softcap"])
def test_varlen(backend, dtype, kw):
    lens_q, lens_k = [1, 17, 0, 97, 40], [1, 30, 5, 97, 33]   # includes q_len > k_len and an empty q
    q, k, v, cu_q, cu_k = varlen_inputs(lens_q, lens_k, 8, 2, 72, dtype)
    out, lse = flash_attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), backend=backend,
                                      return_lse=True, **kw)
    exact = ref.flash_attention_varlen(q.double(), k.double(), v.double(), cu_q, cu_k, **kw)
    check(out, lse, exact, varlen_same_dtype(q, k, v, cu_q, cu_k, **kw), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_sinks(backend):
    lens_q, lens_k = [1, 17, 0, 9, 40], [1, 30, 5, 3, 33]
    q, k, v, cu_q, cu_k = varlen_inputs(lens_q, lens_k, 4, 2, 64, torch.bfloat16)
    sinks = torch.tensor([-2.0, 0.0, 3.0, float("-inf")], device=DEVICE)
    kw = dict(causal=True, window=9, sinks=sinks)
    out, lse = flash_attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), backend=backend,
                                      return_lse=True, **kw)
    exact = ref.flash_attention_varlen(q.double(), k.double(), v.double(), cu_q, cu_k, **kw)
    check(out, lse, exact, varlen_same_dtype(q, k, v, cu_q, cu_k, **kw), torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_equals_padded_batch(backend):
    # One sequence packed == the batched op on that sequence (same kernel, same arithmetic).
    q, k, v, cu_q, cu_k = varlen_inputs([23], [50], 4, 1, 64, torch.bfloat16)
    out = flash_attention_varlen(q, k, v, cu_q, cu_k, 23, 50, causal=True, backend=backend)
    batched = flash_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                              causal=True, backend=backend)
    assert torch.equal(out, batched[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_strided_offsets(backend):
    # Regression: cu_seqlens taken as a strided view (every other entry of a wider int32 buffer)
    # were read densely by the Triton kernel (silently wrong rows); every backend must give the
    # contiguous copy's answer, Triton also when its implementation is called directly.
    from fastllm.ops.attention import OP_VARLEN
    q, k, v, cu_q, cu_k = varlen_inputs([3, 7], [5, 7], 4, 2, 32, torch.float16)
    wide_q, wide_k = (torch.stack([c, torch.full_like(c, 99)], 1).reshape(-1)[::2] for c in (cu_q, cu_k))
    assert wide_q.stride(0) == 2 and torch.equal(wide_q, cu_q)
    want = flash_attention_varlen(q, k, v, cu_q, cu_k, 7, 7, causal=True, backend=backend, return_lse=True)
    got = flash_attention_varlen(q, k, v, wide_q, wide_k, 7, 7, causal=True, backend=backend, return_lse=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    if backend != "cuda":       # (its glue refuses strided offsets by name; the op hands it a copy)
        direct = OP_VARLEN.impls[backend](q, k, v, wide_q, wide_k, 7, 7, True, 32 ** -0.5, 0, 0.0, None)
        assert torch.equal(direct[0], want[0]) and torch.equal(direct[1], want[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_uncovered_rows_and_clamped_offsets(backend):
    # Rows past cu_seqlens_q[-1]: out 0, lse -inf on every backend (the kernels' outputs were
    # torch.empty there). And the kernels themselves, handed unchecked bad offsets (past the
    # end, decreasing, negative: what an unvalidated CUDA call may get), read them clamped into
    # the packed tensors exactly as the reference does: no stray access (the interpreter
    # corrupted the heap before), the same rows.
    from fastllm.ops.attention import OP_VARLEN
    q, k, v, _, _ = varlen_inputs([13, 10], [20, 17], 4, 2, 64, torch.float16)
    for cq, ck in (([0, 5, 11], [0, 9, 37]), ([0, 13, 23], [0, 20, 37]), ([0, 30, 40], [0, 20, 60]),
                   ([0, 15, 7], [0, 25, 3]), ([-4, 9, 23], [0, -2, 37])):
        cu_q, cu_k = (torch.tensor(c, dtype=torch.int32, device=DEVICE) for c in (cq, ck))
        exact = ref.flash_attention_varlen(q.double(), k.double(), v.double(), cu_q, cu_k, causal=True)
        out, lse = OP_VARLEN.impls[backend](q, k, v, cu_q, cu_k, 64, 64, True, 0.125, 0, 0.0, None)
        assert torch.equal(torch.isneginf(lse), torch.isneginf(exact[1])), (cq, ck)
        torch.testing.assert_close(out.double(), exact[0], rtol=0, atol=1e-2)
        if cq == [0, 5, 11]:  # a valid call with uncovered rows: the public op too
            out2 = flash_attention_varlen(q, k, v, cu_q, cu_k, 6, 28, causal=True, scale=0.125, backend=backend)
            assert torch.equal(out2, out) and (out[11:] == 0).all()


# ----------------------------------------------------------------------------------------------
# Registry, CUDA hook, bad inputs

def test_triton_rejects_big_head_dim_auto_uses_reference():
    q, k, v = qkv(1, 2, 2, 3, 5, 320, torch.float32)
    with pytest.raises(fastllm.BackendUnavailableError, match="head dim 320"):
        flash_attention(q, k, v, causal=True, backend="triton")
    out = flash_attention(q, k, v, causal=True)              # auto: the reference serves it
    torch.testing.assert_close(out, ref.flash_attention(q, k, v, causal=True)[0], rtol=0, atol=0)


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU-only check")
def test_cuda_forced_on_cpu_raises():
    q, k, v = qkv(1, 2, 2, 3, 5, 64, torch.float16)
    with pytest.raises(fastllm.BackendUnavailableError, match="cuda"):
        flash_attention(q, k, v, causal=True, backend="cuda")


def test_bad_inputs():
    f16 = torch.float16
    q, k, v = qkv(2, 8, 2, 5, 7, 64, f16)
    with pytest.raises(TypeError, match="argument 'q' must be a torch.Tensor"):
        flash_attention(q.tolist(), k, v, causal=True)
    with pytest.raises(ValueError, match="argument 'q' must be 4-D"):
        flash_attention(q[0], k, v, causal=True)
    with pytest.raises(TypeError, match=r"argument 'q' must have dtype in \(float16, bfloat16, float32\)"):
        flash_attention(q.double(), k.double(), v.double(), causal=True)
    with pytest.raises(TypeError, match="argument 'k' must have the dtype of 'q'"):
        flash_attention(q, k.float(), v, causal=True)
    with pytest.raises(TypeError, match="argument 'v' must have the dtype of 'q'"):
        flash_attention(q, k, v.to(torch.bfloat16), causal=True)
    with pytest.raises(ValueError, match="arguments 'k' and 'v' must have the same shape"):
        flash_attention(q, k, v[:, :, :6], causal=True)
    with pytest.raises(ValueError, match="argument 'k' must have the head dim of 'q'"):
        flash_attention(q, k[..., :32], v[..., :32], causal=True)
    with pytest.raises(ValueError, match=r"query heads \(8\) must be a multiple of the number of kv heads .* \(3\)"):
        flash_attention(q, rand(2, 3, 7, 64, dtype=f16), rand(2, 3, 7, 64, dtype=f16), causal=True)
    with pytest.raises(ValueError, match="argument 'k' must have the batch size of 'q'"):
        flash_attention(q, k[:1], v[:1], causal=True)
    with pytest.raises(ValueError, match="argument 'q' must have unit stride in the head dim"):
        flash_attention(q.transpose(2, 3).contiguous().transpose(2, 3), k, v, causal=True)
    with pytest.raises(ValueError, match="argument 'v' must have unit stride in the head dim"):
        flash_attention(q, k, v.transpose(2, 3).contiguous().transpose(2, 3), causal=True)
    # Another device (meta stands in for a second GPU): named, never a launch on mixed pointers.
    meta = {n: t.to("meta") for n, t in (("k", k), ("v", v), ("mask", torch.ones(2, 1, 5, 7, dtype=torch.bool)),
                                         ("sinks", torch.zeros(8)))}
    for name, call in (("k", lambda: flash_attention(q, meta["k"], meta["v"], causal=True)),
                       ("v", lambda: flash_attention(q, k, meta["v"], causal=True)),
                       ("mask", lambda: flash_attention(q, k, v, causal=False, mask=meta["mask"])),
                       ("sinks", lambda: flash_attention(q, k, v, causal=True, sinks=meta["sinks"]))):
        with pytest.raises(ValueError, match=f"argument '{name}' must be on the device of 'q'"):
            call()
    with pytest.raises(TypeError, match="argument 'mask' must have dtype bool"):
        flash_attention(q, k, v, causal=False, mask=torch.zeros(2, 1, 5, 7, dtype=f16, device=DEVICE))
    with pytest.raises(ValueError, match=r"argument 'mask' must be broadcastable as \(2 or 1, 1, 5, 7\)"):
        flash_attention(q, k, v, causal=False, mask=torch.ones(2, 8, 5, 7, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="argument 'mask' must be broadcastable"):
        flash_attention(q, k, v, causal=False, mask=torch.ones(5, 7, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="argument 'mask' must be broadcastable"):
        flash_attention(q, k, v, causal=False, mask=torch.ones(2, 1, 5, 8, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="argument 'window' must be >= 1"):
        flash_attention(q, k, v, causal=True, window=0)
    with pytest.raises(TypeError, match="argument 'window' must be an int"):
        flash_attention(q, k, v, causal=True, window=2.5)
    with pytest.raises(ValueError, match="argument 'softcap' must be a finite float > 0"):
        flash_attention(q, k, v, causal=True, softcap=0.0)
    with pytest.raises(ValueError, match="argument 'softcap' must be a finite float > 0"):
        flash_attention(q, k, v, causal=True, softcap=-1.0)
    # Finite in Python but not in the kernels' fp32 (NaN outputs before), type vs value errors.
    with pytest.raises(ValueError, match="argument 'softcap' must be a finite float > 0 .within float32."):
        flash_attention(q, k, v, causal=True, softcap=1e39)
    with pytest.raises(ValueError, match="scale / softcap underflows float32"):
        flash_attention(q, k, v, causal=True, softcap=3e38)
    for bad in (float("nan"), float("inf"), 1e39):
        with pytest.raises(ValueError, match="argument 'scale' must be finite in float32"):
            flash_attention(q, k, v, causal=True, scale=bad)
    with pytest.raises(TypeError, match="argument 'scale' must be a float or None, got str"):
        flash_attention(q, k, v, causal=True, scale="0.1")
    with pytest.raises(ValueError, match=r"argument 'sinks' must have one logit per query head \(8\), got shape"):
        flash_attention(q, k, v, causal=True, sinks=torch.zeros(2, device=DEVICE))
    with pytest.raises(TypeError, match="argument 'sinks' must have dtype in"):
        flash_attention(q, k, v, causal=True, sinks=torch.zeros(8, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="argument 'sinks' must be 1-D"):
        flash_attention(q, k, v, causal=True, sinks=torch.zeros(1, 8, device=DEVICE))
    if DEVICE == "cpu":   # values are checked on CPU (on CUDA it would sync every call)
        for bad in (float("nan"), float("inf")):
            with pytest.raises(ValueError, match=r"argument 'sinks' must hold finite logits .* \(index 3\)"):
                flash_attention(q, k, v, causal=True, sinks=torch.tensor([0.0] * 3 + [bad] + [0.0] * 4))
    # A window longer than any sequence restricts nothing, however large (it broke the op schema).
    assert torch.equal(flash_attention(q, k, v, causal=True, window=2 ** 63), flash_attention(q, k, v, causal=True))
    with pytest.raises(TypeError, match="argument 'causal' must be a bool, got NoneType"):
        flash_attention(q, k, v, causal=None)
    with pytest.raises(TypeError, match="argument 'causal' must be a bool, got int"):
        flash_attention(q, k, v, causal=1)
    # A numpy bool (a comparison of numpy values) is a bool; the message named it "bool" before.
    np = pytest.importorskip("numpy")
    assert torch.equal(flash_attention(q, k, v, causal=np.bool_(True)), flash_attention(q, k, v, causal=True))
    with pytest.raises(TypeError, match="argument 'causal' must be a bool, got numpy.float64"):
        flash_attention(q, k, v, causal=np.float64(1.0))
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'causal'"):
        flash_attention(q, k, v)
    with pytest.raises(ValueError, match="argument 'backend' must be one of"):
        flash_attention(q, k, v, causal=True, backend="sdpa")


def test_bad_varlen_inputs():
    q, k, v, cu_q, cu_k = varlen_inputs([3, 4], [3, 6], 4, 2, 64, torch.float16)
    with pytest.raises(ValueError, match="argument 'q' must be 3-D"):
        flash_attention_varlen(q[None], k, v, cu_q, cu_k, 4, 6, causal=True)
    with pytest.raises(TypeError, match=r"argument 'cu_seqlens_q' must have dtype in \(int32\)"):
        flash_attention_varlen(q, k, v, cu_q.long(), cu_k, 4, 6, causal=True)
    with pytest.raises(ValueError, match="'cu_seqlens_q' and 'cu_seqlens_k' must have the same length"):
        flash_attention_varlen(q, k, v, cu_q, cu_k[:2], 4, 6, causal=True)
    with pytest.raises(ValueError, match="argument 'max_seqlen_k' must be an int >= 0"):
        flash_attention_varlen(q, k, v, cu_q, cu_k, 4, -1, causal=True)
    with pytest.raises(TypeError, match="argument 'max_seqlen_k' must be an int >= 0"):
        flash_attention_varlen(q, k, v, cu_q, cu_k, 4, 6.0, causal=True)
    with pytest.raises(ValueError, match=r"query heads \(4\) must be a multiple"):
        flash_attention_varlen(q, k[:, :1].expand(-1, 3, -1), v[:, :1].expand(-1, 3, -1), cu_q, cu_k, 4, 6,
                               causal=True)
    with pytest.raises(ValueError, match="argument 'window' must be >= 1"):
        flash_attention_varlen(q, k, v, cu_q, cu_k, 4, 6, causal=True, window=-3)
    # Values (always on CPU; on CUDA with validate=True, a device sync).
    bad = lambda *c: torch.tensor(c, dtype=torch.int32, device=DEVICE)  # noqa: E731
    for cq, ck, msg in (((0, 3, 8), (0, 3, 9), "'cu_seqlens_q' must be non-decreasing prefix sums from 0 to at most 7"),
                        ((1, 3, 7), (0, 3, 9), "'cu_seqlens_q' must be non-decreasing"),
                        ((0, 5, 4), (0, 3, 9), "'cu_seqlens_q' must be non-decreasing"),
                        ((0, 3, 7), (0, 3, 10), "'cu_seqlens_k' must be non-decreasing prefix sums from 0 to at most 9"),
                        ((0, 3, 7), (0, 3, 9), "'max_seqlen_q' = 3 is below the longest sequence")):
        with pytest.raises(ValueError, match=msg):
            flash_attention_varlen(q, k, v, bad(*cq), bad(*ck), 3 if "max_seqlen_q" in msg else 4, 6,
                                   causal=True, validate=True)
    with pytest.raises(ValueError, match="'max_seqlen_k' = 5 is below the longest sequence in 'cu_seqlens_k' .6."):
        flash_attention_varlen(q, k, v, cu_q, cu_k, 4, 5, causal=True, validate=True)
    with pytest.raises(TypeError, match="argument 'validate' must be a bool"):
        flash_attention_varlen(q, k, v, cu_q, cu_k, 4, 6, causal=True, validate=1)


# ----------------------------------------------------------------------------------------------
# torch.library / torch.compile

@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    q, k, v = qkv(2, 4, 2, 9, 20, 64, torch.float16)
    mask = padding_mask(2, 9, 20, "left", causal=False)
    sinks = torch.tensor([-1.0, 0.0, 2.0, float("-inf")], device=DEVICE)
    op = torch.ops.fastllm.flash_attention.default
    torch.library.opcheck(op, (q, k, v, mask, True, 0.125, 0, 0.0, None, None, backend))
    torch.library.opcheck(op, (q, k, v, None, False, 0.2, 5, 10.0, sinks, None, backend))
    q, k, v, cu_q, cu_k = varlen_inputs([3, 9], [5, 12], 4, 2, 64, torch.bfloat16)
    torch.library.opcheck(torch.ops.fastllm.flash_attention_varlen.default,
                          (q, k, v, cu_q, cu_k, 9, 12, True, 0.125, 0, 0.0, None, backend))
    torch.library.opcheck(torch.ops.fastllm.flash_attention_varlen.default,
                          (q, k, v, cu_q, cu_k, 9, 12, True, 0.125, 0, 0.0, sinks, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    def f(q, k, v, mask):
        return flash_attention(q, k, v, causal=True, mask=mask, window=8, backend=backend) * 2

    q, k, v = qkv(2, 4, 2, 9, 20, 64, torch.float16)
    mask = padding_mask(2, 9, 20, "right", causal=False)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, mask)
    assert torch.equal(got, f(q, k, v, mask))

    def g(q, k, v, cu_q, cu_k):
        return flash_attention_varlen(q, k, v, cu_q, cu_k, 9, 12, causal=True, backend=backend)

    args = varlen_inputs([3, 9], [5, 12], 4, 2, 64, torch.float16)
    assert torch.equal(torch.compile(g, fullgraph=True, backend="aot_eager")(*args), g(*args))


# ----------------------------------------------------------------------------------------------
# GPU: the full grid, natively

@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter's tile config; a GPU runs its own")
@pytest.mark.parametrize("config", [(128, 32, 4, 1), (64, 32, 4, 1), (16, 64, 4, 1)], ids=str)
def test_triton_gpu_tile_sizes_under_the_interpreter(config, monkeypatch):
    # The interpreter otherwise always runs 64 x 64 tiles; a GPU runs 128 x 32 (D 128, 16-bit),
    # 64 x 32 (D 256 on sm80) and 16-row fp32 tiles: the causal / window tile ranges, the mask
    # scan and the bias tiles at those sizes, checked here rather than first on a GPU.
    import fastllm.triton_kernels.flash_attention as fa
    monkeypatch.setattr(fa, "_INTERPRET_CONFIG", config)
    B, Sq, Skv = 2, 70, 133
    q, k, v = qkv(B, 4, 2, Sq, Skv, 64, torch.float16, q_scale=2.0)
    run_and_check("triton", q, k, v, causal=True, window=40, softcap=20.0)
    run_and_check("triton", q, k, v, causal=False, mask=padding_mask(B, Sq, Skv, "left", causal=True),
                  sinks=torch.randn(4, device=DEVICE))
    q2, k2, v2 = qkv(B, 4, 2, Skv, Skv, 64, torch.bfloat16)
    bias = rand(1, 4, Skv, Skv, dtype=torch.float32)
    run_and_check("triton", q2, k2, v2, causal=True, bias=bias)


GPU_SEQ = [(1, 1), (1, 1025), (17, 97), (97, 97), (128, 128), (113, 203), (1025, 1025), (512, 1025)]


# The CUDA kernel's own grid (every compiled head dim, layouts, windows) is in
# tests/test_attention_cuda.py; this one covers Triton's any-D support natively.
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [40, 59, 64, 80, 96, 128, 160, 256])
@pytest.mark.parametrize("Sq,Skv", GPU_SEQ)
@pytest.mark.parametrize("heads", [(8, 8), (8, 2), (8, 1)])
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_grid(backend, dtype, D, Sq, Skv, heads, causal):
    q, k, v = qkv(2, heads[0], heads[1], Sq, Skv, D, dtype)
    try:
        run_and_check(backend, q, k, v, causal=causal)
    except fastllm.BackendUnavailableError as e:
        pytest.skip(str(e))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("D", [64, 128, 256])
def test_gpu_features(backend, dtype, D):
    B, Sq, Skv = 3, 300, 1025
    q, k, v = qkv(B, 8, 2, Sq, Skv, D, dtype, q_scale=2.0)
    mask = padding_mask(B, Sq, Skv, "left", causal=False)
    try:
        run_and_check(backend, q, k, v, causal=True, mask=mask, window=256, softcap=30.0)
        run_and_check(backend, q, k, v, causal=False, window=100)
        lens_q, lens_k = [1, 300, 0, 1025, 77], [1, 1025, 5, 1025, 33]
        q, k, v, cu_q, cu_k = varlen_inputs(lens_q, lens_k, 8, 2, D, dtype)
        out, lse = flash_attention_varlen(q, k, v, cu_q, cu_k, 1025, 1025, causal=True, backend=backend,
                                          return_lse=True)
    except fastllm.BackendUnavailableError as e:
        pytest.skip(str(e))
    exact = ref.flash_attention_varlen(q.double(), k.double(), v.double(), cu_q, cu_k, causal=True)
    check(out, lse, exact, varlen_same_dtype(q, k, v, cu_q, cu_k, causal=True), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("Sq,Skv,causal", [(1025, 1025, True), (1, 4097, False), (97, 1025, False),
                                           (2048, 2048, True)])
def test_gpu_error_vs_sdpa(backend, dtype, D, Sq, Skv, causal):
    # The rule taken literally: at most ~2x the error of PyTorch's SDPA (its default
    # dispatch on this GPU: the flash / efficient / cuDNN kernels, fp32 accumulation) in the same
    # dtype, vs float64, plus an ulp at the output's magnitude. The rule above (2x the
    # materialized attention in dtype) is what the CPU can check: CPU SDPA keeps P in fp32 and
    # is 2-3.4x more accurate in bf16 than any kernel that rounds P for its P V product.
    import torch.nn.functional as F
    q, k, v = qkv(2, 16, 4, Sq, Skv, D, dtype, q_scale=2.0)
    try:
        out = flash_attention(q, k, v, causal=causal, backend=backend)
    except fastllm.BackendUnavailableError as e:
        pytest.skip(str(e))
    exact = truth(q, k, v, causal=causal)[0]
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True).transpose(1, 2)
    err, s_err = max_err(out, exact), max_err(sdpa, exact)
    ulp = torch.finfo(dtype).eps * max(1.0, exact.abs().max().item())
    assert err <= 2 * s_err + ulp, f"error {err:.3g} > 2 x SDPA's {s_err:.3g} + ulp ({backend}, {dtype})"


def test_triton_grid_limits_are_a_reason_not_a_launch_failure():
    # Regression: the Triton kernel put B * Hq on grid axis y (<= 65535): 2048 sequences x 32
    # heads failed at launch with "invalid argument". Heads are on y and sequences on z now;
    # beyond 65535 of either the backend declines with the reason (auto moves on).
    from fastllm.ops.attention import OP, OP_VARLEN
    t = lambda *s: torch.empty(*s, dtype=torch.float16, device="meta")  # noqa: E731
    q, k = t(2048, 32, 128, 64), t(2048, 8, 128, 64)
    assert OP.supports["triton"](q, k, k, None, True, 0.125, 0, 0.0) is None
    q, k = t(70000, 2, 16, 64), t(70000, 2, 16, 64)
    assert "at most 65535" in OP.supports["triton"](q, k, k, None, True, 0.125, 0, 0.0)
    cu = torch.empty(70001, dtype=torch.int32, device="meta")
    qv = t(70000 * 4, 8, 64)
    assert "70000 sequences" in OP_VARLEN.supports["triton"](qv, qv, qv, cu, cu, 4, 4, True, 0.125, 0, 0.0)
