"""Prefill flash attention: TFLOP/s of fastllm's backends vs every PyTorch SDPA backend
(flash, efficient, cuDNN) and flash-attn (if importable), in the same run.

Shapes (--shapes, default fa2): "fa2" follows FlashAttention's own benchmark: batch x seqlen =
16k tokens, hidden 2048 (heads = 2048 / D), seqlen 512..16k, D in {64, 128, 256}; the model
presets (llama3-8b, llama3-70b, mistral-7b, qwen2.5-7b) use that model's query / kv heads (GQA)
and head dim 128 over the same seqlens. "bias-d64" / "bias-d128" add a per-head (1, H, S, S)
additive score bias (a relative-position table: BEiT, Swin) at hidden 2048, seqlen 512..4k (the
table is H * S^2 elements), against the SDPA backends that take a float attn_mask (efficient,
cuDNN; flash and flash-attn take none). Causal and not, bf16 / fp16. On CPU: one tiny shape
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
           "qwen2.5-7b": (28, 4, 128), "bias-d64": (32, 32, 64), "bias-d128": (16, 16, 128)}
#: Presets timed with a (1, H, S, S) score bias, on seqlens up to BIAS_MAX_S.
BIAS_PRESETS = ("bias-d64", "bias-d128")
BIAS_MAX_S = 4096


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
            lens = [256] if cpu else [s for s in seqlens if name not in BIAS_PRESETS or s <= BIAS_MAX_S]
            out += [(name, hq, hkv, d, s) for s in lens]
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

        def call(q, k, v, causal, bias=None, be=be):
            with sdpa_kernel([be]):
                return _sdpa(q, k, v, causal, bias)
        out[name] = call
    return out


def _sdpa(q, k, v, causal, bias=None):
    """PyTorch SDPA in the (B, S, H, D) output layout; a bias goes in as a float attn_mask (with
    causal, the causal -inf added to it: SDPA takes is_causal or a mask, not both)."""
    if bias is not None and causal:
        S, T = q.shape[2], k.shape[2]
        tri = torch.ones(S, T, dtype=torch.bool, device=q.device).tril(T - S)
        bias = bias.masked_fill(~tri, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=causal and bias is None,
                                          enable_gqa=q.shape[1] != k.shape[1]).transpose(1, 2)


def _flash_attn(missing):
    try:
        from flash_attn import flash_attn_func
    except ImportError as e:
        missing.append(("flash-attn", f"not importable ({e.__class__.__name__})"))
        return {}
    return {"flash-attn": lambda q, k, v, causal, bias=None: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2),
                                                                             v.transpose(1, 2), causal=causal)}

#: Peers that take no arbitrary score bias (not timed on the bias presets).
NO_BIAS = {"sdpa-flash": "SDPA's flash backend takes no attn_mask", "flash-attn": "flash-attn takes no score bias"}


def run(ctx):
    dev = ctx.device
    peers = {}
    if dev.type == "cuda":
        peers.update(_sdpa_backends(ctx.missing))
        peers.update(_flash_attn(ctx.missing))
    else:
        for name in ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "flash-attn"):
            ctx.missing.append((name, "needs a CUDA GPU (CPU run: sdpa-math-cpu is the PyTorch peer)"))
        peers["sdpa-math-cpu"] = _sdpa
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
                bias = (torch.randn(1, H, S, S, device=dev) * 2).to(dtype) if shape in BIAS_PRESETS else None
                want = check.attention_reference(q, k, v, causal, bias)
                flops = 4 * B * H * S * S * D / (2 if causal else 1)
                impls = {f"fastllm-{b}": (lambda q, k, v, causal, bias, b=b: fastllm.ops.flash_attention(
                    q, k, v, causal=causal, bias=bias, backend=b)) for b in ctx.backends(
                        op, dev, q, k, v, None, causal, 1 / math.sqrt(D), 0, 0.0, None, bias)}
                if "fastllm-cuda" in impls and D % 64 == 0 and hopper_90a(dev):
                    impls["fastllm-cuda-sm80"] = lambda q, k, v, causal, bias: with_env(
                        "FASTLLM_ATTN_WGMMA", "0", fastllm.ops.flash_attention, q, k, v, causal=causal, bias=bias,
                        backend="cuda")
                for name, fn in peers.items():
                    if bias is not None and name in NO_BIAS:
                        ctx.missing.append((f"{name} ({shape})", NO_BIAS[name]))
                    else:
                        impls[name] = fn
                errs = {}
                for name, fn in impls.items():
                    try:
                        got = fn(q, k, v, causal, bias)
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
                    t = ctx.timer(lambda: impls[name](q, k, v, causal, bias)) if ok else None
                    tf = t and flops / t / 1e12
                    rows.append(dict(impl=name, dtype=str(dtype).replace("torch.", ""), shape=shape, D=D,
                                     causal=causal, B=B, H=H, Hkv=Hkv, S=S, ms=t and t * 1e3, **{"TFLOP/s": tf},
                                     frac_peak=tf and peak and tf / peak, max_err=err, ok=status))
                del q, k, v, bias
    return rows
