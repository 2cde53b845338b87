"""Kernel switches the benchmark flips to compare a kernel with the one it replaces on the same
GPU: the CUDA launchers read these environment variables on every call (FASTLLM_INT8_WGMMA,
FASTLLM_SPARSE24_WGMMA, FASTLLM_ATTN_WGMMA), the int8 ops' CUDA glue FASTLLM_INT8_FUSED; see README's
support table."""
import os

import torch


def hopper_90a(dev) -> bool:
    """An sm_90 GPU and a build with 90a code (the wgmma kernels exist and are chosen)."""
    from fastllm import _ext
    return (dev.type == "cuda" and torch.cuda.get_device_capability(dev) == (9, 0)
            and _ext.unavailable_reason() is None and "90a" in _ext.lib().built_archs.split(","))


def with_env(name, value, fn, *args, **kw):
    """fn(*args, **kw) with environment variable `name` set to `value` for the call."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        return fn(*args, **kw)
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old
