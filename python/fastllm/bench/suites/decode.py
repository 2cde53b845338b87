"""Decode attention against a KV cache: achieved GB/s of fastllm's backends vs PyTorch SDPA and
flash-attn's flash_attn_with_kvcache (if importable), in the same run.

One new query per sequence (Sq = 1) against a full cache of S keys, Llama-3-8B heads (32 query
heads, 8 kv heads, D 128), S 1k..128k, batch 1..64; contiguous (B, Hkv, S, D) caches (the
layout transformers' caches hold) and, for fastllm, the same cache in pages of 16 keys.
Bytes = the K and V bytes a decode step must read (2 * B * Hkv * S * D * element size);
GB/s = bytes / time; frac_copy = GB/s over the device-to-device copy bandwidth measured at the
start of the run (copy_gbs: bytes read + written per second, the practical HBM ceiling).
Shapes whose K/V would exceed MAX_KV_BYTES are skipped. Every implementation is checked
against the float32 reference on the first sequence before it is timed; a wrong one is
reported WRONG, not timed. On CPU, tiny shapes smoke-test the harness only.
"""
import math

import torch
import torch.nn.functional as F

import fastllm
from fastllm import ref

COLUMNS = ["impl", "dtype", "layout", "B", "S", "Hq", "Hkv", "D", "ms", "GB/s", "frac_copy", "ok"]
PLOT = dict(x="S", y="GB/s", series="impl")

SEQLENS = [1024, 4096, 16384, 65536, 131072]
BATCHES = [1, 4, 16, 64]
QUICK_SEQLENS = [1024, 16384, 131072]
QUICK_BATCHES = [1, 16, 64]
HQ, HKV, D = 32, 8, 128
PAGE = 16
MAX_KV_BYTES = 12 * 2 ** 30


def _peers(dev, missing):
    peers = {}

    def sdpa(q, k, v, lens):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True).transpose(1, 2)
    peers["sdpa" if dev.type == "cuda" else "sdpa-math-cpu"] = sdpa
    if dev.type == "cuda":
        try:
            from flash_attn import flash_attn_with_kvcache
        except ImportError as e:
            missing.append(("flash-attn flash_attn_with_kvcache", f"not importable ({e.__class__.__name__})"))
        else:
            # flash-attn wants (B, S, H, D) caches: its own copy, made once per shape (untimed).
            peers["flash-attn"] = ("bshd", lambda q, kb, vb, lens: flash_attn_with_kvcache(
                q.transpose(1, 2), kb, vb, cache_seqlens=lens))
    return peers


def run(ctx):
    dev = ctx.device
    if dev.type == "cpu":
        grid, hq, hkv, d = [(2, 300)], 4, 2, 64
    else:
        grid = [(b, s) for b in (QUICK_BATCHES if ctx.quick else BATCHES)
                for s in (QUICK_SEQLENS if ctx.quick else SEQLENS)]
        hq, hkv, d = HQ, HKV, D
    peers = _peers(dev, ctx.missing)
    op = fastllm.ops.OPS["decode_attention"]
    copy_gbs = ctx.peaks.get("copy_gbs")
    rows = []
    for dtype in ctx.dtypes:
        esize = torch.finfo(dtype).bits // 8
        for B, S in ctx.progress(grid, f"decode {dtype}"):
            nbytes = 2 * B * hkv * S * d * esize
            if nbytes > MAX_KV_BYTES:
                ctx.missing.append((f"B={B} S={S}", f"K/V {nbytes / 2 ** 30:.0f} GiB > {MAX_KV_BYTES / 2 ** 30:.0f} GiB"))
                continue
            q = torch.randn(B, 1, hq, d, device=dev, dtype=dtype).transpose(1, 2)   # transformers' view
            k = torch.randn(B, hkv, S, d, device=dev, dtype=dtype)
            v = torch.randn(B, hkv, S, d, device=dev, dtype=dtype)
            lens = torch.full((B,), S, dtype=torch.int32, device=dev)
            want = ref.decode_attention(q[:1].float(), k[:1].float(), v[:1].float(), cache_seqlens=lens[:1])[0]
            # Paged copy for fastllm: pages of PAGE keys, in a shuffled order.
            n_pages = B * (-(-S // PAGE))
            perm = torch.randperm(n_pages, device=dev)
            table = perm.reshape(B, -1).to(torch.int32)

            def paged(t):
                pages = F.pad(t.transpose(1, 2), (0, 0, 0, 0, 0, -S % PAGE)).reshape(n_pages, PAGE, hkv, d)
                out = torch.empty_like(pages)
                out[perm] = pages
                return out

            impls = {}
            for b in ctx.backends(op, dev, q, k, v, lens, None, None, 1 / math.sqrt(d), 0, 0.0, 0):
                impls[(f"fastllm-{b}", "dense")] = (lambda b=b: fastllm.ops.decode_attention(
                    q, k, v, cache_seqlens=lens, backend=b))
            kp = vp = None
            if impls:
                kp, vp = paged(k), paged(v)
                for b in ctx.backends(op, dev, q, kp, vp, lens, table, None, 1 / math.sqrt(d), 0, 0.0, 0):
                    impls[(f"fastllm-{b}", f"paged{PAGE}")] = (lambda b=b: fastllm.ops.decode_attention(
                        q, kp, vp, cache_seqlens=lens, block_table=table, backend=b))
            for name, fn in peers.items():
                if isinstance(fn, tuple):    # flash-attn: (B, S, H, D) caches
                    kb, vb = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
                    impls[(name, "bshd")] = (lambda fn=fn[1], kb=kb, vb=vb: fn(q, kb, vb, lens))
                else:
                    impls[(name, "dense")] = (lambda fn=fn: fn(q, k, v, lens))
            errs = {}
            for key, fn in impls.items():
                try:
                    got = fn()
                except (RuntimeError, NotImplementedError, ValueError) as e:
                    ctx.missing.append((f"{key[0]} B={B} S={S} {dtype}", str(e).splitlines()[0][:120]))
                    continue
                errs[key] = (got[:1].float() - want).abs().max().item()
                del got
            bar = 3 * min(errs.values()) + 2e-3 if errs else 0   # the best peer's error sets the bar
            for key, err in errs.items():
                ok = err <= bar and math.isfinite(err)
                t = ctx.timer(impls[key]) if ok else None
                gbs = t and nbytes / t / 1e9
                rows.append(dict(impl=key[0], layout=key[1], dtype=str(dtype).replace("torch.", ""), B=B, S=S,
                                 Hq=hq, Hkv=hkv, D=d, ms=t and t * 1e3, **{"GB/s": gbs},
                                 frac_copy=gbs and copy_gbs and gbs / copy_gbs, max_err=err,
                                 ok="yes" if ok else f"WRONG (err {err:.3g} > {bar:.3g})"))
            del q, k, v, kp, vp, impls
    return rows
