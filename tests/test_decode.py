"""decode_attention (split-KV decode against a KV cache): every backend vs a float64 reference.

Tolerance: tests/test_attention.py's rule (a backend's max error vs float64 is at most 2x the
error of PyTorch's own attention in the same dtype plus one ulp; float32: a few ulps), applied
to the dense equivalent of each call (pages gathered, allowed keys as a mask). Rows with
nothing allowed must be exactly 0 with lse = -inf.

Triton runs through the CPU interpreter here: the grids are small (the whole file ~1 min on
2 cores); num_splits is forced > 1 in places so the combine kernel runs. The `gpu` tests run a
bigger grid natively (4097-long caches, every head dim).
"""
import json
import subprocess
import sys

import pytest
import torch

import fastllm
from fastllm import ref
from fastllm.ops import decode_attention, flash_attention
from fastllm.ops.decode import MAX_SPLITS, MIN_KEYS_PER_SPLIT, split_heuristic
from fastllm.ref.decode import gather_pages, length_mask

from conftest import DEVICE
from test_attention import check, pytorch_same_dtype

KERNEL_BACKENDS = ["triton"] + (["cuda"] if DEVICE == "cuda" else [])
BACKENDS = KERNEL_BACKENDS + ["torch"]
LOW = [torch.float16, torch.bfloat16]
GARBAGE = 1e4   # unwritten cache slots: large and finite (a kernel that reads them is visibly off)


# ----------------------------------------------------------------------------------------------
# Helpers

def rand(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


def make_cache(B, Hkv, S_max, D, dtype, lens):
    """Contiguous caches (B, Hkv, S_max, D); slots past each length hold GARBAGE."""
    k, v = rand(B, Hkv, S_max, D, dtype=dtype), rand(B, Hkv, S_max, D, dtype=dtype)
    for b, L in enumerate(lens):
        k[b, :, L:] = GARBAGE
        v[b, :, L:] = -GARBAGE
    return k, v


def to_pages(k, v, page_size, lens):
    """The same caches as shuffled pages: (num_pages, page_size, Hkv, D) + block_table. Unused
    table entries are -1 (never read); a few spare pages of GARBAGE sit in the pool."""
    B, Hkv, S_max, D = k.shape
    max_pages = -(-S_max // page_size)
    pad = max_pages * page_size - S_max
    kp = torch.nn.functional.pad(k.transpose(1, 2), (0, 0, 0, 0, 0, pad), value=GARBAGE)
    vp = torch.nn.functional.pad(v.transpose(1, 2), (0, 0, 0, 0, 0, pad), value=GARBAGE)
    kp = kp.reshape(B * max_pages, page_size, Hkv, D)
    vp = vp.reshape(B * max_pages, page_size, Hkv, D)
    spare = 3
    perm = torch.randperm(B * max_pages + spare, device=DEVICE)
    k_pages = torch.full((B * max_pages + spare, page_size, Hkv, D), GARBAGE, dtype=k.dtype, device=DEVICE)
    v_pages = torch.full_like(k_pages, GARBAGE)
    k_pages[perm[:B * max_pages]] = kp
    v_pages[perm[:B * max_pages]] = vp
    table = perm[:B * max_pages].reshape(B, max_pages).to(torch.int32)
    for b, L in enumerate(lens):
        table[b, -(-L // page_size):] = -1
    return k_pages, v_pages, table


def dense_view(k_cache, v_cache, block_table, cache_seqlens, mask, Sq, window):
    """(k, v, mask) of the dense attention call the decode call equals."""
    if block_table is not None:
        k, v = gather_pages(k_cache, block_table), gather_pages(v_cache, block_table)
    else:
        k, v = k_cache, v_cache
    if mask is None:
        lens = cache_seqlens.tolist() if cache_seqlens is not None else [k.shape[2]] * k.shape[0]
        mask = length_mask(lens, Sq, k.shape[2], window=window, device=k.device)
    return k, v, mask


def run_and_check(backend, q, k_cache, v_cache, **kw):
    out, lse = decode_attention(q, k_cache, v_cache, backend=backend, return_lse=True, **kw)
    exact = ref.decode_attention(q.double(), k_cache.double(), v_cache.double(),
                                 **{n: x for n, x in kw.items() if n not in ("num_splits", "validate")})
    k, v, mask = dense_view(k_cache, v_cache, kw.get("block_table"), kw.get("cache_seqlens"), kw.get("mask"),
                            q.shape[2], kw.get("window"))
    base = pytorch_same_dtype(q, k, v, causal=False, mask=mask, scale=kw.get("scale"), softcap=kw.get("softcap"),
                              sinks=kw.get("sinks"))
    check(out, lse, exact, base, q.dtype)
    return out, lse


def lens_t(lens):
    return torch.tensor(lens, dtype=torch.int32, device=DEVICE)


# ----------------------------------------------------------------------------------------------
# Numerics: (B, Hq, Hkv, Sq, S_max, lens, D, page_size or None, num_splits)

CASES = [
    (1, 4, 4, 1, 1, [1], 64, None, None),              # a single key, GQA 1
    (2, 8, 2, 1, 40, [17, 40], 64, None, 3),           # GQA 4, partially filled static cache
    (2, 8, 1, 3, 1000, [1000, 517], 128, None, 4),     # GQA 8, Sq 3, long
    (3, 4, 1, 2, 33, [1, 17, 33], 80, 1, 2),           # pages of 1, odd head dim
    (2, 8, 2, 4, 70, [17, 70], 96, 16, 2),             # pages of 16, partially filled last page
    (2, 2, 1, 1, 400, [300, 17], 64, 256, 2),          # pages of 256 (FlashAttention's size)
    (1, 6, 2, 16, 50, [50], 40, None, 1),              # Sq 16 (speculative), D 40
]


def case_id(c):
    B, Hq, Hkv, Sq, S, lens, D, ps, ns = c
    return f"B{B}_H{Hq}/{Hkv}_Sq{Sq}_S{S}_D{D}_{'pages' + str(ps) if ps else 'dense'}_splits{ns}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(backend, dtype, case):
    B, Hq, Hkv, Sq, S_max, lens, D, page_size, splits = case
    if dtype == torch.float32 and case is not CASES[2] and case is not CASES[3]:
        pytest.skip("float32: two cases suffice")
    q = rand(B, Hq, Sq, D, dtype=dtype)
    k, v = make_cache(B, Hkv, S_max, D, dtype, lens)
    kw = dict(cache_seqlens=lens_t(lens), num_splits=splits)
    if page_size:
        k, v, kw["block_table"] = to_pages(k, v, page_size, lens)
    run_and_check(backend, q, k, v, **kw)


def _two_sequences():
    """lens [45, 17], q (2, 4, 2, 64) and a 45-slot fp16 cache (GQA 2)."""
    lens = [45, 17]
    return lens, rand(2, 4, 2, 64, dtype=torch.float16), *make_cache(2, 2, 45, 64, torch.float16, lens)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_paged_equals_contiguous(backend):
    # Same keys, same tiles: the paged path must give bitwise the contiguous result.
    lens, q, k, v = _two_sequences()
    dense = decode_attention(q, k, v, cache_seqlens=lens_t(lens), num_splits=2, backend=backend)
    for ps in (1, 7, 16):
        kp, vp, table = to_pages(k, v, ps, lens)
        paged = decode_attention(q, kp, vp, cache_seqlens=lens_t(lens), block_table=table, num_splits=2,
                                 backend=backend)
        assert torch.equal(paged, dense), ps


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_unused_slots_never_reaches_the_output(backend):
    # Caches from torch.empty / recycled pages hold anything past each length, NaN included:
    # every backend must ignore those slots (regression: the reference's p @ V gave 0 * NaN).
    lens, q, k, v = _two_sequences()
    want = decode_attention(q, k, v, cache_seqlens=lens_t(lens), window=20, backend=backend)
    for b, L in enumerate(lens):
        k[b, :, L:], v[b, :, L:] = float("nan"), float("inf")
    k[0, :, :5], v[0, :, :5] = float("nan"), float("-inf")   # outside every query's window
    assert torch.equal(decode_attention(q, k, v, cache_seqlens=lens_t(lens), window=20, backend=backend), want)
    kp, vp, table = to_pages(k, v, 16, lens)
    kp[kp == GARBAGE], vp[vp == GARBAGE] = float("nan"), float("nan")
    out = decode_attention(q, kp, vp, cache_seqlens=lens_t(lens), block_table=table, window=20, backend=backend)
    # (the torch path narrows contiguous caches to the attended keys, not paged ones: rounding)
    torch.testing.assert_close(out, want, rtol=0, atol=2e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
def test_left_padded_mask(backend, dtype):
    # transformers' sdpa mask of a left-padded batch decoding Sq = 2 tokens against a 30-slot
    # cache: row b has 7 * b padding slots in front; causal among the new queries; row 2's
    # first query is itself padding (sees nothing).
    B, Sq, S = 3, 2, 30
    q = rand(B, 8, Sq, 64, dtype=dtype)
    k, v = rand(B, 2, S, 64, dtype=dtype), rand(B, 2, S, 64, dtype=dtype)
    keep = torch.ones(B, S, dtype=torch.bool, device=DEVICE)
    for b in range(B):
        keep[b, :7 * b] = False
    causal = torch.ones(Sq, S, dtype=torch.bool, device=DEVICE).tril(S - Sq)
    mask = keep[:, None, None, :] & causal
    mask[2, 0, 0] = False
    out, lse = run_and_check(backend, q, k, v, mask=mask, num_splits=2)
    assert (out[2, 0] == 0).all() and torch.isneginf(lse[2, :, 0]).all()
    run_and_check(backend, q, k, v, mask=keep[:1, None, None, :].expand(B, 1, Sq, S))   # broadcast view



@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("Sq", [1, 3])
def test_mask_reads_only_the_attended_range(backend, Sq):
    # A left-padded batch decoding against a 300-slot StaticCache: the kernels first find the
    # first / last key any query row attends and split only that range over the programs, so
    # keys outside are never read: NaN there (unwritten slots, padding) must not reach the
    # output, which must equal the unpoisoned run bit for bit. Inside the range the mask still
    # decides (a hole of masked keys holding finite garbage); sequence 2 attends nothing.
    B, S, D = 3, 300, 64
    q = rand(B, 8, Sq, D, dtype=torch.float16)
    k, v = rand(B, 2, S, D, dtype=torch.float16), rand(B, 2, S, D, dtype=torch.float16)
    spans = [(0, 37), (41, 250), (0, 0)]                      # [first, last) attended keys
    keep = torch.zeros(B, S, dtype=torch.bool, device=DEVICE)
    for b, (lo, hi) in enumerate(spans):
        keep[b, lo:hi] = True
    keep[1, 100:170] = False
    k[1, :, 100:170], v[1, :, 100:170] = GARBAGE, -GARBAGE
    mask = keep[:, None, None, :] & torch.ones(Sq, S, dtype=torch.bool, device=DEVICE).tril(S - Sq)
    clean, clean_lse = run_and_check(backend, q, k, v, mask=mask, num_splits=3)
    kp, vp = k.clone(), v.clone()
    for b, (lo, hi) in enumerate(spans):
        for t in (kp, vp):
            t[b, :, :lo] = float("nan")
            t[b, :, hi:] = float("nan")
    out, lse = decode_attention(q, kp, vp, mask=mask, num_splits=3, backend=backend, return_lse=True)
    assert torch.equal(out, clean) and torch.equal(lse, clean_lse)
    assert (out[2] == 0).all() and torch.isneginf(lse[2]).all()

@pytest.mark.skipif(DEVICE != "cpu", reason="the torch backend narrows on CPU only (no device sync there)")
def test_torch_backend_on_cpu_skips_the_unfilled_static_cache():
    # The CPU product path (backend "torch"): keys past the last one any row attends are sliced
    # off before the reference runs, so NaN in a StaticCache's unwritten slots is never read, in
    # decode and in a masked prefill alike, and the result equals the unpoisoned one.
    B, S, filled = 2, 300, [120, 77]
    keep = torch.zeros(B, S, dtype=torch.bool)
    for b, L in enumerate(filled):
        keep[b, :L] = True
    q, qp = rand(B, 8, 1, 64, dtype=torch.bfloat16), rand(B, 8, 9, 64, dtype=torch.bfloat16)
    k, v = rand(B, 2, S, 64, dtype=torch.bfloat16), rand(B, 2, S, 64, dtype=torch.bfloat16)
    kp, vp = k.clone(), v.clone()
    kp[:, :, max(filled):], vp[:, :, max(filled):] = float("nan"), float("nan")
    dmask = keep[:, None, None, :]
    clean = decode_attention(q, k, v, mask=dmask, backend="torch", return_lse=True)
    got = decode_attention(q, kp, vp, mask=dmask, backend="torch", return_lse=True)
    assert all(torch.equal(a, b) for a, b in zip(got, clean)) and torch.isfinite(got[0]).all()
    pmask = dmask & torch.ones(9, S, dtype=torch.bool).tril(60)     # 9 queries at positions 60..68
    clean = flash_attention(qp, k, v, causal=False, mask=pmask, backend="torch", return_lse=True)
    got = flash_attention(qp, kp, vp, causal=False, mask=pmask, backend="torch", return_lse=True)
    assert all(torch.equal(a, b) for a, b in zip(got, clean)) and torch.isfinite(got[0]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("paged", [False, True])
def test_window_softcap(backend, dtype, paged):
    lens = [90, 5, 41]
    q = rand(3, 8, 3, 64, dtype=dtype, scale=4.0)
    k, v = make_cache(3, 2, 90, 64, dtype, lens)
    kw = dict(cache_seqlens=lens_t(lens), window=20, softcap=5.0, scale=0.25, num_splits=2)
    if paged:
        k, v, kw["block_table"] = to_pages(k, v, 16, lens)
    run_and_check(backend, q, k, v, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("paged,splits", [(False, 3), (True, 3), (False, 1)])
def test_sinks(backend, paged, splits):
    """Attention sinks (gpt-oss) join the softmax once: in the merge of the split-KV partials, or
    with one split in the split kernel's epilogue; a sequence of length 0 gets out 0 and lse =
    the sink."""
    lens = [90, 0, 41]
    q = rand(3, 4, 2, 64, dtype=torch.bfloat16)
    k, v = make_cache(3, 2, 90, 64, torch.bfloat16, lens)
    sinks = torch.tensor([-3.0, 0.0, 1.5, 8.0], device=DEVICE, dtype=torch.bfloat16)
    kw = dict(cache_seqlens=lens_t(lens), window=30, num_splits=splits, sinks=sinks)
    if paged:
        k, v, kw["block_table"] = to_pages(k, v, 16, lens)
    out, lse = run_and_check(backend, q, k, v, **kw)
    assert (out[1] == 0).all() and torch.equal(lse[1], sinks.float()[:, None].expand(4, 2))


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter's tile config; a GPU runs its own")
@pytest.mark.parametrize("block_n,block_m_max", [(16, 64), (32, 16)])
def test_triton_gpu_tile_sizes_under_the_interpreter(block_n, block_m_max, monkeypatch):
    # The interpreter otherwise reads 64-key blocks; a GPU reads 32 (D 256, 64 rows x D 128) or
    # 16 (fp32, D 256): split boundaries, page crossings and window starts at those sizes. A
    # smaller BLOCK_M_MAX cuts the packed (GQA group x Sq) rows over several programs.
    import fastllm.triton_kernels.decode_attention as da
    monkeypatch.setattr(da, "_INTERPRET_BLOCK_N", block_n)
    monkeypatch.setattr(da, "BLOCK_M_MAX", block_m_max)
    lens = [90, 1, 57]
    q = rand(3, 8, 5, 64, dtype=torch.float16, scale=2.0)     # 4 x 5 packed rows: two 16-row programs
    k, v = make_cache(3, 2, 90, 64, torch.float16, lens)
    kw = dict(cache_seqlens=lens_t(lens), window=37, softcap=10.0, num_splits=3,
              sinks=torch.randn(8, device=DEVICE))
    run_and_check("triton", q, k, v, **kw)
    k, v, kw["block_table"] = to_pages(k, v, 7, lens)
    run_and_check("triton", q, k, v, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_lengths_means_full_cache_and_empty_rows(backend):
    q = rand(2, 4, 3, 64, dtype=torch.float16)
    k, v = rand(2, 2, 19, 64, dtype=torch.float16), rand(2, 2, 19, 64, dtype=torch.float16)
    out, lse = run_and_check(backend, q, k, v)
    want = flash_attention(q, k, v, causal=True, backend="torch")
    assert (out.double() - want.double()).abs().max() <= 4e-3
    # lengths 0 and 1 with Sq = 3: rows before the first key see nothing.
    out, lse = run_and_check(backend, q, k, v, cache_seqlens=lens_t([0, 1]), num_splits=2)
    assert (out[0] == 0).all() and torch.isneginf(lse[0]).all()
    assert (out[1, :2] == 0).all() and torch.isneginf(lse[1, :, :2]).all() and torch.isfinite(lse[1, :, 2]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_static_cache(backend):
    # A StaticCache slice of a wider buffer, q a transposed (B, S, H, D) view: read in place.
    D = 64
    q = rand(2, 2, 8, D, dtype=torch.bfloat16).transpose(1, 2)
    buf = rand(2, 2, 40, D + 8, dtype=torch.bfloat16)
    k, v = buf[..., :D], buf[..., 8:]
    lens = lens_t([40, 23])
    out, _ = run_and_check(backend, q, k, v, cache_seqlens=lens, num_splits=2)
    assert torch.equal(out, decode_attention(q.contiguous(), k.contiguous(), v.contiguous(), cache_seqlens=lens,
                                             num_splits=2, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_cache_seqlens(backend):
    # Regression: lengths taken as a column of a (B, 2) int32 tensor (stride 2) were read densely
    # by the Triton kernel: silently wrong lengths. Also through the implementation directly.
    from fastllm.ops.decode import OP
    q = rand(3, 4, 1, 64, dtype=torch.float16)
    k, v = make_cache(3, 2, 20, 64, torch.float16, [20, 20, 20])
    lens = torch.tensor([[5, 7], [20, 7], [1, 7]], dtype=torch.int32, device=DEVICE)[:, 0]
    assert lens.stride(0) == 2
    want = decode_attention(q, k, v, cache_seqlens=lens.contiguous(), num_splits=2, backend=backend)
    out, _ = run_and_check(backend, q, k, v, cache_seqlens=lens, num_splits=2)
    assert torch.equal(out, want)
    if backend != "cuda":       # (its glue refuses strided lengths by name; the op hands it a copy)
        direct, _ = OP.impls[backend](q, k, v, lens, None, None, 0.125, 0, 0.0, 2, None)
        assert torch.equal(direct, decode_attention(q, k, v, cache_seqlens=lens, num_splits=2, scale=0.125,
                                                    backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_more_splits_than_key_tiles(backend):
    # num_splits (the most allowed) far above the number of key tiles: still right (Triton caps
    # the pieces at one per key tile; CUDA runs the empty ones, test_simt_decode.py).
    q = rand(2, 4, 3, 64, dtype=torch.float16)
    k, v = make_cache(2, 2, 70, 64, torch.float16, [70, 41])
    run_and_check(backend, q, k, v, cache_seqlens=lens_t([70, 41]), num_splits=256)


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_at_the_int32_limit_restricts_nothing(backend):
    # Regression: L - Sq - window + 1 wrapped in the Triton kernel's int32 (L < Sq here): the
    # first query, which sees key 0, got nothing.
    q = rand(1, 2, 4, 16, dtype=torch.float16)
    k, v = make_cache(1, 1, 8, 16, torch.float16, [1])
    lens = lens_t([1])
    want = decode_attention(q, k, v, cache_seqlens=lens, backend=backend)
    assert torch.equal(decode_attention(q, k, v, cache_seqlens=lens, window=2 ** 31 - 1, backend=backend), want)


def test_triton_predicate_refuses_what_overflows_its_int32_math():
    # Auto falls to Triton when CUDA refuses; these made its int32 split bounds wrap (keys
    # silently dropped) or its grid z exceed 65535 (a CUDA launch error naming nothing).
    from fastllm.ops.decode import _triton_supports

    def m(*shape, dtype=torch.float16):
        return torch.empty(*shape, dtype=dtype, device="meta")
    pages, table = m(1, 64, 1, 64), m(1, 2 ** 25 - 1, dtype=torch.int32)     # 64-key pages: 2^31 - 64 slots
    assert "above 2^30 keys" in _triton_supports(m(1, 1, 1, 64), pages, pages, None, table)
    assert _triton_supports(m(1, 1, 1, 64), pages, pages, None, table[:, :2 ** 24]) is None
    kv = m(1, 1, 512, 128)
    assert "grid z" in _triton_supports(m(1, 4194368, 1, 128), kv, kv, None, None)
    assert _triton_supports(m(1, 64, 16, 128), kv, kv, None, None) is None


# ----------------------------------------------------------------------------------------------
# Equivalence with prefill

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("step,layout", [(1, "lens"), (3, "lens"), (3, "mask"), (1, "paged")])
def test_token_by_token_equals_prefill(backend, step, layout):
    """Decoding a sequence `step` tokens at a time against a growing StaticCache gives the
    prefill flash_attention over the whole sequence (within the tolerance rule): with lengths,
    with the causal mask in cache positions transformers hands over (what fastllm.patch
    passes), and from a paged cache (3-key pages, shuffled)."""
    B, Hq, Hkv, T, S_max, D, dtype = 2, 8, 2, 13, 20, 64, torch.float16
    q, k, v = rand(B, Hq, T, D, dtype=dtype), rand(B, Hkv, T, D, dtype=dtype), rand(B, Hkv, T, D, dtype=dtype)
    prefill, prefill_lse = flash_attention(q, k, v, causal=True, backend=backend, return_lse=True)
    k_cache = torch.full((B, Hkv, S_max, D), GARBAGE, dtype=dtype, device=DEVICE)
    v_cache = torch.full_like(k_cache, -GARBAGE)
    outs, lses = [], []
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        k_cache[:, :, t0:t1], v_cache[:, :, t0:t1] = k[:, :, t0:t1], v[:, :, t0:t1]
        kc, vc, kw = k_cache, v_cache, dict(cache_seqlens=lens_t([t1] * B))
        if layout == "mask":   # query t0 + i attends keys 0 .. t0 + i; nothing past the filled part
            rows = torch.arange(t0, t1, device=DEVICE)[:, None]
            kw = dict(mask=(torch.arange(S_max, device=DEVICE)[None, :] <= rows).expand(B, 1, t1 - t0, S_max))
        elif layout == "paged":
            kc, vc, kw["block_table"] = to_pages(k_cache, v_cache, 3, [t1] * B)
        o, l = decode_attention(q[:, :, t0:t1], kc, vc, num_splits=2, backend=backend, return_lse=True, **kw)
        outs.append(o)
        lses.append(l)
    out, lse = torch.cat(outs, 1), torch.cat(lses, 2)
    exact = ref.flash_attention(q.double(), k.double(), v.double(), causal=True)
    check(out, lse, exact, pytorch_same_dtype(q, k, v, causal=True), dtype)
    eps = torch.finfo(dtype).eps
    assert (out.double() - prefill.double()).abs().max() <= 4 * eps * prefill.abs().max().item()
    assert (lse - prefill_lse).abs().max() <= 1e-5 * prefill_lse.abs().max().item()


# ----------------------------------------------------------------------------------------------
# Bad inputs, clamping, split heuristic

def test_bad_inputs():
    f16 = torch.float16
    q = rand(2, 8, 1, 64, dtype=f16)
    k, v = rand(2, 2, 10, 64, dtype=f16), rand(2, 2, 10, 64, dtype=f16)
    lens = lens_t([3, 10])
    with pytest.raises(TypeError, match="argument 'q' must be a torch.Tensor"):
        decode_attention(q.tolist(), k, v)
    with pytest.raises(ValueError, match="argument 'q' must be 4-D"):
        decode_attention(q[0], k, v)
    with pytest.raises(ValueError, match="argument 'q' must hold 1 to 16 queries"):
        decode_attention(rand(2, 8, 17, 64, dtype=f16), k, v)
    with pytest.raises(ValueError, match=r"decode_attention: argument 'sinks' must have one logit per query head"):
        decode_attention(q, k, v, sinks=torch.zeros(2, device=DEVICE))
    with pytest.raises(TypeError, match="argument 'k_cache' must have the dtype of 'q'"):
        decode_attention(q, k.float(), v)
    with pytest.raises(ValueError, match="'k_cache' and 'v_cache' must have the same shape"):
        decode_attention(q, k, v[:, :, :9])
    with pytest.raises(ValueError, match="argument 'k_cache' must have the head dim of 'q'"):
        decode_attention(q, k[..., :32], v[..., :32])
    with pytest.raises(ValueError, match=r"query heads \(8\) must be a multiple .* \(3\)"):
        decode_attention(q, rand(2, 3, 10, 64, dtype=f16), rand(2, 3, 10, 64, dtype=f16))
    with pytest.raises(ValueError, match="argument 'k_cache' must have the batch size of 'q'"):
        decode_attention(q, k[:1], v[:1])
    with pytest.raises(ValueError, match="argument 'v_cache' must have unit stride in the head dim"):
        decode_attention(q, k, v.transpose(2, 3).contiguous().transpose(2, 3))
    for name, kw in (("k_cache", {}), ("cache_seqlens", dict(cache_seqlens=lens.to("meta"))),
                     ("mask", dict(mask=torch.ones(2, 1, 1, 10, dtype=torch.bool, device="meta")))):
        kc, vc = (k.to("meta"), v.to("meta")) if name == "k_cache" else (k, v)
        with pytest.raises(ValueError, match=f"argument '{name}' must be on the device of 'q'"):
            decode_attention(q, kc, vc, **kw)
    with pytest.raises(TypeError, match=r"argument 'cache_seqlens' must have dtype in \(int32\)"):
        decode_attention(q, k, v, cache_seqlens=lens.long())
    with pytest.raises(ValueError, match="argument 'cache_seqlens' must have 2 entries"):
        decode_attention(q, k, v, cache_seqlens=lens[:1])
    with pytest.raises(ValueError, match=r"argument 'cache_seqlens' must be in \[0, 10\]"):
        decode_attention(q, k, v, cache_seqlens=lens_t([3, 11]), validate=DEVICE != "cpu")   # CPU: always
    with pytest.raises(ValueError, match=r"argument 'cache_seqlens' must be in \[0, 10\]"):
        decode_attention(q, k, v, cache_seqlens=lens_t([-1, 3]), validate=True)
    with pytest.raises(ValueError, match="pass either 'cache_seqlens' or 'mask'"):
        decode_attention(q, k, v, cache_seqlens=lens, mask=torch.ones(2, 1, 1, 10, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="'window' cannot be combined with 'mask'"):
        decode_attention(q, k, v, window=4, mask=torch.ones(2, 1, 1, 10, dtype=torch.bool, device=DEVICE))
    with pytest.raises(TypeError, match="argument 'mask' must have dtype bool"):
        decode_attention(q, k, v, mask=torch.ones(2, 1, 1, 10, device=DEVICE))
    with pytest.raises(ValueError, match=r"argument 'mask' must be broadcastable as \(2 or 1, 1, 1, 10\)"):
        decode_attention(q, k, v, mask=torch.ones(2, 1, 1, 9, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="argument 'window' must be >= 1"):
        decode_attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="argument 'softcap' must be a finite float > 0"):
        decode_attention(q, k, v, softcap=-1.0)
    with pytest.raises(ValueError, match=r"argument 'num_splits' must be an int in \[1, 256\] or None, got 0"):
        decode_attention(q, k, v, num_splits=0)
    with pytest.raises(ValueError, match=r"argument 'num_splits' must be an int in \[1, 256\] or None, got 257"):
        decode_attention(q, k, v, num_splits=257)
    with pytest.raises(TypeError, match=r"argument 'num_splits' must be an int in \[1, 256\] or None, got float"):
        decode_attention(q, k, v, num_splits=2.0)
    with pytest.raises(ValueError, match="argument 'backend' must be one of"):
        decode_attention(q, k, v, backend="sdpa")
    # Paged.
    kp, vp, table = to_pages(k, v, 4, [3, 10])
    with pytest.raises(TypeError, match=r"argument 'block_table' must have dtype in \(int32\)"):
        decode_attention(q, kp, vp, block_table=table.long())
    with pytest.raises(ValueError, match="argument 'block_table' must have the batch size of 'q'"):
        decode_attention(q, kp, vp, block_table=table[:1])
    with pytest.raises(ValueError, match="argument 'block_table' must be on the device of 'q'"):
        decode_attention(q, kp, vp, block_table=table.to("meta"))
    with pytest.raises(ValueError, match=r"argument 'cache_seqlens' must be in \[0, 12\]"):
        decode_attention(q, kp, vp, block_table=table, cache_seqlens=lens_t([3, 13]), validate=DEVICE != "cpu")
    bad = table.clone()
    bad[1, 0] = kp.shape[0]          # a used page past the pool
    with pytest.raises(ValueError, match="argument 'block_table' holds page ids outside"):
        decode_attention(q, kp, vp, block_table=bad, cache_seqlens=lens, validate=DEVICE != "cpu")
    # -1 past a sequence's last page is fine (never read).
    assert (table == -1).any()
    decode_attention(q, kp, vp, block_table=table, cache_seqlens=lens)
    # With a mask instead of lengths: pages past the last attended key may hold -1 too (they were
    # all checked, so a mask with a padded table was refused); one inside the range may not.
    mask = length_mask([3, 10], q.shape[2], 12, device=DEVICE)
    assert torch.equal(decode_attention(q, kp, vp, block_table=table, mask=mask),
                       decode_attention(q, kp, vp, block_table=table, cache_seqlens=lens))
    nothing = mask.clone()
    nothing[0] = False
    all_gone = table.clone()
    all_gone[0] = -1                 # sequence 0 attends nothing: reads no page
    decode_attention(q, kp, vp, block_table=all_gone, mask=nothing)
    hole = table.clone()
    hole[1, 1] = -1                  # keys 4..7 of sequence 1, inside its attended range
    with pytest.raises(ValueError, match="argument 'block_table' holds page ids outside"):
        decode_attention(q, kp, vp, block_table=hole, mask=mask, validate=DEVICE != "cpu")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernels_clamp_bad_metadata(backend):
    """Device metadata is not checked without validate=True (a sync); the kernels clamp so they
    never read out of bounds: lengths into [0, capacity], used page ids into [0, num_pages).
    The result is then the reference's, which clamps the same way."""
    from fastllm.ops.decode import OP
    q = rand(2, 4, 2, 64, dtype=torch.float16)
    k, v = rand(2, 2, 12, 64, dtype=torch.float16), rand(2, 2, 12, 64, dtype=torch.float16)
    lens = lens_t([-5, 100])
    kp, vp, table = to_pages(k, v, 4, [12, 12])
    table[0, 1], table[1, 2] = -7, 10 ** 6
    for kc, vc, bt in ((k, v, None), (kp, vp, table)):
        args = (q, kc, vc, lens, bt, None, 0.125, 0, 0.0, 2, None)
        out, lse = OP.impls[backend](*args)
        want, want_lse = OP.impls["torch"](*args)
        # Clamped ids may land on spare GARBAGE pages (values 1e4): a relative bound.
        scale = max(1.0, want.float().abs().max().item())
        assert (out.float() - want.float()).abs().max() <= 4 * torch.finfo(torch.float16).eps * scale
        assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))


def test_split_heuristic():
    # Small batch, long cache: enough splits to fill the GPU; big batch: none.
    assert split_heuristic(1, 8, 131072, 132) == 33
    assert split_heuristic(64, 8, 131072, 132) == 1
    assert split_heuristic(1, 8, 1000, 132) == 1000 // MIN_KEYS_PER_SPLIT
    assert split_heuristic(1, 1, 10 ** 7, 132) == MAX_SPLITS
    assert split_heuristic(1, 1, 1, 132) == 1
    for B in (1, 2, 4, 8, 16, 32, 64):
        for S in (1, 255, 1024, 4097, 131072):
            n = split_heuristic(B, 8, S, 132)
            assert 1 <= n <= MAX_SPLITS and (n == 1 or S // n >= MIN_KEYS_PER_SPLIT)


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU-only check")
def test_cuda_backend_reasons_on_cpu():
    q = rand(1, 4, 1, 64, dtype=torch.float16)
    k = rand(1, 2, 8, 64, dtype=torch.float16)
    with pytest.raises(fastllm.BackendUnavailableError, match="cuda"):
        decode_attention(q, k, k, backend="cuda")
    out = decode_attention(q, k, k)      # auto on CPU: the reference
    assert torch.equal(out, ref.decode_attention(q, k, k)[0])


# ----------------------------------------------------------------------------------------------
# Routing from the patch layer

def test_patch_routes_decode_calls():
    from fastllm.patch import _attention
    assert _attention._kernel_for(1) is decode_attention
    assert _attention._kernel_for(16, 100, True) is decode_attention
    assert _attention._kernel_for(17, 100, True) is flash_attention
    assert _attention._kernel_for(5, 5, True) is flash_attention            # prefill
    assert _attention._kernel_for(3, 100, False) is flash_attention         # non-causal, no mask
    assert _attention.kernel_name_for(1) == "decode_attention"
    assert _attention.kernel_name_for(512) == "flash_attention"
    module = torch.nn.Module()
    module.is_causal = True
    q = rand(2, 4, 1, 16, dtype=torch.float32)
    k, v = rand(2, 2, 9, 16, dtype=torch.float32), rand(2, 2, 9, 16, dtype=torch.float32)
    got, _ = _attention.attention_forward(module, q, k, v, None, scaling=0.3, _fastllm_backend="torch")
    want = flash_attention(q, k, v, causal=False, scale=0.3, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    mask = torch.rand(2, 1, 3, 9, device=DEVICE) > 0.4
    q3 = rand(2, 4, 3, 16, dtype=torch.float32)
    got, _ = _attention.attention_forward(module, q3, k, v, mask, scaling=0.3, _fastllm_backend="torch")
    want = flash_attention(q3, k, v, causal=False, mask=mask, scale=0.3, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# torch.library / torch.compile

@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    op = torch.ops.fastllm.decode_attention.default
    q = rand(2, 4, 2, 64, dtype=torch.float16)
    k, v = rand(2, 2, 20, 64, dtype=torch.float16), rand(2, 2, 20, 64, dtype=torch.float16)
    lens = lens_t([20, 7])
    sinks = torch.tensor([-1.0, 0.0, 2.0, float("-inf")], device=DEVICE)
    torch.library.opcheck(op, (q, k, v, lens, None, None, 0.125, 0, 0.0, 2, sinks, backend))
    kp, vp, table = to_pages(k, v, 8, [20, 7])
    torch.library.opcheck(op, (q, kp, vp, lens, table, None, 0.125, 5, 10.0, 0, None, backend))
    mask = torch.rand(2, 1, 2, 20, device=DEVICE) > 0.3
    torch.library.opcheck(op, (q, k, v, None, None, mask, 0.2, 0, 0.0, 1, sinks, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    def f(q, k, v, lens, table):
        return decode_attention(q, k, v, cache_seqlens=lens, block_table=table, window=8, backend=backend) * 2

    q = rand(2, 4, 2, 64, dtype=torch.float16)
    k, v = rand(2, 2, 20, 64, dtype=torch.float16), rand(2, 2, 20, 64, dtype=torch.float16)
    kp, vp, table = to_pages(k, v, 8, [20, 7])
    lens = lens_t([20, 7])
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, kp, vp, lens, table)
    assert torch.equal(got, f(q, kp, vp, lens, table))


# ----------------------------------------------------------------------------------------------
# Benchmark harness (CPU smoke test) and the CUDA glue without the extension

def test_decode_bench_cpu(tmp_path):
    res = subprocess.run([sys.executable, "-m", "fastllm.bench", "decode", "--quick", "--device", "cpu",
                          "--json", str(tmp_path / "b.json"), "--no-progress"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "CPU" in res.stdout and "fastllm-torch" in res.stdout
    rows = json.loads((tmp_path / "b.json").read_text())["results"]["decode"]
    assert rows and all(r["ok"] == "yes" and r["ms"] > 0 and r["GB/s"] > 0 for r in rows)


def test_cuda_supports_reasons():
    from fastllm.ops._decode_cuda import HEAD_DIMS, cuda_supports
    f16 = torch.float16
    q = torch.empty(2, 8, 1, 128, dtype=f16, device="meta")
    k = torch.empty(2, 2, 4096, 128, dtype=f16, device="meta")
    lens = torch.empty(2, dtype=torch.int32, device="meta")
    assert cuda_supports(q, k, k, lens, None, None, 0.1, 0, 0.0, 0) is None
    assert "head dim 72" in cuda_supports(q[..., :72], k[..., :72], k[..., :72], lens, None, None, 0.1, 0, 0.0, 0)
    assert "dtype float32" in cuda_supports(q.float(), k.float(), k.float(), lens, None, None, 0.1, 0, 0.0, 0)
    # softcap * log2(e) would be inf in the kernel's fp32 (NaN outputs); the reference is finite.
    assert "softcap" in cuda_supports(q, k, k, lens, None, None, 0.1, 0, 3e38, 0)
    wide = torch.empty(2, 2, 4096, 132, dtype=f16, device="meta")[..., :128]     # row stride 132
    assert "multiples of 8" in cuda_supports(q, wide, wide, lens, None, None, 0.1, 0, 0.0, 0)
    kp = torch.empty(100, 3, 2, 128, dtype=f16, device="meta")
    table = torch.empty(2, 40, dtype=torch.int32, device="meta")
    assert cuda_supports(q, kp, kp, lens, table, None, 0.1, 0, 0.0, 0) is None      # any page size
    assert 128 in HEAD_DIMS and 256 in HEAD_DIMS


# ----------------------------------------------------------------------------------------------
# GPU: a bigger grid natively

GPU_LENS = [[1], [17, 1000], [4097, 33, 2048]]
GPU_PAGES = [None, 16, 1, None, 256]   # cycled over (head dim, lengths): every D and length meets pages


# 2 dtypes x 5 head dims x 3 length sets x 3 head layouts = 90 cases per backend.
@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("D", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("lens", GPU_LENS, ids=lambda l: "x".join(map(str, l)))
@pytest.mark.parametrize("heads,Sq", [((8, 8), 1), ((32, 4), 4), ((16, 2), 16)])
def test_gpu_grid(backend, dtype, D, lens, heads, Sq):
    page_size = GPU_PAGES[([64, 80, 96, 128, 256].index(D) + GPU_LENS.index(lens)) % len(GPU_PAGES)]
    B = len(lens)
    S_max = max(lens) + 5
    q = rand(B, heads[0], Sq, D, dtype=dtype)
    k, v = make_cache(B, heads[1], S_max, D, dtype, lens)
    kw = dict(cache_seqlens=lens_t(lens))
    if page_size:
        k, v, kw["block_table"] = to_pages(k, v, page_size, lens)
    try:
        run_and_check(backend, q, k, v, **kw)
    except fastllm.BackendUnavailableError as e:
        pytest.skip(str(e))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
def test_gpu_features(backend, dtype):
    lens = [4097, 1000, 17]
    B, S = 3, 4200
    q = rand(B, 32, 4, 128, dtype=dtype, scale=2.0)
    k, v = make_cache(B, 8, S, 128, dtype, lens)
    try:
        run_and_check(backend, q, k, v, cache_seqlens=lens_t(lens), window=1024, softcap=30.0)
        mask = torch.rand(B, 1, 4, S, device=DEVICE) > 0.2
        run_and_check(backend, q, k, v, mask=mask)
        for splits in (1, 7, 64):
            run_and_check(backend, q, k, v, cache_seqlens=lens_t(lens), num_splits=splits)
    except fastllm.BackendUnavailableError as e:
        pytest.skip(str(e))



@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_paged_cache(backend):
    # No pages at all (a fresh paged cache): every row gets out 0 and lse -inf, no launch error.
    q = torch.randn(2, 8, 1, 64, device=DEVICE).to(torch.float16)
    pages = torch.zeros(0, 16, 2, 64, device=DEVICE, dtype=torch.float16)
    table = torch.zeros(2, 0, dtype=torch.int32, device=DEVICE)
    lens = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    out, lse = decode_attention(q, pages, pages, cache_seqlens=lens, block_table=table, return_lse=True,
                                backend=backend)
    assert out.shape == (2, 1, 8, 64) and (out == 0).all() and (lse == float("-inf")).all()
