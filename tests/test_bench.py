"""The benchmark harness runs end to end on CPU (smoke test; no speed is asserted). The checks,
CLI and reports in detail: test_bench_checks.py, test_bench_cli.py, test_bench_demo.py."""
import json
import subprocess
import sys


def test_quantize_bench_cpu(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fastllm.bench", "quantize", "--quick", "--device", "cpu",
                          "--json", str(tmp_path / "b.json"), "--markdown", str(tmp_path / "b.md"),
                          "--no-progress"], capture_output=True, text=True, check=True).stdout
    assert "CPU" in out and "| fastllm-torch |" in out     # named as in every other suite
    data = json.loads((tmp_path / "b.json").read_text())
    rows = data["results"]["quantize"]
    assert rows and all(r["ok"] == "yes" and r["ms"] > 0 for r in rows)
    assert data["peaks"]["copy_gbs"] > 0 and data["peaks"]["int_mm_tops"] > 0
    assert {"commit", "python", "torch", "triton", "transformers", "cuda", "args"} <= set(data)
    assert any(w.startswith("fastllm-cuda") for w, _ in data["missing"])     # listed without --backend
    assert "## quantize" in (tmp_path / "b.md").read_text()
