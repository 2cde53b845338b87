"""The CUDA split-KV decode kernel (csrc/decode/) run for real on CPU through the SIMT emulator.

tests/simt compiles csrc/ as it is (launcher, split kernel, combine kernel) with a host C++
compiler and runs each CTA's threads as fibers (cp.async, ldmatrix, mma.sync modelled from the
PTX ISA; a missing cp.async wait reads NaN). Inside `emulated(...)` below the public op
fastllm.ops.decode_attention(..., backend="cuda") runs end to end on CPU tensors: argument checks,
split heuristic, the glue (ops/_decode_cuda.py), the launcher's checks and dispatch, the kernels.

Results are checked as tests/test_decode.py checks the GPU (its helpers and tolerance are
imported, not copied): max error vs the float64 reference (fastllm.ref.decode) at most 2x
PyTorch's own same-dtype error plus one ulp, lse likewise, rows with nothing allowed exactly
out 0 / lse -inf, and bitwise equality where the kernel reads the same tiles (paged vs
contiguous, poisoned vs clean caches, emulated sm80 vs sm86).

Covered: head dims 64 / 80 / 96 / 128 / 256 (all five tile configs, D 256 with Q re-read from
shared memory) x fp16 / bf16; 1..16 queries; MHA / GQA / MQA with several 16-row blocks per kv
head; per-sequence lengths including 0 and < Sq; paged caches (page sizes 1, 7, 16, 256; a
sliced block table; pages as views of a fused KV buffer); bool masks (16-byte scan with several
rows and a byte tail, strided and broadcast masks); window (1, mid, larger than the cache) and
softcap; attention sinks (one split: the split kernel's epilogue; several: the combine kernel);
1..256 splits (empty splits, > 32 per row for the combine kernel's lane loop);
NaN / inf in every slot the kernel must not read; no read or write outside the tensors (inputs
against an inaccessible page; in every test, guard bytes around out / lse / the partials, which
must be fully written); the emulated sm80 / sm86 / sm89 / sm90
devices, an sm75 device (no code: an error) and a shared-memory opt-in below the tile's needs.
The test_decode.py tests that take a backend run here with backend "cuda" as well.

Not covered (emulator limits): timing, memory-model reordering, real fp32 mma rounding.
"""
import contextlib
import math

import pytest
import torch

from simt.backend import DEVICES, emulated_cuda, guarded, unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason() is not None,
                                reason=f"SIMT emulator unavailable: {unavailable_reason()}")

from fastllm.errors import CudaError  # noqa: E402
from fastllm.ops import _decode_cuda, decode_attention, registry  # noqa: E402
from fastllm.ops._decode_cuda import HEAD_DIMS  # noqa: E402

import test_decode as td  # noqa: E402  (its helpers read td.DEVICE when called)
from test_decode import GARBAGE, lens_t, make_cache, rand, run_and_check, to_pages  # noqa: E402

LOW = [torch.float16, torch.bfloat16]
SM80, SM86 = (8, 0), (8, 6)

# Every emulated call checks its outputs: out, lse and the fp32 partials the glue allocates sit
# between 0xFF guard bytes that must stay, and must themselves be fully overwritten (0xFF bytes
# are NaN in every float dtype). A stray write then fails the test instead of corrupting the heap
# (rows past group * Sq written as if they existed land up to ~200 KB past the fp32 partials).
GUARD = 256 * 1024   # bytes each side


class GuardedTorch:
    """Stands in for `torch` inside fastllm.ops._decode_cuda: empty() returns 0xFF-filled tensors
    between 0xFF guard bytes, remembered for the checks."""

    def __init__(self):
        self.made = []

    def __getattr__(self, name):
        return getattr(torch, name)

    def empty(self, *shape, dtype, device):
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        nbytes = math.prod(shape) * dtype.itemsize
        buf = torch.full((nbytes + 2 * GUARD,), 0xFF, dtype=torch.uint8, device=device)
        t = buf[GUARD:GUARD + nbytes].view(dtype).view(shape)
        self.made.append((buf, t, nbytes))
        return t

    def check(self):
        for buf, t, nbytes in self.made:
            assert (buf[:GUARD] == 0xFF).all() and (buf[GUARD + nbytes:] == 0xFF).all(), \
                f"write outside a {tuple(t.shape)} {t.dtype} buffer"
            assert not torch.isnan(t).any(), f"{tuple(t.shape)} {t.dtype} buffer not fully written"


@contextlib.contextmanager
def emulated(sm=SM80, check_outputs=True, guard_outputs=True, **kw):
    """decode_attention(..., backend="cuda") on CPU tensors, served by the emulated _C; the
    test_decode helpers make CPU tensors meanwhile (also on a machine with a GPU). Yields the
    GuardedTorch that allocated the glue's buffers; at the end (unless an exception passes, or
    check_outputs=False for calls expected to fail) nothing was written outside them and every
    element of them was written. guard_outputs=False: plain torch.empty (storage offset 0)."""
    saved = registry.device_reason, td.DEVICE, _decode_cuda.torch
    registry.device_reason = lambda b, dev, auto: None if b == "cuda" else saved[0](b, dev, auto)
    td.DEVICE = "cpu"
    buffers, plain_empty = GuardedTorch(), torch.empty
    if guard_outputs:
        _decode_cuda.torch = buffers
    try:
        with emulated_cuda(sm=sm, **kw):
            if not guard_outputs:
                torch.empty = plain_empty   # (in case emulated_cuda poisons torch.empty itself)
            yield buffers
        if check_outputs:
            buffers.check()
    finally:
        registry.device_reason, td.DEVICE, _decode_cuda.torch = saved


def cuda_run(q, k, v, **kw):
    return decode_attention(q, k, v, backend="cuda", return_lse=True, **kw)


# ----------------------------------------------------------------------------------------------
# Every tile config x dtype on a few ugly layouts.

# ((Hq, Hkv), Sq, lens, S_max, num_splits)
LAYOUTS = [
    ((6, 2), 1, [0, 1, 333], 340, 3),       # GQA 3, a decode step; an empty and a 1-key sequence;
                                            # 18 rows: the combine kernel's last CTA half used
    ((6, 1), 5, [261, 4], 270, 40),         # MQA: 30 packed rows (2 row blocks); L < Sq; 40 splits
    ((2, 2), 16, [517], 530, None),         # MHA, 16 queries, split heuristic (2 or 3 pieces on CPU)
]
PAGES = [None, 16, 1, 7, 256]               # cycled over (head dim, layout)


@pytest.mark.parametrize("layout", range(len(LAYOUTS)))
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_head_dims(D, dtype, layout):
    (Hq, Hkv), Sq, lens, S_max, splits = LAYOUTS[layout]
    page_size = PAGES[(HEAD_DIMS.index(D) + layout) % len(PAGES)]
    sm = (SM80, SM86)[(HEAD_DIMS.index(D) + layout) % 2]
    with emulated(sm):
        q = rand(len(lens), Hq, Sq, D, dtype=dtype, scale=1.5)
        k, v = make_cache(len(lens), Hkv, S_max, D, dtype, lens)
        kw = dict(cache_seqlens=lens_t(lens), num_splits=splits)
        if page_size:
            k, v, kw["block_table"] = to_pages(k, v, page_size, lens)
        out, lse = run_and_check("cuda", q, k, v, **kw)
    for b, L in enumerate(lens):   # query i sits at L - Sq + i: rows before key 0 see nothing
        empty = max(0, min(Sq, Sq - L))
        assert (out[b, :empty] == 0).all() and torch.isneginf(lse[b, :, :empty]).all()
        assert torch.isfinite(lse[b, :, empty:]).all()


# ----------------------------------------------------------------------------------------------
# Window, softcap, scale.

@pytest.mark.parametrize("dtype,D,page_size", [(torch.float16, 80, None), (torch.bfloat16, 128, 7),
                                               (torch.bfloat16, 256, 16)])
def test_window_softcap(dtype, D, page_size):
    lens = [200, 3, 129]
    with emulated(SM86):
        q = rand(3, 6, 4, D, dtype=dtype, scale=3.0)           # MQA 6 x 4 queries: 2 row blocks
        k, v = make_cache(3, 1, 201, D, dtype, lens)
        kw = dict(cache_seqlens=lens_t(lens))
        if page_size:
            k, v, kw["block_table"] = to_pages(k, v, page_size, lens)
        for window, softcap, scale, splits in ((1, None, None, 2), (37, 7.0, 0.3, 4), (70, None, 0.05, None),
                                               (10 ** 6, 2.0, None, 3)):
            out, lse = run_and_check("cuda", q, k, v, window=window, softcap=softcap, scale=scale,
                                     num_splits=splits, **kw)
        # 10**6 is past capacity + Sq: the launcher drops it; the same as no window at all.
        same, same_lse = cuda_run(q, k, v, softcap=2.0, num_splits=3, **kw)
        assert torch.equal(out, same) and torch.equal(lse, same_lse)


# ----------------------------------------------------------------------------------------------
# Masks: the 16-byte scan of common/mask_range.cuh (several rows, a byte tail), strided and
# broadcast masks; keys outside each sequence's attended range hold NaN and are never read.

def span_mask(B, Sq, S, spans):
    """(B, 1, Sq, S) bool: sequence b attends keys in [lo, hi) of spans[b] at random (density
    ~0.6, the ends always), each row a causal-ish prefix of it."""
    m = torch.zeros(B, 1, Sq, S, dtype=torch.bool)
    for b, (lo, hi) in enumerate(spans):
        if hi <= lo:
            continue
        keep = torch.rand(hi - lo) < 0.6
        keep[0] = keep[-1] = True
        m[b, 0, :, lo:hi] = keep
        for i in range(Sq - 1):                       # earlier rows end earlier, the last row at hi
            m[b, 0, i, max(lo + 1, hi - (Sq - 1 - i)):hi] = False
    return m


MASK_CASES = {
    # capacity 320 (rows 16-byte aligned, 20 words): attended ranges starting / ending inside
    # and on 4- and 16-key word boundaries; the last sequence attends nothing.
    "vector": (3, 320, [(5, 17), (16, 319), (0, 0)], 64),
    # capacity 333: 20 words + 13 keys scanned byte by byte (the range ends in the tail).
    "tail": (2, 333, [(31, 333), (1, 322)], 96),
    # one row (Sq 1), sequence 1 attends key 0 only.
    "one_row": (2, 48, [(3, 45), (0, 1)], 128),
}


@pytest.mark.parametrize("Sq", [1, 3])
@pytest.mark.parametrize("case", list(MASK_CASES))
def test_mask_ranges(case, Sq):
    B, S, spans, D = MASK_CASES[case]
    dtype = torch.bfloat16 if Sq == 3 else torch.float16
    with emulated():
        q = rand(B, 4, Sq, D, dtype=dtype)
        k, v = rand(B, 2, S, D, dtype=dtype), rand(B, 2, S, D, dtype=dtype)
        mask = span_mask(B, Sq, S, spans)
        unused = ~mask[:, 0].any(1)[:, None].expand(B, 2, S)
        k[unused], v[unused] = GARBAGE, -GARBAGE                      # masked keys: finite garbage
        clean, clean_lse = run_and_check("cuda", q, k, v, mask=mask, num_splits=3)
        kp, vp = k.clone(), v.clone()
        for b, (lo, hi) in enumerate(spans):
            for t in (kp, vp):
                t[b, :, :lo], t[b, :, hi:] = float("nan"), float("inf")
        out, lse = cuda_run(q, kp, vp, mask=guarded(mask, "end"), num_splits=3)   # the scan stops at the end
        assert torch.equal(out, clean) and torch.equal(lse, clean_lse)
        for b, (lo, hi) in enumerate(spans):
            if hi <= lo:
                assert (out[b] == 0).all() and torch.isneginf(lse[b]).all()


def test_mask_strides_and_broadcasts():
    B, Sq, S, D = 2, 3, 77, 64
    with emulated():
        q = rand(B, 4, Sq, D, dtype=torch.bfloat16)
        k, v = rand(B, 1, S, D, dtype=torch.bfloat16), rand(B, 1, S, D, dtype=torch.bfloat16)
        wide = torch.rand(B, 1, Sq, 2 * S) < 0.5
        flat = torch.rand(B * Sq * S + 1) < 0.5
        for mask in (wide[..., ::2],                                   # keys at stride 2 (byte scan)
                     wide[:1, :, :, 1::2].expand(B, 1, Sq, S),         # batch broadcast, odd offset
                     flat[1:].view(B, 1, Sq, S),                       # contiguous at an odd address
                     wide[:, :, :1, :S],                               # one row for all queries
                     torch.tensor([True, False, True]).view(1, 1, Sq, 1)):   # key broadcast: all or none
            out, lse = run_and_check("cuda", q, k, v, mask=mask, num_splits=2)
        assert (out[:, 1] == 0).all() and torch.isneginf(lse[:, :, 1]).all()


def test_paged_mask_and_paged_full_capacity():
    # A mask over a paged cache (the pages past each sequence's length hold garbage the mask
    # excludes), then the same cache without mask or lengths: all max_pages * page_size keys.
    B, Hq, Hkv, Sq, S, D = 2, 6, 2, 2, 90, 96
    lens = [90, 30]
    with emulated(SM86):
        q = rand(B, Hq, Sq, D, dtype=torch.bfloat16)
        k, v = make_cache(B, Hkv, S, D, torch.bfloat16, lens)
        kp, vp, table = to_pages(k, v, 16, lens)
        table = torch.where(table < 0, torch.randint(0, kp.shape[0], table.shape, dtype=torch.int32), table)
        mask = torch.rand(B, 1, Sq, table.shape[1] * 16) < 0.6
        for b, L in enumerate(lens):
            mask[b, ..., L:] = False
        mask[0, 0, 0] = False                           # a row that sees nothing
        out, lse = run_and_check("cuda", q, kp, vp, block_table=table, mask=mask, num_splits=3)
        assert (out[0, 0] == 0).all() and torch.isneginf(lse[0, :, 0]).all()
        run_and_check("cuda", q, kp, vp, block_table=table, num_splits=2)


def test_window_without_lengths_and_empty_cache():
    with emulated():
        q = rand(2, 4, 3, 64, dtype=torch.bfloat16)
        k, v = rand(2, 1, 150, 64, dtype=torch.bfloat16), rand(2, 1, 150, 64, dtype=torch.bfloat16)
        for w in (1, 64, 149):                          # every sequence 150 keys long
            run_and_check("cuda", q, k, v, window=w, softcap=3.0, num_splits=2)
        empty = k[:, :, :0]                             # a 0-slot contiguous cache
        for kw in ({}, dict(cache_seqlens=lens_t([0, 0]), num_splits=3)):
            out, lse = cuda_run(q, empty, empty, **kw)
            assert (out == 0).all() and torch.isneginf(lse).all()


# ----------------------------------------------------------------------------------------------
# What the kernel must never read: NaN / inf there must not change a single bit.

@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("dtype", LOW)
def test_poison_never_leaks(dtype, paged):
    B, Hq, Hkv, Sq, S, D, W = 3, 6, 2, 3, 150, 96, 40
    lens = [150, 61, 2]
    with emulated():
        qbuf = rand(B, Sq, Hq, D + 16, dtype=dtype)
        q = qbuf[..., :D].transpose(1, 2)                  # (B, Hq, Sq, D) view with padded rows
        kbuf = rand(B, Hkv, S, D + 8, dtype=dtype)
        vbuf = rand(B, Hkv, S, D + 8, dtype=dtype)
        k, v = kbuf[..., :D], vbuf[..., 8:]                # row stride D + 8, each skips 8 columns
        kw = dict(cache_seqlens=lens_t(lens), window=W, num_splits=3)
        for b, L in enumerate(lens):
            k[b, :, L:], v[b, :, L:] = GARBAGE, -GARBAGE
        clean, clean_lse = run_and_check("cuda", q, k, v, **kw)
        # poison: q's and the caches' padding columns, slots past each length, keys before the
        # first query's window.
        qbuf[..., D:] = float("nan")
        kbuf[..., D:] = float("nan")
        vbuf[..., :8] = float("inf")
        for b, L in enumerate(lens):
            lo = max(L - Sq - W + 1, 0)
            k[b, :, L:], v[b, :, L:] = float("nan"), float("-inf")
            k[b, :, :lo], v[b, :, :lo] = float("inf"), float("nan")
        if paged:
            kc, vc, table = to_pages(k.contiguous(), v.contiguous(), 16, lens)
            spare = kc.eq(torch.tensor(GARBAGE, dtype=dtype))     # pad of the last pages, spare pages
            kc[spare], vc[spare] = float("nan"), float("nan")
            out, lse = cuda_run(q, kc, vc, block_table=table, **kw)
        else:
            out, lse = cuda_run(q, k, v, **kw)
        assert torch.equal(out, clean) and torch.equal(lse, clean_lse)


# ----------------------------------------------------------------------------------------------
# Paged layouts: a block table sliced out of a wider one, pages as views of a fused KV buffer,
# single-page-slot and single-head strides (0); bitwise the contiguous result.

@pytest.mark.parametrize("page_size,Hkv", [(1, 1), (5, 2), (64, 2)])
def test_paged_views_equal_contiguous(page_size, Hkv):
    B, Hq, Sq, S, D, dtype = 3, 4, 2, 200, 64, torch.bfloat16
    lens = [200, 0, 77]
    with emulated(SM86):
        q = rand(B, Hq, Sq, D, dtype=dtype)
        k, v = make_cache(B, Hkv, S, D, dtype, lens)
        dense, dense_lse = run_and_check("cuda", q, k, v, cache_seqlens=lens_t(lens), num_splits=4)
        kp, vp, table = to_pages(k, v, page_size, lens)
        fused = torch.stack([kp, vp], 2)                          # (pages, page_size, 2, Hkv, D)
        wide = torch.full((B, table.shape[1] + 5), -3, dtype=torch.int32)
        wide[:, 2:2 + table.shape[1]] = table
        kw = dict(cache_seqlens=lens_t(lens), block_table=wide[:, 2:2 + table.shape[1]], num_splits=4)
        out, lse = run_and_check("cuda", q, fused[:, :, 0], fused[:, :, 1], **kw)
        assert torch.equal(out, dense) and torch.equal(lse, dense_lse)


# ----------------------------------------------------------------------------------------------
# Split counts: 1 (no combine kernel), several, 40 (35 non-empty: the combine kernel's lanes loop
# twice), the launcher's maximum 256 (most of them empty). D 256: 32-key tiles.

@pytest.mark.parametrize("splits", [1, 2, 7, 40, 256])
def test_split_counts(splits):
    lens = [1100, 0, 65]
    with emulated():
        q = rand(3, 8, 2, 256, dtype=torch.bfloat16)          # GQA 8 x 2 queries: one row block
        k, v = make_cache(3, 1, 1100, 256, torch.bfloat16, lens)
        out, lse = run_and_check("cuda", q, k, v, cache_seqlens=lens_t(lens), num_splits=splits)
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()


def test_long_cache():
    # test_decode.py's GPU lengths (4097 keys): the CPU split heuristic (2 pieces) and 64 pieces.
    lens = [4097, 33, 2048]
    with emulated(SM86):
        q = rand(3, 8, 4, 64, dtype=torch.bfloat16)
        k, v = make_cache(3, 2, 4100, 64, torch.bfloat16, lens)
        for splits in (None, 64):
            run_and_check("cuda", q, k, v, cache_seqlens=lens_t(lens), num_splits=splits)


# ----------------------------------------------------------------------------------------------
# No read outside the inputs: each sits against an inaccessible page (simt.backend.guarded: an
# access past that edge fails the launch), one side per run. (Outputs: GuardedTorch, every test.)

@pytest.mark.parametrize("kind,splits,side", [("paged", 5, "end"), ("paged", 1, "start"), ("dense", 3, "start"),
                                              ("mask", 3, "end"), ("mask", 2, "start")])
def test_no_access_outside_the_tensors(kind, splits, side):
    B, Hq, Hkv, Sq, S, D, dtype = 3, 6, 2, 3, 96, 80, torch.bfloat16   # 54 rows: the last combine
    lens = [96, 23, 0]                                                # CTA has 2 idle warps
    with emulated() as buffers:
        q = guarded(rand(B, Hq, Sq, D, dtype=dtype), side)
        k, v = make_cache(B, Hkv, S, D, dtype, lens)
        if kind == "paged":
            k, v, table = to_pages(k, v, 16, lens)
            kw = dict(cache_seqlens=guarded(lens_t(lens), side), block_table=guarded(table, side), window=60)
        elif kind == "dense":
            kw = dict(cache_seqlens=guarded(lens_t(lens), side))
        else:   # (B, Sq, 96) bytes: the 16-byte scan's last word ends at the page
            mask = torch.rand(B, 1, Sq, S) < 0.7
            mask[:, :, :, 0] = mask[:, :, :, -1] = True
            kw = dict(mask=guarded(mask, side))
        run_and_check("cuda", q, guarded(k, side), guarded(v, side), num_splits=splits, **kw)
        assert len(buffers.made) == (4 if splits > 1 else 2)    # out, lse (+ the two partials): checked
                                                                # at the end of `emulated`


# ----------------------------------------------------------------------------------------------
# Emulated devices: the same bits on every sm80+ device (the code does not depend on the SM count
# or the opt-in size as long as the tile fits); sm75 has no code; too little opt-in shared memory
# is a launch error, not garbage.

@pytest.mark.parametrize("dtype", LOW)
def test_devices(dtype):
    lens = [40, 17]
    for D in HEAD_DIMS:
        runs = []
        for sm in DEVICES:
            with emulated(sm):
                if not runs:
                    q = rand(2, 4, 2, D, dtype=dtype)
                    k, v = make_cache(2, 2, 40, D, dtype, lens)
                    runs.append(run_and_check("cuda", q, k, v, cache_seqlens=lens_t(lens), num_splits=2))
                else:
                    runs.append(cuda_run(q, k, v, cache_seqlens=lens_t(lens), num_splits=2))
        assert all(torch.equal(a, b) for r in runs[1:] for a, b in zip(r, runs[0])), D
    with emulated((7, 5), check_outputs=False):
        with pytest.raises(CudaError, match="no code for this GPU architecture"):
            cuda_run(q, k, v, cache_seqlens=lens_t(lens))
    with emulated(SM86, check_outputs=False, smem_optin=48 * 1024):   # every decode tile needs > 48 KB
        with pytest.raises(CudaError):
            cuda_run(q, k, v, cache_seqlens=lens_t(lens))


# ----------------------------------------------------------------------------------------------
# tests/test_decode.py's backend-parametrized tests, with backend "cuda" on the emulator.

TD_CALLS = (
    [(f"matches_reference[{td.case_id(c)}-{str(dt)[6:]}]", td.test_matches_reference, (dt, c))
     for c in td.CASES if c[6] in HEAD_DIMS for dt in LOW]
    + [("paged_equals_contiguous", td.test_paged_equals_contiguous, ()),
       ("nan_in_unused_slots", td.test_nan_in_unused_slots_never_reaches_the_output, ()),
       ("left_padded_mask[fp16]", td.test_left_padded_mask, (torch.float16,)),
       ("left_padded_mask[bf16]", td.test_left_padded_mask, (torch.bfloat16,)),
       ("mask_reads_only_the_attended_range[1]", td.test_mask_reads_only_the_attended_range, (1,)),
       ("mask_reads_only_the_attended_range[3]", td.test_mask_reads_only_the_attended_range, (3,)),
       ("window_softcap[bf16-paged]", td.test_window_softcap, (torch.bfloat16, True)),
       ("window_softcap[fp16-dense]", td.test_window_softcap, (torch.float16, False)),
       ("sinks[dense-3]", td.test_sinks, (False, 3)),
       ("sinks[paged-3]", td.test_sinks, (True, 3)),
       ("sinks[dense-1]", td.test_sinks, (False, 1)),
       ("no_lengths_means_full_cache_and_empty_rows", td.test_no_lengths_means_full_cache_and_empty_rows, ()),
       ("strided_static_cache", td.test_strided_static_cache, ()),
       ("kernels_clamp_bad_metadata", td.test_kernels_clamp_bad_metadata, ()),
       ("empty_paged_cache", td.test_empty_paged_cache, ()),
       ("opcheck", td.test_opcheck, ()),
       ("torch_compile_fullgraph", td.test_torch_compile_fullgraph, ())])


@pytest.mark.parametrize("fn,args", [c[1:] for c in TD_CALLS], ids=[c[0] for c in TD_CALLS])
def test_decode_suite(fn, args):
    with emulated(guard_outputs=fn is not td.test_opcheck):    # (opcheck compares storage offsets)
        fn("cuda", *args)
