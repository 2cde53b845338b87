"""fastllm.ops.int8_matmul_static: W8A8 with a calibrated (static) activation scale, the
activation quantization fused into the GEMM.

    out = int8_matmul_static(x, w_int8, act_scale, w_scale, bias=None, smooth=None)

int8_matmul_static(x, b, act_scale, w_scale, bias=None, *, smooth=None, backend="auto")
  x: (M, K) float16/bfloat16/float32 activations (any strides); b: (N, K) int8 weights
  (nn.Linear layout); act_scale: the calibrated per-tensor scale (a positive Python float or a
  one-element float32 tensor), as fastllm.quant.calibrate's amax / 127 gives; w_scale float32
  (N,); bias (N,) float or None; smooth: optional float32 (K,) SmoothQuant factors applied to x
  per input channel before quantization (when they could not be folded into a norm).
  With in_mul = smooth / act_scale (fp32, per channel) or 1 / act_scale:
      q[m, k] = rne(clamp(fp32(x[m, k]) * in_mul[k], -127, 127))     NaN -> 0, +-inf -> +-127
      out = int8_matmul(q, b, act_scale, w_scale, bias, out_dtype=x.dtype)
  Every backend produces the same q bits (tested), so outputs differ only by the epilogue's
  fp32 rounding. K, N multiples of 16 as for int8_matmul. Semantics: fastllm/ref/int8.py.

Why fused: with a known scale there is no per-row reduction, so the Triton kernel quantizes
each activation tile as it loads it. Unfused, x is read once to quantize and its int8 copy is
written and read again (plus, in PyTorch, fp32 temporaries): extra traffic of several times
x's size, which at decode sizes is launches and latency rather than bytes.

Backends, in auto's order:
  "cuda"   fused for M <= 16 (_int8_cuda.FUSED_MAX_M): csrc/int8/w8a8_decode_kernel.cuh quantizes
           x in registers (FASTLLM_INT8_FUSED=0 turns it off); larger M: two kernels,
           csrc/int8/quantize_static.cu (one elementwise pass) then the W8A8 GEMM, whose A tiles
           stream as int8 through cp.async (fusing there needs a register-staged float A path).
           UNVERIFIED: not run on a GPU.
  "triton" fused: triton_kernels/int8_matmul.py with QUANT_A.
  "torch"  the reference (quantize_static, then the int8 GEMM; torch._int_mm on CPU).
Custom op: fastllm::int8_matmul_static (takes in_mul).
"""
import numbers
from typing import Optional, Union

import torch

from .. import ref
from ..ref.int8 import scale_epilogue
from ._checks import FLOAT_DTYPES, check_positive_finite, check_tensor
from .int8 import _check_kn, _check_same_device, _int32_torch, check_epilogue
from .registry import new_op

OP = new_op("int8_matmul_static")
NAME = "int8_matmul_static"

OP.example = lambda: ("x (16, 4096) bf16, b (4096, 4096) int8, per-tensor act_scale",
                      (torch.empty(16, 4096, dtype=torch.bfloat16, device="meta"),
                       torch.empty(4096, 4096, dtype=torch.int8, device="meta"),
                       torch.empty(1, device="meta"), torch.empty(1, device="meta"),
                       torch.empty(4096, device="meta"), None), {})


@OP.register("torch")
def _torch(x, b, in_mul, a_scale, w_scale, bias):
    q = ref.quantize_static(x, in_mul)
    return scale_epilogue(_int32_torch(q, b), a_scale, w_scale, bias, x.dtype)


@OP.register("triton")
def _triton(x, b, in_mul, a_scale, w_scale, bias):
    from ..triton_kernels.int8_matmul import int8_matmul
    return int8_matmul(x, b, a_scale, w_scale, bias, x.dtype, in_mul=in_mul)


def _fused(x, b, in_mul, w_scale, bias):
    """True when this call goes to the fused CUDA kernel (decode M, its layout needs met)."""
    from ._int8_cuda import fused_enabled, fused_supports
    return fused_enabled() and fused_supports(x, b, in_mul, w_scale, bias, False) is None


def _cuda_supports(x, b, in_mul, a_scale, w_scale, bias):
    from ._int8_cuda import gemm_supports, quantize_static_supports
    if _fused(x, b, in_mul, w_scale, bias):
        return None
    why = quantize_static_supports(x, in_mul)
    if why:
        return why
    # The GEMM reads the contiguous int8 copy the quantize kernel writes.
    q = torch.empty(x.shape, dtype=torch.int8, device="meta")
    return gemm_supports(q, b, x.dtype, a_scale, w_scale, bias)


@OP.register("cuda", supports=_cuda_supports)
def _cuda(x, b, in_mul, a_scale, w_scale, bias):
    from ._int8_cuda import int8_gemm_cuda, quantize_static_cuda, w8a8_fused_cuda
    if _fused(x, b, in_mul, w_scale, bias):
        return w8a8_fused_cuda(x, b, in_mul, a_scale, w_scale, bias, False)
    return int8_gemm_cuda(quantize_static_cuda(x, in_mul), b, a_scale, w_scale, bias, x.dtype)


@OP.bind
@torch.library.custom_op("fastllm::int8_matmul_static", mutates_args=())
def _op(x: torch.Tensor, b: torch.Tensor, in_mul: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
        bias: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    return OP.impls[backend](x, b, in_mul, a_scale, w_scale, bias)


@_op.register_fake
def _(x, b, in_mul, a_scale, w_scale, bias, backend):
    return x.new_empty((x.shape[0], b.shape[0]))


def input_multiplier(act_scale: torch.Tensor, smooth: Optional[torch.Tensor]) -> torch.Tensor:
    """in_mul: smooth / act_scale (K,) or 1 / act_scale (1,), fp32 (one IEEE division each)."""
    if smooth is None:
        return torch.reciprocal(act_scale.reshape(1).to(torch.float32))
    return smooth.to(torch.float32) / act_scale.reshape(1).to(torch.float32)


def int8_matmul_static(x: torch.Tensor, b: torch.Tensor, act_scale: Union[torch.Tensor, float],
                       w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                       smooth: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """Static W8A8 linear with fused activation quantization (module docstring); out in x.dtype."""
    check_tensor(NAME, "x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(NAME, "b", b, ndim=2, dtypes=(torch.int8,))
    _check_kn(NAME, "x", x, "b", b)
    _check_same_device(NAME, "x", x, b=b)
    M, K = x.shape
    N = b.shape[0]
    if isinstance(act_scale, numbers.Real) and not isinstance(act_scale, bool):
        act_scale = torch.tensor([float(act_scale)], dtype=torch.float32, device=x.device)
    check_tensor(NAME, "act_scale", act_scale, dtypes=(torch.float32,))
    if act_scale.numel() != 1:
        raise ValueError(f"{NAME}: argument 'act_scale' must be one calibrated per-tensor scale (one element), "
                         f"got shape {tuple(act_scale.shape)}")
    a_scale = check_epilogue(NAME, x, M, N, act_scale, w_scale, bias, x.dtype, "row of b")
    # (On CUDA a bad scale gives NaN / inf outputs, not a crash; Int8Linear checks it when set.)
    check_positive_finite(NAME, "act_scale", act_scale)
    if smooth is not None:
        check_tensor(NAME, "smooth", smooth, dtypes=(torch.float32,))
        if tuple(smooth.shape) != (K,):
            raise ValueError(f"{NAME}: argument 'smooth' must have shape ({K},) (one factor per input channel), "
                             f"got {tuple(smooth.shape)}")
        _check_same_device(NAME, "x", x, smooth=smooth)
        check_positive_finite(NAME, "smooth", smooth)
    in_mul = input_multiplier(a_scale, smooth)
    be = OP.select(backend, x.device, x, b, in_mul, a_scale, w_scale, bias)
    return OP.call(be, x, b, in_mul, a_scale, w_scale, bias)
