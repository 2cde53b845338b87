"""fastllm.ops.int8_matmul_dynamic: W8A8 with per-token dynamic activation quantization, fused
into the GEMM where that pays (small M).

    out = int8_matmul_dynamic(x, w_int8, w_scale, bias=None, smooth=None)

int8_matmul_dynamic(x, b, w_scale, bias=None, *, smooth=None, backend="auto")
  x: (M, K) float16/bfloat16/float32 activations (copied if not unit-stride along K); b: (N, K) int8 weights
  (nn.Linear layout); w_scale float32 (N,); bias (N,) float or None; smooth: optional float32
  (K,) SmoothQuant factors applied to x per input channel first (when they could not be folded
  into a norm). Exactly:
      xs = fp32(x) * smooth  (or x)                       one fp32 product per element
      q, a_scale = quantize_per_token(xs)                 fastllm/ref/quantize.py
      out = int8_matmul(q, b, a_scale, w_scale, bias, out_dtype=x.dtype)
  (fastllm.ref.int8_matmul_dynamic.) Every backend is bit-identical to that composition (the same q bits, the same fp32 epilogue
  operations). K, N multiples of 16 as for int8_matmul. Reference: fastllm/ref/int8.py.

Why fused: unfused, a decode step's linear is two launches (quantize, then GEMM) with an int8
copy of x written and read in between. The Triton kernel instead finds each row's amax in a
pre-pass over its rows and quantizes the tiles as it loads them. Every N tile repeats that
pre-pass, which costs nothing at decode sizes and much at prefill sizes, so only calls with
M <= FUSE_MAX_M are fused; larger ones run quantize_per_token then int8_matmul.

Backends, in auto's order:
  "cuda"   fused for M <= 16 (_int8_cuda.FUSED_MAX_M): csrc/int8/w8a8_decode_kernel.cuh finds the
           per-token scales and quantizes x in registers (FASTLLM_INT8_FUSED=0 turns it off);
           larger M: two kernels, quantize_per_token (csrc/int8) then the W8A8 GEMM, whose A
           tiles stream as int8 through cp.async. UNVERIFIED: not run on a GPU.
  "triton" fused (M <= FUSE_MAX_M): triton_kernels/int8_matmul.py with QUANT_A + DYN_A;
           else the Triton quantize and GEMM kernels.
  "torch"  the reference composition (torch._int_mm on CPU where exact).
Custom op: fastllm::int8_matmul_dynamic.
"""
from typing import Optional

import torch

from .. import ref
from ..ref.int8 import scale_epilogue
from ._checks import FLOAT_DTYPES, check_positive_finite, check_tensor, unit_stride_reason
from .int8 import _check_kn, _check_same_device, _check_vector, _int32_torch
from .registry import new_op

OP = new_op("int8_matmul_dynamic")
NAME = "int8_matmul_dynamic"

#: Largest M whose activation quantization is fused into the Triton GEMM (each N tile re-reads
#: and re-reduces its rows: cheap for decode-sized M, not for prefill; the M <= 32 tile configs
#: also keep the 16-bit A stages within sm_86's shared memory).
FUSE_MAX_M = 32

OP.example = lambda: ("x (16, 4096) bf16, b (4096, 4096) int8, per-token dynamic scales",
                      (torch.empty(16, 4096, dtype=torch.bfloat16, device="meta"),
                       torch.empty(4096, 4096, dtype=torch.int8, device="meta"),
                       torch.empty(4096, device="meta"), torch.empty(4096, device="meta"), None), {})


def _smoothed(x, smooth):
    return x if smooth is None else x.to(torch.float32) * smooth


@OP.register("torch")
def _torch(x, b, w_scale, bias, smooth):
    q, a_scale = ref.quantize_per_token(_smoothed(x, smooth))
    return scale_epilogue(_int32_torch(q, b), a_scale, w_scale, bias, x.dtype)


def _kernel_supports(x, *args):
    return unit_stride_reason("x", x, 1)


@OP.register("triton", supports=_kernel_supports)
def _triton(x, b, w_scale, bias, smooth):
    from ..triton_kernels.int8_matmul import int8_matmul
    from ..triton_kernels.quantize_per_token import quantize_per_token
    if x.shape[0] <= FUSE_MAX_M:
        return int8_matmul(x, b, None, w_scale, bias, x.dtype, in_mul=smooth, dynamic=True)
    q, a_scale = quantize_per_token(_smoothed(x, smooth))
    return int8_matmul(q, b, a_scale, w_scale, bias, x.dtype)


def _fused(x, b, w_scale, bias, smooth):
    """True when this call goes to the fused CUDA kernel (decode M, its layout needs met)."""
    from ._int8_cuda import fused_enabled, fused_supports
    return fused_enabled() and fused_supports(x, b, smooth, w_scale, bias, True) is None


def _cuda_supports(x, b, w_scale, bias, smooth):
    from ._int8_cuda import gemm_supports
    why = _kernel_supports(x)
    if why or _fused(x, b, w_scale, bias, smooth):
        return why
    # The GEMM reads the contiguous int8 copy and per-row scales the quantize kernel writes.
    q = torch.empty(x.shape, dtype=torch.int8, device="meta")
    return gemm_supports(q, b, x.dtype, torch.empty(x.shape[0], device="meta"), w_scale, bias)


@OP.register("cuda", supports=_cuda_supports)
def _cuda(x, b, w_scale, bias, smooth):
    from ._int8_cuda import int8_gemm_cuda, w8a8_fused_cuda
    from .quantize import OP as QUANTIZE
    if _fused(x, b, w_scale, bias, smooth):
        return w8a8_fused_cuda(x, b, smooth, None, w_scale, bias, True)
    q, a_scale = QUANTIZE.impls["cuda"](_smoothed(x, smooth))
    return int8_gemm_cuda(q, b, a_scale, w_scale, bias, x.dtype)


@OP.bind
@torch.library.custom_op("fastllm::int8_matmul_dynamic", mutates_args=())
def _op(x: torch.Tensor, b: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
        smooth: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    return OP.impls[backend](x, b, w_scale, bias, smooth)


@_op.register_fake
def _(x, b, w_scale, bias, smooth, backend):
    return x.new_empty((x.shape[0], b.shape[0]))


def int8_matmul_dynamic(x: torch.Tensor, b: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
                        *, smooth: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """Dynamic W8A8 linear (per-token scales), quantization fused at small M (module docstring);
    out in x.dtype."""
    check_tensor(NAME, "x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(NAME, "b", b, ndim=2, dtypes=(torch.int8,))
    _check_kn(NAME, "x", x, "b", b)
    K, N = x.shape[1], b.shape[0]
    _check_vector(NAME, "w_scale", w_scale, N, "one scale per row of b", (torch.float32,))
    if bias is not None:
        _check_vector(NAME, "bias", bias, N, "one per row of b", FLOAT_DTYPES)
    if smooth is not None:
        _check_vector(NAME, "smooth", smooth, K, "one factor per input channel", (torch.float32,))
    _check_same_device(NAME, "x", x, b=b, w_scale=w_scale, bias=bias, smooth=smooth)
    if smooth is not None:
        check_positive_finite(NAME, "smooth", smooth)
    if x.stride(1) != 1 and K > 1:
        # The kernels read rows with unit stride; one copy here is cheaper than a slow path.
        x = x.contiguous()
    be = OP.select(backend, x.device, x, b, w_scale, bias, smooth)
    return OP.call(be, x, b, w_scale, bias, smooth)
