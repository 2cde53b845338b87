"""int8_matmul_dynamic (W8A8 with per-token dynamic scales; the quantization fused into the
Triton GEMM at M <= FUSE_MAX_M): quantized bits and row scales identical to quantize_per_token
on every backend (NaN / inf / all-zero rows, ties, SmoothQuant factors), outputs within the int8
epilogue's bound of the exact result, the fused path taken exactly where intended, bad input,
opcheck.

Bits are checked through the identity: with b = I (K x K), w_scale = 1 and no bias, out[m, k] =
rn(q[m, k] * a_scale[m]) -- one fp32 product rounded once to the output dtype -- so comparing
with that product computed from the reference's (q, a_scale) is exact on every device.
"""
import pytest
import torch

import fastllm.triton_kernels.quantize_per_token as triton_quantize
from fastllm import ref
from fastllm.ops import int8_matmul_dynamic
from fastllm.ops.int8_dynamic import FUSE_MAX_M

from conftest import DEVICE
from test_int8 import assert_epilogue_close, exact_int, rand_int8

BACKENDS = ["triton", "torch"] + (["cuda"] if DEVICE == "cuda" else [])
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _act(M, K, dtype):
    x = torch.randn(M, K) * (torch.rand(M, 1) * 4 + 0.1)
    x[:, :: max(K // 7, 1)] *= 20            # a few heavy input channels, as in LLMs
    return x.to(dtype).to(DEVICE)


def _smoothed(x, smooth):
    return x.cpu() if smooth is None else x.cpu().float() * smooth.cpu()


@pytest.mark.parametrize("M", [6, FUSE_MAX_M + 3], ids=["fused", "unfused"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_quantization_bits(backend, dtype, M):
    K = 80
    x = torch.randn(M, K) * 40
    x[0, :8] = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 126.5, -126.5, 127.0])   # amax 127: ties
    x[0, 8:] = 0
    x[1, 3] = float("nan")                    # a NaN row: q 0, a_scale NaN -> NaN outputs
    x[2, 7] = -float("inf")
    x[3] = 0                                  # all zero: scale 1, q 0
    x[4, :3] = torch.tensor([1e30, -1e30, 3.0])
    x[5] = 0                                  # amax < 127 / FLT_MAX (fp16: flushed to a zero row):
    x[5, :2] = torch.tensor([2e-37, -3e-38])  # 127 / amax is inf, its zeros 0 * inf, still q 0
    x = x.to(dtype).to(DEVICE)
    eye = torch.eye(K, dtype=torch.int8, device=DEVICE)
    ones = torch.ones(K, device=DEVICE)
    for smooth in (None, torch.rand(K, device=DEVICE) + 0.5):
        out = int8_matmul_dynamic(x, eye, ones, smooth=smooth, backend=backend)
        q, a_s = ref.quantize_per_token(_smoothed(x, smooth))
        want = (q.float() * a_s[:, None]).to(dtype)
        torch.testing.assert_close(out.cpu(), want, rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m: f"smooth={smooth is not None}: {m}")
        if smooth is None:   # the reference itself: ties to even, scale 1 for a zero row
            assert q[0, :8].tolist() == [0, 2, 2, 0, -2, 126, -126, 127] and a_s[0].item() == 1.0
            assert torch.isnan(a_s[1:3]).all() and (q[1:3] == 0).all()
            assert a_s[3].item() == 1.0 and (q[3] == 0).all()


@pytest.mark.parametrize("K,N", [(48, 16), (80, 48)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, K, N):
    for M in [1, 2, 16, 17, 33, FUSE_MAX_M, FUSE_MAX_M + 1, 97]:
        for dtype in DTYPES:
            x = _act(M, K, dtype)
            b, w_s = ref.quantize_per_token(torch.randn(N, K) * 0.05)
            b, w_s = b.to(DEVICE), w_s.to(DEVICE)
            smooth = (torch.rand(K) + 0.5).to(DEVICE) if M % 2 else None
            bias = torch.randn(N, device=DEVICE).to(dtype) if M > 2 else None
            out = int8_matmul_dynamic(x, b, w_s, bias, smooth=smooth, backend=backend)
            assert out.dtype == dtype and out.shape == (M, N)
            q, a_s = ref.quantize_per_token(_smoothed(x, smooth))
            assert_epilogue_close(out, exact_int(q, b), a_s, w_s, bias, dtype)


def test_triton_fuses_only_small_m(monkeypatch):
    # At M <= FUSE_MAX_M the Triton backend never calls the separate quantize kernel; above, it
    # does (once), and both equal the reference composition.
    calls = []
    real = triton_quantize.quantize_per_token
    monkeypatch.setattr(triton_quantize, "quantize_per_token", lambda x: calls.append(x.shape) or real(x))
    b, w_s = rand_int8(32, 64), torch.rand(32, device=DEVICE) * 0.01
    for M, n_calls in ((FUSE_MAX_M, 0), (FUSE_MAX_M + 1, 1)):
        calls.clear()
        x = _act(M, 64, torch.float16)
        out = int8_matmul_dynamic(x, b, w_s, backend="triton")
        assert len(calls) == n_calls, (M, calls)
        torch.testing.assert_close(out, ref.int8_matmul_dynamic(x, b, w_s), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_and_empty(backend):
    base = _act(9, 96 + 16, torch.bfloat16)
    b, w_s = rand_int8(32, 96), torch.rand(32, device=DEVICE) * 0.01
    for x in (base[:, 16:], _act(96, 9, torch.bfloat16).t()):   # padded rows; a transposed view
        assert not x.is_contiguous()
        out = int8_matmul_dynamic(x, b, w_s, backend=backend)
        q, a_s = ref.quantize_per_token(x.cpu())
        assert_epilogue_close(out, exact_int(q, b), a_s, w_s, None, x.dtype)
    out = int8_matmul_dynamic(torch.randn(0, 96, device=DEVICE), b, w_s, backend=backend)
    assert out.shape == (0, 32)


def test_bad_inputs():
    x, b, w_s = torch.randn(4, 32), torch.randint(-5, 5, (16, 32), dtype=torch.int8), torch.ones(16)
    cases = [
        (TypeError, r"argument 'x' must have dtype", (x.to(torch.int8), b, w_s), {}),
        (TypeError, r"argument 'b' must have dtype in \(int8\)", (x, b.float(), w_s), {}),
        (ValueError, r"K = x.shape\[1\] = 40 must be a multiple of 16",
         (torch.randn(4, 40), torch.zeros(16, 40, dtype=torch.int8), w_s), {}),
        (ValueError, r"argument 'b' must have shape \(N, K\) with K = x.shape\[1\] = 32", (x, b[:, :16], w_s), {}),
        (ValueError, r"argument 'w_scale' must have shape \(16,\)", (x, b, torch.ones(8)), {}),
        (TypeError, r"argument 'w_scale' must have dtype", (x, b, torch.ones(16).double()), {}),
        (ValueError, r"argument 'bias' must have shape \(16,\)", (x, b, w_s, torch.ones(15)), {}),
        (ValueError, r"argument 'smooth' must have shape \(32,\)", (x, b, w_s), {"smooth": torch.ones(31)}),
        (TypeError, r"argument 'smooth' must have dtype", (x, b, w_s), {"smooth": torch.ones(32).half()}),
        # Regression: a NaN factor was zeroed (static) and a 0 zeroed its channel, without a word.
        (ValueError, r"argument 'smooth' must be positive and finite, got nan \(index 3\)", (x, b, w_s),
         {"smooth": torch.ones(32).index_fill(0, torch.tensor([3]), float("nan"))}),
        (ValueError, r"argument 'smooth' must be positive and finite, got 0.0 \(index 0\)", (x, b, w_s),
         {"smooth": torch.zeros(32)}),
        (ValueError, r"argument 'smooth' must be positive and finite, got -1.0", (x, b, w_s), {"smooth": -torch.ones(32)}),
        (ValueError, r"unknown backend|backend", (x, b, w_s), {"backend": "nope"}),
    ]
    for exc, msg, args, kw in cases:
        with pytest.raises(exc, match=msg):
            int8_matmul_dynamic(*args, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x = _act(5, 48, torch.bfloat16)
    b, w_s = rand_int8(32, 48), torch.rand(32, device=DEVICE) * 0.01
    op = torch.ops.fastllm.int8_matmul_dynamic.default
    torch.library.opcheck(op, (x, b, w_s, None, None, backend))
    torch.library.opcheck(op, (x.half(), b, w_s, torch.randn(32, device=DEVICE), torch.rand(48, device=DEVICE) + 0.5,
                               backend))
