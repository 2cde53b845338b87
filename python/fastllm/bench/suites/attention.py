"""Prefill flash attention: TFLOP/s of fastllm's backends vs every PyTorch SDPA backend
(flash, efficient, cuDNN) and flash-attn (if importable), in the same run.

Shapes (--shapes, default fa2): "fa2" follows FlashAttention's own benchmark: batch x seqlen =
16k tokens, hidden 2048 (heads = 2048 / D), seqlen 512..16k, D in {64, 128, 256}; the model
presets (llama3-8b, llama3-70b, mistral-7b, qwen2.5-7b) use that model's query / kv heads (GQA)
and head dim 128 over the same seqlens. "bias-d64" / "bias-d128" add a per-head (1, H, S, S)
additive score bias (a relative-position table: BEiT, Swin) at hidden 2048, seqlen 512..4k (the
table is H * S^2 elements), against the SDPA backends that take a float attn_mask (efficient,
cuDNN; flash and flash-attn take none). "gpt-oss" (20b and 120b share it: 64 query / 8 kv
heads, D 64) times its two layer kinds, causal only: full attention and a 128-key sliding window,
both with a learned sink logit per head. Its peers get the sinks the way they can: SDPA efficient
/ cuDNN as one extra zero key whose float attn_mask column holds the sink (causal and window
merged into that mask; S up to 4k), flash-attn (window_size) with its returned lse and the
epilogue out * sigmoid(lse - sink). Peer inputs (masks, padded K/V; for SDPA efficient, which
takes no GQA, K/V repeated per query head) are built once per shape, outside the timed call.
Causal and not, bf16 / fp16. On CPU: one tiny shape each (S 256..512, batch 1). FLOPs = 4 * B *
Hq * D * (query, key) pairs computed: Sq * Skv, halved for causal (the work a causal kernel must
do), the sum of min(i + 1, W) over the rows with a window. Every implementation is checked on
the same inputs against a float32 reference of the whole output (fastllm's reference, computed on
query-row pieces) before it is timed: its max error must be finite and within 3x the best other
implementation's (+ 2e-3; alone, 16x the reference's rounding to the dtype: check.peer_bars); a
wrong one is reported WRONG, not timed.
On an sm_90 GPU with a 90a build, "fastllm-cuda" is the wgmma kernel and "fastllm-cuda-sm80" the
same call on the mma.sync kernel it replaces there (FASTLLM_ATTN_WGMMA=0).
"""
import math

import torch
import torch.nn.functional as F

import fastllm
from fastllm import ref
from fastllm.bench import check
from fastllm.bench.switches import hopper_90a, with_env

COLUMNS = ["impl", "dtype", "shape", "D", "causal", "window", "B", "H", "Hkv", "S", "ms", "TFLOP/s", "frac_peak",
           "ok"]
PLOT = dict(x="S", y="TFLOP/s", series=("impl", "dtype", "shape", "D", "causal", "window"))

SEQLENS = [512, 1024, 2048, 4096, 8192, 16384]
QUICK_SEQLENS = [1024, 4096, 16384]
HEAD_DIMS = [64, 128, 256]
#: --shapes name -> (query heads, kv heads, head dim); "fa2": FlashAttention's grid (see above).
PRESETS = {"fa2": None, "llama3-8b": (32, 8, 128), "llama3-70b": (64, 8, 128), "mistral-7b": (32, 8, 128),
           "qwen2.5-7b": (28, 4, 128), "bias-d64": (32, 32, 64), "bias-d128": (16, 16, 128),
           "gpt-oss": (64, 8, 64)}
#: Presets timed with a (1, H, S, S) score bias, on seqlens up to BIAS_MAX_S.
BIAS_PRESETS = ("bias-d64", "bias-d128")
BIAS_MAX_S = 4096
#: Presets with attention sinks (causal only) -> the sliding window of their windowed layers.
SINK_PRESETS = {"gpt-oss": 128}


def _shapes(ctx):
    """[(preset, Hq, Hkv, D, S, window)] (window 0: none)."""
    cpu = ctx.device.type == "cpu"
    seqlens = QUICK_SEQLENS if ctx.quick else SEQLENS
    out = []
    for name in ctx.shapes or ["fa2"]:
        if PRESETS[name] is None:
            dims = [(64, 512), (128, 256)] if cpu else [(d, s) for d in HEAD_DIMS for s in seqlens]
            out += [(name, 2048 // d, 2048 // d, d, s, 0) for d, s in dims]
        else:
            hq, hkv, d = PRESETS[name]
            lens = [256] if cpu else [s for s in seqlens if name not in BIAS_PRESETS or s <= BIAS_MAX_S]
            windows = (0, SINK_PRESETS[name]) if name in SINK_PRESETS else (0,)
            out += [(name, hq, hkv, d, s, w) for w in windows for s in lens]
    return out


def pairs(S, causal, window):
    """(query, key) pairs a kernel must compute for Sq = Skv = S: S^2; causal S^2 / 2
    (FlashAttention's convention); with a window W, row i sees min(i + 1, W) keys."""
    if window > 0 and causal:
        w = min(window, S)
        return w * (w + 1) / 2 + (S - w) * w
    return S * S / (2 if causal else 1)


#: Keys appended for the SDPA sink column: one zero key carries the sink, the rest are masked
#: (so each mask row is a multiple of 8 elements, the alignment SDPA would otherwise pad to per call).
SINK_PAD = 8


def sdpa_inputs(q, k, v, causal, bias=None, window=0, sinks=None):
    """(q, k, v, attn_mask, is_causal) for SDPA, built once per shape (not timed). A bias, window
    or sinks go in as a float attn_mask in q's dtype with causality merged in (SDPA takes
    is_causal or a mask, not both); sinks as one extra zero key whose mask column holds the sink
    (K/V padded by SINK_PAD keys, the others masked out)."""
    if bias is None and not window and sinks is None:
        return q, k, v, None, causal
    S, T, H = q.shape[2], k.shape[2], q.shape[1]
    allowed = ref.attention.allowed_keys(S, T, causal=causal, window=window, device=q.device)
    base = torch.zeros(1, 1, S, T, device=q.device, dtype=q.dtype) if bias is None else bias
    mask = base.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        pad = torch.full((1, H, S, SINK_PAD), float("-inf"), device=q.device, dtype=q.dtype)
        pad[..., 0] = sinks.to(q.dtype).view(1, H, 1)
        mask = torch.cat([mask.expand(-1, H, -1, -1), pad], dim=-1)
        k, v = (F.pad(t, (0, 0, 0, SINK_PAD)) for t in (k, v))
    return q, k, v, mask, False


def _sdpa(q, k, v, mask, causal):
    """PyTorch SDPA in the (B, S, H, D) output layout."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                          enable_gqa=q.shape[1] != k.shape[1]).transpose(1, 2)


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

        def prepare(q, k, v, causal, bias, window, sinks, be=be, name=name):
            if name == "sdpa-flash" and (bias is not None or window or sinks is not None):
                return "SDPA's flash backend takes no attn_mask (bias, window, sinks)"
            if name != "sdpa-flash" and (sinks is not None or window) and q.shape[2] > BIAS_MAX_S:
                return f"its float mask (H x S^2 elements) is built up to S = {BIAS_MAX_S}"
            args = sdpa_inputs(q, k, v, causal, bias, window, sinks)
            if name == "sdpa-efficient" and q.shape[1] != k.shape[1]:
                # Its kernel takes no GQA (it would fall to math): K/V repeated per query head, once.
                group = q.shape[1] // k.shape[1]
                args = (args[0], *(t.repeat_interleave(group, dim=1) for t in args[1:3]), *args[3:])

            def call():
                with sdpa_kernel([be]):
                    return _sdpa(*args)
            return call
        out[name] = prepare
    return out


def sdpa_peer(q, k, v, causal, bias, window, sinks):
    """SDPA with its own dispatch (the CPU peer; decode's peer on every device): inputs built now,
    the returned call timed."""
    args = sdpa_inputs(q, k, v, causal, bias, window, sinks)
    return lambda: _sdpa(*args)


def fold_sinks(out, lse, sinks):
    """A sink joined after the fact, from a kernel's lse: out (B, S, H, D) * sigmoid(lse - sink)
    (lse (B, H, S): the sink's exp(z) joins the denominator, the value sum is unchanged)."""
    return out * torch.sigmoid(lse - sinks.view(1, -1, 1)).transpose(1, 2).unsqueeze(-1).to(out.dtype)


def _flash_attn(missing):
    try:
        from flash_attn import flash_attn_func
    except ImportError as e:
        missing.append(("flash-attn", f"not importable ({e.__class__.__name__})"))
        return {}

    def prepare(q, k, v, causal, bias, window, sinks):
        if bias is not None:
            return "flash-attn takes no score bias"
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        win = (window - 1, 0) if window else (-1, -1)
        if sinks is None:
            return lambda: flash_attn_func(qt, kt, vt, causal=causal, window_size=win)

        def call():
            out, lse, _ = flash_attn_func(qt, kt, vt, causal=causal, window_size=win, return_attn_probs=True)
            return fold_sinks(out, lse, sinks)
        return call
    return {"flash-attn": prepare}


def run(ctx):
    dev = ctx.device
    peers = {}
    if dev.type == "cuda":
        peers.update(_sdpa_backends(ctx.missing))
        peers.update(_flash_attn(ctx.missing))
    else:
        for name in ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "flash-attn"):
            ctx.missing.append((name, "needs a CUDA GPU (CPU run: sdpa-math-cpu is the PyTorch peer)"))
        peers["sdpa-math-cpu"] = sdpa_peer
    rows = ctx.rows()   # kept by ctx: an interrupted run saves them
    op = fastllm.ops.OPS["flash_attention"]
    for dtype in ctx.dtypes:
        peak = ctx.matmul_peak(dtype)
        for causal in (False, True):
            shapes = [s for s in _shapes(ctx) if causal or s[0] not in SINK_PRESETS]
            for shape, H, Hkv, D, S, W in ctx.progress(shapes, f"attention {dtype} causal={causal}"):
                rows += _one(ctx, op, peers, peak, dtype, causal, shape, H, Hkv, D, S, W)
    return rows


def _one(ctx, op, peers, peak, dtype, causal, shape, H, Hkv, D, S, W):
    dev = ctx.device
    B = max(1, 16384 // S) if dev.type == "cuda" else 1
    # (B, S, H, D) buffers viewed as (B, H, S, D): the layout transformers hands over.
    q = torch.randn(B, S, H, D, device=dev, dtype=dtype).transpose(1, 2)
    k, v = (torch.randn(B, S, Hkv, D, device=dev, dtype=dtype).transpose(1, 2) for _ in range(2))
    bias = (torch.randn(1, H, S, S, device=dev) * 2).to(dtype) if shape in BIAS_PRESETS else None
    # Sinks exact in the dtype, so the peers that take them through a 16-bit mask get the same ones.
    sinks = (torch.randn(H, device=dev) * 2).to(dtype).float() if shape in SINK_PRESETS else None
    want = check.attention_reference(q, k, v, causal, bias, window=W, sinks=sinks)
    flops = 4 * B * H * D * pairs(S, causal, W)
    fl = dict(causal=causal, window=W or None, sinks=sinks, bias=bias)
    impls = {f"fastllm-{b}": (lambda b=b: fastllm.ops.flash_attention(q, k, v, backend=b, **fl)) for b in ctx.backends(
        op, dev, q, k, v, None, causal, 1 / math.sqrt(D), W, 0.0, sinks, bias)}
    if "fastllm-cuda" in impls and D % 64 == 0 and hopper_90a(dev):
        impls["fastllm-cuda-sm80"] = lambda: with_env("FASTLLM_ATTN_WGMMA", "0", fastllm.ops.flash_attention,
                                                      q, k, v, backend="cuda", **fl)
    label = f"{shape} D={D} S={S} {dtype}" + (f" window={W}" if W else "")
    for name, prepare in peers.items():
        try:
            fn = prepare(q, k, v, causal, bias, W, sinks)
        except Exception as e:  # noqa: BLE001 - a peer that cannot be set up is listed, the run goes on
            ctx.impl_raised(name, label, e)
            continue
        if isinstance(fn, str):
            ctx.missing.append((f"{name} ({shape})", fn))
        else:
            impls[name] = fn
    errs = {}
    for name, fn in impls.items():
        try:
            got = fn()
        except Exception as e:  # noqa: BLE001 - Triton errors (CompilationError, OutOfResources) are not RuntimeErrors
            ctx.impl_raised(name, label, e)
            continue
        errs[name] = check.max_abs_err(got, want)
        del got
    # The other implementations' errors set each one's bar (PyTorch's SDPA in this dtype).
    bars = check.peer_bars(errs, check.rounding_err(want, dtype))
    del want
    rows = []
    for name, err in errs.items():
        ok, status = check.verdict(err, bars[name])
        t = ctx.timer(impls[name]) if ok else None
        tf = t and flops / t / 1e12
        rows.append(dict(impl=name, dtype=str(dtype).replace("torch.", ""), shape=shape, D=D, causal=causal,
                         window=W or None, B=B, H=H, Hkv=Hkv, S=S, ms=t and t * 1e3, **{"TFLOP/s": tf},
                         frac_peak=tf and peak and tf / peak, max_err=err, ok=status))
    return rows
