"""The CUDA int8 kernels (csrc/int8/), emulated byte for byte on CPU.

The kernels have never run on a GPU. This file mirrors their constants and index math in NumPy:

W8A8 GEMM (int8_gemm_kernel.cuh, every GemmConfig of int8_traits.h): the grouped CTA raster,
split-K's K range per grid-y slice, load_tile's cp.async fills into SwizzledTile (rows past M / N
and 16-byte chunks past K zero-filled, rows of stride lda / ldb), the cp.async ring of kStages
stages, the ldmatrix lane addresses (ldmatrix as the hardware defines it, common/ptx.cuh: lane
8j + r gives the address of row r of matrix j, register j of lane 4r + c gets bytes 4c..4c+3 of
that row), the B register pairs each n8 tile takes, mma.sync m16n8k32 .s8 (mma_m16n8k32_s8 below,
written from the PTX ISA), the epilogue's (m, n) per accumulator with its masks, the raw int32
stores and the scaled ones (fmaf(fp32(acc) * a_scale, w_scale, bias) -> fp16 / bf16 / fp32), the
split-K workspace planes and int8_splitk_reduce_kernel's grid-stride pairs; and the launcher
(int8_launcher.cu, its sm80 path: every GPU but Hopper running the sm_90a wgmma kernel for
M > kWgmmaMinM, which is not mirrored here): config and split choice,
k_tiles_per_split, the splits actually launched, strides for M == 1 / K == 0.
W8A16 (w8a16_gemm_kernel.cuh, token tiles 1 / 2 x warps 4 / 8): each lane's 16-byte weight and
activation loads with their masks, dequant4's __byte_perm magic bit for bit, the A / B register
assignment into mma.sync m16n8k16 (mma_m16n8k16 below, from the PTX ISA), per-group scales per
64-k block, the warps' reduction through shared memory, per-channel scale, bias, stores; and the
launcher's variant choice and strides.

Proven here, given that mirror (for every case below):
  * W8A8 out == a @ b.T: int32 exactly (a.long() @ b.long().T); scaled outputs bit-exactly equal
    to the same fp32 operations on the exact product (fmaf modelled with a single rounding, then
    RNE to fp16 / bf16), so every byte reaches the right register and every accumulator the right
    (m, n), including the a_scale[m or 0] / w_scale[n] / bias[n] indices; for each tile config x
    out dtype x M in {1, 5, 16, 17, 33, 97} with N and K tails (N % kBN != 0, K % kBK != 0,
    enough K tiles that the ring wraps), padded row strides, per-token and per-tensor a_scale,
    and split-K (including a plan of 8 splits that launches 7, and 4 slices with a short last);
  * every output (and split-K workspace) element is stored exactly once, nothing past M / N, every
    pair store aligned; the reduce reads only workspace elements pass 1 wrote; no int32 partial or
    prefix sum overflows;
  * every cp.async reads inside a / b (buffers of the minimal extent (rows - 1) * ld + K; the row
    padding poisoned), 16-byte aligned at both ends; every ldmatrix address is 16-byte aligned;
  * no MMA reads shared memory its stage did not fill: every 16-byte chunk an ldmatrix reads must
    carry the tag of the K tile being computed and have no cp.async in flight to it, with copies
    landing only when the kernel's cp_async_wait<kStages - 2> lets them (the latest the hardware
    may deliver them); no two in-flight copies target one chunk (shared memory also starts 0xFF);
  * bank groups: the 8 rows of every ldmatrix phase and the 8 destinations of every 8 consecutive
    cp.async threads fall in 8 distinct 16-byte bank groups (no shared-memory bank conflicts);
  * W8A16 (fp16, bf16; M in {1, 5, 8, 9, 16}; per-channel scales with a strided layout and a K
    tail, per-group scales of 64 / 128 in (N, G) and transposed layouts): the fp32 value before
    from_float equals x @ (w * s).T + bias exactly (inputs chosen so that every sum is exact in
    float64, as in the decode emulation), every load in bounds and 16-byte aligned, padding tokens
    and the K tail read as zeros, every reduction slot written once, every output once;
  * the launcher's plan mirrored here equals the C++ one (fastllm._C.int8_gemm_plan) over a grid
    of shapes and SM counts, when the extension is importable.
Not proven: that the .cuh says what is mirrored here (by hand; test_kernel_source_matches_mirror
checks that the mirrored lines are still in the sources verbatim, so an edit of them fails here
until the mirror is updated); the hardware's ldmatrix / mma semantics themselves (taken from the
PTX ISA); fp32 accumulation order inside W8A16's mma and its reductions (modelled in float64 on
exactly-summable inputs; the GPU tests in tests/test_int8_cuda.py cover rounding); whether nvcc
contracts W8A16's `v *= scale; v += bias` into an FMA; __syncthreads placement beyond the ring
discipline above, launch limits, shared-memory opt-in, speed.
To stay fast, MMAs whose outputs are never stored (all 16 rows >= M or all 8 columns >= N) are
not run through the model; their ldmatrix addresses and reads are still checked, and the epilogue
asserts that no stored accumulator comes from a skipped MMA. test_mutant_kernel_fails shows that
deliberately wrong index math makes these checks fail.
"""
import pathlib
import re
from fractions import Fraction

import numpy as np
import pytest
import torch

from helpers import assert_mirrored, norm_source

ROOT = pathlib.Path(__file__).resolve().parents[1]
INT8_DIR = ROOT / "csrc" / "int8"
KERNEL_SRC = INT8_DIR / "int8_gemm_kernel.cuh"
TRAITS_SRC = INT8_DIR / "int8_traits.h"
LAUNCHER_SRC = INT8_DIR / "int8_launcher.cu"
W8A16_SRC = INT8_DIR / "w8a16_gemm_kernel.cuh"
COMMON_SRC = ROOT / "csrc" / "common" / "common.h"

# int8_traits.h: GemmConfig<index> : GemmTile<kBM, kBN, kBK, kWarpsM, kWarpsN, kStages>.
CONFIGS = {0: (16, 32, 256, 1, 2, 4), 1: (32, 64, 128, 1, 2, 4), 2: (64, 128, 64, 2, 2, 4),
           3: (128, 128, 64, 2, 2, 4), 4: (128, 256, 64, 2, 4, 3)}
K_GROUP_M = 8                          # kGroupM
MAX_SPLIT_K, MIN_K_TILES_PER_SPLIT = 16, 4   # common.h kMaxSplitK, kMinKTilesPerSplit
SPLIT_K_MAX_M = 128                           # int8_traits.h kSplitKMaxM
W8A16_ROWS, W8A16_UNROLL, W8A16_MAX_M = 16, 4, 16   # kW8A16RowsPerCta, kW8A16Unroll, kW8A16MaxM
OUT_KINDS = ["i32", "f16", "bf16", "f32"]
LANE = np.arange(32)
G, C = LANE // 4, LANE % 4             # groupID, threadID_in_group
AR16 = np.arange(16)


class Cfg:
    """GemmTile<kBM, kBN, kBK, kWarpsM, kWarpsN, kStages> (int8_traits.h), field for field."""

    def __init__(self, kBM, kBN, kBK, kWarpsM, kWarpsN, kStages):
        self.kBM, self.kBN, self.kBK = kBM, kBN, kBK
        self.kWarpsM, self.kWarpsN, self.kStages = kWarpsM, kWarpsN, kStages
        self.kWarps = kWarpsM * kWarpsN
        self.kThreads = 32 * self.kWarps
        self.kWM, self.kWN = kBM // kWarpsM, kBN // kWarpsN
        self.kMT, self.kNT = self.kWM // 16, self.kWN // 8
        self.kChunks = kBK // 16
        self.kStageBytes = (kBM + kBN) * kBK
        self.kSmemBytes = kStages * self.kStageBytes
        # the static_asserts
        assert self.kWM % 16 == 0 and self.kWN % 16 == 0
        assert kBK % 64 == 0 and kStages >= 2 and self.kSmemBytes <= 99 * 1024


class Swizzle:
    """SwizzledTile<kRows, kChunks> (int8_gemm_kernel.cuh): offset / lane_row / addr in bytes;
    lane_xor is KERNEL["lane_xor"] (a mutant replaces it)."""

    def __init__(self, rows, chunks):
        self.kRows, self.kChunks = rows, chunks
        self.kGroup = chunks if chunks < 8 else 8
        self.kRowsPerLine = 8 // self.kGroup
        self.kRowBytes = self.kGroup * 16
        assert chunks % self.kGroup == 0 and self.kGroup in (4, 8) and rows % 8 == 0

    def offset(self, row, chunk):
        phys = (chunk % self.kGroup) ^ ((row // self.kRowsPerLine) % self.kGroup)
        return ((chunk // self.kGroup) * self.kRows + row) * self.kRowBytes + phys * 16

    def lane_row(self, r):
        return r * self.kRowBytes

    def addr(self, base_plus_lane_row, lane_x, row0, chunk0):
        return (base_plus_lane_row + ((chunk0 // self.kGroup) * self.kRows + row0) * self.kRowBytes
                + (((chunk0 % self.kGroup) ^ lane_x) << 4))


def lane_xor(tile, r, cb):
    return cb ^ ((r // tile.kRowsPerLine) % tile.kGroup)


def raster(pid, tiles_m, tiles_n):
    """The grouped raster: pid -> (tile_m, tile_n)."""
    per_group = K_GROUP_M * tiles_n
    first_m = (pid // per_group) * K_GROUP_M
    group_rows = min(tiles_m - first_m, K_GROUP_M)
    return first_m + (pid % per_group) % group_rows, (pid % per_group) // group_rows


def k_range(y, kps, K, kBK):
    """(k_begin, k_len) of grid-y slice y (k_tiles_per_split 0: all of K)."""
    k_begin = y * kps * kBK if kps > 0 else 0
    k_len = max(0, min(K - k_begin, kps * kBK)) if kps > 0 else K
    return k_begin, k_len


# The W8A8 kernel's index math, mirrored from int8_gemm_kernel.cuh (mutants replace entries).
KERNEL = dict(
    lane_xor=lane_xor,
    a_lane=lambda lane: (lane % 8 + 8 * ((lane // 8) % 2), lane // 16),     # (ra, ca)
    b_lane=lambda lane: (lane % 8 + 8 * (lane // 16), (lane // 8) % 2),     # (rb, cb)
    b_regs=lambda j: (j // 2, (j % 2) * 2, (j % 2) * 2 + 1),                # bf[j / 2][...], b0 / b1
    raster=raster,
    k_range=k_range,
    rows_valid=lambda kB, total, base: min(kB, total - base),
    wait_in_loop=lambda stages: stages - 2,
    next_stage=lambda nxt, stages: nxt % stages,
    epi_m=lambda m0, wm, kWM, i, g, h: m0 + wm * kWM + i * 16 + g + 8 * h,
    n_guard=lambda n, N: n < N,
    reduce_splits=lambda splits: splits,
)


# ----------------------------------------------------------------------------------------------
# Hardware models (PTX ISA).

def _isa_tables():
    """Index tables of the two mma fragment layouts, written as the PTX ISA states them."""
    t = {}
    i = np.arange(16)       # m16n8k32 .s8 A: a0..a15, register i // 4, byte i % 4
    t["s8_a_row"] = G[:, None] + 8 * ~(((i < 4) | ((8 <= i) & (i < 12))))[None, :]
    t["s8_a_col"] = C[:, None] * 4 + (i & 3)[None, :] + 16 * (i >= 8)[None, :]
    i = np.arange(8)        # m16n8k32 .s8 B: b0..b7, register i // 4, byte i % 4
    t["s8_b_row"] = C[:, None] * 4 + (i & 3)[None, :] + 16 * (i >= 4)[None, :]
    t["s8_b_col"] = np.broadcast_to(G[:, None], (32, 8))
    i = np.arange(4)        # C / D (both shapes): c0..c3
    t["d_row"] = G[:, None] + 8 * (i >= 2)[None, :]
    t["d_col"] = C[:, None] * 2 + (i & 1)[None, :]
    i = np.arange(8)        # m16n8k16 .f16 / .bf16 A: a0..a7, register i // 2, low half first
    t["h_a_row"] = G[:, None] + 8 * ~(((i < 2) | ((4 <= i) & (i < 6))))[None, :]
    t["h_a_col"] = C[:, None] * 2 + (i & 1)[None, :] + 8 * (i >= 4)[None, :]
    i = np.arange(4)        # m16n8k16 B: b0..b3, register i // 2
    t["h_b_row"] = C[:, None] * 2 + (i & 1)[None, :] + 8 * (i >= 2)[None, :]
    t["h_b_col"] = np.broadcast_to(G[:, None], (32, 4))
    return {k: np.asarray(v, np.int64) for k, v in t.items()}


ISA = _isa_tables()


def mma_m16n8k32_s8(a, b0, b1, c):
    """mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 for one warp, from the PTX ISA, section
    9.7.14.5 "Matrix Fragments for mma.m16n8k32" (.s8 / .u8 multiplicands, .s32 accumulators).
    With groupID = %laneid >> 2 and threadID_in_group = %laneid % 4, element i of a lane's
    fragment (register i // 4, byte i % 4, lowest byte first):
      A (a0..a15): row = groupID          for 0 <= i < 4 || 8 <= i < 12, groupID + 8 otherwise
                   col = threadID_in_group * 4 + (i & 0x3)       (+ 16 for i >= 8)
      B (b0..b7):  row = threadID_in_group * 4 + (i & 0x3)       (+ 16 for i >= 4)
                   col = groupID
      C/D (c0..c3): row = groupID for c0, c1, groupID + 8 for c2, c3;
                    col = threadID_in_group * 2 + (i & 0x1)
    a (..., 32, 4), b0 / b1 (..., 32) uint32, c (..., 32, 4) int64 (broadcast leading dims).
    Returns d = A @ B + C, exact; asserts it fits the s32 accumulator (the kernel's K bound)."""
    a = np.ascontiguousarray(a, np.uint32)
    lead = np.broadcast_shapes(a.shape[:-2], np.shape(b0)[:-1], np.shape(c)[:-2])
    av = a.view(np.int8).reshape(a.shape[:-2] + (32, 16)).astype(np.float64)
    A = np.zeros(a.shape[:-2] + (16, 32))
    A[..., ISA["s8_a_row"], ISA["s8_a_col"]] = av
    b = np.ascontiguousarray(np.stack(np.broadcast_arrays(b0, b1), -1), np.uint32)
    bv = b.view(np.int8).reshape(b.shape[:-2] + (32, 8)).astype(np.float64)
    B = np.zeros(b.shape[:-2] + (32, 8))
    B[..., ISA["s8_b_row"], ISA["s8_b_col"]] = bv
    D = np.matmul(A, B)                       # |products| <= 2^14, 32 terms: exact in float64
    d = np.broadcast_to(c, lead + (32, 4)) + D[..., ISA["d_row"], ISA["d_col"]].astype(np.int64)
    assert np.abs(d).max(initial=0) < 2 ** 31, "s32 accumulator overflow"
    return d


def _halves(regs, dtype):
    """uint32 registers (..., n) -> float64 halves (..., 2n), low half first."""
    h = np.ascontiguousarray(regs, np.uint32).view(np.uint16).reshape(regs.shape[:-1] + (-1,))
    if dtype == torch.float16:
        return h.view(np.float16).astype(np.float64)
    return (h.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def mma_m16n8k16(a, b0, b1, c, dtype):
    """mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 for one warp, from the PTX
    ISA, section 9.7.14.5.8 "Matrix Fragments for mma.m16n8k16 with floating point type". Element
    i of a lane's fragment (register i // 2, lower element in the low 16 bits):
      A (a0..a7): row = groupID          for 0 <= i < 2 || 4 <= i < 6, groupID + 8 otherwise
                  col = threadID_in_group * 2 + (i & 0x1)        (+ 8 for i >= 4)
      B (b0..b3): row = threadID_in_group * 2 + (i & 0x1)        (+ 8 for i >= 2)
                  col = groupID
      C/D: as in mma_m16n8k32_s8 (fp32).
    a (32, 4), b0 / b1 (32,) uint32, c (32, 4). Returns A @ B + C summed in float64 (the
    hardware: fp32; the inputs used here make every sum exact in both)."""
    A = np.full((16, 16), np.nan)
    A[ISA["h_a_row"], ISA["h_a_col"]] = _halves(a, dtype)
    B = np.full((16, 8), np.nan)
    B[ISA["h_b_row"], ISA["h_b_col"]] = _halves(np.stack([b0, b1], -1), dtype)
    return c + (A @ B)[ISA["d_row"], ISA["d_col"]]


class Smem:
    """Dynamic shared memory (starts 0xFF) with, per 16-byte chunk, the tag of the K tile that
    last landed there and the number of cp.async copies in flight to it; and the cp.async groups."""

    def __init__(self, nbytes):
        self.b = np.full(nbytes, 0xFF, np.uint8)
        self.tag = np.full(nbytes // 16, -1, np.int64)
        self.inflight = np.zeros(nbytes // 16, np.int64)
        self.groups, self.open = [], []

    def cp_async_16(self, dst, gbuf, src, valid, tag):
        """cp.async.cg.shared.global [dst], [src], 16, valid ? 16 : 0 per thread (common/ptx.cuh):
        16 bytes from gbuf[src..] or 16 zeros (src-size 0 reads nothing). Pending until waited."""
        assert (dst % 16 == 0).all() and dst.min() >= 0 and dst.max() + 16 <= self.b.size
        s = src[valid]
        assert (s % 16 == 0).all(), "cp.async global source not 16-byte aligned"
        assert s.size == 0 or (s.min() >= 0 and s.max() + 16 <= gbuf.size), "cp.async reads outside its tensor"
        data = np.zeros((dst.size, 16), np.uint8)
        data[valid] = gbuf[s[:, None] + AR16]
        np.add.at(self.inflight, dst // 16, 1)
        assert self.inflight.max() <= 1, "two cp.async copies in flight to one chunk"
        self.open.append((dst, data, tag))

    def commit(self):
        self.groups.append(self.open)
        self.open = []

    def wait(self, n):
        """cp.async.wait_group n: all but the newest n groups have landed (and no earlier)."""
        while len(self.groups) > n:
            for dst, data, tag in self.groups.pop(0):
                self.b[dst[:, None] + AR16] = data
                self.tag[dst // 16] = tag
                self.inflight[dst // 16] -= 1

    def ldmatrix_x4(self, addr, tag):
        """ldmatrix.sync.aligned.m8n8.x4.shared.b16 (common/ptx.cuh), addr (..., 32): lane 8j + r
        gives the address of row r of matrix j; register j of lane 4r + c gets bytes 4c..4c+3 of
        that row. Checks alignment, that every row read holds K tile `tag` with nothing in flight,
        and that each matrix's 8 rows sit in 8 distinct bank groups."""
        addr = np.asarray(addr, np.int64)
        assert (addr % 16 == 0).all(), "ldmatrix row addresses must be 16-byte aligned"
        assert addr.min() >= 0 and addr.max() + 16 <= self.b.size
        ch = addr // 16
        assert (self.inflight[ch] == 0).all(), "ldmatrix reads a chunk with a cp.async in flight"
        assert (self.tag[ch] == tag).all(), "ldmatrix reads shared memory its stage did not fill"
        bank = np.sort(((addr % 128) // 16).reshape(addr.shape[:-1] + (4, 8)), -1)
        assert (np.diff(bank, axis=-1) > 0).all(), "ldmatrix phase with a bank conflict"
        rows = addr[..., 8 * np.arange(4)[None, :] + G[:, None]] + 4 * C[:, None]       # (..., 32, 4)
        return self.b.view(np.uint32)[rows // 4]


# ----------------------------------------------------------------------------------------------
# The W8A8 kernel: load_tile, int8_gemm_kernel (main loop, epilogue), int8_splitk_reduce_kernel.

def load_tile(k, sm, tile, kThreads, stage, gbuf, g, ld, rows_valid, k0, K, tag):
    """load_tile<kRows, kChunks, kThreads>: thread tid takes i = i0 + tid."""
    total = tile.kRows * tile.kChunks
    for i0 in range(0, total, kThreads):
        i = i0 + np.arange(kThreads)
        i = i[(total % kThreads == 0) | (i < total)]
        row, chunk = i // tile.kChunks, i % tile.kChunks
        kk = k0 + chunk * 16
        valid = (row < rows_valid) & (kk < K)
        src = np.where(valid, g + row * ld + kk, g)
        dst = stage + tile.offset(row, chunk)
        bank = np.sort(((dst % 128) // 16).reshape(-1, 8), -1)        # 8 consecutive threads
        assert (np.diff(bank, axis=-1) > 0).all(), "cp.async stores with a bank conflict"
        sm.cp_async_16(dst, gbuf, src, valid, tag)


def run_cta(p, cfg, k, pid, y):
    """One CTA (blockIdx.x = pid, blockIdx.y = y): returns (m0, n0, acc (warps, kMT, kNT, 32, 4)
    int64, skipped (warps, kMT, kNT): the MMAs not run through the model as never stored)."""
    M, N, K = p["M"], p["N"], p["K"]
    kBM, kBN, kBK, S = cfg.kBM, cfg.kBN, cfg.kBK, cfg.kStages
    at, bt = Swizzle(kBM, cfg.kChunks), Swizzle(kBN, cfg.kChunks)
    sA = 0
    sB = sA + S * kBM * kBK
    tiles_m, tiles_n = (M + kBM - 1) // kBM, (N + kBN - 1) // kBN
    tile_m, tile_n = k["raster"](pid, tiles_m, tiles_n)
    assert 0 <= tile_m < tiles_m and 0 <= tile_n < tiles_n, "raster outside the tile grid"
    m0, n0 = tile_m * kBM, tile_n * kBN
    k_begin, k_len = k["k_range"](y, p["kps"], K, kBK)
    ga, gb = m0 * p["lda"] + k_begin, n0 * p["ldb"] + k_begin
    rows_a, rows_b = k["rows_valid"](kBM, M, m0), k["rows_valid"](kBN, N, n0)
    KT = (k_len + kBK - 1) // kBK
    sm = Smem(cfg.kSmemBytes)

    def load_stage(stage, kt):
        load_tile(k, sm, at, cfg.kThreads, sA + stage * kBM * kBK, p["a"], ga, p["lda"], rows_a, kt * kBK, k_len, kt)
        load_tile(k, sm, bt, cfg.kThreads, sB + stage * kBN * kBK, p["b"], gb, p["ldb"], rows_b, kt * kBK, k_len, kt)

    ra, ca = k["a_lane"](LANE)
    rb, cb = k["b_lane"](LANE)
    a_lane, b_lane = sA + at.lane_row(ra), sB + bt.lane_row(rb)
    a_x, b_x = k["lane_xor"](at, ra, ca), k["lane_xor"](bt, rb, cb)
    acc = np.zeros((cfg.kWarps, cfg.kMT, cfg.kNT, 32, 4), np.int64)
    skipped = np.zeros((cfg.kWarps, cfg.kMT, cfg.kNT), bool)
    for s in range(S - 1):
        if s < KT:
            load_stage(s, s)
        sm.commit()
    for kt in range(KT):
        sm.wait(k["wait_in_loop"](S))
        nxt = kt + S - 1
        if nxt < KT:
            load_stage(k["next_stage"](nxt, S), nxt)
        sm.commit()
        stage = kt % S
        a_st, b_st = a_lane + stage * kBM * kBK, b_lane + stage * kBN * kBK
        for ks in range(kBK // 32):
            for warp in range(cfg.kWarps):
                wm, wn = warp // cfg.kWarpsN, warp % cfg.kWarpsN
                af = sm.ldmatrix_x4(at.addr(a_st, a_x, wm * cfg.kWM + np.arange(cfg.kMT)[:, None] * 16, 2 * ks), kt)
                bf = sm.ldmatrix_x4(bt.addr(b_st, b_x, wn * cfg.kWN + np.arange(cfg.kNT // 2)[:, None] * 16, 2 * ks), kt)
                ni = int((m0 + wm * cfg.kWM + np.arange(cfg.kMT) * 16 < M).sum())   # MMAs with a stored row
                nj = int((n0 + wn * cfg.kWN + np.arange(cfg.kNT) * 8 < N).sum())    # ... and column
                skipped[warp, ni:] = skipped[warp, :, nj:] = True
                if ni == 0 or nj == 0:
                    continue
                jj, r0, r1 = k["b_regs"](np.arange(nj))
                acc[warp, :ni, :nj] = mma_m16n8k32_s8(af[:ni, None], bf[jj, :, r0][None], bf[jj, :, r1][None],
                                                      acc[warp, :ni, :nj])
    assert not sm.open and all(not g for g in sm.groups), "cp.async copies still in flight at exit"
    return m0, n0, acc, skipped


class Out:
    """A global output of `size` elements (+ a guard band) recording values and store counts."""

    def __init__(self, size, guard=64):
        self.size = size
        self.v = np.full(size + guard, np.nan)
        self.count = np.zeros(size + guard, np.int64)

    def store_pair(self, dst, v0, v1):
        assert (dst % 2 == 0).all(), "pair store not aligned"
        assert dst.size == 0 or (dst.min() >= 0 and dst.max() + 1 < self.size), "store outside the output"
        for d, v in ((dst, v0), (dst + 1, v1)):
            np.add.at(self.count, d, 1)
            self.v[d] = v


def gread(arr, idx, what):
    idx = np.asarray(idx)
    assert idx.size == 0 or (idx.min() >= 0 and idx.max() < arr.size), f"{what} read out of bounds"
    return arr[idx]


def fma_f32(x, y, z):
    """fmaf(x, y, z): x * y + z rounded once to fp32 (nearest even). The fp64 product is exact;
    the fp64 sum is made round-to-odd (TwoSum error), which rounds correctly to fp32 (53 >= 24 + 2)."""
    x, y, z = (np.asarray(v, np.float32).astype(np.float64) for v in (x, y, z))
    prod = x * y
    s = np.asarray(prod + z, np.float64)
    bb = s - prod
    err = (prod - (s - bb)) + (z - bb)
    fix = (err != 0) & ((s.view(np.int64) & 1) == 0)
    s = np.where(fix, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return s.astype(np.float32)


def to_out(v, kind):
    """store_pair's conversion of fp32 v: fp32 as is, __floats2half2_rn / __floats2bfloat162_rn."""
    if kind == "f32":
        return v.astype(np.float64)
    dt = torch.float16 if kind == "f16" else torch.bfloat16
    return torch.from_numpy(np.ascontiguousarray(v, np.float32)).to(dt).double().numpy()


def scaled(acc, a_s, w_s, b, kind):
    """fmaf(__int2float_rn(acc) * as, ws, b), then the store's rounding."""
    x = np.asarray(acc).astype(np.float32) * np.asarray(a_s, np.float32)
    return to_out(fma_f32(x, w_s, b), kind)


def bias_at(p, n):
    return np.zeros(np.shape(n), np.float32) if p["bias"] is None else gread(p["bias"], n, "bias")


def store_main(p, cfg, k, cta, y, kind, out):
    """The main kernel's epilogue for one CTA, vectorized over (warp, i, j, h, lane): thread
    (g, c) stores accumulators (2h, 2h + 1) of tile (i, j) to (m, n), (m, n + 1)."""
    m0, n0, acc, skipped = cta
    W = np.arange(cfg.kWarps)[:, None, None, None, None]
    i = np.arange(cfg.kMT)[None, :, None, None, None]
    j = np.arange(cfg.kNT)[None, None, :, None, None]
    h = np.arange(2)[None, None, None, :, None]
    wm, wn = W // cfg.kWarpsN, W % cfg.kWarpsN
    n = n0 + wn * cfg.kWN + j * 8 + 2 * C                 # (W, 1, NT, 1, 32)
    n_ok = k["n_guard"](n, p["N"])                        # `if (n >= p.N) continue;`
    m = k["epi_m"](m0, wm, cfg.kWM, i, G, h)              # (W, MT, 1, 2, 32)
    full = np.broadcast_shapes(n.shape, m.shape)
    ok = np.broadcast_to(n_ok, full) & (m < p["M"])
    assert not np.broadcast_to(skipped[:, :, :, None, None], full)[ok].any(), \
        "a stored accumulator comes from an MMA the emulation skipped"
    v0, v1 = acc[W, i, j, LANE, 2 * h], acc[W, i, j, LANE, 2 * h + 1]
    dst = y * p["split_stride"] + m * p["N"] + n
    if kind == "i32":
        out.store_pair(dst[ok], v0[ok], v1[ok])
        return
    n_read = n[np.broadcast_to(n_ok, n.shape)]           # ws0, ws1, b0, b1: read for every n < N
    gread(p["w_scale"], np.concatenate([n_read, n_read + 1]), "w_scale")
    bias_at(p, np.concatenate([n_read, n_read + 1]))
    nb = np.broadcast_to(n, full)[ok]
    a_s = gread(p["a_scale"], np.broadcast_to(m, full)[ok] * p["a_scale_stride"], "a_scale")
    out.store_pair(dst[ok], scaled(v0[ok], a_s, p["w_scale"][nb], bias_at(p, nb), kind),
                   scaled(v1[ok], a_s, p["w_scale"][nb + 1], bias_at(p, nb + 1), kind))


def strided(total, stride):
    """Every i that `for (i = t; i < total; i += stride)` visits over the threads t < stride."""
    if total <= 0:
        return np.zeros(0, np.int64)
    t = np.arange(stride)
    i = (t[None, :] + stride * np.arange((total + stride - 1) // stride)[:, None]).ravel()
    return i[i < total]


def splitk_reduce(p, k, ws, splits, kind, out):
    """int8_splitk_reduce_kernel (256 threads, min(ceil(pairs / 256), 4096) blocks): pair e = 2i
    summed over the splits' planes in order, then the raw or scaled store."""
    M, N = p["M"], p["N"]
    pairs = M * N // 2
    blocks = min((pairs + 255) // 256, 4096)
    e = 2 * strided(pairs, blocks * 256)
    s0, s1 = np.zeros(e.size, np.int64), np.zeros(e.size, np.int64)
    for z in range(k["reduce_splits"](splits)):
        idx = z * p["split_stride"] + e
        assert (idx % 2 == 0).all() and (idx.size == 0 or idx.max() + 1 < ws.size), "partial read out of bounds"
        assert (ws.count[idx] == 1).all() and (ws.count[idx + 1] == 1).all(), "reads workspace pass 1 never wrote"
        s0, s1 = s0 + ws.v[idx].astype(np.int64), s1 + ws.v[idx + 1].astype(np.int64)
        assert max(np.abs(s0).max(initial=0), np.abs(s1).max(initial=0)) < 2 ** 31, "int32 split sum overflow"
    if kind == "i32":
        out.store_pair(e, s0, s1)
        return
    m, n = e // N, e % N
    a_s = gread(p["a_scale"], m * p["a_scale_stride"], "a_scale")
    w0, w1 = gread(p["w_scale"], n, "w_scale"), gread(p["w_scale"], n + 1, "w_scale")
    out.store_pair(e, scaled(s0, a_s, w0, bias_at(p, n), kind), scaled(s1, a_s, w1, bias_at(p, n + 1), kind))


# ----------------------------------------------------------------------------------------------
# The launcher (int8_launcher.cu, int8_traits.h, common.h): plan and the two launch paths.

def ceil_div(a, b):
    return (a + b - 1) // b


def split_k_for_tiles(tiles, k_tiles, num_sms):
    split = 1
    while split < MAX_SPLIT_K and tiles * split < num_sms and k_tiles // (2 * split) >= MIN_K_TILES_PER_SPLIT:
        split *= 2
    return split


def choose_gemm_config(M, N, K, num_sms):
    if M <= 16:
        return 0
    if M <= 32:
        return 1
    if M <= 64:
        return 2
    if M <= 128:
        return 3
    return 4 if ceil_div(M, 128) * ceil_div(N, 256) >= num_sms else 3


def choose_split_k(config, M, N, K, num_sms):
    if config not in (0, 1, 2, 3) or (config == 3 and M > SPLIT_K_MAX_M):
        return 1
    kBM, kBN, kBK = CONFIGS[config][:3]
    return split_k_for_tiles(ceil_div(M, kBM) * ceil_div(N, kBN), ceil_div(K, kBK), num_sms)


def gmem(x, ld, poison_rng):
    """Rows of x at stride ld in a byte buffer of the minimal extent (rows - 1) * ld + cols,
    the gaps between rows poisoned."""
    rows, cols = x.shape
    buf = poison_rng.integers(0, 256, (rows - 1) * ld + cols if rows and cols else 0, dtype=np.uint8)
    if rows and cols:
        buf[(np.arange(rows)[:, None] * ld + np.arange(cols)).ravel()] = np.ascontiguousarray(x).view(np.uint8).ravel()
    return buf


def int8_gemm(a, b, a_scale, w_scale, bias, *, lda, ldb, sms=132, workspace=True, config=None, splits=None,
              kinds=OUT_KINDS, k=KERNEL):
    """int8_gemm (int8_launcher.cu) after its checks, on a (M, K) / b (N, K) int8 at row strides
    lda / ldb: returns ({kind: Out}, (config, planned splits, launched splits)). config / splits
    force the choices (run_int8_gemm<OutT, config> is valid for any shape)."""
    M, K = a.shape
    N = b.shape[0]
    assert N % 16 == 0 and K % 16 == 0 and M > 0 and N > 0
    if K == 0:
        lda = ldb = 0
    rng = np.random.default_rng(12345)
    p = dict(M=M, N=N, K=K, lda=lda if M > 1 else K, ldb=ldb if N > 1 else K, kps=0, split_stride=0,
             a_scale=a_scale, a_scale_stride=0 if a_scale.size == 1 else 1, w_scale=w_scale, bias=bias)
    p["a"], p["b"] = gmem(a, p["lda"], rng), gmem(b, p["ldb"], rng)
    config = choose_gemm_config(M, N, K, sms) if config is None else config
    planned = choose_split_k(config, M, N, K, sms) if splits is None else splits
    cfg = Cfg(*CONFIGS[config])
    tiles = ceil_div(M, cfg.kBM) * ceil_div(N, cfg.kBN)
    outs = {kind: Out(M * N) for kind in kinds}
    if planned > 1 and workspace:
        k_tiles = ceil_div(K, cfg.kBK)
        q = dict(p, kps=ceil_div(k_tiles, planned), split_stride=M * N)
        launched = ceil_div(k_tiles, q["kps"])
        ws = Out(planned * M * N)                       # workspace_bytes >= splits * M * N * 4
        for pid in range(tiles):
            for y in range(launched):
                store_main(q, cfg, k, run_cta(q, cfg, k, pid, y), y, "i32", ws)
        assert (ws.count[:launched * M * N] == 1).all(), "every workspace element written once per split"
        assert not ws.count[launched * M * N:].any()
        for kind in kinds:
            splitk_reduce(dict(p, split_stride=M * N), k, ws, launched, kind, outs[kind])
        return outs, (config, planned, launched)
    ctas = [run_cta(p, cfg, k, pid, 0) for pid in range(tiles)]
    for kind in kinds:
        for cta in ctas:
            store_main(p, cfg, k, cta, 0, kind, outs[kind])
    return outs, (config, planned, 1)


def gemm_data(M, N, K, seed, per_token=True, bias_dtype=torch.float16):
    rng = np.random.default_rng(seed)
    a = rng.integers(-128, 128, (M, K), dtype=np.int8)
    b = rng.integers(-128, 128, (N, K), dtype=np.int8)
    a[0, :16], b[0, :16] = -128, -128                   # the extreme product, 16 times
    a_scale = (rng.random(M if per_token else 1) + 0.5).astype(np.float32)
    w_scale = (rng.random(N) / 64 + 1 / 512).astype(np.float32)
    bias = None if bias_dtype is None else torch.randn(N, generator=torch.Generator().manual_seed(seed)).to(
        bias_dtype).float().numpy()                     # bias_at: exact conversion to fp32
    return a, b, a_scale, w_scale, bias


def check_gemm(outs, a, b, a_scale, w_scale, bias):
    """Stored output == reference: int32 exactly; scaled ones bit-exactly (same fp32 operations
    on the exact product, with a_scale[m or 0], w_scale[n], bias[n])."""
    M, N = a.shape[0], b.shape[0]
    exact = a.astype(np.int64) @ b.astype(np.int64).T
    for kind, out in outs.items():
        assert (out.count[:M * N] == 1).all(), f"{kind}: every output element stored exactly once"
        assert not out.count[M * N:].any(), f"{kind}: a store past the output"
        got = out.v[:M * N].reshape(M, N)
        if kind == "i32":
            ref = exact
        else:
            a_s = a_scale[:, None] if a_scale.size == M else np.full((M, 1), a_scale[0], np.float32)
            b_row = np.zeros((1, N), np.float32) if bias is None else bias[None, :]
            ref = scaled(exact, a_s, w_scale[None, :], b_row, kind)
        assert np.array_equal(got, ref), f"{kind}: output differs from the reference"


# ----------------------------------------------------------------------------------------------
# W8A16 (w8a16_gemm_kernel.cuh).

def byte_perm(x, y, s):
    """__byte_perm(x, y, s): byte i of the result is byte (s >> 4i) & 7 of the 8 bytes y:x
    (x = bytes 0-3)."""
    v = (np.uint64(y) << np.uint64(32)) | np.asarray(x, np.uint32).astype(np.uint64)
    r = np.zeros(np.shape(x), np.uint64)
    for i in range(4):
        sel = (s >> (4 * i)) & 7
        r |= ((v >> np.uint64(8 * sel)) & np.uint64(0xFF)) << np.uint64(8 * i)
    return r.astype(np.uint32)


def bf16_rn_bits(f):
    """__float2bfloat16_rn of fp32 (no NaN here): bits, round to nearest even."""
    b = np.asarray(f, np.float32).view(np.uint32).astype(np.uint64)
    return ((b + 0x7FFF + ((b >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16)).astype(np.uint32)


def dequant4(w, dtype, k):
    """dequant4<T>(w, lo, hi) on uint32 words w (n,): returns (lo, hi) registers."""
    u = np.asarray(w, np.uint32) ^ np.uint32(0x80808080)
    if dtype == torch.float16:
        one152 = np.array([0x6480], np.uint16).view(np.float16)[0]
        res = []
        for sel in k["dq_half_sel"]:
            r = np.ascontiguousarray(byte_perm(u, 0x64646464, sel))
            halves = r.view(np.float16) - one152              # __hsub2: exact here
            res.append(np.ascontiguousarray(halves.astype(np.float16)).view(np.uint32))
        return res[0], res[1]
    f = [byte_perm(u, 0x4B000000, sel).view(np.float32) - np.float32(8388736.0) for sel in k["dq_bf16_sel"]]
    lo = bf16_rn_bits(f[0]) | (bf16_rn_bits(f[1]) << np.uint32(16))
    hi = bf16_rn_bits(f[2]) | (bf16_rn_bits(f[3]) << np.uint32(16))
    return lo, hi


W8A16_KERNEL = dict(
    dq_half_sel=(0x4140, 0x4342),
    dq_bf16_sel=(0x7440, 0x7441, 0x7442, 0x7443),
    a_regs=((0, 2), (1, 3)),                  # dequant4(w0[s], a[0], a[2]); dequant4(w8[s], a[1], a[3])
    x_word=lambda s: (s // 2, (s % 2) * 2, (s % 2) * 2 + 1),   # xv[u][t][s / 2]: words of b0, b1
    x_row_off=lambda m, t_ok, ldx: np.where(t_ok, m * ldx, 0),
    x_ok=lambda ok, t_ok: ok & t_ok,
    chunk_ok=lambda k, c, K: k + 16 * c < K,
    group_index=lambda blk, group: blk * 64 // group,
    red_rows=lambda g: (g, g + 8),            # channels of acc[t][0 / 1] and acc[t][2 / 3]
)


def ld16(buf, off, ok, what):
    """16-byte loads (ld.global.nc.L1::no_allocate.v4 / __ldg uint4) of the lanes with ok (byte
    offsets), zeros for the others; -> (..., 4) uint32."""
    off = np.broadcast_to(off, ok.shape)
    o = off[ok]
    assert (o % 16 == 0).all(), f"{what}: 16-byte load not aligned"
    assert o.size == 0 or (o.min() >= 0 and o.max() + 16 <= buf.size), f"{what} read out of bounds"
    data = np.zeros(ok.shape + (16,), np.uint8)
    data[ok] = buf[o[:, None] + AR16]
    return data.view(np.uint32)


def w8a16_cta(p, T, kWarps, k, bx, dtype, out):
    """w8a16_kernel<T, kTokenTiles, kWarps> for blockIdx.x = bx; stores the fp32 value before
    from_float (float64 here) into out."""
    M, N, K = p["M"], p["N"], p["K"]
    U, kTok = W8A16_UNROLL, 8 * T
    red = np.full((kWarps, kTok, W8A16_ROWS), np.nan)
    red_count = np.zeros(red.shape, np.int64)
    n0 = bx * W8A16_ROWS
    w_g = (n0 + G) * p["ldw"] + 16 * C                    # bytes; row g + 8 at + w_next8
    w_next8 = 8 * p["ldw"]
    m_t = G[None, :] + 8 * np.arange(T)[:, None]          # (T, 32)
    t_ok = m_t < M
    x_t = k["x_row_off"](m_t, t_ok, p["ldx"]) + 16 * C    # elements
    grouped = p["group"] > 0
    s_g = (n0 + G) * p["s_n"]
    s_g8 = s_g + 8 * p["s_n"]
    nblocks = (K + 63) // 64
    (i0, i1), (i2, i3) = k["a_regs"]
    for warp in range(kWarps):
        acc = np.zeros((T, 32, 4))
        for b0 in range(warp, nblocks, kWarps * U):
            wv = np.zeros((U, 2, 32, 4), np.uint32)
            xv = np.zeros((U, T, 2, 32, 4), np.uint32)
            for u in range(U):
                kk = (b0 + u * kWarps) * 64
                ok = (b0 + u * kWarps < nblocks) & k["chunk_ok"](kk, C, K)
                ok = np.broadcast_to(ok, (32,))
                wv[u, 0] = ld16(p["w"], w_g + kk, ok, "w")
                wv[u, 1] = ld16(p["w"], w_g + w_next8 + kk, ok, "w")
                for t in range(T):
                    okt = k["x_ok"](ok, t_ok[t])
                    xv[u, t, 0] = ld16(p["x"], 2 * (x_t[t] + kk), okt, "x")
                    xv[u, t, 1] = ld16(p["x"], 2 * (x_t[t] + kk + 8), okt, "x")
            for u in range(U):
                blk = b0 + u * kWarps
                if blk >= nblocks:
                    break
                part = np.zeros((T, 32, 4))
                for s in range(4):
                    a = np.zeros((32, 4), np.uint32)
                    a[:, i0], a[:, i1] = dequant4(wv[u, 0][:, s], dtype, k)
                    a[:, i2], a[:, i3] = dequant4(wv[u, 1][:, s], dtype, k)
                    half, r0, r1 = k["x_word"](s)
                    for t in range(T):
                        part[t] = mma_m16n8k16(a, xv[u, t, half][:, r0], xv[u, t, half][:, r1], part[t], dtype)
                sc0 = sc8 = np.ones(32)
                if grouped:
                    gi = k["group_index"](blk, p["group"]) * p["s_g"]
                    sc0, sc8 = gread(p["scale"], s_g + gi, "w_scale"), gread(p["scale"], s_g8 + gi, "w_scale")
                acc[:, :, 0:2] = part[:, :, 0:2] * sc0[None, :, None] + acc[:, :, 0:2]     # fmaf, exact here
                acc[:, :, 2:4] = part[:, :, 2:4] * sc8[None, :, None] + acc[:, :, 2:4]
        rg, rg8 = k["red_rows"](G)
        for t in range(T):
            for reg, tok, ch in ((0, 8 * t + 2 * C, rg), (1, 8 * t + 2 * C + 1, rg), (2, 8 * t + 2 * C, rg8),
                                 (3, 8 * t + 2 * C + 1, rg8)):
                red[warp, tok, ch] = acc[t, :, reg]
                np.add.at(red_count, (warp, tok, ch), 1)
    assert (red_count == 1).all(), "every reduction slot written exactly once"
    i = strided(kTok * W8A16_ROWS, kWarps * 32)
    m, r = i // W8A16_ROWS, i % W8A16_ROWS
    m, r = m[m < M], r[m < M]
    v = np.zeros(m.size)
    for w in range(kWarps):
        v = v + red[w, m, r]
    n = n0 + r
    if not grouped:
        v = v * gread(p["scale"], n * p["s_n"], "w_scale")
    v = v + bias_at(p, n)
    dst = m * N + n
    assert dst.size == 0 or (dst.min() >= 0 and dst.max() < out.size), "store outside the output"
    np.add.at(out.count, dst, 1)
    out.v[dst] = v


def choose_w8a16_config(M, N, K, num_sms):
    token_tiles, warps = (1 if M <= 8 else 2), 8
    if K < 8 * 64 * 2:
        warps = 4
    return token_tiles, warps


def w8a16(x, w, scale, group, bias, *, ldx, ldw, variant=None, k=W8A16_KERNEL):
    """w8a16_gemm (int8_launcher.cu) after its checks: x (M, K) fp16 / bf16 tensor at row stride
    ldx (elements), w (N, K) int8 at ldw, scale a float32 tensor view (N,) or (N, K / group).
    Returns (Out of the pre-rounding values, (token tiles, warps))."""
    M, K = x.shape
    N = w.shape[0]
    assert M <= W8A16_MAX_M and N % 16 == 0 and K % 16 == 0 and (group == 0 or (group % 64 == 0 and K % group == 0))
    rng = np.random.default_rng(777)
    bits = x.view(torch.int16).numpy().view(np.uint16)
    nan = 0x7E00 if x.dtype == torch.float16 else 0x7FC0
    xbuf = np.full((M - 1) * ldx + K, nan, np.uint16)     # minimal extent, NaN between rows
    xbuf[(np.arange(M)[:, None] * ldx + np.arange(K)).ravel()] = bits.ravel()
    # the scale tensor's storage of minimal extent, NaN in the gaps
    s_n = scale.stride(0) if N > 1 else 0
    s_g = scale.stride(1) if group and scale.dim() == 2 and scale.shape[1] > 1 else 0
    extent = 1 + (scale.shape[0] - 1) * scale.stride(0) + (
        (scale.shape[1] - 1) * scale.stride(1) if scale.dim() == 2 else 0)
    sbuf = np.full(extent, np.nan, np.float32)
    sbuf[np.asarray(torch.as_strided(torch.arange(extent), scale.shape, scale.stride()).reshape(-1))] = \
        scale.reshape(-1).numpy()
    p = dict(M=M, N=N, K=K, ldx=ldx if M > 1 else 0, ldw=ldw if N > 1 else K, s_n=s_n, s_g=s_g if group > 0 else 0,
             group=group, scale=sbuf, bias=bias, w=gmem(w, ldw if N > 1 else K, rng), x=xbuf.view(np.uint8))
    T, warps = choose_w8a16_config(M, N, K, 132) if variant is None else variant
    out = Out(M * N)
    for bx in range(N // W8A16_ROWS):
        w8a16_cta(p, T, warps, k, bx, x.dtype, out)
    return out, (T, warps)


def w8a16_data(M, N, K, dtype, group, layout, seed, bias_dtype=torch.float32):
    """Inputs on which every sum is exact in float64: x multiples of 1/8 below 4, int8 weights,
    power-of-two scales, bias multiples of 1/8."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randint(-32, 33, (M, K), generator=gen) / 8).to(dtype)
    w = torch.randint(-128, 128, (N, K), generator=gen, dtype=torch.int8).numpy()
    w[0, :16] = -128
    groups = K // group if group else 1
    scale = 2.0 ** -torch.randint(3, 10, (N, groups), generator=gen).float()
    if group == 0:
        scale = scale[:, 0] if layout == "contiguous" else torch.empty(N, 2).copy_(scale.expand(N, 2))[:, 0]
    elif layout == "transposed":
        scale = scale.t().contiguous().t()               # strides (1, N)
    bias = None if bias_dtype is None else (torch.randint(-64, 65, (N,), generator=gen) / 8).to(bias_dtype).float().numpy()
    return x, w, scale, bias


def check_w8a16(out, x, w, scale, group, bias):
    M, N = x.shape[0], w.shape[0]
    assert (out.count[:M * N] == 1).all(), "every output element stored exactly once"
    assert not out.count[M * N:].any(), "a store past the output"
    s = scale.double().reshape(N, -1)
    s_full = s.repeat_interleave(group, dim=1) if group else s
    ref = x.double() @ (torch.from_numpy(w).double() * s_full).t()
    if bias is not None:
        ref = ref + torch.from_numpy(bias).double()
    got = out.v[:M * N].reshape(M, N)
    assert np.array_equal(got, ref.numpy()), f"max error {np.nanmax(np.abs(got - ref.numpy()))}"


# ----------------------------------------------------------------------------------------------
# Tests: the models' own tables and helpers.

def test_isa_fragment_tables_cover_each_element_once():
    for rows, cols, shape in (("s8_a_row", "s8_a_col", (16, 32)), ("s8_b_row", "s8_b_col", (32, 8)),
                              ("d_row", "d_col", (16, 8)), ("h_a_row", "h_a_col", (16, 16)),
                              ("h_b_row", "h_b_col", (16, 8))):
        flat = ISA[rows] * shape[1] + ISA[cols]
        assert np.array_equal(np.sort(flat.ravel()), np.arange(shape[0] * shape[1])), rows
    # The ISA's s8 fragments are the int8_ptx.cuh comment's: a[0] row g k 4c.., a[1] row g + 8,
    # a[2] row g k 16 + 4c.., b[1] k 16 + 4c..
    assert np.array_equal(ISA["s8_a_row"][:, 4:8], (G + 8)[:, None].repeat(4, 1))
    assert np.array_equal(ISA["s8_a_col"][:, 8], 16 + 4 * C)


def _round_f32_exact(fr):
    c = np.float32(float(fr))
    cands = [np.nextafter(c, np.float32(-np.inf)), c, np.nextafter(c, np.float32(np.inf))]
    err = [abs(Fraction(float(v)) - fr) for v in cands]
    best = min(err)
    ties = [v for v, e in zip(cands, err) if e == best]
    return ties[0] if len(ties) == 1 else [v for v in ties if np.array(v).view(np.int32) % 2 == 0][0]


def test_fma_f32_model_rounds_once():
    x = np.float32(1 + 2.0 ** -12)
    y = np.float32(1 - 4095 * 2.0 ** -24)
    z = np.float32(2.0 ** 24)
    # x * y + z = 2^24 + 1 + 2^-36: fp64 rounds it to the fp32 tie 2^24 + 1, fp32 then to 2^24.
    assert np.float32(np.float64(x) * np.float64(y) + np.float64(z)) == np.float32(2.0 ** 24)
    assert fma_f32(x, y, z) == np.float32(2.0 ** 24 + 2)
    rng = np.random.default_rng(3)
    xs, ys = rng.standard_normal(400).astype(np.float32), rng.standard_normal(400).astype(np.float32)
    zs = (rng.standard_normal(400) * 2.0 ** rng.integers(-30, 30, 400)).astype(np.float32)
    got = fma_f32(xs, ys, zs)
    for a, b, c, g in zip(xs, ys, zs, got):
        assert g == _round_f32_exact(Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c)))


def test_raster_is_a_bijection():
    for tiles_m in range(1, 20):
        for tiles_n in (1, 2, 3, 7):
            got = {raster(pid, tiles_m, tiles_n) for pid in range(tiles_m * tiles_n)}
            assert got == {(m, n) for m in range(tiles_m) for n in range(tiles_n)}


def test_strided_loops_cover_once():
    # int8_splitk_reduce_kernel past its 4096-block cap (every thread loops), and a small one.
    for pairs in (5, 4096 * 256 * 2 + 77):
        blocks = min((pairs + 255) // 256, 4096)
        i = strided(pairs, blocks * 256)
        assert i.size == pairs and np.array_equal(np.sort(i), np.arange(pairs))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_w8a16_dequant4_all_bytes(dtype):
    # Every byte value in every position: lo = (byte 0, byte 1), hi = (byte 2, byte 3), exact.
    v = np.arange(256, dtype=np.int64)
    for pos in range(4):
        words = np.full(256, 0x01020304, np.int64)
        words = (words & ~(0xFF << (8 * pos))) | (v << (8 * pos))
        lo, hi = dequant4(words.astype(np.uint32), dtype, W8A16_KERNEL)
        vals = _halves(np.stack([lo, hi], -1), dtype)            # (256, 4): bytes 0..3 as values
        expect = np.stack([(words.astype(np.uint32) >> (8 * b)) & 0xFF for b in range(4)], -1).astype(np.uint8)
        assert np.array_equal(vals, expect.view(np.int8).astype(np.float64))


# ----------------------------------------------------------------------------------------------
# W8A8: every config x M x out dtype, N and K tails, then split-K through the launcher.

GEMM_MS = [1, 5, 16, 17, 33, 97]


def gemm_shape(config):
    kBM, kBN, kBK, _, _, stages = CONFIGS[config]
    # 2 CTAs along N, the second with 16 of kBN columns; kStages + 1 K tiles (the ring wraps),
    # the last with 3 of kBK / 16 chunks.
    return kBN + 16, stages * kBK + 48


@pytest.mark.parametrize("M", GEMM_MS)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_gemm_emulated_matches_exact(config, M):
    N, K = gemm_shape(config)
    assert N % CONFIGS[config][1] and K % CONFIGS[config][2] and N % 16 == 0 and K % 16 == 0
    bias_dtype = [torch.float16, torch.bfloat16, torch.float32, None][M % 4]
    a, b, a_s, w_s, bias = gemm_data(M, N, K, seed=10 * config + M, per_token=M % 2 == 1, bias_dtype=bias_dtype)
    outs, plan = int8_gemm(a, b, a_s, w_s, bias, lda=K + 32, ldb=K + 16, config=config, splits=1)
    assert plan == (config, 1, 1)
    check_gemm(outs, a, b, a_s, w_s, bias)


SPLIT_CASES = {
    # (M, N, K, sms) -> the launcher's (config, planned splits, launched splits)
    "c0_17tiles_4splits": ((1, 48, 16 * 256 + 48, 132), (0, 4, 4)),    # slices of 5, 5, 5, 2 K tiles
    "c0_1tile_2splits": ((5, 32, 8 * 256, 8), (0, 2, 2)),
    "c1_10tiles_2splits": ((17, 80, 9 * 128 + 16, 132), (1, 2, 2)),     # the last tile 1 chunk
    "c1_plan8_launch7": ((32, 64, 32 * 128 + 16, 132), (1, 8, 7)),      # 33 tiles: 5 per split -> 7
    "c2_1tile_2splits": ((50, 128, 8 * 64 + 16, 132), (2, 2, 2)),       # 9 K tiles: 5 + 4
    "c3_2tiles_4splits": ((100, 256, 16 * 64, 132), (3, 4, 4)),
}


@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_split_k_emulated_matches_exact(case):
    (M, N, K, sms), expect = SPLIT_CASES[case]
    assert choose_gemm_config(M, N, K, sms) == expect[0] and choose_split_k(expect[0], M, N, K, sms) == expect[1]
    a, b, a_s, w_s, bias = gemm_data(M, N, K, seed=len(case), per_token=M > 1)
    outs, plan = int8_gemm(a, b, a_s, w_s, bias, lda=K + 48, ldb=K, sms=sms)
    assert plan == expect
    check_gemm(outs, a, b, a_s, w_s, bias)


def test_launcher_paths():
    # No workspace: the plan's split is dropped (one pass); K == 0 (no K tile: bias only);
    # M == 1 (lda unused, p.lda = K); split-K forced on a config the launcher never splits.
    a, b, a_s, w_s, bias = gemm_data(1, 48, 16 * 256 + 48, seed=1)
    outs, plan = int8_gemm(a, b, a_s, w_s, bias, lda=10 ** 6, ldb=16 * 256 + 64, workspace=False)
    assert plan == (0, 4, 1)
    check_gemm(outs, a, b, a_s, w_s, bias)
    a, b, a_s, w_s, bias = gemm_data(5, 32, 0, seed=2)
    outs, plan = int8_gemm(a, b, a_s, w_s, bias, lda=0, ldb=0)
    check_gemm(outs, a, b, a_s, w_s, bias)
    assert np.array_equal(outs["f32"].v[:5 * 32].reshape(5, 32), np.broadcast_to(bias, (5, 32)))
    a, b, a_s, w_s, bias = gemm_data(40, 144, 5 * 64 + 16, seed=3)
    outs, plan = int8_gemm(a, b, a_s, w_s, bias, lda=5 * 64 + 16, ldb=5 * 64 + 32, config=3, splits=2)
    assert plan == (3, 2, 2)
    check_gemm(outs, a, b, a_s, w_s, bias)


def test_plan_mirror_matches_extension():
    # The planner mirrored above (choose_gemm_config, split_k_for_tiles) == the C++ one.
    from fastllm import _ext
    why = _ext.unavailable_reason()
    if why:
        pytest.skip(why)
    plan = _ext.lib().int8_gemm_plan
    for M in (1, 5, 16, 17, 32, 33, 64, 65, 128, 129, 1000, 5000):
        for N in (16, 48, 1024, 4096, 14336):
            for K in (16, 256, 1024, 4096, 4112, 14336, 131056):
                for sms in (1, 20, 108, 132):
                    config = choose_gemm_config(M, N, K, sms)
                    assert tuple(plan(M, N, K, sms)) == (config, choose_split_k(config, M, N, K, sms)), (M, N, K, sms)


# ----------------------------------------------------------------------------------------------
# W8A16.

W8A16_SCALES = {"channel": (0, "contiguous"), "channel_strided": (0, "strided"), "group64": (64, "contiguous"),
                "group128_transposed": (128, "transposed")}


@pytest.mark.parametrize("scale_kind", list(W8A16_SCALES))
@pytest.mark.parametrize("M", [1, 5, 8, 9, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_w8a16_emulated_matches_exact(dtype, M, scale_kind):
    group, layout = W8A16_SCALES[scale_kind]
    long_k = M % 2 == 1                                   # 8 warps (K >= 1024), else 4
    K = (1152 if long_k else 640) if group else (1072 if long_k else 624)   # per channel: a K tail
    N = 32
    bias_dtype = None if M == 8 else torch.float32
    x, w, scale, bias = w8a16_data(M, N, K, dtype, group, layout, seed=M + len(scale_kind), bias_dtype=bias_dtype)
    out, variant = w8a16(x, w, scale, group, bias, ldx=K + 8 * (M % 3), ldw=K + 16)
    assert variant == ((1 if M <= 8 else 2), (8 if long_k else 4))
    check_w8a16(out, x, w, scale, group, bias)


@pytest.mark.parametrize("variant", [(2, 8), (1, 4)])
def test_w8a16_other_variants(variant):
    # Instantiations the launcher would not pick for this shape are correct too.
    x, w, scale, bias = w8a16_data(5, 48, 640, torch.bfloat16, 128, "contiguous", seed=9)
    out, _ = w8a16(x, w, scale, 128, bias, ldx=640, ldw=656, variant=variant)
    check_w8a16(out, x, w, scale, 128, bias)


# ----------------------------------------------------------------------------------------------
# Mutants: deliberately wrong index math must make the checks above fail.

def _gemm_mutant(**mut):
    # config 0 forced: 2 x 2 CTAs (M and N tails), 2 split-K slices (5 + 4 K tiles, K tail).
    a, b, a_s, w_s, bias = gemm_data(17, 48, 8 * 256 + 48, seed=5)
    outs, _ = int8_gemm(a, b, a_s, w_s, bias, lda=8 * 256 + 80, ldb=8 * 256 + 48, config=0, splits=2,
                        k=dict(KERNEL, **mut))
    check_gemm(outs, a, b, a_s, w_s, bias)


def _w8a16_mutant(dtype=torch.float16, group=0, **mut):
    K = 1152 if group else 1072
    x, w, scale, bias = w8a16_data(9, 32, K, dtype, group, "contiguous", seed=4)
    out, _ = w8a16(x, w, scale, group, bias, ldx=K + 8, ldw=K + 16, k=dict(W8A16_KERNEL, **mut))
    check_w8a16(out, x, w, scale, group, bias)


MUTANTS = {
    "ldmatrix_without_swizzle": lambda: _gemm_mutant(lane_xor=lambda tile, r, cb: cb),
    "b_lanes_as_a_lanes": lambda: _gemm_mutant(b_lane=KERNEL["a_lane"]),
    "b_registers_swapped": lambda: _gemm_mutant(b_regs=lambda j: (j // 2, (j % 2) * 2 + 1, (j % 2) * 2)),
    "wait_one_group_too_few": lambda: _gemm_mutant(wait_in_loop=lambda stages: stages - 1),
    "next_load_into_current_stage": lambda: _gemm_mutant(next_stage=lambda nxt, stages: (nxt + 1) % stages),
    "raster_group_rows_unclamped": lambda: _gemm_mutant(
        raster=lambda pid, tm, tn: ((pid % (K_GROUP_M * tn)) % K_GROUP_M, (pid % (K_GROUP_M * tn)) // K_GROUP_M)),
    "split_k_len_unclamped": lambda: _gemm_mutant(
        k_range=lambda y, kps, K, kBK: (y * kps * kBK, kps * kBK)),
    "split_slices_from_k0": lambda: _gemm_mutant(k_range=lambda y, kps, K, kBK: k_range(0, kps, K, kBK)),
    "rows_past_m_loaded": lambda: _gemm_mutant(rows_valid=lambda kB, total, base: kB),
    "epilogue_rows_g_g8_swapped": lambda: _gemm_mutant(
        epi_m=lambda m0, wm, kWM, i, g, h: m0 + wm * kWM + i * 16 + g + 8 * (1 - h)),
    "epilogue_without_n_guard": lambda: _gemm_mutant(n_guard=lambda n, N: np.ones(np.shape(n), bool)),
    "reduce_drops_last_split": lambda: _gemm_mutant(reduce_splits=lambda s: s - 1),
    "w8a16_fp16_dequant_bytes_swapped": lambda: _w8a16_mutant(dq_half_sel=(0x4041, 0x4342)),
    "w8a16_bf16_dequant_bytes_swapped": lambda: _w8a16_mutant(
        torch.bfloat16, dq_bf16_sel=(0x7440, 0x7441, 0x7443, 0x7442)),
    "w8a16_a1_a2_swapped": lambda: _w8a16_mutant(a_regs=((0, 1), (2, 3))),
    "w8a16_x_word_wrong": lambda: _w8a16_mutant(x_word=lambda s: (s // 2, s % 2, s % 2 + 1)),
    "w8a16_group_index_in_k": lambda: _w8a16_mutant(group=64, group_index=lambda blk, group: blk // group),
    "w8a16_k_tail_loaded": lambda: _w8a16_mutant(chunk_ok=lambda k, c, K: np.ones(32, bool)),
    "w8a16_padding_tokens_loaded": lambda: _w8a16_mutant(
        x_row_off=lambda m, t_ok, ldx: m * ldx, x_ok=lambda ok, t_ok: ok),
    "w8a16_red_channels_swapped": lambda: _w8a16_mutant(red_rows=lambda g: (g + 8, g)),
}


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_mutant_kernel_fails(mutant):
    with pytest.raises(AssertionError):
        MUTANTS[mutant]()


# ----------------------------------------------------------------------------------------------
# Lines of the sources the emulation above mirrors (whitespace-normalized); if one changes,
# update the mirror and this list together.
MIRRORED_KERNEL_LINES = [   # int8_gemm_kernel.cuh (+ int8_epilogue.cuh, where store_pair lives)
    "static constexpr int kGroup = kChunks < 8 ? kChunks : 8;",
    "static constexpr int kRowsPerLine = 8 / kGroup;",
    "static constexpr int kRowBytes = kGroup * 16;",
    "const int phys = (chunk % kGroup) ^ ((row / kRowsPerLine) % kGroup);",
    "return static_cast<uint32_t>(((chunk / kGroup) * kRows + row) * kRowBytes + phys * 16);",
    "__device__ static __forceinline__ uint32_t lane_row(int r) { return static_cast<uint32_t>(r * kRowBytes); }",
    "__device__ static __forceinline__ int lane_xor(int r, int cb) { return cb ^ ((r / kRowsPerLine) % kGroup); }",
    "return base_plus_lane_row + static_cast<uint32_t>(((chunk0 / kGroup) * kRows + row0) * kRowBytes) +",
    "static_cast<uint32_t>(((chunk0 % kGroup) ^ lane_x) << 4);",
    "constexpr int kTotal = kRows * kChunks;",
    "for (int i0 = 0; i0 < kTotal; i0 += kThreads) {",
    "const int i = i0 + tid;",
    "if (kTotal % kThreads == 0 || i < kTotal) {",
    "const int row = i / kChunks, chunk = i % kChunks;",
    "const int k = k0 + chunk * 16;",
    "const bool valid = row < rows_valid && k < K;",
    "const int8_t* src = valid ? g + row * ld + k : g;",
    "cp_async_16(stage + Tile::offset(row, chunk), src, valid);",
    "using ATile = SwizzledTile<kBM, kChunks>;",
    "using BTile = SwizzledTile<kBN, kChunks>;",
    "const uint32_t sB = sA + kStages * kBM * kBK;",
    "grouped_tile((p.M + kBM - 1) / kBM, (p.N + kBN - 1) / kBN, static_cast<int>(blockIdx.x), tile_m, tile_n);",
    "const int per_group = kGroupM * tiles_n;",
    "const int first_m = (pid / per_group) * kGroupM;",
    "const int group_rows = min(tiles_m - first_m, kGroupM);",
    "tile_m = first_m + (pid % per_group) % group_rows;",
    "tile_n = (pid % per_group) / group_rows;",
    "const int m0 = tile_m * kBM, n0 = tile_n * kBN;",
    "const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;",
    "const int wm = warp / Cfg::kWarpsN, wn = warp % Cfg::kWarpsN;",
    "k_begin = p.k_tiles_per_split > 0 ? static_cast<int>(blockIdx.y) * p.k_tiles_per_split * kBK : 0;",
    "k_slice<kBK>(p, k_begin, k_len);",
    "k_len = p.k_tiles_per_split > 0 ? max(0, min(p.K - k_begin, p.k_tiles_per_split * kBK)) : p.K;",
    "const int8_t* ga = p.a + static_cast<int64_t>(m0) * p.lda + k_begin;",
    "const int8_t* gb = p.b + static_cast<int64_t>(n0) * p.ldb + k_begin;",
    "const int rows_a = min(kBM, p.M - m0), rows_b = min(kBN, p.N - n0);",
    "const int KT = (k_len + kBK - 1) / kBK;",
    "load_tile<kBM, kChunks, kThreads>(sA + stage * kBM * kBK, ga, p.lda, rows_a, kt * kBK, k_len, tid);",
    "load_tile<kBN, kChunks, kThreads>(sB + stage * kBN * kBK, gb, p.ldb, rows_b, kt * kBK, k_len, tid);",
    "const int ra = lane % 8 + 8 * ((lane / 8) % 2), ca = lane / 16;",
    "const int rb = lane % 8 + 8 * (lane / 16), cb = (lane / 8) % 2;",
    "const uint32_t a_lane = sA + ATile::lane_row(ra);",
    "const uint32_t b_lane = sB + BTile::lane_row(rb);",
    "const int a_x = ATile::lane_xor(ra, ca), b_x = BTile::lane_xor(rb, cb);",
    "for (int s = 0; s < kStages - 1; ++s) {",
    "if (s < KT) load_stage(s, s);",
    "for (int kt = 0; kt < KT; ++kt) {",
    "cp_async_wait<kStages - 2>();",
    "const int next = kt + kStages - 1;",
    "if (next < KT) load_stage(next % kStages, next);",
    "const int stage = kt % kStages;",
    "const uint32_t a_st = a_lane + stage * kBM * kBK, b_st = b_lane + stage * kBN * kBK;",
    "for (int ks = 0; ks < kBK / 32; ++ks) {",
    "for (int i = 0; i < kMT; ++i) ldmatrix_x4(af[i], ATile::addr(a_st, a_x, wm * Cfg::kWM + i * 16, 2 * ks));",
    "for (int j = 0; j < kNT / 2; ++j) ldmatrix_x4(bf[j], BTile::addr(b_st, b_x, wn * Cfg::kWN + j * 16, 2 * ks));",
    "for (int j = 0; j < kNT; ++j) mma_s8_16832(acc[i][j], af[i], bf[j / 2][(j % 2) * 2], bf[j / 2][(j % 2) * 2 + 1]);",
    "const int g = lane / 4, c = lane % 4;",
    "return static_cast<OutT*>(p.out) + static_cast<int64_t>(blockIdx.y) * p.split_stride;",
    "OutT* out = split_plane<OutT>(p);",
    "const int n = n0 + wn * Cfg::kWN + j * 8 + 2 * c;",
    "if (n >= p.N) continue;",
    "const ColumnPair col = column_pair<OutT>(p, n);",
    "c.ws0 = p.w_scale[n], c.ws1 = p.w_scale[n + 1];",
    "c.b0 = bias_at(p.bias, p.bias_dtype, n), c.b1 = bias_at(p.bias, p.bias_dtype, n + 1);",
    "const int m = m0 + wm * Cfg::kWM + i * 16 + g + 8 * h;",
    "if (m < p.M) store_acc_pair<OutT>(p, out, m, n, acc[i][j][2 * h], acc[i][j][2 * h + 1], col);",
    "OutT* dst = out + static_cast<int64_t>(m) * p.N + n;",
    "*reinterpret_cast<int2*>(dst) = make_int2(a0, a1);",
    "const float as = p.a_scale[static_cast<int64_t>(m) * p.a_scale_stride];",
    "store_pair<OutT>(dst, fmaf(__int2float_rn(a0) * as, col.ws0, col.b0), fmaf(__int2float_rn(a1) * as, col.ws1, col.b1));",
    "*reinterpret_cast<float2*>(p) = make_float2(lo, hi);",
    "*reinterpret_cast<__half2*>(p) = __floats2half2_rn(lo, hi);",
    "*reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(lo, hi);",
    "static_cast<long long>((p.M + Cfg::kBM - 1) / Cfg::kBM) * ((p.N + Cfg::kBN - 1) / Cfg::kBN);",
    "kernel<<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(p.splits)), Cfg::kThreads, kSmem, stream>>>(p);",
    "const int64_t pairs = static_cast<int64_t>(p.M) * p.N / 2;",
    "for (int64_t i = blockIdx.x * 256LL + threadIdx.x; i < pairs; i += static_cast<int64_t>(gridDim.x) * 256) {",
    "const int64_t e = 2 * i;",
    "for (int k = 0; k < splits; ++k) {",
    "const int2 v = *reinterpret_cast<const int2*>(partial + k * p.split_stride + e);",
    "const int m = static_cast<int>(e / p.N), n = static_cast<int>(e % p.N);",
    "store_acc_pair<OutT>(p, static_cast<OutT*>(p.out), m, n, s.x, s.y, column_pair<OutT>(p, n));",
    "const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((pairs + 255) / 256, 4096));",
    "int8_splitk_reduce_kernel<OutT><<<blocks, 256, 0, stream>>>(p, partial, splits);",
]
MIRRORED_PTX_LINES = [      # int8_ptx.cuh
    '"mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "',
    'asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\\n"',
    "return bias == nullptr ? 0.f : load_float(bias, dtype, i);",
    "case kFloat16: return __half2float(static_cast<const __half*>(p)[i]);",          # common/load_float.cuh
    "case kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);",
    "default: return static_cast<const float*>(p)[i];",
    "const int m = g + 8 * t;",
    "t_ok[t] = m < M;",
    "x_t[t] = static_cast<const T*>(x) + (t_ok[t] ? static_cast<int64_t>(m) * ldx : 0) + 16 * c;",
    "wv[0] = ok ? ld_stream_16(w_g + k) : z;",
    "wv[1] = ok ? ld_stream_16(w_g + w_next8 + k) : z;",
    "for (int i = 0; i < static_cast<int>(sizeof(T)); ++i)",
    "xv[t][i] = ok && t_ok[t] ? __ldg(reinterpret_cast<const uint4*>(x_t[t] + k) + i) : z;",
    "red[8 * t + 2 * c][g] = acc[t][0];",
    "red[8 * t + 2 * c + 1][g] = acc[t][1];",
    "red[8 * t + 2 * c][g + 8] = acc[t][2];",
    "red[8 * t + 2 * c + 1][g + 8] = acc[t][3];",
]
MIRRORED_TRAITS_LINES = [   # int8_traits.h
    "static constexpr int kWarps = kWarpsM * kWarpsN, kThreads = 32 * kWarps;",
    "static constexpr int kWM = kBM / kWarpsM, kWN = kBN / kWarpsN;",
    "static constexpr int kMT = kWM / 16, kNT = kWN / 8;",
    "static constexpr int kChunks = kBK / 16;",
    "static constexpr int kStageBytes = (kBM + kBN) * kBK;",
    "static constexpr int kSmemBytes = kStages * kStageBytes;",
    "constexpr int kGroupM = 8;",
    "if (M <= 16) return 0;",
    "if (M <= 32) return 1;",
    "if (M <= 64) return 2;",
    "if (M <= 128) return 3;",
    "const long long big_tiles = static_cast<long long>(ceil_div(M, 128)) * ceil_div(N, 256);",
    "return big_tiles >= num_sms ? 4 : 3;",
    "const long long tiles = static_cast<long long>(ceil_div(M, C::kBM)) * ceil_div(N, C::kBN);",
    "return split_k_for_tiles(tiles, ceil_div(K, C::kBK), num_sms);",
    "case 0: return split_k_for<0>(M, N, K, num_sms);",
    "case 1: return split_k_for<1>(M, N, K, num_sms);",
    "case 2: return split_k_for<2>(M, N, K, num_sms);",
    "case 3: return M <= kSplitKMaxM ? split_k_for<3>(M, N, K, num_sms) : 1;",
    "constexpr int kSplitKMaxM = 128;",
    "default: return 1;",
    "constexpr int kW8A16MaxM = 16;",
    "constexpr int kW8A16RowsPerCta = 16;",
    "constexpr int kW8A16Unroll = 4;",
    "W8A16Choice c{M <= 8 ? 1 : 2, 8};",
    "if (K < 8 * 64 * 2) c.warps = 4;",
]
MIRRORED_COMMON_LINES = [   # common.h
    "constexpr int kMaxSplitK = 16;",
    "constexpr int kMinKTilesPerSplit = 4;",
    "while (split < kMaxSplitK && tiles * split < num_sms && k_tiles / (2 * split) >= kMinKTilesPerSplit) split *= 2;",
]
MIRRORED_LAUNCHER_LINES = [  # int8_launcher.cu (the sm80 path; the sm_90a wgmma branch is not mirrored)
    "if (K == 0) lda = ldb = 0;",
    "p.lda = M > 1 ? lda : K;",
    "p.ldb = N > 1 ? ldb : K;",
    "p.a_scale_stride = a_scale_len == 1 ? 0 : 1;",
    "const int config = choose_gemm_config(M, N, K, sms);",
    "const int splits = choose_split_k(config, M, N, K, sms);",
    "if (workspace_fits(splits, M, N, workspace, workspace_bytes)) {",
    "return splits > 1 && workspace != 0 && aligned(workspace, 8) && workspace_bytes >= int64_t{splits} * M * N * 4;",
    "return split_k_gemm(p, splits, gemm_k_tile(config), out_dtype, workspace, s,",
    "[&](const Int8GemmParams& q) { return gemm_config<int32_t>(q, config, s); });",
    "const int k_tiles = ceil_div(p.K, k_tile);",
    "q.k_tiles_per_split = ceil_div(k_tiles, splits);",
    "q.splits = ceil_div(k_tiles, q.k_tiles_per_split);",
    "q.split_stride = static_cast<int64_t>(p.M) * p.N;",
    "q.out = reinterpret_cast<void*>(workspace);",
    "if (const int e = partials(q)) return e;",
    "p.split_stride = q.split_stride;",
    "case kFloat16: return run_int8_splitk_reduce<__half>(p, partial, q.splits, s);",
    "if (K == 0) ldx = ldw = 0;",
    "p.ldx = M > 1 ? ldx : 0;",
    "p.ldw = N > 1 ? ldw : K;",
    "p.s_stride_n = s_stride_n, p.s_stride_g = group_size > 0 ? s_stride_g : 0;",
    "return launch(choose_w8a16_config(M, N, K, sms), reinterpret_cast<cudaStream_t>(stream));",
    "if (c.token_tiles == 1) return c.warps == 4 ? run_w8a16<T, 1, 4>(p, s) : run_w8a16<T, 1, 8>(p, s);",
    "return c.warps == 4 ? run_w8a16<T, 2, 4>(p, s) : run_w8a16<T, 2, 8>(p, s);",
]
MIRRORED_W8A16_LINES = [    # w8a16_gemm_kernel.cuh
    "const uint32_t u = w ^ 0x80808080u;",
    "uint32_t l = __byte_perm(u, 0x64646464u, 0x4140);",
    "uint32_t h = __byte_perm(u, 0x64646464u, 0x4342);",
    "const __half2 bias = __halves2half2(__ushort_as_half(0x6480), __ushort_as_half(0x6480));",
    "__half2 hl = __hsub2(*reinterpret_cast<__half2*>(&l), bias);",
    "__half2 hh = __hsub2(*reinterpret_cast<__half2*>(&h), bias);",
    "const float f0 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7440)) - 8388736.f;",
    "const float f1 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7441)) - 8388736.f;",
    "const float f2 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7442)) - 8388736.f;",
    "const float f3 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7443)) - 8388736.f;",
    "__nv_bfloat162 bl = __floats2bfloat162_rn(f0, f1), bh = __floats2bfloat162_rn(f2, f3);",
    "constexpr int kTok = 8 * kTokenTiles;",
    "__shared__ float red[kWarps][kTok][kW8A16RowsPerCta];",
    "const int g = lane / 4, c = lane % 4;",
    "const int n0 = blockIdx.x * kW8A16RowsPerCta;",
    "const int8_t* w_g = p.w + static_cast<int64_t>(n0 + g) * p.ldw + 16 * c;",
    "const int64_t w_next8 = 8 * p.ldw;",
    "decode_token_rows<T, kTokenTiles>(p.x, p.ldx, p.M, g, c, x_t, t_ok);",
    "const bool grouped = p.group > 0;",
    "const float* s_g = p.w_scale + static_cast<int64_t>(n0 + g) * p.s_stride_n;",
    "const float* s_g8 = s_g + 8 * p.s_stride_n;",
    "const int nblocks = (p.K + 63) / 64;",
    "for (int b0 = warp; b0 < nblocks; b0 += kWarps * kUnroll) {",
    "const int k = (b0 + u * kWarps) * 64;",
    "const bool ok = b0 + u * kWarps < nblocks && k + 16 * c < p.K;",
    "decode_block_loads<T, kTokenTiles>(w_g, w_next8, x_t, t_ok, k, ok, wv[u], xv[u]);",
    "const int blk = b0 + u * kWarps;",
    "if (blk >= nblocks) break;",
    "dequant4<T>(w0[s], a[0], a[2]);",
    "dequant4<T>(w8[s], a[1], a[3]);",
    "const uint32_t* xw = reinterpret_cast<const uint32_t*>(&xv[u][t][s / 2]);",
    "mma_16816<T>(part[t], a, xw[(s % 2) * 2], xw[(s % 2) * 2 + 1]);",
    "const int64_t gi = static_cast<int64_t>(blk * 64 / p.group) * p.s_stride_g;",
    "sc0 = s_g[gi], sc8 = s_g8[gi];",
    "acc[t][0] = fmaf(part[t][0], sc0, acc[t][0]);",
    "acc[t][1] = fmaf(part[t][1], sc0, acc[t][1]);",
    "acc[t][2] = fmaf(part[t][2], sc8, acc[t][2]);",
    "acc[t][3] = fmaf(part[t][3], sc8, acc[t][3]);",
    "stash_d_fragments(red[warp], acc, g, c);",
    "for (int i = tid; i < kTok * kW8A16RowsPerCta; i += kWarps * 32) {",
    "const int m = i / kW8A16RowsPerCta, r = i % kW8A16RowsPerCta;",
    "if (m >= p.M) continue;",
    "for (int w = 0; w < kWarps; ++w) v += red[w][m][r];",
    "const int n = n0 + r;",
    "if (!grouped) v *= p.w_scale[static_cast<int64_t>(n) * p.s_stride_n];",
    "v += bias_at(p.bias, p.bias_dtype, n);",
    "static_cast<T*>(p.out)[static_cast<int64_t>(m) * p.N + n] = from_float<T>(v);",
    "w8a16_kernel<T, kTokenTiles, kWarps><<<p.N / kW8A16RowsPerCta, kWarps * 32, 0, stream>>>(p);",
]
MIRRORED_GLUE_LINES = [     # python/fastllm/ops/_int8_cuda.py (W8A16 scale strides)
    "s_n = w_scale.stride(0) if N > 1 else 0",
    "s_g = w_scale.stride(1) if group_size and w_scale.dim() == 2 and w_scale.shape[1] > 1 else 0",
]


def test_kernel_source_matches_mirror():
    ptx_srcs = (INT8_DIR / "int8_ptx.cuh", ROOT / "csrc" / "common" / "load_float.cuh")
    assert_mirrored((((KERNEL_SRC, INT8_DIR / "int8_epilogue.cuh"), MIRRORED_KERNEL_LINES),
                     (ptx_srcs, MIRRORED_PTX_LINES), (TRAITS_SRC, MIRRORED_TRAITS_LINES),
                     (COMMON_SRC, MIRRORED_COMMON_LINES), (LAUNCHER_SRC, MIRRORED_LAUNCHER_LINES),
                     (W8A16_SRC, MIRRORED_W8A16_LINES),
                     (ROOT / "python" / "fastllm" / "ops" / "_int8_cuda.py", MIRRORED_GLUE_LINES)))
    traits = TRAITS_SRC.read_text()
    configs = {int(i): tuple(int(v) for v in args.split(","))
               for i, args in re.findall(r"struct GemmConfig<(\d+)> : GemmTile<([\d, ]+)> \{\};", traits)}
    assert configs == CONFIGS
    assert re.search(r"constexpr int kNumGemmConfigs = (\d+);", traits).group(1) == str(len(CONFIGS))
    # the launcher's plan for configs 0 / 1 uses these K tiles
    assert all(f"case {c}: return GemmConfig<{c}>::kBK;" in norm_source(traits) for c in (0, 1, 2, 3))
