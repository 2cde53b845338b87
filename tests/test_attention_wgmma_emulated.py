"""The Hopper prefill flash-attention policy (csrc/attention/flash_fwd_wgmma.cuh, Sm90Mma) emulated on CPU.

The kernel has never run on a GPU. This file mirrors, in NumPy, the index math that Sm90Mma adds
to the shared skeleton flash_fwd_kernel<Mma> (flash_fwd_kernel.cuh): the 1024-byte alignment of
the dynamic shared memory and its carve-up (Q tile, 2 K stages, 2 V stages), the descriptors
(common/wgmma.cuh desc_sw128 for Q / K, desc_sw128_mn for V, `at(desc, bytes)` = desc +
(bytes >> 4)), the per-k-step byte offsets (`block * kQBlockBytes + in_row`, `stage + block *
kKVBlockBytes + in_row` for Q K^T; `stage + ks * 16 * kRowBytes` for P V), the warpgroup's Q rows
(wg = warp / 4, rows wg * 64), the scale-d predicate (kk > 0), p_fragment, and the reinterpret
of the skeleton's s[kNT][4] / acc_o[kDT][4] as wgmma's d[N / 2] (d[4 * nt + e] = s[nt][e]).
Tile configs are parsed from flash_traits.h (FlashFwdTraitsSm90); shared memory is filled by
the sm80 emulation's thread-by-thread mirror of load_tile_async (SmemTile, kGroup = 8, rows past
rows_valid zero-filled), imported from tests/test_attention_kernel_emulated.py.

The descriptors are decoded by models of wgmma's operand fetch written here from the PTX ISA
(independent of the kernel code), 16-bit types, 128-byte swizzle (address bits 4-6 ^= bits 7-9):
  K-major (ss A and B, imm-trans = 0): element (r, k) of a k16 step at start + (r // 8) * SBO +
    (r % 8) * 128 + 2k;
  N-major (rs B, imm-trans-b = 1): canonical layout ((T, 8, m), (8, k)) : ((1, T, LBO), (8T, SBO))
    (units of T = 8 elements): element (k, n) at start + (n // 64) * LBO + (k // 8) * SBO +
    (k % 8) * 128 + 2 (n % 64);
  rs A registers (per warp w: rows 16w..16w+15): a[0] (g, 2c..), a[1] (g+8, 2c..), a[2] (g, 8+2c..),
    a[3] (g+8, 8+2c..), lower column in the low half; D: register 4j + e of lane (g, c) of warp w
    is (16w + g + 8 (e / 2), 8j + 2c + e % 2).

Proven here, given that mirror and those models, for D = 64, 128, 256, both K / V stages, two
placements of the dynamic shared memory (1008 bytes of alignment padding; the top of a 228 KB
window): every operand element each k step fetches is exactly the intended element of the Q /
K / V tile (by identity tags), and with fp16 values chosen so every sum is exact in float64,
S (from a non-zero stale accumulator, scale-d = 0 on the first step) == Q K^T and O == O0 + P V
for EQUALITY, through the register layouts of the skeleton and of wgmma; every fetch stays
inside its region (the warpgroup's own Q rows, the stage being read); descriptor fields in
range (14-bit start / LBO / SBO, reserved bits 0, no carry out of the start field for any 16-byte
aligned base that fits the window, tiles 1024-aligned so base offset 0 is right); the regions
fit kSmemBytes (<= 227 KB) without overlapping, each element written once by the fills; each
warp's O staging (the skeleton's epilogue through the Q tile) writes only its own 16 rows,
never rows the other warpgroup's MMAs read. test_mutant_fails shows that deliberately wrong
variants fail these checks.

NOT proven: the ISA models themselves (in particular the meaning of LBO / SBO for MN-major
swizzled layouts, taken from the PTX ISA's "leading dimension byte offset" table and CUTLASS's
documented canonical GMMA layouts), that the .cuh says what is mirrored (test_kernel_source_
matches_mirror only checks that the transcribed lines are still there verbatim), the async-proxy
fences, wgmma fence / commit / wait placement and any race, fp32 accumulation order and the
fp16 / bf16 rounding of pack2, register pressure, speed. The kernel stays UNVERIFIED until
tests/test_attention_cuda.py runs on an H100.
"""
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from helpers import assert_mirrored
from test_attention_kernel_emulated import global_rows, load_tile_async
from test_decode_kernel_emulated import C4, G, Smem, SmemTile

CSRC = Path(__file__).resolve().parents[1] / "csrc"
POLICY_SRC = CSRC / "attention" / "flash_fwd_wgmma.cuh"
KERNEL_SRC = CSRC / "attention" / "flash_fwd_kernel.cuh"
TRAITS_SRC = CSRC / "attention" / "flash_traits.h"
WGMMA_SRC = CSRC / "common" / "wgmma.cuh"

SMEM_WINDOW = 228 * 1024      # an H100 SM's shared memory: no CTA address reaches past it
RESERVED = 0x3 << 14 | 0x3 << 30 | 0x7 << 46 | 0x3FF << 52   # descriptor bits that must stay 0


# ----------------------------------------------------------------------------------------------
# Tile configs: FlashFwdTileSm90 / FlashFwdTraitsSm90 (flash_traits.h), parsed.

class Sm90Tile:
    def __init__(self, consts):
        self.__dict__.update(consts)


def parse_sm90_traits():
    """FlashFwdTileSm90<D, BN> derives from FlashFwdTile<...>: evaluate FlashFwdTile's constants with
    the arguments FlashFwdTileSm90 passes."""
    text = TRAITS_SRC.read_text()
    params = re.search(r"template <([^>]*)>\s*struct FlashFwdTile \{", text).group(1)
    names = re.findall(r"(?:int|bool)\s+(\w+)", params)
    body = re.search(r"struct FlashFwdTile \{(.*?)\n\};", text, re.S).group(1)
    exprs = re.findall(r"static constexpr (?:int|bool) (k\w+) = ([^;]+);", body)
    args = re.search(r"struct FlashFwdTileSm90 : FlashFwdTile<([^>]*)>", text).group(1).split(",")
    assert len(names) == len(args), (names, args)
    specs = re.findall(r"struct FlashFwdTraitsSm90<(\d+)>\s*:\s*FlashFwdTileSm90<(\d+),\s*(\d+)>", text)
    cfgs = {}
    for key, D, bn in specs:
        assert key == D
        outer = {"kHeadDim_": int(D), "kBlockN_": int(bn), "false": False, "true": True}
        env = dict(outer)
        for name, arg in zip(names, args):
            env[name] = eval(arg.strip(), {"__builtins__": {}}, outer)
        for name, expr in exprs:                         # int arithmetic: C++ `/` is `//` here
            assert re.fullmatch(r"[\w\s*/+%()<>?:-]+", expr), expr
            py = re.sub(r"(.+?)\s*\?\s*(.+?)\s*:\s*(.+)", r"(\2 if \1 else \3)", expr.replace("/", "//"))
            env[name] = eval(py, {"__builtins__": {}}, env)
        cfgs[int(D)] = Sm90Tile({k: v for k, v in env.items() if not k.endswith("_")})
    return cfgs


CFG = parse_sm90_traits()


def test_traits_parsed():
    assert sorted(CFG) == [64, 128, 256]
    assert {D: t.kBlockN for D, t in CFG.items()} == {64: 128, 128: 128, 256: 64}
    for D, t in CFG.items():                             # FlashFwdTileSm90's static_asserts
        assert t.kBlockM == 128 and t.kThreads == 256 and t.kStages == 2 and t.kSmemAlign == 1024
        assert D % 64 == 0 and t.kBlockN % 64 == 0 and t.kBlockN <= 256
        assert t.kSmemBytes == (t.kSmemQElems + 2 * t.kStages * t.kSmemKVElems) * 2 + 1024
        assert t.kSmemBytes <= 227 * 1024, D
        assert SmemTile(t.kBlockM, t.kChunks).kGroup == 8 and SmemTile(t.kBlockN, t.kChunks).kGroup == 8


# ----------------------------------------------------------------------------------------------
# Models of the hardware, from the PTX ISA (independent of the kernel code).

def decode_desc(desc):
    """Shared-memory matrix descriptor -> (start, LBO, SBO) in bytes; 128-byte swizzle only."""
    assert desc >> 62 == 1, "layout type must be SWIZZLE_128B"
    return (desc & 0x3FFF) << 4, ((desc >> 16) & 0x3FFF) << 4, ((desc >> 32) & 0x3FFF) << 4


def swizzle128(lin):
    return lin ^ (((lin >> 7) & 7) << 4)


def fetch_k_major(desc, rows):
    """Byte addresses of the (rows, 16) 16-bit operand of one k16 step, K-major (imm-trans 0)."""
    start, _, sbo = decode_desc(desc)
    r, k = np.arange(rows)[:, None], np.arange(16)[None, :]
    return swizzle128(start + (r // 8) * sbo + (r % 8) * 128 + 2 * k)


def fetch_n_major(desc, n):
    """Byte addresses of the (16, n) 16-bit B operand of one k16 step, N-major (imm-trans-b 1):
    ((T, 8, m), (8, k)) : ((1, T, LBO), (8T, SBO)), T = 8 elements."""
    start, lbo, sbo = decode_desc(desc)
    k, nn = np.arange(16)[:, None], np.arange(n)[None, :]
    return swizzle128(start + (nn // 64) * lbo + (k // 8) * sbo + (k % 8) * 128 + 2 * (nn % 64))


def acc_layout(n):
    """wgmma D (64 x n, f32): [warp in group, lane, register] -> (row, col)."""
    i = np.arange(n // 2)[None, :]
    rows = 16 * np.arange(4)[:, None, None] + (G[:, None] + 8 * ((i % 4) // 2))[None]
    cols = np.broadcast_to(8 * (i // 4) + 2 * C4[:, None] + i % 2, (4, 32, n // 2))
    return rows, cols


def regs_to_matrix(regs, n):
    rows, cols = acc_layout(n)
    m, hits = np.full((64, n), np.nan), np.zeros((64, n), dtype=int)
    m[rows, cols] = regs
    np.add.at(hits, (rows, cols), 1)
    assert (hits == 1).all(), "the accumulator layout covers D once"
    return m


def matrix_to_regs(m, n):
    rows, cols = acc_layout(n)
    return m[rows, cols]


def rs_a_matrix(a):
    """wgmma rs A (64 x 16, 16-bit) from a[warp in group, lane, register, half]."""
    w = np.arange(4)[:, None, None, None]
    reg, half = np.arange(4)[None, None, :, None], np.arange(2)[None, None, None, :]
    rows = np.broadcast_to(16 * w + G[None, :, None, None] + 8 * (reg % 2), a.shape)
    cols = np.broadcast_to(8 * (reg // 2) + 2 * C4[None, :, None, None] + half, a.shape)
    m, hits = np.full((64, 16), np.nan), np.zeros((64, 16), dtype=int)
    m[rows, cols] = a
    np.add.at(hits, (rows, cols), 1)
    assert (hits == 1).all(), "the A fragment covers A once"
    return m


# ----------------------------------------------------------------------------------------------
# The kernel, mirrored. KERNEL holds the pieces the mutants replace.

def desc_sw128_lbo(addr, lbo_bytes):
    """wgmma::desc_sw128_lbo."""
    return ((addr & 0x3FFFF) >> 4) | (((lbo_bytes & 0x3FFFF) >> 4) << 16) | ((1024 >> 4) << 32) | (1 << 62)


def desc_sw128(addr):
    """wgmma::desc_sw128."""
    return desc_sw128_lbo(addr, 16)


def desc_sw128_mn(addr, n_block_bytes):
    """wgmma::desc_sw128_mn."""
    return desc_sw128_lbo(addr, n_block_bytes)


def at(desc, nbytes):
    """Sm90Mma::at."""
    assert nbytes % 16 == 0
    return desc + (nbytes >> 4)


def p_fragment(s, ks):
    """flash_fwd_kernel.cuh p_fragment: s (32 lanes, kNT, 4) -> a (32, 4 registers, 2 halves)."""
    return np.stack([s[:, 2 * ks, 0:2], s[:, 2 * ks, 2:4], s[:, 2 * ks + 1, 0:2], s[:, 2 * ks + 1, 2:4]], 1)


KERNEL = dict(
    q_rows=lambda wg: wg * 64,                               # desc_sw128(sQ + wg * 64 * kRowBytes)
    q_block_bytes=lambda t: t.kBlockM * 128,                 # kQBlockBytes = kBM * kRowBytes
    in_row=lambda kk: (kk % 4) * 32,                         # in_row = (kk % 4) * 32u
    qk_acc=lambda kk: kk > 0,                                # scale-d of wgmma_qk
    v_desc=lambda sV, kv_block: desc_sw128_mn(sV, kv_block),
    v_key_step=16 * 128,                                     # ks * 16 * kRowBytes
    v_fetch=lambda desc, n: fetch_n_major(desc, n),          # rs wrappers: imm-trans-b = 1
    p_fragment=p_fragment,
)


class Sm90Mma:
    """Sm90Mma's descriptors and per-step offsets (qk / pv take `stage` in bytes)."""

    def __init__(self, K, t, sQ, sK, sV, warp):
        self.K, self.t = K, t
        self.kRowBytes = 128
        self.kQBlockBytes = K["q_block_bytes"](t)
        self.kKVBlockBytes = t.kBlockN * self.kRowBytes
        wg = warp // 4
        self.q_desc = desc_sw128(sQ + K["q_rows"](wg) * self.kRowBytes)
        self.k_desc = desc_sw128(sK)
        self.v_desc = K["v_desc"](sV, self.kKVBlockBytes)

    def qk_steps(self, stage):
        for kk in range(self.t.kHeadDim // 16):
            block, in_row = kk // 4, self.K["in_row"](kk)
            qo, ko = block * self.kQBlockBytes + in_row, stage + block * self.kKVBlockBytes + in_row
            yield kk, (self.q_desc, qo), (self.k_desc, ko), self.K["qk_acc"](kk)

    def pv_steps(self, stage):
        for ks in range(self.t.kBlockN // 16):
            yield ks, (self.v_desc, stage + ks * self.K["v_key_step"])


# ----------------------------------------------------------------------------------------------
# Shared memory, filled as the skeleton fills it (load_tile_async, thread by thread).

def exact_values(rng, *shape):
    """fp16 values with 2^-6 <= |x| < 8 (multiples of 2^-16): products are multiples of 2^-32
    below 2^6, so sums of <= 256 of them are exact in float64 in any order."""
    x = np.clip(rng.standard_normal(shape), -7.9, 7.9)
    return (np.sign(x) * np.maximum(np.abs(x), 2.0 ** -6)).astype(np.float16).astype(np.float64)


class Layout:
    """One CTA's dynamic shared memory at raw address `raw`, as flash_fwd_kernel carves it."""

    def __init__(self, t, raw):
        self.raw = raw
        kAlign = t.kSmemAlign
        base = raw + (kAlign - raw % kAlign) % kAlign if kAlign > 128 else raw
        self.kKVStageBytes = t.kSmemKVElems * 2
        self.sQ = base
        self.sK = self.sQ + t.kSmemQElems * 2
        self.sV = self.sK + t.kStages * self.kKVStageBytes
        self.end = self.sV + t.kStages * self.kKVStageBytes
        self.regions = {"Q": (self.sQ, self.sK)}
        for s in range(t.kStages):
            self.regions[f"K{s}"] = (self.sK + s * self.kKVStageBytes, self.sK + (s + 1) * self.kKVStageBytes)
            self.regions[f"V{s}"] = (self.sV + s * self.kKVStageBytes, self.sV + (s + 1) * self.kKVStageBytes)


ROWS_CUT = {"Q": 3, "K0": 0, "V0": 0, "K1": 5, "V1": 5}      # zero-filled rows at each tile's end


@lru_cache(maxsize=None)
def filled(D, raw):
    """Q, K0, K1, V0, V1 loaded twice: fp16-exact values and identity tags (1 + index, 0 = zero
    fill). Returns (layout, {'val': Smem, 'id': Smem}, {kind: {tile: logical tile}})."""
    t = CFG[D]
    lay = Layout(t, raw)
    rng = np.random.default_rng(D * 7919 + raw)
    smem = {kind: Smem(raw + t.kSmemBytes) for kind in ("val", "id")}
    tiles = {"val": {}, "id": {}}
    for i, (name, (lo, _)) in enumerate(lay.regions.items()):
        rows = t.kBlockM if name == "Q" else t.kBlockN
        valid = rows - ROWS_CUT[name]
        for kind in ("val", "id"):
            tags = 1 + i * 2 ** 16 + np.arange(valid * D).reshape(valid, D)
            x = exact_values(rng, valid, D) if kind == "val" else tags
            g = global_rows(x, D + 8)                     # padded global rows
            split = load_tile_async(smem[kind], lo, rows, t.kChunks, t.kThreads, g, 0, D + 8, valid, [])
            assert split == "row"
            tile = np.zeros((rows, D))
            tile[:valid] = x
            tiles[kind][name] = tile
    for kind in ("val", "id"):                            # regions disjoint, each element written once
        w = smem[kind].writes
        assert (w[lay.sQ // 2:lay.end // 2] == 1).all() and w.sum() == (lay.end - lay.sQ) // 2
    return lay, smem, tiles


def read(smem, addrs):
    addrs = np.asarray(addrs)
    assert (addrs % 2 == 0).all() and addrs.min() >= 0 and addrs.max() + 2 <= 2 * len(smem.data), "outside smem"
    return smem.data[addrs // 2]


# ----------------------------------------------------------------------------------------------
# One CTA's two products, per stage, per warpgroup.

def check_desc(base, off, lay, t):
    """Descriptor sanity of at(base, off)."""
    d = at(base, off)
    assert base & RESERVED == 0 and d & RESERVED == 0, "reserved descriptor bits set (carry?)"
    assert (base & 0x3FFF) + (off >> 4) < 1 << 14 and d - base == off >> 4, "carry out of the start field"
    start, lbo, sbo = decode_desc(d)
    assert start == ((base & 0x3FFF) << 4) + off and start + 16 <= lay.raw + t.kSmemBytes <= SMEM_WINDOW
    assert (start >> 7) & 7 == 0 and (d >> 49) & 7 == 0, "start in the first row of a 1024-byte atom: base offset 0"
    assert sbo == 1024
    return d


def in_region(addrs, region, lay):
    lo, hi = lay.regions[region]
    assert (addrs >= lo).all() and (addrs + 2 <= hi).all(), f"fetch outside {region}"


def emulate(D, raw, K=KERNEL, sanity=True):
    """Both stages of one CTA. sanity=False skips the descriptor / region checks (the mutant tests
    then must fail on the fetched values alone). Returns the Q bytes each warpgroup fetched."""
    t = CFG[D]
    lay, smem, tiles = filled(D, raw)
    kBM, kBN, kNT, kDT = t.kBlockM, t.kBlockN, t.kBlockN // 8, D // 8
    rng = np.random.default_rng(D + raw)
    q_fetched = {0: set(), 1: set()}
    for stage in range(t.kStages):
        st = stage * lay.kKVStageBytes                       # mma.qk(s, stage * kKVStageBytes)
        Kid, Vid = tiles["id"][f"K{stage}"], tiles["id"][f"V{stage}"]
        Qv, Kv, Vv = tiles["val"]["Q"], tiles["val"][f"K{stage}"], tiles["val"][f"V{stage}"]
        S0 = exact_values(rng, kBM, kBN)                     # stale registers (the previous tile's P)
        P = exact_values(rng, kBM, kBN)                      # P as the softmax leaves it in s
        O0 = exact_values(rng, kBM, D)                       # O after the rescale
        S_cta, O_cta = np.full((kBM, kBN), np.nan), np.full((kBM, D), np.nan)
        for wg in range(2):
            mmas = [Sm90Mma(K, t, lay.sQ, lay.sK, lay.sV, warp) for warp in range(4 * wg, 4 * wg + 4)]
            assert len({(m.q_desc, m.k_desc, m.v_desc) for m in mmas}) == 1, "the warpgroup's warps agree"
            mma = mmas[0]
            if sanity:
                assert mma.kKVBlockBytes >> 4 < 1 << 14 and decode_desc(mma.v_desc)[1] == mma.kKVBlockBytes, \
                    "V descriptor: LBO = the distance between 64-wide D blocks"
                for desc in (mma.q_desc, mma.k_desc, mma.v_desc):
                    assert ((desc & 0x3FFF) << 4) % 1024 == 0, "tile bases 1024-aligned"
            # ---- S = Q K^T: the skeleton's s[kNT][4] per thread, reinterpreted as d[kBN / 2].
            warps = range(4 * wg, 4 * wg + 4)
            s = np.stack([skel_regs(S0, warp, kNT) for warp in warps])            # (4, 32, kNT * 4)
            d = regs_to_matrix(s, kBN)                                            # the ISA's view
            for kk, (qd, qo), (kd, ko), acc in mma.qk_steps(st):
                if sanity:
                    da, db = check_desc(qd, qo, lay, t), check_desc(kd, ko, lay, t)
                else:
                    da, db = at(qd, qo), at(kd, ko)
                a_addr, b_addr = fetch_k_major(da, 64), fetch_k_major(db, kBN)
                if sanity:
                    in_region(a_addr, "Q", lay)
                    assert (((a_addr - lay.sQ) // 128) % kBM // 64 == wg).all(), "Q rows of another warpgroup"
                    in_region(b_addr, f"K{stage}", lay)
                q_fetched[wg].update((a_addr // 2).ravel().tolist())
                cols = slice(16 * kk, 16 * kk + 16)
                assert np.array_equal(read(smem["id"], a_addr), tiles["id"]["Q"][64 * wg:64 * wg + 64, cols]), \
                    (D, stage, wg, kk, "A of Q K^T")
                assert np.array_equal(read(smem["id"], b_addr), Kid[:, cols]), (D, stage, wg, kk, "B of Q K^T")
                prod = read(smem["val"], a_addr) @ read(smem["val"], b_addr).T
                d = d + prod if acc else prod                                     # scale-d
            s = matrix_to_regs(d, kBN)
            for w, warp in enumerate(warps):
                skel_store(S_cta, s[w], warp, kNT)
            # ---- O += P V: P from the s registers by p_fragment, O through d[kD / 2].
            sP = np.stack([skel_regs(P, warp, kNT).reshape(32, kNT, 4) for warp in warps])
            o = np.stack([skel_regs(O0, warp, kDT) for warp in warps])
            d = regs_to_matrix(o, D)
            for ks, (vd, vo) in mma.pv_steps(st):
                db = check_desc(vd, vo, lay, t) if sanity else at(vd, vo)
                b_addr = K["v_fetch"](db, D)                                      # (16, D)
                if sanity:
                    in_region(b_addr, f"V{stage}", lay)
                assert np.array_equal(read(smem["id"], b_addr), Vid[16 * ks:16 * ks + 16]), (D, stage, wg, ks, "V")
                A = rs_a_matrix(np.stack([K["p_fragment"](sP[w], ks) for w in range(4)]))
                d = d + A @ read(smem["val"], b_addr)                             # scale-d = 1
            o = matrix_to_regs(d, D)
            for w, warp in enumerate(warps):
                skel_store(O_cta, o[w], warp, kDT)
        assert np.array_equal(S_cta, Qv @ Kv.T), (D, stage, "S")
        assert np.array_equal(O_cta, O0 + P @ Vv), (D, stage, "O")
    return lay, q_fetched


def skel_pos(warp, ntiles):
    """The skeleton's view of s[nt][2r + j] / acc_o[dt][2r + j] (= d[4 nt + 2r + j]) of lane
    (g, c4): row warp * 16 + g + 8r (warp_row0 - m0), column nt * 8 + 2 * c4 + j."""
    i = np.arange(4 * ntiles)[None, :]
    nt, r, j = i // 4, (i % 4) // 2, i % 2
    return warp * 16 + G[:, None] + 8 * r, nt * 8 + 2 * C4[:, None] + j


def skel_regs(m, warp, ntiles):
    rows, cols = skel_pos(warp, ntiles)
    return m[rows, cols]


def skel_store(m, regs, warp, ntiles):
    rows, cols = skel_pos(warp, ntiles)
    assert np.isnan(m[rows, cols]).all(), "a row / column written twice"
    m[rows, cols] = regs


# ----------------------------------------------------------------------------------------------
# Tests.

def top_of_window(D):
    return (SMEM_WINDOW - CFG[D].kSmemBytes) // 16 * 16


@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("where", ["pad_1008", "window_top"])
def test_products_exact(D, where):
    raw = 16 if where == "pad_1008" else top_of_window(D)
    lay, _ = emulate(D, raw)
    t = CFG[D]
    assert lay.end <= raw + t.kSmemBytes <= SMEM_WINDOW
    if where == "pad_1008":
        assert lay.sQ - raw == 1008


@pytest.mark.parametrize("D", [64, 128, 256])
def test_smem_layout_all_bases(D):
    """Every 16-byte aligned placement of the dynamic shared memory inside the window: tiles
    1024-aligned, regions inside kSmemBytes, every descriptor start field of every step (both
    warpgroups, both stages) without carry."""
    t = CFG[D]
    raws = np.arange(0, top_of_window(D) + 1, 16)
    lay = Layout(t, raws)
    kKV = lay.kKVStageBytes
    assert (lay.sQ % 1024 == 0).all() and (lay.sK % 1024 == 0).all() and (lay.sV % 1024 == 0).all()
    assert kKV % 1024 == 0 and (t.kBlockM * 128) % 1024 == 0 and (t.kBlockN * 128) % 1024 == 0
    assert (lay.end <= raws + t.kSmemBytes).all() and (raws + t.kSmemBytes <= SMEM_WINDOW).all()
    starts = []
    for wg in range(2):
        for stage in range(t.kStages):
            for kk in range(D // 16):
                starts.append((lay.sQ + wg * 64 * 128, (kk // 4) * t.kBlockM * 128 + (kk % 4) * 32))
                starts.append((lay.sK, stage * kKV + (kk // 4) * t.kBlockN * 128 + (kk % 4) * 32))
            for ks in range(t.kBlockN // 16):
                starts.append((lay.sV, stage * kKV + ks * 16 * 128))
    for base, off in starts:
        field = (base & 0x3FFFF) >> 4
        assert (field + (off >> 4) < 1 << 14).all() and ((field << 4) == base).all()


@pytest.mark.parametrize("D", [64, 128, 256])
def test_o_staging_row_ownership(D):
    """The skeleton's epilogue stages O through the Q tile (QTile::offset) with only __syncwarp:
    each warp writes, and reads back, only its own 16 rows; those are never rows the other
    warpgroup's MMAs fetch (its own warpgroup's Q reads retired: wait_group 0 in every qk)."""
    t = CFG[D]
    lay, q_fetched = emulate(D, 16)
    QTile = SmemTile(t.kBlockM, t.kChunks)
    kG = QTile.kGroup
    staged = {}
    for warp in range(8):
        own = {lay.sQ // 2 + QTile.offset(warp * 16 + r, c) + e for r in range(16) for c in range(t.kChunks)
               for e in range(8)}
        writes = []
        for dt in range(D // 8):
            for r in range(2):
                row = warp * 16 + G + 8 * r                      # const int row = warp * 16 + g + 8 * r;
                el = lay.sQ // 2 + QTile.offset(row, dt) + 2 * C4
                writes += el.tolist() + (el + 1).tolist()
        assert len(writes) == len(set(writes)) == 16 * D and set(writes) == own, (D, warp)
        staged[warp] = own
        for i in range(16 * t.kChunks):                          # read-back, all lanes' iterations
            r, c = (i // kG) % 16, (i // (16 * kG)) * kG + i % kG
            src = lay.sQ // 2 + QTile.offset(warp * 16 + r, c)
            assert set(range(src, src + 8)) <= own
        assert not own & q_fetched[1 - warp // 4], (D, warp, "stages over the other warpgroup's Q rows")
    for w in range(8):
        for w2 in range(w + 1, 8):
            assert not staged[w] & staged[w2]
    for wg in range(2):                                          # each warpgroup fetched exactly its 64 rows
        assert q_fetched[wg] == set().union(*(staged[w] for w in range(4 * wg, 4 * wg + 4)))


def _swapped_v_desc(sV, kv_block):
    return ((sV & 0x3FFFF) >> 4) | ((1024 >> 4) << 16) | (((kv_block & 0x3FFFF) >> 4) << 32) | (1 << 62)


def _k_major_v(desc, n):
    return fetch_k_major(desc, n).T


MUTANTS = {  # name: (KERNEL overrides, head dims where the mutant differs from the kernel)
    "v_lbo_sbo_swapped": (dict(v_desc=_swapped_v_desc), {64, 128, 256}),
    "v_read_k_major": (dict(v_fetch=_k_major_v), {64, 128, 256}),
    "v_key_step_8_rows": (dict(v_key_step=8 * 128), {64, 128, 256}),
    "q_not_offset_by_warpgroup": (dict(q_rows=lambda wg: 0), {64, 128, 256}),
    "qk_in_row_16_bytes": (dict(in_row=lambda kk: (kk % 4) * 16), {64, 128, 256}),
    "q_block_stride_kbn": (dict(q_block_bytes=lambda t: t.kBlockN * 128), {256}),
    "p_fragment_a1_a2_swapped": (dict(p_fragment=lambda s, ks: p_fragment(s, ks)[:, [0, 2, 1, 3]]), {64, 128, 256}),
    "qk_accumulates_stale_s": (dict(qk_acc=lambda kk: True), {64, 128, 256}),
}


@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_mutant_fails(mutant, D):
    over, differs = MUTANTS[mutant]
    K = dict(KERNEL, **over)
    if D not in differs:                                 # same index math at this D (kBM == kBN)
        emulate(D, 16, K)
        return
    with pytest.raises(AssertionError):                  # on the fetched values alone
        emulate(D, 16, K, sanity=False)
    with pytest.raises(AssertionError):
        emulate(D, 16, K)


# Lines of the CUDA sources mirrored above (whitespace-normalized); if one changes, update the
# mirror and this list together.
MIRRORED = {
    POLICY_SRC: [
        "FASTLLM_FLASH_WGMMA(__half, 64, ss_m64n64k16_f16, rs_m64n64k16_f16)",
        "FASTLLM_FLASH_WGMMA(__half, 128, ss_m64n128k16_f16, rs_m64n128k16_f16)",
        "FASTLLM_FLASH_WGMMA(__nv_bfloat16, 64, ss_m64n64k16_bf16, rs_m64n64k16_bf16)",
        "FASTLLM_FLASH_WGMMA(__nv_bfloat16, 128, ss_m64n128k16_bf16, rs_m64n128k16_bf16)",
        "wgmma::SS(d, da, db, acc);",
        "wgmma::RS(d, a, db, 1);",
        "wgmma::rs_m64n256k16_f16(d, a, db, 1);",
        "wgmma::rs_m64n256k16_bf16(d, a, db, 1);",
        "static constexpr int kD = Traits::kHeadDim, kBM = Traits::kBlockM, kBN = Traits::kBlockN;",
        "static constexpr int kNT = kBN / 8, kDT = kD / 8;",
        'static_assert(kBM == 128 && Traits::kThreads == 256, "two warpgroups of 64 query rows");',
        "static constexpr uint32_t kRowBytes = 128;",
        "static constexpr uint32_t kQBlockBytes = kBM * kRowBytes;",
        "static constexpr uint32_t kKVBlockBytes = kBN * kRowBytes;",
        "const int wg = warp / 4;",
        "q_desc = wgmma::desc_sw128(sQ + wg * 64 * kRowBytes);",
        "k_desc = wgmma::desc_sw128(sK);",
        "v_desc = wgmma::desc_sw128_mn(sV, kKVBlockBytes);",
        "__device__ static __forceinline__ uint64_t at(uint64_t desc, uint32_t bytes) { return desc + (bytes >> 4); }",
        "float(&d)[kBN / 2] = reinterpret_cast<float(&)[kBN / 2]>(s);",
        "for (int kk = 0; kk < kD / 16; ++kk) {",
        "const uint32_t block = kk / 4, in_row = (kk % 4) * 32u;",
        "wgmma_qk<T, kBN>(d, at(q_desc, block * kQBlockBytes + in_row),",
        "at(k_desc, stage + block * kKVBlockBytes + in_row), kk > 0);",
        "wgmma::commit_group(); wgmma::wait_group<0>();",
        "float(&d)[kD / 2] = reinterpret_cast<float(&)[kD / 2]>(o);",
        "for (int ks = 0; ks < kBN / 16; ++ks) p_fragment<T>(a[ks], s, ks);",
        "for (int ks = 0; ks < kBN / 16; ++ks) wgmma_pv<T, kD>(d, a[ks], at(v_desc, stage + ks * 16 * kRowBytes));",
        "return launch_plain_or_bias<Sm90Mma, FlashFwdTraitsSm90<D>, FlashFwdBiasTraitsSm90<D>, T>(p, stream);",
    ],
    KERNEL_SRC: [
        "constexpr uint32_t kKVStageBytes = Traits::kSmemKVElems * 2;",
        "constexpr uint32_t kAlign = Traits::kSmemAlign;",
        "if constexpr (kAlign > 128) smem += (kAlign - smem_u32(smem_raw) % kAlign) % kAlign;",
        "T* sQ = reinterpret_cast<T*>(smem);",
        "const uint32_t sQ_u32 = smem_u32(smem);",
        "const uint32_t sK_u32 = sQ_u32 + Traits::kSmemQElems * 2;",
        "const uint32_t sV_u32 = sK_u32 + Traits::kStages * kKVStageBytes;",
        "const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;",
        "load_tile_async<kBM, kChunks, kThreads>(sQ_u32, gQ, p.q_row_stride, Sq - m0, tid);",
        "const uint32_t st = (stage ^ 1) * kKVStageBytes;",
        "load_tile_async<kBN, kChunks, kThreads>(sK_u32 + st, gK + nn * kBN * p.k_row_stride, p.k_row_stride,",
        "load_tile_async<kBN, kChunks, kThreads>(sV_u32 + st, gV + nn * kBN * p.v_row_stride, p.v_row_stride,",
        "Mma mma(sQ_u32, sK_u32, sV_u32, warp, lane);",
        "const int warp_row0 = m0 + warp * 16;",
        "mma.qk(s, stage * kKVStageBytes);",
        "// s[nt][2r + j] is row warp_row0 + g + 8r, key n0 + nt * 8 + 2 * c4 + j.",
        "const int col = n0 + nt * 8 + 2 * c4 + j;",
        "if (!ok) s[nt][2 * r + j] = -INFINITY;",
        "acc_o[dt][2 * r] *= corr;",
        "acc_o[dt][2 * r + 1] *= corr;",
        "mma.pv(acc_o, s, stage * kKVStageBytes);",
        "a[0] = pack2<T>(s[2 * ks][0], s[2 * ks][1]);",
        "a[1] = pack2<T>(s[2 * ks][2], s[2 * ks][3]);",
        "a[2] = pack2<T>(s[2 * ks + 1][0], s[2 * ks + 1][1]);",
        "a[3] = pack2<T>(s[2 * ks + 1][2], s[2 * ks + 1][3]);",
        "const int row = warp * 16 + g + 8 * r;",
        "*reinterpret_cast<uint32_t*>(sQ + QTile::offset(row, dt) + 2 * c4) =",
        "constexpr int kG = QTile::kGroup;",
        "for (int i = lane; i < 16 * kChunks; i += 32) {",
        "const int r = (i / kG) % 16, c = (i / (16 * kG)) * kG + i % kG;",
        "*reinterpret_cast<const uint4*>(sQ + QTile::offset(warp * 16 + r, c));",
        "const int phys = (chunk % kGroup) ^ ((row / kRowsPerPhase) % kGroup);",
        "return ((chunk / kGroup) * kRows + row) * (kGroup * 8) + phys * 8;",
    ],
    WGMMA_SRC: [
        "return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>((lbo_bytes & 0x3FFFF) >> 4) << 16) |",
        "(uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);",
        "__device__ __forceinline__ uint64_t desc_sw128(uint32_t addr) { return desc_sw128_lbo(addr, 16); }",
        "return desc_sw128_lbo(addr, n_block_bytes);",
        r'"{\n.reg .pred p;\nsetp.ne.b32 p, %" IS ", 0;\n"',
        r'", p, 1, 1, 0, 0;\n}\n"',
        r'", %" A2 ", %" A3 "}, %" IB ", p, 1, 1, 1;\n}\n"',
        'FASTLLM_WGMMA_SS_16BIT(ss_m64n64k16_f16, 64, "f16",',
        'FASTLLM_WGMMA_SS_16BIT(ss_m64n64k16_bf16, 64, "bf16",',
        'FASTLLM_WGMMA_SS_16BIT(ss_m64n128k16_f16, 128, "f16",',
        'FASTLLM_WGMMA_SS_16BIT(ss_m64n128k16_bf16, 128, "bf16",',
        'FASTLLM_WGMMA_RS_16BIT(rs_m64n64k16_f16, 64, "f16",',
        'FASTLLM_WGMMA_RS_16BIT(rs_m64n64k16_bf16, 64, "bf16",',
        'FASTLLM_WGMMA_RS_16BIT(rs_m64n128k16_f16, 128, "f16",',
        'FASTLLM_WGMMA_RS_16BIT(rs_m64n128k16_bf16, 128, "bf16",',
        'FASTLLM_WGMMA_RS_16BIT(rs_m64n256k16_f16, 256, "f16",',
        'FASTLLM_WGMMA_RS_16BIT(rs_m64n256k16_bf16, 256, "bf16",',
    ],
    TRAITS_SRC: [
        "template <> struct FlashFwdTraitsSm90<64> : FlashFwdTileSm90<64, 128> {};",
        "template <> struct FlashFwdTraitsSm90<128> : FlashFwdTileSm90<128, 128> {};",
        "template <> struct FlashFwdTraitsSm90<256> : FlashFwdTileSm90<256, 64> {};",
        "struct FlashFwdTileSm90 : FlashFwdTile<kHeadDim_, 128, kBlockN_, 8, false, 1, 1024, 227> {",
        "static constexpr int kSmemSlack = kSmemAlign > 128 ? kSmemAlign : 0;",
        "static constexpr int kSmemBytes = (kSmemQElems + 2 * kStages * kSmemKVElems) * 2 + kSmemSlack;",
    ],
}


def test_kernel_source_matches_mirror():
    assert_mirrored(MIRRORED.items())
