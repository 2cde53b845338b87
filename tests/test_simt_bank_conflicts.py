"""Shared-memory bank conflicts of the CUDA kernels, counted by the SIMT emulator (tests/simt/).

The kernels' comments claim that their XOR-swizzled shared tiles make every ldmatrix
conflict-free (csrc/attention/flash_fwd_kernel.cuh SmemTile, csrc/int8/int8_gemm_kernel.cuh
SwizzledTile, csrc/sparse24/sparse24_gemm_kernel.cuh, csrc/decode/decode_traits.h). Without a
GPU nothing can time that, so the emulator counts it: per 8-lane phase of each ldmatrix and of
each warp's cp.async (16-byte shared writes), the wavefronts the hardware needs (32 banks of 4
bytes; the most distinct words any one bank holds), against the ideal of 1 per phase
(simt_runtime.cpp bank_phase; backend.bank_counts). Each representative config of every sm80
family runs once on a small multi-tile shape; the tests assert wavefronts == ideal. The same
runs check coalescing: each warp cp.async touches no more 32-byte global sectors than the
contiguous runs of bytes it reads need (sector_count; the int8 shapes use 32-byte-aligned rows,
K % 32 == 0, as models have: with K = 272 a row straddles sectors, 1748 / 1656 at config 0).

When this test was written, the attention kernels' cp.async fills had 2-way conflicts (kTPR
threads per row taking chunks cb + k kTPR: a phase's rows shared their swizzle xor above the kTPR
chunks) and 4-way at D 80 (a flattened fill put one row's column blocks, kRows x 32 bytes apart,
in one phase); SmemTile::fill_row / storage_row (flash_fwd_kernel.cuh) deal rows and chunks to
the lanes so that each phase hits 8 bank groups. The sm_90a kernels' cp.async fills are counted
too (HOPPER below). Not counted: plain C++ shared loads and stores, e.g. the epilogues' and
reductions', which run unmodelled, and the wgmma / TMA accesses (the hardware reads and writes
those swizzled tiles whole).
"""
import ctypes
import functools

import pytest
import torch

from simt.backend import bank_counts, emulated_cuda, hopper_counts, reset_bank_counts, unavailable_reason
from simt.build import selftest_path

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=f"simt emulator: {unavailable_reason()}")

from fastllm import _ext  # noqa: E402
from fastllm.ops._attention_cuda import flash_attention_cuda  # noqa: E402
from fastllm.ops._decode_cuda import decode_attention_cuda  # noqa: E402
from fastllm.ops._int8_cuda import int8_gemm_cuda, w8a16_cuda, w8a8_fused_cuda  # noqa: E402
from fastllm.ops._sparse24_cuda import sparse24_cuda  # noqa: E402
from fastllm.sparse import compress  # noqa: E402
from test_sparse24 import sparse_weight  # noqa: E402

F16, BF16 = torch.float16, torch.bfloat16


def s8(*shape):
    return torch.randint(-128, 128, shape, dtype=torch.int8)


# ---- the ops, on small shapes with several tiles (tails included) ------------------------------

def flash(D, dtype, causal=False, bias=False):
    # 2 heads x 1 kv head: 2 CTAs of 128 (D 256: 64) query rows, 3 key tiles (the last partial).
    q = torch.randn(1, 2, 70, D).to(dtype)
    k, v = torch.randn(1, 1, 130, D).to(dtype), torch.randn(1, 1, 130, D).to(dtype)
    b = torch.randn(1, 2, 70, 130).to(dtype) if bias else None
    flash_attention_cuda(q, k, v, None, causal, D ** -0.5, 0, 0.0, None, b)


def decode(D, paged):
    # GQA 2, 2 queries, lengths 150 / 200 in 2 splits: several key tiles per CTA.
    B, Hq, Hkv, Sq, S, page = 2, 4, 2, 2, 200, 16
    q = torch.randn(B, Hq, Sq, D).half()
    lens = torch.tensor([150, S], dtype=torch.int32)
    if paged:
        pages = B * (S // page + 1)
        k, v = torch.randn(pages, page, Hkv, D).half(), torch.randn(pages, page, Hkv, D).half()
        table = torch.randperm(pages).int().view(B, -1)
    else:
        k, v, table = torch.randn(B, Hkv, S, D).half(), torch.randn(B, Hkv, S, D).half(), None
    decode_attention_cuda(q, k, v, lens, table, None, D ** -0.5, 0, 0.0, 2)


def int8_gemm(M, N, K, config, sms):
    assert config is None or _ext.lib().int8_gemm_plan(M, N, K, sms)[0] == config
    int8_gemm_cuda(s8(M, K), s8(N, K), None, None, None, torch.int32)


def sparse24(dtype, M, config, hopper=False):
    # N and K tails, the cp.async ring wraps (the sm_90a kernel wants whole 128 / 256-column stages)
    N, K = 144, (1280 if hopper else 1344) if dtype == torch.int8 else (640 if hopper else 704)
    assert config is None or _ext.lib().sparse24_gemm_plan(_ext.DTYPE_CODES[dtype], M, N, K, 108, 166912)[0] == config
    values, meta = compress(sparse_weight(N, K, dtype, "cpu"))
    sparse24_cuda(s8(M, K) if dtype == torch.int8 else torch.randn(M, K).to(dtype), values, meta)


# (id, op, the number of ldmatrix variants it must use, the emulated device's SM count)
CASES = [
    *[(f"flash-d{D}-{str(dt)[6:]}", functools.partial(flash, D, dt), 2, 108) for D in (64, 80, 96, 128, 256)
      for dt in (F16, BF16)],
    ("flash-d64-float16-causal", functools.partial(flash, 64, F16, causal=True), 2, 108),
    ("flash-d128-bfloat16-causal-bias", functools.partial(flash, 128, BF16, causal=True, bias=True), 2, 108),
    ("decode-d64-contiguous", functools.partial(decode, 64, False), 2, 108),
    ("decode-d80-contiguous", functools.partial(decode, 80, False), 2, 108),
    ("decode-d96-paged", functools.partial(decode, 96, True), 2, 108),
    ("decode-d128-paged", functools.partial(decode, 128, True), 2, 108),
    ("decode-d256-contiguous", functools.partial(decode, 256, False), 2, 108),
    *[(f"int8-config{c}-m{M}", functools.partial(int8_gemm, M, N, 288, c, sms), 1, sms)
      # config 4 (128 x 256 tiles) is taken where M > 128 tiles cover few SMs: a 4-SM device
      for c, (M, N, sms) in enumerate(((8, 144, 108), (20, 144, 108), (40, 272, 108), (130, 272, 108),
                                       (257, 272, 4)))],
    *[(f"sparse24-{str(dt)[6:]}-config{c}-m{M}", functools.partial(sparse24, dt, M, c), 1, 108)
      for dt in (F16, BF16, torch.int8) for c, M in enumerate((8, 40, 130)) if dt != BF16 or c == 1],
]
# The sm_90a kernels (emulated H100): their cp.async fills write the 128-byte-swizzled tiles that
# wgmma reads through descriptors (not counted: the hardware reads them whole); no ldmatrix.
# FASTLLM_INT8_WGMMA unset: the cp.async int8 kernel (the TMA one writes through the async proxy).
HOPPER = [
    *[(f"sm90-flash-d{D}", functools.partial(flash, D, BF16, causal=True), 0, 132) for D in (64, 128, 256)],
    ("sm90-int8-m130", functools.partial(int8_gemm, 130, 272, 160, None, 132), 0, 132),
    *[(f"sm90-sparse24-{str(dt)[6:]}-m130", functools.partial(sparse24, dt, 130, None, True), 0, 132)
      for dt in (F16, torch.int8)],
]
SM = {c[0]: (9, 0) for c in HOPPER}
CASES += HOPPER
IDS = [c[0] for c in CASES]


@functools.lru_cache(maxsize=None)
def measured(case_id):
    """{instruction: (phases, wavefronts, ideal, first conflicting phase)} of one case's op."""
    _, op, _, sms = CASES[IDS.index(case_id)]
    torch.manual_seed(0)
    wgmma0 = hopper_counts()[0]
    with emulated_cuda(sm=SM.get(case_id, (8, 0)), sms=sms):
        reset_bank_counts()
        op()
        counts = bank_counts()
    # the sm_90a cases must have run a wgmma kernel (the launcher chose it), the others none
    assert (hopper_counts()[0] > wgmma0) == (case_id in SM), case_id
    return counts


def summary(counts):
    return "; ".join(f"{tag}: {w} / {i} wavefronts in {p} phases{' (' + ex + ')' if ex else ''}"
                     for tag, (p, w, i, ex) in counts.items())


@pytest.mark.parametrize("case", IDS)
def test_ldmatrix_conflict_free(case):
    counts = measured(case)
    ld = {tag: c for tag, c in counts.items() if tag.startswith("ldmatrix")}
    assert len(ld) == CASES[IDS.index(case)][2], f"{case}: ldmatrix variants used: {summary(counts)}"
    assert all(w == i for _, w, i, _ in ld.values()), f"{case}: {summary(ld)}"


@pytest.mark.parametrize("case", IDS)
def test_cp_async_conflict_free(case):
    cp = measured(case)["cp.async.cg"]
    assert cp[1] == cp[2], f"{case}: cp.async.cg: {cp[1]} / {cp[2]} wavefronts ({cp[3]})"


@pytest.mark.parametrize("case", IDS)
def test_cp_async_reads_whole_sectors(case):
    # Coalescing: each warp cp.async touches no more 32-byte global sectors than its lanes'
    # 16-byte reads need (zero-filled lanes read nothing).
    sec = measured(case)["cp.async.cg global sectors"]
    assert sec[1] == sec[2], f"{case}: {sec[1]} / {sec[2]} sectors in {sec[0]} warp cp.async ({sec[3]})"


def test_decode_gemms_use_no_modelled_shared_access():
    # w8a16 and the fused W8A8 decode kernels load their operands straight into registers and use
    # shared memory only for plain C++ K-split reductions: nothing to count (if that changes, add
    # them to CASES).
    x, w, s = torch.randn(5, 640).half(), s8(32, 640), torch.rand(32) * 0.01
    with emulated_cuda():
        reset_bank_counts()
        w8a16_cuda(x, w, s, None, None)
        w8a8_fused_cuda(x, w, None, None, s, None, True)
        w8a8_fused_cuda(x, w, torch.ones(1), torch.tensor([0.05]), s, None, False)
        assert bank_counts() == {}


@pytest.mark.parametrize("swizzle", [False, True])
def test_counter_sees_an_unswizzled_tile(swizzle):
    # tests/simt/selftest.cu bank_kernel: an 8 x 128-byte 16-bit tile written column-wise by cp.async
    # and read by one ldmatrix.x4. Row-major, each phase's 8 rows share a bank group: 8-way.
    lib = ctypes.CDLL(selftest_path())
    src = torch.arange(512, dtype=torch.int16)
    out = torch.zeros(128, dtype=torch.int32)
    reset_bank_counts(lib)
    assert lib.selftest_bank(ctypes.c_void_p(src.data_ptr()), ctypes.c_void_p(out.data_ptr()), int(swizzle)) == 0
    counts = bank_counts(lib)
    waves = 1 if swizzle else 8
    assert counts["ldmatrix.x4"][:3] == (4, 4 * waves, 4), counts
    assert counts["cp.async.cg"][:3] == (8, 8 * waves, 8), counts
    assert bool(counts["ldmatrix.x4"][3]) != swizzle, counts   # the example: the first conflicting phase
    # Same data either way: lane l's register j holds row l / 4, columns 8 j + 2 (l % 4) + {0, 1}.
    lane = torch.arange(32)[:, None]
    col = 8 * torch.arange(4)[None, :] + 2 * (lane % 4)
    lo = (lane // 4) * 64 + col
    assert torch.equal(out.view(32, 4), lo | (lo + 1) << 16)
