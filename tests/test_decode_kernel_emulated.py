"""The CUDA split-KV decode kernel (csrc/decode/) emulated on CPU, lane by lane and CTA by CTA.

The kernel has never run on a GPU. This file re-implements its index math in Python (NumPy,
float64) and checks that the math computes what fastllm.ref.decode defines:

Part 1, the fragment / shared-memory path, for every compiled head dim (64, 80, 96, 128, 256)
with the tile configs parsed from decode_traits.h: the cp.async stores of Q and the K/V stages
into attention::SmemTile's swizzled layout (the kernel's thread -> (row, chunk) split), each
lane's ldmatrix address for Q (A of Q K^T), K (B of Q K^T) and V (B of P V, .trans), the
mma.m16n8k16 fragment layouts of csrc/common/ptx.cuh, the S -> P register repacking and the
O rows' trip through the warp-merge buffer. Inputs are fp16 values with 2^-6 <= |x| < 8
(multiples of 2^-16), so every product is a multiple of 2^-32 below 2^6 and every partial sum
of <= 256 of them is a multiple of 2^-32 below 2^14: 46 significant bits, exact in float64 in
any summation order. The emulated tiles are therefore compared with the matmuls for EQUALITY.
Also checked: every tile element is written exactly once, and the 8 rows of each ldmatrix
8x8 matrix fall in 8 distinct 16-byte bank groups (no bank conflicts).

Part 2, the algorithm: DecodeParams built as ops/_decode_cuda.py + decode_launcher.cu build them
(strides, window / softcap normalisation), global memory addressed through those strides, then
decode_split_kernel's control flow per CTA (key range [lo, hi): with a mask, common/mask_range.cuh's
scan thread by thread, its 16-byte little-endian word math included; split pieces of whole kBlockN
tiles, page lookup with clamping, zero-filled rows, need_mask shortcut, per-warp online softmax
in the log2 domain with per-thread partial sums, the warps' merge through shared memory, direct
or partial outputs) and decode_combine_kernel, against fastllm.ref.decode.decode_attention in
float64 on random cases (paged and contiguous caches, page sizes 1 and > 1, out-of-range
lengths and page ids, windows, softcap, broadcast bool masks, many splits with empty ones, GQA
packing over 16 rows, rows with nothing allowed: out exactly 0, lse -inf, never NaN).

What this does NOT prove: the CUDA source itself (a transcription slip between the .cuh and this
mirror, a race, the cp.async group counting and which stage a tile is read from, barrier
placement, register or shared-memory overlap at runtime); fp32 / fp16 rounding, ex2.approx and tanhf (everything here is float64:
Part 2 compares at 1e-9, so it finds logic errors, not precision ones). The CUDA kernel stays
UNVERIFIED until a GPU runs tests/test_decode.py. The negative checks at the end show that a
wrong swizzle, wrong lane rows, or a wrong warp / split merge make these checks fail.
"""
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fastllm.ops._decode_cuda import HEAD_DIMS, _kv_strides, _q_strides, cuda_supports
from fastllm.ref.decode import decode_attention as ref_decode

CSRC = Path(__file__).resolve().parents[1] / "csrc"
LOG2E = 1.4426950408889634   # decode_launcher.cu kLog2e
LN2 = 0.69314718055994531    # decode_kernel.cuh kLn2f
GARBAGE = 1e4                # contiguous-cache slots past a sequence's length (fp16-exact)


# ----------------------------------------------------------------------------------------------
# Tile configs: decode_traits.h, parsed (so a retuned config is what gets tested).

class DecodeTile:
    """DecodeTile<kHeadDim, kNWarps, kStages, kQInRegs> (decode_traits.h), constants 1:1."""

    def __init__(self, D, nwarps, stages, q_in_regs):
        self.kHeadDim, self.kNWarps, self.kStages, self.kQInRegs = D, nwarps, stages, q_in_regs
        self.kThreads = 32 * nwarps
        self.kBlockM = 16
        self.kBlockN = 16 * nwarps
        self.kChunks = D // 8
        self.kSmemQBytes = self.kBlockM * D * 2
        self.kSmemStageBytes = self.kBlockN * D * 2
        self.kSmemBytes = self.kSmemQBytes + 2 * stages * self.kSmemStageBytes
        self.kRedStride = D + 8
        self.kSmemRedBytes = (nwarps * 16 * 2 + nwarps * 16 * self.kRedStride + 16 * 2) * 4


def parse_traits():
    text = (CSRC / "decode" / "decode_traits.h").read_text()
    found = re.findall(r"struct DecodeTraits<(\d+)>\s*:\s*DecodeTile<(\d+),\s*(\d+),\s*(\d+),\s*(true|false)>", text)
    cfgs = {}
    for key, D, nw, st, qreg in found:
        assert key == D, f"DecodeTraits<{key}> derives from DecodeTile<{D}, ...>"
        cfgs[int(D)] = DecodeTile(int(D), int(nw), int(st), qreg == "true")
    return cfgs


CFG = parse_traits()


def test_traits_match_launcher_and_static_asserts():
    launcher = (CSRC / "decode" / "decode_launcher.cu").read_text()
    dispatched = {int(d) for d in re.findall(r"case (\d+): return run_decode<T, \1>", launcher)}
    assert set(CFG) == dispatched == set(HEAD_DIMS) == {64, 80, 96, 128, 256}
    for D, t in CFG.items():                      # the static_asserts of DecodeTile
        kTPR = t.kThreads // t.kBlockN
        assert D % 16 == 0
        assert t.kThreads % t.kBlockN == 0 and t.kChunks % kTPR == 0, D
        assert t.kSmemBytes <= 99 * 1024, D
        assert t.kSmemRedBytes <= 2 * t.kStages * t.kSmemStageBytes, D


# ----------------------------------------------------------------------------------------------
# Part 1: shared memory, ldmatrix, mma (lane by lane).

class SmemTile:
    """attention::SmemTile<kRows, kChunks> (csrc/attention/flash_fwd_kernel.cuh): offset() in
    elements, lane_base() / lane_xor() / addr() in bytes. mutant='no_xor': ldmatrix addresses
    ignore the swizzle (stores keep it)."""

    def __init__(self, rows, chunks, mutant=None):
        self.kRows, self.kChunks = rows, chunks
        self.kGroup = 8 if chunks % 8 == 0 else (4 if chunks % 4 == 0 else 2)
        self.kRowsPerPhase = 8 // self.kGroup
        self.kRowBytes = self.kGroup * 16
        assert chunks % self.kGroup == 0 and rows % 8 == 0
        self.mutant = mutant

    def offset(self, row, chunk):
        phys = (chunk % self.kGroup) ^ ((row // self.kRowsPerPhase) % self.kGroup)
        return ((chunk // self.kGroup) * self.kRows + row) * (self.kGroup * 8) + phys * 8

    def lane_base(self, r):
        return r * self.kRowBytes

    def lane_xor(self, r, cl):
        return cl if self.mutant == "no_xor" else cl ^ ((r // self.kRowsPerPhase) % self.kGroup)

    def addr(self, tile_lane_base, lane_x, row0, chunk0):
        return (tile_lane_base + ((chunk0 // self.kGroup) * self.kRows + row0) * self.kRowBytes
                + (((chunk0 % self.kGroup) ^ lane_x) << 4))

    def fill_row(self, kTPR, q):
        if kTPR > self.kGroup or 8 % kTPR != 0:
            return q
        kSlots = 8 // kTPR
        j = q % 8
        phase, w = j // kSlots, j % kSlots
        return q - j + w % self.kRowsPerPhase + self.kRowsPerPhase * (phase + kTPR * (w // self.kRowsPerPhase))

    def storage_row(self, i):
        return i // self.kGroup % self.kRows

    def storage_chunk(self, i):
        return i // (self.kGroup * self.kRows) * self.kGroup + i % self.kGroup


class Smem:
    """Dynamic shared memory in 2-byte elements (NaN = never written), with a write count."""

    def __init__(self, nbytes):
        self.data = np.full(nbytes // 2, np.nan)
        self.writes = np.zeros(nbytes // 2, dtype=np.int64)

    def cp_async_16(self, dst_byte, values):          # ptx.cuh cp_async_16: 8 elements
        assert dst_byte % 16 == 0 and len(values) == 8
        i = dst_byte // 2
        self.data[i:i + 8] = values
        self.writes[i:i + 8] += 1


LANE = np.arange(32)
G, C4 = LANE // 4, LANE % 4
PAIR = np.array([0, 1])
# mma.m16n8k16 fragments (ptx.cuh, mma_16816): [lane, register, half] -> (row, col) of A (16x16),
# (k, n) of B (16x8); [lane, element] -> (row, col) of D (16x8).
A_ROW = np.broadcast_to(np.stack([G, G + 8, G, G + 8], 1)[:, :, None], (32, 4, 2))
A_COL = np.stack([2 * C4, 2 * C4, 2 * C4 + 8, 2 * C4 + 8], 1)[:, :, None] + PAIR
B_K = np.stack([2 * C4, 2 * C4 + 8], 1)[:, :, None] + PAIR
B_N = np.broadcast_to(G[:, None, None], (32, 2, 2))
D_ROW = np.stack([G, G, G + 8, G + 8], 1)
D_COL = np.stack([2 * C4, 2 * C4 + 1, 2 * C4, 2 * C4 + 1], 1)


def ldmatrix_x4(smem, addrs, trans=False):
    """ptx.cuh ldmatrix_x4(_trans): lane 8j + r gives the address of row r of matrix j; register j
    of lane 4r + c gets (r, 2c), (r, 2c + 1), or (2c, r), (2c + 1, r) transposed. -> (32, 4, 2)."""
    addrs = np.asarray(addrs)
    assert (addrs % 16 == 0).all() and addrs.min() >= 0 and addrs.max() + 16 <= 2 * len(smem.data)
    mats = smem.data[(addrs // 2)[:, None] + np.arange(8)].reshape(4, 8, 8)    # [j, row, col]
    r, c = (LANE // 4)[:, None], 2 * (LANE % 4)[:, None] + PAIR
    regs = mats[:, c, r] if trans else mats[:, r, c]                            # (4, 32, 2)
    return regs.transpose(1, 0, 2)


def mma_16816(d, a, b0, b1):
    """ptx.cuh mma_16816: d (32, 4) += A (from a (32, 4, 2)) @ B (from b0, b1 (32, 2))."""
    A = np.full((16, 16), np.nan)
    B = np.full((16, 8), np.nan)
    A[A_ROW, A_COL] = a
    B[B_K, B_N] = np.stack([b0, b1], 1)
    assert not np.isnan(A).any() and not np.isnan(B).any()       # the layouts cover A and B
    return d + (A @ B)[D_ROW, D_COL]


def fragment_values(*shape):
    """fp16 values with 2^-6 <= |x| < 8 (see the module docstring: sums exact in float64)."""
    x = torch.randn(*shape, dtype=torch.float64).clamp(-7.9, 7.9)
    x = torch.sign(x) * x.abs().clamp(min=2.0 ** -6)
    return x.half().double().numpy()


def fragment_path(D, mutant=None):
    """decode_split_kernel's smem / fragment path for one CTA: Q and every K/V stage stored as the
    prologue and load_kv store them, then for each warp and stage Q K^T (the "S = Q K^T" loop)
    and P V (the "O += P V" loop, P repacked from S's registers) through ldmatrix + mma, and O
    through the warp-merge buffer red_o. Returns (pairs (emulated, matmul), ldmatrix address
    lists, smem)."""
    t = CFG[D]
    kD, kBN, kChunks, kThreads, kStages, kNWarps = D, t.kBlockN, t.kChunks, t.kThreads, t.kStages, t.kNWarps
    kKS, kDT, kTPR, kStageBytes = kD // 16, kD // 8, kThreads // kBN, t.kSmemStageBytes
    QTile, KVTile = SmemTile(16, kChunks, mutant), SmemTile(kBN, kChunks, mutant)
    smem = Smem(t.kSmemBytes)
    sQ = 0
    sK = sQ + t.kSmemQBytes
    sV = sK + kStages * kStageBytes

    Q = fragment_values(16, kD)
    K = fragment_values(kStages, kBN, kD)
    V = fragment_values(kStages, kBN, kD)
    for tid in range(kThreads):                   # prologue: Q, 16 * kChunks chunks
        for i in range(tid, 16 * kChunks, kThreads):
            r, c = QTile.storage_row(i), QTile.storage_chunk(i)
            smem.cp_async_16(sQ + QTile.offset(r, c) * 2, Q[r, 8 * c:8 * c + 8])
    for stage in range(kStages):                  # load_kv(stage, t0)
        ks, vs = sK + stage * kStageBytes, sV + stage * kStageBytes
        for tid in range(kThreads):
            r, cb = KVTile.fill_row(kTPR, tid // kTPR), tid % kTPR
            for c in range(kChunks // kTPR):
                chunk = cb + c * kTPR
                smem.cp_async_16(ks + KVTile.offset(r, chunk) * 2, K[stage, r, 8 * chunk:8 * chunk + 8])
                smem.cp_async_16(vs + KVTile.offset(r, chunk) * 2, V[stage, r, 8 * chunk:8 * chunk + 8])

    # Per-lane ldmatrix addresses ("Per-lane ldmatrix addresses" block of the kernel).
    q_r, q_cl = LANE % 16, LANE // 16
    k_r, k_cl = (LANE // 16) * 8 + LANE % 8, (LANE // 8) % 2
    if mutant == "k_rows":                        # K addressed like Q: wrong keys in b[0..3]
        k_r, k_cl = q_r, q_cl
    q_lane = [sQ + QTile.lane_base(r) for r in q_r]
    q_x = [QTile.lane_xor(r, cl) for r, cl in zip(q_r, q_cl)]
    k_lane = [sK + KVTile.lane_base(r) for r in k_r]
    k_x = [KVTile.lane_xor(r, cl) for r, cl in zip(k_r, k_cl)]
    v_lane = [sV + KVTile.lane_base(r) for r in q_r]
    v_x = [KVTile.lane_xor(r, cl) for r, cl in zip(q_r, q_cl)]

    def q_addrs(kk):
        return [QTile.addr(q_lane[l], q_x[l], 0, kk * 2) for l in range(32)]

    addr_lists, pairs = [], []
    q_frag = [ldmatrix_x4(smem, q_addrs(kk)) for kk in range(kKS)] if t.kQInRegs else None
    red_o = np.full(kNWarps * 16 * t.kRedStride, np.nan)          # [warp][16][kRedStride] floats
    P = fragment_values(kStages, kNWarps, 16, 16)
    for stage in range(kStages):
        for warp in range(kNWarps):
            # ---- S = Q K^T for this warp's 16 keys: s[nt] are n-tiles of 8 keys.
            s = [np.zeros((32, 4)), np.zeros((32, 4))]
            for kk in range(kKS):
                a = q_frag[kk] if t.kQInRegs else ldmatrix_x4(smem, q_addrs(kk))
                ka = [KVTile.addr(k_lane[l] + stage * kStageBytes, k_x[l], warp * 16, kk * 2) for l in range(32)]
                bk = ldmatrix_x4(smem, ka)
                addr_lists += [q_addrs(kk), ka]
                s[0] = mma_16816(s[0], a, bk[:, 0], bk[:, 1])
                s[1] = mma_16816(s[1], a, bk[:, 2], bk[:, 3])
            S = np.full((16, 16), np.nan)             # s[nt][e] of lane (g, c4) -> (row, key)
            for nt in range(2):
                S[D_ROW, 8 * nt + D_COL] = s[nt]
            pairs.append((S, Q @ K[stage, warp * 16:warp * 16 + 16].T))

            # ---- O += P V: P (fp16 values) in S's registers, repacked as the kernel does.
            Pw = P[stage, warp]
            s = [Pw[D_ROW, 8 * nt + D_COL] for nt in range(2)]
            a = np.stack([s[0][:, 0:2], s[0][:, 2:4], s[1][:, 0:2], s[1][:, 2:4]], 1)   # pack2(lo, hi)
            acc_o = [np.zeros((32, 4)) for _ in range(kDT)]
            for dp in range(kD // 16):
                va = [KVTile.addr(v_lane[l] + stage * kStageBytes, v_x[l], warp * 16, dp * 2) for l in range(32)]
                bv = ldmatrix_x4(smem, va, trans=True)
                addr_lists.append(va)
                acc_o[2 * dp] = mma_16816(acc_o[2 * dp], a, bv[:, 0], bv[:, 1])
                acc_o[2 * dp + 1] = mma_16816(acc_o[2 * dp + 1], a, bv[:, 2], bv[:, 3])

            # ---- merge buffer: float2 stores of (acc_o[dt][2r], [2r + 1]) at row lr = g + 8r, then
            # the write loop's float4 loads (idx -> lr = idx / (kD / 4), c = idx % (kD / 4)).
            for lane in range(32):
                g, c4 = lane // 4, lane % 4
                for r in range(2):
                    dst = (warp * 16 + g + 8 * r) * t.kRedStride + 2 * c4
                    for dt in range(kDT):
                        assert (dst + dt * 8) % 2 == 0                         # float2 aligned
                        red_o[dst + dt * 8:dst + dt * 8 + 2] = acc_o[dt][lane, 2 * r:2 * r + 2]
            O = np.full((16, kD), np.nan)
            for idx in range(16 * (kD // 4)):
                lr, c = idx // (kD // 4), idx % (kD // 4)
                src = (warp * 16 + lr) * t.kRedStride + 4 * c
                assert src % 4 == 0                                            # float4 aligned
                O[lr, 4 * c:4 * c + 4] = red_o[src:src + 4]
            pairs.append((O, Pw @ V[stage, warp * 16:warp * 16 + 16]))
    return pairs, addr_lists, smem


@pytest.mark.parametrize("D", HEAD_DIMS)
def test_fragment_path_exact(D):
    pairs, addr_lists, smem = fragment_path(D)
    assert (smem.writes == 1).all()   # Q + 2 * kStages tiles fill the kSmemBytes exactly, once each
    for got, want in pairs:
        assert not np.isnan(got).any()
        assert np.array_equal(got, want)                       # exact: see the module docstring
    for addrs in addr_lists:                                    # one 8x8 matrix = one smem phase
        for j in range(4):
            banks = {(a // 16) % 8 for a in addrs[8 * j:8 * j + 8]}
            assert len(banks) == 8, (D, addrs[8 * j:8 * j + 8])


@pytest.mark.parametrize("chunks", sorted({D // 8 for D in HEAD_DIMS}))
@pytest.mark.parametrize("rows", [16, 32, 64])
def test_swizzle_bijective(rows, chunks):
    t = SmemTile(rows, chunks)
    offs = sorted(t.offset(r, c) for r in range(rows) for c in range(chunks))
    assert offs == [8 * i for i in range(rows * chunks)]
    for r in range(0, rows, 8):                                 # addr() == offset() for every lane
        for c0 in range(0, chunks, 2):
            for lr in range(8):
                for cl in range(2):
                    a = t.addr(t.lane_base(lr), t.lane_xor(lr, cl), r, c0)
                    assert a == 2 * t.offset(r + lr, c0 + cl)


# ----------------------------------------------------------------------------------------------
# Part 2: the split / merge / combine algorithm (CTA by CTA, warps and quads kept apart).

def flat(t):
    """The memory a data pointer + element strides address, as a 1-D NumPy array."""
    if t.numel() == 0:
        return np.zeros(0, dtype=np.float64 if t.is_floating_point() else np.int64)
    n = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    f = torch.as_strided(t, (n,), (1,))
    return f.double().numpy() if t.is_floating_point() else f.numpy().copy()


def mask_key_range(m, off, align, row_stride, col_stride, rows, n_keys, threads, mutant=None):
    """common/mask_range.cuh mask_key_range, thread by thread: (first, last) over `rows` mask rows
    at byte offset `off` of the flat byte array m (align: the data pointer's address mod 16).
    The 16-byte path ORs a row chunk's four little-endian words and takes the first / last set
    byte from __ffs / __clz; the byte path covers the rest (or everything when unaligned)."""
    def ffs(x):
        return (x & -x).bit_length()

    def clz(x):
        return 32 - x.bit_length()

    if row_stride == 0:
        rows = min(rows, 1)               # broadcast rows: one is all of them
    vec = col_stride == 1 and (align + off) % 16 == 0 and (rows <= 1 or row_stride % 16 == 0)
    n_vec = n_keys // 16 if vec else 0
    firsts, lasts = [], []
    for tid in range(threads):
        first, last = n_keys, 0
        for c in range(tid, n_vec, threads):
            w = [0, 0, 0, 0]
            for r in range(rows):
                chunk = m[off + r * row_stride + 16 * c: off + r * row_stride + 16 * c + 16]
                words = chunk.copy().view("<u4")
                w = [w[i] | int(words[i]) for i in range(4)]
            for i in range(4):
                if w[i]:
                    byte = (ffs(w[i]) - 1) // 8
                    first = min(first, 16 * c + 4 * i + (3 - byte if mutant == "big_endian" else byte))
            for i in range(4):
                if w[i]:
                    last = max(last, 16 * c + 4 * i + (31 - clz(w[i])) // 8 + 1)
        for j in range(16 * n_vec + tid, n_keys, threads):
            if any(m[off + r * row_stride + j * col_stride] != 0 for r in range(rows)):
                first, last = min(first, j), max(last, j + 1)
        firsts.append(first)
        lasts.append(last)
    return min(firsts), max(lasts)      # __reduce_*_sync per warp, then atomicMin / atomicMax


@pytest.mark.parametrize("aligned", [True, False])
def test_mask_key_range(aligned):
    # Random sparse rows (first / last attended keys anywhere, incl. none at all), 1..5 rows,
    # key counts around multiples of 16; aligned: contiguous rows of a multiple of 16 bytes
    # (the 16-byte path plus its tail), else odd row strides (the byte path).
    gen = np.random.default_rng(7)
    for _ in range(60):
        rows, n_keys = int(gen.integers(1, 6)), int(gen.integers(1, 200))
        stride = (-(-n_keys // 16) * 16 + 16 * int(gen.integers(0, 2))) if aligned else n_keys + 1 + 2 * int(gen.integers(0, 3))
        m = np.zeros(rows * stride + 16, dtype=np.uint8)
        for r in range(rows):
            if gen.random() < 0.8:
                a = int(gen.integers(0, n_keys))
                b = int(gen.integers(a, n_keys)) + 1
                m[r * stride + a: r * stride + b] = gen.random(b - a) < 0.3
                m[r * stride + a] = m[r * stride + b - 1] = 1
        # Bytes past a row's n_keys (the stride padding) are set: they must never count.
        for r in range(rows):
            m[r * stride + n_keys: (r + 1) * stride] = 1
        truth = m[:rows * stride].reshape(rows, stride)[:, :n_keys].any(0).nonzero()[0]
        want = (int(truth[0]), int(truth[-1]) + 1) if truth.size else (n_keys, 0)
        assert mask_key_range(m, 0, 0, stride, 1, rows, n_keys, 32) == want


def mask_range_case():
    """One sequence, a mask attending keys 37..200 of 256 (a 16-byte aligned row): every
    split's range comes from mask_key_range."""
    q, k = half(1, 4, 1, 64), half(1, 2, 256, 64)
    mask = torch.zeros(1, 1, 1, 256, dtype=torch.bool)
    mask[..., 37:201] = True
    return (q, k, half(1, 2, 256, 64), None, None, mask, 0.125, 0, 0.0, 3)


def test_mask_key_range_mutant_detected():
    m = np.zeros(64, dtype=np.uint8)
    m[21] = 1                           # byte 1 of word 1 of chunk 1: __ffs = 9
    assert mask_key_range(m, 0, 0, 64, 1, 1, 64, 32) == (21, 22)
    assert mask_key_range(m, 0, 0, 64, 1, 1, 64, 32, mutant="big_endian") == (22, 22)
    with pytest.raises(AssertionError):   # ... and the algorithm test sees it
        run_case(mask_range_case(), new_stats(), mutant="big_endian")


def launcher_params(q, k_cache, v_cache, cache_seqlens, block_table, mask, scale, window, softcap, num_splits):
    """DecodeParams as ops/_decode_cuda.py decode_attention_cuda + decode_launcher.cu
    decode_attention_fwd build them (arguments already normalized by the op); pointers become
    flat float64 arrays."""
    B, Hq, Sq, D = q.shape
    paged = block_table is not None
    if paged:
        num_pages, page_size, Hkv, _ = k_cache.shape
        capacity = block_table.shape[1] * page_size
    else:
        num_pages, page_size = 0, 0
        Hkv, capacity = k_cache.shape[1], k_cache.shape[2]
    if mask is not None:
        m = torch.broadcast_to(mask, (B, 1, Sq, capacity))[:, 0]
        m_flat, m_strides = flat(m).view(np.uint8), tuple(m.stride(i) if m.size(i) > 1 else 0 for i in range(3))
        m_align = m.data_ptr() % 16
    else:
        m_flat, m_strides, m_align = None, (0, 0, 0), 0
    p = SimpleNamespace(
        q=flat(q), k=flat(k_cache), v=flat(v_cache),
        cache_seqlens=flat(cache_seqlens) if cache_seqlens is not None else None,
        block_table=flat(block_table) if paged else None, mask=m_flat, mask_align=m_align,
        block_table_stride=block_table.stride(0) if paged else 0,
        batch=B, heads_q=Hq, heads_kv=Hkv, group=Hq // Hkv, seqlen_q=Sq, rows=Hq // Hkv * Sq,
        capacity=capacity, page_size=page_size if paged else 1, num_pages=num_pages if paged else 1,
        num_splits=num_splits,
        window=window if (mask is None and 0 < window < capacity + Sq) else 0,
        has_softcap=softcap > 0.0, scale_log2=scale * LOG2E,
        softcap_in=scale / softcap if softcap > 0.0 else 0.0,
        softcap_out=softcap * LOG2E if softcap > 0.0 else 0.0)
    (p.q_batch_stride, p.q_head_stride, p.q_row_stride) = _q_strides(q)
    (p.k_batch_stride, p.k_head_stride, p.k_row_stride) = _kv_strides(k_cache, paged)
    (p.v_batch_stride, p.v_head_stride, p.v_row_stride) = _kv_strides(v_cache, paged)
    (p.mask_batch_stride, p.mask_row_stride, p.mask_col_stride) = m_strides
    return p


def split_cta(p, t, bx, split, bz, ws, stats, mutant=None):
    """One CTA of decode_kernel.cuh decode_split_kernel (grid x = b * Hkv + hk, y = split, z =
    16-row block), section by section (the comments name the kernel's "// ----" sections).
    Tiles are held logically here (their smem layout is Part 1's); each warp's 16 x 16 S block
    and its per-row state stand for the 32 lanes' fragments (s[nt][2r + j] of lane (g, c4) is
    row g + 8r, key 16 warp + 8 nt + 2 c4 + j), row_sum keeps the 4 quad threads' partials.
    ws: flat out / lse / out_partial / lse_partial arrays (NaN = never written)."""
    kD, kBN, kNWarps = t.kHeadDim, t.kBlockN, t.kNWarps
    b, hk = bx // p.heads_kv, bx % p.heads_kv
    row0, Sq = bz * 16, p.seqlen_q
    d8 = np.arange(kD)

    # ---- key range of this CTA: [start, end).
    L = p.capacity
    if p.cache_seqlens is not None:
        L = min(max(int(p.cache_seqlens[b]), 0), p.capacity)
    lo = max(L - Sq - p.window + 1, 0) if (p.window > 0 and p.mask is None) else 0
    hi = L
    if p.mask is not None:
        first, last = mask_key_range(p.mask, b * p.mask_batch_stride, p.mask_align, p.mask_row_stride,
                                     p.mask_col_stride, Sq, p.capacity, t.kThreads, mutant=mutant)
        lo = max(lo, first)
        hi = max(min(hi, last), lo)
        stats["mask_narrowed"] += hi - lo < p.capacity
    span = hi - lo
    per_split = ((span + p.num_splits - 1) // p.num_splits + kBN - 1) // kBN * kBN
    start = lo + split * per_split
    end = min(start + per_split, hi)
    n_tiles = (end - start + kBN - 1) // kBN if end > start else 0
    stats["ctas"] += 1
    stats["empty_ctas"] += n_tiles == 0
    stats["lo_positive"] += lo > 0

    def load_kv(t0):
        """load_kv: key rows t0 .. t0 + kBN - 1, page looked up and clamped, rows >= end zero."""
        j = t0 + np.arange(kBN)
        valid = j < end
        jv = j[valid]
        if p.block_table is not None:
            page = p.block_table[b * p.block_table_stride + jv // p.page_size]
            stats["clamped_pages"] += int(((page < 0) | (page > p.num_pages - 1)).sum())
            page = np.minimum(np.maximum(page, 0), p.num_pages - 1)
            slot = jv % p.page_size
            kb, vb = page * p.k_batch_stride, page * p.v_batch_stride
        else:
            slot = jv
            kb, vb = b * p.k_batch_stride, b * p.v_batch_stride
        Kt, Vt = np.zeros((kBN, kD)), np.zeros((kBN, kD))
        Kt[valid] = p.k[(kb + hk * p.k_head_stride + slot * p.k_row_stride)[:, None] + d8]
        Vt[valid] = p.v[(vb + hk * p.v_head_stride + slot * p.v_row_stride)[:, None] + d8]
        return Kt, Vt

    # ---- prologue: Q rows (packed row R = g * Sq + i of kv head hk), rows past p.rows zero.
    R = row0 + np.arange(16)
    rvalid = R < p.rows
    h, qi = hk * p.group + R // Sq, R % Sq
    Qt = np.zeros((16, kD))
    qbase = b * p.q_batch_stride + h * p.q_head_stride + qi * p.q_row_stride
    Qt[rvalid] = p.q[qbase[rvalid][:, None] + d8]
    # Row positions and mask rows ("This thread's two rows" block).
    pos = L - Sq + np.where(rvalid, R, 0) % Sq
    has_mrow = rvalid & (p.mask is not None)
    mbase = b * p.mask_batch_stride + (np.where(rvalid, R, 0) % Sq) * p.mask_row_stride

    row_max = np.full((kNWarps, 16), -np.inf)        # per warp, raw score units
    row_sum = np.zeros((kNWarps, 16, 4))              # per warp, row, quad thread c4
    acc_o = np.zeros((kNWarps, 16, kD))
    mult = 1.0 if p.has_softcap else p.scale_log2
    for it in range(n_tiles):
        t0 = start + it * kBN
        Kt, Vt = load_kv(t0)
        need_mask = (p.mask is not None or t0 + kBN > end or t0 + kBN - 1 > L - Sq
                     or (p.window > 0 and t0 <= L - 1 - p.window))
        stats["masked_tiles" if need_mask else "unmasked_tiles"] += 1
        for warp in range(kNWarps):
            # S[row, col], col = 8 nt + 2 c4 + j: s[nt][2r + j] of lane (g, c4), row g + 8r.
            s = Qt @ Kt[warp * 16:warp * 16 + 16].T
            if p.has_softcap:
                s = np.tanh(s * p.softcap_in) * p.softcap_out
            if need_mask:
                key = t0 + warp * 16 + np.arange(16)
                ok = np.broadcast_to(key < end, (16, 16))
                if p.mask is not None:
                    read = has_mrow[:, None] & (key < end)[None, :]
                    idx = np.where(read, mbase[:, None] + key[None, :] * p.mask_col_stride, 0)
                    ok = ok & read & (p.mask[idx] != 0)
                else:
                    ok = ok & (key[None, :] <= pos[:, None])
                    if p.window > 0:
                        ok = ok & (key[None, :] > pos[:, None] - p.window)
                s = np.where(ok, s, -np.inf)
            # ---- online softmax (quad max through shuffles = the row max; sums stay per thread).
            mx = np.maximum(row_max[warp], s.max(1))
            m_scaled = np.where(mx == -np.inf, 0.0, mx * mult)
            corr = np.exp2(row_max[warp] * mult - m_scaled)
            row_max[warp] = mx
            e = np.exp2(s * mult - m_scaled[:, None])
            row_sum[warp] = row_sum[warp] * corr[:, None] + e.reshape(16, 2, 4, 2).sum((1, 3))
            acc_o[warp] = acc_o[warp] * corr[:, None] + e @ Vt[warp * 16:warp * 16 + 16]

    # ---- merge the warps through shared memory (red_ml, red_o, fin).
    l_w = row_sum.sum(2)                                             # quad shuffle-add
    own_m = np.where(row_max == -np.inf, -np.inf, row_max * mult)    # log2 domain
    M = own_m.max(0)
    m_safe = np.where(M == -np.inf, 0.0, M)
    total = (l_w * np.exp2(own_m - m_safe)).sum(0)
    f = np.exp2(own_m - m_safe)
    if mutant == "warp_merge":                                       # O not rescaled to the common max
        f = np.where(own_m == -np.inf, 0.0, 1.0)
    o = (acc_o * f[:, :, None]).sum(0)                              # the write loop's sum over warps

    # ---- write: rows that exist; 4 consecutive d per (idx = lr * kD / 4 + c).
    pos_t = total > 0
    inv = np.where(pos_t, 1.0 / np.where(pos_t, total, 1.0), 0.0)
    lse = np.where(pos_t, (M + np.log2(np.where(pos_t, total, 1.0))) * LN2, -np.inf)
    out_rows = o * inv[:, None]
    rows = np.flatnonzero(rvalid)
    h, qi = h[rows], qi[rows]
    if p.num_splits == 1:
        off = ((b * Sq + qi) * p.heads_q + h) * kD
        ws.out[off[:, None] + d8] = out_rows[rows]
        ws.lse[(b * p.heads_q + h) * Sq + qi] = lse[rows]
    else:
        prow = ((b * p.heads_q + h) * Sq + qi) * p.num_splits + split
        ws.out_partial[(prow * kD)[:, None] + d8] = out_rows[rows]
        ws.lse_partial[prow] = lse[rows]


def combine(p, kD, ws, mutant=None):
    """decode_combine_kernel, all rows (b, h, i) at once."""
    S = p.num_splits
    nrows = p.batch * p.heads_q * p.seqlen_q
    lp = ws.lse_partial.reshape(nrows, S)
    op = ws.out_partial.reshape(nrows, S, kD)
    M = lp.max(1)
    m_safe = np.where(M == -np.inf, 0.0, M)
    w = np.exp(lp - m_safe[:, None])                  # 0 for an empty split
    if mutant == "combine_weights":                   # splits averaged, lse ignored
        w = (lp > -np.inf).astype(np.float64)
    ssum = w.sum(1)
    inv = np.where(ssum > 0, 1.0 / np.where(ssum > 0, ssum, 1.0), 0.0)
    row = np.arange(nrows)
    b, h, qi = row // (p.heads_q * p.seqlen_q), (row // p.seqlen_q) % p.heads_q, row % p.seqlen_q
    off = ((b * p.seqlen_q + qi) * p.heads_q + h) * kD
    ws.out[off[:, None] + np.arange(kD)] = (w[:, :, None] * op).sum(1) * inv[:, None]
    lse = np.where(ssum > 0, m_safe + np.log(np.where(ssum > 0, ssum, 1.0)), -np.inf)
    if mutant == "combine_lse":                       # the max partial lse, not their log-sum-exp
        lse = M
    ws.lse[row] = lse


def emulate(q, k_cache, v_cache, cache_seqlens, block_table, mask, scale, window, softcap, num_splits,
            stats, mutant=None):
    """run_decode: the split kernel's grid, then (num_splits > 1) the combine kernel.
    Returns (out (B, Sq, Hq, D), lse (B, Hq, Sq)) float64 tensors."""
    p = launcher_params(q, k_cache, v_cache, cache_seqlens, block_table, mask, scale, window, softcap, num_splits)
    t = CFG[q.shape[-1]]
    B, Hq, Sq, D = q.shape
    ws = SimpleNamespace(out=np.full(B * Sq * Hq * D, np.nan), lse=np.full(B * Hq * Sq, np.nan))
    if num_splits > 1:                                # torch.empty in _decode_cuda: garbage
        ws.out_partial = np.full(B * Hq * Sq * num_splits * D, np.nan)
        ws.lse_partial = np.full(B * Hq * Sq * num_splits, np.nan)
    stats["row_blocks"] = max(stats["row_blocks"], (p.rows + 15) // 16)
    for bx in range(p.batch * p.heads_kv):
        for split in range(p.num_splits):
            for bz in range((p.rows + 15) // 16):
                split_cta(p, t, bx, split, bz, ws, stats, mutant)
    if num_splits > 1:
        combine(p, D, ws, mutant)
    return (torch.from_numpy(ws.out.reshape(B, Sq, Hq, D)), torch.from_numpy(ws.lse.reshape(B, Hq, Sq)))


def new_stats():
    return dict(ctas=0, empty_ctas=0, lo_positive=0, mask_narrowed=0, clamped_pages=0, masked_tiles=0, unmasked_tiles=0,
                row_blocks=0, empty_rows=0)


def compare(out, lse, ref_out, ref_lse):
    """Float64 emulation vs float64 reference: same -inf rows, those rows exactly 0, no NaN,
    everything else within 1e-9 (only summation order and exp2 vs exp differ)."""
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty)
    assert (out.transpose(1, 2)[empty] == 0).all()
    torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(lse[~empty], ref_lse[~empty], rtol=1e-9, atol=1e-9)


# ---- random cases (torch's RNG: conftest seeds it per test and prints the seed).

def rint(lo, hi):
    return int(torch.randint(lo, hi + 1, ()))


def chance(prob):
    return bool(torch.rand(()) < prob)


def half(*shape):
    return torch.randn(*shape).half()


def random_case(focus, D, narrow=False):
    """Decode call arguments (normalized as the op passes them to a backend) for one focus;
    narrow (focus "mask"): the mask surely rules out a leading key range."""
    kBN = CFG[D].kBlockN
    B, Hkv, group, Sq = rint(1, 3), rint(1, 2), rint(1, 4), rint(1, 4)
    if focus == "gqa":
        group, Sq = rint(6, 8), rint(3, 5)            # 18..40 packed rows: 2 or 3 row blocks
    if focus == "empty":
        Sq = rint(3, 8)
    Hq = Hkv * group
    paged = focus in ("paged1", "paged") or (focus != "dense" and chance(0.5))
    cap_target = {"dense": rint(2 * kBN, 4 * kBN), "window": rint(3 * kBN, 5 * kBN),
                  "splits": rint(kBN, 3 * kBN), "empty": rint(0, kBN)}.get(focus, rint(1, 3 * kBN))
    window = 0
    if focus == "window":
        window = rint(1, kBN)                         # with lengths >= 2 kBN: lo > 0
    elif focus in ("paged", "softcap", "gqa") and chance(0.4):
        window = rint(1, 4 * kBN)                     # sometimes >= capacity + Sq (dropped)
    softcap = float(torch.empty(()).uniform_(1.0, 10.0)) if focus == "softcap" or chance(0.15) else 0.0
    scale = D ** -0.5 if chance(0.5) else float(torch.empty(()).uniform_(0.02, 0.3))
    num_splits = rint(8, 20) if focus == "splits" else rint(1, 4)

    if chance(0.5):                                   # (B, Sq, Hq, D) storage, as transformers
        q = half(B, Sq, Hq, D).transpose(1, 2)
    else:
        q = half(B, Hq, Sq, D)
    if paged:
        page_size = 1 if focus == "paged1" else (rint(2, 20) if focus == "paged" else rint(1, 16))
        max_pages = -(-cap_target // page_size)
        if focus == "empty" and chance(0.3):
            max_pages = 0                             # capacity 0
        cap = max_pages * page_size
        num_pages = B * max_pages + rint(0, 3)
        k_cache, v_cache = half(num_pages, page_size, Hkv, D), half(num_pages, page_size, Hkv, D)
        block_table = torch.randint(0, max(num_pages, 1), (B, max_pages), dtype=torch.int32)
    else:
        cap = cap_target
        k_cache, v_cache = half(B, Hkv, cap + 8, D)[:, :, :cap], half(B, Hkv, cap + 8, D)[:, :, :cap]
        if chance(0.5):                               # else a strided view of a longer StaticCache
            k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
        block_table = None

    mask = cache_seqlens = None
    lens = [cap] * B
    if focus == "mask":
        shape = (B if chance(0.7) else 1, 1, Sq if chance(0.7) else 1, cap if narrow or chance(0.85) else 1)
        mask = torch.rand(shape) < 0.6
        if shape[3] > 1 and (narrow or chance(0.7)):  # StaticCache tail / left padding: a narrower range
            mask[..., :rint(1 if narrow else 0, max(1, cap // 3))] = False
            mask[..., cap - rint(0, cap // 3):] = False
        mask[0, 0, rint(0, shape[2] - 1)] = False     # a row with nothing allowed
    elif focus in ("dense", "paged1", "paged", "empty", "window") or chance(0.7):
        if focus == "empty":
            lens = [rint(-2, Sq - 1) for _ in range(B)]
        elif focus == "window":
            lens = [rint(cap - kBN, cap) for _ in range(B)]
        else:
            lens = [rint(0, cap) if chance(0.6) else cap for _ in range(B)]
        if focus in ("dense", "paged1", "paged"):     # lengths out of [0, cap]: clamped
            lens[0] = cap + rint(1, 3)
            if B > 1 and chance(0.5):
                lens[-1] = -rint(1, 3)
        cache_seqlens = torch.tensor(lens, dtype=torch.int32)
    clamped = [min(max(L, 0), cap) for L in lens]
    if paged:
        used = [-(-L // page_size) for L in clamped]  # pages a sequence reads
        for b, n in enumerate(used):
            block_table[b, n:] = -1                   # never read
        readers = [b for b in range(B) if used[b]]
        for _ in range(rint(1, 3) if readers else 0): # out-of-range ids that are read: clamped
            b = readers[rint(0, len(readers) - 1)]
            block_table[b, rint(0, used[b] - 1)] = -rint(1, 5) if chance(0.5) else num_pages + rint(0, 4)
    else:
        for b, L in enumerate(clamped):               # slots past the length: never read
            k_cache[b, :, L:], v_cache[b, :, L:] = GARBAGE, -GARBAGE
    return (q, k_cache, v_cache, cache_seqlens, block_table, mask, scale, window, softcap, num_splits)


def run_case(args, stats, mutant=None):
    q, k_cache, v_cache, cache_seqlens, block_table, mask, scale, window, softcap, num_splits = args
    assert cuda_supports(*args) is None, cuda_supports(*args)       # a call the CUDA backend takes
    ref_out, ref_lse = ref_decode(q.double(), k_cache.double(), v_cache.double(), cache_seqlens=cache_seqlens,
                                  block_table=block_table, scale=scale, mask=mask,
                                  window=window if window > 0 else None, softcap=softcap if softcap > 0 else None)
    out, lse = emulate(*args, stats=stats, mutant=mutant)
    stats["empty_rows"] += int(torch.isneginf(ref_lse).sum())
    compare(out, lse, ref_out, ref_lse)


FOCUS = ["dense", "paged1", "paged", "window", "softcap", "mask", "splits", "gqa", "empty"]
CASES_PER_FOCUS = 3


@pytest.mark.parametrize("focus", FOCUS)
def test_algorithm_matches_reference(focus):
    stats = new_stats()
    for i in range(CASES_PER_FOCUS):
        D = HEAD_DIMS[(FOCUS.index(focus) + i) % len(HEAD_DIMS)]          # every D, every kBlockN
        # One mask case surely narrows the key range (drawn freely, all three could miss it).
        run_case(random_case(focus, D, narrow=i == 0), stats)
    # The focus was actually exercised (not just drawn).
    if focus == "dense":
        assert stats["unmasked_tiles"] > 0, stats                    # the need_mask shortcut taken
    if focus in ("paged1", "paged"):
        assert stats["clamped_pages"] > 0, stats
    if focus == "window":
        assert stats["lo_positive"] > 0, stats
    if focus == "splits":
        assert stats["empty_ctas"] > 0, stats
    if focus == "gqa":
        assert stats["row_blocks"] >= 2, stats
    if focus in ("mask", "empty"):
        assert stats["empty_rows"] > 0, stats
    if focus == "mask":
        assert stats["mask_narrowed"] > 0, stats


# ----------------------------------------------------------------------------------------------
# Negative checks: a wrong swizzle / lane mapping / merge must be caught by the checks above.

@pytest.mark.parametrize("mutant", ["no_xor", "k_rows"])
@pytest.mark.parametrize("D", [80, 128])
def test_fragment_mutants_detected(D, mutant):
    pairs, _, _ = fragment_path(D, mutant)
    assert not all(np.array_equal(got, want) for got, want in pairs)


@pytest.mark.parametrize("mutant", ["warp_merge", "combine_weights", "combine_lse"])
def test_merge_mutants_detected(mutant):
    # One sequence of 300 keys, D 64 (4 warps x 16 keys per tile), 3 splits: warps and splits
    # see different maxima, so any wrong rescaling shows.
    q, k = half(1, 4, 2, 64), half(1, 2, 300, 64)
    args = (q, k, half(1, 2, 300, 64), torch.tensor([300], dtype=torch.int32), None, None, 0.125, 0, 0.0, 3)
    run_case(args, new_stats())                                      # the real algorithm passes
    with pytest.raises(AssertionError, match="not close"):
        run_case(args, new_stats(), mutant=mutant)
