"""Test setup. Without a GPU, Triton kernels run in Triton's CPU interpreter: that needs
TRITON_INTERPRET=1 before triton is first imported, so it is set here, at collection."""
import os
import shutil
import subprocess


def _has_gpu():
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


HAS_GPU = _has_gpu()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Backend names the test device can run: the interpreter serves Triton on CPU.
DEVICE = "cuda" if HAS_GPU and torch.cuda.is_available() else "cpu"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and DEVICE != "cuda":
            item.add_marker(skip_gpu)


#: What the CUDA glue says for a dtype its kernels do not take (fp32 attention, fp32 W8A16 input)
#: or a head dim no kernel is compiled for (16, 32, 40, 72: Triton and torch take any): documented
#: limits, not failures. The shared test grids run every backend over every dtype and some odd
#: head dims, so on a GPU a forced backend="cuda" call refused for one of these is a skip.
CUDA_KERNEL_LIMITS = ("not supported by the CUDA", "not compiled (CUDA")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    outcome = yield
    exc = outcome.excinfo[1] if outcome.excinfo else None
    if (exc is not None and type(exc).__name__ == "BackendUnavailableError"
            and any(s in str(exc) for s in CUDA_KERNEL_LIMITS) and hasattr(outcome, "force_exception")):  # pluggy >= 1.1
        outcome.force_exception(pytest.skip.Exception(f"CUDA kernel limit: {exc}"))


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _fresh_seed():
    # Fresh random inputs every run; the seed is printed (shown on failure) to reproduce it.
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"torch.manual_seed({seed})")
