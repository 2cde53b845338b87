"""Backend registry: auto selection, forcing (argument and FASTLLM_BACKEND), no silent
fallback, arch messages."""
import os
import warnings

import pytest
import torch

import fastllm
from fastllm import _ext
from fastllm.ops import registry
from fastllm.ops.quantize import OP as QOP

from conftest import DEVICE


def test_auto_on_cpu_uses_reference(monkeypatch):
    monkeypatch.delenv("FASTLLM_BACKEND", raising=False)
    x = torch.randn(3, 5)
    assert QOP.select("auto", x.device, x) == "torch"
    reasons = QOP.reasons(x.device, x)
    assert reasons["torch"] is None
    assert "CUDA tensors" in reasons["cuda"]
    assert reasons["triton"]  # the interpreter is never auto-picked on CPU


def test_env_forces_backend(monkeypatch):
    x = torch.randn(3, 5, device=DEVICE)   # on a GPU machine CPU tensors are not Triton's (no interpreter)
    monkeypatch.setenv("FASTLLM_BACKEND", "triton")
    assert QOP.select("auto", x.device, x) == "triton"
    monkeypatch.setenv("FASTLLM_BACKEND", "torch")
    assert QOP.select("auto", x.device, x) == "torch"
    assert QOP.select("triton", x.device, x) == "triton"  # the argument wins over the env


def test_env_forcing_unavailable_backend_raises(monkeypatch):
    monkeypatch.setenv("FASTLLM_BACKEND", "cuda")
    with pytest.raises(fastllm.BackendUnavailableError, match="backend 'cuda' cannot serve this call: needs CUDA"):
        fastllm.ops.quantize_per_token(torch.randn(3, 5))


def test_env_bad_value(monkeypatch):
    monkeypatch.setenv("FASTLLM_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTLLM_BACKEND='fast'"):
        fastllm.ops.quantize_per_token(torch.randn(3, 5))


def test_forced_triton_without_triton_raises(monkeypatch):
    monkeypatch.setattr(registry, "_triton_state", lambda: (None, "Triton is not importable (test)"))
    x = torch.randn(3, 5)
    with pytest.raises(fastllm.BackendUnavailableError, match="Triton is not importable"):
        fastllm.ops.quantize_per_token(x, backend="triton")
    assert QOP.select("auto", x.device, x) == "torch"


def test_missing_impl_is_a_reason():
    op = registry.Op("only_torch")
    op.register("torch")(lambda x: x)
    assert "has no cuda implementation" in op.reason("cuda", torch.device("cpu"), None)
    with pytest.raises(fastllm.BackendUnavailableError, match="no triton implementation"):
        op.select("triton", torch.device("cpu"), None)


@pytest.mark.parametrize("built,cap,ok", [
    ("80", (8, 0), True), ("80", (8, 6), True), ("80", (8, 9), True), ("86", (8, 0), False),
    ("80", (9, 0), False), ("90a", (9, 0), True), ("90", (9, 0), True), ("90a", (10, 0), False),
    ("89", (8, 9), True), ("100a", (10, 3), False),
])
def test_sass_compatibility_rule(built, cap, ok):
    assert _ext._runs_on(built, *cap) is ok


def test_unbuilt_arch_message_names_archs_and_fix(monkeypatch):
    monkeypatch.setattr(_ext, "built_archs", lambda: ["90a"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA A10")
    _ext.arch_reason.cache_clear()
    try:
        with pytest.warns(RuntimeWarning) as rec:
            msg = _ext.arch_reason(0)
    finally:
        _ext.arch_reason.cache_clear()
    assert "sm_86" in msg and "built for: sm_90a" in msg and 'FASTLLM_CUDA_ARCHS="86"' in msg
    assert "Triton" in msg and str(rec[0].message) == msg
    # No rebuild helps a pre-sm_80 GPU (the build refuses 75): say so instead of suggesting one.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (7, 5))
    _ext.arch_reason.cache_clear()
    try:
        with pytest.warns(RuntimeWarning):
            msg = _ext.arch_reason(0)
    finally:
        _ext.arch_reason.cache_clear()
    assert "older than sm_80" in msg and "FASTLLM_CUDA_ARCHS" not in msg


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the no-driver path")
def test_no_driver_is_a_clear_python_error():
    if _ext.unavailable_reason():
        pytest.skip(_ext.unavailable_reason())
    lib = _ext.lib()
    assert lib.device_count() < 0  # negative cudaError_t: no driver here
    code = lib.quantize_per_token(0, 0, 0, 1, 1, 1, 0, 0, 0)
    # Without libcuda the runtime says "insufficient driver" too: the message must not advise
    # updating a driver that is not there.
    where = "no usable CUDA driver" if _ext.driver_present() else "no NVIDIA driver on this machine"
    with pytest.raises(fastllm.CudaUnavailableError, match=where):
        _ext.check(code, "quantize_per_token")
    if not _ext.driver_present():
        assert _ext.runtime_reason().startswith("no NVIDIA driver on this machine (libcuda.so.1 not found)")


def test_runtime_without_usable_driver_rules_out_the_cuda_backend(monkeypatch):
    # PyTorch may see a GPU whose driver is too old for the toolkit fastllm._C was built with:
    # auto must then pick another backend, not fail at launch.
    class FakeC:
        def device_count(self):
            return -35

        def error_string(self, code):
            return "CUDA driver version is insufficient for CUDA runtime version"
    monkeypatch.setattr(_ext, "_load", lambda: (FakeC(), None))
    monkeypatch.setattr(_ext, "arch_reason", lambda i: None)
    monkeypatch.setattr(_ext, "driver_present", lambda: True)
    _ext.runtime_reason.cache_clear()
    try:
        why = registry.device_reason("cuda", torch.device("cuda", 0), True)
    finally:
        _ext.runtime_reason.cache_clear()
    assert "driver" in why and "insufficient" in why and "update the NVIDIA driver" in why


def test_first_auto_selection_inside_torch_compile(monkeypatch):
    # Regression: the first auto selection of an op logs its choice, which dynamo cannot trace:
    # compiling fullgraph before any eager call failed.
    from torch import nn
    from fastllm.nn import Int8Linear
    for op in registry.OPS.values():
        monkeypatch.setattr(op, "_announced", set())
    m = Int8Linear.from_linear(nn.Linear(64, 32, device=DEVICE))
    x = torch.randn(4, 64, device=DEVICE)
    torch._dynamo.reset()
    y = torch.compile(m, fullgraph=True, backend="eager")(x)
    assert torch.equal(y, m(x))


def test_auto_falling_back_to_the_reference_on_a_gpu_warns_once(monkeypatch):
    # D 300: no CUDA or Triton kernel; on a GPU auto runs the reference (correct, slow, out of
    # memory at long sequences). It said so only at log level info: now a RuntimeWarning, once.
    from fastllm.ops.attention import OP
    monkeypatch.setattr(OP, "_announced", set())
    q, k = torch.randn(1, 2, 3, 300).half(), torch.randn(1, 2, 5, 300).half()
    args = (q, k, k, None, True, 0.125, 0, 0.0, None, None)
    with pytest.warns(RuntimeWarning, match=r"flash_attention: no GPU kernel serves this call .*300"):
        assert OP.select("auto", torch.device("cuda"), *args) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert OP.select("auto", torch.device("cuda"), *args) == "torch"   # once
        assert OP.select("auto", torch.device("cpu"), *args) == "torch"    # CPU: the reference is the backend


def test_launcher_validates_shapes():
    if _ext.unavailable_reason():
        pytest.skip(_ext.unavailable_reason())
    lib = _ext.lib()
    code = lib.quantize_per_token(0, 0, 0, -1, 4, 4, 0, 0, 0)
    assert code == lib.ERR_BASE + 2
    with pytest.raises(fastllm.CudaError, match="invalid shape"):
        _ext.check(code, "quantize_per_token")


def test_interpreting_follows_how_triton_built_the_kernels():
    # Regression: interpreting() once returned True everywhere, so GPUs would have run the
    # interpreter-only code paths (fp32-upcast dots).
    import subprocess
    import sys

    import fastllm.triton_kernels as tk
    assert tk.interpreting() == (os.environ.get("TRITON_INTERPRET") == "1")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", "import fastllm.triton_kernels as t; print(t.interpreting())"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_interpreter_set_after_import_is_refused_not_crashed():
    # Regression: TRITON_INTERPRET=1 set after `import fastllm` (which imports triton) made the
    # registry accept backend="triton" on CPU; the launch then died inside Triton.
    import subprocess
    import sys
    code = ("import os, torch, fastllm\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "try:\n"
            "    fastllm.ops.quantize_per_token(torch.randn(4, 32), backend='triton')\n"
            "except fastllm.BackendUnavailableError as e:\n"
            "    print('refused:', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "refused:" in out.stdout and "before `import fastllm`" in out.stdout, out.stdout + out.stderr[-2000:]
