"""The CUDA int8 kernels (csrc/int8/): W8A8 GEMM (int32 / scaled) and the W8A16 decode kernel.

Without a GPU (here, CI): the Python glue's supports() reasons on CPU / meta tensors, the
registry's dispatch (cuda never chosen on CPU, forcing it raises), NumPy-style emulations of
the kernels' tricky layouts (the swizzle, the ldmatrix -> mma fragment path, the W8A16 k
permutation and int8 -> fp16/bf16 magic), and the benchmark suite's CPU smoke run.
With a GPU (marked gpu): int32 accumulators exact for M in 1..33, 97, 1025 with K, N not
multiples of the tiles; scaled outputs and W8A16 within the tolerances of tests/test_int8.py
(PyTorch's own error for the same fp32 computation; see that file's docstring); opcheck.
"""
import json
import subprocess
import sys

import pytest
import torch

import fastllm
from fastllm.ops import int8_matmul, int8_matmul_int32, w8a16_matmul
from fastllm.ops.int8 import MAX_K, OP, OP_INT32, OP_W8A16
from fastllm.ops._int8_cuda import gemm_supports, w8a16_supports

from test_int8 import assert_epilogue_close, assert_w8a16_close, exact_int

META = torch.device("meta")


def meta(*shape, dtype=torch.int8):
    return torch.empty(*shape, dtype=dtype, device=META)


# ----------------------------------------------------------------------------------------------
# supports(): metadata only, CPU and meta tensors.

def test_gemm_supports_reasons():
    a, b = meta(33, 4112), meta(4096, 4112)
    s_a, s_w = meta(33, dtype=torch.float32), meta(4096, dtype=torch.float32)
    assert gemm_supports(a, b, torch.int32) is None
    for od in (torch.float16, torch.bfloat16, torch.float32):
        assert gemm_supports(a, b, od, s_a, s_w, meta(4096, dtype=od)) is None
        assert gemm_supports(a, b, od, s_a[:1], s_w, None) is None          # per-tensor (static) scale
    cases = {
        "unit stride along K": (meta(64, 33).t(), meta(16, 64)),              # (33, 64), strides (1, 33)
        "not a multiple of 16 elements": (meta(8, 72)[:, :64], meta(16, 64)),  # row stride 72
        "rows overlap": (meta(1, 64).expand(8, 64), meta(16, 64)),
    }
    for why, (x, w) in cases.items():
        if x.shape[1] != w.shape[1]:
            w = meta(16, x.shape[1])
        assert why in (gemm_supports(x, w, torch.int32) or ""), (why, gemm_supports(x, w, torch.int32))
    # A data pointer off by 8 bytes (a column slice of a real CPU tensor).
    base = torch.zeros(4, 96, dtype=torch.int8)
    assert "16-byte aligned" in gemm_supports(base[:, 8:88], torch.zeros(16, 80, dtype=torch.int8), torch.int32)
    assert gemm_supports(base[:, 16:], torch.zeros(16, 80, dtype=torch.int8), torch.int32) is None
    assert "out dtype" in gemm_supports(a, b, torch.float64, s_a, s_w)
    assert "a_scale" in gemm_supports(a, b, torch.float16, s_a[:5], s_w)
    assert "float32" in gemm_supports(a, b, torch.float16, s_a.half(), s_w)
    assert "bias" in gemm_supports(a, b, torch.float16, s_a, s_w, meta(16, dtype=torch.float16))


def test_w8a16_supports_reasons():
    x, w, s = meta(16, 4096, dtype=torch.bfloat16), meta(4096, 4096), meta(4096, dtype=torch.float32)
    assert w8a16_supports(x, w, s, None, 0) is None
    assert w8a16_supports(x, w, meta(4096, 32, dtype=torch.float32), meta(4096, dtype=torch.float16), 128) is None
    assert "M = 17 > 16" in w8a16_supports(meta(17, 4096, dtype=torch.half), w, s, None, 0)
    assert "float16/bfloat16" in w8a16_supports(meta(1, 4096, dtype=torch.float32), w, s, None, 0)
    assert "multiple of 64" in w8a16_supports(x, w, meta(4096, 128, dtype=torch.float32), None, 32)
    assert "multiple of 8 elements" in w8a16_supports(meta(4, 4100, dtype=torch.half)[:, :4096], w, s, None, 0)
    assert "unit stride along K" in w8a16_supports(x, meta(4096, 4096).t(), s, None, 0)


# ----------------------------------------------------------------------------------------------
# Dispatch on CPU: cuda is never chosen, forcing it raises with the reason.

def test_cpu_dispatch():
    a, b = torch.randint(-128, 128, (5, 64), dtype=torch.int8), torch.randint(-128, 128, (32, 64), dtype=torch.int8)
    sa, sw = torch.rand(5), torch.rand(32)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    for op, args in ((OP_INT32, (a, b)), (OP, (a, b, sa, sw, None, torch.float16)), (OP_W8A16, (x, b, sw, None, 0))):
        reasons = op.reasons(torch.device("cpu"), *args)
        assert "cuda" in op.impls, op.name
        assert "needs CUDA tensors" in reasons["cuda"], reasons
        assert op.select("auto", torch.device("cpu"), *args) == "torch"
    with pytest.raises(fastllm.BackendUnavailableError, match="backend 'cuda' cannot serve this call: needs CUDA"):
        int8_matmul_int32(a, b, backend="cuda")
    with pytest.raises(fastllm.BackendUnavailableError, match="needs CUDA tensors"):
        int8_matmul(a, b, sa, sw, backend="cuda")
    with pytest.raises(fastllm.BackendUnavailableError, match="needs CUDA tensors"):
        w8a16_matmul(x, b, sw, backend="cuda")


def _plan_or_skip():
    from fastllm import _ext
    why = _ext.unavailable_reason()
    if why:
        pytest.skip(why)
    return _ext.lib().int8_gemm_plan


def test_split_k_plan():
    # The launcher's plan (host code of int8_traits.h, no GPU needed): calls of M <= 128 whose
    # N tiles leave SMs idle split K, keeping >= 4 K tiles per split, at most 16 splits; calls
    # that fill the GPU (or M > 128) do not split.
    plan = _plan_or_skip()
    assert plan(1, 4096, 4096, 132) == (0, 2)           # 128 tiles of 16 x 32 on 132 SMs
    assert plan(1, 1024, 4096, 132) == (0, 4)           # 32 tiles: 4 splits of 4 K tiles (K 256)
    assert plan(16, 1024, 14336, 108) == (0, 4)         # 32 tiles x 4 < 108 SMs; 8 would be 256 > 108
    assert plan(1, 6144, 4096, 132) == (0, 1)           # 192 tiles already cover 132 SMs
    assert plan(1, 48, 256, 132) == (0, 1)              # one K tile: nothing to split
    assert plan(19, 48, 131056, 132) == (1, 16)         # capped at 16 splits
    assert plan(33, 64, 4096, 132) == (2, 16)           # one 64 x 128 tile, 64 K tiles of 64
    assert plan(128, 4096, 4096, 132) == (3, 8)         # 32 tiles of 128 x 128 -> 256 CTAs
    assert plan(128, 33792, 4096, 132) == (3, 1)        # 264 tiles fill 132 SMs
    assert plan(129, 64, 4096, 132) == (3, 1)           # M > 128: no split
    for M, N, K, sms in ((1, 16, 64 * 256, 132), (32, 4096, 4096, 20), (5, 512, 8192, 80), (100, 1024, 4096, 132)):
        config, splits = plan(M, N, K, sms)
        bk = {0: 256, 1: 128, 2: 64, 3: 64}[config]
        assert splits in (1, 2, 4, 8, 16) and (splits == 1 or -(-K // bk) // splits >= 4), (M, N, K, sms)


def test_wgmma_plan():
    # Hopper (sm_90 GPU, 90a build): M > 128 goes to the wgmma kernel (plan index 5 = 128 x 128
    # tiles, 6 = 128 x 256 when those alone cover the SMs); M <= 256 splits K while all slices fit
    # one wave (one CTA per SM), >= 4 K steps each;
    # M <= 128 keeps the sm80 plan (split-K included); without `hopper` nothing changes.
    plan = _plan_or_skip()
    assert plan(4096, 4096, 4096, 132, hopper=True) == (6, 1)      # 32 x 16 = 512 tiles of 128 x 256
    assert plan(1024, 4096, 4096, 132, hopper=True) == (5, 1)      # 8 x 16 = 128 < 132: 128 x 128 tiles
    assert plan(129, 16, 64, 132, hopper=True) == (5, 1)           # one K step: nothing to split
    assert plan(256, 4096, 4096, 132, hopper=True) == (5, 2)       # 64 tiles: 2 x 64 in one wave (4 x 64: two)
    assert plan(129, 1024, 4096, 132, hopper=True) == (5, 8)       # 16 tiles x 8 = 128 <= 132
    assert plan(200, 1024, 1024, 132, hopper=True) == (5, 2)       # 8 K steps: >= 4 per slice
    assert plan(200, 14336, 4096, 132, hopper=True) == (5, 1)      # 224 tiles: already past one wave
    assert plan(257, 4096, 4096, 132, hopper=True) == (5, 1)       # M > 256: no split
    for M, N, K in ((128, 4096, 4096), (1, 1024, 4096), (33, 64, 4096)):
        assert plan(M, N, K, 132, hopper=True) == plan(M, N, K, 132)
    assert plan(4096, 4096, 4096, 132) == (4, 1)


# ----------------------------------------------------------------------------------------------
# Emulations of the kernels' layouts (mirrors of csrc/int8/int8_gemm_kernel.cuh and
# w8a16_gemm_kernel.cuh, lane by lane).

def swizzle_offset(rows, chunks, row, chunk):
    """SwizzledTile<rows, chunks>::offset: byte offset of (row, 16-byte chunk)."""
    group = min(8, chunks)
    per_line = 8 // group
    phys = (chunk % group) ^ ((row // per_line) % group)
    return ((chunk // group) * rows + row) * group * 16 + phys * 16


TILES = [(16, 16), (32, 16), (32, 8), (64, 8), (128, 8), (64, 4), (128, 4), (256, 4)]  # (rows, BK / 16)


@pytest.mark.parametrize("rows,chunks", TILES)
def test_swizzle_bijective_and_conflict_free(rows, chunks):
    offs = [swizzle_offset(rows, chunks, r, c) for r in range(rows) for c in range(chunks)]
    assert sorted(offs) == [16 * i for i in range(rows * chunks)]          # a permutation of the tile
    for r0 in range(0, rows, 8):                                          # one ldmatrix phase:
        for c in range(chunks):                                           # 8 rows, same chunk
            banks = {(swizzle_offset(rows, chunks, r0 + r, c) // 16) % 8 for r in range(8)}
            assert len(banks) == 8, (r0, c)


def ldmatrix_x4(smem, lane_addr):
    """regs[lane][j] = bytes 4c..4c+3 of the row whose address lane 8j + r gave (lane = 4r + c)."""
    regs = [[None] * 4 for _ in range(32)]
    for j in range(4):
        for lane in range(32):
            r, c = lane // 4, lane % 4
            addr = lane_addr[8 * j + r]
            regs[lane][j] = smem[addr + 4 * c: addr + 4 * c + 4]
    return regs


def mma_s8_16832(a_regs, b_regs):
    """D (16x8) from per-lane A (4 regs of 4 int8) and B (2 regs) per the PTX s8 m16n8k32 layout."""
    A = torch.zeros(16, 32, dtype=torch.int64)
    B = torch.zeros(32, 8, dtype=torch.int64)
    for lane in range(32):
        g, c = lane // 4, lane % 4
        for i, (row, k0) in enumerate(((g, 4 * c), (g + 8, 4 * c), (g, 16 + 4 * c), (g + 8, 16 + 4 * c))):
            A[row, k0:k0 + 4] = a_regs[lane][i]
        for i, k0 in enumerate((4 * c, 16 + 4 * c)):
            B[k0:k0 + 4, g] = b_regs[lane][i]
    return A @ B


@pytest.mark.parametrize("BK", [64, 128, 256])
def test_gemm_fragment_path_emulated(BK):
    # One warp tile of 16 x 16 at rows/cols 16..31 of a 32 x BK stage: cp.async into the swizzled
    # layout, ldmatrix with the kernel's lane addresses, mma per the PTX layout == a @ b.T.
    rows, chunks = 32, BK // 16
    a = torch.randint(-128, 128, (rows, BK), dtype=torch.int64)
    b = torch.randint(-128, 128, (rows, BK), dtype=torch.int64)

    def stage(t):
        smem = torch.zeros(rows * BK, dtype=torch.int64)
        for r in range(rows):
            for c in range(chunks):
                o = swizzle_offset(rows, chunks, r, c)
                smem[o:o + 16] = t[r, 16 * c:16 * c + 16]
        return smem

    sa, sb = stage(a), stage(b)
    group = min(8, chunks)
    per_line = 8 // group

    def addr(lane_row, lane_cb, row0, chunk0):
        # SwizzledTile::addr(lane_row(r) + base, lane_xor(r, cb), row0, chunk0)
        lane_x = lane_cb ^ ((lane_row // per_line) % group)
        return lane_row * group * 16 + ((chunk0 // group) * rows + row0) * group * 16 + (((chunk0 % group) ^ lane_x) << 4)

    m0, n0 = 16, 16
    acc = torch.zeros(16, 16, dtype=torch.int64)
    for ks in range(BK // 32):
        a_addr = [addr(l % 8 + 8 * ((l // 8) % 2), l // 16, m0, 2 * ks) for l in range(32)]
        b_addr = [addr(l % 8 + 8 * (l // 16), (l // 8) % 2, n0, 2 * ks) for l in range(32)]
        af = ldmatrix_x4(sa, a_addr)
        bf = ldmatrix_x4(sb, b_addr)
        for j in range(2):  # n8 tile j uses registers (2j, 2j + 1) of the B ldmatrix
            acc[:, 8 * j:8 * j + 8] += mma_s8_16832(af, [[bf[l][2 * j], bf[l][2 * j + 1]] for l in range(32)])
    assert torch.equal(acc, a[m0:m0 + 16] @ b[n0:n0 + 16].t())


def test_w8a16_k_permutation_emulated():
    # W8A16: lane (g, c) loads 16 contiguous k of rows g, g + 8 and of token g; mma step s uses
    # word s of the weights (bytes -> A cols (2c, 2c+1) and (2c+8, 2c+9)) and halves (4s..4s+3)
    # of the activations (b0, b1). Summed over the steps the mma must give W @ x^T for the block.
    W = torch.randint(-128, 128, (16, 64), dtype=torch.int64)
    X = torch.randint(-8, 8, (8, 64), dtype=torch.int64)
    D = torch.zeros(16, 8, dtype=torch.int64)
    for s in range(4):
        A = torch.zeros(16, 16, dtype=torch.int64)
        B = torch.zeros(16, 8, dtype=torch.int64)
        for lane in range(32):
            g, c = lane // 4, lane % 4
            wg, w8, xg = W[g, 16 * c:16 * c + 16], W[g + 8, 16 * c:16 * c + 16], X[g, 16 * c:16 * c + 16]
            word_g, word_8 = wg[4 * s:4 * s + 4], w8[4 * s:4 * s + 4]
            A[g, 2 * c:2 * c + 2], A[g, 2 * c + 8:2 * c + 10] = word_g[:2], word_g[2:]      # a[0], a[2]
            A[g + 8, 2 * c:2 * c + 2], A[g + 8, 2 * c + 8:2 * c + 10] = word_8[:2], word_8[2:]  # a[1], a[3]
            B[2 * c:2 * c + 2, g], B[2 * c + 8:2 * c + 10, g] = xg[4 * s:4 * s + 2], xg[4 * s + 2:4 * s + 4]
        D += A @ B
    assert torch.equal(D, W @ X.t())


def test_w8a16_dequant_magic():
    b = torch.arange(-128, 128, dtype=torch.int32)
    u = (b & 0xFF) ^ 0x80                                      # byte ^ 0x80 = b + 128
    half = torch.tensor((0x6400 | u).tolist(), dtype=torch.int16).view(torch.float16).float() - 1152
    assert torch.equal(half, b.float())
    f = torch.tensor((0x4B000000 | u).tolist(), dtype=torch.int32).view(torch.float32) - 8388736.0
    assert torch.equal(f, b.float()) and torch.equal(f.bfloat16().float(), b.float())


# ----------------------------------------------------------------------------------------------
# Benchmark suite: CPU smoke run (tiny shapes; no speed asserted).

def test_int8_bench_cpu(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fastllm.bench", "int8", "--quick", "--device", "cpu",
                          "--json", str(tmp_path / "b.json"), "--no-progress"],
                         capture_output=True, text=True, check=True).stdout
    assert "## int8" in out and "torch._int_mm" in out
    rows = json.loads((tmp_path / "b.json").read_text())["results"]["int8"]
    assert rows and all(r["ok"] == "yes" for r in rows), [r for r in rows if r["ok"] != "yes"]
    assert {r["kind"] for r in rows} >= {"w8a8-int32", "w8a8-linear", "w8a16"}


# ----------------------------------------------------------------------------------------------
# GPU (skipped without one).

M_LIST = list(range(1, 34)) + [97, 1025]
KN_GPU = [(80, 48), (272, 112), (1040, 4112)]   # not multiples of any tile's K (64..256) or N (32..256)


def rand_int8(*shape, device="cuda"):
    return torch.randint(-128, 128, shape, dtype=torch.int8, device=device)


def _poison_allocator(*nbytes):
    """Hand NaN / extreme-filled freed blocks to the next allocations (unwritten outputs show)."""
    blocks = [torch.full((n // 4 + 1,), float("nan"), device="cuda") for n in nbytes]
    del blocks


@pytest.mark.gpu
@pytest.mark.parametrize("K,N", KN_GPU)
def test_gpu_int32_exact(K, N):
    for M in M_LIST:
        a, b = rand_int8(M, K), rand_int8(N, K)
        _poison_allocator(M * N * 4)
        acc = int8_matmul_int32(a, b, backend="cuda")
        assert acc.dtype == torch.int32 and torch.equal(acc.cpu().long(), exact_int(a, b)), (M, K, N)


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.int32, torch.bfloat16])
def test_gpu_split_k_equals_single_pass(out_dtype):
    # The same call with and without the split-K workspace: int32 bit-identical, scaled outputs
    # identical too (the epilogue sees the same exact int32 sum).
    from fastllm import _ext
    from fastllm.bench.switches import hopper_90a
    lib = _ext.lib()
    cases = [(3, 64, 4096), (50, 128, 4096 + 16), (100, 256, 4096)]   # configs 0, 2, 3
    if hopper_90a(torch.device("cuda")):   # the wgmma kernel's split (M 129..256; N tails)
        cases += [(200, 1024 + 16, 4096 + 16), (256, 4096, 4096), (131, 272, 2048)]
    for M, N, K in cases:
        a, b = rand_int8(M, K), rand_int8(N, K)
        a_s, w_s = torch.rand(M, device="cuda"), torch.rand(N, device="cuda")
        ws_bytes = lib.int8_gemm_workspace(a.device.index, M, N, K)
        assert ws_bytes > 0, f"a 1-2 tile call on a GPU must split K ({M}, {N}, {K})"
        ws = torch.empty(ws_bytes, dtype=torch.uint8, device="cuda")
        outs = []
        for wsp, nb in ((0, 0), (ws.data_ptr(), ws_bytes)):
            out = torch.full((M, N), -7, dtype=out_dtype, device="cuda")
            scaled = out_dtype != torch.int32
            code = lib.int8_gemm(a.device.index, a.data_ptr(), K, b.data_ptr(), K, out.data_ptr(),
                                 fastllm._ext.DTYPE_CODES[out_dtype], a_s.data_ptr() if scaled else 0, M,
                                 w_s.data_ptr() if scaled else 0, 0, 0, M, N, K, wsp, nb,
                                 torch.cuda.current_stream().cuda_stream)
            assert code == 0, lib.error_string(code)
            outs.append(out)
        assert torch.equal(outs[0], outs[1]), (M, N, K)
        if out_dtype == torch.int32:
            assert torch.equal(outs[1].cpu().long(), exact_int(a, b)), (M, N, K)


@pytest.mark.gpu
def test_gpu_int32_extremes_max_k_and_strides():
    K = MAX_K // 16 * 16
    a = torch.full((19, K), -128, dtype=torch.int8, device="cuda")
    a[1] = 127
    b = torch.full((48, K), -128, dtype=torch.int8, device="cuda")
    b[5] = 127
    acc = int8_matmul_int32(a, b, backend="cuda")
    assert acc[0, 0].item() == K * 16384 and torch.equal(acc.cpu().long(), exact_int(a, b))
    # Row strides K + 16 (a column slice) on both operands.
    a2, b2 = rand_int8(37, 256 + 16)[:, 16:], rand_int8(64, 256 + 32)[:, 32:]
    assert torch.equal(int8_matmul_int32(a2, b2, backend="cuda").cpu().long(), exact_int(a2, b2))


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("static", [False, True])
def test_gpu_scaled(out_dtype, static):
    for i, M in enumerate([1, 2, 15, 16, 17, 31, 33, 64, 65, 97, 129, 1025]):
        K, N = KN_GPU[i % len(KN_GPU)]
        a, b = rand_int8(M, K), rand_int8(N, K)
        a_s = torch.rand(M, device="cuda") * 0.02 + 1e-3
        if static:
            a_s = torch.tensor(0.0123, device="cuda")   # one calibrated per-tensor scale (static mode)
        w_s = torch.rand(N, device="cuda") * 0.01 + 1e-4
        bias = None if i % 3 == 0 else torch.randn(N, device="cuda").to((torch.float16, torch.bfloat16,
                                                                          torch.float32)[i % 3])
        _poison_allocator(M * N * 4)
        out = int8_matmul(a, b, a_s, w_s, bias, out_dtype=out_dtype, backend="cuda")
        assert_epilogue_close(out, exact_int(a, b), a_s, w_s, bias, out_dtype)


@pytest.mark.gpu
def test_gpu_w8a8_large_tiles():
    # M large enough for the 128 x 256 config on every GPU size, N not a multiple of 256.
    M, K, N = 4096 + 16, 512, 8192 + 16
    a, b = rand_int8(M, K), rand_int8(N, K)
    acc = int8_matmul_int32(a, b, backend="cuda")
    assert torch.equal(acc, int8_matmul_int32(a, b, backend="torch"))


def _hopper_wgmma_or_skip():
    from fastllm.bench.switches import hopper_90a
    if not hopper_90a(torch.device("cuda")):
        pytest.skip("the wgmma kernel runs on sm_90 GPUs with a 90a build")


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.int32, torch.float16, torch.bfloat16, torch.float32])
def test_gpu_wgmma_matches_sm80_kernel(out_dtype, monkeypatch):
    # Hopper: the wgmma kernel (M > 128) against the exact product and, bit for bit, the sm80
    # kernel of the same call (FASTLLM_INT8_WGMMA=0): same int32 sums, same epilogue code. Shapes
    # cover both wgmma configs, M / N / K tails (K = 16: one chunk of a 128-byte step; N = 16 of
    # a 256-wide tile), a strided a and per-tensor / per-token scales.
    _hopper_wgmma_or_skip()
    plan = fastllm._ext.lib().int8_gemm_plan
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cases = [(129, 16, 16), (200, 272, 1040), (1025, 4112, 272), (4112, 4096, 1040), (8192, 1024, 144)]
    assert {plan(M, N, K, sms, hopper=True)[0] for M, N, K in cases} == {5, 6}
    for i, (M, N, K) in enumerate(cases):
        a = rand_int8(M, K + 16)[:, 16:] if i % 2 else rand_int8(M, K)
        b = rand_int8(N, K)
        a_s = torch.rand(M if i % 2 else 1, device="cuda") * 0.02 + 1e-3
        w_s = torch.rand(N, device="cuda") * 0.01 + 1e-4
        bias = torch.randn(N, device="cuda").to(torch.bfloat16) if i % 3 == 1 else None
        outs = []
        for flag in ("1", "0"):            # wgmma (cp.async-fed), sm80 kernel
            monkeypatch.setenv("FASTLLM_INT8_WGMMA", flag)
            _poison_allocator(M * N * 4)
            if out_dtype == torch.int32:
                outs.append(int8_matmul_int32(a, b, backend="cuda"))
            else:
                outs.append(int8_matmul(a, b, a_s if i % 2 else a_s[0], w_s, bias, out_dtype=out_dtype,
                                        backend="cuda"))
        if out_dtype == torch.int32:
            assert torch.equal(outs[0].cpu().long(), exact_int(a, b)), (M, N, K)
        else:
            assert_epilogue_close(outs[0], exact_int(a, b), a_s if i % 2 else a_s[0], w_s, bias, out_dtype)
        assert torch.equal(outs[0], outs[1]), (M, N, K, out_dtype)
    # The route itself (not just the host plan): the profiler sees the wgmma kernel, and with
    # FASTLLM_INT8_WGMMA=0 the sm80 one.
    a, b = rand_int8(200, 64), rand_int8(64, 64)
    for flag, name in (("1", "int8_wgmma_kernel"), ("0", "int8_gemm_kernel")):
        monkeypatch.setenv("FASTLLM_INT8_WGMMA", flag)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            int8_matmul_int32(a, b, backend="cuda")
            torch.cuda.synchronize()
        names = [e.name for e in prof.events()]
        assert any(name in n for n in names), (flag, names)


@pytest.mark.gpu
@pytest.mark.timeout(120)
def test_gpu_wgmma_tma_variant(monkeypatch):
    # The experimental TMA-fed wgmma kernel (FASTLLM_INT8_WGMMA=tma), alone in its test: a protocol
    # mistake would hang rather than fail, and the timeout then costs this test only. Bit-equal to
    # the cp.async-fed kernel (same sums, same epilogue) on both configs, tails included
    # (TMA zero-fills boxes past M / N / K), and the profiler must see it.
    _hopper_wgmma_or_skip()
    for M, N, K, od in ((129, 16, 16, torch.int32), (200, 272, 1040, torch.bfloat16),
                        (4112, 4096, 1040, torch.float16), (1025, 4112, 272, torch.int32)):
        a = rand_int8(M, K + 16)[:, 16:] if M % 2 else rand_int8(M, K)
        b = rand_int8(N, K)
        a_s, w_s = torch.rand(M, device="cuda") * 0.02 + 1e-3, torch.rand(N, device="cuda") * 0.01 + 1e-4
        outs = []
        for flag in ("tma", "1"):
            monkeypatch.setenv("FASTLLM_INT8_WGMMA", flag)
            outs.append(int8_matmul_int32(a, b, backend="cuda") if od == torch.int32 else
                        int8_matmul(a, b, a_s, w_s, None, out_dtype=od, backend="cuda"))
        torch.cuda.synchronize()
        assert torch.equal(outs[0], outs[1]), (M, N, K, od)
        if od == torch.int32:
            assert torch.equal(outs[0].cpu().long(), exact_int(a, b)), (M, N, K)
    monkeypatch.setenv("FASTLLM_INT8_WGMMA", "tma")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        int8_matmul_int32(rand_int8(200, 64), rand_int8(64, 64), backend="cuda")
        torch.cuda.synchronize()
    assert any("int8_wgmma_tma_kernel" in e.name for e in prof.events())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_size", [None, 64, 128])
def test_gpu_w8a16(dtype, group_size):
    for i, M in enumerate(range(1, 17)):
        K, N = ((1024, 48), (4096, 4096 + 16), (640, 4096))[i % 3] if group_size != 128 else \
            ((1024, 48), (4096, 4112), (768, 4096))[i % 3]
        x = torch.randn(M, K, device="cuda").to(dtype)
        w = rand_int8(N, K)
        shape = (N,) if not group_size else (N, K // group_size)
        s = (torch.rand(shape, device="cuda") + 0.5) * 0.01
        bias = torch.randn(N, device="cuda").to(dtype) if i % 2 else None
        _poison_allocator(M * N * 2)
        out = w8a16_matmul(x, w, s, bias, group_size=group_size, backend="cuda")
        assert_w8a16_close(out, x, w, s, bias, group_size)
    # K not a multiple of 64 (tail block), strided x, transposed-storage scales.
    x = torch.randn(5, 208 + 8, device="cuda", dtype=dtype)[:, 8:]
    w = rand_int8(32, 208)
    s = torch.rand(32, device="cuda") + 0.5
    assert_w8a16_close(w8a16_matmul(x, w, s, backend="cuda"), x, w, s, None, None)
    s2 = (torch.rand(3, 32, device="cuda") + 0.5).t()   # (32, 3) with strides (1, 32)
    w2 = rand_int8(32, 192)
    x2 = torch.randn(3, 192, device="cuda", dtype=dtype)
    assert_w8a16_close(w8a16_matmul(x2, w2, s2, group_size=64, backend="cuda"), x2, w2, s2, None, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mode", ["dynamic", "dynamic-smooth", "static", "static-per-channel"])
def test_gpu_fused_decode_matches_two_launches(dtype, mode, monkeypatch):
    # The fused-quantization kernel (csrc/int8/w8a8_decode_kernel.cuh, M <= 16) against the
    # two-launch path of the same call (FASTLLM_INT8_FUSED=0: quantize kernel, then the GEMM):
    # bit-equal, since both produce the same q bits and run the same fp32 epilogue. M = 1..16
    # covers both token-tile variants, the shapes both warp counts, K tails (K % 64 != 0) and
    # padded x rows; a NaN row must come out NaN on both paths (dynamic).
    from fastllm.ops import int8_matmul_dynamic, int8_matmul_static
    for M in range(1, 17):
        K, N = ((208, 48), (4112, 4096), (1040, 272))[M % 3]
        x = (torch.randn(M, K + 8, device="cuda") * 3)[:, 8:].to(dtype) if M % 2 else \
            (torch.randn(M, K, device="cuda") * 3).to(dtype)
        x[0, :: max(K // 5, 1)] *= 40            # outlier channels (static clamps)
        if M > 3 and mode.startswith("dynamic"):
            x[M - 1, 5] = float("nan")
        b = rand_int8(N, K)
        w_s = torch.rand(N, device="cuda") * 0.01 + 1e-4
        bias = torch.randn(N, device="cuda").to(dtype) if M % 3 == 1 else None
        smooth = torch.rand(K, device="cuda") + 0.5
        outs = []
        for flag in ("1", "0"):
            monkeypatch.setenv("FASTLLM_INT8_FUSED", flag)
            _poison_allocator(M * N * 4)
            if mode.startswith("dynamic"):
                outs.append(int8_matmul_dynamic(x, b, w_s, bias, smooth=smooth if "smooth" in mode else None,
                                                backend="cuda"))
            else:
                outs.append(int8_matmul_static(x, b, 0.05, w_s, bias, smooth=smooth if "per-channel" in mode else None,
                                               backend="cuda"))
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0, equal_nan=True, msg=lambda m: f"M={M}: {m}")
        if mode.startswith("dynamic") and M > 3:
            assert torch.isnan(outs[0][M - 1]).all()
    # The route: one fused kernel, no quantize launch; with the switch off, the two launches.
    x = torch.randn(4, 256, device="cuda").to(dtype)
    b, w_s = rand_int8(64, 256), torch.rand(64, device="cuda")
    for flag, want, not_want in (("1", "w8a8_decode_kernel", "quantize"), ("0", "quantize", "w8a8_decode_kernel")):
        monkeypatch.setenv("FASTLLM_INT8_FUSED", flag)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            if mode.startswith("dynamic"):
                int8_matmul_dynamic(x, b, w_s, backend="cuda")
            else:
                int8_matmul_static(x, b, 0.05, w_s, backend="cuda")
            torch.cuda.synchronize()
        names = [e.name for e in prof.events()]
        assert any(want in n for n in names) and not any(not_want in n for n in names), (flag, names)


@pytest.mark.gpu
def test_gpu_auto_prefers_cuda_and_falls_back():
    a, b = rand_int8(4, 64), rand_int8(32, 64)
    assert OP_INT32.select("auto", a.device, a, b) == "cuda"
    a_bad = rand_int8(4, 64 + 8)[:, 8:]   # 8-byte offset: the cuda kernel says why, triton serves
    assert "16-byte aligned" in OP_INT32.reason("cuda", a.device, a_bad, b)
    assert OP_INT32.select("auto", a.device, a_bad, b) == "triton"
    x = torch.randn(17, 64, device="cuda", dtype=torch.half)
    assert OP_W8A16.select("auto", x.device, x, b, torch.rand(32, device="cuda"), None, 0) == "triton"


@pytest.mark.gpu
def test_gpu_opcheck():
    a, b = rand_int8(5, 48), rand_int8(32, 48)
    sa, sw = torch.rand(5, device="cuda"), torch.rand(32, device="cuda")
    torch.library.opcheck(torch.ops.fastllm.int8_matmul_int32.default, (a, b, "cuda"))
    torch.library.opcheck(torch.ops.fastllm.int8_matmul.default,
                          (a, b, sa, sw, torch.randn(32, device="cuda"), torch.bfloat16, "cuda"))
    torch.library.opcheck(torch.ops.fastllm.int8_matmul.default, (a, b, sa[:1], sw, None, torch.float16, "cuda"))
    x = torch.randn(5, 128, device="cuda", dtype=torch.bfloat16)
    w = rand_int8(32, 128)
    torch.library.opcheck(torch.ops.fastllm.w8a16_matmul.default, (x, w, sw, None, 0, "cuda"))
    torch.library.opcheck(torch.ops.fastllm.w8a16_matmul.default,
                          (x, w, torch.rand(32, 2, device="cuda"), torch.randn(32, device="cuda"), 64, "cuda"))
