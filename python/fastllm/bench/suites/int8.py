"""int8 matmuls: TOPS of fastllm's backends vs torch._int_mm and bf16 torch.matmul (cuBLAS),
all in the same run, plus the W8A8 linear end to end and W8A16 decode.

Kinds of rows:
  w8a8-int32   int8 GEMM, raw int32 out: int8_matmul_int32 per backend, torch._int_mm (cuBLAS
               int8; needs M > 16 on CUDA, listed missing below that), and torch.matmul on
               bf16 copies of the operands (the dense 16-bit baseline). On an H100 with a 90a
               build, M > 128 also gets "fastllm-cuda-mma.sync" (the sm80 kernel the wgmma one
               replaces there, FASTLLM_INT8_WGMMA=0) and "fastllm-cuda-wgmma-tma" (the
               experimental TMA-fed variant, FASTLLM_INT8_WGMMA=tma; only with FASTLLM_BENCH_TMA=1
               until its GPU test has passed once).
  w8a8         the same GEMM with the fused dequant epilogue (per-token a_scale, per-channel
               w_scale, bf16 out): int8_matmul per backend.
  w8a8-linear  end to end from bf16 activations: int8_matmul_dynamic (per-token scales, the
               quantization fused into the GEMM at M <= 32 on Triton, M <= 16 on CUDA), the same
               as two ops (quantize_per_token + int8_matmul: impl "...-2op"), and
               int8_matmul_static (calibrated per-tensor scale, quantization fused: impl
               "...-static"; on CUDA at M <= 16 also "fastllm-cuda-static-2launch", the same call
               with FASTLLM_INT8_FUSED=0) vs F.linear in bf16 (weights quantized once, untimed).
  w8a16        weight-only int8 at decode M = 1..16 (per channel, and group 128) vs F.linear
               in bf16; also GB/s (weight bytes dominate; the bf16 peer moves 2 N K weight bytes).
Activations (w8a8 epilogue out, w8a8-linear, w8a16, and the dense baselines) are bf16 on GPU and
fp32 on CPU, or each --dtype given. Shapes (--shapes, default square,llama3-8b,llama3-70b): the
square sweep M = N = K in 1024..8192 ("square": int8 GEMM rows only) and the linears of
llama3-8b, llama3-70b, mistral-7b, qwen2.5-7b (fused qkv, o, fused gate_up, down) at M tokens; on CPU fixed tiny
shapes (--shapes is not used there, the report says so). speedup = time of the 16-bit peer /
time of the row. frac_peak: int8 rows over the measured torch._int_mm TOPS, dense rows over the
matmul peak of their dtype, w8a16 rows over the copy bandwidth; none where that peak was not
measured. Every implementation is checked over its whole output before it is timed: int32
results exactly, scaled ones within a row-wise relative bound; a wrong one is reported WRONG
and not timed. fastllm's torch backend on CUDA is the float64 reference, not a contender: it is
timed only when asked for with --backend.
"""

import os

import torch
import torch.nn.functional as F

import fastllm
from fastllm import ref
from fastllm.bench import check
from fastllm.bench.switches import hopper_90a, with_env
from fastllm.ops._int8_cuda import FUSED_MAX_M

COLUMNS = ["kind", "impl", "dtype", "M", "N", "K", "ms", "TOPS", "GB/s", "frac_peak", "speedup", "ok"]
PLOT = dict(x="M", y="TOPS", series=("kind", "impl", "dtype", "shape"))


def _linears(hidden, inter, hq, hkv, hd):
    """(N, K) of a transformer block's linears; qkv and gate_up fused as serving engines run them."""
    return [((hq + 2 * hkv) * hd, hidden), (hidden, hq * hd), (2 * inter, hidden), (hidden, inter)]


MODELS = {
    "llama3-8b": _linears(4096, 14336, 32, 8, 128),
    "llama3-70b": _linears(8192, 28672, 64, 8, 128),
    "mistral-7b": _linears(4096, 14336, 32, 8, 128),
    "qwen2.5-7b": _linears(3584, 18944, 28, 4, 128),
}
LLAMA = MODELS   # the name older scripts import
SQUARE = [1024, 2048, 4096, 8192]
QUICK_SQUARE = [1024, 4096]
TOKENS = [1, 16, 64, 256, 1024, 4096, 8192]
QUICK_TOKENS = [16, 256, 4096]
DECODE = list(range(1, 17))
QUICK_DECODE = [1, 4, 16]
SHAPE_PRESETS = {"square": None, **MODELS}
PRESETS = SHAPE_PRESETS
DEFAULT_PRESETS = ["square", "llama3-8b", "llama3-70b"]
# CPU: a harness smoke test on tiny shapes.
CPU_GEMM = [(17, 64, 128), (64, 128, 256)]
CPU_DECODE = [(1, 64, 128), (5, 64, 128)]


def _name(dtype):
    return str(dtype).replace("torch.", "")


def _gemm_shapes(ctx, square=True):
    """[(M, N, K, origin)]: origin "square" for the square sweep, else the (N, K) layer's
    "NxK" (what a plot line and run_linear's filter go by; M == N can be a real layer)."""
    if ctx.device.type == "cpu":
        return [(m, n, k, f"cpu {n}x{k}") for m, n, k in CPU_GEMM]
    out = []
    for preset in ctx.shapes or DEFAULT_PRESETS:
        if preset == "square":
            if square:
                out += [(s, s, s, "square") for s in (QUICK_SQUARE if ctx.quick else SQUARE)]
        else:
            out += [(m, n, k, f"{n}x{k}") for n, k in MODELS[preset] for m in (QUICK_TOKENS if ctx.quick else TOKENS)]
    return list(dict.fromkeys(out))    # presets sharing a layer (llama3-8b, mistral-7b) measure it once


def _decode_shapes(ctx):
    if ctx.device.type == "cpu":
        return [(m, n, k, f"cpu {n}x{k}") for m, n, k in CPU_DECODE]
    nks = list(dict.fromkeys(nk for p in ctx.shapes or DEFAULT_PRESETS if p != "square" for nk in MODELS[p])) or \
        [(4096, 4096)]
    return [(m, n, k, f"{n}x{k}") for n, k in nks for m in (QUICK_DECODE if ctx.quick else DECODE)]


def _acts(ctx):
    """Activation dtypes: each --dtype given, else bf16 on GPU / fp32 on CPU."""
    if getattr(ctx, "dtype_given", False):
        return ctx.dtypes
    return [torch.bfloat16 if ctx.device.type == "cuda" else torch.float32]


def _check(got, want_fn, exact, rtol, shape):
    """The whole (M, N) output against the reference, blockwise (check.matrix_check); an output
    of another shape is wrong (a short one would otherwise be checked only where it exists)."""
    return check.matrix_check(got, want_fn, exact=exact, rtol=rtol, shape=shape)


def _guard(ctx, name, where, make):
    """make() (an impl tuple: building it runs and checks the implementation), or None with the
    error recorded (ctx.impl_raised: a peer is listed missing, a fastllm implementation fails the
    run): one failing implementation must not cost the suite's other rows (Triton's
    CompilationError / OutOfResources are not RuntimeErrors)."""
    try:
        return make()
    except Exception as e:  # noqa: BLE001
        ctx.impl_raised(name, where, e)
        return None


def _time_rows(ctx, rows, kind, impls, base, M, N, K, shape, flops):
    """impls: name -> (fn, verified_ok, why, dtype name, bytes moved, peak or None), or None
    (it failed: see _guard). base: the 16-bit peer's name (speedup reference)."""
    impls = {name: v for name, v in impls.items() if v is not None}
    times = {name: (ctx.timer(v[0]) if v[1] else None) for name, v in impls.items()}
    tb = times.get(base)
    for name, (fn, ok, why, dname, nbytes, p) in impls.items():
        t = times[name]
        tops = t and flops / t / 1e12
        rows.append(dict(kind=kind, impl=name, dtype=dname, M=M, N=N, K=K, shape=shape, ms=t and t * 1e3, TOPS=tops,
                         **{"GB/s": t and nbytes / t / 1e9}, frac_peak=tops and p and tops / p,
                         speedup=t and tb and tb / t, ok="yes" if ok else f"WRONG ({why})"))


def _int_mm_peer(ctx, dev, M):
    if not hasattr(torch, "_int_mm"):
        ctx.missing.append(("torch._int_mm", "not in this PyTorch"))
        return False
    if dev.type == "cuda" and M <= 16:
        ctx.missing.append(("torch._int_mm at M <= 16", "cuBLAS int8 (torch._int_mm) needs M > 16"))
        return False
    return True


def run_gemm(ctx, rows):
    dev = ctx.device
    peak = ctx.peaks.get("int_mm_tops")
    op32, op = fastllm.ops.OPS["int8_matmul_int32"], fastllm.ops.OPS["int8_matmul"]
    for M, N, K, shape in ctx.progress(_gemm_shapes(ctx), "int8 gemm"):
        a = torch.randint(-127, 128, (M, K), dtype=torch.int8, device=dev)
        b = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=dev)
        a_s = torch.rand(M, device=dev) * 1e-2 + 1e-3
        w_s = torch.rand(N, device=dev) * 1e-2 + 1e-3
        flops, nbytes = 2 * M * N * K, M * K + N * K + 4 * M * N

        def want32(rs, cs):
            return ref.int8_matmul_int32(a[rs], b[cs])

        def int32_row(fn, name):
            return _guard(ctx, name, f"M={M} N={N} K={K}",
                          lambda: (fn, *_check(fn(), want32, exact=True, rtol=0, shape=(M, N)), "int8", nbytes, peak))

        impls = {}
        for be in ctx.backends(op32, dev, a, b):
            fn = (lambda be=be: fastllm.ops.int8_matmul_int32(a, b, backend=be))
            impls[f"fastllm-{be}"] = int32_row(fn, f"fastllm-{be}")
            if be == "cuda" and M > 128 and hopper_90a(dev):
                # The same call on the sm80 (mma.sync) kernel, and (FASTLLM_BENCH_TMA=1: a hang there
                # would cost the rest of the run) on the experimental TMA-fed wgmma variant.
                modes = [("0", "fastllm-cuda-mma.sync")]
                if os.environ.get("FASTLLM_BENCH_TMA") == "1":
                    modes.append(("tma", "fastllm-cuda-wgmma-tma"))
                for mode, name in modes:
                    fn = (lambda mode=mode: with_env("FASTLLM_INT8_WGMMA", mode, fastllm.ops.int8_matmul_int32, a, b,
                                                     backend="cuda"))
                    impls[name] = int32_row(fn, name)
        if _int_mm_peer(ctx, dev, M):
            impls["torch._int_mm"] = int32_row(lambda: torch._int_mm(a, b.t()), "torch._int_mm")
        for i, act in enumerate(_acts(ctx)):
            # The dense baseline: torch.matmul on `act` copies of the operands, scaled by 2**-7
            # (exact; keeps fp16's sums of K products of +-127^2 from overflowing).
            af, bf = a.to(act) / 128, b.to(act) / 128
            base = f"torch.matmul-{_name(act)}"
            fn = lambda af=af, bf=bf: torch.matmul(af, bf.t())  # noqa: E731
            ok = _check(fn(), lambda rs, cs, af=af, bf=bf: af[rs].double() @ bf[cs].double().t(), exact=False,
                        rtol=2e-2, shape=(M, N))
            if i > 0:   # the int32 rows are dtype-free: timed once, against the first baseline
                impls = {}
            impls[base] = (fn, *ok, _name(act), (M * K + N * K + M * N) * af.element_size(), ctx.matmul_peak(act))
            _time_rows(ctx, rows, "w8a8-int32", impls, base, M, N, K, shape, flops)
            t_base = rows[-1]["ms"]

            # Scaled epilogue (out in `act`); the dense row above is its baseline too.
            impls = {}
            for be in ctx.backends(op, dev, a, b, a_s, w_s, None, act):
                fn = (lambda be=be, act=act: fastllm.ops.int8_matmul(a, b, a_s, w_s, out_dtype=act, backend=be))
                where = f"int8_matmul M={M} N={N} K={K} {_name(act)}"
                impls[f"fastllm-{be}"] = _guard(ctx, f"fastllm-{be}", where, lambda fn=fn: (
                    fn, *_check(fn(), lambda rs, cs: ref.int8_matmul(a[rs], b[cs], a_s[rs], w_s[cs],
                                                                     out_dtype=torch.float32),
                                exact=False, rtol=1e-2, shape=(M, N)),
                    _name(act), M * K + N * K + M * N * af.element_size(), peak))
            before = len(rows)
            _time_rows(ctx, rows, "w8a8", impls, None, M, N, K, shape, flops)
            for r in rows[before:]:
                r["speedup"] = r["ms"] and t_base and t_base / r["ms"]
            del af, bf
        del a, b


def run_linear(ctx, rows):
    dev = ctx.device
    peak = ctx.peaks.get("int_mm_tops")
    op = fastllm.ops.OPS["int8_matmul"]
    op_d = fastllm.ops.OPS["int8_matmul_dynamic"]
    op_s = fastllm.ops.OPS["int8_matmul_static"]
    for act in _acts(ctx):
        base = f"F.linear-{_name(act)}"
        # The model layers only (not the square sweep): a layer with M == N is one too.
        for M, N, K, shape in ctx.progress(_gemm_shapes(ctx, square=False), f"int8 linear end to end {_name(act)}"):
            x = torch.randn(M, K, device=dev, dtype=act)
            w = torch.randn(N, K, device=dev, dtype=act) * 0.02
            wq, ws = ref.quantize_per_token(w)
            es = x.element_size()
            int8_bytes = M * K * es + N * K + M * N * es

            def want(rs, cs):
                return x[rs].double() @ w[cs].double().t()

            def row(fn, rtol, name):
                return _guard(ctx, name, f"linear M={M} N={N} K={K} {_name(act)}",
                              lambda: (fn, *_check(fn(), want, exact=False, rtol=rtol, shape=(M, N)), _name(act),
                                       int8_bytes, peak))

            impls = {}
            qa, sa = ref.quantize_per_token(x)
            for be in ctx.backends(op_d, dev, x, wq, ws, None, None):
                # int8 on both sides: ~1% relative error vs the exact product is the method's cost.
                impls[f"fastllm-{be}"] = row(lambda be=be: fastllm.ops.int8_matmul_dynamic(x, wq, ws, backend=be),
                                             3e-2, f"fastllm-{be}")
            for be in ctx.backends(op, dev, qa, wq, sa, ws, None, act):
                def fn(be=be):   # the same, as two ops (what int8_matmul_dynamic saves at small M)
                    q, s = fastllm.ops.quantize_per_token(x, backend=be)
                    return fastllm.ops.int8_matmul(q, wq, s, ws, out_dtype=act, backend=be)
                impls[f"fastllm-{be}-2op"] = row(fn, 3e-2, f"fastllm-{be}-2op")
            # Static: one calibrated scale (here from x itself), quantization inside the GEMM.
            act_scale = torch.tensor([x.abs().max().item() / 127], device=dev)
            for be in ctx.backends(op_s, dev, x, wq, act_scale.reciprocal(), act_scale, ws, None):
                impls[f"fastllm-{be}-static"] = row(
                    lambda be=be: fastllm.ops.int8_matmul_static(x, wq, act_scale, ws, backend=be), 5e-2,
                    f"fastllm-{be}-static")
                if be == "cuda" and M <= FUSED_MAX_M:   # the same call on the two-launch path
                    impls["fastllm-cuda-static-2launch"] = row(lambda: with_env(
                        "FASTLLM_INT8_FUSED", "0", fastllm.ops.int8_matmul_static, x, wq, act_scale, ws,
                        backend="cuda"), 5e-2, "fastllm-cuda-static-2launch")
            # The dense peer reads the 16-bit weight: 2 N K bytes in bf16 (es * N * K).
            impls[base] = (lambda: F.linear(x, w), *_check(F.linear(x, w), want, exact=False, rtol=2e-2, shape=(M, N)),
                           _name(act), M * K * es + N * K * es + M * N * es, ctx.matmul_peak(act))
            _time_rows(ctx, rows, "w8a8-linear", impls, base, M, N, K, shape, 2 * M * N * K)
            del x, w, wq


def run_w8a16(ctx, rows):
    dev = ctx.device
    op = fastllm.ops.OPS["w8a16_matmul"]
    groups = [0] if ctx.quick or dev.type == "cpu" else [0, 128]
    copy_gbs = ctx.peaks.get("copy_gbs")
    for act in _acts(ctx):
        base = f"F.linear-{_name(act)}"
        for M, N, K, shape in ctx.progress(_decode_shapes(ctx), f"w8a16 decode {_name(act)}"):
            x = torch.randn(M, K, device=dev, dtype=act)
            w = torch.randn(N, K, device=dev, dtype=act) * 0.02
            es = x.element_size()
            t_base = None
            for g in groups:
                if g and K % g:
                    continue
                wq = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=dev)
                s = torch.rand((N,) if not g else (N, K // g), device=dev) * 1e-3 + 1e-4
                want_full = ref.w8a16_matmul(x.float(), wq, s, None, g or None).double()
                impls = {}
                for be in ctx.backends(op, dev, x, wq, s, None, g):
                    fn = (lambda be=be: fastllm.ops.w8a16_matmul(x, wq, s, group_size=g or None, backend=be))
                    name = f"fastllm-{be}{'-g%d' % g if g else ''}"
                    impls[name] = _guard(ctx, name, f"w8a16 M={M} N={N} K={K} {_name(act)}", lambda fn=fn: (
                        fn, *_check(fn(), lambda rs, cs: want_full[rs, cs], exact=False, rtol=1e-2, shape=(M, N)),
                        _name(act), N * K + M * K * es + M * N * es, None))
                if not g:
                    # The dense peer reads the 16-bit weight: es * N * K bytes (2 N K in bf16).
                    impls[base] = (lambda: F.linear(x, w), *_check(
                        F.linear(x, w), lambda rs, cs: x[rs].double() @ w[cs].double().t(), exact=False, rtol=2e-2,
                        shape=(M, N)),
                        _name(act), N * K * es + M * K * es + M * N * es, None)
                before = len(rows)
                _time_rows(ctx, rows, "w8a16", impls, base if not g else None, M, N, K, shape, 2 * M * N * K)
                if not g:
                    t_base = rows[-1]["ms"]
                for r in rows[before:]:
                    if g:    # the grouped rows against the per-channel run's dense row
                        r["speedup"] = r["ms"] and t_base and t_base / r["ms"]
                    # W8A16 is bandwidth bound: its ceiling is the copy bandwidth.
                    r["frac_peak"] = r["GB/s"] and copy_gbs and r["GB/s"] / copy_gbs
            del x, w


def run(ctx):
    if ctx.device.type == "cpu" and ctx.shapes:
        ctx.note("int8: on CPU the suite runs its fixed tiny shapes; --shapes is not used")
    rows = ctx.rows()   # kept by ctx: an interrupted run saves them
    run_gemm(ctx, rows)
    run_linear(ctx, rows)
    run_w8a16(ctx, rows)
    return rows
