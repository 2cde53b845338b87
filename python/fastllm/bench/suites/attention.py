"""Prefill flash attention: TFLOP/s of fastllm's backends vs every PyTorch SDPA backend
(flash, efficient, cuDNN) and flash-attn (if importable), in the same run.

Shapes follow FlashAttention's own benchmark: batch x seqlen = 16k tokens, hidden 2048
(heads = 2048 / D), seqlen 512..16k, D in {64, 128, 256}, causal and not, bf16 / fp16.
FLOPs = 4 * B * H * Sq * Skv * D, halved for causal (the work a causal kernel must do).
Every implementation is checked on the same inputs against a float32 reference of the first
(batch, 2 heads) slice before it is timed; a wrong one is reported WRONG, not timed.
On an sm_90 GPU with a 90a build, "fastllm-cuda" is the wgmma kernel and "fastllm-cuda-sm80" the
same call on the mma.sync kernel it replaces there (FASTLLM_ATTN_WGMMA=0).
"""
import math

import torch
import torch.nn.functional as F

import fastllm
from fastllm.bench.switches import hopper_90a, with_env

COLUMNS = ["impl", "dtype", "D", "causal", "B", "H", "S", "ms", "TFLOP/s", "frac_peak", "ok"]
PLOT = dict(x="S", y="TFLOP/s", series="impl")

SEQLENS = [512, 1024, 2048, 4096, 8192, 16384]
QUICK_SEQLENS = [1024, 4096, 16384]
HEAD_DIMS = [64, 128, 256]


def _sdpa_backends(missing):
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        missing.append(("sdpa backends", "torch.nn.attention not available"))
        return {}
    out = {}
    for name, be in (("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION),
                     ("sdpa-cudnn", getattr(SDPBackend, "CUDNN_ATTENTION", None))):
        if be is None:
            missing.append((name, "not in this PyTorch"))
            continue

        def call(q, k, v, causal, be=be):
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2)
        out[name] = call
    return out


def _flash_attn(missing):
    try:
        from flash_attn import flash_attn_func
    except ImportError as e:
        missing.append(("flash-attn", f"not importable ({e.__class__.__name__})"))
        return {}
    return {"flash-attn": lambda q, k, v, causal: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2),
                                                                  v.transpose(1, 2), causal=causal)}


def run(ctx):
    dev = ctx.device
    if dev.type == "cpu":
        shapes = [(64, 512), (128, 256)]
    else:
        shapes = [(d, s) for d in HEAD_DIMS for s in (QUICK_SEQLENS if ctx.quick else SEQLENS)]
    peers = {}
    if dev.type == "cuda":
        peers.update(_sdpa_backends(ctx.missing))
        peers.update(_flash_attn(ctx.missing))
    else:
        peers["sdpa-math-cpu"] = lambda q, k, v, causal: F.scaled_dot_product_attention(
            q, k, v, is_causal=causal).transpose(1, 2)
    rows = []
    op = fastllm.ops.OPS["flash_attention"]
    for dtype in ctx.dtypes:
        for causal in (False, True):
            for D, S in ctx.progress(shapes, f"attention {dtype} causal={causal}"):
                B, H = max(1, 16384 // S) if dev.type == "cuda" else 1, max(1, 2048 // D)
                # (B, S, H, D) buffers viewed as (B, H, S, D): the layout transformers hands over.
                q, k, v = (torch.randn(B, S, H, D, device=dev, dtype=dtype).transpose(1, 2) for _ in range(3))
                sl = (slice(0, 1), slice(0, 2))
                want = F.scaled_dot_product_attention(*(t[sl].float() for t in (q, k, v)),
                                                      is_causal=causal).transpose(1, 2)
                flops = 4 * B * H * S * S * D / (2 if causal else 1)
                impls = {f"fastllm-{b}": (lambda q, k, v, causal, b=b: fastllm.ops.flash_attention(
                    q, k, v, causal=causal, backend=b)) for b in ctx.backends(op, dev, q, k, v, None, causal,
                                                                             1 / math.sqrt(D), 0, 0.0)}
                if "fastllm-cuda" in impls and D % 64 == 0 and hopper_90a(dev):
                    impls["fastllm-cuda-sm80"] = lambda q, k, v, causal: with_env(
                        "FASTLLM_ATTN_WGMMA", "0", fastllm.ops.flash_attention, q, k, v, causal=causal, backend="cuda")
                impls.update(peers)
                errs = {}
                for name, fn in impls.items():
                    try:
                        got = fn(q, k, v, causal)
                    except (RuntimeError, NotImplementedError) as e:
                        ctx.missing.append((f"{name} D={D} {dtype}", str(e).splitlines()[0][:120]))
                        continue
                    errs[name] = (got[:1, :, :2].float() - want).abs().max().item()
                    del got
                # A peer's own error sets the bar (PyTorch's SDPA in this dtype); 3x and a floor.
                bar = 3 * min(errs.values()) + 2e-3 if errs else 0
                for name, err in errs.items():
                    ok = err <= bar and math.isfinite(err)
                    t = ctx.timer(lambda: impls[name](q, k, v, causal)) if ok else None
                    tf = t and flops / t / 1e12
                    peak = ctx.peaks.get("matmul_bf16_tflops") or ctx.peaks.get("matmul_fp32_tflops")
                    rows.append(dict(impl=name, dtype=str(dtype).replace("torch.", ""), D=D, causal=causal, B=B,
                                     H=H, S=S, ms=t and t * 1e3, **{"TFLOP/s": tf},
                                     frac_peak=tf and peak and tf / peak, max_err=err,
                                     ok="yes" if ok else f"WRONG (err {err:.3g} > {bar:.3g})"))
                del q, k, v
    return rows
