"""Runs fastllm's CUDA backend (the Python glue, the launchers and the kernels' own source) on CPU
tensors through the SIMT emulator (tests/simt/simt.h):

    with emulated_cuda(sm=(8, 0), sms=108):
        out, lse = fastllm.ops._attention_cuda.flash_attention_cuda(q, k, v, ...)  # CPU tensors

Inside the block fastllm._ext.lib() is the emulated _C (built by tests/simt/build.py), device
pointers are host pointers, the stream is 0 and a CPU tensor's device index reads as 0; with
guard_outputs (default) torch.empty hands out poisoned buffers that end at an inaccessible page.
"""
import contextlib
import ctypes
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from simt.build import load, unavailable_reason  # noqa: E402

__all__ = ["bank_counts", "emulated_cuda", "guarded", "hopper_counts", "load", "reset_bank_counts",
           "unavailable_reason"]


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
def emulated_cuda(sm=(8, 0), sms=None, smem_optin=None, guard_outputs=True):
    from fastllm import _ext
    mod = load()
    d_sms, d_smem = DEVICES.get(tuple(sm), (108, 166912))
    mod._cdll.simt_configure(ctypes.c_int(sm[0]), ctypes.c_int(sm[1]), ctypes.c_int(sms or d_sms),
                             ctypes.c_int(smem_optin or d_smem))
    saved = _ext.lib, _ext.stream_of, torch.empty
    _ext.lib = lambda: _Lib(mod)
    _ext.stream_of = lambda t: 0
    if guard_outputs:
        torch.empty = _guarded_empty(torch.empty)
    try:
        yield mod
    finally:
        _ext.lib, _ext.stream_of, torch.empty = saved


def hopper_counts():
    """(warpgroup MMAs executed, TMA copies landed) by the emulated module since it was loaded:
    a test of an sm_90a kernel checks that they grew (the launcher did choose that kernel)."""
    lib = load()._cdll
    w, t = ctypes.c_longlong(), ctypes.c_longlong()
    lib.simt_hopper_counts(ctypes.byref(w), ctypes.byref(t))
    return w.value, t.value


def bank_counts(cdll=None):
    """Shared-memory bank-conflict totals of the emulated module (or of `cdll`, another library
    built with the runtime: the selftest's) since it was loaded or reset_bank_counts: {instruction:
    (phases, wavefronts, ideal wavefronts, the first conflicting phase as text or "")}. A phase is
    8 lanes' 16-byte accesses; wavefronts > ideal means bank conflicts (simt_runtime.cpp)."""
    lib = cdll or load()._cdll
    out, i = {}, 0
    tag, example, counts = ctypes.c_char_p(), ctypes.c_char_p(), (ctypes.c_longlong * 3)()
    while lib.simt_bank_stat(i, ctypes.byref(tag), counts, ctypes.byref(example)):
        out[tag.value.decode()] = (*counts, example.value.decode())
        i += 1
    return out


def reset_bank_counts(cdll=None):
    (cdll or load()._cdll).simt_bank_reset()


def _guarded_empty(empty):
    """torch.empty for the glue's outputs and workspaces: poisoned (NaN / the integer minimum)
    and ending at an inaccessible page, so an element never written shows and a write past the
    end fails the launch instead of corrupting the heap."""
    def guarded_empty(*size, dtype=None, device=None, **kw):
        t = empty(*size, dtype=dtype, device=device, **kw)
        if t.device.type != "cpu" or kw or t.numel() == 0:
            return t
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype == torch.uint8:    # raw workspaces (split-K partials): NaN fp32 / -1 int32
            t.fill_(0xFF)
        elif t.dtype != torch.bool:
            t.fill_(torch.iinfo(t.dtype).min)
        return guarded(t, "end")
    return guarded_empty


_PAGE = 4096
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def guarded(t, side="end"):
    """A contiguous copy of `t` placed against an inaccessible page: with side="end" its last
    16-byte chunk ends at the page, with side="start" it begins right after one. A kernel that
    reads or writes past that edge fails its emulated launch ("invalid memory access")."""
    import weakref
    t = t.contiguous()
    n = max(t.numel() * t.element_size(), 1)
    n16 = (n + 15) // 16 * 16
    data_pages = (n16 + _PAGE - 1) // _PAGE
    total = (data_pages + 2) * _PAGE
    base = _libc.mmap(None, total, 3, 0x22, -1, 0)   # PROT_READ|WRITE, MAP_PRIVATE|ANONYMOUS
    if base in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap failed")
    _libc.mprotect(base, _PAGE, 0)
    _libc.mprotect(base + (data_pages + 1) * _PAGE, _PAGE, 0)
    start = base + _PAGE if side == "start" else base + (data_pages + 1) * _PAGE - n16
    buf = (ctypes.c_char * n).from_address(start)
    out = torch.frombuffer(buf, dtype=t.dtype, count=t.numel()).view(t.shape)
    out.copy_(t)
    weakref.finalize(buf, _libc.munmap, base, total)
    return out
