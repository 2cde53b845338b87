"""The Hopper W8A8 GEMM (csrc/int8/int8_wgmma_kernel.cuh), emulated on CPU.

The kernel has never run on a GPU. This file mirrors its index math and its pipeline in NumPy:
the grouped raster, load_tile's cp.async fills (SwizzledTile<rows, 8>: chunk c of row r at
c ^ (r % 8); rows past M / N and chunks past K zero-filled), the 1024-byte alignment of the
tiles, the shared-memory descriptors (common/wgmma.cuh desc_sw128, +2 per k32 step), the
ring of kStages slots loaded kStages - 2 steps ahead, and the epilogue's register -> (m, n) map.
The descriptors are decoded by a model of wgmma's operand fetch written from the PTX ISA
(K-major, 128-byte swizzle: element (r, k) of a tile at start + (r // 8) * SBO + (r % 8) * 128
+ k, then address bits 4-6 ^= bits 7-9), and the warpgroup's D registers are placed as the ISA
draws them (warp w rows 16w..16w+15, the m16n8 D layout repeated over N / 8 column tiles).

The pipeline is checked pessimistically: a cp.async group lands only when a cp.async.wait_group
forces it (the latest the hardware may deliver it), a wgmma group is assumed to read its shared
memory until a wgmma.wait_group retires it, and a refill of a slot is allowed only if, at the
last barrier before it, every warpgroup had retired every MMA that reads that slot.

Proven here, given that mirror, for both tile configs and M / N / K tails (K = 16 up to a
ring that wraps), unsplit and split-K (grid y slices of k_tiles_per_split 128-byte steps, each
into its own int32 plane, the planes summed as the reduce kernel does): raw int32 out == a @ b.T exactly; every output element written exactly once
and nothing past M / N; every cp.async reads inside its tensor (row strides > K included); no
MMA reads a slot its step's copies have not landed in, no refill lands under a running MMA;
descriptor fields in range (start address fits its 14 bits, tiles 1024-aligned).
The TMA-fed variant (int8_wgmma_tma_kernel.cuh) writes the same layout through the copy engine;
its producer / consumer protocol on full / empty mbarriers (an ISA model of arrival counts,
transaction bytes and phase parity) is run under 200 random schedules of the producer, both
consumer warpgroups and box arrivals: every MMA reads its own step's bytes, no box lands under
an unretired MMA, nobody deadlocks; 4 protocol mutants fail.
Not proven: the ISA model itself (the GPU test tests/test_int8_cuda.py
test_gpu_wgmma_matches_sm80_kernel is the check), the scaled epilogue's float rounding (shared
code with the sm80 kernel, int8_epilogue.cuh, compared bit for bit on the GPU), speed.
test_mutant_kernel_fails shows that each of several deliberately wrong variants fails here.
"""
import pathlib

import numpy as np
import pytest

from helpers import assert_mirrored

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNEL_SRC = ROOT / "csrc" / "int8" / "int8_wgmma_kernel.cuh"
WGMMA_SRC = ROOT / "csrc" / "common" / "wgmma.cuh"
TMA_KERNEL_SRC = ROOT / "csrc" / "int8" / "int8_wgmma_tma_kernel.cuh"
TRAITS_SRC = ROOT / "csrc" / "int8" / "int8_traits.h"
EPILOGUE_SRC = ROOT / "csrc" / "int8" / "int8_epilogue.cuh"

CONFIGS = {0: (128, 5), 1: (256, 4)}     # WgmmaConfig<i> : WgmmaTile<kBN, kStages>
KBM, KBK, THREADS, GROUP_M = 128, 128, 256, 8


# ----------------------------------------------------------------------------------------------
# The kernel, mirrored. `K` holds the pieces the mutants replace.

def swizzle_offset(row, chunk):
    """SwizzledTile<rows, 8>::offset (int8_gemm_kernel.cuh): row * 128 + (chunk ^ row % 8) * 16."""
    return row * 128 + ((chunk % 8) ^ (row % 8)) * 16


def desc_sw128_lbo(addr, lbo_bytes):
    """wgmma::desc_sw128_lbo (common/wgmma.cuh)."""
    return ((addr & 0x3FFFF) >> 4) | (((lbo_bytes & 0x3FFFF) >> 4) << 16) | ((1024 >> 4) << 32) | (1 << 62)


def desc_sw128(addr):
    """wgmma::desc_sw128 (common/wgmma.cuh)."""
    return desc_sw128_lbo(addr, 16)


def grouped_tile(tiles_m, tiles_n, pid):
    """int8_epilogue.cuh grouped_tile."""
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_rows, (pid % per_group) // group_rows


KERNEL = dict(
    fill_offset=swizzle_offset,
    wg_rows=64,                                   # sA + stage * kABytes + wg * 64 * kBK
    desc_step=2,                                  # da + 2 * ks
    ahead=lambda stages: stages - 2,              # prologue / next = kt + kStages - 2
    cp_wait=lambda stages: stages - 3,            # cp_async_wait<kStages - 3>
    mma_wait=1,                                   # wgmma::wait_group<1>
    d_pos=lambda w, g, c, j, h, e: (16 * w + g + 8 * h, 8 * j + 2 * c + e),
    k_begin=lambda y, kps: y * kps * KBK if kps > 0 else 0,
)


# ----------------------------------------------------------------------------------------------
# Models of the hardware (from the PTX ISA).

def wgmma_operand(smem, desc, rows):
    """The (rows, 32) int8 operand a wgmma k32 step reads through `desc` (K-major, SW128)."""
    start = (desc & 0x3FFF) << 4
    sbo = ((desc >> 32) & 0x3FFF) << 4
    assert desc >> 62 == 1 and sbo == 1024
    r = np.arange(rows)[:, None]
    k = np.arange(32)[None, :]
    lin = start + (r // 8) * sbo + (r % 8) * 128 + k
    phys = lin ^ (((lin >> 7) & 7) << 4)
    assert (phys >= 0).all() and (phys < smem.size).all()
    return smem[phys].astype(np.int64)


class Pipeline:
    """cp.async groups landing as late as the waits allow; wgmma groups reading their slots until
    retired; a barrier publishing which MMA groups had retired. All threads run the same
    program (the warpgroups differ only in their rows), so one trace stands for all of them."""

    def __init__(self, smem):
        self.smem = smem
        self.open, self.groups = [], []        # cp.async: uncommitted copies, committed groups
        self.landed = {}                       # slot -> step whose bytes are in it
        self.writing = set()                   # slots with copies issued but not landed
        self.running = []                      # wgmma groups not yet retired, oldest first
        self.running_at_barrier = set()        # ... as every warpgroup knew at the last barrier
        self.readers = {}                      # slot -> every wgmma group that read it

    def cp_async(self, dst, data, slot, step):
        busy = self.readers.get(slot, set()) & (self.running_at_barrier | set(self.running))
        assert not busy, f"refill of slot {slot} while MMA group(s) {sorted(busy)} may still read it"
        self.open.append((dst, data, slot, step))
        self.writing.add(slot)

    def commit(self):
        self.groups.append(self.open)
        self.open = []

    def cp_wait(self, n):
        while len(self.groups) > n:
            for dst, data, slot, step in self.groups.pop(0):
                self.smem[dst[:, None] + np.arange(16)] = data
                self.landed[slot] = step
                self.writing.discard(slot)

    def barrier(self):
        self.running_at_barrier = set(self.running)

    def mma_issue(self, slot, step):
        assert slot not in self.writing and self.landed.get(slot) == step, \
            f"MMA of step {step} reads slot {slot} before its copies landed"
        self.readers.setdefault(slot, set()).add(step)
        self.running.append(step)

    def mma_wait(self, n):
        del self.running[:max(0, len(self.running) - n)]


def run_cta(K, cfg, a, b, M, N, Kd, pid, out, written, smem_base, y=0, kps=0):
    """One CTA (blockIdx.x = pid, blockIdx.y = y); kps: p.k_tiles_per_split (0: no split). Its
    partial goes to plane y of out (M, N) or (splits, M, N)."""
    kBN, kStages = CONFIGS[cfg]
    kA, kB = KBM * KBK, kBN * KBK
    smem_bytes = kStages * (KBM + kBN) * KBK + 1024
    smem = np.full(smem_base + smem_bytes, 0x7F, dtype=np.int8)       # stale: 127s
    sA = (smem_base + 1023) & ~1023
    sB = sA + kStages * kA
    assert sB + kStages * kB <= smem_base + smem_bytes
    tiles_m, tiles_n = -(-M // KBM), -(-N // kBN)
    tile_m, tile_n = grouped_tile(tiles_m, tiles_n, pid)
    m0, n0 = tile_m * KBM, tile_n * kBN
    rows_a, rows_b = min(KBM, M - m0), min(kBN, N - n0)
    k_begin = K["k_begin"](y, kps)
    k_len = max(0, min(Kd - k_begin, kps * KBK)) if kps > 0 else Kd
    KT = -(-k_len // KBK)
    pipe = Pipeline(smem)
    plane_out, plane_written = (out[y], written[y]) if out.ndim == 3 else (out, written)

    def load_tile(stage_addr, g, row0, rows_valid, k0, rows):
        i = np.arange(rows * 8)
        row, chunk = i // 8, i % 8
        k = k0 + chunk * 16                      # relative to the operand pointers (+ k_begin)
        valid = (row < rows_valid) & (k < k_len)
        buf, ld = g.reshape(-1), g.shape[1]      # g: the whole row-strided buffer
        src = np.where(valid, (row0 + row) * ld + k_begin + k, 0)
        assert (src[valid] + 16 <= buf.size).all() and (k_begin + k[valid] + 16 <= Kd).all(), "cp.async out of bounds"
        data = buf[src[:, None] + np.arange(16)].copy()
        data[~valid] = 0
        dst = stage_addr + K["fill_offset"](row, chunk)
        assert (dst % 16 == 0).all()
        return dst, data

    def load_stage(stage, kt):
        for base, size, g, row0, rv, rows in ((sA, kA, a, m0, rows_a, KBM), (sB, kB, b, n0, rows_b, kBN)):
            dst, data = load_tile(base + stage * size, g, row0, rv, kt * KBK, rows)
            pipe.cp_async(dst, data, stage, kt)

    acc = np.zeros((2, 64, kBN), dtype=np.int64)
    ahead = K["ahead"](kStages)
    for s in range(ahead):
        if s < KT:
            load_stage(s, s)
        pipe.commit()
    for kt in range(KT):
        pipe.cp_wait(K["cp_wait"](kStages))
        pipe.barrier()
        stage = kt % kStages
        pipe.mma_issue(stage, kt)
        for wg in range(2):
            a_addr = sA + stage * kA + wg * K["wg_rows"] * KBK
            b_addr = sB + stage * kB
            assert a_addr % 1024 == 0 and b_addr % 1024 == 0, "swizzled tiles must be 1024-aligned"
            da, db = desc_sw128(a_addr), desc_sw128(b_addr)
            for ks in range(KBK // 32):
                dak, dbk = da + K["desc_step"] * ks, db + K["desc_step"] * ks
                assert (dak & 0x3FFF) >= (da & 0x3FFF) and (dbk & 0x3FFF) < 0x4000, "start field overflow"
                A = wgmma_operand(smem, dak, 64)
                B = wgmma_operand(smem, dbk, kBN)
                acc[wg] += A @ B.T
        nxt = kt + ahead                  # the refill, issued while this step's MMAs run
        if nxt < KT:
            load_stage(nxt % kStages, nxt)
        pipe.commit()
        pipe.mma_wait(K["mma_wait"])
    pipe.mma_wait(0)

    # Epilogue: thread (wg, warp, lane) register 4j + 2h + e -> (m, n).
    for wg in range(2):
        for w in range(4):
            for lane in range(32):
                g, c = lane // 4, lane % 4
                for j in range(kBN // 8):
                    n = n0 + j * 8 + 2 * c
                    if n >= N:
                        continue
                    for h in range(2):
                        for e in range(2):
                            r, col = K["d_pos"](w, g, c, j, h, e)
                            m = m0 + wg * 64 + 16 * w + g + 8 * h
                            if m >= M:
                                continue
                            plane_out[m, n + e] = acc[wg, r, col]
                            plane_written[m, n + e] += 1


def run_gemm(cfg, M, N, Kd, lda_pad=0, seed=0, smem_base=0, splits=1, **mut):
    """The launch: splits > 1 as split_k_gemm (int8_launcher.cu) sets it up -- k_tiles_per_split =
    ceil(K tiles / splits), the slices actually launched, planes of M * N -- and the reduce's sum
    over the planes (int8_splitk_reduce_kernel, emulated in test_int8_kernel_emulated.py)."""
    K = dict(KERNEL, **mut)
    rng = np.random.default_rng(seed)
    a_full = rng.integers(-128, 128, size=(M, Kd + lda_pad), dtype=np.int8)
    a = a_full[:, :Kd] if lda_pad else a_full
    b = rng.integers(-128, 128, size=(N, Kd), dtype=np.int8)
    kps = -(-(-(-Kd // KBK)) // splits) if splits > 1 else 0
    launched = -(-(-(-Kd // KBK)) // kps) if splits > 1 else 1
    shape = (launched, M, N) if splits > 1 else (M, N)
    out = np.full(shape, -(2 ** 40), dtype=np.int64)
    written = np.zeros(shape, dtype=np.int64)
    kBN = CONFIGS[cfg][0]
    tiles = -(-M // KBM) * -(-N // kBN)
    seen = set()
    for y in range(launched):
        for pid in range(tiles):
            seen.add(grouped_tile(-(-M // KBM), -(-N // kBN), pid))
            run_cta(K, cfg, a_full, b, M, N, Kd, pid, out, written, smem_base, y, kps)
    assert len(seen) == tiles, "raster covers every tile once"
    if splits > 1:
        assert (written == 1).all(), "every plane element written exactly once"
        out, written = out.sum(0), written.max(0)
    return out, written, a.astype(np.int64) @ b.astype(np.int64).T


CASES = [  # cfg, M, N, K, row padding of a
    (0, 129, 16, 16, 0),          # one partial chunk of K, one column pair tile, one row past 128
    (0, 200, 272, 1040, 16),      # K ring wraps (9 steps, 5 slots); strided a; N tail
    (1, 131, 272, 656, 0),        # 256-wide tile with N tail; 6 steps on 4 slots
    (1, 300, 48, 144, 32),        # M tail in the second warpgroup; K tail of 16
]


@pytest.mark.parametrize("cfg,M,N,K,pad", CASES)
def test_wgmma_kernel_emulated(cfg, M, N, K, pad):
    out, written, ref = run_gemm(cfg, M, N, K, lda_pad=pad, seed=M + N + K)
    assert (written == 1).all(), "every output written exactly once"
    assert np.array_equal(out, ref)


SPLIT_CASES = [  # cfg, M, N, K, splits asked (choose_wgmma_split may pick fewer), row padding of a
    (0, 200, 144, 4096 + 16, 2, 16),   # 33 K steps in 2 slices of 17 / 16, a 16-byte K tail
    (0, 256, 128, 1152, 4, 0),         # 9 steps: slices of 3 -> 3 launched (4 asked)
    (1, 131, 272, 2048, 2, 32),        # 256-wide tiles, N tail
]


@pytest.mark.parametrize("cfg,M,N,K,splits,pad", SPLIT_CASES)
def test_wgmma_split_k_emulated(cfg, M, N, K, splits, pad):
    out, written, ref = run_gemm(cfg, M, N, K, lda_pad=pad, seed=M + K, splits=splits)
    assert (written == 1).all(), "every output written exactly once"
    assert np.array_equal(out, ref)


@pytest.mark.parametrize("smem_base", [16, 1008])
def test_dynamic_smem_base_alignment(smem_base):
    # The kernel rounds its dynamic shared memory up to 1024 bytes inside the slack it reserves.
    out, written, ref = run_gemm(0, 130, 32, 272, smem_base=smem_base)
    assert np.array_equal(out, ref)


MUTANTS = {
    "no_swizzle_on_fill": dict(fill_offset=lambda r, c: r * 128 + c * 16),
    "warpgroup_row_offset": dict(wg_rows=32),
    "desc_k_step": dict(desc_step=1),
    "prefetch_too_far": dict(ahead=lambda s: s - 1, cp_wait=lambda s: s - 2),
    "cp_wait_too_loose": dict(cp_wait=lambda s: s - 2),
    "mma_not_waited": dict(mma_wait=2),
    "d_rows_swapped": dict(d_pos=lambda w, g, c, j, h, e: (16 * w + g + 8 * (1 - h), 8 * j + 2 * c + e)),
    "split_slices_from_k0": dict(k_begin=lambda y, kps: 0),
}


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_mutant_kernel_fails(mutant):
    with pytest.raises(AssertionError):
        out, written, ref = run_gemm(1, 131, 272, 656, splits=2 if "split" in mutant else 1, **MUTANTS[mutant])
        assert (written == 1).all() and np.array_equal(out, ref)


# ----------------------------------------------------------------------------------------------
# The TMA-fed variant (int8_wgmma_tma_kernel.cuh): its producer / consumer protocol on the full and
# empty mbarriers, run under many random schedules. Shared-memory layout and descriptors are the
# cp.async kernel's (the copy engine writes the same 128-byte swizzle), so only the protocol is new.

class MBarrier:
    """mbarrier as the PTX ISA defines it: an expected arrival count per phase (plus transaction
    bytes); try_wait.parity(P) succeeds once the phase of parity P has completed, i.e. when the
    current phase's parity differs from P (a fresh barrier is in phase 0)."""

    def __init__(self, count):
        self.count, self.pending, self.tx, self.phase = count, count, 0, 0

    def arrive(self, expect_tx=0):
        self.tx += expect_tx
        self.pending -= 1
        self._maybe_complete()

    def complete_tx(self, nbytes):
        self.tx -= nbytes
        self._maybe_complete()

    def _maybe_complete(self):
        if self.pending == 0 and self.tx == 0:
            self.phase += 1
            self.pending = self.count

    def try_wait(self, parity):
        return (self.phase & 1) != parity


def run_tma_protocol(KT, stages, seed, producer_parity=lambda u: (u & 1) ^ 1,
                     consumer_parity=lambda u: u & 1, release=lambda kt: kt - 1, empty_count=2):
    """One CTA's ring under a random schedule of the producer, the two consumer warpgroups and the
    copy engine (each TMA box lands at a random later time). Checks every MMA reads its step's
    bytes, no box lands in a slot an unretired MMA reads, and everyone finishes."""
    rng = np.random.default_rng(seed)
    full = [MBarrier(1) for _ in range(stages)]
    empty = [MBarrier(empty_count) for _ in range(stages)]
    slot_tag = [None] * stages            # step whose bytes are in the slot (None: being written)
    readers = [set() for _ in range(stages)]   # (warpgroup, step) MMAs that may still read it
    in_flight = []                        # boxes issued, not landed: (slot, step)
    A_BYTES, B_BYTES = 1, 2

    def producer():
        for kt in range(KT):
            s, u = kt % stages, kt // stages
            while not empty[s].try_wait(producer_parity(u)):
                yield
            full[s].arrive(expect_tx=A_BYTES + B_BYTES)
            in_flight.append((s, kt, A_BYTES))
            in_flight.append((s, kt, B_BYTES))
            yield

    def consumer(wg):
        running = []                      # committed, unretired MMA groups: (slot, step)
        for kt in range(KT):
            s, u = kt % stages, kt // stages
            while not full[s].try_wait(consumer_parity(u)):
                yield
            assert slot_tag[s] == kt, f"warpgroup {wg} MMA of step {kt} reads slot {s} holding {slot_tag[s]}"
            readers[s].add((wg, kt))
            running.append((s, kt))
            while len(running) > 1:       # wait_group<1>
                rs, rk = running.pop(0)
                readers[rs].discard((wg, rk))
            r = release(kt)                # one thread per warpgroup: empty[(kt - 1) % kStages]
            if r >= 0:
                empty[r % stages].arrive()
            yield
        for rs, rk in running:            # wait_group<0>
            readers[rs].discard((wg, rk))

    def copy_engine():
        while True:
            if in_flight and rng.random() < 0.5:
                s, kt, nbytes = in_flight.pop(int(rng.integers(len(in_flight))))
                assert not readers[s], f"box of step {kt} lands in slot {s} while {sorted(readers[s])} may read it"
                landed[s, kt] = landed.get((s, kt), 0) + nbytes
                slot_tag[s] = kt if landed[s, kt] == A_BYTES + B_BYTES else None
                full[s].complete_tx(nbytes)
            yield

    landed = {}
    actors = {"producer": producer(), "wg0": consumer(0), "wg1": consumer(1)}
    engine = copy_engine()
    for _ in range(200000):
        live = [k for k in actors if actors[k] is not None]
        if not live:
            return True
        pick = live[int(rng.integers(len(live)))]
        try:
            next(actors[pick])
        except StopIteration:
            actors[pick] = None
        next(engine)
    raise AssertionError("deadlock: the schedule never finished")


@pytest.mark.parametrize("KT,stages", [(1, 4), (3, 4), (13, 4), (17, 6), (2, 6)])
def test_tma_protocol_emulated(KT, stages):
    for seed in range(40):
        assert run_tma_protocol(KT, stages, seed)


TMA_MUTANTS = {
    "producer_waits_this_round": dict(producer_parity=lambda u: u & 1),
    "consumer_waits_wrong_parity": dict(consumer_parity=lambda u: (u & 1) ^ 1),
    "release_before_retire": dict(release=lambda kt: kt),
    "empty_counts_one_warpgroup": dict(empty_count=1),
}


@pytest.mark.parametrize("mutant", sorted(TMA_MUTANTS))
def test_tma_protocol_mutant_fails(mutant):
    with pytest.raises(AssertionError):
        for seed in range(40):
            run_tma_protocol(13, 4, seed, **TMA_MUTANTS[mutant])


# Lines of the CUDA source mirrored above (whitespace-normalized); if one changes, update the
# mirror and this list together.
MIRRORED = {
    KERNEL_SRC: [
        "const uint32_t sA = (smem_u32(smem) + 1023u) & ~1023u;",
        "const uint32_t sB = sA + kStages * kABytes;",
        "grouped_tile((p.M + kBM - 1) / kBM, (p.N + kBN - 1) / kBN, static_cast<int>(blockIdx.x), tile_m, tile_n);",
        "const int rows_a = min(kBM, p.M - m0), rows_b = min(kBN, p.N - n0);",
        "load_tile<kBM, kBK / 16, kThreads>(sA + stage * kABytes, ga, p.lda, rows_a, kt * kBK, k_len, tid);",
        "load_tile<kBN, kBK / 16, kThreads>(sB + stage * kBBytes, gb, p.ldb, rows_b, kt * kBK, k_len, tid);",
        "k_slice<kBK>(p, k_begin, k_len);",
        "const int8_t* ga = p.a + static_cast<int64_t>(m0) * p.lda + k_begin;",
        "const int8_t* gb = p.b + static_cast<int64_t>(n0) * p.ldb + k_begin;",
        "const int KT = (k_len + kBK - 1) / kBK;",
        "OutT* out = split_plane<OutT>(p);",
        "for (int s = 0; s < kStages - 2; ++s) {",
        "cp_async_wait<kStages - 3>();",
        "const int next = kt + kStages - 2;",
        "const uint64_t da = wgmma::desc_sw128(sA + stage * kABytes + wg * 64 * kBK);",
        "const uint64_t db = wgmma::desc_sw128(sB + stage * kBBytes);",
        "for (int ks = 0; ks < kBK / 32; ++ks) wgmma_s8<kBN>(acc, da + 2 * ks, db + 2 * ks);",
        "wgmma::commit_group(); wgmma::fence_operands(acc);",
        "if (next < KT) load_stage(next % kStages, next); cp_async_commit(); wgmma::wait_group<1>();",
        "const int row0 = m0 + wg * 64 + warp * 16 + g;",
        "const int n = n0 + j * 8 + 2 * c;",
        "if (m < p.M) store_acc_pair<OutT>(p, out, m, n, acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1], col);",
    ],
    TMA_KERNEL_SRC: [
        "tma::mbar_init(full + 8 * s, 1);",
        "tma::mbar_init(empty + 8 * s, 2);",
        "tma::mbar_wait(empty + 8 * s, (u & 1) ^ 1);",
        "tma::mbar_arrive_expect_tx(full + 8 * s, kABytes + kBBytes);",
        "tma::load_2d(sA + s * kABytes, &map_a, kt * kBK, m0, full + 8 * s);",
        "tma::load_2d(sB + s * kBBytes, &map_b, kt * kBK, n0, full + 8 * s);",
        "tma::mbar_wait(full + 8 * s, static_cast<uint32_t>(kt / kStages) & 1);",
        "const uint64_t da = wgmma::desc_sw128(sA + s * kABytes + wg * 64 * kBK);",
        "wgmma::wait_group<1>(); // step kt - 1 retired: its slot may be refilled",
        "if (kt > 0 && wwarp == 0 && lane == 0) tma::mbar_arrive(empty + 8 * ((kt - 1) % kStages));",
        "const uint32_t sA = (smem_u32(smem) + 1023u) & ~1023u; // 128-byte swizzle: 1024-aligned tiles",
    ],
    WGMMA_SRC: [
        "return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>((lbo_bytes & 0x3FFFF) >> 4) << 16) |",
        "(uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);",
        "__device__ __forceinline__ uint64_t desc_sw128(uint32_t addr) { return desc_sw128_lbo(addr, 16); }",
    ],
    TRAITS_SRC: [
        "static constexpr int kBM = 128, kBN = kBN_, kBK = 128, kStages = kStages_;",
        "static constexpr int kSmemBytes = kStages * kStageBytes + 1024; // + slack to align to 1024",
        "template <> struct WgmmaConfig<0> : WgmmaTile<128, 5> {};",
        "template <> struct WgmmaConfig<1> : WgmmaTile<256, 4> {};",
        "constexpr int kGroupM = 8;",
    ],
    EPILOGUE_SRC: [
        "const int per_group = kGroupM * tiles_n;",
        "const int first_m = (pid / per_group) * kGroupM;",
        "const int group_rows = min(tiles_m - first_m, kGroupM);",
        "tile_m = first_m + (pid % per_group) % group_rows;",
        "tile_n = (pid % per_group) / group_rows;",
        "k_begin = p.k_tiles_per_split > 0 ? static_cast<int>(blockIdx.y) * p.k_tiles_per_split * kBK : 0;",
        "k_len = p.k_tiles_per_split > 0 ? max(0, min(p.K - k_begin, p.k_tiles_per_split * kBK)) : p.K;",
        "return static_cast<OutT*>(p.out) + static_cast<int64_t>(blockIdx.y) * p.split_stride;",
    ],
}


def test_kernel_source_matches_mirror():
    assert_mirrored(MIRRORED.items())
