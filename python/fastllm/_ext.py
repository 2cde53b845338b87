"""Loads the CUDA extension fastllm._C if it was built, and says why not otherwise.

Import of fastllm never fails because of the extension or a missing GPU: everything here
is looked up lazily and failures become a reason string that the backend registry shows.
"""
import ctypes
import functools
import json
import os
import sys
import warnings

import torch

from .errors import CudaError, CudaUnavailableError

# Must match csrc/common/common.h `enum DType`.
DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.int8: 3, torch.int32: 4}
# cudaErrorInsufficientDriver, cudaErrorNoDevice, cudaErrorCallRequiresNewerDriver
_NO_DRIVER = {35, 100, 36}

_HERE = os.path.dirname(os.path.abspath(__file__))


@functools.lru_cache(None)
def build_info():
    """Contents of _build_info.json written by setup.py beside _C ({} if no CUDA build)."""
    try:
        with open(os.path.join(_HERE, "_build_info.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


@functools.lru_cache(None)
def _load():
    try:
        from . import _C  # noqa: F401
        return _C, None
    except ImportError as e:
        if not build_info():
            return None, ("fastllm._C was not built (pure-Python install: no nvcc at build time "
                          "or FASTLLM_BUILD_CUDA=0); reinstall with nvcc available to get the CUDA kernels")
        return None, f"fastllm._C failed to load: {e}"


def lib():
    """The loaded extension module; raises CudaUnavailableError if there is none."""
    mod, reason = _load()
    if mod is None:
        raise CudaUnavailableError(reason)
    return mod


def unavailable_reason():
    return _load()[1]


@functools.lru_cache(None)
def runtime_reason():
    """None if the extension's own (statically linked) CUDA runtime sees a GPU, else why not.

    PyTorch may see the GPU while fastllm._C cannot: a driver older than the CUDA toolkit the
    extension was built with (cudaErrorInsufficientDriver). The cuda backend is then unusable
    and auto must pick another one rather than fail at launch."""
    mod, reason = _load()
    if mod is None:
        return reason
    n = mod.device_count()
    if n > 0:
        return None
    if n == 0:
        return "fastllm._C's CUDA runtime sees no GPU"
    if not driver_present():
        return f"{NO_DRIVER}: fastllm._C cannot run its kernels"
    cuda = build_info().get("cuda_version", "?")
    return (f"fastllm._C's CUDA runtime cannot use this machine's driver ({mod.error_string(-n)}); it was "
            f"built with CUDA {cuda}: update the NVIDIA driver or rebuild with a matching toolkit")


#: What runtime_reason and check say when driver_present() is False.
NO_DRIVER = "no NVIDIA driver on this machine (libcuda.so.1 not found)"


@functools.lru_cache(None)
def driver_present() -> bool:
    """Whether the NVIDIA driver's library loads. Without it the CUDA runtime reports
    "insufficient driver" too, which would wrongly suggest updating a driver that is not there."""
    try:
        ctypes.CDLL("libcuda.so.1" if sys.platform != "win32" else "nvcuda.dll")
        return True
    except OSError:
        return False


def built_archs():
    mod, _ = _load()
    if mod is not None:
        return mod.built_archs.split(",")
    return build_info().get("archs", [])


def _runs_on(built, major, minor):
    """Native SASS for `built` (e.g. "80", "90a") runs on a device of compute capability
    (major, minor): same major and minor <= the device's; 'a' archs only on their exact arch."""
    num = int(built.rstrip("a"))
    bmaj, bmin = divmod(num, 10)
    if built.endswith("a"):
        return (bmaj, bmin) == (major, minor)
    return bmaj == major and bmin <= minor


@functools.lru_cache(None)
def arch_reason(device_index):
    """None if the build has native code for this GPU, else a message naming the fix."""
    major, minor = torch.cuda.get_device_capability(device_index)
    archs = built_archs()
    if any(_runs_on(a, major, minor) for a in archs):
        return None
    name = torch.cuda.get_device_name(device_index)
    if major < 8:
        msg = (f"GPU {device_index} ({name}, sm_{major}{minor}) is older than sm_80, which fastllm's CUDA "
               "kernels need (cp.async, bf16 mma, mma.sp); the Triton or torch backend serves it")
    else:
        # The PTX in the build is not JIT-compiled for newer GPUs: fastllm runs native code only.
        msg = (f"GPU {device_index} ({name}, sm_{major}{minor}) has no native code in this build of "
               f"fastllm._C (built for: {', '.join('sm_' + a for a in archs)}); rebuild with "
               f"FASTLLM_CUDA_ARCHS=\"{major}{minor}{'a' if (major, minor) == (9, 0) else ''}\" "
               f"pip install --no-build-isolation . ; the Triton backend serves it meanwhile")
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return msg


def stream_of(t):
    return torch.cuda.current_stream(t.device).cuda_stream


def check(code, op):
    """Turns a launcher's status code into an exception."""
    if code == 0:
        return
    text = lib().error_string(code)
    if code in _NO_DRIVER:
        where = NO_DRIVER if not driver_present() else "no usable CUDA driver/device"
        raise CudaUnavailableError(f"{op}: {where} ({text})")
    raise CudaError(f"{op}: CUDA kernel failed with code {code}: {text}")
