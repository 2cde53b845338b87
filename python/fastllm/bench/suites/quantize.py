"""Per-token int8 quantization: GB/s (bytes read + written) of each backend vs the copy ceiling.

Shapes: activations of real models (--shapes: hidden size and MLP width of llama3-8b,
llama3-70b, mistral-7b, qwen2.5-7b; default llama3-8b,llama3-70b) at decode and prefill token
counts; on CPU three fixed tiny shapes (--shapes is not used there, the report says so). Each
backend's q and scales must equal the reference's bit for bit over the whole output, or it is
WRONG, not timed. The op is memory bound: x read once (the kernels re-read it from L2), q and
scales written once.
"""
import torch

import fastllm
from fastllm import ref

COLUMNS = ["impl", "dtype", "M", "K", "ms", "GB/s", "frac_copy_peak", "ok"]
PLOT = dict(x="M", y="GB/s", series=("impl", "dtype", "K"))

SHAPES = {"llama3-8b": [4096, 14336], "llama3-70b": [8192, 28672], "mistral-7b": [4096, 14336],
          "qwen2.5-7b": [3584, 18944]}
PRESETS = SHAPES
DEFAULT_PRESETS = ["llama3-8b", "llama3-70b"]
TOKENS = [1, 16, 512, 4096, 16384]
QUICK_TOKENS = [1, 512, 4096]
CPU_SHAPES = [(1, 4096), (64, 4096), (512, 4096)]


def run(ctx):
    dev = ctx.device
    dtypes = ctx.dtypes
    # dict.fromkeys: presets sharing a width (llama3-8b, mistral-7b) measure it once.
    shapes = CPU_SHAPES if dev.type == "cpu" else list(dict.fromkeys(
        (m, k) for ks in (SHAPES[s] for s in ctx.shapes or DEFAULT_PRESETS) for k in ks
        for m in (QUICK_TOKENS if ctx.quick else TOKENS)))
    if dev.type == "cpu" and ctx.shapes:
        ctx.note("quantize: on CPU the suite runs its fixed tiny shapes; --shapes is not used")
    rows = ctx.rows()   # kept by ctx: an interrupted run saves them
    for dtype in dtypes:
        for M, K in ctx.progress(shapes, f"quantize {dtype}"):
            x = torch.randn(M, K, device=dev, dtype=dtype) * 3
            want = ref.quantize_per_token(x)
            nbytes = x.numel() * x.element_size() + M * K + 4 * M
            for impl in ctx.backends(fastllm.ops.OPS["quantize_per_token"], x.device, x):
                fn = lambda: fastllm.ops.quantize_per_token(x, backend=impl)  # noqa: E731
                try:
                    got = fn()
                except Exception as e:  # noqa: BLE001 - Triton errors are not RuntimeErrors; the others go on
                    ctx.impl_raised(f"fastllm-{impl}", f"quantize M={M} K={K} {dtype}", e)
                    continue
                ok = torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
                t = ctx.timer(fn) if ok else None
                rows.append(dict(impl=f"fastllm-{impl}", dtype=str(dtype).replace("torch.", ""), M=M, K=K,
                                 ms=t and t * 1e3, **{"GB/s": t and nbytes / t / 1e9},
                                 frac_copy_peak=t and nbytes / t / 1e9 / ctx.peaks["copy_gbs"],
                                 ok="yes" if ok else "WRONG"))
    return rows
