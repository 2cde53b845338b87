"""The Hopper 2:4 GEMM (csrc/sparse24/sparse24_wgmma_kernel.cuh), emulated on CPU.

The kernel has never run on a GPU. This file runs its stage loads (the sm80 kernel's load_stage,
mirrored in test_sparse24_kernel_emulated.py, with x in XOffWgmma's two 128-byte column blocks),
its shared-memory descriptors (compressed W: + 64 rows per warpgroup, + 32 bytes per k-slice;
x: block slice / 2, + 64 bytes per odd slice), its metadata word per warp and lane (selector 0
always: for 16-bit types the odd slice's words, which mma.sp's layout gives to thread pair 2, 3,
are read by pair 0, 1), through two models:
  * wgmma's operand fetch (PTX ISA: K-major, 128-byte swizzle; the model of
    test_int8_wgmma_emulated.py), giving the 64 x 32-byte compressed A and the 128 x 64-byte B
    of each wgmma.sp;
  * wgmma.sp per warp as mma.sp (python/fastllm/sparse/mma_sp.py, written from the ISA): warp w
    of the warpgroup computes rows 16w..16w+15 with its lanes' metadata words, the A fragments
    of the compressed 16 rows in the mma.sp A layout, the 16 n8 token tiles of B.
The second is an ASSUMPTION (the ISA draws wgmma.sp's metadata layout only in figures; mma.sp's
is the natural reading and what a public demo uses): the GPU test (tests/test_sparse24.py at
M > 64 on an H100, and the comparison with FASTLLM_SPARSE24_WGMMA=0) is what settles it.

Proven here, given that mirror and those models: for fp16 / bf16 / int8, M / N tails (tokens
past M zero, W rows past N clamped) and a K long enough that the ring wraps, the stored out
equals x @ W.T (int8 exactly; 16-bit to fp64 rounding of the model's sums), every output stored
once; every descriptor's tile is 1024-aligned; every metadata nibble an MMA consumes is a valid
ordered encoding. Only whole stages of K reach this kernel (the launcher's hopper_fits; other K
run the mma.sp kernel). Not proven: the pipeline's ordering (the same ring as the int8 Hopper
kernel, whose emulation checks it), speed.
Layout evidence (helper review): CUTLASS's sm90 sparse GMMA traits give per-thread metadata
layouts (ELayout_64x32 / 64x64) equal to mma.sp's per warp, used with selector 0.
"""
import pathlib

import numpy as np
import pytest
import torch

from fastllm.sparse import compress
from helpers import assert_mirrored
from fastllm.sparse.mma_sp import mma_sp_m16n8k32, mma_sp_m16n8k64_s8

from test_int8_wgmma_emulated import desc_sw128, wgmma_operand
from test_sparse24_kernel_emulated import KERNEL as SM80_KERNEL
from test_sparse24_kernel_emulated import Traits, activations, load_stage, sparse_weight

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNEL_SRC = ROOT / "csrc" / "sparse24" / "sparse24_wgmma_kernel.cuh"
TRAITS_SRC = ROOT / "csrc" / "sparse24" / "sparse24_traits.h"
HOPPER_M = (128, 128, 2, 4, 4)           # HopperM<T> = Traits<T, 128, 128, 2, 4, 4>
LANE = np.arange(32)


def x_off_wgmma(r, c, block_rows=128):
    """XOffWgmma<kBlockRows>::off."""
    return (c >> 3) * (block_rows * 128) + r * 128 + (((c & 7) ^ (r & 7)) << 4)


KERNEL = dict(
    x_off=x_off_wgmma,
    a_addr=lambda vals, wg, step: vals + wg * 64 * 128 + step * 32,
    b_addr=lambda xs, step, kBT: xs + (step // 2) * (kBT * 128) + (step % 2) * 64,
    # s8: the lane's own word of block `step`; 16-bit: block step // 2, the odd slice's words
    # (mma.sp's thread pair 2, 3) read by pair 0, 1 so that the selector is always 0.
    meta_index=lambda rb, kmb, step, s8: (rb * kmb + step) * 32 + LANE if s8 else
    (rb * kmb + step // 2) * 32 + ((LANE & ~3) | (2 * (step & 1)) | (LANE & 1)),
    selector=lambda step, s8: 0,
)


def u32(rows_bytes, byte_idx):
    """Little-endian uint32 of bytes byte_idx[i] .. + 3 of row i (rows_bytes: (R, W) uint8)."""
    b = rows_bytes[np.arange(len(rows_bytes))[:, None], byte_idx[:, None] + np.arange(4)].astype(np.int64)
    return b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16) | (b[:, 3] << 24)


def warp_mma(A, B, e, sel, s8, dtype):
    """mma.sp for one warp: A (16, 32) compressed bytes, B (8, 64) token bytes, e (32,) words.
    Returns d (32, 4) for the 16 rows x 8 tokens (mma_sp.py's layout)."""
    g, t = LANE // 4, LANE % 4
    a = np.zeros((32, 4), np.int64)
    b = np.zeros((32, 4), np.int64)
    for j in range(4):
        # s8: 4 non-zeros of dense columns 8t + 32 (j // 2) .. + 7 = compressed bytes 4t + 16 (j // 2);
        # 16-bit: chunk t + 4 (j // 2), its 2 non-zeros = compressed bytes 4 chunk .. + 3.
        off = 4 * t + 16 * (j // 2) if s8 else 4 * (t + 4 * (j // 2))
        a[:, j] = u32(A[g + 8 * (j % 2)], off)
    for i in range(4):
        b[:, i] = u32(B[g], (4 * t + 16 * i) if s8 else 2 * (2 * t + 8 * i))
    c = np.zeros((32, 4), np.int64 if s8 else np.float64)
    if s8:
        return np.asarray(mma_sp_m16n8k64_s8(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(c),
                                             torch.from_numpy(e), 0))
    return np.asarray(mma_sp_m16n8k32(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(c),
                                      torch.from_numpy(e), sel, dtype))


def emulate(x, values, meta, k=KERNEL, smem_base=0):
    M, K = x.shape
    N = values.shape[0]
    tr = Traits(x.dtype, *HOPPER_M)
    s8 = tr.kS8
    as_bytes = lambda t: t.contiguous().view(torch.uint8).reshape(-1).numpy()   # noqa: E731
    p = dict(x=as_bytes(x), values=as_bytes(values), meta=as_bytes(meta), M=M, N=N, K=K,
             x_row_bytes=K * x.element_size())
    lk = dict(SM80_KERNEL, x_off=k["x_off"])
    out = np.zeros((M, N), np.float64)
    count = np.zeros((M, N), np.int64)
    assert K % tr.kStageK == 0, "the launcher sends whole stages of K only"
    k_tiles = K // tr.kStageK
    base = (smem_base + 1023) & ~1023
    for bx in range(-(-M // tr.kBT)):
        for by in range(-(-N // tr.kBW)):
            t0, w0 = bx * tr.kBT, by * tr.kBW
            smem = np.full(base + tr.kStages * tr.kStageBytes, 0xFF, np.uint8)
            acc = {}
            for kt in range(k_tiles):        # (ordering: the int8 Hopper kernel's ring, emulated there)
                st = base + (kt % tr.kStages) * tr.kStageBytes
                assert st % 1024 == 0
                for dst, data in load_stage(p, tr, lk, st, kt, w0, t0):
                    smem[dst[:, None] + np.arange(16)] = data
                vals, xs = st, st + tr.kValBytes
                ms = smem[xs + tr.kXBytes:xs + tr.kXBytes + tr.kMetaBytes].view(np.uint32)
                for step in range(tr.kSteps):
                    sel = k["selector"](step, s8)
                    for wg in range(2):
                        a_addr, b_addr = k["a_addr"](vals, wg, step), k["b_addr"](xs, step, tr.kBT)
                        assert (a_addr - step * 32) % 1024 == 0 and (b_addr - (step % 2) * 64) % 1024 == 0
                        A = wgmma_operand(smem, desc_sw128(a_addr), 64).astype(np.uint8)
                        B = wgmma_operand(smem, desc_sw128(b_addr) + 2 * 0, 128).astype(np.uint8)
                        B = np.concatenate([B, wgmma_operand(smem, desc_sw128(b_addr + 32), 128).astype(np.uint8)], 1)
                        for w in range(4):
                            rb = wg * 4 + w
                            if w0 + 16 * rb >= N:
                                continue             # rows never stored (their metadata is still loaded)
                            e = ms[k["meta_index"](rb, tr.kMetaBlocks, step, s8)].astype(np.int64)
                            for j in range(16):
                                if t0 + 8 * j >= M:
                                    continue
                                d = warp_mma(A[16 * w:16 * w + 16], B[8 * j:8 * j + 8], e, sel, s8, x.dtype)
                                key = (wg, w, j)
                                acc[key] = acc.get(key, 0) + d
            # Epilogue: acc[4j + i] = (W row 16w + g + 8 (i // 2), token 8j + 2c + i % 2).
            for (wg, w, j), d in acc.items():
                for lane in range(32):
                    g, c = lane >> 2, lane & 3
                    for i in range(4):
                        n = w0 + wg * 64 + w * 16 + g + (i // 2) * 8
                        m = t0 + 2 * c + 8 * j + (i % 2)
                        if n < N and m < M:
                            out[m, n] = d[lane, i]
                            count[m, n] += 1
    return out, count


CASES = [  # M, N, stages of K (128 fp16 / bf16 columns, 256 int8)
    (130, 16, 1),                 # a second token CTA with 2 tokens
    (20, 144, 5),                 # a second W CTA of 16 clamped-tail rows; 5 stages on 4 slots
]


@pytest.mark.parametrize("M,N,K", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int8], ids=["f16", "bf16", "s8"])
def test_wgmma_sp_kernel_emulated(dtype, M, N, K):
    K *= 256 if dtype == torch.int8 else 128
    w, x = sparse_weight(N, K, dtype), activations(M, K, dtype)
    values, meta = compress(w)
    out, count = emulate(x, values, meta)
    assert (count == 1).all(), "every output stored exactly once"
    if dtype == torch.int8:
        assert np.array_equal(out.astype(np.int64), (x.long() @ w.long().t()).numpy())
    else:
        ref = x.double() @ w.double().t()
        assert np.allclose(out, ref.numpy(), rtol=1e-12, atol=1e-9)


MUTANTS = {
    "x_rows_interleaved": dict(x_off=lambda r, c, block_rows=128: r * 256 + (((c & 8) | ((c ^ r) & 7)) << 4)),
    "a_step_64": dict(a_addr=lambda vals, wg, step: vals + wg * 64 * 128 + step * 64),
    "b_no_block": dict(b_addr=lambda xs, step, kBT: xs + step * 64),
    "meta_own_lane": dict(meta_index=lambda rb, kmb, step, s8: (rb * kmb + step // 2) * 32 + LANE),
    "meta_block_per_step": dict(meta_index=lambda rb, kmb, step, s8: (rb * kmb + step) * 32 + LANE),
}


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_mutant_kernel_fails(mutant):
    dtype = torch.float16
    M, N, K = 9, 32, 256
    w, x = sparse_weight(N, K, dtype), activations(M, K, dtype)
    values, meta = compress(w)
    with pytest.raises((AssertionError, ValueError, IndexError)):
        out, count = emulate(x, values, meta, k=dict(KERNEL, **MUTANTS[mutant]))
        assert np.allclose(out, (x.double() @ w.double().t()).numpy(), rtol=1e-12, atol=1e-9)


MIRRORED = {
    KERNEL_SRC: [
        "return (c >> 3) * (kBlockRows * 128) + r * 128 + (((c & 7) ^ (r & 7)) << 4);",
        "e[step] = Tr::kS8 ? ms[(rb * Tr::kMetaBlocks + step) * 32 + lane]",
        ": ms[(rb * Tr::kMetaBlocks + step / 2) * 32 + ((lane & ~3) | (2 * (step & 1)) | (lane & 1))];",
        "WgmmaSp<T, 0>::run(acc, da, db, e[step]);",
        "const int64_t k_tiles = p.K / Tr::kStageK; // the launcher sends only K % kStageK == 0",
        "const uint64_t da = wgmma::desc_sw128(vals + wg * 64 * 128 + step * 32);",
        "const uint64_t db = wgmma::desc_sw128(xs + (step / 2) * (Tr::kBT * 128) + (step % 2) * 64);",
        "const int rb = wg * 4 + w; // this warp's 16-row metadata block",
        "const int64_t n0 = w0 + wg * 64 + w * 16 + g, m0 = t0 + 2 * c;",
        "const int64_t n = n0 + (i / 2) * 8, m = m0 + 8 * j + (i % 2);",
    ],
    TRAITS_SRC: ["template <typename T> using HopperM = Traits<T, 128, 128, 2, 4, 4>;",
                 "return K % HopperM<T>::kStageK == 0 && HopperM<T>::kSmemBytes + 1024 <= smem_optin;"],
}


def test_kernel_source_matches_mirror():
    assert_mirrored(MIRRORED.items())
