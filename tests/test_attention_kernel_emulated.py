"""The CUDA prefill flash-attention kernel (csrc/attention/flash_fwd_kernel.cuh) emulated on CPU.

The kernel has never run on a GPU. This file re-implements its index math and control flow in
Python (NumPy, float64) and checks that they compute what fastllm.ref.attention defines.
The smem tile class, the PTX models (ldmatrix, mma.m16n8k16 fragments) and the thread-by-thread
mirror of common/mask_range.cuh are imported from tests/test_decode_kernel_emulated.py (the
decode kernel reuses attention::SmemTile and the same PTX wrappers).

Part 1, the fragment / shared-memory path, for every compiled head dim (64, 80, 96, 128, 256)
with the tile configs parsed from flash_traits.h (so a retuned config is what gets tested):
load_tile_async's cp.async stores of the Q tile and of the double-buffered K / V stages into
SmemTile's swizzled layout (both of its thread -> (row, chunk) splits: the row-owned one and
the flattened one that D=80's K/V tiles take, with the `i < kTotal` guard), the zero-filled
rows past the sequence end, the prefetch into the other stage walking the key tiles from the
last down, each lane's ldmatrix address for Q (A of Q K^T; re-read per k-step where
kQInRegs is false), K (B of Q K^T) and V (B of P V, .trans), the mma.m16n8k16 fragment
layouts of common/ptx.cuh, the S -> P register repack, and the O epilogue: the fragment
stores into the warp's own 16 rows of the Q tile and the 16-byte coalesced stores to out (rows
>= Sq never stored). Inputs are fp16 values with 2^-6 <= |x| < 8, so every product is a
multiple of 2^-32 below 2^6 and every sum of <= 256 of them is exact in float64 in any order:
the emulated S and O tiles are compared with the matmuls for EQUALITY. Also checked: the smem
regions are written exactly as often as the kernel loads them (Q once, each stage once per tile
it receives), every ldmatrix reads inside the tile/stage it means to, the 8 rows of each
ldmatrix 8x8 matrix fall in 8 distinct 16-byte bank groups, the O fragment stores hit 32
distinct banks (the header's claim), every cp.async reads inside the global rows it should, and
no warp's O staging overwrites Q rows another warp reads (the epilogue has only __syncwarp).

Part 2, the algorithm, CTA by CTA: FlashFwdParams as _attention_cuda.py + flash_fwd_launcher.cu
build them (strides, zero strides of broadcast masks, window normalisation, varlen window
clamp, the Skv == 0 fill kernel), global memory addressed through those strides, then per CTA:
the reversed m_block, varlen offsets from cu_seqlens, the m0 >= Sq exit, the key range
[n_lo, n_hi) from causal (bottom-right, offset = Skv - Sq), window and, with a mask, the
mask_key_range scan (thread by thread, its 16-byte little-endian word path and byte path), the
early exit (out 0, lse -inf), the tile walk from the last tile down, the need_mask condition,
the per-element mask (mask bytes read only for rows < Sq and keys < Skv), the online softmax
in the log2 domain with per-quad-thread partial sums, and the epilogue (1 / l, lse). Compared
in float64 with fastllm.ref.attention at 1e-9 on random small cases: causal and not, Sq < Skv,
Sq > Skv (first rows see nothing), GQA, windows, softcap, padding masks with fully masked rows,
broadcast (stride-0) and unaligned masks, masks leaving a middle range of keys (the scan
narrows the loop), varlen batches with empty sequences, Skv == 0. Independently of the values,
every skipped tile, every early exit and every need_mask == false tile is checked against the
reference's allowed-key matrix (nothing skipped is allowed; an unmasked tile is fully allowed),
every out / lse element is written exactly once and every (b, h, m_block) runs once.
Integer expressions that involve the window are evaluated with int32 wrap-around, as the
kernel's `int`s: that is how this file found the one kernel bug it documents
(test_varlen_huge_window_int_overflow: a varlen window within |Skv - Sq| of INT_MAX, e.g. any
window >= 2^31, which the launcher used to clamp to INT_MAX, overflowed `m0 + offset - p.window
+ 1` / `pos - p.window` when a sequence has Sq > Skv; the launcher now clamps to INT_MAX / 2).

What this does NOT prove: that the .cuh says what is mirrored here (by hand;
test_kernel_source_matches_mirror only checks that the transcribed lines are still in the
source verbatim, so an edit of them fails here until the mirror is updated); the hardware's
ldmatrix / mma semantics (taken from the PTX ISA via common/ptx.cuh's comments); races, the
cp.async group counting (wait<1> / wait<0>) and barrier placement beyond the disjointness
checks above; fp32 / fp16 / bf16 rounding (pack2 of P and of O), ex2.approx, tanhf, log2f
(everything here is float64: Part 2 finds logic errors, not precision ones); register
pressure, spills, shared-memory opt-in, launch errors, speed. The CUDA kernel stays UNVERIFIED
until a GPU runs tests/test_attention_cuda.py. The negative tests at the end show that a wrong
swizzle / lane mapping / repack / epilogue offset and wrong causal bounds, need_mask shortcuts,
mask range, rescaling, lse or varlen offsets make these checks fail.
"""
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fastllm.ops._attention_cuda import (HEAD_DIMS, _mask_view, _strides, cuda_supports,
                                         cuda_varlen_supports)
from fastllm.ref.attention import SCORE_FLOOR, allowed_keys
from fastllm.ref.attention import flash_attention as ref_attention
from fastllm.ref.attention import flash_attention_varlen as ref_varlen
from helpers import assert_mirrored
from test_decode_kernel_emulated import (C4, G, LANE, Smem, SmemTile, chance, flat, fragment_values, half,
                                         ldmatrix_x4, mask_key_range, mma_16816, rint, D_COL, D_ROW)

CSRC = Path(__file__).resolve().parents[1] / "csrc"
KERNEL_SRC = CSRC / "attention" / "flash_fwd_kernel.cuh"
TRAITS_SRC = CSRC / "attention" / "flash_traits.h"
LAUNCHER_SRC = CSRC / "attention" / "flash_fwd_launcher.cu"
MASK_RANGE_SRC = CSRC / "common" / "mask_range.cuh"
GLUE_SRC = CSRC.parent / "python" / "fastllm" / "ops" / "_attention_cuda.py"
LOG2E = 1.4426950408889634   # flash_fwd_launcher.cu kLog2e
LN2 = 0.69314718055994531    # flash_fwd_kernel.cuh kLn2
INT_MAX = 2 ** 31 - 1


def i32(x):
    """C++ int arithmetic (two's complement wrap-around, what nvcc emits for the kernel's ints)."""
    return (np.asarray(x, dtype=np.int64) + 2 ** 31) % 2 ** 32 - 2 ** 31


# ----------------------------------------------------------------------------------------------
# Tile configs: flash_traits.h, parsed.

class FlashTile:
    """FlashFwdTile<kHeadDim, kBlockM, kBlockN, kNWarps, kQInRegs, kMinBlocksPerSM> 1:1."""

    def __init__(self, D, bm, bn, nwarps, q_in_regs, min_blocks):
        self.kHeadDim, self.kBlockM, self.kBlockN, self.kNWarps = D, bm, bn, nwarps
        self.kQInRegs, self.kMinBlocksPerSM = q_in_regs, min_blocks
        self.kThreads = 32 * nwarps
        self.kStages = 2
        self.kChunks = D // 8
        self.kSmemQElems = bm * D
        self.kSmemKVElems = bn * D
        self.kSmemBytes = (self.kSmemQElems + 2 * self.kStages * self.kSmemKVElems) * 2


def parse_traits():
    text = TRAITS_SRC.read_text()
    found = re.findall(r"struct FlashFwdTraits<(\d+)>\s*:\s*FlashFwdTile<(\d+),\s*(\d+),\s*(\d+),\s*(\d+),"
                       r"\s*(true|false)(?:,\s*(\d+))?>", text)
    cfgs = {}
    for key, D, bm, bn, nw, qreg, minb in found:
        assert key == D, f"FlashFwdTraits<{key}> derives from FlashFwdTile<{D}, ...>"
        cfgs[int(D)] = FlashTile(int(D), int(bm), int(bn), int(nw), qreg == "true", int(minb or 1))
    return cfgs


CFG = parse_traits()


def test_traits_match_launcher_and_static_asserts():
    launcher = LAUNCHER_SRC.read_text()
    dispatched = {int(d) for d in re.findall(r"case (\d+): return run_flash_fwd_sm80<T, \1>", launcher)}
    assert set(CFG) == dispatched == set(HEAD_DIMS) == {64, 80, 96, 128, 256}
    for D, t in CFG.items():                                     # FlashFwdTile's static_asserts
        assert t.kBlockM == 16 * t.kNWarps and D % 16 == 0 and t.kBlockN % 16 == 0, D
        assert t.kSmemBytes <= 99 * 1024, D
        assert t.kBlockM % 8 == 0 and t.kBlockN % 8 == 0        # SmemTile's static_assert
        for dt in ("fp16", "bf16"):
            assert (CSRC / "attention" / f"flash_fwd_hdim{D}_{dt}.cu").exists()


# ----------------------------------------------------------------------------------------------
# Part 1: shared memory, ldmatrix, mma, epilogue (lane by lane).

def cp_async_16(smem, dst_byte, gmem, src, valid, reads):
    """ptx.cuh cp_async_16: 16 bytes (8 elements) from gmem[src:] or 16 zero bytes (src-size 0)."""
    if valid:
        assert 0 <= src and src + 8 <= len(gmem), (src, len(gmem))   # inside the global rows
        reads.append(src)
        smem.cp_async_16(dst_byte, gmem[src:src + 8])
    else:
        smem.cp_async_16(dst_byte, np.zeros(8))


def load_tile_async(smem, smem_base, kRows, kChunks, kThreads, gmem, g0, row_stride, rows_valid, reads):
    """flash_fwd_kernel.cuh load_tile_async, thread by thread (both work splits). Returns the
    split taken ("row" or "flat")."""
    Tile = SmemTile(kRows, kChunks)
    kTPR = kThreads // kRows if kThreads >= kRows else 0
    if kThreads % kRows == 0 and kChunks % kTPR == 0:
        for tid in range(kThreads):
            row, cb = Tile.fill_row(kTPR, tid // kTPR), tid % kTPR
            valid = row < rows_valid
            src = g0 + row * row_stride + cb * 8 if valid else g0
            for k in range(kChunks // kTPR):
                cp_async_16(smem, smem_base + Tile.offset(row, cb + k * kTPR) * 2, gmem,
                            src + k * kTPR * 8 if valid else src, valid, reads)
        return "row"
    kTotal = kRows * kChunks
    for i0 in range(0, kTotal, kThreads):
        for tid in range(kThreads):
            i = i0 + tid
            if kTotal % kThreads == 0 or i < kTotal:
                row, chunk = Tile.storage_row(i), Tile.storage_chunk(i)
                valid = row < rows_valid
                src = g0 + row * row_stride + chunk * 8 if valid else g0
                cp_async_16(smem, smem_base + Tile.offset(row, chunk) * 2, gmem, src, valid, reads)
    return "flat"


def global_rows(values, row_stride):
    """Rows of `values` (n, D) laid out with `row_stride` elements (the tail of the last row is
    not allocated, so any read past it fails the bounds check)."""
    n, D = values.shape
    g = np.full((n - 1) * row_stride + D, np.nan)
    for r in range(n):
        g[r * row_stride:r * row_stride + D] = values[r]
    return g


def check_fragment_path(D, mutant=None, banks=True):
    """One CTA of flash_fwd_kernel's smem / fragment path with n_tiles = 3 key tiles (the highest
    one partial), a partial Q tile, non-contiguous global rows; asserts everything Part 1 of the
    module docstring lists. mutant: a deliberately wrong variant (the negative tests); banks=False
    skips the bank-conflict checks (so a negative test must be caught by the values)."""
    t = CFG[D]
    kD, kBM, kBN, kThreads, kChunks, kNWarps = D, t.kBlockM, t.kBlockN, t.kThreads, t.kChunks, t.kNWarps
    kNT, kDT, kKS = kBN // 8, kD // 8, kD // 16
    kKVStageBytes = t.kSmemKVElems * 2
    QTile = SmemTile(kBM, kChunks, "no_xor" if mutant == "no_xor" else None)
    KVTile = SmemTile(kBN, kChunks, "no_xor" if mutant == "no_xor" else None)
    smem = Smem(t.kSmemBytes)
    sQ = 0
    sK = sQ + t.kSmemQElems * 2
    sV = sK + t.kStages * kKVStageBytes
    regions = {"Q": (sQ, sK), "K0": (sK, sK + kKVStageBytes), "K1": (sK + kKVStageBytes, sV),
               "V0": (sV, sV + kKVStageBytes), "V1": (sV + kKVStageBytes, t.kSmemBytes)}

    n_tiles = 3
    Sq, Skv = kBM - 3, n_tiles * kBN - 5                 # partial Q tile, partial highest key tile
    q_rs, k_rs, v_rs = kD + 8, kD + 16, 2 * kD           # row strides (elements, multiples of 8)
    Q, K, V = fragment_values(Sq, kD), fragment_values(Skv, kD), fragment_values(Skv, kD)
    gQ, gK, gV = global_rows(Q, q_rs), global_rows(K, k_rs), global_rows(V, v_rs)
    Qt = np.zeros((kBM, kD))
    Qt[:Sq] = Q

    def kv_tile(X, nb):                                  # logical tile, rows >= Skv zero
        T = np.zeros((kBN, kD))
        n = min(kBN, Skv - nb * kBN)
        T[:n] = X[nb * kBN:nb * kBN + n]
        return T

    reads = []
    nb_last = n_tiles - 1
    splits = {load_tile_async(smem, sQ, kBM, kChunks, kThreads, gQ, 0, q_rs, Sq - 0, reads)}
    splits.add(load_tile_async(smem, sK, kBN, kChunks, kThreads, gK, nb_last * kBN * k_rs, k_rs,
                               Skv - nb_last * kBN, reads))
    load_tile_async(smem, sV, kBN, kChunks, kThreads, gV, nb_last * kBN * v_rs, v_rs, Skv - nb_last * kBN, reads)
    q_writes = smem.writes[sQ // 2:sK // 2].copy()
    assert (q_writes == 1).all()                         # the Q tile, each element once

    # Per-lane ldmatrix address parts.
    q_r, q_cl = LANE % 16, LANE // 16
    k_r, k_cl = (LANE // 16) * 8 + LANE % 8, (LANE // 8) % 2
    if mutant == "k_rows":                               # K addressed like Q
        k_r, k_cl = q_r, q_cl
    q_lane = sQ + QTile.lane_base(q_r)
    q_x = QTile.lane_xor(q_r, q_cl)
    k_lane = sK + KVTile.lane_base(k_r)
    k_x = KVTile.lane_xor(k_r, k_cl)
    v_lane = sV + KVTile.lane_base(q_r)
    v_x = KVTile.lane_xor(q_r, q_cl)

    q_read = [set() for _ in range(kNWarps)]             # smem elements each warp reads of Q

    def ldm(addrs, region, trans=False, warp=None):
        lo, hi = regions[region]
        assert (addrs >= lo).all() and (addrs + 16 <= hi).all(), region
        for j in range(4 if banks else 0):               # one 8x8 matrix = one smem phase
            assert len({(a // 16) % 8 for a in addrs[8 * j:8 * j + 8]}) == 8, (D, region, "bank conflict")
        if warp is not None:
            q_read[warp].update(int(e) for a in addrs for e in range(a // 2, a // 2 + 8))
        return ldmatrix_x4(smem, addrs, trans)

    q_frag = None
    if t.kQInRegs:
        q_frag = [[ldm(QTile.addr(q_lane, q_x, w * 16, kk * 2), "Q", warp=w) for kk in range(kKS)]
                  for w in range(kNWarps)]
    acc_o = [[np.zeros((32, 4)) for _ in range(kDT)] for _ in range(kNWarps)]
    want_o = np.zeros((kBM, kD))
    loads = {0: 1, 1: 0}
    for it in range(n_tiles):
        nb = nb_last - it
        stage = it & 1
        if it + 1 < n_tiles:                             # prefetch the next (lower) tile, other stage
            nn = nb - 1
            st = (stage ^ 1) * kKVStageBytes
            splits.add(load_tile_async(smem, sK + st, kBN, kChunks, kThreads, gK, nn * kBN * k_rs, k_rs,
                                       Skv - nn * kBN, reads))
            load_tile_async(smem, sV + st, kBN, kChunks, kThreads, gV, nn * kBN * v_rs, v_rs, Skv - nn * kBN, reads)
            loads[stage ^ 1] += 1
        Kt, Vt = kv_tile(K, nb), kv_tile(V, nb)
        P = fragment_values(kBM, kBN)                    # P values, fp16-exact
        for warp in range(kNWarps):
            # ---- S = Q K^T.
            s = [np.zeros((32, 4)) for _ in range(kNT)]
            k_stage = k_lane + stage * kKVStageBytes
            for kk in range(kKS):
                if t.kQInRegs:
                    a = q_frag[warp][kk]
                else:
                    a = ldm(QTile.addr(q_lane, q_x, warp * 16, kk * 2), "Q", warp=warp)
                for np_ in range(kBN // 16):
                    b = ldm(KVTile.addr(k_stage, k_x, np_ * 16, kk * 2), f"K{stage}")
                    s[2 * np_] = mma_16816(s[2 * np_], a, b[:, 0], b[:, 1])
                    s[2 * np_ + 1] = mma_16816(s[2 * np_ + 1], a, b[:, 2], b[:, 3])
            S = np.full((16, kBN), np.nan)               # s[nt][2r + j] of lane (g, c4) -> (row, key)
            for nt in range(kNT):
                S[D_ROW, 8 * nt + D_COL] = s[nt]
            assert np.array_equal(S, Qt[warp * 16:warp * 16 + 16] @ Kt.T), (D, it, warp, "S")

            # ---- O += P V, P in S's registers (the softmax leaves e in s[nt][e]), repacked.
            Pw = P[warp * 16:warp * 16 + 16]
            s = [Pw[D_ROW, 8 * nt + D_COL] for nt in range(kNT)]
            v_stage = v_lane + stage * kKVStageBytes
            for ks in range(kBN // 16):
                lo_, hi_ = s[2 * ks], s[2 * ks + 1]
                if mutant == "p_repack":                 # a[1] and a[2] swapped
                    a = np.stack([lo_[:, 0:2], hi_[:, 0:2], lo_[:, 2:4], hi_[:, 2:4]], 1)
                else:                                    # pack2(s[2ks][0], [1]), ([2], [3]), ...
                    a = np.stack([lo_[:, 0:2], lo_[:, 2:4], hi_[:, 0:2], hi_[:, 2:4]], 1)
                for dp in range(kD // 16):
                    b = ldm(KVTile.addr(v_stage, v_x, ks * 16, dp * 2), f"V{stage}", trans=mutant != "v_no_trans")
                    acc_o[warp][2 * dp] = mma_16816(acc_o[warp][2 * dp], a, b[:, 0], b[:, 1])
                    acc_o[warp][2 * dp + 1] = mma_16816(acc_o[warp][2 * dp + 1], a, b[:, 2], b[:, 3])
        want_o += P @ Vt
    assert loads == {0: (n_tiles + 1) // 2, 1: n_tiles // 2}
    for name, count in (("K0", loads[0]), ("V0", loads[0]), ("K1", loads[1]), ("V1", loads[1])):
        lo, hi = regions[name]
        assert (smem.writes[lo // 2:hi // 2] == count).all(), name   # every element, once per load
    assert (smem.writes[sQ // 2:sK // 2] == q_writes).all()          # Q never rewritten by the loads
    # Every global element read was a valid row's; every valid row element was read each load.
    assert not any(np.isnan(smem.data[lo // 2:hi // 2]).any() for lo, hi in regions.values())

    # ---- epilogue: O (here l = 1, inv = 1) staged in the warp's own rows of the Q tile, then
    # 16-byte coalesced stores. out: kBM rows of kD, NaN = never stored.
    out = np.full((kBM, kD), np.nan)
    out_writes = np.zeros((kBM, kD), dtype=np.int64)
    staged = [set() for _ in range(kNWarps)]
    for warp in range(kNWarps):
        epi_writes = {}
        for dt in range(kDT):
            for r in range(2):
                row = warp * 16 + G + 8 * r
                c = C4 if mutant == "o_offset" else 2 * C4
                el = sQ // 2 + QTile.offset(row, dt) + c
                assert not banks or len({(2 * e // 4) % 32 for e in el}) == 32, (D, "O fragment stores conflict")
                for lane in range(32):
                    for j in range(2):
                        smem.data[el[lane] + j] = acc_o[warp][dt][lane, 2 * r + j]
                        epi_writes[el[lane] + j] = epi_writes.get(el[lane] + j, 0) + 1
        assert set(epi_writes.values()) == {1} and len(epi_writes) == 16 * kD, (D, "O staging")
        staged[warp] = set(epi_writes)
        i = np.arange(16 * kChunks)                      # for (i = lane; i < 16 * kChunks; i += 32)
        kG = QTile.kGroup
        r, c = (i // kG) % 16, (i // (16 * kG)) * kG + i % kG
        for rr, cc in zip(r, c):
            row = warp * 16 + rr                         # warp_row0 + r - m0 (m0 = 0 here)
            if row < Sq:
                src = sQ // 2 + QTile.offset(warp * 16 + rr, cc)
                assert set(range(src, src + 8)) <= staged[warp]          # only its own staging
                out[row, cc * 8:cc * 8 + 8] = smem.data[src:src + 8]
                out_writes[row, cc * 8:cc * 8 + 8] += 1
    for w in range(kNWarps):                             # __syncwarp only: no cross-warp overlap
        for w2 in range(kNWarps):
            if w2 != w:
                assert not staged[w] & q_read[w2], (D, w, w2)
    assert (out_writes[:Sq] == 1).all() and (out_writes[Sq:] == 0).all()
    assert np.array_equal(out[:Sq], want_o[:Sq]), (D, "O")
    return splits


@pytest.mark.parametrize("D", HEAD_DIMS)
def test_fragment_path_exact(D):
    splits = check_fragment_path(D)
    if D == 80:                                          # the flattened split is exercised somewhere
        assert splits == {"row", "flat"}, splits


@pytest.mark.parametrize("D", HEAD_DIMS)
def test_epilogue_read_back_phases(D):
    """The 16-byte read-back of the O staging (8 lanes per smem phase) is conflict-free for every
    head dim (it walks the tile in storage order), covers each (row, chunk) of the warp's 16
    rows once, and writes whole 32-byte sectors of each output row per phase. The old row-order
    walk (2-way conflicts at D=96, 4-way at D=80) must fail this."""
    t = CFG[D]
    Tile = SmemTile(t.kBlockM, t.kChunks)
    kG = Tile.kGroup
    walks = {"storage": lambda i: ((i // kG) % 16, (i // (16 * kG)) * kG + i % kG),
             "row": lambda i: (i // t.kChunks, i % t.kChunks)}
    worst = {}
    for name, walk in walks.items():
        worst[name] = 1
        for warp in range(t.kNWarps):
            i = np.arange(16 * t.kChunks)
            r, c = walk(i)
            assert sorted(zip(r.tolist(), c.tolist())) == [(a, b) for a in range(16) for b in range(t.kChunks)]
            addr = 2 * Tile.offset(warp * 16 + r, c)
            for p0 in range(0, len(addr), 8):            # lanes 8j..8j+7 of one warp instruction
                groups = (addr[p0:p0 + 8] // 16) % 8
                worst[name] = max(worst[name], int(np.bincount(groups).max()))
                if name == "storage":                    # per row: whole 32-byte sectors
                    for row in set(r[p0:p0 + 8].tolist()):
                        cs = sorted(c[p0:p0 + 8][r[p0:p0 + 8] == row].tolist())
                        assert len(cs) % 2 == 0 and cs[0] % 2 == 0 and cs == list(range(cs[0], cs[0] + len(cs)))
    assert worst["storage"] == 1, (D, worst)
    assert worst["row"] == (1 if t.kChunks % 8 == 0 else (2 if t.kChunks % 4 == 0 else 4)), (D, worst)


# ----------------------------------------------------------------------------------------------
# Part 2: the algorithm, CTA by CTA (tiles held logically; their smem layout is Part 1's).

def mm(a, b):
    """a @ b in float64 without BLAS: on a 2-core machine NumPy's OpenBLAS threads and torch's
    contend and a 128 x 128 x 64 product can take milliseconds; einsum's own loop does not."""
    return np.einsum("ik,kj->ij", a, b, optimize=False)


def gather(arr, idx):
    idx = np.asarray(idx)
    assert idx.size == 0 or (idx.min() >= 0 and idx.max() < len(arr)), "read outside the tensor"
    return arr[idx]


def set_common(p, batch, heads_q, heads_kv, seqlen_q, seqlen_kv, scale, window, softcap, causal):
    """flash_fwd_launcher.cu set_common."""
    p.batch, p.heads_q, p.heads_kv, p.group = batch, heads_q, heads_kv, heads_q // heads_kv
    p.seqlen_q, p.seqlen_kv, p.causal = seqlen_q, seqlen_kv, causal
    p.window = window if (window > 0 and window < seqlen_kv) else 0
    p.has_softcap = softcap > 0.0
    p.scale_log2 = scale * LOG2E
    p.softcap_in = scale / softcap if p.has_softcap else 0.0
    p.softcap_out = softcap * LOG2E if p.has_softcap else 0.0
    p.scale, p.softcap = scale, softcap


def dense_params(q, k, v, mask, causal, scale, window, softcap, sinks=None, bias=None):
    """FlashFwdParams as flash_attention_cuda + flash_attention_fwd build them."""
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    p = SimpleNamespace(q=flat(q), k=flat(k), v=flat(v), cu_q=None, cu_k=None, mask=None, mask_align=0,
                        sinks=None if sinks is None else sinks.double().numpy(), bias=None)
    if bias is not None:
        b = torch.broadcast_to(bias, (B, Hq, Sq, Skv))
        p.bias = flat(b)
        (p.bias_batch_stride, p.bias_head_stride, p.bias_row_stride, p.bias_col_stride) = _strides(b, 4)
    if mask is not None:
        m = _mask_view(mask, B, Sq, Skv)
        p.mask = flat(m).view(np.uint8)
        p.mask_align = m.data_ptr() % 16
        (p.mask_batch_stride, p.mask_row_stride, p.mask_col_stride) = tuple(
            m.stride(i) if m.size(i) > 1 else 0 for i in range(3))
    else:
        p.mask_batch_stride = p.mask_row_stride = p.mask_col_stride = 0
    (p.q_batch_stride, p.q_head_stride, p.q_row_stride) = _strides(q)
    (p.k_batch_stride, p.k_head_stride, p.k_row_stride) = _strides(k)
    (p.v_batch_stride, p.v_head_stride, p.v_row_stride) = _strides(v)
    p.out_batch_stride = Sq * Hq * D
    p.lse_batch_stride = Hq * Sq
    p.lse_head_stride = Sq
    set_common(p, B, Hq, Hkv, Sq, Skv, scale, window, softcap, causal)
    allowed = allowed_keys(Sq, Skv, causal=causal, window=window if window > 0 else None, mask=mask)
    allowed = torch.broadcast_to(allowed, (B, 1, Sq, Skv))[:, 0].numpy()
    p.allowed = lambda b: allowed[b]
    p.out_len, p.lse_len = B * Sq * Hq * D, B * Hq * Sq
    return p


def varlen_params(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window, softcap, window_cap=INT_MAX // 2,
                  sinks=None):
    """FlashFwdParams as flash_attention_varlen_cuda + flash_attention_varlen_fwd build them."""
    total_q, Hq, D = q.shape
    p = SimpleNamespace(q=flat(q), k=flat(k), v=flat(v), cu_q=cu_q.numpy().astype(np.int64),
                        cu_k=cu_k.numpy().astype(np.int64), mask=None, mask_align=0,
                        mask_batch_stride=0, mask_row_stride=0, mask_col_stride=0,
                        sinks=None if sinks is None else sinks.double().numpy(), bias=None)
    hs = [tuple(t.stride(i) if t.size(i) > 1 else 0 for i in (1, 0)) for t in (q, k, v)]  # (head, row)
    p.q_batch_stride, p.q_head_stride, p.q_row_stride = 0, *hs[0]
    p.k_batch_stride, p.k_head_stride, p.k_row_stride = 0, *hs[1]
    p.v_batch_stride, p.v_head_stride, p.v_row_stride = 0, *hs[2]
    p.out_batch_stride = 0
    p.lse_batch_stride = 0
    p.lse_head_stride = total_q
    p.total_q, p.total_kv = total_q, k.shape[0]
    set_common(p, cu_q.shape[0] - 1, Hq, k.shape[1], max_q, max_k, scale, 0, softcap, causal)
    p.window = (window if window < window_cap else window_cap) if window > 0 else 0

    def allowed(b):
        q0, k0 = min(max(int(p.cu_q[b]), 0), total_q), min(max(int(p.cu_k[b]), 0), k.shape[0])
        Sq = min(max(int(p.cu_q[b + 1]), q0), total_q) - q0
        Skv = min(max(int(p.cu_k[b + 1]), k0), k.shape[0]) - k0
        return allowed_keys(Sq, Skv, causal=causal, window=window if window > 0 else None)[0, 0].numpy()
    p.allowed = allowed
    p.out_len, p.lse_len = total_q * Hq * D, Hq * total_q
    return p


def write_once(arr, idx, values):
    idx = np.asarray(idx)
    assert idx.size == 0 or (idx.min() >= 0 and idx.max() < len(arr)), "write outside the output"
    assert np.isnan(arr[idx]).all(), "an element written twice"
    arr[idx] = values


def cta(p, t, bx, head, batch, grid_x, ws, stats, mutant=None):
    """One CTA of flash_fwd_kernel (blockIdx = (bx, head, batch)), section by section. Each warp's
    16 rows are rows warp_row0 + g + 8r of the lanes (g, c4); here all kBlockM rows of the CTA
    are held at once (warps never exchange data in this kernel): row m0 + i of the arrays is
    warp i // 16's row i % 16, key n0 + 8 nt + 2 c4 + j its s[nt][2r + j]; row_sum keeps the
    4 quad threads' partial sums apart. ws: flat out / lse (NaN = never written)."""
    kD, kBM, kBN, kThreads = t.kHeadDim, t.kBlockM, t.kBlockN, t.kThreads
    kNT, kChunks = kBN // 8, t.kChunks
    m_block = grid_x - 1 - bx
    ws.m_blocks.append((batch, head, m_block))
    kv_head = head // p.group
    Sq, Skv = p.seqlen_q, p.seqlen_kv
    q_start = k_start = 0
    if p.cu_q is not None:
        q_start = min(max(int(p.cu_q[batch]), 0), p.total_q)
        Sq = min(max(int(p.cu_q[batch + 1]), q_start), p.total_q) - q_start
        k_start = min(max(int(p.cu_k[batch]), 0), p.total_kv)
        Skv = min(max(int(p.cu_k[batch + 1]), k_start), p.total_kv) - k_start
        if mutant == "varlen_no_clamp":
            q_start, k_start = int(p.cu_q[batch]), int(p.cu_k[batch])
            Sq, Skv = int(p.cu_q[batch + 1]) - q_start, int(p.cu_k[batch + 1]) - k_start
        if mutant == "varlen_k_start":
            k_start = 0
    offset = Skv - Sq
    if mutant == "causal_top_left":
        offset = 0
    m0 = m_block * kBM
    if m0 >= Sq:
        stats["beyond_sq"] += 1
        return
    stats["ctas"] += 1
    out_base = batch * p.out_batch_stride + (q_start * p.heads_q + head) * kD
    lse_base = batch * p.lse_batch_stride + head * p.lse_head_stride + q_start
    out_row_stride = p.heads_q * kD
    allowed = p.allowed(batch)[m0:m0 + kBM]              # reference's allowed keys of the rows < Sq

    # ---- keys any row of this CTA can see: [n_lo, n_hi).
    row_last = min(m0 + kBM, Sq) - 1
    n_lo, n_hi = 0, Skv
    if p.causal:
        n_hi = min(Skv, row_last + offset + 1)
    if p.window > 0:
        n_lo = max(0, int(i32(m0 + offset - p.window + 1)))
    if p.mask is not None:
        key = (batch * p.mask_batch_stride + m0 * p.mask_row_stride, row_last - m0 + 1, Skv)
        stats["mask_vec_path"] += (p.mask_col_stride == 1 and (p.mask_align + key[0]) % 16 == 0
                                   and (key[1] <= 1 or p.mask_row_stride % 16 == 0) and Skv >= 16)
        if key not in ws.mask_ranges:
            ws.mask_ranges[key] = mask_key_range(p.mask, key[0], p.mask_align, p.mask_row_stride,
                                                 p.mask_col_stride, key[1], Skv, kThreads)
        first, last = ws.mask_ranges[key]
        if mutant == "mask_range_last":
            last -= 1
        stats["mask_narrowed"] += first > n_lo or last < n_hi
        n_lo = max(n_lo, first)
        n_hi = min(n_hi, last)
    if n_hi <= n_lo:                                     # out = 0, lse = -inf
        stats["early_exits"] += 1
        assert not allowed.any(), "early exit of a CTA with an allowed key"
        i = np.arange(kBM * kChunks)
        r, c = i // kChunks, i % kChunks
        ok = m0 + r < Sq
        idx = (out_base + (m0 + r[ok]) * out_row_stride + c[ok] * 8)[:, None] + np.arange(8)
        write_once(ws.out, idx, 0.0)
        r = np.arange(kBM)
        lse_empty = p.sinks[head] if p.sinks is not None else -np.inf
        write_once(ws.lse, lse_base + m0 + r[m0 + r < Sq], 0.0 if mutant == "early_exit_lse" else lse_empty)
        return
    nb_first = n_lo // kBN
    nb_last = (n_hi + kBN - 1) // kBN - 1
    n_tiles = nb_last - nb_first + 1
    assert not allowed[:, :nb_first * kBN].any() and not allowed[:, (nb_last + 1) * kBN:].any(), \
        "a skipped key tile holds an allowed key"
    stats["skipped_tiles"] += (Skv + kBN - 1) // kBN - n_tiles
    stats["n_lo_positive"] += n_lo > 0

    gQ = batch * p.q_batch_stride + head * p.q_head_stride + (q_start + m0) * p.q_row_stride
    gK = batch * p.k_batch_stride + kv_head * p.k_head_stride + k_start * p.k_row_stride
    gV = batch * p.v_batch_stride + kv_head * p.v_head_stride + k_start * p.v_row_stride
    d = np.arange(kD)

    def load_tile(arr, g0, row_stride, rows_valid, rows):
        """load_tile_async's result: rows < rows_valid from global, the rest zero."""
        T = np.zeros((rows, kD))
        n = max(0, min(rows, rows_valid))
        T[:n] = gather(arr, g0 + (np.arange(n) * row_stride)[:, None] + d)
        return T

    Qt = load_tile(p.q, gQ, p.q_row_stride, Sq - m0, kBM)
    row_max = np.full(kBM, -np.inf)
    row_sum = np.zeros((kBM, 4))
    acc_o = np.zeros((kBM, kD))
    kBias = p.bias is not None                           # the bias kernel
    mult = 1.0 if p.has_softcap or kBias else p.scale_log2
    rows = m0 + np.arange(kBM)                           # warp_row0 + g + 8 r, warp by warp
    for it in range(n_tiles):
        nb = nb_last - it
        Kt = load_tile(p.k, gK + nb * kBN * p.k_row_stride, p.k_row_stride, Skv - nb * kBN, kBN)
        Vt = load_tile(p.v, gV + nb * kBN * p.v_row_stride, p.v_row_stride, Skv - nb * kBN, kBN)
        s = mm(Qt, Kt.T)
        n0 = nb * kBN
        if kBias:                                        # bias_scores + add_bias_log2
            sc = p.softcap_in if p.has_softcap else p.scale
            s = np.tanh(s * sc) * p.softcap if p.has_softcap else s * sc
            col = n0 + np.arange(kBN)
            read = (rows < Sq)[:, None] & (col < Skv)[None, :]
            idx = (batch * p.bias_batch_stride + head * p.bias_head_stride + rows * p.bias_row_stride)[:, None] \
                + col[None, :] * p.bias_col_stride
            s = s + np.where(read, gather(p.bias, np.where(read, idx, 0)), 0.0)
            s = np.where(s == -np.inf, s, np.maximum(s, SCORE_FLOOR)) * LOG2E   # (float64: the floor's
            # fp32 overflow cannot show here; tests/simt/mutations.py drops it on the real kernel)
        elif p.has_softcap:
            s = np.tanh(s * p.softcap_in) * p.softcap_out
        if mutant == "need_mask_causal":                 # the diagonal judged by the last row
            causal_term = p.causal and n0 + kBN - 1 > row_last + offset
        else:
            causal_term = p.causal and n0 + kBN - 1 > m0 + offset
        if mutant == "need_mask_window":                 # the window edge judged by the first row
            window_term = p.window > 0 and n0 <= i32(m0 + offset - p.window)
        else:
            window_term = p.window > 0 and n0 <= i32(m0 + kBM - 1 + offset - p.window)
        need_mask = p.mask is not None or n0 + kBN > Skv or causal_term or window_term
        stats["masked_tiles" if need_mask else "unmasked_tiles"] += 1
        col = n0 + np.arange(kBN)
        if not need_mask:                                # the shortcut is only taken for full tiles
            assert allowed[:, col].all(), "an unmasked tile holds a key that must be masked"
        else:
            pos = rows + offset
            ok = np.broadcast_to(col[None, :] < Skv, (kBM, kBN))
            if p.causal:
                ok = ok & ((col[None, :] < pos[:, None]) if mutant == "causal_diag" else (col[None, :] <= pos[:, None]))
            if p.window > 0:
                ok = ok & (col[None, :] > i32(pos - p.window)[:, None])
            if p.mask is not None:
                read = ok & (rows < Sq)[:, None]          # mrow != nullptr && mrow[col * col_stride]
                mrow = batch * p.mask_batch_stride + rows * p.mask_row_stride
                idx = mrow[:, None] + col[None, :] * p.mask_col_stride
                ok = read & (gather(p.mask, np.where(read, idx, 0)) != 0)
                stats["mask_bytes_read"] += int(read.sum())
            s = np.where(ok, s, -np.inf)

        # ---- online softmax (the quad's max over its 2 * kNT * 4 = kBN keys: the row max).
        mx = np.maximum(row_max, s.max(1))
        m_scaled = np.where(mx == -np.inf, 0.0, mx * mult)
        corr = np.exp2(row_max * mult - m_scaled)
        if mutant == "no_rescale":
            corr = np.where(row_max == -np.inf, 0.0, 1.0)
        row_max = mx
        e = np.exp2(s * mult - m_scaled[:, None])
        row_sum = row_sum * corr[:, None] + e.reshape(kBM, kNT, 4, 2).sum((1, 3))   # per thread c4
        acc_o = acc_o * corr[:, None] + mm(e, Vt)        # P V (P not rounded to fp16 here)

    # ---- epilogue: l over the quad, lse, O / l, rows < Sq.
    lsum = row_sum.sum(1)
    pos_l = lsum > 0                                     # any_key
    z_nat = p.sinks[head] if p.sinks is not None else -np.inf
    m = np.where(pos_l, row_max * mult, -np.inf)
    m, lsum, alpha = fold_sink(m, lsum, z_nat * LOG2E, mutant)
    inv = np.where(pos_l, alpha / np.where(pos_l, lsum, 1.0), 0.0)
    lse = np.where(pos_l, (m + np.log2(np.where(pos_l, lsum, 1.0))) * LN2, z_nat)
    if mutant == "lse_log2":
        lse = np.where(pos_l, m + np.log2(np.where(pos_l, lsum, 1.0)), z_nat)
    valid = rows < Sq
    write_once(ws.lse, lse_base + rows[valid], lse[valid])
    write_once(ws.out, (out_base + rows[valid] * out_row_stride)[:, None] + d, (acc_o * inv[:, None])[valid])


def fold_sink(m, l, z, mutant=None):
    """flash_fwd_kernel.cuh fold_sink on every row at once: (m, l, alpha) with the sink z (log2
    domain, one value for the CTA's head; -inf: none) folded into the rows' state."""
    if z == -np.inf:
        return m, l, np.ones_like(l)
    new_max = z > m
    with np.errstate(invalid="ignore", over="ignore"):
        alpha = np.where(new_max, np.exp2(m - z), 1.0)
        l = np.where(new_max, l * alpha + 1.0, l + np.exp2(z - m))
    if mutant == "sink_no_rescale":
        alpha = np.ones_like(alpha)
    return np.where(new_max, z, m), l, alpha


def emulate(p, D, stats, mutant=None):
    """flash_fwd_launcher.cu dispatch + run_flash_fwd_sm80's grid. Returns flat (out, lse)."""
    t = CFG[D]
    ws = SimpleNamespace(out=np.full(p.out_len, np.nan), lse=np.full(p.lse_len, np.nan), mask_ranges={},
                         m_blocks=[])
    if p.batch == 0 or p.heads_q == 0 or p.seqlen_q == 0:
        return ws.out, ws.lse                            # the launcher returns kOk, nothing written
    if p.seqlen_kv == 0 and p.cu_q is None:              # launch_no_keys
        stats["no_keys_fill"] += 1
        ws.out[:] = 0.0
        i = np.arange(p.lse_len)
        ws.lse[:] = p.sinks[(i // p.seqlen_q) % p.heads_q] if p.sinks is not None else -np.inf
        return ws.out, ws.lse
    grid_x = (p.seqlen_q + t.kBlockM - 1) // t.kBlockM
    for batch in range(p.batch):
        for head in range(p.heads_q):
            for bx in range(grid_x):
                cta(p, t, bx, head, batch, grid_x, ws, stats, mutant)
    assert sorted(ws.m_blocks) == [(b, h, m) for b in range(p.batch) for h in range(p.heads_q)
                                   for m in range(grid_x)]          # every m_block once
    return ws.out, ws.lse


def new_stats():
    return dict(ctas=0, beyond_sq=0, early_exits=0, mask_narrowed=0, skipped_tiles=0, n_lo_positive=0,
                masked_tiles=0, unmasked_tiles=0, mask_bytes_read=0, mask_vec_path=0, no_keys_fill=0,
                empty_rows=0)


def compare(out, lse, ref_out, ref_lse, row_dims):
    """Same -inf rows, those rows' outputs exactly 0, no NaN (every element written), the rest
    within 1e-9. row_dims: permutation taking lse's dims to out's row dims."""
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "an output element never written"
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty)
    assert (out[empty.permute(*row_dims)] == 0).all()
    torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(lse[~empty], ref_lse[~empty], rtol=1e-9, atol=1e-9)


def run_dense(q, k, v, mask, causal, scale, window, softcap, stats, mutant=None, sinks=None, bias=None):
    assert cuda_supports(q, k, v, mask, causal, scale, window, softcap, sinks, bias) is None
    B, Hq, Sq, D = q.shape
    ref_out, ref_lse = ref_attention(q.double(), k.double(), v.double(), causal=causal, scale=scale, mask=mask,
                                     window=window if window > 0 else None, softcap=softcap if softcap > 0 else None,
                                     sinks=sinks, bias=bias)
    p = dense_params(q, k, v, mask, causal, scale, window, softcap, sinks, bias)
    out, lse = emulate(p, D, stats, mutant)
    stats["empty_rows"] += int(torch.isneginf(ref_lse).sum())
    compare(torch.from_numpy(out.reshape(B, Sq, Hq, D)), torch.from_numpy(lse.reshape(B, Hq, Sq)),
            ref_out, ref_lse, (0, 2, 1))


def run_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window, softcap, stats, mutant=None,
               window_cap=INT_MAX // 2, wrapper_init=False, sinks=None):
    assert cuda_varlen_supports(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window, softcap, sinks) is None
    total_q, Hq, D = q.shape
    ref_out, ref_lse = ref_varlen(q.double(), k.double(), v.double(), cu_q, cu_k, causal=causal, scale=scale,
                                  window=window if window > 0 else None, softcap=softcap if softcap > 0 else None,
                                  sinks=sinks)
    p = varlen_params(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window, softcap, window_cap, sinks)
    out, lse = emulate(p, D, stats, mutant)
    if wrapper_init:  # flash_attention_varlen_cuda allocates out zeroed and lse -inf
        out[np.isnan(out)], lse[np.isnan(lse)] = 0.0, -np.inf
    stats["empty_rows"] += int(torch.isneginf(ref_lse).sum())
    compare(torch.from_numpy(out.reshape(total_q, Hq, D)), torch.from_numpy(lse.reshape(Hq, total_q)),
            ref_out, ref_lse, (1, 0))


# ---- random cases (torch's RNG: conftest seeds it per test and prints the seed).

def qkv(B, Hq, Hkv, Sq, Skv, D):
    """q (B, Hq, Sq, D), k, v (B, Hkv, Skv, D) fp16 in the layouts the op gets: transposed views of
    (B, S, H, D) buffers, contiguous, or a strided slice of a longer (StaticCache-like) buffer."""
    def one(H, S):
        kind = rint(0, 2)
        if kind == 0:
            return half(B, S, H, D).transpose(1, 2)
        if kind == 1:
            return half(B, H, S, D)
        return half(B, H, S + rint(1, 9), D)[:, :, :S]
    return one(Hq, Sq), one(Hkv, Skv), one(Hkv, Skv)


def random_mask(B, Sq, Skv, kBN, focus, full=False):
    """A bool mask (B or 1, 1, Sq or 1, Skv or 1): padding-like, sometimes broadcast, sometimes a
    strided slice at an odd byte offset (the mask scan's byte path). full: no broadcast dims."""
    shape = (B if full or chance(0.7) else 1, 1, Sq if full or chance(0.7) else 1,
             Skv if full or focus == "mask_middle" or chance(0.85) else 1)
    if chance(0.4):                                      # unaligned data pointer, odd row stride
        o = rint(1, 7)
        big = torch.rand(shape[0], 1, shape[2], shape[3] + o + rint(0, 3)) < 0.8
        mask = big[..., o:o + shape[3]]
    else:
        mask = torch.rand(shape) < 0.8
    if focus == "mask_middle":
        mask[:] = False
        a = rint(kBN, max(kBN, Skv // 2 - 1))
        b = rint(a + 1, max(a + 1, Skv - kBN))
        mask[..., a:b] = torch.rand(mask[..., a:b].shape) < 0.7
        mask[..., a] = True
    elif shape[3] > 1:
        for b in range(shape[0]):                        # left padding per sequence
            mask[b, ..., :rint(0, Skv // 3)] = False
    if shape[2] > 1 and (shape[3] > 1 or chance(0.3)):   # a fully masked row (not the only row:
        mask[0, 0, rint(0, shape[2] - 1)] = False        # a mask with none allowed is no_keys' job)
    return mask


FOCUS = ["causal", "full", "sq_lt_skv", "sq_gt_skv", "gqa", "window", "softcap", "mask", "mask_middle",
         "varlen", "no_keys"]
CASES_PER_FOCUS = 3


def random_dense_case(focus, D, i=0):
    t = CFG[D]
    kBM, kBN = t.kBlockM, t.kBlockN
    B, Hkv, group = rint(1, 2), rint(1, 2), rint(1, 2)
    Sq = rint(1, kBM + kBM // 2)
    Skv = rint(1, 3 * kBN)
    causal, window, softcap, mask = chance(0.5), 0, 0.0, None
    if focus == "causal":                                # 2 m-blocks, the first one skips tiles
        causal, Sq = True, rint(kBM + kBN, 2 * kBM)
        Skv = Sq + rint(0, 2 * kBN)
    elif focus == "full":
        causal, Skv = False, rint(kBN + 1, 4 * kBN)
    elif focus == "sq_lt_skv":
        causal, Sq, Skv = True, rint(1, kBM // 2), rint(kBM, kBM + 2 * kBN)
    elif focus == "sq_gt_skv":                           # Sq - Skv > kBM: a CTA sees no key at all
        causal, Sq = True, rint(kBM + 2, 2 * kBM)
        Skv = rint(0, Sq - kBM - 1)
    elif focus == "gqa":
        Hkv, group = rint(1, 2), rint(3, 4)
    elif focus == "window":                              # Skv - kBM >= kBN >= W: n_lo > 0 somewhere
        Sq, Skv = rint(kBM // 2, kBM + kBM // 2), rint(kBM + kBN, kBM + 3 * kBN)
        window = Skv + rint(0, 5) if i == 2 and chance(0.5) else rint(1, kBN)   # >= Skv: dropped
    elif focus == "softcap":
        softcap = float(torch.empty(()).uniform_(1.0, 10.0))
    elif focus == "mask_middle":
        Skv = rint(3 * kBN, 5 * kBN)
    elif focus == "no_keys":
        Skv = 0
    if focus in ("gqa", "softcap", "sq_gt_skv", "mask", "mask_middle"):   # random extras
        if chance(0.3):
            window = rint(1, 3 * kBN)
        if focus != "softcap" and chance(0.2):
            softcap = float(torch.empty(()).uniform_(1.0, 10.0))
    full = focus == "mask" and i == 0                    # one case where the mask alone decides (its
    if full:                                             # bytes are read, a row is fully masked)
        causal, window, Sq, Skv = False, 0, max(Sq, 2), max(Skv, kBN + 1)
    if focus == "mask_middle" and i == 0:                # likewise: causal / a window could hide
        causal, window = False, 0                        # the middle range from every row
    if focus in ("mask", "mask_middle") or (focus in ("gqa", "softcap", "sq_gt_skv") and Skv and chance(0.3)):
        mask = random_mask(B, Sq, Skv, kBN, focus, full)
    if focus == "no_keys" and chance(0.5):
        mask = torch.zeros(B, 1, Sq, 0, dtype=torch.bool)
    scale = D ** -0.5 if chance(0.5) else float(torch.empty(()).uniform_(0.02, 0.3))
    q, k, v = qkv(B, Hkv * group, Hkv, Sq, Skv, D)
    return q, k, v, mask, causal, scale, window, softcap


def random_varlen_case(D):
    t = CFG[D]
    kBM, kBN = t.kBlockM, t.kBlockN
    nseq = rint(2, 4)
    lq = [rint(0, kBM + kBM // 3) for _ in range(nseq)]
    lk = [rint(0, 3 * kBN) for _ in range(nseq)]
    lq[0] = max(lq[0], kBM + 1)                          # two m-blocks in one sequence
    if nseq > 1:
        lq[-1], lk[-1] = rint(0, 5), 0 if chance(0.5) else lk[-1]   # short / keyless sequences
    cu_q = torch.tensor([0] + list(np.cumsum(lq)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(np.cumsum(lk)), dtype=torch.int32)
    Hkv, group = rint(1, 2), rint(1, 3)
    Hq = Hkv * group
    tq, tk = int(cu_q[-1]), int(cu_k[-1])
    if chance(0.5):                                      # q / k / v views of one packed qkv buffer
        buf = half(max(tq, tk), Hq + 2 * Hkv, D)
        q, k, v = buf[:tq, :Hq], buf[:tk, Hq:Hq + Hkv], buf[:tk, Hq + Hkv:]
    else:
        q, k, v = half(tq, Hq, D), half(tk, Hkv, D), half(tk, Hkv, D)
    max_q, max_k = max(lq) + (rint(0, kBM) if chance(0.3) else 0), max(lk)
    causal = chance(0.6)
    window = rint(1, 2 * kBN) if chance(0.4) else 0
    softcap = float(torch.empty(()).uniform_(1.0, 10.0)) if chance(0.2) else 0.0
    scale = D ** -0.5 if chance(0.5) else float(torch.empty(()).uniform_(0.02, 0.3))
    return q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window, softcap


@pytest.mark.parametrize("focus", FOCUS)
def test_algorithm_matches_reference(focus):
    stats = new_stats()
    for i in range(CASES_PER_FOCUS):
        D = HEAD_DIMS[(FOCUS.index(focus) + i) % len(HEAD_DIMS)]          # every config in turn
        if focus == "varlen":
            run_varlen(*random_varlen_case(D), stats)
        else:
            run_dense(*random_dense_case(focus, D, i), stats)
    # The focus was actually exercised (not just drawn).
    if focus == "full":
        assert stats["unmasked_tiles"] > 0, stats        # the need_mask shortcut taken
    if focus == "causal":
        assert stats["skipped_tiles"] > 0 and stats["unmasked_tiles"] > 0, stats
    if focus == "sq_lt_skv":
        assert stats["masked_tiles"] > 0 and stats["unmasked_tiles"] > 0, stats
    if focus == "sq_gt_skv":
        assert stats["empty_rows"] > 0 and stats["early_exits"] + stats["no_keys_fill"] > 0, stats
    if focus == "window":
        assert stats["n_lo_positive"] > 0, stats
    if focus == "mask":
        assert stats["empty_rows"] > 0 and stats["mask_bytes_read"] > 0, stats
    if focus == "mask_middle":
        assert stats["mask_narrowed"] > 0 and stats["skipped_tiles"] > 0, stats
    if focus == "varlen":
        assert stats["beyond_sq"] > 0 and stats["ctas"] > 0, stats
    if focus == "no_keys":
        assert stats["no_keys_fill"] == CASES_PER_FOCUS, stats


@pytest.mark.parametrize("D", [64, 80, 96, 128])
def test_bias_and_sinks_match_reference(D):
    """The bias kernel's score path (natural units, bias through 4 strides, floor, log2 domain)
    and the sinks of the epilogue, the early exit and the no-keys fill, on random cases: every
    bias shape (full, per head, per key, per row, a transposed view), masking values (-inf rows,
    dtype-minimum rows: the floor), with masks / windows / softcap; then varlen sinks."""
    t = CFG[D]
    for i in range(4):
        B, Hkv, group = rint(1, 2), rint(1, 2), rint(1, 2)
        Hq, Sq = Hkv * group, rint(1, t.kBlockM + 9)
        Skv = rint(Sq + 1, 3 * t.kBlockN) if i == 3 else rint(1, 3 * t.kBlockN)
        q, k, v = qkv(B, Hq, Hkv, Sq, Skv, D)
        shape = [(B, Hq, Sq, Skv), (1, Hq, Sq, Skv), (B, 1, 1, Skv), (1, 1, Sq, 1)][i]
        bias = torch.randn(shape) * 3
        if i == 1:
            bias = (torch.randn(1, Hq, Skv, Sq) * 3).transpose(2, 3)
            bias[..., 0, :] = float("-inf")                                 # a row without keys
            bias[..., Sq // 2, :] = torch.finfo(torch.float16).min          # the floor: uniform row
        bias = bias.to([torch.float16, torch.bfloat16, torch.float32][i % 3])
        sinks = torch.randn(Hq) * 4 if i != 2 else None
        if sinks is not None and Hq > 1:
            sinks[-1] = float("-inf")
        mask = random_mask(B, Sq, Skv, t.kBlockN, "mask") if i == 2 and Skv > 1 else None
        softcap = 20.0 if i == 3 else 0.0
        stats = new_stats()
        run_dense(q, k, v, mask, i % 2 == 0, 0.2, rint(1, Skv) if i == 3 else 0, softcap, stats,
                  sinks=sinks, bias=bias)
        run_dense(q, k, v, mask, True, 0.2, 0, softcap, stats, sinks=sinks)   # sinks alone
    q, k, v = qkv(1, 2, 1, 2 * t.kBlockM + 3, 20, D)                       # Sq > Skv + kBM: early exits
    stats = new_stats()
    run_dense(q, k, v, None, True, 0.2, 0, 0.0, stats, sinks=torch.tensor([1.5, -2.0]))
    assert stats["early_exits"] > 0, stats
    run_dense(*qkv(2, 2, 1, 5, 0, D), None, True, 0.2, 0, 0.0, stats, sinks=torch.tensor([1.5, -2.0]))
    assert stats["no_keys_fill"] == 1, stats
    q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window, softcap = random_varlen_case(D)
    run_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window, softcap, new_stats(), wrapper_init=True,
               sinks=torch.randn(q.shape[1]) * 3)


def test_mask_scan_paths():
    """Both mask_key_range paths feed the kernel: a 16-byte aligned contiguous mask (vector
    path) and broadcast / unaligned ones (byte path), with a key range in the middle."""
    for D in (64, 256):
        kBN = CFG[D].kBlockN
        Sq, Skv = 20, 5 * kBN                            # Skv a multiple of 16: all vector chunks
        q, k, v = qkv(2, 2, 1, Sq, Skv, D)
        row = torch.zeros(Skv, dtype=torch.bool)
        row[kBN + 5:3 * kBN + 1] = True                  # keys kBN + 5 .. 3 kBN
        for mask in (row.repeat(2, 1, Sq, 1),                           # aligned: 16-byte path
                     row.view(1, 1, 1, Skv).expand(2, 1, Sq, Skv),      # stride 0 rows: 16-byte path
                     torch.cat([torch.zeros(2, 1, Sq, 3, dtype=torch.bool), row.repeat(2, 1, Sq, 1)],
                               -1)[..., 3:]):                           # unaligned: byte path
            stats = new_stats()
            run_dense(q, k, v, mask, False, 0.1, 0, 0.0, stats)
            assert stats["mask_narrowed"] > 0 and stats["skipped_tiles"] > 0, stats
            vec = mask.data_ptr() % 16 == 0
            assert (stats["mask_vec_path"] > 0) == vec, stats


# ----------------------------------------------------------------------------------------------
# A kernel bug this emulation found (int32 overflow with huge varlen windows: the launcher
# clamped them to INT_MAX), fixed by clamping to INT_MAX / 2; the same case at INT_MAX fails.

@pytest.mark.parametrize("causal", [False, True])
def test_varlen_huge_window_int_overflow(causal):
    # One sequence, window 2^31 (restricts nothing; the launcher clamps it to INT_MAX / 2).
    # Not causal: 5 queries, 1 key, every row sees key 0. Causal: 140 queries, 20 keys, rows
    # 120..139 see keys (rows 120..127 are in m-block 0). With the old INT_MAX cap the kernel's
    # n_lo = max(0, m0 + offset - INT_MAX + 1), m0 + offset = -4 (-120), wrapped to a large
    # positive int, so m-block 0 took the early exit (out 0, lse -inf) although rows attend keys.
    Sq, Skv = (140, 20) if causal else (5, 1)
    q, k, v = half(Sq, 1, 64), half(Skv, 1, 64), half(Skv, 1, 64)
    cu_q, cu_k = torch.tensor([0, Sq], dtype=torch.int32), torch.tensor([0, Skv], dtype=torch.int32)
    run_varlen(q, k, v, cu_q, cu_k, Sq, Skv, causal, 0.125, 2 ** 31, 0.0, new_stats())
    with pytest.raises(AssertionError):             # the old cap: the wrap-around shows
        run_varlen(q, k, v, cu_q, cu_k, Sq, Skv, causal, 0.125, 2 ** 31, 0.0, new_stats(), window_cap=INT_MAX)


# ----------------------------------------------------------------------------------------------
# Negative checks: deliberately wrong index math / control flow must fail the checks above.

@pytest.mark.parametrize("mutant", ["no_xor", "k_rows", "v_no_trans", "p_repack", "o_offset"])
@pytest.mark.parametrize("D", [80, 128])
def test_fragment_mutants_detected(D, mutant):
    with pytest.raises(AssertionError):                  # by the values / write counts alone
        check_fragment_path(D, mutant, banks=False)


def test_bank_check_detects_unswizzled_reads():
    with pytest.raises(AssertionError, match="bank conflict"):
        check_fragment_path(64, "no_xor")


def _dense_fixed(D, Sq, Skv, causal, window=0, mask=None, Hq=2, Hkv=1):
    q, k, v = qkv(1, Hq, Hkv, Sq, Skv, D)
    return q, k, v, mask, causal, 0.2, window, 0.0


def _mask_37_129():
    mask = torch.zeros(1, 1, 1, 200, dtype=torch.bool)
    mask[..., 37:129] = True                             # last attended key 128 = 2 * kBN (D = 64)
    return mask


MUTANT_CASES = {
    "causal_diag": lambda: _dense_fixed(64, 70, 70, True),
    "causal_top_left": lambda: _dense_fixed(64, 40, 100, True),
    "need_mask_causal": lambda: _dense_fixed(64, 200, 200, True),
    "need_mask_window": lambda: _dense_fixed(64, 200, 200, False, window=16),
    "mask_range_last": lambda: _dense_fixed(64, 30, 200, False, mask=_mask_37_129()),
    "no_rescale": lambda: _dense_fixed(128, 50, 250, False),
    "lse_log2": lambda: _dense_fixed(96, 20, 30, False),
    "early_exit_lse": lambda: _dense_fixed(64, 200, 20, True),
    "sink_no_rescale": lambda: _dense_fixed(64, 20, 30, False) + (torch.tensor([4.0, 6.0]), None),
}


@pytest.mark.parametrize("mutant", sorted(MUTANT_CASES))
def test_algorithm_mutants_detected(mutant):
    case = MUTANT_CASES[mutant]()
    args, extra = case[:8], dict(zip(("sinks", "bias"), case[8:]))
    run_dense(*args, new_stats(), **extra)               # the real algorithm passes
    with pytest.raises(AssertionError):
        run_dense(*args, new_stats(), mutant=mutant, **extra)


def test_varlen_bad_offsets_stay_in_bounds():
    # Unchecked cu_seqlens on the device (past total, decreasing, negative): the kernel clamps
    # the offsets (flash_params.h), every read stays inside q / k / v (gather asserts it) and
    # every write inside out / lse; rows it leaves keep the wrapper's 0 / -inf, and the
    # reference reads the offsets the same way. Without the clamp the accesses stray (past the
    # end, below 0); decreasing offsets give empty sequences either way.
    q, k, v = half(30, 2, 64), half(50, 1, 64), half(50, 1, 64)
    for cq, ck, strays in (([0, 10, 40], [0, 20, 70], True), ([0, 20, 10], [0, 30, 5], False),
                           ([-5, 10, 30], [0, -3, 50], True)):
        cu_q, cu_k = torch.tensor(cq, dtype=torch.int32), torch.tensor(ck, dtype=torch.int32)
        args = (q, k, v, cu_q, cu_k, 64, 80, True, 0.125, 0, 0.0)
        run_varlen(*args, new_stats(), wrapper_init=True)
        if strays:
            with pytest.raises((AssertionError, IndexError)):
                run_varlen(*args, new_stats(), mutant="varlen_no_clamp", wrapper_init=True)


def test_varlen_mutant_detected():
    q, k, v = half(30, 2, 64), half(50, 1, 64), half(50, 1, 64)
    cu_q, cu_k = torch.tensor([0, 10, 30], dtype=torch.int32), torch.tensor([0, 20, 50], dtype=torch.int32)
    args = (q, k, v, cu_q, cu_k, 20, 30, True, 0.125, 0, 0.0)
    run_varlen(*args, new_stats())
    with pytest.raises(AssertionError):
        run_varlen(*args, new_stats(), mutant="varlen_k_start")


# ----------------------------------------------------------------------------------------------
# Drift check: the CUDA lines this file transcribes must still be in the sources, verbatim up to
# whitespace. A failure means the kernel changed: update the mirror above, then this list.

MIRRORED_KERNEL_LINES = [
    # SmemTile (mirrored in test_decode_kernel_emulated.SmemTile)
    "static constexpr int kGroup = kChunks % 8 == 0 ? 8 : (kChunks % 4 == 0 ? 4 : 2);",
    "static constexpr int kRowsPerPhase = 8 / kGroup;",
    "const int phys = (chunk % kGroup) ^ ((row / kRowsPerPhase) % kGroup);",
    "return ((chunk / kGroup) * kRows + row) * (kGroup * 8) + phys * 8;",
    "__device__ static __forceinline__ uint32_t lane_base(int r) { return r * kRowBytes; }",
    "__device__ static __forceinline__ int lane_xor(int r, int cl) { return cl ^ ((r / kRowsPerPhase) % kGroup); }",
    "return tile_lane_base + ((chunk0 / kGroup) * kRows + row0) * kRowBytes + (((chunk0 % kGroup) ^ lane_x) << 4);",
    "if constexpr (kTPR > kGroup || 8 % kTPR != 0) {",
    "constexpr int kSlots = 8 / kTPR;",
    "const int j = q % 8, phase = j / kSlots, w = j % kSlots;",
    "return q - j + w % kRowsPerPhase + kRowsPerPhase * (phase + kTPR * (w / kRowsPerPhase));",
    "__device__ static __forceinline__ int storage_row(int i) { return i / kGroup % kRows; }",
    "__device__ static __forceinline__ int storage_chunk(int i) { return i / (kGroup * kRows) * kGroup + i % kGroup; }",
    # load_tile_async
    "constexpr int kTPR = kThreads / kRows;",
    "if constexpr (kThreads % kRows == 0 && kChunks % kTPR == 0) {",
    "const int row = Tile::template fill_row<kTPR>(tid / kTPR), cb = tid % kTPR;",
    "const T* src = valid ? gmem + row * row_stride + cb * 8 : gmem;",
    "for (int k = 0; k < kChunks / kTPR; ++k)",
    "cp_async_16(smem_base + Tile::offset(row, cb + k * kTPR) * 2, valid ? src + k * kTPR * 8 : src, valid);",
    "constexpr int kTotal = kRows * kChunks;",
    "for (int i0 = 0; i0 < kTotal; i0 += kThreads) {",
    "if (kTotal % kThreads == 0 || i < kTotal) {",
    "const int row = Tile::storage_row(i), chunk = Tile::storage_chunk(i);",
    "const T* src = valid ? gmem + row * row_stride + chunk * 8 : gmem;",
    "cp_async_16(smem_base + Tile::offset(row, chunk) * 2, src, valid);",
    # kernel: smem carve-up, grid, varlen, range
    "const uint32_t sK_u32 = sQ_u32 + Traits::kSmemQElems * 2;",
    "const uint32_t sV_u32 = sK_u32 + Traits::kStages * kKVStageBytes;",
    "const int g = lane / 4, c4 = lane % 4;",
    "const int m_block = gridDim.x - 1 - blockIdx.x;",
    "const int kv_head = head / p.group;",
    "q_start = min(max(p.cu_seqlens_q[batch], 0), p.total_q);",
    "Sq = min(max(p.cu_seqlens_q[batch + 1], q_start), p.total_q) - q_start;",
    "k_start = min(max(p.cu_seqlens_k[batch], 0), p.total_kv);",
    "Skv = min(max(p.cu_seqlens_k[batch + 1], k_start), p.total_kv) - k_start;",
    "const int offset = Skv - Sq;",
    "const int m0 = m_block * kBM;",
    "if (m0 >= Sq) return;",
    "return static_cast<T*>(p.out) + batch * p.out_batch_stride + ((int64_t)q_start * p.heads_q + head) * kD;",
    "auto lse_ptr = [&]() { return p.lse + batch * p.lse_batch_stride + head * p.lse_head_stride + q_start; };",
    "const int64_t out_row_stride = (int64_t)p.heads_q * kD;",
    "const int row_last = min(m0 + kBM, Sq) - 1;",
    "if (p.causal) n_hi = min(Skv, row_last + offset + 1);",
    "if (p.window > 0) n_lo = max(0, m0 + offset - p.window + 1);",
    "const int2 r = mask_key_range<kThreads>(p.mask + batch * p.mask_batch_stride + (int64_t)m0 * p.mask_row_stride,",
    "p.mask_row_stride, p.mask_col_stride, row_last - m0 + 1, Skv,",
    "n_lo = max(n_lo, r.x);",
    "n_hi = min(n_hi, r.y);",
    "if (n_hi <= n_lo) {",
    "for (int i = tid; i < kBM * kChunks; i += kThreads) {",
    "const int r = i / kChunks, c = i % kChunks;",
    "*reinterpret_cast<uint4*>(out_base + (m0 + r) * out_row_stride + c * 8) = make_uint4(0, 0, 0, 0);",
    "const float lse_empty = p.sinks != nullptr ? p.sinks[head] : -INFINITY;",
    "if (m0 + r < Sq) lse_base[m0 + r] = lse_empty;",
    "const int nb_first = n_lo / kBN;",
    "const int nb_last = (n_hi + kBN - 1) / kBN - 1;",
    "const int n_tiles = nb_last - nb_first + 1;",
    "(int64_t)(q_start + m0) * p.q_row_stride;",
    "const T* gK = static_cast<const T*>(p.k) + batch * p.k_batch_stride + kv_head * p.k_head_stride +",
    "(int64_t)k_start * p.k_row_stride;",
    "(int64_t)k_start * p.v_row_stride;",
    # prologue and per-lane addresses
    "load_tile_async<kBM, kChunks, kThreads>(sQ_u32, gQ, p.q_row_stride, Sq - m0, tid);",
    "load_tile_async<kBN, kChunks, kThreads>(sK_u32, gK + nb_last * kBN * p.k_row_stride, p.k_row_stride,",
    "load_tile_async<kBN, kChunks, kThreads>(sV_u32, gV + nb_last * kBN * p.v_row_stride, p.v_row_stride,",
    "Skv - nb_last * kBN, tid);",
    "const int q_r = lane % 16, q_cl = lane / 16;",
    "q_lane = sQ + QTile::lane_base(q_r);",
    "q_x = QTile::lane_xor(q_r, q_cl);",
    "const int k_r = (lane / 16) * 8 + lane % 8, k_cl = (lane / 8) % 2;",
    "k_lane = sK + KVTile::lane_base(k_r);",
    "k_x = KVTile::lane_xor(k_r, k_cl);",
    "v_lane = sV + KVTile::lane_base(q_r);",
    "v_x = KVTile::lane_xor(q_r, q_cl);",
    "Mma mma(sQ_u32, sK_u32, sV_u32, warp, lane);",
    "for (int kk = 0; kk < kKS; ++kk) ldmatrix_x4(q_frag[kk], QTile::addr(q_lane, q_x, warp * 16, kk * 2));",
    "const float mult = p.has_softcap || kBias ? 1.f : p.scale_log2;",
    "const int warp_row0 = m0 + warp * 16;",
    # main loop
    "for (int it = 0; it < n_tiles; ++it) {",
    "const int nb = nb_last - it;",
    "const int stage = it & 1;",
    "if (it + 1 < n_tiles) {",
    "const int nn = nb - 1;",
    "const uint32_t st = (stage ^ 1) * kKVStageBytes;",
    "load_tile_async<kBN, kChunks, kThreads>(sK_u32 + st, gK + nn * kBN * p.k_row_stride, p.k_row_stride,",
    "load_tile_async<kBN, kChunks, kThreads>(sV_u32 + st, gV + nn * kBN * p.v_row_stride, p.v_row_stride,",
    "Skv - nn * kBN, tid);",
    "mma.qk(s, stage * kKVStageBytes);",
    "const uint32_t k_stage = k_lane + stage;",
    "ldmatrix_x4(a, QTile::addr(q_lane, q_x, warp * 16, kk * 2));",
    "for (int np = 0; np < kBN / 16; ++np) {",
    "ldmatrix_x4(b, KVTile::addr(k_stage, k_x, np * 16, kk * 2));",
    "mma_16816<T>(s[2 * np], a, b[0], b[1]);",
    "mma_16816<T>(s[2 * np + 1], a, b[2], b[3]);",
    "for (int e = 0; e < 4; ++e) s[i][e] = tanhf(s[i][e] * p.softcap_in) * p.softcap_out;",
    # bias (bias_scores, add_bias_log2)
    "bias_scores(s, p, batch, head, warp_row0 + g, n0 + 2 * c4, Sq, Skv);",
    "const float sc = p.has_softcap ? p.softcap_in : p.scale;",
    "for (int e = 0; e < 4; ++e) s[i][e] = p.has_softcap ? tanhf(s[i][e] * sc) * p.softcap : s[i][e] * sc;",
    "const B* brow = static_cast<const B*>(p.bias) + batch * p.bias_batch_stride + head * p.bias_head_stride +",
    "row * p.bias_row_stride;",
    "const int col = col0 + nt * 8 + j;",
    "if (row < Sq && col < Skv) x += static_cast<float>(brow[col * p.bias_col_stride]);",
    "s[nt][2 * r + j] = (x == -INFINITY ? x : fmaxf(x, kScoreFloor)) * kLog2eF;",
    "constexpr float kScoreFloor = -8.5070591730234616e37f;  // -2^126",
    "const int n0 = nb * kBN;",
    "const bool need_mask = p.mask != nullptr || n0 + kBN > Skv ||",
    "(p.causal && n0 + kBN - 1 > m0 + offset) ||",
    "(p.window > 0 && n0 <= m0 + kBM - 1 + offset - p.window);",
    "const int row = warp_row0 + g + 8 * r;",
    "const int pos = row + offset;",
    "if (p.mask != nullptr && row < Sq) mrow = p.mask + batch * p.mask_batch_stride + row * p.mask_row_stride;",
    "const int col = n0 + nt * 8 + 2 * c4 + j;",
    "bool ok = col < Skv;",
    "if (p.causal) ok = ok && col <= pos;",
    "if (p.window > 0) ok = ok && col > pos - p.window;",
    "if (p.mask != nullptr) ok = ok && mrow != nullptr && mrow[col * p.mask_col_stride] != 0;",
    "if (!ok) s[nt][2 * r + j] = -INFINITY;",
    "for (int nt = 0; nt < kNT; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));",
    "mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));",
    "mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));",
    "const float m_scaled = mx == -INFINITY ? 0.f : mx * mult;",
    "const float corr = exp2_approx(row_max[r] * mult - m_scaled);",
    "row_max[r] = mx;",
    "const float e = exp2_approx(fmaf(s[nt][2 * r + j], mult, -m_scaled));",
    "row_sum[r] = row_sum[r] * corr + sum;",
    "acc_o[dt][2 * r] *= corr;",
    "acc_o[dt][2 * r + 1] *= corr;",
    "mma.pv(acc_o, s, stage * kKVStageBytes);",
    "const uint32_t v_stage = v_lane + stage;",
    "a[0] = pack2<T>(s[2 * ks][0], s[2 * ks][1]);",
    "a[1] = pack2<T>(s[2 * ks][2], s[2 * ks][3]);",
    "a[2] = pack2<T>(s[2 * ks + 1][0], s[2 * ks + 1][1]);",
    "a[3] = pack2<T>(s[2 * ks + 1][2], s[2 * ks + 1][3]);",
    "ldmatrix_x4_trans(b, KVTile::addr(v_stage, v_x, ks * 16, dp * 2));",
    "mma_16816<T>(o[2 * dp], a, b[0], b[1]);",
    "mma_16816<T>(o[2 * dp + 1], a, b[2], b[3]);",
    "p_fragment<T>(a, s, ks);",
    # epilogue
    "l += __shfl_xor_sync(0xffffffffu, l, 1);",
    "l += __shfl_xor_sync(0xffffffffu, l, 2);",
    "const float z_nat = p.sinks != nullptr ? p.sinks[head] : -INFINITY;",
    "const bool any_key = l > 0.f;",
    "float m = any_key ? row_max[r] * mult : -INFINITY;",
    "const float alpha = fold_sink(m, l, z_nat * kLog2eF);",
    "inv[r] = any_key ? alpha / l : 0.f;",
    "const float lse = any_key ? (m + log2f(l)) * kLn2 : z_nat;",
    # fold_sink
    "if (z > m) {",
    "const float alpha = exp2f(m - z);",
    "l = fmaf(l, alpha, 1.f);",
    "if (z != -INFINITY) l += exp2f(z - m);",
    "if (c4 == 0 && row < Sq) lse_base[row] = lse;",
    "const int row = warp * 16 + g + 8 * r;",
    "*reinterpret_cast<uint32_t*>(sQ + QTile::offset(row, dt) + 2 * c4) =",
    "pack2<T>(acc_o[dt][2 * r] * inv[r], acc_o[dt][2 * r + 1] * inv[r]);",
    "for (int i = lane; i < 16 * kChunks; i += 32) {",
    "const int r = (i / kG) % 16, c = (i / (16 * kG)) * kG + i % kG;",
    "const int row = warp_row0 + r;",
    "*reinterpret_cast<uint4*>(out_base + row * out_row_stride + c * 8) =",
    "*reinterpret_cast<const uint4*>(sQ + QTile::offset(warp * 16 + r, c));",
    "const dim3 grid((p.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM, p.heads_q, p.batch);",
]

MIRRORED_TRAITS_LINES = [
    "static constexpr int kThreads = kNWarps * 32;",
    "static constexpr int kStages = 2;",
    "static constexpr int kChunks = kHeadDim / 8;",
    "static constexpr int kSmemQElems = kBlockM * kHeadDim;",
    "static constexpr int kSmemKVElems = kBlockN * kHeadDim;",
    "static constexpr int kSmemSlack = kSmemAlign > 128 ? kSmemAlign : 0;",
    "static constexpr int kSmemBytes = (kSmemQElems + 2 * kStages * kSmemKVElems) * 2 + kSmemSlack;",
    "int kSmemAlign_ = 128, int kSmemLimitKB_ = 99>",
]

MIRRORED_LAUNCHER_LINES = [
    "constexpr double kLog2e = 1.4426950408889634;",
    "if (p.seqlen_kv == 0 && p.cu_seqlens_q == nullptr) return launch_no_keys(p, head_dim, stream);",
    "p.group = static_cast<int>(heads_q / heads_kv);",
    "p.window = (window > 0 && window < seqlen_kv) ? static_cast<int>(window) : 0;",
    "p.has_softcap = softcap > 0.0;",
    "p.scale_log2 = static_cast<float>(scale * kLog2e);",
    "p.softcap_in = p.has_softcap ? static_cast<float>(scale / softcap) : 0.f;",
    "p.softcap_out = p.has_softcap ? static_cast<float>(softcap * kLog2e) : 0.f;",
    "p.scale = static_cast<float>(scale);",
    "p.softcap = static_cast<float>(softcap);",
    "lse[i] = sinks != nullptr ? sinks[(i / seqlen_q) % heads_q] : -INFINITY;",
    "p.out_batch_stride = seqlen_q * heads_q * head_dim;",
    "p.lse_batch_stride = heads_q * seqlen_q;",
    "p.lse_head_stride = seqlen_q;",
    "p.lse_head_stride = total_q;",
    "p.total_q = static_cast<int>(total_q), p.total_kv = static_cast<int>(total_k);",
    "set_common(p, batch, heads_q, heads_kv, max_seqlen_q, max_seqlen_k, scale, 0, softcap, causal);",
    "p.window = window > 0 ? static_cast<int>(window < INT_MAX / 2 ? window : INT_MAX / 2) : 0;",
]

MIRRORED_GLUE_LINES = [         # python/fastllm/ops/_attention_cuda.py
    "return broadcast_strides(t, range(n))",
    "m = torch.broadcast_to(mask, (B, 1, Sq, Skv))[:, 0]",
    "m_ptr, m_strides = m.data_ptr(), _strides(m)",
    "b = torch.broadcast_to(bias, (B, Hq, Sq, Skv))",
    "b_ptr, b_dtype, b_strides = b.data_ptr(), _ext.DTYPE_CODES[b.dtype], _strides(b, 4)",
    "hs = [_strides(t.transpose(0, 1)[None])[1:] for t in (q, k, v)]",
    "int(max_q), int(max_k), D, *hs[0], *hs[1], *hs[2],",
]

MIRRORED_MASK_RANGE_LINES = [   # mirrored in test_decode_kernel_emulated.mask_key_range
    "if (tid == 0) red[0] = n_keys, red[1] = 0;",
    "int first = n_keys, last = 0;",
    "const bool vec = col_stride == 1 && reinterpret_cast<uintptr_t>(m) % 16 == 0 &&",
    "(rows <= 1 || row_stride % 16 == 0);",
    "const int n_vec = vec ? n_keys / 16 : 0;",
    "for (int c = tid; c < n_vec; c += kThreads) {",
    "const uint4 x = __ldg(reinterpret_cast<const uint4*>(m + r * row_stride) + c);",
    "if (word[i] != 0u) first = min(first, 16 * c + 4 * i + (__ffs(word[i]) - 1) / 8);",
    "if (word[i] != 0u) last = max(last, 16 * c + 4 * i + (31 - __clz(word[i])) / 8 + 1);",
    "for (int j = 16 * n_vec + tid; j < n_keys; j += kThreads) {",
    "for (int r = 0; r < rows && !any; ++r) any = m[r * row_stride + j * col_stride] != 0;",
    "if (any) first = min(first, j), last = max(last, j + 1);",
]


def test_kernel_source_matches_mirror():
    assert_mirrored(((KERNEL_SRC, MIRRORED_KERNEL_LINES), (TRAITS_SRC, MIRRORED_TRAITS_LINES),
                     (LAUNCHER_SRC, MIRRORED_LAUNCHER_LINES), (MASK_RANGE_SRC, MIRRORED_MASK_RANGE_LINES),
                     (GLUE_SRC, MIRRORED_GLUE_LINES)))
