"""2:4 sparse GEMM: dense-equivalent TFLOP/s (2 M N K / t) of fastllm's backends vs dense
torch.matmul and torch.sparse.to_sparse_semi_structured (CUTLASS and cuSPARSELt), same run.

out = x @ W.T with W (N, K) 2:4 along K; x (M, K). Shapes (--shapes, default square and
llama3-8b): square (4096, 8192) and the linear layers of a model (fused qkv, o, fused gate_up,
down) of llama3-8b, llama3-70b, mistral-7b, qwen2.5-7b, M = 1 .. 8192 (decode to prefill); on
CPU fixed tiny shapes (--shapes is not used there, the report says so). speedup = dense matmul
time / this time (the goal on H100: >= 1.5x at large M through mma.sp, >= 1.5x at M <= 16
through the compressed loads). Every implementation is checked over its whole output against
an fp32 product of the decompressed weight before it is timed: its max error must be finite and
within 3x the dense matmul's own error (+ a floor); a wrong one is reported WRONG and not timed.
The int8 variant (2:4 + W8A8, fastllm only) is timed too, with the first dtype: the timed op
(sparse24_int8_matmul, bf16 out) is what is checked, against the exact int32 product scaled in
fp64 (row-wise relative error <= 1e-2: bf16 rounding); its rows give TOPS (column TOPS, not
TFLOP/s) and frac_peak over the measured torch._int_mm peak (none if that was not measured).
Missing peers are listed as missing. On an H100 with a 90a build, M > 64 runs the wgmma.sp
kernel; "fastllm-cuda-mma.sp" is the same call on the mma.sp kernel (FASTLLM_SPARSE24_WGMMA=0).
"""
import torch

import fastllm
from fastllm.bench import check
from fastllm.bench.switches import hopper_90a, with_env
from fastllm.sparse import compress, prune_24

COLUMNS = ["impl", "dtype", "shape", "M", "N", "K", "ms", "TFLOP/s", "TOPS", "speedup", "frac_peak", "ok"]
# TFLOP/s (float rows) and TOPS (int8 rows) are one plotted quantity: rate = 2 M N K / t.
PLOT = dict(x="M", y="rate", series=("impl", "dtype", "shape", "N", "K"))


def _linears(hidden, inter, hq, hkv, hd):
    """(label, N, K) of a transformer block's linears, qkv and gate_up fused as engines run them."""
    return [("qkv", (hq + 2 * hkv) * hd, hidden), ("o", hidden, hq * hd), ("gate_up", 2 * inter, hidden),
            ("down", hidden, inter)]


SHAPES = {"square": [("sq4096", 4096, 4096), ("sq8192", 8192, 8192)],
          "llama3-8b": _linears(4096, 14336, 32, 8, 128),
          "llama3-70b": _linears(8192, 28672, 64, 8, 128),
          "mistral-7b": _linears(4096, 14336, 32, 8, 128),
          "qwen2.5-7b": _linears(3584, 18944, 28, 4, 128)}
PRESETS = SHAPES
DEFAULT_PRESETS = ["square", "llama3-8b"]
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
QUICK_TOKENS = [1, 16, 128, 2048, 8192]
CPU_SHAPES = [("cpu", 64, 256), ("cpu", 128, 512)]
CPU_TOKENS = [1, 16, 64]


def _semi_structured(missing):
    """{name: (to_sparse(w) -> ws, call(x, ws) -> out)} for PyTorch's 2:4 backends present here."""
    out = {}
    try:
        import torch.sparse as ts
    except ImportError as e:
        missing.append(("torch-semi-structured", f"not importable ({e})"))
        return out
    for name, cls in (("torch-2:4-cutlass", "SparseSemiStructuredTensorCUTLASS"),
                      ("torch-2:4-cusparselt", "SparseSemiStructuredTensorCUSPARSELT")):
        klass = getattr(ts, cls, None)
        if klass is None:
            missing.append((name, f"torch.sparse.{cls} not in this PyTorch"))
            continue
        out[name] = (klass.from_dense, lambda x, ws: torch.nn.functional.linear(x, ws))
    return out


def _check(got, want, bar):
    err = check.max_abs_err(got, want)
    return err, err <= bar          # NaN fails


def run(ctx):
    dev = ctx.device
    cuda = dev.type == "cuda"
    if cuda:
        # Labelled by preset; an (N, K) that an earlier preset has (llama3-8b, mistral-7b) runs once.
        shapes, seen = [], set()
        for p in ctx.shapes or DEFAULT_PRESETS:
            for lab, n, k in SHAPES[p]:
                if (n, k) not in seen:
                    seen.add((n, k))
                    shapes.append((lab if p == "square" else f"{p} {lab}", n, k))
        tokens = QUICK_TOKENS if ctx.quick else TOKENS
    else:
        shapes, tokens = CPU_SHAPES, CPU_TOKENS
        if ctx.shapes:
            ctx.note("sparse24: on CPU the suite runs its fixed tiny shapes; --shapes is not used")
    peers = _semi_structured(ctx.missing) if cuda else {}
    if not cuda:
        ctx.missing.append(("torch-2:4 (semi-structured)", "needs a CUDA GPU"))
    op = fastllm.ops.OPS["sparse24_matmul"]
    rows = ctx.rows()   # kept by ctx: an interrupted run saves them
    for dtype in ctx.dtypes:
        peak = ctx.matmul_peak(dtype)
        dname = str(dtype).replace("torch.", "")
        for label, N, K in ctx.progress(shapes, f"sparse24 {dname}"):
            w, _ = prune_24(torch.randn(N, K, device=dev).to(dtype))
            values, meta = compress(w)
            sparse_peers = {}
            for name, (make, call) in peers.items():
                try:
                    sparse_peers[name] = (make(w), call)
                except Exception as e:  # noqa: BLE001 - Triton's errors are not RuntimeErrors
                    ctx.impl_raised(name, f"{label} {dname}", e)
            for M in tokens:
                x = torch.randn(M, K, device=dev).to(dtype)
                want = x.float() @ w.float().t()
                flops = 2 * M * N * K
                dense = lambda: x @ w.t()  # noqa: E731
                base_err = (dense().float() - want).abs().max().item()
                bar = 3 * base_err + 1e-2 * max(1.0, want.abs().max().item()) * torch.finfo(dtype).eps * 8
                impls = {"dense-matmul": dense}
                for b in ctx.backends(op, dev, x, values, meta, None):
                    impls[f"fastllm-{b}"] = lambda b=b: fastllm.ops.sparse24_matmul(x, values, meta, backend=b)
                    if b == "cuda" and M > 64 and hopper_90a(dev):
                        # The same call on the mma.sp kernel the wgmma.sp one replaces on Hopper.
                        impls["fastllm-cuda-mma.sp"] = lambda: with_env(
                            "FASTLLM_SPARSE24_WGMMA", "0", fastllm.ops.sparse24_matmul, x, values, meta, backend="cuda")
                for name, (ws, call) in sparse_peers.items():
                    impls[name] = lambda ws=ws, call=call: call(x, ws)
                t_dense = None
                for name, fn in impls.items():
                    try:
                        got = fn()
                    except Exception as e:  # noqa: BLE001 - Triton's errors are not RuntimeErrors
                        ctx.impl_raised(name, f"M={M} {label} {dname}", e)
                        continue
                    err, ok = _check(got, want, bar)
                    del got
                    t = ctx.timer(fn) if ok else None
                    if name == "dense-matmul":
                        t_dense = t
                    tf = t and flops / t / 1e12
                    rows.append(dict(impl=name, dtype=dname, shape=label, M=M, N=N, K=K, ms=t and t * 1e3,
                                     **{"TFLOP/s": tf}, rate=tf, speedup=t and t_dense and t_dense / t,
                                     frac_peak=tf and peak and tf / peak,
                                     ok="yes" if ok else f"WRONG (err {err:.3g} > {bar:.3g})"))
                if dtype == ctx.dtypes[0]:
                    rows += _int8_rows(ctx, label, M, N, K, w, t_dense)
    return rows


def _int8_rows(ctx, label, M, N, K, w, t_dense):
    """fastllm's 2:4 + W8A8 with the fused epilogue (bf16 out): the timed call is the checked
    call, against the exact int32 product scaled in fp64 over the whole output."""
    dev = ctx.device
    wq = w.float().clamp(-1, 1).mul(127).round().to(torch.int8)
    values, meta = compress(wq)
    a = torch.randint(-127, 128, (M, K), dtype=torch.int8, device=dev)
    a_s, w_s = torch.rand(M, device=dev), torch.rand(N, device=dev)
    peak = ctx.peaks.get("int_mm_tops")

    def want(rs, cs):   # float64 is exact for the int8 products (|sum| < 2**31 < 2**53)
        acc = a[rs].double() @ wq[cs].double().t()
        return acc * a_s[rs].double()[:, None] * w_s[cs].double()[None, :]

    op = fastllm.ops.OPS["sparse24_int8_matmul"]
    rows = []
    for b in ctx.backends(op, dev, a, values, meta, a_s, w_s, None, torch.bfloat16):
        fn = lambda b=b: fastllm.ops.sparse24_int8_matmul(a, values, meta, a_s, w_s, backend=b)  # noqa: E731
        try:
            ok, why = check.matrix_check(fn(), want, exact=False, rtol=1e-2, shape=(M, N))
        except Exception as e:  # noqa: BLE001 - Triton errors (CompilationError, OutOfResources) are not RuntimeErrors
            ctx.impl_raised(f"fastllm-{b}-int8", f"M={M} {label}", e)
            continue
        t = ctx.timer(fn) if ok else None
        tops = t and 2 * M * N * K / t / 1e12
        rows.append(dict(impl=f"fastllm-{b}-int8", dtype="int8", shape=label, M=M, N=N, K=K, ms=t and t * 1e3,
                         TOPS=tops, rate=tops, speedup=t and t_dense and t_dense / t,
                         frac_peak=tops and peak and tops / peak, ok="yes" if ok else f"WRONG ({why})"))
    return rows
