"""`python -m fastllm.bench`'s command line and reports: arguments checked before anything runs,
valid JSON with what produced it, readable markdown, plots that never join incompatible points
(in-process; the peak measurement is stubbed where a run is not the point)."""
import importlib.util
import json
import math
import re
import sys
import types

import pytest
import torch

from fastllm.bench import __main__ as bench
from fastllm.bench import report

PEAKS = {"matmul_bf16_tflops": None, "matmul_fp32_tflops": 0.1, "int_mm_tops": 0.2, "copy_gbs": 10.0}


@pytest.fixture
def no_run(monkeypatch):
    """Fail the test if anything starts running (the peaks are the first thing a run does)."""
    def boom(*a, **k):
        raise AssertionError("the run started before the arguments were checked")
    monkeypatch.setattr(bench, "measure_peaks", boom)


@pytest.fixture
def tiny_quantize(monkeypatch):
    from fastllm.bench.suites import quantize
    monkeypatch.setattr(quantize, "CPU_SHAPES", [(2, 64)])
    monkeypatch.setattr(bench, "measure_peaks", lambda device, quick=False: dict(PEAKS))


def usage_error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# 9 / 10 / 11 / 7: bad arguments are usage errors, before any work.

def test_unknown_dtype_is_a_usage_error(capsys, no_run):
    err = usage_error(capsys, ["quantize", "--device", "cpu", "--dtype", "bf16,float8"])
    assert "--dtype" in err and "'float8'" in err and "bf16, fp16, fp32" in err


def test_unknown_backend_is_a_usage_error(capsys, no_run):
    err = usage_error(capsys, ["quantize", "--device", "cpu", "--backend", "cudnn"])
    assert "--backend" in err and "'cudnn'" in err


def test_shapes_checked_per_suite_up_front(capsys, no_run):
    err = usage_error(capsys, ["sparse24", "--device", "cpu", "--shapes", "square,llama-3-8b"])
    assert "llama-3-8b" in err and "sparse24" in err and "qwen2.5-7b" in err
    err = usage_error(capsys, ["all", "--device", "cpu", "--shapes", "llama3-70b"])     # model has no 70b
    assert "model suite" in err and "llama3.2-1b" in err
    err = usage_error(capsys, ["attention", "--device", "cpu", "--shapes", "square"])
    assert "attention suite" in err and "fa2" in err


def test_every_suite_knows_the_model_presets():
    for name in bench.SUITES:
        table = importlib.import_module(f"fastllm.bench.suites.{name}").PRESETS
        assert {"mistral-7b", "qwen2.5-7b"} <= set(table), name
    from fastllm.bench.suites import int8, model, sparse24
    assert (4608, 3584) in int8.MODELS["qwen2.5-7b"] and (37888, 3584) in int8.MODELS["qwen2.5-7b"]
    assert ("qkv", 6144, 4096) in sparse24.SHAPES["mistral-7b"]
    assert model.CONFIGS["qwen2.5-7b"][:6] == (3584, 28, 28, 4, 128, 18944)


def test_unwritable_outputs_fail_up_front(capsys, no_run, tmp_path):
    err = usage_error(capsys, ["quantize", "--device", "cpu", "--json", str(tmp_path / "no" / "dir" / "b.json")])
    assert "--json" in err and "cannot write" in err
    err = usage_error(capsys, ["quantize", "--device", "cpu", "--markdown", str(tmp_path)])
    assert "--markdown" in err and "is a directory" in err
    assert list(tmp_path.iterdir()) == []          # the check leaves nothing behind


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is not None, reason="matplotlib is installed")
def test_plot_without_matplotlib_fails_up_front(capsys, no_run, tmp_path):
    err = usage_error(capsys, ["quantize", "--device", "cpu", "--plot", str(tmp_path / "p.png"),
                               "--json", str(tmp_path / "b.json")])
    assert "matplotlib" in err and not (tmp_path / "b.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")
def test_cuda_device_without_cuda_is_a_usage_error(capsys, no_run):
    assert "no CUDA device" in usage_error(capsys, ["quantize", "--device", "cuda"])
    for bad in ("tpu", "cpu:x"):       # torch's own message listed every device type it knows
        err = usage_error(capsys, ["quantize", "--device", bad])
        assert f"--device {bad}: expected" in err and "privateuseone" not in err


# ---------------------------------------------------------------------------------------------
# 8 / 12 / 17: the JSON says what produced it; an interrupt during the peaks keeps a report.

def test_json_records_environment_and_missing(tiny_quantize, tmp_path, capsys):
    out = tmp_path / "b.json"
    assert bench.main(["quantize", "--device", "cpu", "--quick", "--no-progress", "--json", str(out),
                       "--markdown", str(tmp_path / "b.md")]) == 0
    data = json.loads(out.read_text())
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", data["commit"] or "") or data["commit"] is None
    for key in ("python", "torch", "triton", "transformers", "cuda", "fastllm", "argv", "args"):
        assert key in data
    assert data["args"]["suite"] == "quantize" and "--quick" in data["argv"]
    assert data["results"]["quantize"][0]["ok"] == "yes"
    missing = {w: y for w, y in data["missing"]}
    assert "needs CUDA tensors" in missing["fastllm-cuda (quantize_per_token)"]
    assert "commit" in (tmp_path / "b.md").read_text()


def test_a_failing_suite_does_not_cost_the_others(tiny_quantize, monkeypatch, tmp_path, capsys):
    # A Triton CompilationError is no RuntimeError: it ended `all` before; now the suite is noted
    # as FAILED, the others run, and the exit status says something failed.
    from fastllm.bench.suites import decode

    class CompilationError(Exception):
        pass

    def broken(ctx):
        raise CompilationError("ptxas died")
    monkeypatch.setattr(decode, "run", broken)
    monkeypatch.setattr(bench, "SUITES", ["decode", "quantize"])
    out = tmp_path / "b.json"
    assert bench.main(["all", "--device", "cpu", "--quick", "--no-progress", "--json", str(out)]) == 1
    data = json.loads(out.read_text())
    assert "decode" not in data["results"] and data["results"]["quantize"][0]["ok"] == "yes"
    assert any("suite decode FAILED" in n and "ptxas died" in n for n in data["notes"])


def test_commit_falls_back_to_build_info(monkeypatch):
    from fastllm import _ext
    # The device machine gets the tree without .git: FASTLLM_COMMIT names it; without it the
    # build's commit counts unless setup.py could not tell it either ("unknown": None, not a sha).
    monkeypatch.setenv("FASTLLM_COMMIT", "feed42")
    assert bench.commit_of_run() == ("feed42", "FASTLLM_COMMIT")
    monkeypatch.delenv("FASTLLM_COMMIT")
    monkeypatch.setattr(bench, "_git_commit", lambda: None)
    for built, want in (("unknown", (None, None)), ("f00d-dirty", ("f00d-dirty", "build_info"))):
        monkeypatch.setattr(_ext, "build_info", lambda built=built: {"commit": built})
        assert bench.commit_of_run() == want
    monkeypatch.setattr(_ext, "build_info", lambda: {"commit": "abc123"})
    env = bench.environment(bench.parser().parse_args(["quantize"]), ["quantize"])
    assert (env["commit"], env["commit_source"]) == ("abc123", "build_info")
    monkeypatch.setattr(_ext, "build_info", lambda: {})
    env = bench.environment(bench.parser().parse_args(["quantize"]), ["quantize"])
    assert (env["commit"], env["commit_source"]) == (None, None)


def test_interrupt_during_peaks_keeps_a_report(monkeypatch, tmp_path, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(bench, "measure_peaks", interrupted)
    out, md = tmp_path / "b.json", tmp_path / "b.md"
    assert bench.main(["quantize", "--device", "cpu", "--json", str(out), "--markdown", str(md)]) == 130
    data = json.loads(out.read_text())
    assert data["interrupted"] == "peaks" and data["results"] == {} and data["peaks"] is None
    assert "INTERRUPTED during peaks" in md.read_text()


def test_interrupt_inside_a_suite_keeps_its_rows(tiny_quantize, monkeypatch, tmp_path, capsys):
    # gpu_suite.sh's timeout interrupts `all` where it is: the finished suites and the rows the
    # running one measured so far are saved (it lost the whole suite before).
    from fastllm.bench.suites import decode

    def cut_short(ctx):
        rows = ctx.rows()
        rows.append(dict(impl="fastllm-torch", S=128, ok="yes"))
        raise KeyboardInterrupt
    monkeypatch.setattr(decode, "run", cut_short)
    monkeypatch.setattr(bench, "SUITES", ["quantize", "decode"])
    out, md = tmp_path / "b.json", tmp_path / "b.md"
    assert bench.main(["all", "--device", "cpu", "--quick", "--no-progress", "--json", str(out),
                       "--markdown", str(md)]) == 130
    data = json.loads(out.read_text())
    assert data["interrupted"] == "decode" and data["results"]["quantize"][0]["ok"] == "yes"
    assert data["results"]["decode"] == [dict(impl="fastllm-torch", S=128, ok="yes")]
    assert any("decode INTERRUPTED" in n for n in data["notes"])
    assert "decode (interrupted: partial)" in md.read_text()


# ---------------------------------------------------------------------------------------------
# 4 / 14: valid JSON, readable numbers.

def test_write_json_is_valid_with_nan_and_inf(tmp_path):
    p = tmp_path / "x.json"
    report.write_json(p, {"a": math.nan, "b": [1.0, math.inf, -math.inf], "c": {"d": (2, math.nan)},
                          "e": torch.float32})
    text = p.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [1.0, None, None], "c": {"d": [2, None]}, "e": "torch.float32"}


def test_fmt_significant_digits():
    assert report.fmt(0.0123456) == "0.0123"
    assert report.fmt(1.23456e-5) == "1.23e-05"         # a microsecond in ms: not 0.00
    assert report.fmt(4.5678) == "4.57" and report.fmt(27392.44) == "27392"
    assert report.fmt(0.0) == "0" and report.fmt(None) == "-" and report.fmt(7) == "7"
    assert report.fmt(math.nan) == "nan"


# ---------------------------------------------------------------------------------------------
# 7: plots: one line per series, per-suite file names for any suffix.

class FakePlt(types.ModuleType):
    def __init__(self):
        super().__init__("matplotlib.pyplot")
        self.lines, self.saved = [], []
        plt = self

        class Ax:
            def plot(self, xs, ys, marker=None, label=None):
                plt.lines.append((label, list(xs)))

            def __getattr__(self, name):
                return lambda *a, **k: None

        class Fig:
            def tight_layout(self):
                pass

            def savefig(self, path, dpi=None):
                plt.saved.append(str(path))
        self.subplots = lambda figsize=None: (Fig(), Ax())


@pytest.fixture
def fake_mpl(monkeypatch):
    plt = FakePlt()
    mpl = types.ModuleType("matplotlib")
    mpl.use = lambda *a, **k: None
    mpl.pyplot = plt
    monkeypatch.setitem(sys.modules, "matplotlib", mpl)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", plt)
    return plt


def test_plot_groups_by_every_series_key(fake_mpl, tmp_path):
    rows = [dict(impl="a", dtype=d, causal=c, S=s, y=1.0) for d in ("bf16", "fp16") for c in (False, True)
            for s in (512, 1024)]
    report.plot(tmp_path / "p.png", rows, x="S", y="y", series=("impl", "dtype", "causal"), title="t")
    assert len(fake_mpl.lines) == 4 and all(xs == [512, 1024] for _, xs in fake_mpl.lines)
    with pytest.raises(ValueError, match="series key is missing"):
        report.plot(tmp_path / "p.png", rows, x="S", y="y", series=("impl", "dtype"), title="t")


def test_plot_paths_and_specs():
    assert report.plot_path("out/b.PNG", "int8") == "out/b-int8.PNG"
    assert report.plot_path("b.v2.svg", "decode") == "b.v2-decode.svg"
    assert report.plot_path("plot", "model") == "plot-model"
    for name in bench.SUITES:
        spec = importlib.import_module(f"fastllm.bench.suites.{name}").PLOT
        assert isinstance(spec["series"], tuple) and spec["x"] not in spec["series"], name


def test_plot_files_per_suite(fake_mpl, tiny_quantize, tmp_path, capsys):
    assert bench.main(["quantize", "--device", "cpu", "--quick", "--no-progress",
                       "--plot", str(tmp_path / "p.PNG"), "--json", str(tmp_path / "b.json")]) == 0
    assert fake_mpl.saved == [str(tmp_path / "p.PNG")]
    assert json.loads((tmp_path / "b.json").read_text())["results"]["quantize"]
