"""Backend registry: which of cuda / triton / torch serves a call, and why the others don't.

Each op registers one implementation per backend plus a `supports(*args, **kw)` predicate
that returns None when it can serve the call, else a short reason. On top of that every
backend has device-level conditions checked here once (extension built? arch built?
Triton importable? interpreter?).

`backend="auto"` (or FASTLLM_BACKEND unset) walks the op's preference order (cuda, triton,
torch by default) and takes the first that can serve. A forced backend that cannot serve
the call raises BackendUnavailableError with the reason: never a silent fallback.
"""
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch

from .. import _ext
from ..errors import BackendUnavailableError
from ._autocast import outside_autocast
from ._inference_only import refuse_tangents

BACKENDS = ("cuda", "triton", "torch")
log = logging.getLogger("fastllm")


def _triton_state():
    """(module, reason): fastllm.triton_kernels if usable, else None and why."""
    try:
        from .. import triton_kernels
    except ImportError as e:
        return None, f"Triton is not importable ({e}); pip install triton"
    reason = triton_kernels.mode_reason()
    return (None, reason) if reason else (triton_kernels, None)


# Constant per process: under torch.compile it is evaluated once at trace time (it calls into
# fastllm._C, which dynamo cannot trace: fullgraph compile on CUDA broke there).
@torch.compiler.assume_constant_result
def device_reason(backend: str, device: torch.device, auto: bool) -> Optional[str]:
    """Device-level reason `backend` cannot run on `device`, or None."""
    if backend == "torch":
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"needs CUDA tensors (got {device.type})"
        reason = _ext.unavailable_reason() or _ext.runtime_reason()
        if reason:
            return reason
        return _ext.arch_reason(device.index if device.index is not None else torch.cuda.current_device())
    if backend == "triton":
        tk, reason = _triton_state()
        if reason:
            return reason
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            if not tk.interpreting():
                return "CPU tensors need TRITON_INTERPRET=1 set before triton is imported (before `import fastllm`)"
            if auto:
                return "auto uses the reference on CPU (the Triton interpreter is a test tool; force backend='triton')"
            return None
        return f"needs CUDA tensors (got {device.type})"
    raise ValueError(f"unknown backend {backend!r}")


@dataclass
class Op:
    """One op's implementations and support predicates, keyed by backend."""

    name: str
    order: Tuple[str, ...] = BACKENDS
    impls: Dict[str, Callable] = field(default_factory=dict)
    supports: Dict[str, Callable[..., Optional[str]]] = field(default_factory=dict)
    # example(device) -> (description, args, kwargs) of a typical call, for `fastllm.info`.
    # Meta tensors are fine: `supports` looks at shapes, dtypes and strides only.
    example: Optional[Callable] = None
    # The torch custom op fastllm::<name>, taking (*args, backend); set by `bind`.
    custom: Optional[Callable] = None
    _announced: set = field(default_factory=set)

    def bind(self, custom_op):
        """Decorator on the op's torch.library.custom_op: `call` goes through it."""
        self.custom = custom_op
        return custom_op

    def call(self, backend: str, *args):
        """Run the op on the selected backend: through the custom op, except in plain eager
        inference (see `plain_eager`), where the backend's implementation is called directly.
        That is what the custom op would run, less its ~10 us of Python dispatch per call (a
        decode step makes one call per attention and per linear layer)."""
        if EAGER_FAST_PATH and plain_eager(args):
            return self.impls[backend](*args)
        refuse_tangents(self.name, args)
        return self.custom(*args, backend)

    def register(self, backend: str, supports: Optional[Callable[..., Optional[str]]] = None):
        """Decorator: `@OP.register("triton", supports=pred)` on the implementation."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}")

        def deco(fn):
            self.impls[backend] = outside_autocast(fn)
            self.supports[backend] = supports or (lambda *a, **k: None)
            return fn

        return deco

    def reason(self, backend: str, device: torch.device, *args, auto: bool = False, **kw) -> Optional[str]:
        if backend not in self.impls:
            return f"{self.name} has no {backend} implementation"
        return device_reason(backend, device, auto) or self.supports[backend](*args, **kw)

    def reasons(self, device: torch.device, *args, **kw) -> Dict[str, Optional[str]]:
        """Every backend -> None (can serve) or why not, as auto would see it."""
        return {b: self.reason(b, device, *args, auto=True, **kw) for b in self.order}

    def select(self, backend: str, device: torch.device, *args, **kw) -> str:
        """Resolve `backend` ("auto" or a name) for this call; raises if forced and unable."""
        backend = resolve_request(backend)
        if backend != "auto":
            why = self.reason(backend, device, *args, **kw)
            if why:
                raise BackendUnavailableError(f"{self.name}: backend '{backend}' cannot serve this call: {why}")
            return backend
        tried = []
        for b in self.order:
            why = self.reason(b, device, *args, auto=True, **kw)
            if why is None:
                # Not while torch.compile traces: dynamo cannot trace logging (an eager call
                # announces it).
                if not torch.compiler.is_compiling() and (b, device.type) not in self._announced:
                    self._announced.add((b, device.type))
                    log.info("%s: backend '%s' on %s (%s)", self.name, b, device.type,
                             "; ".join(tried) or "first choice")
                    if b == "torch" and device.type == "cuda":
                        # Correct but slow (attention materializes every score), and at long
                        # sequences out of memory: say so once rather than let it pass unseen.
                        warnings.warn(f"{self.name}: no GPU kernel serves this call ({'; '.join(tried)}); it runs on "
                                      "fastllm's pure-PyTorch reference (slow; attention materializes the scores). "
                                      "Further such calls are not reported.", RuntimeWarning, stacklevel=3)
                return b
            tried.append(f"{b}: {why}")
        raise BackendUnavailableError(f"{self.name}: no backend can serve this call: " + "; ".join(tried))


#: Off: every call goes through the custom op (for debugging; the tests compare both paths).
EAGER_FAST_PATH = True


def _fast_path_probes():
    """The (private) torch state `plain_eager` reads; None if this torch lacks one of them,
    and then every call goes through the custom op."""
    try:
        from torch.autograd import forward_ad
        C = torch._C
        probes = (C._len_torch_dispatch_stack, C._is_torch_function_mode_enabled,
                  C._functorch.peek_interpreter_stack, C._autograd._profiler_enabled, C._get_tracing_state,
                  forward_ad)
        forward_ad._current_level  # noqa: B018 - probe
        return probes
    except AttributeError:
        return None


_PROBES = _fast_path_probes()
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def plain_eager(args) -> bool:
    """True when calling the implementation directly is exactly what the custom op would do:
    not compiling or tracing (torch.compile / export / make_fx / FakeTensor: dispatch modes),
    no torch-function mode, no functorch transform (vmap, grad, jvp), no forward-AD level, no
    profiler (it should see fastllm::<op>), no torch.jit.trace (the traced graph must hold
    fastllm::<op>: a kernel launched through fastllm._C is invisible to the tracer and would not
    be replayed), plain non-meta tensors, and no autograd to record
    (the custom op's formula raises on backward: fastllm/ops/_inference_only.py)."""
    if torch.compiler.is_compiling() or _PROBES is None:
        return False
    dispatch_modes, function_mode, functorch, profiling, tracing, forward_ad = _PROBES
    if (dispatch_modes() or function_mode() or functorch() is not None or profiling()
            or tracing() is not None or forward_ad._current_level >= 0):
        return False
    grad = torch.is_grad_enabled()
    for a in args:
        if isinstance(a, torch.Tensor) and (type(a) not in _PLAIN or a.is_meta or (grad and a.requires_grad)):
            return False
    return True


def resolve_request(backend: str) -> str:
    """backend= argument, with FASTLLM_BACKEND standing in for "auto"."""
    if not isinstance(backend, str):
        raise TypeError(f"argument 'backend' must be a str, got {type(backend).__name__}")
    if backend == "auto":
        backend = os.environ.get("FASTLLM_BACKEND", "auto").strip() or "auto"
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"FASTLLM_BACKEND={backend!r}: expected one of auto, {', '.join(BACKENDS)}")
    elif backend not in BACKENDS:
        raise ValueError(f"argument 'backend' must be one of auto, {', '.join(BACKENDS)}; got {backend!r}")
    return backend


OPS: Dict[str, Op] = {}


def new_op(name: str, order: Tuple[str, ...] = BACKENDS) -> Op:
    op = Op(name, order)
    OPS[name] = op
    return op
