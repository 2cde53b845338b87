"""Runs fastllm's CUDA backend (the Python glue, the launchers and the kernels' own source) on CPU
tensors through the SIMT emulator (tests/simt/simt.h):

    with emulated_cuda(sm=(8, 0), sms=108):
        out, lse = fastllm.ops._attention_cuda.flash_attention_cuda(q, k, v, ...)  # CPU tensors

Inside the block fastllm._ext.lib() is the emulated _C (built by tests/simt/build.py), device
pointers are host pointers, the stream is 0 and a CPU tensor's device index reads as 0.
"""
import contextlib
import ctypes
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from simt.build import load, unavailable_reason  # noqa: E402,F401


class _Lib:
    """The emulated module, with a CPU tensor's device index (None) passed as device 0."""

    def __init__(self, mod):
        self._mod = mod

    def __getattr__(self, name):
        fn = getattr(self._mod, name)
        if not callable(fn):
            return fn

        def call(*args):
            if args and args[0] is None:
                args = (0,) + args[1:]
            return fn(*args)
        return call


# A100-like: 108 SMs, 163 KB of opt-in shared memory per block; sm86-like: 84 SMs, 99 KB.
DEVICES = {(8, 0): (108, 166912), (8, 6): (84, 101376), (8, 9): (128, 101376), (9, 0): (132, 232448)}


@contextlib.contextmanager
def emulated_cuda(sm=(8, 0), sms=None, smem_optin=None):
    from fastllm import _ext
    mod = load()
    d_sms, d_smem = DEVICES.get(tuple(sm), (108, 166912))
    mod._cdll.simt_configure(ctypes.c_int(sm[0]), ctypes.c_int(sm[1]), ctypes.c_int(sms or d_sms),
                             ctypes.c_int(smem_optin or d_smem))
    saved = _ext.lib, _ext.stream_of
    _ext.lib = lambda: _Lib(mod)
    _ext.stream_of = lambda t: 0
    try:
        yield mod
    finally:
        _ext.lib, _ext.stream_of = saved
