"""The benchmark harness's correctness checks: a wrong kernel is reported WRONG and not timed,
wherever in its output it is wrong (in-process, tiny shapes, a one-rep timer: CPU seconds)."""
import math
import sys
import types

import pytest
import torch

import fastllm
from fastllm import ref
from fastllm.bench import __main__ as bench
from fastllm.bench import check
from fastllm.bench.timing import Timer

PEAKS = {"matmul_bf16_tflops": None, "matmul_fp32_tflops": 0.1, "int_mm_tops": 0.2, "copy_gbs": 10.0}


def light_ctx(monkeypatch, *argv):
    """A real Context (CPU) without the peak measurement, timing one rep."""
    monkeypatch.setattr(bench, "measure_peaks", lambda device, quick=False: dict(PEAKS))
    ctx = bench.Context(bench.parser().parse_args(["quantize", "--device", "cpu", "--no-progress", *argv]))
    ctx.timer = Timer("cpu", warmup=0, reps=1)
    return ctx


def by_impl(rows, impl):
    return [r for r in rows if r["impl"] == impl]


def assert_wrong_not_timed(rows):
    assert rows and all(r["ok"].startswith("WRONG") and r["ms"] is None for r in rows), rows


# ---------------------------------------------------------------------------------------------
# 1 / 4: attention and decode check every batch, head and row; NaN never sets the bar.

def _attention(monkeypatch, bad):
    from fastllm.bench.suites import attention
    monkeypatch.setattr(attention, "_shapes", lambda ctx: [("fa2", 4, 2, 32, 64, 0)])   # GQA 4 / 2, S 64
    orig = fastllm.ops.flash_attention
    monkeypatch.setattr(fastllm.ops, "flash_attention", lambda q, k, v, **kw: bad(orig(q, k, v, **kw)))
    return attention.run(light_ctx(monkeypatch))


def test_attention_wrong_last_head_last_row_is_wrong(monkeypatch):
    def bad(out):            # (B, S, H, D): only the last query row of the last head
        out = out.clone()
        out[:, -1, -1] += 1.0
        return out
    rows = _attention(monkeypatch, bad)
    assert_wrong_not_timed(by_impl(rows, "fastllm-torch"))
    assert all(r["ok"] == "yes" and r["ms"] > 0 for r in by_impl(rows, "sdpa-math-cpu"))


def test_attention_nan_is_wrong_and_not_the_bar(monkeypatch):
    rows = _attention(monkeypatch, lambda out: torch.full_like(out, math.nan))
    assert_wrong_not_timed(by_impl(rows, "fastllm-torch"))
    assert all(r["ok"] == "yes" for r in by_impl(rows, "sdpa-math-cpu")), rows


def test_decode_wrong_second_sequence_is_wrong(monkeypatch):
    from fastllm.bench.suites import decode
    orig = fastllm.ops.decode_attention

    def bad(q, k, v, **kw):
        out = orig(q, k, v, **kw).clone()      # (B, 1, Hq, D)
        out[1:] = 123.0
        return out
    monkeypatch.setattr(fastllm.ops, "decode_attention", bad)
    rows = decode.run(light_ctx(monkeypatch))
    assert_wrong_not_timed(by_impl(rows, "fastllm-torch"))
    assert {r["layout"] for r in by_impl(rows, "fastllm-torch")} == {"dense", "paged16", "paged256"}
    assert all(r["ok"] == "yes" for r in by_impl(rows, "sdpa-math-cpu"))


def test_attention_reference_pieces_match_whole(monkeypatch):
    monkeypatch.setattr(check, "CHUNK_ELEMS", 4 * 64 * 5)     # 5-row pieces
    q = torch.randn(2, 4, 64, 16)
    k, v = torch.randn(2, 2, 64, 16), torch.randn(2, 2, 64, 16)
    for causal in (False, True):
        want = ref.flash_attention(q, k, v, causal=causal)[0]
        assert torch.allclose(check.attention_reference(q, k, v, causal), want, atol=1e-6)


def test_peer_bars_and_verdict():
    errs = {"a": math.nan, "b": 1e-3, "c": math.inf, "d": 0.5}
    bars = check.peer_bars(errs, round_err=1e-4)
    assert bars["a"] == bars["c"] == bars["d"] == pytest.approx(5e-3)     # b, the best other, sets them
    assert bars["b"] == pytest.approx(1.502)                                # d is the only other finite
    assert check.verdict(errs["a"], bars["a"])[0] is False and check.verdict(errs["c"], bars["c"])[0] is False
    assert check.verdict(errs["b"], bars["b"]) == (True, "yes") and check.verdict(errs["d"], bars["d"])[0] is False
    # Alone (no peer installed, or the others failed), a result is held to the dtype's rounding
    # of the reference: it once passed against its own error, whatever it was.
    alone = check.peer_bars({"x": 0.7, "y": math.nan}, round_err=4e-3)
    assert alone["x"] == pytest.approx(check.ALONE_FACTOR * 4e-3 + 2e-3) and check.verdict(0.7, alone["x"])[0] is False
    assert check.verdict(0.03, alone["x"])[0] is True
    # One kernel in two layouts (decode) does not vouch for itself.
    paged = check.peer_bars({("k", "dense"): 0.7, ("k", "paged"): 0.7}, 1e-3, impl_of=lambda key: key[0])
    assert all(check.verdict(0.7, b)[0] is False for b in paged.values())
    want = torch.tensor([1.0, 1.0 + 2 ** -10, 3.0])
    assert check.rounding_err(want, torch.bfloat16) == 2 ** -10 and check.rounding_err(want, torch.float32) == 0
    g = torch.zeros(10)
    g[7] = math.nan
    assert math.isnan(check.max_abs_err(g, torch.zeros(10)))


# ---------------------------------------------------------------------------------------------
# 1: int8 checks the whole matrix (a wrong middle block used to pass).

def test_int8_matrix_check_sees_the_middle():
    M, N, K = 256, 2048, 64
    a = torch.randint(-127, 128, (M, K), dtype=torch.int8)
    b = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    want = ref.int8_matmul_int32(a, b)

    def want_fn(rs, cs):
        return ref.int8_matmul_int32(a[rs], b[cs])
    assert check.matrix_check(want.clone(), want_fn, exact=True, rtol=0, block=(64, 512)) == (True, "")
    got = want.clone()
    got[130, 1000] += 1                                   # one element, mid-matrix
    ok, why = check.matrix_check(got, want_fn, exact=True, rtol=0, block=(64, 512))
    assert not ok and "rows 128..191" in why
    x = want.double()
    bad = x.clone()
    bad[100] *= 1.2                                       # one row 20% off: not averaged away
    assert not check.matrix_check(bad, lambda rs, cs: x[rs, cs], exact=False, rtol=3e-2)[0]
    assert check.matrix_check(x * (1 + 1e-3), lambda rs, cs: x[rs, cs], exact=False, rtol=3e-2)[0]


def test_int8_suite_flags_a_wrong_middle_row(monkeypatch):
    from fastllm.bench.suites import int8
    orig = fastllm.ops.int8_matmul_int32

    def bad(a, b, **kw):
        out = orig(a, b, **kw).clone()
        out[out.shape[0] // 2] += 1
        return out
    monkeypatch.setattr(fastllm.ops, "int8_matmul_int32", bad)
    ctx = light_ctx(monkeypatch)
    rows = []
    int8.run_gemm(ctx, rows)
    assert_wrong_not_timed([r for r in rows if r["kind"] == "w8a8-int32" and r["impl"] == "fastllm-torch"])
    assert all(r["ok"] == "yes" for r in rows if r["impl"] == "torch._int_mm")


class FakeOutOfResources(Exception):
    """Like Triton's OutOfResources / CompilationError: an Exception, not a RuntimeError."""


@pytest.mark.parametrize("op", ["int8_matmul_int32", "int8_matmul", "int8_matmul_dynamic", "w8a16_matmul"])
def test_int8_suite_survives_an_implementation_that_raises(monkeypatch, op):
    from fastllm.bench.suites import int8

    def boom(*a, **kw):
        raise FakeOutOfResources("out of resource: shared memory")
    monkeypatch.setattr(fastllm.ops, op, boom)
    ctx = light_ctx(monkeypatch)
    rows = int8.run(ctx)
    # The failing implementation is an error (it fails the run), named with the exception; every
    # other row is measured.
    assert any("FakeOutOfResources: out of resource" in why for _, why in ctx.errors), ctx.errors
    assert not any("FakeOutOfResources" in why for _, why in ctx.missing)
    assert rows and all(r["ok"] == "yes" for r in rows)
    # (int8_matmul is the only implementation of the w8a8 kind on CPU: that kind is gone.)
    assert {r["kind"] for r in rows} >= {"w8a8-int32", "w8a8-linear", "w8a16"}


def test_sparse24_suite_survives_an_implementation_that_raises(monkeypatch):
    from fastllm.bench.suites import sparse24
    monkeypatch.setattr(sparse24, "CPU_SHAPES", [("cpu", 32, 128)])
    monkeypatch.setattr(sparse24, "CPU_TOKENS", [3])

    def boom(*a, **kw):
        raise FakeOutOfResources()    # no message: the report still names it
    monkeypatch.setattr(fastllm.ops, "sparse24_matmul", boom)
    ctx = light_ctx(monkeypatch)
    rows = sparse24.run(ctx)
    assert any(why == "FakeOutOfResources" for _, why in ctx.errors), ctx.errors
    assert by_impl(rows, "dense-matmul") and by_impl(rows, "fastllm-torch-int8")


def test_a_raising_fastllm_implementation_fails_the_run(monkeypatch, capsys):
    # Regression: its error went to "missing / skipped peers" and the run exited 0.
    def boom(*a, **kw):
        raise FakeOutOfResources("out of resource: shared memory")
    monkeypatch.setattr(fastllm.ops, "w8a16_matmul", boom)
    monkeypatch.setattr(bench, "measure_peaks", lambda device, quick=False: dict(PEAKS))
    assert bench.main(["int8", "--device", "cpu", "--quick", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "ERRORS (fastllm implementations that raised)" in out and "w8a16" in out


def test_int8_short_output_is_wrong(monkeypatch):
    # Regression: the check took M, N from the output, so one missing row passed.
    from fastllm.bench.suites import int8
    orig = fastllm.ops.int8_matmul_int32
    monkeypatch.setattr(fastllm.ops, "int8_matmul_int32", lambda a, b, **kw: orig(a, b, **kw)[:-1])
    ctx = light_ctx(monkeypatch)
    rows = []
    int8.run_gemm(ctx, rows)
    bad = [r for r in rows if r["kind"] == "w8a8-int32" and r["impl"] == "fastllm-torch"]
    assert_wrong_not_timed(bad)
    assert "shape" in bad[0]["ok"]


def test_error_line():
    assert check.error_line(ValueError("first\nsecond")) == "ValueError: first"
    assert check.error_line(AssertionError()) == "AssertionError"
    assert len(check.error_line(RuntimeError("x" * 500))) == 120


# ---------------------------------------------------------------------------------------------
# 6 / 9 / 13 / 14: int8 shapes, dtypes, peaks and bytes.

def test_int8_linear_keeps_model_layers_with_m_equal_n():
    import types
    from fastllm.bench.suites import int8
    ctx = types.SimpleNamespace(device=torch.device("cuda"), quick=True, shapes=["square", "llama3-8b"])
    gemm = int8._gemm_shapes(ctx)
    linear = int8._gemm_shapes(ctx, square=False)
    assert (4096, 4096, 4096, "square") in gemm and (4096, 4096, 4096, "4096x4096") in gemm
    assert (4096, 4096, 4096, "4096x4096") in linear                       # o_proj at M = 4096
    assert not [s for s in linear if s[3] == "square"]
    assert len(linear) == 4 * len(int8.QUICK_TOKENS)
    ctx.shapes = ["llama3-8b", "mistral-7b"]                               # same layers: measured once
    assert int8._gemm_shapes(ctx, square=False) == linear


def test_int8_rows_dtype_bytes_and_peaks(monkeypatch):
    from fastllm.bench.suites import int8
    ctx = light_ctx(monkeypatch, "--dtype", "bf16")
    rows = int8.run(ctx)
    assert all(r["ok"] == "yes" for r in rows), [r for r in rows if r["ok"] != "yes"]
    base = [r for r in rows if r["impl"].startswith("torch.matmul-")]
    assert base and all(r["impl"] == "torch.matmul-bfloat16" and r["dtype"] == "bfloat16" for r in base)
    assert {r["dtype"] for r in rows if r["kind"] in ("w8a8-linear", "w8a16")} == {"bfloat16"}
    for r in rows:
        if r["impl"] == "F.linear-bfloat16":       # 2 bytes per bf16 weight, activation and output
            nbytes = r["GB/s"] * 1e9 * r["ms"] / 1e3
            assert nbytes == pytest.approx(2 * (r["M"] * r["K"] + r["N"] * r["K"] + r["M"] * r["N"]), rel=1e-6)
    dense = ("torch.matmul-bfloat16", "F.linear-bfloat16")
    int8_rows = [r for r in rows if r["kind"] != "w8a16" and r["impl"] not in dense]
    assert int8_rows and all(r["frac_peak"] == pytest.approx(r["TOPS"] / PEAKS["int_mm_tops"]) for r in int8_rows)
    assert all(r["frac_peak"] is None for r in rows if r["kind"] != "w8a16" and r["impl"] in dense)  # no bf16 peak


def test_cpu_peaks_include_int_mm():
    from fastllm.bench.timing import measure_peaks
    peaks = measure_peaks("cpu", quick=True)
    assert peaks["int_mm_tops"] is not None and peaks["int_mm_tops"] > 0


# ---------------------------------------------------------------------------------------------
# 2: sparse24's int8 rows check the op they time, in TOPS over the int8 peak.

def test_sparse24_int8_rows_check_the_timed_op(monkeypatch):
    from fastllm.bench.suites import sparse24
    monkeypatch.setattr(sparse24, "CPU_SHAPES", [("cpu", 32, 128)])
    monkeypatch.setattr(sparse24, "CPU_TOKENS", [3])
    ctx = light_ctx(monkeypatch)
    good = sparse24.run(ctx)
    i8 = by_impl(good, "fastllm-torch-int8")
    assert i8 and all(r["ok"] == "yes" and r["TOPS"] > 0 and r.get("TFLOP/s") is None for r in i8)
    assert i8[0]["frac_peak"] == pytest.approx(i8[0]["TOPS"] / PEAKS["int_mm_tops"])
    # The int32 op stays right; the timed fused op returns garbage.
    monkeypatch.setattr(fastllm.ops, "sparse24_int8_matmul",
                        lambda a, values, meta, *args, **kw: torch.randn(a.shape[0], values.shape[0]) * 100)
    assert_wrong_not_timed(by_impl(sparse24.run(ctx), "fastllm-torch-int8"))


# ---------------------------------------------------------------------------------------------
# 3 / 9: the model suite checks 2:4 modes against the same pruned weights.

def test_model_sparse_modes_are_checked(monkeypatch):
    from fastllm.bench.suites import model
    monkeypatch.setattr(model, "MODES", {m: model.MODES[m] for m in ("unpatched", "2:4", "2:4+int8")})
    ctx = light_ctx(monkeypatch, "--quick")
    rows = model.run(ctx)
    sparse = [r for r in rows if r["mode"] in ("2:4", "2:4+int8")]
    assert sparse and all(r["ok"] == "yes" and r["tokens/s"] > 0 for r in sparse), sparse
    assert all(r["checked_against"] == "unpatched, same pruned weights" for r in sparse)
    assert all(r["rel_err"] < 1e-4 for r in sparse if r["mode"] == "2:4")       # fp32: exact bound
    assert all(r["rel_err_unpatched"] > r["rel_err"] for r in sparse)          # pruning's own cost


def test_model_garbage_sparse_kernel_is_wrong(monkeypatch):
    from fastllm.bench.suites import model
    monkeypatch.setattr(model, "MODES", {m: model.MODES[m] for m in ("unpatched", "2:4", "2:4+int8")})
    ctx = light_ctx(monkeypatch, "--quick")
    monkeypatch.setattr(fastllm.ops, "sparse24_matmul",
                        lambda x, values, meta, *a, **k: torch.randn(x.shape[0], values.shape[0], dtype=x.dtype) * 100)
    monkeypatch.setattr(fastllm.ops, "sparse24_int8_matmul",
                        lambda a, values, meta, *args, **k: torch.randn(a.shape[0], values.shape[0]) * 100)
    rows = model.run(ctx)
    assert_wrong_not_timed([r for r in rows if r["mode"] in ("2:4", "2:4+int8")])
    assert all(r["config"] == "tiny-llama (CPU)" for r in rows)


def test_a_raising_mode_or_backend_costs_only_its_rows(monkeypatch):
    # A patched forward that raises (a Triton OutOfResources in one mode) lost every mode's
    # rows, unpatched included; a raising quantize backend lost the suite. Now it is an error
    # of the run (exit 1) and the rest is kept.
    from fastllm.bench.suites import model, quantize
    monkeypatch.setattr(model, "MODES", {m: model.MODES[m] for m in ("unpatched", "w8a16", "exact")})
    ctx = light_ctx(monkeypatch, "--quick")

    class OutOfResources(Exception):
        pass

    def broken(*a, **k):
        raise OutOfResources("shared memory")
    monkeypatch.setattr(fastllm.ops, "w8a16_matmul", broken)
    rows = model.run(ctx)
    assert {r["mode"] for r in rows} == {"unpatched", "exact"} and all(r["ok"] != "WRONG" for r in rows)
    assert any("w8a16" in what and "shared memory" in why for what, why in ctx.errors)
    monkeypatch.setattr(quantize, "CPU_SHAPES", [(3, 64)])
    monkeypatch.setattr(fastllm.ops, "quantize_per_token", broken)
    ctx = light_ctx(monkeypatch)
    assert quantize.run(ctx) == [] and any("quantize M=3" in what for what, _ in ctx.errors)


def test_model_cpu_notes_fixed_dtype(monkeypatch):
    from fastllm.bench.suites import model
    monkeypatch.setattr(model, "MODES", {"unpatched": None})
    ctx = light_ctx(monkeypatch, "--quick", "--dtype", "bf16")
    rows = model.run(ctx)
    assert {r["dtype"] for r in rows} == {"float32"}
    assert any("float32" in n and "--dtype" in n for n in ctx.notes)


# ---------------------------------------------------------------------------------------------
# 12 / 15: what is not timed is listed, with the reason.

def test_backends_list_missing_and_skip_torch_on_cuda(monkeypatch):
    ctx = light_ctx(monkeypatch)
    op = fastllm.ops.OPS["quantize_per_token"]
    x = torch.randn(4, 64)
    assert ctx.backends(op, x.device, x) == ["torch"]
    missing = dict(ctx.missing)
    assert "needs CUDA tensors" in missing["fastllm-cuda (quantize_per_token)"]
    assert "fastllm-triton (quantize_per_token)" in missing

    class AllCan:      # a CUDA device where every backend could serve
        name, order = "fake_op", ("cuda", "triton", "torch")

        @staticmethod
        def reason(b, device, *a, auto=False):
            return None
    ctx.missing.clear()
    assert ctx.backends(AllCan, torch.device("cuda"), x) == ["cuda", "triton"]
    assert "pure-PyTorch reference" in dict(ctx.missing)["fastllm-torch (fake_op)"]
    ctx.requested = ["torch"]
    assert ctx.backends(AllCan, torch.device("cuda"), x) == ["torch"]


def test_attention_cpu_lists_gpu_peers_missing(monkeypatch):
    from fastllm.bench.suites import attention
    monkeypatch.setattr(attention, "_shapes", lambda ctx: [("fa2", 2, 2, 16, 32, 0)])
    ctx = light_ctx(monkeypatch)
    attention.run(ctx)
    missing = dict(ctx.missing)
    for peer in ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "flash-attn"):
        assert "needs a CUDA GPU" in missing[peer]


def test_attention_bias_presets(monkeypatch):
    """The bias presets time flash_attention(bias=) against SDPA with the bias as a float attn_mask
    (causal merged into it), checked against the reference with the bias: a kernel that ignored
    the bias is WRONG. On a GPU their table stops at 4k (the bias is H * S^2 elements)."""
    from fastllm.bench.suites import attention
    ctx = light_ctx(monkeypatch, "--shapes", "bias-d64,fa2")
    ctx.device = torch.device("cuda")                       # (only _shapes reads it here)
    lens = {name: [s for n, *_, s, w in attention._shapes(ctx) if n == name] for name in ("bias-d64", "fa2")}
    assert lens["bias-d64"] == [512, 1024, 2048, 4096] and max(lens["fa2"]) == 16384
    monkeypatch.setattr(attention, "_shapes", lambda ctx: [("bias-d64", 2, 2, 16, 40, 0)])
    rows = attention.run(light_ctx(monkeypatch))
    assert {r["impl"] for r in rows} == {"fastllm-torch", "sdpa-math-cpu"} and len(rows) == 4
    assert all(r["ok"] == "yes" for r in rows), rows
    orig = fastllm.ops.flash_attention
    monkeypatch.setattr(fastllm.ops, "flash_attention", lambda q, k, v, bias=None, **kw: orig(q, k, v, **kw))
    rows = attention.run(light_ctx(monkeypatch))
    assert_wrong_not_timed(by_impl(rows, "fastllm-torch"))
    assert all(r["ok"] == "yes" for r in by_impl(rows, "sdpa-math-cpu"))


def test_attention_sink_presets(monkeypatch):
    """gpt-oss times both its layer kinds (full and a 128-key window), causal only, with sinks;
    SDPA gets them as an extra key's mask column and must agree with the reference. A kernel
    dropping the sinks or the window is WRONG. FLOPs count only the pairs the window keeps."""
    from fastllm.bench.suites import attention
    from fastllm.ref.attention import allowed_keys
    ctx = light_ctx(monkeypatch, "--shapes", "gpt-oss")
    ctx.device = torch.device("cuda")                       # (only _shapes reads it here)
    assert {(w, s) for *_, s, w in attention._shapes(ctx)} == {(w, s) for w in (0, 128) for s in attention.SEQLENS}
    for S, W in ((5, 2), (300, 128), (100, 128)):
        assert attention.pairs(S, True, W) == allowed_keys(S, S, causal=True, window=W).sum().item()
    sdpa = attention._sdpa_backends([])
    q = torch.zeros(1, 1, attention.BIAS_MAX_S + 1, 8)
    assert "no attn_mask" in sdpa["sdpa-flash"](q, q, q, True, None, 0, torch.zeros(1))
    assert "float mask" in sdpa["sdpa-efficient"](q, q, q, True, None, 128, torch.zeros(1))
    monkeypatch.setattr(attention, "_shapes", lambda ctx: [("gpt-oss", 4, 2, 16, 37, w) for w in (0, 9)])
    rows = attention.run(light_ctx(monkeypatch))
    assert {(r["impl"], r["causal"], r["window"]) for r in rows} == {
        (i, True, w) for i in ("fastllm-torch", "sdpa-math-cpu") for w in (None, 9)}
    assert all(r["ok"] == "yes" for r in rows), rows
    orig = fastllm.ops.flash_attention
    for drop in ("sinks", "window"):
        monkeypatch.setattr(fastllm.ops, "flash_attention",
                            lambda q, k, v, drop=drop, **kw: orig(q, k, v, **dict(kw, **{drop: None})))
        rows = attention.run(light_ctx(monkeypatch))
        bad = [r for r in by_impl(rows, "fastllm-torch") if drop == "sinks" or r["window"]]
        assert_wrong_not_timed(bad)
        assert all(r["ok"] == "yes" for r in by_impl(rows, "sdpa-math-cpu"))


def test_sdpa_peers_inputs(monkeypatch):
    """What each SDPA peer is handed (the kernels themselves need a GPU: SDPA's math backend
    stands in): sinks and the window through the mask and one padded key, K/V repeated per
    query head for the efficient backend only (it takes no GQA); the results match the reference."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from fastllm.bench.suites import attention
    seen = {}
    orig = attention._sdpa

    def math_sdpa(q, k, v, mask, causal):
        seen.setdefault("kv_heads", []).append(k.shape[1])
        with sdpa_kernel([SDPBackend.MATH]):
            return orig(q, k, v, mask, causal)
    monkeypatch.setattr(attention, "_sdpa", math_sdpa)
    q = torch.randn(2, 8, 19, 16)
    k, v = (torch.randn(2, 2, 19, 16) for _ in range(2))
    sinks = torch.randn(8)
    want = check.attention_reference(q, k, v, True, window=5, sinks=sinks)
    for name, prepare in attention._sdpa_backends([]).items():
        if name != "sdpa-flash":
            torch.testing.assert_close(prepare(q, k, v, True, None, 5, sinks)().float(), want, atol=1e-5, rtol=1e-5)
    assert seen["kv_heads"] == [8, 2]      # efficient: repeated; cuDNN: GQA as is


def test_decode_sink_preset(monkeypatch):
    """gpt-oss decode passes its sinks to every implementation (SDPA: an extra key's mask column)
    and checks them: a kernel dropping them is WRONG."""
    from fastllm.bench.suites import decode
    monkeypatch.setattr(decode, "PRESETS", dict(decode.PRESETS, **{"gpt-oss": (8, 2, 16)}))
    rows = decode.run(light_ctx(monkeypatch, "--shapes", "gpt-oss"))
    assert {(r["impl"], r["layout"]) for r in rows} == {
        ("fastllm-torch", "dense"), ("fastllm-torch", "paged16"), ("fastllm-torch", "paged256"),
        ("sdpa-math-cpu", "dense")}
    assert all(r["ok"] == "yes" for r in rows), rows
    orig = fastllm.ops.decode_attention
    monkeypatch.setattr(fastllm.ops, "decode_attention", lambda q, k, v, sinks=None, **kw: orig(q, k, v, **kw))
    rows = decode.run(light_ctx(monkeypatch, "--shapes", "gpt-oss"))
    assert_wrong_not_timed(by_impl(rows, "fastllm-torch"))
    assert all(r["ok"] == "yes" for r in by_impl(rows, "sdpa-math-cpu"))


def _fake_flash_attn(causal_window_keys):
    """A stand-in flash_attn module on CPU, written from flash-attn's documented semantics
    (window_size=(left, right): query i sees keys i + Sk - Sq - left .. i + Sk - Sq + right;
    return_attn_probs / return_softmax_lse also return lse (B, H, Sq)); for the peers' glue."""
    def attend(q, k, v, causal, window_size=(-1, -1)):
        B, Sq, H, D = q.shape
        Sk = k.shape[1]
        k, v = (t.repeat_interleave(H // t.shape[2], dim=2) for t in (k, v))
        s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / D ** 0.5
        i = torch.arange(Sq)[:, None] + Sk - Sq
        j = torch.arange(Sk)[None, :]
        left, right = window_size
        hi = i if causal else (i + right if right >= 0 else Sk)
        lo = i - left if left >= 0 else torch.full_like(i, -1)
        ok = (j <= hi) & (j >= lo)
        causal_window_keys.append(int(ok.sum()))
        s = s.masked_fill(~ok, float("-inf"))
        lse = s.logsumexp(-1)
        out = torch.einsum("bhqk,bkhd->bqhd", (s - lse[..., None]).exp(), v.float()).to(q.dtype)
        return out, lse

    mod = types.ModuleType("flash_attn")

    def flash_attn_func(q, k, v, causal=False, window_size=(-1, -1), return_attn_probs=False):
        out, lse = attend(q, k, v, causal, window_size)
        return (out, lse, None) if return_attn_probs else out

    def flash_attn_with_kvcache(q, k, v, cache_seqlens=None, block_table=None, return_softmax_lse=False):
        if block_table is not None:   # pages (num_pages, page, Hkv, D) -> (B, pages x page, Hkv, D)
            k, v = (t[block_table.long()].flatten(1, 2) for t in (k, v))
        n = int(cache_seqlens.max())
        assert (cache_seqlens == n).all()             # (the benchmark's caches are all full)
        out, lse = attend(q, k[:, :n], v[:, :n], False)
        return (out, lse) if return_softmax_lse else out
    mod.flash_attn_func, mod.flash_attn_with_kvcache = flash_attn_func, flash_attn_with_kvcache
    return mod


def test_flash_attn_peer_glue_sinks_window(monkeypatch):
    """The flash-attn peers' glue (window -> window_size, sinks from the lse: out * sigmoid(lse -
    sink)) against the reference, through a CPU stand-in for flash_attn."""
    from fastllm.bench.suites import attention, decode
    keys = []
    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash_attn(keys))
    q = torch.randn(2, 8, 21, 16).transpose(1, 2).contiguous().transpose(1, 2)
    k, v = (torch.randn(2, 2, 21, 16) for _ in range(2))
    sinks = torch.randn(8) * 2
    prepare = attention._flash_attn([])["flash-attn"]
    for W, z in ((0, None), (5, None), (0, sinks), (5, sinks)):
        got = prepare(q, k, v, True, None, W, z)()
        want = check.attention_reference(q, k, v, True, window=W, sinks=z)
        torch.testing.assert_close(got.float(), want, atol=1e-5, rtol=1e-5)
    assert keys[:2] == [attention.pairs(21, True, 0) + 21 / 2, attention.pairs(21, True, 5)]
    assert isinstance(prepare(q, k, v, True, torch.zeros(1, 8, 21, 21), 0, None), str)   # takes no bias
    qd = torch.randn(3, 8, 1, 16)
    kc, vc = (torch.randn(3, 2, 30, 16) for _ in range(2))
    lens = torch.full((3,), 30, dtype=torch.int32)
    peers = decode._peers(torch.device("cuda"), [])
    want = decode._reference(qd, kc, vc, lens, sinks)
    paged = {page: decode._paged(kc, vc, page) for page in (16, 256)}
    calls = peers["flash-attn"](qd, kc, vc, lens, sinks, paged)
    assert set(calls) == {"bshd", "paged256"}      # flash-attn's pages are multiples of 256 keys
    for call in calls.values():
        torch.testing.assert_close(call().float(), want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# 10: attention / decode presets (GQA heads) run on CPU too.

def test_attention_and_decode_presets(monkeypatch):
    from fastllm.bench.suites import attention, decode
    ctx = light_ctx(monkeypatch, "--shapes", "qwen2.5-7b")
    assert attention._shapes(ctx) == [("qwen2.5-7b", 28, 4, 128, 256, 0)]
    # Same GQA ratio, smaller heads (CPU seconds).
    monkeypatch.setattr(decode, "PRESETS", dict(decode.PRESETS, **{"qwen2.5-7b": (7, 1, 32)}))
    rows = decode.run(ctx)
    assert rows and all(r["ok"] == "yes" and (r["shape"], r["Hq"], r["Hkv"]) == ("qwen2.5-7b", 7, 1) for r in rows)
    for table in (attention.PRESETS, decode.PRESETS):
        assert {"llama3-8b", "llama3-70b", "mistral-7b", "qwen2.5-7b"} <= set(table)
