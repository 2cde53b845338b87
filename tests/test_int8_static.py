"""int8_matmul_static (W8A8 with a calibrated per-tensor activation scale, quantization fused
into the GEMM): quantization bits identical on every backend (NaN, inf, ties to even), outputs
within the int8 epilogue's bound (test_int8.assert_epilogue_close) of the exact result of the
same int8 operands, odd shapes, strides, bad input, opcheck.

The quantized activations are integers, so checking them exactly is possible: with b = the
identity and a power-of-two act_scale, out * (1 / act_scale) == q with no rounding anywhere.
"""
import pytest
import torch

from fastllm import ref
from fastllm.ops import int8_matmul_static
from fastllm.ops.int8_static import input_multiplier

from conftest import DEVICE
from test_int8 import assert_epilogue_close, exact_int, rand_int8

BACKENDS = ["triton", "torch"] + (["cuda"] if DEVICE == "cuda" else [])
M_SAMPLE = [1, 2, 16, 17, 33, 97]
KN = [(48, 16), (80, 48)]


def _act(M, K, dtype, outliers=True):
    x = torch.randn(M, K) * (torch.rand(M, 1) * 2 + 0.2)
    if outliers:
        x[:, :: max(K // 7, 1)] *= 20            # a few heavy input channels, as in LLMs
    return x.to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("backend", BACKENDS)
def test_quantization_bits(backend, dtype):
    K = 80
    x = torch.randn(5, K) * 40
    x[0, :8] = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 126.5, -126.5, 3.5]) / 8   # ties at scale 1/8
    x[1, :5] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30])
    x = x.to(dtype).to(DEVICE)
    eye = torch.eye(K, dtype=torch.int8, device=DEVICE)
    ones = torch.ones(K, device=DEVICE)
    for smooth in (None, torch.rand(K, device=DEVICE) + 0.5):
        act_scale = 0.125   # power of two: in_mul = smooth * 8 and out * 8 are exact
        out = int8_matmul_static(x, eye, act_scale, ones, smooth=smooth, backend=backend)
        want = ref.quantize_static(x.cpu(), input_multiplier(torch.tensor([act_scale]),
                                                             smooth.cpu() if smooth is not None else None))
        got = out.cpu().double() * 8
        assert torch.equal(got, want.double()), f"smooth={smooth is not None}"
        if smooth is None:   # the reference itself: ties to even, NaN -> 0, saturation
            assert want[0, :8].tolist() == [0, 2, 2, 0, -2, 126, -126, 4]
            assert want[1, :5].tolist() == [0, 127, -127, 127, -127]


def _check(out, x, b, act_scale, w_s, bias, smooth):
    in_mul = input_multiplier(torch.tensor([act_scale]), smooth.cpu() if smooth is not None else None)
    q = ref.quantize_static(x.cpu(), in_mul)
    assert_epilogue_close(out, exact_int(q, b), torch.tensor([act_scale]), w_s, bias, x.dtype)


@pytest.mark.parametrize("K,N", KN)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, K, N):
    for M in M_SAMPLE:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            x = _act(M, K, dtype)
            b, w_s = ref.quantize_per_token(torch.randn(N, K) * 0.05)
            b, w_s = b.to(DEVICE), w_s.to(DEVICE)
            smooth = (torch.rand(K) + 0.5).to(DEVICE) if M % 2 else None
            bias = torch.randn(N, device=DEVICE).to(dtype) if M > 2 else None
            act_scale = x.float().abs().max().item() / 127 * 0.7     # some saturation, as in practice
            out = int8_matmul_static(x, b, act_scale, w_s, bias, smooth=smooth, backend=backend)
            assert out.dtype == dtype and out.shape == (M, N)
            _check(out, x, b, act_scale, w_s, bias, smooth)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_and_tensor_scale(backend):
    # x with a padded row stride (and, off CUDA, a transposed view: the Triton and torch
    # backends take any strides); act_scale as a 0-d tensor.
    base = _act(9, 96 + 16, torch.float16)
    xs = [base[:, 16:]] + ([_act(96, 9, torch.float16).t()] if backend != "cuda" else [])
    b, w_s = rand_int8(32, 96), torch.rand(32, device=DEVICE) * 0.01
    for x in xs:
        assert not x.is_contiguous()
        s = torch.tensor(0.05, device=DEVICE)
        out = int8_matmul_static(x, b, s, w_s, backend=backend)
        _check(out, x, b, 0.05, w_s, None, None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    out = int8_matmul_static(torch.randn(0, 32, device=DEVICE), rand_int8(16, 32), 0.1,
                             torch.ones(16, device=DEVICE), backend=backend)
    assert out.shape == (0, 16)


def test_bad_inputs():
    x, b, w_s = torch.randn(4, 32), torch.randint(-5, 5, (16, 32), dtype=torch.int8), torch.ones(16)
    cases = [
        (TypeError, r"argument 'x' must have dtype", (x.to(torch.int8), b, 0.1, w_s), {}),
        (TypeError, r"argument 'b' must have dtype in \(int8\)", (x, b.float(), 0.1, w_s), {}),
        (ValueError, r"K = x.shape\[1\] = 40 must be a multiple of 16",
         (torch.randn(4, 40), torch.zeros(16, 40, dtype=torch.int8), 0.1, w_s), {}),
        (ValueError, r"argument 'b' must have shape \(N, K\) with K = x.shape\[1\] = 32", (x, b[:, :16], 0.1, w_s), {}),
        (ValueError, r"argument 'act_scale' must be one calibrated per-tensor scale", (x, b, torch.ones(4), w_s), {}),
        (ValueError, r"argument 'act_scale' must be positive and finite", (x, b, 0.0, w_s), {}),
        (ValueError, r"argument 'act_scale' must be positive and finite", (x, b, float("nan"), w_s), {}),
        (TypeError, r"argument 'act_scale' must have dtype", (x, b, torch.ones(1, dtype=torch.float64), w_s), {}),
        (ValueError, r"argument 'w_scale' must have shape \(16,\)", (x, b, 0.1, torch.ones(8)), {}),
        (ValueError, r"argument 'smooth' must have shape \(32,\)", (x, b, 0.1, w_s), {"smooth": torch.ones(31)}),
        (TypeError, r"argument 'smooth' must have dtype", (x, b, 0.1, w_s), {"smooth": torch.ones(32).half()}),
        # Regression: a NaN factor was zeroed (static) and a 0 zeroed its channel, without a word.
        (ValueError, r"argument 'smooth' must be positive and finite, got nan \(index 3\)", (x, b, 0.1, w_s),
         {"smooth": torch.ones(32).index_fill(0, torch.tensor([3]), float("nan"))}),
        (ValueError, r"argument 'smooth' must be positive and finite, got 0.0 \(index 0\)", (x, b, 0.1, w_s),
         {"smooth": torch.zeros(32)}),
        (ValueError, r"argument 'smooth' must be positive and finite, got -1.0", (x, b, 0.1, w_s), {"smooth": -torch.ones(32)}),
    ]
    for exc, msg, args, kw in cases:
        with pytest.raises(exc, match=msg):
            int8_matmul_static(*args, **kw)


@pytest.mark.parametrize("backend", ["triton", "torch"] + (["cuda"] if DEVICE == "cuda" else []))
def test_opcheck(backend):
    x = _act(5, 48, torch.bfloat16)
    b, w_s = rand_int8(32, 48), torch.rand(32, device=DEVICE) * 0.01
    in_mul = (torch.rand(48, device=DEVICE) + 0.5) * 10
    torch.library.opcheck(torch.ops.fastllm.int8_matmul_static.default,
                          (x, b, in_mul, torch.tensor([0.1], device=DEVICE), w_s, None, backend))
    torch.library.opcheck(torch.ops.fastllm.int8_matmul_static.default,
                          (x.half(), b, in_mul[:1], torch.tensor([0.1], device=DEVICE), w_s,
                           torch.randn(32, device=DEVICE), backend))


def test_torch_compile_fullgraph_static_layer():
    # Regression: the CPU check of act_scale's value (.item()) broke fullgraph compile.
    from torch import nn
    from fastllm.nn import Int8Linear
    m = Int8Linear.from_linear(nn.Linear(64, 32, device=DEVICE), "w8a8-static", act_scale=0.02)
    x = torch.randn(4, 64, device=DEVICE)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(m, fullgraph=True, backend="eager")(x), m(x))
