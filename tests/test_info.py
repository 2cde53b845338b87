"""`python -m fastllm.info` tells the truth about this machine."""
import json
import subprocess
import sys

import torch

from conftest import DEVICE


def _run(*args):
    return subprocess.run([sys.executable, "-m", "fastllm.info", *args], capture_output=True, text=True,
                          check=True).stdout


def test_info_text():
    out = _run("--kernels")
    assert out.startswith("fastllm ")
    assert "quantize_per_token" in out
    if DEVICE == "cpu":
        assert "-> torch" in out and "needs CUDA tensors (got cpu)" in out


def test_info_json_matches_build():
    from fastllm import _ext
    info = json.loads(_run("--json"))
    assert info["torch"] == torch.__version__
    bi = _ext.build_info()
    assert info["build"].get("archs") == bi.get("archs")
    row = next(r for r in info["ops"] if r["op"] == "quantize_per_token")
    assert set(row["reasons"]) == {"cuda", "triton", "torch"}
    assert row["backend"] == ("torch" if DEVICE == "cpu" else row["backend"])


def test_devices_say_cpu_only_torch_first(monkeypatch):
    from fastllm import _ext, info

    class Mod:      # an extension whose runtime cannot use the driver
        device_count = staticmethod(lambda: -35)
        error_string = staticmethod(lambda code: "CUDA driver version is insufficient")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(_ext, "_load", lambda: (Mod, None))
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(_ext, "driver_present", lambda: True)
    assert info._devices() == ("none (this PyTorch is a CPU-only build; fastllm._C's CUDA runtime: CUDA driver "
                               "version is insufficient)")
    monkeypatch.setattr(_ext, "driver_present", lambda: False)   # the runtime says the same then
    assert info._devices() == "none (this PyTorch is a CPU-only build; no NVIDIA driver (libcuda.so.1 not found))"
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(_ext, "_load", lambda: (None, "not built"))
    assert info._devices() == "none (torch.cuda.is_available() is False with PyTorch's CUDA 12.4)"


def test_kernels_listing_shows_ptxas_advisories():
    from fastllm import info
    inf = info.collect()
    inf["kernels"] = [{"arch": "sm_90a", "kernel": "k", "registers": 168, "smem": 0, "spill_stores": 0,
                       "spill_loads": 0, "advisories": ["C7511 Potential Performance Loss: wgmma serialized"]},
                      {"arch": "sm_80", "kernel": "old_report"}]       # a build from before advisories
    out = info.render(inf, kernels=True).splitlines()
    i = next(i for i, line in enumerate(out) if line.endswith("  k"))
    assert out[i + 1].strip() == "ptxas: C7511 Potential Performance Loss: wgmma serialized"
    assert out[-1].endswith("old_report")
