"""Decode attention against a KV cache: achieved GB/s of fastllm's backends vs PyTorch SDPA and
flash-attn's flash_attn_with_kvcache (if importable), in the same run.

One new query per sequence (Sq = 1) against a full cache of S keys, the heads of a model preset
(--shapes: llama3-8b (default) / mistral-7b 32 query / 8 kv heads, llama3-70b 64 / 8, qwen2.5-7b
28 / 4; D 128; gpt-oss 64 / 8, D 64, with a sink logit per head: its full-attention layers, the
sliding ones keep 128 keys), S 1k..128k, batch 1..64; contiguous (B, Hkv, S, D) caches (the
layout transformers' caches hold) and the same cache in shuffled pages of 16 keys (fastllm takes
any page size) and of 256 (flash-attn's smallest page: both are timed on those pages).
Bytes = the K and V bytes a decode step must read (2 * B * Hkv * S * D * element size);
GB/s = bytes / time; frac_copy = GB/s over the device-to-device copy bandwidth measured at the
start of the run (copy_gbs: bytes read + written per second, the practical HBM ceiling).
Shapes whose K/V would exceed MAX_KV_BYTES are skipped. The peers take sinks the way they can:
SDPA as one extra zero key whose float attn_mask column holds the sink (the padded cache and the
mask built once per shape, not timed), flash-attn from its returned lse (out * sigmoid(lse -
sink)). Every implementation is checked against the float32 reference on every sequence (the
reference built one sequence at a time) before it is timed: its max error must be finite and
within 3x the best other implementation's (+ 2e-3; the same kernel in another layout does not
count; alone, 16x the reference's rounding to the dtype: check.peer_bars); a wrong one is
reported WRONG, not timed. On CPU,
tiny shapes (B 2, S 300; 4 / 2 heads, D 64 unless --shapes names a preset) smoke-test the
harness only.
"""
import math

import torch
import torch.nn.functional as F

import fastllm
from fastllm import ref
from fastllm.bench import check
from fastllm.bench.suites.attention import fold_sinks, sdpa_peer

COLUMNS = ["impl", "dtype", "shape", "layout", "B", "S", "Hq", "Hkv", "D", "ms", "GB/s", "frac_copy", "ok"]
PLOT = dict(x="S", y="GB/s", series=("impl", "layout", "dtype", "shape", "B"))

SEQLENS = [1024, 4096, 16384, 65536, 131072]
BATCHES = [1, 4, 16, 64]
QUICK_SEQLENS = [1024, 16384, 131072]
QUICK_BATCHES = [1, 16, 64]
#: --shapes name -> (query heads, kv heads, head dim)
PRESETS = {"llama3-8b": (32, 8, 128), "llama3-70b": (64, 8, 128), "mistral-7b": (32, 8, 128),
           "qwen2.5-7b": (28, 4, 128), "gpt-oss": (64, 8, 64)}
#: Presets with attention sinks (gpt-oss: a learned logit per query head).
SINK_PRESETS = ("gpt-oss",)
#: Page sizes of the paged copies (fastllm: any size; flash-attn: multiples of 256).
PAGES = (16, 256)
MAX_KV_BYTES = 12 * 2 ** 30


def _peers(dev, missing):
    """name -> prepare(q, k, v, lens, sinks, paged) -> {layout: timed no-argument call}; paged:
    page size -> (k pages, v pages, block table). prepare runs once per shape, not timed."""
    def sdpa(q, k, v, lens, sinks, paged):   # sinks: one more key, its mask column
        return {"dense": sdpa_peer(q, k, v, False, None, 0, sinks)}
    peers = {"sdpa" if dev.type == "cuda" else "sdpa-math-cpu": sdpa}
    missing.append(("sdpa (paged layouts)", "SDPA takes no paged cache: timed on the dense one only"))
    if dev.type != "cuda":
        missing.append(("flash-attn flash_attn_with_kvcache", "needs a CUDA GPU"))
        return peers
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError as e:
        missing.append(("flash-attn flash_attn_with_kvcache", f"not importable ({e.__class__.__name__})"))
        return peers

    def flash(q, k, v, lens, sinks, paged):
        # flash-attn wants (B, S, H, D) caches (its own copy, made once per shape) or pages of a
        # multiple of 256 keys in the layout fastllm's paged caches have.
        qt = q.transpose(1, 2)

        def call(kc, vc, **kw):
            if sinks is None:
                return lambda: flash_attn_with_kvcache(qt, kc, vc, cache_seqlens=lens, **kw)
            return lambda: fold_sinks(*flash_attn_with_kvcache(qt, kc, vc, cache_seqlens=lens,
                                                               return_softmax_lse=True, **kw), sinks)
        out = {"bshd": call(k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous())}
        for page, (kp, vp, table) in paged.items():
            if page % 256 == 0:
                out[f"paged{page}"] = call(kp, vp, block_table=table)
        return out
    peers["flash-attn"] = flash
    missing += [(f"flash-attn (paged{p})", "flash_attn_with_kvcache takes pages of a multiple of 256 keys")
                for p in PAGES if p % 256]
    return peers


def _reference(q, k, v, lens, sinks=None):
    """fp32 reference of every sequence, built one sequence at a time (a 128k-key fp32 copy of
    one sequence's K/V, not of the whole batch)."""
    return torch.cat([ref.decode_attention(q[b:b + 1].float(), k[b:b + 1].float(), v[b:b + 1].float(),
                                           cache_seqlens=lens[b:b + 1], sinks=sinks)[0] for b in range(q.shape[0])])


def run(ctx):
    dev = ctx.device
    if dev.type == "cpu":
        grid = [(2, 300)]
        heads = [(n, *PRESETS[n]) for n in ctx.shapes] if ctx.shapes else [("tiny", 4, 2, 64)]
    else:
        grid = [(b, s) for b in (QUICK_BATCHES if ctx.quick else BATCHES)
                for s in (QUICK_SEQLENS if ctx.quick else SEQLENS)]
        heads = [(n, *PRESETS[n]) for n in ctx.shapes or ["llama3-8b"]]
    peers = _peers(dev, ctx.missing)
    op = fastllm.ops.OPS["decode_attention"]
    copy_gbs = ctx.peaks.get("copy_gbs")
    rows = ctx.rows()   # kept by ctx: an interrupted run saves them
    for dtype in ctx.dtypes:
        esize = torch.finfo(dtype).bits // 8
        for shape, hq, hkv, d in heads:
            for B, S in ctx.progress(grid, f"decode {shape} {dtype}"):
                rows += _one(ctx, op, peers, dtype, esize, shape, hq, hkv, d, B, S, copy_gbs)
    return rows


def _paged(k, v, page):
    """(k pages, v pages, block table): the (B, Hkv, S, D) caches cut into pages of `page` keys
    (the last one zero-padded) stored in a shuffled order, as a paged allocator leaves them."""
    B, hkv, S, d = k.shape
    n_pages = B * (-(-S // page))
    perm = torch.randperm(n_pages, device=k.device)

    def cut(t):
        pages = F.pad(t.transpose(1, 2), (0, 0, 0, 0, 0, -S % page)).reshape(n_pages, page, hkv, d)
        out = torch.empty_like(pages)
        out[perm] = pages
        return out
    return cut(k), cut(v), perm.reshape(B, -1).to(torch.int32)


def _one(ctx, op, peers, dtype, esize, shape, hq, hkv, d, B, S, copy_gbs):
    dev = ctx.device
    nbytes = 2 * B * hkv * S * d * esize
    if nbytes > MAX_KV_BYTES:
        ctx.missing.append((f"{shape} B={B} S={S}",
                            f"K/V {nbytes / 2 ** 30:.0f} GiB > {MAX_KV_BYTES / 2 ** 30:.0f} GiB"))
        return []
    q = torch.randn(B, 1, hq, d, device=dev, dtype=dtype).transpose(1, 2)   # transformers' view
    k = torch.randn(B, hkv, S, d, device=dev, dtype=dtype)
    v = torch.randn(B, hkv, S, d, device=dev, dtype=dtype)
    lens = torch.full((B,), S, dtype=torch.int32, device=dev)
    # Sinks around ln(S), so they hold about half of each row's weight (against S random keys a
    # small sink is lost in rounding: dropping it would pass the check); exact in the dtype, so
    # SDPA (which takes them through a 16-bit mask) gets the same ones.
    sinks = None
    if shape in SINK_PRESETS:
        sinks = (torch.randn(hq, device=dev) + math.log(S)).to(dtype).float()
    want = _reference(q, k, v, lens, sinks)
    paged = {page: _paged(k, v, page) for page in PAGES}
    scale = 1 / math.sqrt(d)
    impls = {}
    for layout, (kc, vc, table) in [("dense", (k, v, None))] + [(f"paged{n}", p) for n, p in paged.items()]:
        for b in ctx.backends(op, dev, q, kc, vc, lens, table, None, scale, 0, 0.0, 0, sinks):
            impls[(f"fastllm-{b}", layout)] = (lambda b=b, kc=kc, vc=vc, table=table: fastllm.ops.decode_attention(
                q, kc, vc, cache_seqlens=lens, block_table=table, sinks=sinks, backend=b))
    for name, prepare in peers.items():
        try:
            calls = prepare(q, k, v, lens, sinks, paged)
        except Exception as e:  # noqa: BLE001 - a peer that cannot be set up is listed, the run goes on
            ctx.impl_raised(name, f"{shape} B={B} S={S} {dtype}", e)
            continue
        impls.update({(name, layout): fn for layout, fn in calls.items()})
    errs = {}
    for key, fn in impls.items():
        try:
            got = fn()
        except Exception as e:  # noqa: BLE001 - Triton errors (CompilationError, OutOfResources) are not RuntimeErrors
            ctx.impl_raised(key[0], f"{shape} B={B} S={S} {dtype}", e)
            continue
        errs[key] = check.max_abs_err(got, want)
        del got
    # The best other implementation's error sets each bar (not the same kernel in another layout).
    bars = check.peer_bars(errs, check.rounding_err(want, dtype), impl_of=lambda key: key[0])
    rows = []
    for key, err in errs.items():
        ok, status = check.verdict(err, bars[key])
        t = ctx.timer(impls[key]) if ok else None
        gbs = t and nbytes / t / 1e9
        rows.append(dict(impl=key[0], layout=key[1], dtype=str(dtype).replace("torch.", ""), shape=shape, B=B, S=S,
                         Hq=hq, Hkv=hkv, D=d, ms=t and t * 1e3, **{"GB/s": gbs},
                         frac_copy=gbs and copy_gbs and gbs / copy_gbs, max_err=err, ok=status))
    return rows
