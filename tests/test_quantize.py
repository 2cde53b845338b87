"""quantize_per_token: every backend bit-identical to the reference, edge rows, bad input."""
import pytest
import torch

import fastllm
from fastllm import ref
from fastllm.ops import quantize_per_token
from helpers import strided_rows

from conftest import DEVICE

KERNEL_BACKENDS = ["triton"] + (["cuda"] if DEVICE == "cuda" else [])
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K", [(1, 1), (3, 17), (17, 97), (5, 1025), (2, 4096 + 8)])
def test_matches_reference_exactly(backend, dtype, M, K):
    x = (torch.randn(M, K, device=DEVICE) * torch.rand(M, 1, device=DEVICE) * 10).to(dtype)
    q, s = quantize_per_token(x, backend=backend)
    rq, rs = ref.quantize_per_token(x.cpu())
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert q.shape == (M, K) and s.shape == (M,) and q.is_contiguous()
    torch.testing.assert_close(q.cpu(), rq, rtol=0, atol=0)
    torch.testing.assert_close(s.cpu(), rs, rtol=0, atol=0)


def test_reference_semantics():
    # Against a float64 recomputation: dequantized error <= scale / 2 and the row max maps to +-127.
    x = torch.randn(33, 257, dtype=torch.float64)
    q, s = ref.quantize_per_token(x.float())
    err = (q.double() * s.double()[:, None] - x).abs()
    assert (err <= s.double()[:, None] * 0.5 + 1e-6).all()
    assert (q.abs().amax(dim=1) == 127).all()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["torch"])
def test_strided_rows(backend):
    x = strided_rows(7, 45, torch.float16, DEVICE)
    assert not x.is_contiguous()
    q, s = quantize_per_token(x, backend=backend)
    rq, rs = ref.quantize_per_token(x.cpu())
    assert torch.equal(q.cpu(), rq) and torch.equal(s.cpu(), rs)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["torch"])
def test_edge_rows(backend):
    x = torch.randn(6, 19, device=DEVICE)
    x[1] = 0.0                      # all-zero row: scale 1, q 0
    x[2, 3] = float("nan")          # NaN row: scale NaN, q 0
    x[3, 0] = float("inf")          # inf row: likewise
    x[4] = 1e-30                    # tiny but non-zero: still maps to 127
    x[5] = 0.0                      # amax < 127 / FLT_MAX: 127 / amax is inf and 0 * inf NaN,
    x[5, :3] = torch.tensor([2e-37, -3e-38, 1e-40])   # which must still quantize to 0
    q, s = quantize_per_token(x, backend=backend)
    q, s = q.cpu(), s.cpu()
    rq, rs = ref.quantize_per_token(x.cpu())
    assert torch.equal(q[5], rq[5]) and (q[5, 3:] == 0).all() and torch.equal(s[5], rs[5])
    assert s[1] == 1.0 and (q[1] == 0).all()
    assert torch.isnan(s[2]) and (q[2] == 0).all()
    assert torch.isnan(s[3]) and (q[3] == 0).all()
    assert (q[4] == 127).all() and s[4] > 0
    assert torch.isfinite(s[0]) and q[0].abs().max() == 127


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["torch"])
def test_empty(backend):
    q, s = quantize_per_token(torch.randn(0, 8, device=DEVICE), backend=backend)
    assert q.shape == (0, 8) and s.shape == (0,)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["torch"])
def test_broadcast_rows(backend):
    # A broadcast x (row stride 0, rows overlap) is valid input: every row equals the one row.
    row = torch.randn(1, 96, device=DEVICE)
    q, s = quantize_per_token(row.expand(5, 96), backend=backend)
    rq, rs = ref.quantize_per_token(row.cpu().expand(5, 96).contiguous())
    assert torch.equal(q.cpu(), rq) and torch.equal(s.cpu(), rs)


def test_bad_inputs():
    with pytest.raises(TypeError, match="argument 'x' must be a torch.Tensor"):
        quantize_per_token([[1.0]])
    with pytest.raises(ValueError, match=r"argument 'x' must be 2-D, got shape \(2, 3, 4\)"):
        quantize_per_token(torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match=r"argument 'x' must have dtype in \(float16, bfloat16, float32\), got int32"):
        quantize_per_token(torch.ones(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="argument 'backend' must be one of"):
        quantize_per_token(torch.randn(2, 3), backend="cudnn")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_backends_reject_column_stride(backend):
    x = torch.randn(8, 6, device=DEVICE).t()  # unit stride along M, not K
    with pytest.raises(fastllm.BackendUnavailableError, match="unit stride"):
        quantize_per_token(x, backend=backend)
    q, _ = quantize_per_token(x)  # auto: the reference takes it
    assert torch.equal(q.cpu(), ref.quantize_per_token(x.cpu())[0])


def test_cuda_predicate_bounds_the_rows():
    # More rows than the launcher's 32-bit grid: refused by name when the backend is chosen (the
    # launcher returned its anonymous invalid-shape code). Meta tensors: no memory needed.
    from fastllm.ops.quantize import OP
    x = torch.empty(2 ** 31, 4, dtype=torch.float16, device="meta")
    assert "at most 2^31 - 1" in OP.supports["cuda"](x)
    assert OP.supports["cuda"](x[: 2 ** 31 - 1]) is None


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["torch"])
def test_opcheck(backend):
    x = torch.randn(5, 33, device=DEVICE, dtype=torch.float16)
    torch.library.opcheck(torch.ops.fastllm.quantize_per_token.default, (x, backend))
    if backend == "torch":  # any layout there; q is still row-major (regression: it kept x's)
        xt = torch.randn(33, 5, device=DEVICE).t()
        torch.library.opcheck(torch.ops.fastllm.quantize_per_token.default, (xt, backend))
        assert quantize_per_token(xt, backend=backend)[0].is_contiguous()


def test_torch_compile_fullgraph():
    f = torch.compile(lambda x: quantize_per_token(x, backend="torch"), fullgraph=True, backend="eager")
    x = torch.randn(6, 40, device=DEVICE)
    q, s = f(x)
    assert torch.equal(q.cpu(), ref.quantize_per_token(x.cpu())[0])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K", [(1, 4096), (33, 8192 + 8), (1025, 1000), (4096, 11008)])
def test_cuda_large(dtype, M, K):
    x = (torch.randn(M, K, device="cuda") * 4).to(dtype)
    q, s = quantize_per_token(x, backend="cuda")
    rq, rs = ref.quantize_per_token(x)
    assert torch.equal(q, rq) and torch.equal(s, rs)


@pytest.mark.gpu
def test_cuda_misaligned_pointer_takes_scalar_path():
    base = torch.randn(9, 67, device="cuda", dtype=torch.float16)
    x = base[:, 3:]  # row start not 16-byte aligned
    q, s = quantize_per_token(x, backend="cuda")
    assert torch.equal(q, ref.quantize_per_token(x)[0])
