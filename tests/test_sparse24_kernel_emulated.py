"""The CUDA 2:4 sparse GEMM (csrc/sparse24/sparse24_gemm_kernel.cuh), emulated byte for byte on CPU.

The kernel has never run on a GPU. This file mirrors its constants and index math in NumPy:
the load_stage shared-memory fills (W rows clamped to N - 1, tokens past M and columns past K
zero-filled, metadata words copied), both XOR swizzles (val_off, x_off), the cp.async ring of
kStages stages, the ldmatrix lane addresses (ldmatrix as the hardware defines it, common/ptx.cuh:
lane 8j + r gives the address of row r of matrix j, register j of lane 4r + c gets bytes
4c..4c+3 of that row), the metadata word each lane reads, the sparsity selector, the K-tail skip
both epilogues' (n, m) mapping, and split-K (each grid-z slice's own ring over its stages, the
raw fp32 / int32 planes, the reduce's slice-order sum and epilogue). The registers go into python/fastllm/sparse/mma_sp.py's model
of mma.sp (written from the PTX ISA), and the stored output is compared with the dense product,
for the three tile configs of sparse24_traits.h x fp16 / bf16 / int8 x M / N / K tails.

Proven here, given that mirror (for every case below):
  * out == x @ W.T + bias: int8 raw int32 exactly; the int8 scaled epilogue exactly (the same fp32
    operations in the same order); fp16 / bf16 to within fp64 rounding (the model sums exact
    products in fp64), so every byte reaches the right register and every accumulator the
    right (n, m), including the bias / a_scale / w_scale indices;
  * every output element is stored exactly once, and nothing past M / N;
  * every cp.async reads inside x / values / meta (the row clamp, the strided x rows) and every
    ldmatrix address is 16-byte aligned;
  * no MMA reads shared memory its stage did not fill: shared memory starts as 0xFF (NaN halves,
    invalid metadata nibbles, which mma_sp.py rejects) and a stage's copies land only when the
    kernel's cp_async_wait<kStages - 2> lets them (the latest the hardware may deliver them), with
    K long enough that the ring wraps;
  * every metadata nibble an MMA consumes is a valid ordered 2-of-4 encoding, including the MMAs
    of W rows past N (clamped rows, never stored), where an invalid one would be undefined
    behaviour.
Not proven: that the .cuh says what is mirrored here (by hand; test_kernel_source_matches_mirror
only checks that the mirrored lines are still in the source verbatim, so an edit of them fails
here until the mirror is updated); the hardware's ldmatrix / mma.sp semantics themselves (taken
from the PTX ISA); fp32 accumulation order and the out_dtype / bias_dtype conversions (the GPU
tests of tests/test_sparse24.py cover those); __syncthreads / write-after-read ordering between
warps, bank conflicts, launch and shared-memory opt-in, speed.
To stay fast, MMAs whose outputs are never stored (all 8 tokens >= M, or all 16 W rows >= N) are
not run through the (slow) model; for the latter the metadata words they would consume are still
checked. test_mutant_kernel_fails shows that deliberately wrong index math makes this test fail.
"""
import pathlib
import re

import numpy as np
import pytest
import torch

from fastllm.sparse import compress, prune_24
from helpers import assert_mirrored
from fastllm.sparse.format import VALID_NIBBLES
from fastllm.sparse.mma_sp import mma_sp_m16n8k32, mma_sp_m16n8k64_s8

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNEL_SRC = ROOT / "csrc" / "sparse24" / "sparse24_gemm_kernel.cuh"
TRAITS_SRC = ROOT / "csrc" / "sparse24" / "sparse24_traits.h"

# sparse24_traits.h: name -> Traits<T, kBW, kBT, kWarpsW, kWarpsT, kStages>.
CONFIGS = {"NarrowM": (32, 16, 2, 1, 4), "SmallM": (64, 16, 4, 1, 4), "LargeM": (128, 128, 2, 4, 3)}
DTYPES = [torch.float16, torch.bfloat16, torch.int8]
LANE = np.arange(32)


class Traits:
    """struct Traits (sparse24_traits.h), field for field."""

    def __init__(self, dtype, kBW, kBT, kWarpsW, kWarpsT, kStages):
        self.dtype, self.kS8 = dtype, dtype == torch.int8
        self.kBW, self.kBT, self.kWarpsW, self.kWarpsT, self.kStages = kBW, kBT, kWarpsW, kWarpsT, kStages
        self.kThreads = 32 * kWarpsW * kWarpsT
        self.kSteps = 4
        self.kColsPerStep = 64 if self.kS8 else 32
        self.kStageK = self.kSteps * self.kColsPerStep
        self.kMetaBlocks = self.kStageK // 64
        self.kValRowBytes = self.kSteps * 32
        self.kXRowBytes = self.kSteps * 64
        self.kWarpW, self.kWarpT = kBW // kWarpsW, kBT // kWarpsT
        self.kMTiles, self.kNTiles = self.kWarpW // 16, self.kWarpT // 8
        self.kValBytes = kBW * self.kValRowBytes
        self.kXBytes = kBT * self.kXRowBytes
        self.kMetaBytes = (kBW // 16) * self.kMetaBlocks * 128
        self.kStageBytes = self.kValBytes + self.kXBytes + self.kMetaBytes
        assert self.kWarpW % 16 == 0 and self.kWarpT % 8 == 0
        assert self.kValRowBytes == 128 and self.kXRowBytes == 256


# ----------------------------------------------------------------------------------------------
# The kernel, mirrored from sparse24_gemm_kernel.cuh: val_off / x_off (lines 105-106),
# load_stage (108-142), sparse24_gemm_kernel's main loop (161-228) and epilogue (231-265),
# launch's grid (272). Integer math works on ints and on NumPy arrays alike.

def val_off(r, c):
    return r * 128 + ((c ^ (r & 7)) << 4)


def x_off(r, c):
    return r * 256 + (((c & 8) | ((c ^ r) & 7)) << 4)


KERNEL = dict(
    val_off_fill=val_off,                   # load_stage's W destination
    val_off_ldm=val_off,                    # the A ldmatrix's address
    x_off=x_off,                            # both sides of x
    selector=lambda step, s8: 0 if s8 or step % 2 == 0 else 1,
    wait_in_loop=lambda tr: tr.kStages - 2,
    d_index=lambda i: (i // 2, i % 2),      # accumulator i -> (+8 rows?, +1 token?)
    slice_tile=lambda kt0, i: kt0 + i,      # the absolute K tile of a slice's i-th stage load
    reduce_planes=lambda gz: gz,            # the split-K planes the reduce adds
)


def cp_async_16(buf, src, ok, dst):
    """cp.async.cg ... 16, src-size: 16 bytes from buf[src..] (ok) or 16 zeros (src-size 0).
    Returns the pending write (dst offsets, data)."""
    src = np.where(ok, src, 0)
    assert (dst % 16 == 0).all() and (src % 16 == 0).all()
    assert (src[ok] >= 0).all() and (src[ok] + 16 <= buf.size).all(), "cp.async reads outside its tensor"
    data = buf[src[:, None] + np.arange(16)]      # (src 0 where not ok: every tensor has >= 16 bytes)
    data[~ok] = 0
    return dst, data


def load_stage(p, tr, k, st, kt, w0, t0):
    elt = 1 if tr.kS8 else 2
    k0 = kt * tr.kStageK
    writes = []
    # Compressed W: kBW rows x 8 chunks (the tid-strided loop covers i = 0 .. kBW * 8 - 1).
    v_row_bytes, v_col0 = p["K"] // 2 * elt, k0 // 2 * elt
    i = np.arange(tr.kBW * 8)
    r, c = i // 8, i % 8
    row = np.minimum(w0 + r, p["N"] - 1)
    col = v_col0 + 16 * c
    ok = col < v_row_bytes
    writes.append(cp_async_16(p["values"], row * v_row_bytes + col, ok, st + k["val_off_fill"](r, c)))
    # x: kBT rows x 16 chunks.
    xs = st + tr.kValBytes
    x_col0 = k0 * elt
    i = np.arange(tr.kBT * 16)
    r, c = i // 16, i % 16
    col = x_col0 + 16 * c
    ok = (t0 + r < p["M"]) & (col < p["K"] * elt)
    writes.append(cp_async_16(p["x"], (t0 + r) * p["x_row_bytes"] + col, ok, xs + k["x_off"](r, c)))
    # meta: (kBW / 16) row blocks x kMetaBlocks blocks x 8 chunks of 4 words (byte offsets here).
    ms = xs + tr.kXBytes
    blocks, kb0, words_per_rb = p["K"] // 64, k0 // 64, p["K"] // 2
    i = np.arange((tr.kBW // 16) * tr.kMetaBlocks * 8)
    b, j, c = i // (tr.kMetaBlocks * 8), (i // 8) % tr.kMetaBlocks, i % 8
    rb = np.minimum(w0 // 16 + b, p["N"] // 16 - 1)
    ok = kb0 + j < blocks
    writes.append(cp_async_16(p["meta"], 4 * (rb * words_per_rb + (kb0 + j) * 32 + 4 * c), ok,
                              ms + (b * tr.kMetaBlocks + j) * 128 + 16 * c))
    return writes


def ldmatrix_x4(smem, addr):
    """addr (32,): lane 8j + r gives row r of matrix j; register j of lane 4r + c = bytes 4c..4c+3."""
    assert (addr % 16 == 0).all(), "ldmatrix row addresses must be 16-byte aligned"
    rows = addr[8 * np.arange(4)[None, :] + (LANE // 4)[:, None]] + 4 * (LANE % 4)[:, None]   # (32, 4)
    return smem.view(np.uint32)[rows // 4]


def check_meta(e, sel, s8):
    """The nibbles mma.sp would consume from e with this selector are valid (mma_sp.py checks
    the ones it runs; this is for the MMAs skipped because their rows are past N)."""
    used = LANE if s8 else LANE[(LANE % 4) // 2 == sel]
    nib = (e[used].astype(np.int64)[:, None] >> (4 * np.arange(8))) & 0xF
    assert np.isin(nib, VALID_NIBBLES).all(), "invalid metadata nibble: undefined behaviour for mma.sp"


def run_cta(p, tr, k, bx, by, bz):
    """One CTA: returns acc[(warp, mi, ni)] = (32, 4) accumulators, None where not modelled."""
    t0, w0 = bx * tr.kBT, by * tr.kBW
    M, N, K = p["M"], p["N"], p["K"]
    kt0 = bz * p["k_tiles_per_split"]                          # split-K slice (grid z)
    k_tiles = min(p["k_tiles_per_split"], (K + tr.kStageK - 1) // tr.kStageK - kt0)
    assert k_tiles > 0, "an empty split-K slice"
    k_slices = K // tr.kColsPerStep
    smem = np.full(tr.kStages * tr.kStageBytes, 0xFF, np.uint8)    # stale: NaN / invalid nibbles
    groups, pending = [], []

    def commit():
        groups.append(list(pending))
        pending.clear()

    def wait(n):   # cp.async.wait_group n: all but the newest n groups have landed (no earlier)
        while len(groups) > n:
            for dst, data in groups.pop(0):
                smem[dst[:, None] + np.arange(16)] = data

    warps = range(tr.kWarpsW * tr.kWarpsT)
    acc = {(w, mi, ni): None for w in warps for mi in range(tr.kMTiles) for ni in range(tr.kNTiles)}
    for s in range(tr.kStages - 1):
        if s < k_tiles:
            pending += load_stage(p, tr, k, s * tr.kStageBytes, k["slice_tile"](kt0, s), w0, t0)
        commit()
    for it in range(k_tiles):
        wait(k["wait_in_loop"](tr))
        nxt = it + tr.kStages - 1
        if nxt < k_tiles:
            assert nxt % tr.kStages != it % tr.kStages
            pending += load_stage(p, tr, k, (nxt % tr.kStages) * tr.kStageBytes, k["slice_tile"](kt0, nxt), w0, t0)
        commit()
        kt = kt0 + it
        st = (it % tr.kStages) * tr.kStageBytes
        xs = st + tr.kValBytes
        ms = xs + tr.kXBytes
        for step in range(tr.kSteps):
            if kt * tr.kSteps + step >= k_slices:
                break
            blk = step // (1 if tr.kS8 else 2)
            sel = k["selector"](step, tr.kS8)
            for warp in warps:
                warp_w, warp_t = warp % tr.kWarpsW, warp // tr.kWarpsW
                e, a, b = [], [], []
                for mi in range(tr.kMTiles):
                    rb = (warp_w * tr.kWarpW) // 16 + mi
                    e.append(smem.view(np.uint32)[(ms + ((rb * tr.kMetaBlocks + blk) * 32 + LANE) * 4) // 4])
                    r = warp_w * tr.kWarpW + mi * 16 + (LANE & 7) + ((LANE >> 3) & 1) * 8
                    a.append(ldmatrix_x4(smem, st + k["val_off_ldm"](r, step * 2 + (LANE >> 4))))
                for ni in range(tr.kNTiles):
                    r = warp_t * tr.kWarpT + ni * 8 + (LANE & 7)
                    b.append(ldmatrix_x4(smem, xs + k["x_off"](r, step * 4 + (LANE >> 3))))
                for mi in range(tr.kMTiles):
                    rows_past_n = w0 + warp_w * tr.kWarpW + mi * 16 >= N
                    if rows_past_n:
                        check_meta(e[mi], sel, tr.kS8)
                    for ni in range(tr.kNTiles):
                        if rows_past_n or t0 + warp_t * tr.kWarpT + ni * 8 >= M:
                            continue       # never stored (see the module docstring)
                        d = acc[(warp, mi, ni)]
                        if d is None:
                            d = torch.zeros(32, 4, dtype=torch.int64 if tr.kS8 else torch.float64)
                        if tr.kS8:
                            d = mma_sp_m16n8k64_s8(a[mi], b[ni], d, e[mi], sel)
                        else:
                            d = mma_sp_m16n8k32(a[mi], b[ni], d, e[mi], sel, tr.dtype)
                        acc[(warp, mi, ni)] = d
    wait(0)
    return acc


def finish(p, m, n, v, scaled):
    """finish(): (v * a_scale[m or 0]) * w_scale[n] + bias[n] in fp32, each operation rounded on
    its own as the _rn intrinsics do (scaled int8), else v + bias[n] (the fp64 model's sums stand
    for the 16-bit types' fp32 ones)."""
    if scaled:
        a_s = p["a_scale"][m if p["a_scale_per_row"] else 0]
        return v.astype(np.float32) * a_s * p["w_scale"][n] + p["bias"][n]
    return v + p["bias"][n].astype(np.float64)


def epilogue(p, tr, k, accs, scaled):
    """The kernel's stores over all CTAs. One slice: the raw int32 one (int8 without a_scale) or
    finish(). Split-K: every slice's raw accumulators to its workspace plane (each element once),
    then sparse24_splitk_reduce: the planes summed in slice order, then the same raw store or
    finish(). Returns (out, store counts of the final output)."""
    M, N = p["M"], p["N"]
    raw = tr.kS8 and not scaled
    gz = 1 + max(bz for (_, _, bz) in accs)
    if raw or gz > 1:   # raw accumulators: the int32 output, or one plane per slice
        planes = np.full((gz, M, N), -(2 ** 62) if tr.kS8 else np.nan, np.int64 if tr.kS8 else np.float64)
    count = np.zeros((gz, M, N), np.int64)
    g, t = LANE >> 2, LANE & 3
    if not (raw or gz > 1):
        out = np.full((M, N), np.nan, np.float32 if scaled else np.float64)
    for (bx, by, bz), acc in accs.items():
        t0, w0 = bx * tr.kBT, by * tr.kBW
        for (warp, mi, ni), d in acc.items():
            warp_w, warp_t = warp % tr.kWarpsW, warp // tr.kWarpsW
            n_base, m_base = w0 + warp_w * tr.kWarpW + g, t0 + warp_t * tr.kWarpT + 2 * t
            for i in range(4):     # raw: i; float: i = i2 * 2 + i1 (the same (n, m) per i)
                hi, lo = k["d_index"](i)
                n, m = n_base + mi * 16 + hi * 8, m_base + ni * 8 + lo
                keep = (n < N) & (m < M)
                if not keep.any():
                    continue
                assert d is not None, "an MMA skipped as never stored has a stored output"
                v = d[:, i].numpy()[keep]
                nk, mk = n[keep], m[keep]
                if raw or gz > 1:
                    planes[bz, mk, nk] = v                                 # out + blockIdx.z * M * N
                else:
                    out[mk, nk] = finish(p, mk, nk, v, scaled)
                np.add.at(count, (bz, mk, nk), 1)
    assert (count == 1).all(), "every raw / output element stored exactly once per slice"
    if not (raw or gz > 1):
        return out, count[0]
    total = planes[0].copy()
    for z in range(1, k["reduce_planes"](gz)):                           # slice order
        total += planes[z]
    mm, nn = np.meshgrid(np.arange(M), np.arange(N), indexing="ij")
    return (total if raw else finish(p, mm, nn, total, scaled)), count.max(0)


def emulate(x, values, meta, cfg, bias=None, a_scale=None, w_scale=None, a_scale_per_row=True,
            pad=16, splits=1, **mutations):
    """The kernel on x (M, K) (rows padded to a stride of K + pad elements, the padding NaN / 127)
    and compress's (values, meta): returns {"acc": per-CTA accumulators, "p": params, "tr"}."""
    k = dict(KERNEL, **mutations)
    M, K = x.shape
    N = values.shape[0]
    tr = Traits(x.dtype, *CONFIGS[cfg])
    xbuf = torch.full((M, K + pad), 127 if tr.kS8 else float("nan")).to(x.dtype)
    xbuf[:, :K] = x
    as_bytes = lambda t: t.contiguous().view(torch.uint8).reshape(-1).numpy()   # noqa: E731
    p = dict(x=as_bytes(xbuf), values=as_bytes(values), meta=as_bytes(meta), M=M, N=N, K=K,
             x_row_bytes=(K + pad) * x.element_size(), bias=bias, a_scale=a_scale, w_scale=w_scale,
             a_scale_per_row=a_scale_per_row)
    gx, gy = (M + tr.kBT - 1) // tr.kBT, (N + tr.kBW - 1) // tr.kBW               # launch's grid
    k_tiles = (K + tr.kStageK - 1) // tr.kStageK
    p["k_tiles_per_split"] = (k_tiles + splits - 1) // splits
    gz = (k_tiles + p["k_tiles_per_split"] - 1) // p["k_tiles_per_split"]         # no empty slice
    accs = {(bx, by, bz): run_cta(p, tr, k, bx, by, bz) for bx in range(gx) for by in range(gy)
            for bz in range(gz)}
    return dict(acc=accs, p=p, tr=tr, k=k)


# ----------------------------------------------------------------------------------------------
# Cases

def sparse_weight(N, K, dtype):
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8) if dtype == torch.int8 else torch.randn(N, K).to(dtype)
    w, _ = prune_24(w)
    # Groups with fewer than 2 non-zeros (padding indices), in row N - 1, the clamp's source row.
    w[0, :4] = 0
    w[-1, 4:8] = torch.tensor([0, 0, 0, 1]).to(dtype)
    return w


def activations(M, K, dtype):
    return torch.randint(-128, 128, (M, K), dtype=torch.int8) if dtype == torch.int8 else torch.randn(M, K).to(dtype)


def shape(cfg, dtype, case):
    """(M, N, K). All M are tails of the token tile; all K multiples of 64 but not of kStageK."""
    kBW, kBT, _, _, kStages = CONFIGS[cfg]
    stage_k = 256 if dtype == torch.int8 else 128
    return {
        # two CTAs along tokens, the second with 2 tokens; N = 16 < kBW; K < one stage.
        "m_tail": (kBT + 2, 16, 64),
        # two CTAs along W, the second partly past N (clamped rows); one full + one partial stage.
        "n_tail": (5, kBW + 16, stage_k + 64),
        # more stages than the ring holds: slots reused (cp.async waits, next % kStages).
        "ring": (3, 16, kStages * stage_k + 64),
    }[case]


def assert_matches(res, x, w, bias):
    """The emulated kernel's stored output == the dense product (module docstring's bounds)."""
    p, tr, k = res["p"], res["tr"], res["k"]
    if tr.kS8:
        exact = x.long() @ w.long().t()
        out, count = epilogue(p, tr, k, res["acc"], scaled=False)
        assert (count == 1).all(), "every output stored exactly once"
        assert np.array_equal(out, exact.numpy()), "int32 accumulators"
        for per_row in (True, False):
            p["a_scale_per_row"] = per_row
            a_s = torch.from_numpy(p["a_scale"]).reshape(-1, 1)
            a_s = a_s if per_row else a_s[:1]
            ref = (exact.float() * a_s) * torch.from_numpy(p["w_scale"]) + torch.from_numpy(p["bias"])
            out, count = epilogue(p, tr, k, res["acc"], scaled=True)
            assert (count == 1).all()
            assert np.array_equal(out, ref.numpy()), f"scaled epilogue (a_scale_per_row={per_row})"
    else:
        exact = x.double() @ w.double().t() + bias.double()
        scale = x.double().abs() @ w.double().abs().t() + bias.double().abs()
        out, count = epilogue(p, tr, k, res["acc"], scaled=False)
        assert (count == 1).all(), "every output stored exactly once"
        err = np.abs(out - exact.numpy())
        assert (err <= 1e-12 * scale.numpy()).all(), f"max error {np.nanmax(err)} (NaN: {np.isnan(out).any()})"


def run_case(cfg, dtype, M, N, K, splits=1, **mutations):
    w, x = sparse_weight(N, K, dtype), activations(M, K, dtype)
    values, meta = compress(w)
    bias = torch.randn(N).numpy()
    kw = dict(bias=bias)
    if dtype == torch.int8:
        kw.update(a_scale=(torch.rand(M) + 0.5).numpy(), w_scale=(torch.rand(N) / 64).numpy())
    res = emulate(x, values, meta, cfg, splits=splits, **kw, **mutations)
    return res, x, w, torch.from_numpy(bias)


@pytest.mark.parametrize("case", ["m_tail", "n_tail", "ring"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f16", "bf16", "s8"])
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_kernel_emulated_matches_dense(cfg, dtype, case):
    M, N, K = shape(cfg, dtype, case)
    assert M % CONFIGS[cfg][1] and N % 16 == 0 and K % 64 == 0 and K % (256 if dtype == torch.int8 else 128)
    res, x, w, bias = run_case(cfg, dtype, M, N, K)
    assert_matches(res, x, w, bias)


@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f16", "bf16", "s8"])
@pytest.mark.parametrize("cfg", ["NarrowM", "SmallM"])
def test_split_k_emulated_matches_dense(cfg, dtype, splits):
    # Split-K (the small-M configs): K of 4 whole stages + a 64-column tail cut into slices of
    # whole stages (3 splits of 5 tiles: 2 + 2 + 1), each slice's ring starting at its own tile;
    # the planes summed by the reduce. int8 stays exact (raw and scaled).
    kBW, kBT, _, _, _ = CONFIGS[cfg]
    stage_k = 256 if dtype == torch.int8 else 128
    res, x, w, bias = run_case(cfg, dtype, 3, kBW + 16, 4 * stage_k + 64, splits=splits)
    assert 1 + max(bz for (_, _, bz) in res["acc"]) == splits
    assert_matches(res, x, w, bias)


def test_split_k_plan():
    # The launcher's plan (host code of sparse24_traits.h, no GPU needed): small-M calls whose
    # output tiles leave SMs idle split K (>= 4 stages per split, at most 16); LargeM and M > 32
    # never split. smem_optin 232448 (sm_90) keeps LargeM available.
    from fastllm import _ext
    try:
        lib = _ext.lib()
    except Exception as e:                          # a pure-Python build: nothing to ask
        pytest.skip(f"no CUDA extension built: {e}")
    f16, s8 = _ext.DTYPE_CODES[torch.float16], _ext.DTYPE_CODES[torch.int8]
    plan = lambda dt, M, N, K, sms=132: tuple(lib.sparse24_gemm_plan(dt, M, N, K, sms, 232448))  # noqa: E731
    assert plan(f16, 1, 4096, 4096) == (0, 2)      # NarrowM: 128 CTAs on 132 SMs -> 256
    assert plan(f16, 1, 1024, 4096) == (0, 8)      # 32 CTAs: 8 splits of 4 stages (K 512 each)
    assert plan(s8, 16, 4096, 14336) == (0, 2)
    assert plan(f16, 1, 14336, 4096) == (1, 1)     # SmallM: 224 CTAs already cover the SMs
    assert plan(f16, 32, 1024, 128 * 64) == (1, 8)  # 16 x 64 tiles: 2 x 16 = 32 CTAs
    assert plan(f16, 33, 1024, 8192)[1] == 1       # M > 32
    assert plan(f16, 200, 1024, 8192) == (2, 1)    # LargeM never splits
    assert plan(f16, 1, 64, 128 * 7) == (0, 1)     # 7 stages: no split keeps 4 per split
    assert plan(f16, 1, 64, 128 * 1000)[1] == 16   # capped


# Deliberately wrong index math: each must make the emulated kernel disagree with the dense
# product (or hit what mma.sp calls undefined behaviour), proving the comparison above can fail.
MUTANTS = {
    "ldmatrix_A_without_xor": dict(val_off_ldm=lambda r, c: r * 128 + (c << 4)),
    "x_off_without_c_and_8": dict(x_off=lambda r, c: r * 256 + (((c ^ r) & 7) << 4)),
    "selector_always_0": dict(selector=lambda step, s8: 0),
    "wait_one_group_too_few": dict(wait_in_loop=lambda tr: tr.kStages - 1),
    "epilogue_d1_d2_swapped": dict(d_index=lambda i: (i % 2, i // 2)),
    "split_slices_from_tile_0": dict(slice_tile=lambda kt0, nxt: nxt),
    "reduce_drops_last_plane": dict(reduce_planes=lambda gz: gz - 1),
}


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_mutant_kernel_fails(mutant):
    try:
        res, x, w, bias = run_case("NarrowM", torch.float16, 5, 16, 5 * 128 + 64, splits=2, **MUTANTS[mutant])
    except ValueError as e:          # mma_sp.py: an invalid metadata nibble (stale shared memory)
        assert "mma.sp" in str(e)
        return
    with pytest.raises(AssertionError):
        assert_matches(res, x, w, bias)


# Lines of the CUDA source the emulation above mirrors (whitespace-normalized); if one changes,
# update the mirror and this list together.
MIRRORED_KERNEL_LINES = [
    "__device__ __forceinline__ int val_off(int r, int c) { return r * 128 + ((c ^ (r & 7)) << 4); }",
    "__device__ __forceinline__ int x_off(int r, int c) { return r * 256 + (((c & 8) | ((c ^ r) & 7)) << 4); }",
    "const int64_t v_row_bytes = p.K / 2 * kElt;",
    "const int64_t v_col0 = k0 / 2 * kElt;",
    "for (int i = tid; i < Tr::kBW * 8; i += Tr::kThreads) {",
    "const int64_t row = min(w0 + r, p.N - 1);",
    "const bool ok = col < v_row_bytes;",
    "cp_async_16(smem_u32(st + val_off(r, c)), p.values + (ok ? row * v_row_bytes + col : 0), ok);",
    "for (int i = tid; i < Tr::kBT * 16; i += Tr::kThreads) {",
    "const bool ok = t0 + r < p.M && col < p.K * kElt;",
    "cp_async_16(smem_u32(xs + XOff::off(r, c)), p.x + (ok ? (t0 + r) * p.x_row_bytes + col : 0), ok);",
    "__device__ __forceinline__ static int off(int r, int c) { return x_off(r, c); }",
    "const int b = i / (Tr::kMetaBlocks * 8), j = (i / 8) % Tr::kMetaBlocks, c = i % 8;",
    "const int64_t rb = min(w0 / 16 + b, p.N / 16 - 1);",
    "cp_async_16(smem_u32(ms + (b * Tr::kMetaBlocks + j) * 128 + 16 * c),",
    "p.meta + (ok ? rb * words_per_rb + (kb0 + j) * 32 + 4 * c : 0), ok);",
    "const int64_t t0 = static_cast<int64_t>(blockIdx.x) * Tr::kBT;",
    "const int64_t w0 = static_cast<int64_t>(blockIdx.y) * Tr::kBW;",
    "cp_async_wait<Tr::kStages - 2>();",
    "const int64_t kt0 = static_cast<int64_t>(blockIdx.z) * p.k_tiles_per_split;",
    "const int64_t k_tiles = min(p.k_tiles_per_split, (p.K + Tr::kStageK - 1) / Tr::kStageK - kt0);",
    "if (s < k_tiles) load_stage<Tr>(p, smem + s * Tr::kStageBytes, kt0 + s, w0, t0, tid);",
    "if (next < k_tiles) load_stage<Tr>(p, smem + (next % Tr::kStages) * Tr::kStageBytes, kt0 + next, w0, t0, tid);",
    "const int64_t kt = kt0 + it;",
    "const uint8_t* st = smem + (it % Tr::kStages) * Tr::kStageBytes;",
    "if (kt * Tr::kSteps + step >= k_slices) break;",
    "e[mi] = ms[(rb * Tr::kMetaBlocks + blk) * 32 + lane];",
    "const int r = warp_w * Tr::kWarpW + mi * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;",
    "ldmatrix_x4(a[mi], smem_u32(st + val_off(r, step * 2 + (lane >> 4))));",
    "const int r = warp_t * Tr::kWarpT + ni * 8 + (lane & 7);",
    "ldmatrix_x4(b[ni], smem_u32(xs + x_off(r, step * 4 + (lane >> 3))));",
    "if (Tr::kS8 || step % 2 == 0)",
    "const int64_t n_base = w0 + warp_w * Tr::kWarpW + g, m_base = t0 + warp_t * Tr::kWarpT + 2 * t;",
    "const int64_t n = n_base + mi * 16 + (i / 2) * 8, m = m_base + ni * 8 + (i % 2);",
    "Acc* out = static_cast<Acc*>(p.out) + static_cast<int64_t>(blockIdx.z) * p.M * p.N;",
    "if (n < p.N && m < p.M) out[m * p.N + n] = acc[mi][ni][i];",
    "if (n < p.N && m < p.M) finish(p, m, n, static_cast<float>(acc[mi][ni][i]));",
    "if (p.a_scale != nullptr) v = __fmul_rn(__fmul_rn(v, p.a_scale[p.a_scale_per_row ? m : 0]), p.w_scale[n]);",
    "store_out(p.out, p.out_dtype, m * p.N + n, __fadd_rn(v, b));",
    "for (int z = 1; z < splits; ++z) sum += partial[z * mn + i];",
    "finish(p, i / p.N, i % p.N, static_cast<float>(sum));",
    "p.k_tiles_per_split = (k_tiles + splits - 1) / splits;",
    "const int gz = static_cast<int>((k_tiles + p.k_tiles_per_split - 1) / p.k_tiles_per_split);",
    "const int64_t gx = (p.M + Tr::kBT - 1) / Tr::kBT, gy = (p.N + Tr::kBW - 1) / Tr::kBW;",
]
MIRRORED_TRAITS_LINES = [
    "static constexpr int kSteps = 4;",
    "static constexpr int kColsPerStep = kS8 ? 64 : 32;",
    "static constexpr int kMetaBlocks = kStageK / 64;",
    "static constexpr int kMetaBytes = (kBW / 16) * kMetaBlocks * 128;",
    "static constexpr int kStageBytes = kValBytes + kXBytes + kMetaBytes;",
]


def test_kernel_source_matches_mirror():
    assert_mirrored(((KERNEL_SRC, MIRRORED_KERNEL_LINES), (TRAITS_SRC, MIRRORED_TRAITS_LINES)))
    traits = TRAITS_SRC.read_text()
    configs = {name: tuple(int(v) for v in args.split(","))
               for name, args in re.findall(r"using (\w+) = Traits<T, ([\d, ]+)>;", traits)}
    assert configs.pop("HopperM") == (128, 128, 2, 4, 4)   # the wgmma.sp kernel's: test_sparse24_wgmma_emulated.py
    assert configs == CONFIGS
