"""fastllm.ops int8 matmuls: W8A8 (int8 x int8, int32 accumulate, fused dequant) and W8A16.

    acc = int8_matmul_int32(a, b)                                   # (M, N) int32, exact a @ b.T
    out = int8_matmul(a, b, a_scale, w_scale, bias=None, out_dtype=torch.bfloat16)
    out = w8a16_matmul(x, w_int8, w_scale, bias=None, group_size=None)

int8_matmul_int32(a, b, *, backend="auto")
  a: (M, K) int8 activations; b: (N, K) int8 weights (nn.Linear layout). Returns a @ b.T as
  (M, N) int32, exact on every backend.
int8_matmul(a, b, a_scale, w_scale, bias=None, *, out_dtype=torch.bfloat16, backend="auto")
  out[m, n] = (fp32(acc[m, n]) * a_scale[m]) * w_scale[n] + bias[n], computed in fp32, then
  rounded to out_dtype (float16, bfloat16 or float32). The CUDA kernels fuse the last multiply
  and the add (fmaf: one fp32 rounding fewer), so they may differ from the others by one fp32
  ulp before that final rounding.
  a_scale: float32, (M,) (per-token, as quantize_per_token returns) or one element (a 0-d or
  (1,) tensor, or a Python float: a static per-tensor scale). w_scale: float32 (N,).
  bias: (N,), float16/bfloat16/float32, or None.
w8a16_matmul(x, w_int8, w_scale, bias=None, *, group_size=None, backend="auto")
  x: (M, K) float16/bfloat16/float32 activations; w_int8: (N, K) int8; w_scale float32, (N,)
  per output channel, or (N, K // group_size) with group_size given (a multiple of 16 that
  divides K). out = x @ (w * scale).T + bias in fp32, returned in x.dtype.

Shapes: any M >= 0; K and N multiples of 16 (the int8 MMA's granularity; the CUDA kernel's
tiles rely on it), K * 128 * 128 < 2**31 so the int32 accumulator cannot overflow. Any strides
on the triton and torch backends; the cuda backend states its own needs in `supports`
(unit stride along K, 16-byte aligned rows). Semantics: fastllm/ref/int8.py.

Backends, in auto's order:
  "cuda"   csrc/int8 through fastllm/ops/_int8_cuda.py. W8A8: mma.sync m16n8k32 s8 with a
           cp.async ring and swizzled shared memory, tile config per M bucket and split-K
           factor (M <= 128 on a GPU the N tiles do not fill: int32 partials in a workspace,
           then a sum + epilogue pass) chosen in csrc/int8/int8_traits.h; on sm_90 (90a
           builds) M > 128 runs a wgmma kernel, split the same way up to M 256 while the
           slices fit one wave (FASTLLM_INT8_WGMMA=0: the mma.sync one); int32 or scaled
           fp16/bf16/fp32 out, per-token or per-tensor a_scale, optional bias. W8A16: decode kernel for M <= 16, fp16/bf16 x,
           per-channel or per-group scales with group_size % 64 == 0 (other calls: triton).
           UNVERIFIED: compiled for sm_80/sm_90a, not yet run on a GPU.
  "triton" triton_kernels/int8_matmul.py (any M, strides, group size).
  "torch"  on CPU PyTorch's own int8 GEMM, torch._int_mm, where this build has it and it passes
           an exactness probe (~10-30x faster than an int32 matmul here); else the reference.
Custom ops: fastllm::int8_matmul_int32, fastllm::int8_matmul, fastllm::w8a16_matmul.
"""
import functools
import numbers
from typing import Optional, Union

import torch

from .. import ref
from ..ref.int8 import scale_epilogue
from ._checks import FLOAT_DTYPES, check_tensor
from .registry import new_op

OP_INT32 = new_op("int8_matmul_int32")
OP = new_op("int8_matmul")
OP_W8A16 = new_op("w8a16_matmul")

# Largest K whose int32 accumulator cannot overflow: K * 128 * 128 <= 2**31 - 1.
MAX_K = (2 ** 31 - 1) // (128 * 128)


def _meta_pair(M, N, K):
    return (torch.empty(M, K, dtype=torch.int8, device="meta"), torch.empty(N, K, dtype=torch.int8, device="meta"))


OP_INT32.example = lambda: ("a (16, 4096) int8, b (4096, 4096) int8", _meta_pair(16, 4096, 4096), {})
OP.example = lambda: ("a (16, 4096) int8 per-token, b (4096, 4096) int8 -> bf16",
                      _meta_pair(16, 4096, 4096) + (torch.empty(16, device="meta"), torch.empty(4096, device="meta"),
                                                    None, torch.bfloat16), {})
OP_W8A16.example = lambda: ("x (1, 4096) bf16, w (4096, 4096) int8 per-channel",
                            (torch.empty(1, 4096, dtype=torch.bfloat16, device="meta"),
                             torch.empty(4096, 4096, dtype=torch.int8, device="meta"),
                             torch.empty(4096, device="meta"), None, 0), {})


# ----------------------------------------------------------------------------------------------
# CPU int8 GEMM: torch._int_mm, if present and exact on this CPU (oneDNN's int8 paths have had
# saturating int16 intermediates on CPUs without VNNI; a probe with extreme values catches that).

@functools.lru_cache(maxsize=None)
def cpu_int_mm_ok() -> bool:
    if not hasattr(torch, "_int_mm"):
        return False
    try:
        g = torch.Generator().manual_seed(0)
        for M, K, N in ((1, 48, 16), (17, 272, 48), (33, 1024, 32)):
            for lo, hi in ((-128, 128), (-128, -127), (127, 128)):
                a = torch.randint(lo, hi, (M, K), dtype=torch.int8, generator=g)
                b = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
                b[0], b[-1] = -128, 127   # extreme products, both signs
                if not torch.equal(torch._int_mm(a, b.t()), ref.int8_matmul_int32(a, b)):
                    return False
    except RuntimeError:
        return False
    return True


def _row_major(t):
    """t itself if its strides are exactly (K, 1), else a row-major copy. Not contiguous():
    a (1, K) view with strides (1, 1) (a transposed column) counts as contiguous, and CPU
    _int_mm misreads it, as it does zero / overlapping strides (expand, as_strided windows)."""
    return t if t.stride() == (t.shape[1], 1) else torch.empty(t.shape, dtype=t.dtype).copy_(t)


def _int32_torch(a, b):
    if a.device.type == "cpu" and a.shape[0] > 0 and b.shape[0] > 0 and a.shape[1] > 0 and cpu_int_mm_ok():
        # Only the probed layout (row-major a and b, b.t() passed).
        return torch._int_mm(_row_major(a), _row_major(b).t())
    return ref.int8_matmul_int32(a, b)


# ----------------------------------------------------------------------------------------------
# Backends.

@OP_INT32.register("torch")
def _int32_torch_impl(a, b):
    return _int32_torch(a, b)


@OP_INT32.register("triton")
def _int32_triton(a, b):
    from ..triton_kernels.int8_matmul import int8_matmul
    return int8_matmul(a, b)


@OP.register("torch")
def _mm_torch(a, b, a_scale, w_scale, bias, out_dtype):
    return scale_epilogue(_int32_torch(a, b), a_scale, w_scale, bias, out_dtype)


@OP.register("triton")
def _mm_triton(a, b, a_scale, w_scale, bias, out_dtype):
    from ..triton_kernels.int8_matmul import int8_matmul
    return int8_matmul(a, b, a_scale, w_scale, bias, out_dtype)


@OP_W8A16.register("torch")
def _w8a16_torch(x, w, w_scale, bias, group_size):
    return ref.w8a16_matmul(x, w, w_scale, bias, group_size or None)


@OP_W8A16.register("triton")
def _w8a16_triton(x, w, w_scale, bias, group_size):
    from ..triton_kernels.int8_matmul import w8a16_matmul
    return w8a16_matmul(x, w, w_scale, bias, group_size)


# cuda: the glue module is imported lazily (the kernels need the extension only when they
# run; the supports functions look at metadata and work on any device).

def _cuda_int32_supports(a, b):
    from ._int8_cuda import gemm_supports
    return gemm_supports(a, b, torch.int32)


@OP_INT32.register("cuda", supports=_cuda_int32_supports)
def _int32_cuda(a, b):
    from ._int8_cuda import int8_gemm_cuda
    return int8_gemm_cuda(a, b, None, None, None, torch.int32)


def _cuda_mm_supports(a, b, a_scale, w_scale, bias, out_dtype):
    from ._int8_cuda import gemm_supports
    return gemm_supports(a, b, out_dtype, a_scale, w_scale, bias)


@OP.register("cuda", supports=_cuda_mm_supports)
def _mm_cuda(a, b, a_scale, w_scale, bias, out_dtype):
    from ._int8_cuda import int8_gemm_cuda
    return int8_gemm_cuda(a, b, a_scale, w_scale, bias, out_dtype)


def _cuda_w8a16_supports(x, w, w_scale, bias, group_size):
    from ._int8_cuda import w8a16_supports
    return w8a16_supports(x, w, w_scale, bias, group_size)


@OP_W8A16.register("cuda", supports=_cuda_w8a16_supports)
def _w8a16_cuda(x, w, w_scale, bias, group_size):
    from ._int8_cuda import w8a16_cuda
    return w8a16_cuda(x, w, w_scale, bias, group_size)


# ----------------------------------------------------------------------------------------------
# Custom ops (the backend is an argument, resolved before the op is entered).

@OP_INT32.bind
@torch.library.custom_op("fastllm::int8_matmul_int32", mutates_args=())
def _op_int32(a: torch.Tensor, b: torch.Tensor, backend: str) -> torch.Tensor:
    return OP_INT32.impls[backend](a, b)


@_op_int32.register_fake
def _(a, b, backend):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.int32)


@OP.bind
@torch.library.custom_op("fastllm::int8_matmul", mutates_args=())
def _op_mm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
           bias: Optional[torch.Tensor], out_dtype: torch.dtype, backend: str) -> torch.Tensor:
    return OP.impls[backend](a, b, a_scale, w_scale, bias, out_dtype)


@_op_mm.register_fake
def _(a, b, a_scale, w_scale, bias, out_dtype, backend):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


@OP_W8A16.bind
@torch.library.custom_op("fastllm::w8a16_matmul", mutates_args=())
def _op_w8a16(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
              group_size: int, backend: str) -> torch.Tensor:
    return OP_W8A16.impls[backend](x, w, w_scale, bias, group_size)


@_op_w8a16.register_fake
def _(x, w, w_scale, bias, group_size, backend):
    return x.new_empty((x.shape[0], w.shape[0]))


# ----------------------------------------------------------------------------------------------
# Argument checks.

def _check_same_device(op, ref_name, ref_t, **others):
    for name, t in others.items():
        if t is not None and t.device != ref_t.device:
            raise ValueError(f"{op}: argument '{name}' is on {t.device}, '{ref_name}' on {ref_t.device}; "
                             "they must be on the same device")


def _check_kn(op, a_name, a, b_name, b):
    """a (M, K), b (N, K): K equal, K and N multiples of 16, K small enough for int32."""
    K, N = a.shape[1], b.shape[0]
    if b.shape[1] != K:
        raise ValueError(f"{op}: argument '{b_name}' must have shape (N, K) with K = {a_name}.shape[1] = {K}, "
                         f"got shape {tuple(b.shape)}")
    if K % 16:
        raise ValueError(f"{op}: argument '{a_name}': K = {a_name}.shape[1] = {K} must be a multiple of 16")
    if N % 16:
        raise ValueError(f"{op}: argument '{b_name}': N = {b_name}.shape[0] = {N} must be a multiple of 16")
    if K > MAX_K:
        raise ValueError(f"{op}: argument '{a_name}': K = {K} > {MAX_K}: the int32 accumulator could overflow")


def _check_vector(op, name, t, n, what, dtypes):
    check_tensor(op, name, t, dtypes=dtypes)
    if tuple(t.shape) != (n,):
        raise ValueError(f"{op}: argument '{name}' must have shape ({n},) ({what}), got {tuple(t.shape)}")


def _check_int8_pair(op, a, b):
    check_tensor(op, "a", a, ndim=2, dtypes=(torch.int8,))
    check_tensor(op, "b", b, ndim=2, dtypes=(torch.int8,))
    _check_kn(op, "a", a, "b", b)
    _check_same_device(op, "a", a, b=b)


def int8_matmul_int32(a: torch.Tensor, b: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Exact a @ b.T in int32: a (M, K) int8, b (N, K) int8 -> (M, N) int32. K, N multiples of 16.
    backend: "auto" | "cuda" | "triton" | "torch"."""
    _check_int8_pair("int8_matmul_int32", a, b)
    return OP_INT32.call(OP_INT32.select(backend, a.device, a, b), a, b)


def check_epilogue(op, a, M, N, a_scale, w_scale, bias, out_dtype, n_what):
    """Check the int8 epilogue's arguments (shared with the 2:4 int8 matmul); returns a_scale as
    a float32 tensor of shape (M,) or (1,) (a Python float becomes one)."""
    if isinstance(a_scale, numbers.Real) and not isinstance(a_scale, bool):
        a_scale = torch.tensor([float(a_scale)], dtype=torch.float32, device=a.device)
    check_tensor(op, "a_scale", a_scale, dtypes=(torch.float32,))
    if a_scale.numel() == 1 and a_scale.dim() <= 1:
        a_scale = a_scale.reshape(1)
    elif tuple(a_scale.shape) != (M,):
        raise ValueError(f"{op}: argument 'a_scale' must have shape ({M},) (one scale per row of a) or be a "
                         f"single element (per-tensor), got shape {tuple(a_scale.shape)}")
    _check_vector(op, "w_scale", w_scale, N, f"one scale per {n_what}", (torch.float32,))
    if bias is not None:
        _check_vector(op, "bias", bias, N, f"one per {n_what}", FLOAT_DTYPES)
    if not isinstance(out_dtype, torch.dtype) or out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: argument 'out_dtype' must be one of torch.float16, torch.bfloat16, "
                        f"torch.float32, got {out_dtype!r}")
    _check_same_device(op, "a", a, a_scale=a_scale, w_scale=w_scale, bias=bias)
    return a_scale


def int8_matmul(a: torch.Tensor, b: torch.Tensor, a_scale: Union[torch.Tensor, float], w_scale: torch.Tensor,
                bias: Optional[torch.Tensor] = None, *, out_dtype: torch.dtype = torch.bfloat16,
                backend: str = "auto") -> torch.Tensor:
    """W8A8 GEMM with the dequantization fused: (a @ b.T) * a_scale[:, None] * w_scale + bias.

    a (M, K) int8; b (N, K) int8; a_scale float32 (M,) per token, or one element / a Python
    float (per tensor); w_scale float32 (N,); bias (N,) float or None; out_dtype float16,
    bfloat16 or float32. K, N multiples of 16. backend: "auto" | "cuda" | "triton" | "torch".
    """
    op = "int8_matmul"
    _check_int8_pair(op, a, b)
    M, N = a.shape[0], b.shape[0]
    a_scale = check_epilogue(op, a, M, N, a_scale, w_scale, bias, out_dtype, "row of b")
    be = OP.select(backend, a.device, a, b, a_scale, w_scale, bias, out_dtype)
    return OP.call(be, a, b, a_scale, w_scale, bias, out_dtype)


def w8a16_matmul(x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 *, group_size: Optional[int] = None, backend: str = "auto") -> torch.Tensor:
    """Weight-only int8 GEMM: x @ (w_int8 * w_scale).T + bias, in x.dtype.

    x (M, K) float16/bfloat16/float32; w_int8 (N, K) int8; w_scale float32 (N,), or
    (N, K // group_size) when group_size (a multiple of 16 dividing K) is given; bias (N,) or None.
    backend: "auto" | "cuda" | "triton" | "torch".
    """
    op = "w8a16_matmul"
    check_tensor(op, "x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(op, "w_int8", w_int8, ndim=2, dtypes=(torch.int8,))
    _check_kn(op, "x", x, "w_int8", w_int8)
    N, K = w_int8.shape
    check_tensor(op, "w_scale", w_scale, dtypes=(torch.float32,))
    if group_size is None or group_size == 0:
        group_size = 0
        if tuple(w_scale.shape) != (N,):
            raise ValueError(f"{op}: argument 'w_scale' must have shape ({N},) (per output channel; pass "
                             f"group_size for per-group scales), got {tuple(w_scale.shape)}")
    else:
        if not isinstance(group_size, numbers.Integral) or isinstance(group_size, bool) or group_size < 0 \
                or group_size % 16 or (K and K % group_size):
            raise ValueError(f"{op}: argument 'group_size' must be a positive multiple of 16 dividing "
                             f"K = {K}, got {group_size!r}")
        group_size = int(group_size)
        if tuple(w_scale.shape) != (N, K // group_size):
            raise ValueError(f"{op}: argument 'w_scale' must have shape ({N}, {K // group_size}) "
                             f"(N, K // group_size), got {tuple(w_scale.shape)}")
    if bias is not None:
        _check_vector(op, "bias", bias, N, "one per output channel", FLOAT_DTYPES)
    _check_same_device(op, "x", x, w_int8=w_int8, w_scale=w_scale, bias=bias)
    be = OP_W8A16.select(backend, x.device, x, w_int8, w_scale, bias, group_size)
    return OP_W8A16.call(be, x, w_int8, w_scale, bias, group_size)
