"""bench/sanitize_cases.py (the workloads compute-sanitizer runs in bench/gpu_suite.sh) on the SIMT
emulator's H100 and A100, with CPU tensors: each case's own reference checks must pass, so the one
GPU run is not spent on a broken case. Also every kernel those cases reach runs its real source
once more (the wgmma / TMA variants on the emulated H100)."""
import importlib.util
import os

import pytest

from simt.backend import emulated_cuda, unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=f"simt emulator: {unavailable_reason()}")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cases():
    spec = importlib.util.spec_from_file_location("sanitize_cases", os.path.join(ROOT, "bench", "sanitize_cases.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


MOD = _cases()


# int8_matmul takes ~25 s per emulated device: the H100 only (its sm80 kernels run on the emulated
# A100 in test_simt_int8.py).
RUNS = [(name, sm) for name in sorted(MOD.CASES) for sm in ((9, 0), (8, 0)) if name != "int8_matmul" or sm == (9, 0)]


@pytest.mark.parametrize("name,sm", RUNS, ids=[f"{n}-sm{a}{b}" for n, (a, b) in RUNS])
def test_sanitize_case(monkeypatch, name, sm):
    from fastllm.ops import registry
    saved = registry.device_reason
    monkeypatch.setattr(registry, "device_reason", lambda b, dev, auto: None if b == "cuda" else saved(b, dev, auto))
    monkeypatch.setattr(MOD, "DEVICE", "cpu")
    with emulated_cuda(sm=sm):
        MOD.main([name])
