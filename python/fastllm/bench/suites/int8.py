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
               in bf16; also GB/s (weight bytes dominate).
Shapes: square M = N = K in 1024..8192, and the linears of Llama-3-8B / 70B (fused qkv, o,
fused gate_up, down) at M tokens. speedup = time of the bf16 peer / time of the row.
Every implementation is checked before it is timed: int32 results exactly against the
reference on the first and last rows and columns, scaled ones within a relative bound; a
wrong one is reported WRONG and not timed. fastllm's torch backend on CUDA is the float64
reference, not a contender: it is timed only when asked for with --backend.
"""

import os

import torch
import torch.nn.functional as F

import fastllm
from fastllm import ref
from fastllm.bench.switches import hopper_90a, with_env
from fastllm.ops._int8_cuda import FUSED_MAX_M

COLUMNS = ["kind", "impl", "dtype", "M", "N", "K", "ms", "TOPS", "GB/s", "frac_peak", "speedup", "ok"]
PLOT = dict(x="M", y="TOPS", series="impl")

LLAMA = {  # (N, K) of each linear; qkv and gate_up fused as serving engines run them
    "llama3-8b": [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)],
    "llama3-70b": [(10240, 8192), (8192, 8192), (57344, 8192), (8192, 28672)],
}
SQUARE = [1024, 2048, 4096, 8192]
QUICK_SQUARE = [1024, 4096]
TOKENS = [1, 16, 64, 256, 1024, 4096, 8192]
QUICK_TOKENS = [16, 256, 4096]
DECODE = list(range(1, 17))
QUICK_DECODE = [1, 4, 16]
SHAPE_PRESETS = {"square": None, **LLAMA}
# CPU: a harness smoke test on tiny shapes.
CPU_GEMM = [(17, 64, 128), (64, 128, 256)]
CPU_DECODE = [(1, 64, 128), (5, 64, 128)]


def _name(dtype):
    return str(dtype).replace("torch.", "")


def _gemm_shapes(ctx):
    if ctx.device.type == "cpu":
        return CPU_GEMM
    out = []
    for preset in ctx.presets(SHAPE_PRESETS):
        if preset == "square":
            out += [(s, s, s) for s in (QUICK_SQUARE if ctx.quick else SQUARE)]
        else:
            out += [(m, n, k) for n, k in LLAMA[preset] for m in (QUICK_TOKENS if ctx.quick else TOKENS)]
    return out


def _decode_shapes(ctx):
    if ctx.device.type == "cpu":
        return CPU_DECODE
    nks = [nk for p in ctx.presets(SHAPE_PRESETS) if p != "square" for nk in LLAMA[p]] or [(4096, 4096)]
    return [(m, n, k) for n, k in nks for m in (QUICK_DECODE if ctx.quick else DECODE)]


def _backends(ctx, op, dev, *args):
    names = ctx.backends(op, dev, *args)
    if dev.type == "cuda" and ctx.requested is None and "torch" in names:
        names.remove("torch")
        ctx.missing.append((f"fastllm-torch ({op.name})", "the float64 reference on CUDA; not timed unless "
                                                          "--backend torch"))
    return names


def _rows_check(got, want_fn, M, N, exact, rtol):
    """Compare got against the reference on the first and last (<= 64 rows, <= 512 cols)."""
    r, c = min(M, 64), min(N, 512)
    for rs, cs in ((slice(0, r), slice(0, c)), (slice(M - r, M), slice(N - c, N))):
        want = want_fn(rs, cs)
        g = got[rs, cs]
        if exact:
            if not torch.equal(g.cpu(), want.cpu()):
                return False, "int32 mismatch"
        else:
            err = ((g.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()
            if not (err <= rtol):
                return False, f"rel err {err:.3g} > {rtol}"
    return True, ""


def _time_rows(ctx, rows, kind, impls, base, dtype_name, M, N, K, flops, nbytes, peak):
    """impls: name -> (fn, verified_ok, why). base: the bf16 peer's name (speedup reference)."""
    times = {}
    for name, (fn, ok, why) in impls.items():
        times[name] = ctx.timer(fn) if ok else None
    tb = times.get(base)
    for name, (fn, ok, why) in impls.items():
        t = times[name]
        tops = t and flops / t / 1e12
        p = peak if name != base else (ctx.peaks.get("matmul_bf16_tflops") or ctx.peaks.get("matmul_fp32_tflops"))
        rows.append(dict(kind=kind, impl=name, dtype=dtype_name, M=M, N=N, K=K, ms=t and t * 1e3, TOPS=tops,
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
    act = torch.bfloat16 if dev.type == "cuda" else torch.float32
    base = f"torch.matmul-{_name(act)}"
    peak = ctx.peaks.get("int_mm_tops") or ctx.peaks.get("matmul_fp32_tflops")
    op32, op = fastllm.ops.OPS["int8_matmul_int32"], fastllm.ops.OPS["int8_matmul"]
    for M, N, K in ctx.progress(_gemm_shapes(ctx), "int8 gemm"):
        a = torch.randint(-127, 128, (M, K), dtype=torch.int8, device=dev)
        b = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=dev)
        a_s = torch.rand(M, device=dev) * 1e-2 + 1e-3
        w_s = torch.rand(N, device=dev) * 1e-2 + 1e-3
        af, bf = a.to(act), b.to(act)
        flops, nbytes = 2 * M * N * K, M * K + N * K + 4 * M * N

        def want32(rs, cs):
            return ref.int8_matmul_int32(a[rs], b[cs])

        def check32(fn):
            got = fn()
            return _rows_check(got, want32, M, N, exact=True, rtol=0)

        impls = {}
        for be in _backends(ctx, op32, dev, a, b):
            fn = (lambda be=be: fastllm.ops.int8_matmul_int32(a, b, backend=be))
            impls[f"fastllm-{be}"] = (fn, *check32(fn))
            if be == "cuda" and M > 128 and hopper_90a(dev):
                # The same call on the sm80 (mma.sync) kernel, and (FASTLLM_BENCH_TMA=1: a hang there
                # would cost the rest of the run) on the experimental TMA-fed wgmma variant.
                modes = [("0", "fastllm-cuda-mma.sync")]
                if os.environ.get("FASTLLM_BENCH_TMA") == "1":
                    modes.append(("tma", "fastllm-cuda-wgmma-tma"))
                for mode, name in modes:
                    fn = (lambda mode=mode: with_env("FASTLLM_INT8_WGMMA", mode, fastllm.ops.int8_matmul_int32, a, b,
                                                     backend="cuda"))
                    impls[name] = (fn, *check32(fn))
        if _int_mm_peer(ctx, dev, M):
            fn = lambda: torch._int_mm(a, b.t())  # noqa: E731
            try:
                impls["torch._int_mm"] = (fn, *check32(fn))
            except RuntimeError as e:
                ctx.missing.append((f"torch._int_mm M={M} N={N} K={K}", str(e).splitlines()[0][:120]))
        fn = lambda: torch.matmul(af, bf.t())  # noqa: E731
        impls[base] = (fn, *_rows_check(fn(), lambda rs, cs: (af[rs].double() @ bf[cs].double().t()), M, N,
                                        exact=False, rtol=2e-2))
        _time_rows(ctx, rows, "w8a8-int32", impls, base, "int8", M, N, K, flops, nbytes, peak)
        t_base = rows[-1]["ms"] if rows[-1]["impl"] == base else None

        # Scaled epilogue (bf16 out); the bf16 row above is its baseline too.
        impls = {}
        for be in _backends(ctx, op, dev, a, b, a_s, w_s, None, act):
            fn = (lambda be=be: fastllm.ops.int8_matmul(a, b, a_s, w_s, out_dtype=act, backend=be))
            ok = _rows_check(fn(), lambda rs, cs: ref.int8_matmul(a[rs], b[cs], a_s[rs], w_s[cs], out_dtype=act),
                             M, N, exact=False, rtol=1e-2)
            impls[f"fastllm-{be}"] = (fn, *ok)
        before = len(rows)
        _time_rows(ctx, rows, "w8a8", impls, None, _name(act), M, N, K, flops, M * K + N * K + 2 * M * N, peak)
        for r in rows[before:]:
            r["speedup"] = r["ms"] and t_base and t_base / r["ms"]
        del a, b, af, bf


def run_linear(ctx, rows):
    dev = ctx.device
    act = torch.bfloat16 if dev.type == "cuda" else torch.float32
    base = f"F.linear-{_name(act)}"
    peak = ctx.peaks.get("int_mm_tops") or ctx.peaks.get("matmul_fp32_tflops")
    op = fastllm.ops.OPS["int8_matmul"]
    shapes = [s for s in _gemm_shapes(ctx) if s[0] != s[1] or dev.type == "cpu"]  # the model shapes
    for M, N, K in ctx.progress(shapes, "int8 linear end to end"):
        x = torch.randn(M, K, device=dev, dtype=act)
        w = torch.randn(N, K, device=dev, dtype=act) * 0.02
        wq, ws = ref.quantize_per_token(w)
        want = x.double() @ w.double().t()
        impls = {}
        qa, sa = ref.quantize_per_token(x)
        op_d = fastllm.ops.OPS["int8_matmul_dynamic"]
        for be in _backends(ctx, op_d, dev, x, wq, ws, None, None):
            def fn_d(be=be):
                return fastllm.ops.int8_matmul_dynamic(x, wq, ws, backend=be)
            # int8 on both sides: ~1% relative error vs the exact product is the method's cost.
            impls[f"fastllm-{be}"] = (fn_d, *_rows_check(fn_d(), lambda rs, cs: want[rs, cs], M, N, exact=False,
                                                         rtol=3e-2))
        for be in _backends(ctx, op, dev, qa, wq, sa, ws, None, act):
            def fn(be=be):   # the same, as two ops (what int8_matmul_dynamic saves at small M)
                q, s = fastllm.ops.quantize_per_token(x, backend=be)
                return fastllm.ops.int8_matmul(q, wq, s, ws, out_dtype=act, backend=be)
            impls[f"fastllm-{be}-2op"] = (fn, *_rows_check(fn(), lambda rs, cs: want[rs, cs], M, N, exact=False,
                                                           rtol=3e-2))
        # Static: one calibrated scale (here from x itself), quantization inside the GEMM.
        act_scale = torch.tensor([x.abs().max().item() / 127], device=dev)
        op_s = fastllm.ops.OPS["int8_matmul_static"]
        for be in _backends(ctx, op_s, dev, x, wq, act_scale.reciprocal(), act_scale, ws, None):
            def fn_s(be=be):
                return fastllm.ops.int8_matmul_static(x, wq, act_scale, ws, backend=be)
            impls[f"fastllm-{be}-static"] = (fn_s, *_rows_check(fn_s(), lambda rs, cs: want[rs, cs], M, N,
                                                                exact=False, rtol=5e-2))
            if be == "cuda" and M <= FUSED_MAX_M:   # the same call on the two-launch path
                def fn_s2(be=be):
                    return with_env("FASTLLM_INT8_FUSED", "0", fastllm.ops.int8_matmul_static, x, wq, act_scale, ws,
                                    backend=be)
                impls["fastllm-cuda-static-2launch"] = (fn_s2, *_rows_check(fn_s2(), lambda rs, cs: want[rs, cs], M,
                                                                            N, exact=False, rtol=5e-2))
        fn = lambda: F.linear(x, w)  # noqa: E731
        impls[base] = (fn, *_rows_check(fn(), lambda rs, cs: want[rs, cs], M, N, exact=False, rtol=2e-2))
        _time_rows(ctx, rows, "w8a8-linear", impls, base, _name(act), M, N, K, 2 * M * N * K,
                   M * K * x.element_size() + N * K + M * N * x.element_size(), peak)
        del x, w, wq, want


def run_w8a16(ctx, rows):
    dev = ctx.device
    act = torch.bfloat16 if dev.type == "cuda" else torch.float32
    base = f"F.linear-{_name(act)}"
    op = fastllm.ops.OPS["w8a16_matmul"]
    groups = [0] if ctx.quick or dev.type == "cpu" else [0, 128]
    for M, N, K in ctx.progress(_decode_shapes(ctx), "w8a16 decode"):
        x = torch.randn(M, K, device=dev, dtype=act)
        w = torch.randn(N, K, device=dev, dtype=act) * 0.02
        for g in groups:
            if g and K % g:
                continue
            wq = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=dev)
            s = torch.rand((N,) if not g else (N, K // g), device=dev) * 1e-3 + 1e-4
            want_full = ref.w8a16_matmul(x.float(), wq, s, None, g or None).double()
            impls = {}
            for be in _backends(ctx, op, dev, x, wq, s, None, g):
                fn = (lambda be=be: fastllm.ops.w8a16_matmul(x, wq, s, group_size=g or None, backend=be))
                impls[f"fastllm-{be}{'-g%d' % g if g else ''}"] = (
                    fn, *_rows_check(fn(), lambda rs, cs: want_full[rs, cs], M, N, exact=False, rtol=1e-2))
            if not g:
                fn = lambda: F.linear(x, w)  # noqa: E731
                impls[base] = (fn, True, "")
            nbytes = N * K + M * K * x.element_size() + M * N * x.element_size()
            peak = ctx.peaks.get("matmul_bf16_tflops") or ctx.peaks.get("matmul_fp32_tflops")
            _time_rows(ctx, rows, "w8a16", impls, base if not g else None, _name(act), M, N, K, 2 * M * N * K,
                       nbytes, peak)
            if g:  # speedup of the grouped rows against the per-channel run's bf16 row
                tb = next((r["ms"] for r in reversed(rows) if r["impl"] == base and r["M"] == M and r["N"] == N
                           and r["K"] == K), None)
                for r in rows:
                    if r["kind"] == "w8a16" and r["impl"].endswith(f"-g{g}") and r["M"] == M and r["N"] == N \
                            and r["K"] == K:
                        r["speedup"] = r["ms"] and tb and tb / r["ms"]
            # W8A16 moves bf16-sized GB/s: its ceiling is the copy bandwidth.
            for r in rows[-len(impls):]:
                r["frac_peak"] = r["GB/s"] and ctx.peaks.get("copy_gbs") and r["GB/s"] / ctx.peaks["copy_gbs"]
        del x, w


def run(ctx):
    rows = []
    run_gemm(ctx, rows)
    run_linear(ctx, rows)
    run_w8a16(ctx, rows)
    return rows
