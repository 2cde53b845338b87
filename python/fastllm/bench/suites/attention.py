"""Prefill flash attention: TFLOP/s of fastllm's backends vs every PyTorch SDPA backend
(flash, efficient, cuDNN) and flash-attn (if importable), in the same run.

Shapes (--shapes, default fa2): "fa2" follows FlashAttention's own benchmark: batch x seqlen =
16k tokens, hidden 2048 (heads = 2048 / D), seqlen 512..16k, D in {64, 128, 256}; the model
presets (llama3-8b, llama3-70b, mistral-7b, qwen2.5-7b) use that model's query / kv heads (GQA)
and head dim 128 over the same seqlens. Causal and not, bf16 / fp16. On CPU: one tiny shape
each (S 256..512, batch 1). FLOPs = 4 * B * Hq * Sq * Skv * D, halved for causal (the work a
causal kernel must do). Every implementation is checked on the same inputs against a float32
reference of the whole output (fastllm's reference, computed on query-row pieces) before it is
timed: its max error must be finite and within 3x the best implementation's (+ 2e-3); a wrong
one is reported WRONG, not timed.
On an sm_90 GPU with a 90a build, "fastllm-cuda" is the wgmma kernel and "fastllm-cuda-sm80" the
same call on the mma.sync kernel it replaces there (FASTLLM_ATTN_WGMMA=0).
"""
import math

import torch
import torch.nn.functional as F

import fastllm
from fastllm.bench import check
from fastllm.bench.switches import hopper_90a, with_env

COLUMNS = ["impl", "dtype", "shape", "D", "causal", "B", "H", "Hkv", "S", "ms", "TFLOP/s", "frac_peak", "ok"]
PLOT = dict(x="S", y="TFLOP/s", series=("impl", "dtype", "shape", "D", "causal"))

SEQLENS = [512, 1024, 2048, 4096, 8192, 16384]
QUICK_SEQLENS = [1024, 4096, 16384]
HEAD_DIMS = [64, 128, 256]
#: --shapes name -> (query heads, kv heads, head dim); "fa2": FlashAttention's grid (see above).
PRESETS = {"fa2": None, "llama3-8b": (32, 8, 128), "llama3-70b": (64, 8, 128), "mistral-7b": (32, 8, 128),
           "qwen2.5-7b": (28, 4, 128)}


def _shapes(ctx):
    """[(preset, Hq, Hkv, D, S)]."""
    cpu = ctx.device.type == "cpu"
    seqlens = QUICK_SEQLENS if ctx.quick else SEQLENS
    out = []
    for name in ctx.shapes or ["fa2"]:
        if PRESETS[name] is None:
            dims = [(64, 512), (128, 256)] if cpu else [(d, s) for d in HEAD_DIMS for s in seqlens]
            out += [(name, 2048 // d, 2048 // d, d, s) for d, s in dims]
        else:
            hq, hkv, d = PRESETS[name]
            out += [(name, hq, hkv, d, s) for s in ([256] if cpu else seqlens)]
    return out


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
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                      enable_gqa=q.shape[1] != k.shape[1]).transpose(1, 2)
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
    peers = {}
    if dev.type == "cuda":
        peers.update(_sdpa_backends(ctx.missing))
        peers.update(_flash_attn(ctx.missing))
    else:
        for name in ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "flash-attn"):
            ctx.missing.append((name, "needs a CUDA GPU (CPU run: sdpa-math-cpu is the PyTorch peer)"))
        peers["sdpa-math-cpu"] = lambda q, k, v, causal: F.scaled_dot_product_attention(
            q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1]).transpose(1, 2)
    rows = []
    op = fastllm.ops.OPS["flash_attention"]
    for dtype in ctx.dtypes:
        peak = ctx.matmul_peak(dtype)
        for causal in (False, True):
            for shape, H, Hkv, D, S in ctx.progress(_shapes(ctx), f"attention {dtype} causal={causal}"):
                B = max(1, 16384 // S) if dev.type == "cuda" else 1
                # (B, S, H, D) buffers viewed as (B, H, S, D): the layout transformers hands over.
                q = torch.randn(B, S, H, D, device=dev, dtype=dtype).transpose(1, 2)
                k, v = (torch.randn(B, S, Hkv, D, device=dev, dtype=dtype).transpose(1, 2) for _ in range(2))
                want = check.attention_reference(q, k, v, causal)
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
                    except Exception as e:  # noqa: BLE001 - Triton errors (CompilationError, OutOfResources) are not RuntimeErrors
                        ctx.impl_raised(name, f"{shape} D={D} {dtype}", e)
                        continue
                    errs[name] = check.max_abs_err(got, want)
                    del got
                del want
                # A peer's own error sets the bar (PyTorch's SDPA in this dtype); 3x and a floor.
                bar = check.peer_bar(errs)
                for name, err in errs.items():
                    ok, status = check.verdict(err, bar)
                    t = ctx.timer(lambda: impls[name](q, k, v, causal)) if ok else None
                    tf = t and flops / t / 1e12
                    rows.append(dict(impl=name, dtype=str(dtype).replace("torch.", ""), shape=shape, D=D,
                                     causal=causal, B=B, H=H, Hkv=Hkv, S=S, ms=t and t * 1e3, **{"TFLOP/s": tf},
                                     frac_peak=tf and peak and tf / peak, max_err=err, ok=status))
                del q, k, v
    return rows
