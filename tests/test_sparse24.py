"""2:4 sparsity: format (compress / decompress / check_24), the mma.sp register model, pruning
(magnitude, Wanda), the sparse24 ops on every backend, bad inputs, opcheck, benchmark smoke.

Tolerances. fp16/bf16 (tests/test_attention.py's rule): a backend's max error vs the float64
product of the decompressed weight is at most 2x the error of PyTorch's own matmul in the same
dtype, plus one ulp of the dtype at the output's magnitude. int8: the int32 accumulator is
exact on every backend; the scaled output is bounded like tests/test_int8.py's epilogue (fp32
roundings of the scale multiplies / bias add plus half an ulp of out_dtype).
"""
import pytest
import torch

import fastllm
from fastllm import ref
from fastllm.ops import sparse24_int8_matmul, sparse24_int8_matmul_int32, sparse24_matmul
from fastllm.sparse import (NotSparse24Error, check_24, collect_act_norms, compress, convert_meta, decompress, is_24,
                            mask_24, prune_24)
from fastllm.sparse.format import VALID_NIBBLES, nibble_map, unpack_meta, valid_meta
from fastllm.sparse.mma_sp import emulate_gemm
from helpers import poison_  # noqa: F401  (outputs are allocated by the ops; see test_triton_poisoned_out)

from conftest import DEVICE

KERNEL_BACKENDS = ["triton"] + (["cuda"] if DEVICE == "cuda" else [])
ALL = KERNEL_BACKENDS + ["torch"]
LOW = [torch.float16, torch.bfloat16]
M_SAMPLE = [1, 2, 7, 16, 17, 33, 97]
M_ALL = list(range(1, 34)) + [97]
KN = [(64, 16), (192, 48), (320, 80)]      # K multiples of 64 (not of the 128/256 K steps), N of 16


def cases(backend):
    return M_ALL if backend == "torch" else M_SAMPLE


def sparse_weight(N, K, dtype, device=DEVICE):
    if dtype == torch.int8:
        w = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    else:
        w = torch.randn(N, K).to(dtype)
    w, _ = prune_24(w)
    # A few groups with fewer than 2 non-zeros (padding indices must still be valid).
    w[0, :4] = 0
    w[-1, 4:8] = torch.tensor([0, 0, 0, 1]).to(dtype)
    return w.to(device)


def check_close(out, x, w, bias, dtype):
    exact = x.double() @ w.double().t()
    base = x @ w.t()                                   # PyTorch's own, in dtype
    if bias is not None:
        exact = exact + bias.double()
        base = base + bias
    err = (out.double() - exact).abs().max().item() if out.numel() else 0.0
    b_err = (base.double() - exact).abs().max().item() if out.numel() else 0.0
    ulp = torch.finfo(dtype).eps * max(1.0, exact.abs().max().item() if out.numel() else 1.0)
    assert out.dtype == dtype and out.shape == exact.shape
    assert not torch.isnan(out).any()
    assert err <= 2 * b_err + ulp, f"error {err:.3g} > 2 x PyTorch's {b_err:.3g} + ulp ({dtype})"


def assert_epilogue_close(out, acc, a_s, w_s, bias, out_dtype):
    acc, a_s, w_s = acc.cpu().double(), a_s.cpu().double().reshape(-1, 1), w_s.cpu().double().reshape(1, -1)
    prod = acc * a_s * w_s
    b = bias.cpu().double().reshape(1, -1) if bias is not None else torch.zeros_like(prod)
    exact = prod + b
    fi = torch.finfo(out_dtype)
    bound = fi.eps / 2 * exact.abs() + 2.0 ** -21 * (prod.abs() + b.abs()) + fi.tiny * fi.eps / 2
    assert out.dtype == out_dtype and torch.isfinite(out).all()
    assert ((out.cpu().double() - exact).abs() <= bound).all()


# ----------------------------------------------------------------------------------------------
# Format

@pytest.mark.parametrize("kind", ["f16", "s8"])
def test_nibble_map_is_a_bijection(kind):
    r, c = nibble_map(kind)
    assert len(set(zip(r.flatten().tolist(), c.flatten().tolist()))) == 16 * 16


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int8])
@pytest.mark.parametrize("N,K", [(16, 64), (48, 192), (80, 320)])
def test_compress_roundtrip(dtype, N, K):
    w = sparse_weight(N, K, dtype, "cpu")
    values, meta = compress(w)
    assert values.shape == (N, K // 2) and values.dtype == dtype
    assert meta.shape == (N // 16, K // 2) and meta.dtype == torch.int32
    assert torch.equal(decompress(values, meta), w)
    kind = "s8" if dtype == torch.int8 else "f16"
    assert valid_meta(meta)
    # The kept values are in increasing column order within each chunk.
    nib = unpack_meta(meta, N, K, kind)
    assert ((nib & 3) < (nib >> 2)).all()


def test_compress_all_zero_and_one_nonzero_groups():
    w = torch.zeros(16, 64, dtype=torch.float16)
    w[3, 7] = 2.0                                      # one non-zero at position 3 of group 1
    values, meta = compress(w)
    assert torch.equal(decompress(values, meta), w)
    assert set(unpack_meta(meta, 16, 64, "f16").unique().tolist()) <= set(VALID_NIBBLES)


def test_check_24_names_first_offender():
    w = sparse_weight(32, 128, torch.float16, "cpu")
    check_24(w)
    w[5, 9] = w[5, 10] = w[5, 11] = w[5, 8] = 1.0     # row 5, group 2: 4 non-zeros
    w[7, 0:3] = 1.0                                    # later offender
    with pytest.raises(NotSparse24Error, match=r"row 5, group 2 \(columns 8..11\) has 4 non-zeros"):
        check_24(w)
    with pytest.raises(NotSparse24Error, match="row 5, group 2"):
        compress(w)
    with pytest.raises(ValueError, match="K = 6 is not a multiple of 4"):
        check_24(torch.zeros(2, 6))


def test_compress_bad_shapes():
    with pytest.raises(ValueError, match="N = 8 must be a multiple of 16"):
        compress(torch.zeros(8, 64))
    with pytest.raises(ValueError, match="K = 32 must be a multiple of 64"):
        compress(torch.zeros(16, 32))
    values, meta = compress(torch.zeros(16, 64))
    with pytest.raises(ValueError, match=r"argument 'meta' must have shape \(N // 16, K // 2\) = \(1, 32\)"):
        decompress(values, meta[:, :16])
    with pytest.raises(TypeError, match="argument 'meta' must have dtype int32"):
        decompress(values, meta.to(torch.int64))


# ----------------------------------------------------------------------------------------------
# The mma.sp model: compress -> the CUDA kernel's register loads -> emulated instruction == dense.

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int8])
def test_mma_sp_emulation_matches_dense(dtype):
    N, K, M = 32, 128, 16
    w = sparse_weight(N, K, dtype, "cpu")
    values, meta = compress(w)
    if dtype == torch.int8:
        x = torch.randint(-128, 128, (M, K), dtype=torch.int8)
        assert torch.equal(emulate_gemm(x, values, meta), x.long() @ w.long().t())
    else:
        x = torch.randn(M, K).to(dtype)
        got = emulate_gemm(x, values, meta)
        torch.testing.assert_close(got, x.double() @ w.double().t(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.int8])
def test_mma_sp_emulation_catches_wrong_layout(dtype):
    # The other dtype's layout, or lanes of a group swapped, must not pass.
    N, K, M = 16, 64, 8
    w = sparse_weight(N, K, dtype, "cpu")
    values, meta = compress(w)
    x = torch.randint(-128, 128, (M, K), dtype=torch.int8) if dtype == torch.int8 else torch.randn(M, K).half()
    want = x.double() @ w.double().t()
    other = compress(w.to(torch.float16) if dtype == torch.int8 else w.to(torch.int8))[1]
    swapped = meta.reshape(1, 1, 8, 4)[..., [1, 0, 3, 2]].reshape(meta.shape)
    for bad in (other, swapped):
        try:
            got = emulate_gemm(x, values, bad).double()
        except ValueError:
            continue                                   # an undefined nibble: also caught
        assert not torch.equal(got, want)


def test_convert_meta_when_casting_compressed_values():
    # Quantizing compressed fp16 values is quantizing the dense weight, but int8 values read
    # their metadata in the m16n8k64 layout: unconverted, every nibble is still valid and the
    # product silently wrong; convert_meta makes it right, both ways.
    w = sparse_weight(32, 128, torch.float16, "cpu")
    values, meta = compress(w)
    scale = w.float().abs().amax(1, keepdim=True) / 127
    q_values = (values.float() / scale).round().to(torch.int8)
    q_dense = (w.float() / scale).round().to(torch.int8)
    assert not torch.equal(decompress(q_values, meta), q_dense)          # the trap
    q_meta = convert_meta(meta, torch.float16, torch.int8)
    assert torch.equal(decompress(q_values, q_meta), q_dense)
    assert torch.equal(q_meta, compress(q_dense)[1])
    assert torch.equal(convert_meta(q_meta, torch.int8, torch.bfloat16), meta)
    assert convert_meta(meta, torch.float16, torch.bfloat16) is meta   # one 16-bit layout
    with pytest.raises(TypeError, match="convert_meta: argument 'meta' must be a 2-D int32 tensor"):
        convert_meta(meta.long(), torch.float16, torch.int8)
    with pytest.raises(TypeError, match="argument 'to_dtype' must be a torch.dtype"):
        convert_meta(meta, torch.float16, "int8")
    with pytest.raises(ValueError, match="K = 96 must be a multiple of 64"):
        convert_meta(meta[:, :48], torch.float16, torch.int8)


# ----------------------------------------------------------------------------------------------
# Pruning

def test_prune_int8_keeps_minus_128():
    # |-128| is the largest int8 magnitude (abs in int8 wraps it to -128: it was pruned first).
    w = torch.tensor([[-128, 1, 2, 0], [127, -128, 3, -1]], dtype=torch.int8)
    w24, _ = prune_24(w)
    assert torch.equal(w24, torch.tensor([[-128, 0, 2, 0], [127, -128, 0, 0]], dtype=torch.int8))


def test_prune_magnitude_keeps_two_largest_and_reports_norm():
    w = torch.randn(64, 256)
    w24, rep = prune_24(w)
    check_24(w24)
    g = w.abs().reshape(64, 64, 4)
    kept = (w24 != 0).reshape(64, 64, 4)
    assert torch.equal(kept.sum(-1), torch.full((64, 64), 2))
    # Every kept |w| >= every dropped |w| in its group.
    assert (torch.where(kept, g, torch.inf).amin(-1) >= torch.where(kept, -torch.inf, g).amax(-1)).all()
    expect = ((w - w24).norm() / w.norm()).item()
    assert rep.method == "magnitude" and abs(rep.norm_removed - expect) < 1e-6 and 0.2 < rep.norm_removed < 0.6


def test_wanda_beats_magnitude_with_outlier_channels():
    torch.manual_seed(torch.initial_seed() % 2 ** 31)
    K, N = 256, 64
    scale = torch.ones(K)
    scale[torch.randperm(K)[:8]] = 30.0                 # a few outlier input channels
    model = torch.nn.Sequential(torch.nn.Linear(K, N))
    batches = [torch.randn(32, K) * scale for _ in range(4)]
    norms = collect_act_norms(model, batches)
    assert set(norms) == {"0"} and norms["0"].shape == (K,)
    torch.testing.assert_close(norms["0"], torch.cat(batches).norm(dim=0), rtol=1e-5, atol=1e-5)
    w = model[0].weight.detach()
    x = torch.randn(256, K) * scale
    y = x @ w.t()
    w_mag, r_mag = prune_24(w, "magnitude")
    w_wanda, r_wanda = prune_24(w, "wanda", norms["0"])
    err_mag = (x @ w_mag.t() - y).norm().item()
    err_wanda = (x @ w_wanda.t() - y).norm().item()
    assert err_wanda < 0.8 * err_mag, (err_wanda, err_mag)
    assert r_wanda.norm_removed >= r_mag.norm_removed     # magnitude removes the least norm


def test_prune_bad_args():
    with pytest.raises(ValueError, match="method 'wanda' needs act_norm"):
        prune_24(torch.randn(4, 8), "wanda")
    with pytest.raises(ValueError, match=r"argument 'act_norm' must be a \(8,\) tensor"):
        prune_24(torch.randn(4, 8), "wanda", torch.ones(4))
    # Negative norms kept the smallest weights; NaN / inf (fp16 overflow) tied every group.
    for bad in (-torch.ones(8), torch.full((8,), float("nan")), torch.full((8,), 1e5).half()):
        with pytest.raises(ValueError, match="argument 'act_norm' must be finite and >= 0"):
            prune_24(torch.randn(4, 8), "wanda", bad)
    with pytest.raises(ValueError, match="argument 'method' must be one of"):
        prune_24(torch.randn(4, 8), "random")
    with pytest.raises(ValueError, match=r"mask_24: argument 'scores' must be a 2-D \(N, K\) tensor with K a multiple"):
        mask_24(torch.randn(2, 6))
    with pytest.raises(TypeError, match="check_24: argument 'w' must be a torch.Tensor, got list"):
        is_24([[1, 0, 0, 1]])
    with pytest.raises(ValueError, match="K = 6 is not a multiple of 4"):
        prune_24(torch.randn(4, 6))
    with pytest.raises(ValueError, match="yielded no batch"):
        collect_act_norms(torch.nn.Linear(8, 4), [])


# ----------------------------------------------------------------------------------------------
# Ops: every backend vs the dense product of the decompressed weight

@pytest.mark.parametrize("K,N", KN)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("backend", ALL)
def test_sparse24_matmul(backend, dtype, K, N):
    w = sparse_weight(N, K, dtype)
    values, meta = compress(w)
    for i, M in enumerate(cases(backend)):
        x = torch.randn(M, K, device=DEVICE).to(dtype)
        bias = torch.randn(N, device=DEVICE).to(dtype) if i % 2 else None
        out = sparse24_matmul(x, values, meta, bias, backend=backend)
        check_close(out, x, w, bias, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8])
def test_triton_k_tail_and_split_k(dtype):
    # The configs the interpreter picks for the grid above never leave a K tail or split K
    # (split_k needs a single (M, N) tile and >= 4 K tiles): force both here. K = 192 against
    # BLOCK_K 128 / 256 is a masked tail (whole 64-column metadata blocks); SPLIT_K = 2 runs the
    # partial sums, then bias / int8 scale epilogue once on the sum.
    from fastllm.triton_kernels.sparse24_gemm import Config
    from fastllm.triton_kernels.sparse24_gemm import sparse24_matmul as triton_sparse24
    N, K, M = 48, 192, 5
    w = sparse_weight(N, K, dtype)
    values, meta = compress(w)
    s8 = dtype == torch.int8
    x = (torch.randint(-128, 128, (M, K), dtype=dtype, device=DEVICE) if s8
         else torch.randn(M, K, device=DEVICE).to(dtype))
    bias = torch.randn(N, device=DEVICE)
    a_s, w_s = torch.rand(M, device=DEVICE) + 0.01, torch.rand(N, device=DEVICE) + 0.01
    for block_k, split in ((128, 1), (256, 1), (64, 2), (128, 2)):
        cfg = Config(16, 32, block_k, SPLIT_K=split, GROUP_M=1, num_stages=1)
        if s8:
            acc = triton_sparse24(x, values, meta, out_dtype=torch.int32, config=cfg)
            assert torch.equal(acc.cpu().long(), x.cpu().long() @ w.cpu().long().t()), (block_k, split)
            out = triton_sparse24(x, values, meta, bias, a_s, w_s, torch.float32, config=cfg)
            assert_epilogue_close(out, acc, a_s, w_s, bias, torch.float32)
        else:
            b = bias.to(dtype)
            check_close(triton_sparse24(x, values, meta, b, config=cfg), x, w, b, dtype)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_sparse24_matmul_fp32_and_strided_x(backend):
    w = sparse_weight(48, 192, torch.float32)
    values, meta = compress(w)
    x = torch.randn(17, 192 + 7, device=DEVICE)[:, :192]
    out = sparse24_matmul(x, values, meta, backend=backend)
    torch.testing.assert_close(out, x @ w.t(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("K,N", KN)
@pytest.mark.parametrize("backend", ALL)
def test_sparse24_int8(backend, K, N):
    w = sparse_weight(N, K, torch.int8)
    values, meta = compress(w)
    for i, M in enumerate(cases(backend)):
        a = torch.randint(-128, 128, (M, K), dtype=torch.int8, device=DEVICE)
        acc = sparse24_int8_matmul_int32(a, values, meta, backend=backend)
        assert acc.dtype == torch.int32 and torch.equal(acc.cpu().long(), a.cpu().long() @ w.cpu().long().t())
        if i % 3 == 0:
            per_row = i % 2 == 0
            a_s = torch.rand(M, device=DEVICE) + 0.01 if per_row else torch.tensor(0.03, device=DEVICE)
            w_s = torch.rand(N, device=DEVICE) + 0.01
            bias = torch.randn(N, device=DEVICE) if i % 2 else None
            for out_dtype in (torch.bfloat16, torch.float32):
                out = sparse24_int8_matmul(a, values, meta, a_s, w_s, bias, out_dtype=out_dtype, backend=backend)
                assert_epilogue_close(out, acc, a_s.expand(M) if not per_row else a_s, w_s, bias, out_dtype)


@pytest.mark.parametrize("backend", ALL)
def test_broadcast_rows(backend):
    # A broadcast x (row stride 0) is valid input; the CUDA kernel cannot take overlapping rows,
    # so its supports() must say so and auto pick another backend, never fail at launch.
    w = sparse_weight(32, 128, torch.float16)
    values, meta = compress(w)
    x = torch.randn(1, 128, device=DEVICE).to(torch.float16).expand(6, 128)
    if backend == "cuda":
        from fastllm.ops._sparse24_cuda import cuda_supports
        assert "overlapping" in cuda_supports(x, values, meta, None, None, None)
        out = sparse24_matmul(x, values, meta)
    else:
        out = sparse24_matmul(x, values, meta, backend=backend)
    check_close(out, x, w, None, torch.float16)


def test_empty_and_python_float_scale():
    values, meta = compress(sparse_weight(16, 64, torch.int8))
    a = torch.zeros(0, 64, dtype=torch.int8, device=DEVICE)
    assert sparse24_int8_matmul_int32(a, values, meta).shape == (0, 16)
    a = torch.randint(-128, 128, (3, 64), dtype=torch.int8, device=DEVICE)
    out = sparse24_int8_matmul(a, values, meta, 0.5, torch.ones(16, device=DEVICE), out_dtype=torch.float32)
    torch.testing.assert_close(out, ref.sparse24_int8_matmul(a, values, meta, torch.tensor([0.5]).to(DEVICE),
                                                             torch.ones(16, device=DEVICE), None, torch.float32))


# ----------------------------------------------------------------------------------------------
# Bad inputs, registry, CUDA glue without the binding

def test_bad_inputs():
    f16 = torch.float16
    w = sparse_weight(32, 128, f16)
    values, meta = compress(w)
    x = torch.randn(5, 128, device=DEVICE).to(f16)
    with pytest.raises(TypeError, match="argument 'x' must be a torch.Tensor"):
        sparse24_matmul(x.tolist(), values, meta)
    with pytest.raises(ValueError, match="argument 'x' must be 2-D"):
        sparse24_matmul(x[None], values, meta)
    with pytest.raises(TypeError, match="argument 'values' must have the dtype of 'x'"):
        sparse24_matmul(x, values.to(torch.bfloat16), meta)
    with pytest.raises(ValueError, match=r"argument 'values' must have shape \(N, K // 2\) = \(N, 64\)"):
        sparse24_matmul(x, values[:, :32], meta)
    with pytest.raises(ValueError, match=r"argument 'meta' must have shape \(N // 16, K // 2\) = \(2, 64\)"):
        sparse24_matmul(x, values, meta[:1])
    with pytest.raises(TypeError, match="argument 'meta' must have dtype int32"):
        sparse24_matmul(x, values, meta.view(torch.float32))
    with pytest.raises(ValueError, match="K = 96 must be a multiple of 64"):
        sparse24_matmul(x[:, :96], values[:, :48], meta[:, :48])
    with pytest.raises(ValueError, match="N = 24 must be a multiple of 16"):
        sparse24_matmul(x, values[:24], meta)
    with pytest.raises(ValueError, match=r"argument 'bias' must have shape \(32,\)"):
        sparse24_matmul(x, values, meta, torch.zeros(31, device=DEVICE, dtype=f16))
    with pytest.raises(ValueError, match="argument 'backend' must be one of"):
        sparse24_matmul(x, values, meta, backend="cusparselt")
    vi, mi = compress(sparse_weight(32, 128, torch.int8))
    a = torch.randint(-128, 128, (5, 128), dtype=torch.int8, device=DEVICE)
    with pytest.raises(TypeError, match=r"argument 'a' must have dtype in \(int8\)"):
        sparse24_int8_matmul_int32(x, values, meta)
    with pytest.raises(ValueError, match=r"argument 'a_scale' must have shape \(5,\)"):
        sparse24_int8_matmul(a, vi, mi, torch.ones(4, device=DEVICE), torch.ones(32, device=DEVICE))
    with pytest.raises(ValueError, match=r"argument 'w_scale' must have shape \(32,\)"):
        sparse24_int8_matmul(a, vi, mi, torch.ones(5, device=DEVICE), torch.ones(16, device=DEVICE))
    with pytest.raises(TypeError, match="argument 'out_dtype'"):
        sparse24_int8_matmul(a, vi, mi, 1.0, torch.ones(32, device=DEVICE), out_dtype=torch.int8)


def test_invalid_metadata_values_are_refused():
    # Regression: any int32 tensor of the right shape was accepted as metadata; the torch and
    # triton backends decoded invalid index pairs (i0 >= i1) differently (outputs 12 apart), and
    # for mma.sp they are undefined behaviour. Checked on CPU (a per-call check would sync CUDA).
    from fastllm.sparse.format import bad_meta_words
    nib = torch.arange(16)
    words = (nib * 0x11111111) & 0xFFFFFFFF
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    assert bad_meta_words(words).tolist() == [int(v) not in VALID_NIBBLES for v in range(16)]
    values, meta = compress(sparse_weight(32, 128, torch.float16, "cpu"))
    x = torch.randn(5, 128).half()
    for word in (0, 0x44444440, 0x74444444, 0xF4444444 - 2 ** 32):   # all 0; low nibble 0; top 0x7; top 0xF
        bad = meta.clone()
        bad[1, 37] = word
        for call in (lambda: sparse24_matmul(x, values, bad, backend="torch"),
                     lambda: sparse24_matmul(x, values, bad, backend="triton"),
                     lambda: decompress(values, bad)):
            with pytest.raises(ValueError, match=r"argument 'meta': word \(1, 37\) .* not an ordered 2-of-4"):
                call()
    assert not valid_meta(bad) and valid_meta(meta)


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU-only check")
def test_cuda_forced_on_cpu_raises_and_supports_works_on_meta():
    from fastllm.ops._sparse24_cuda import cuda_supports
    values, meta = compress(sparse_weight(32, 128, torch.float16, "cpu"))
    x = torch.randn(5, 128).half()
    with pytest.raises(fastllm.BackendUnavailableError, match="cuda"):
        sparse24_matmul(x, values, meta, backend="cuda")
    mx = torch.empty(5, 128, dtype=torch.float16, device="meta")
    mv = torch.empty(32, 64, dtype=torch.float16, device="meta")
    mm = torch.empty(2, 64, dtype=torch.int32, device="meta")
    assert cuda_supports(mx, mv, mm, None, None, None) is None
    assert "float32" in cuda_supports(mx.float(), mv.float(), mm, None, None, None)
    assert "unit stride" in cuda_supports(mx.t().contiguous().t(), mv, mm, None, None, None)
    assert "16 bytes" in cuda_supports(torch.empty(5, 140, dtype=torch.float16)[:, :128], values, meta, None, None,
                                       None)
    assert "contiguous" in cuda_supports(mx, torch.empty(64, 32, dtype=torch.float16, device="meta").t(), mm,
                                         None, None, None)
    # N past the grid's y limit (65535 tiles of 64 rows): refused here, not by the launcher's
    # anonymous "invalid shape" after the backend was chosen.
    N = 64 * 65536
    big_v, big_m = (torch.empty(N, 32, dtype=dt, device="meta") for dt in (torch.float16, torch.int32))
    assert "grid's y limit" in cuda_supports(torch.empty(1, 64, dtype=torch.float16, device="meta"), big_v,
                                             big_m[: N // 16], None, None, None)
    for op in ("sparse24_matmul", "sparse24_int8_matmul", "sparse24_int8_matmul_int32"):
        desc, args, kw = fastllm.ops.OPS[op].example()
        assert fastllm.ops.OPS[op].supports["cuda"](*args, **kw) is None, op


@pytest.mark.parametrize("backend", ALL)
def test_opcheck(backend):
    values, meta = compress(sparse_weight(32, 128, torch.float16))
    x = torch.randn(5, 128, device=DEVICE).half()
    bias = torch.randn(32, device=DEVICE).half()
    torch.library.opcheck(torch.ops.fastllm.sparse24_matmul.default, (x, values, meta, bias, backend))
    vi, mi = compress(sparse_weight(32, 128, torch.int8))
    a = torch.randint(-128, 128, (5, 128), dtype=torch.int8, device=DEVICE)
    torch.library.opcheck(torch.ops.fastllm.sparse24_int8_matmul_int32.default, (a, vi, mi, backend))
    torch.library.opcheck(torch.ops.fastllm.sparse24_int8_matmul.default,
                          (a, vi, mi, torch.rand(5, device=DEVICE), torch.rand(32, device=DEVICE), None,
                           torch.bfloat16, backend))


def test_torch_compile_fullgraph():
    values, meta = compress(sparse_weight(32, 128, torch.float16))
    x = torch.randn(5, 128, device=DEVICE).half()
    f = lambda x: sparse24_matmul(x, values, meta, backend="torch") * 2  # noqa: E731
    assert torch.equal(torch.compile(f, fullgraph=True, backend="aot_eager")(x), f(x))


# ----------------------------------------------------------------------------------------------
# Benchmark harness smoke (tiny CPU shapes)

def test_bench_smoke(capsys):
    from fastllm.bench.__main__ import main
    assert main(["sparse24", "--device", "cpu", "--quick", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "sparse24" in out and "WRONG" not in out


# ----------------------------------------------------------------------------------------------
# GPU: the bigger grid, natively

GPU_M = [1, 2, 5, 8, 9, 16, 17, 31, 33, 64, 97, 128, 1025]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", LOW + [torch.int8])
@pytest.mark.parametrize("N,K", [(16, 64), (112, 320), (4096, 4096), (11008, 4096), (4096, 11008)])
def test_gpu_grid(backend, dtype, N, K):
    w = sparse_weight(N, K, dtype)
    values, meta = compress(w)
    for M in GPU_M:
        if dtype == torch.int8:
            a = torch.randint(-128, 128, (M, K), dtype=torch.int8, device=DEVICE)
            acc = sparse24_int8_matmul_int32(a, values, meta, backend=backend)
            assert torch.equal(acc, ref.int8_matmul_int32(a, w)), M
            a_s, w_s = torch.rand(M, device=DEVICE), torch.rand(N, device=DEVICE)
            bias = torch.randn(N, device=DEVICE, dtype=torch.bfloat16)
            out = sparse24_int8_matmul(a, values, meta, a_s, w_s, bias, backend=backend)
            assert_epilogue_close(out, acc, a_s, w_s, bias, torch.bfloat16)
        else:
            x = torch.randn(M, K, device=DEVICE).to(dtype)
            bias = torch.randn(N, device=DEVICE).to(dtype)
            check_close(sparse24_matmul(x, values, meta, bias, backend=backend), x, w, bias, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,scaled", [(torch.float16, False), (torch.int8, False), (torch.int8, True)])
def test_gpu_split_k_equals_single_pass(dtype, scaled):
    # The CUDA launcher with and without the split-K workspace: int8 raw accumulators
    # bit-identical (and exact), and so the int8 epilogue (a_scale, w_scale, bias, fp32 out:
    # the same _rn operations in both kernels); fp16 within its rounding (fp32 partials).
    from fastllm import _ext
    lib = _ext.lib()
    M, N, K = 3, 64, 4096
    w = sparse_weight(N, K, dtype)
    values, meta = compress(w)
    x = (torch.randint(-128, 128, (M, K), dtype=torch.int8) if dtype == torch.int8
         else torch.randn(M, K).to(dtype)).to(DEVICE)
    values, meta = values.to(DEVICE), meta.to(DEVICE)
    code_of = _ext.DTYPE_CODES
    ws_bytes = lib.sparse24_gemm_workspace(x.device.index, code_of[dtype], M, N, K)
    assert ws_bytes > 0, "a 2-CTA call on a GPU must split K"
    ws = torch.empty(ws_bytes, dtype=torch.uint8, device=DEVICE)
    out_dtype = (torch.float32 if scaled else torch.int32) if dtype == torch.int8 else dtype
    a_s, w_s, bias = torch.rand(M, device=DEVICE), torch.rand(N, device=DEVICE), torch.randn(N, device=DEVICE)
    eps = (a_s.data_ptr(), True, w_s.data_ptr(), bias.data_ptr(), code_of[torch.float32]) if scaled else \
        (0, False, 0, 0, -1)
    outs = []
    for wsp, nb in ((0, 0), (ws.data_ptr(), ws_bytes)):
        out = torch.full((M, N), -7, dtype=out_dtype, device=DEVICE)
        code = lib.sparse24_gemm(x.device.index, code_of[dtype], x.data_ptr(), values.data_ptr(), meta.data_ptr(),
                                 out.data_ptr(), code_of[out_dtype], M, N, K, K, eps[3], eps[4], eps[0], eps[1],
                                 eps[2], wsp, nb, torch.cuda.current_stream().cuda_stream)
        assert code == 0, lib.error_string(code)
        outs.append(out)
    if dtype == torch.int8:
        assert torch.equal(outs[0], outs[1])
        exact = ref.int8_matmul_int32(x, w.to(DEVICE))
        if scaled:   # the reference's order, (acc * a_s) * w_s + bias, each rounded in fp32
            assert torch.equal(outs[1], (exact.float() * a_s[:, None]) * w_s[None, :] + bias[None, :])
        else:
            assert torch.equal(outs[1], exact)
    else:
        check_close(outs[1], x, w.to(DEVICE), torch.zeros(N, device=DEVICE, dtype=dtype), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int8])
def test_gpu_wgmma_sp_matches_mma_sp(dtype, monkeypatch):
    # Hopper (90a build): M > 64 with K a whole number of stages (128 fp16 / bf16 columns, 256
    # int8) runs the wgmma.sp kernel. Against the reference, and against the mma.sp kernel of the
    # same call (FASTLLM_SPARSE24_WGMMA=0): int8 bit-identical (raw and scaled: the same exact sums
    # and finish()), 16-bit within rounding. Tails: tokens (65, 130), W rows (144: a 16-row tail
    # of a 128-row tile); the last case (K off whole stages) takes the mma.sp fallback both times.
    from fastllm.bench.switches import hopper_90a
    if not hopper_90a(torch.device("cuda")):
        pytest.skip("the wgmma.sp kernel runs on sm_90 GPUs with a 90a build")
    stage = 256 if dtype == torch.int8 else 128
    for M, N, K in ((65, 16, stage), (130, 144, 5 * stage), (1025, 4096, 4096), (130, 144, 4 * stage + 64)):
        w = sparse_weight(N, K, dtype)
        values, meta = compress(w)
        x = (torch.randint(-128, 128, (M, K), dtype=torch.int8) if dtype == torch.int8
             else torch.randn(M, K).to(dtype)).to(DEVICE)
        a_s, w_s = torch.rand(M, device=DEVICE), torch.rand(N, device=DEVICE)
        outs = []
        for flag in ("1", "0"):
            monkeypatch.setenv("FASTLLM_SPARSE24_WGMMA", flag)
            if dtype == torch.int8:
                outs.append((sparse24_int8_matmul_int32(x, values, meta, backend="cuda"),
                             sparse24_int8_matmul(x, values, meta, a_s, w_s, None, out_dtype=torch.float32,
                                                  backend="cuda")))
            else:
                outs.append(sparse24_matmul(x, values, meta, None, backend="cuda"))
        if dtype == torch.int8:
            assert torch.equal(outs[0][0], ref.int8_matmul_int32(x, w)), (M, N, K)
            assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1]), (M, N, K)
        else:
            check_close(outs[0], x, w, torch.zeros(N, device=DEVICE, dtype=dtype), dtype)
    monkeypatch.setenv("FASTLLM_SPARSE24_WGMMA", "1")
    x = torch.randn(130, 128, device=DEVICE).to(torch.float16)
    values, meta = compress(sparse_weight(64, 128, torch.float16))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        sparse24_matmul(x, values, meta, None, backend="cuda")
        torch.cuda.synchronize()
    assert any("sparse24_wgmma_kernel" in e.name for e in prof.events())
