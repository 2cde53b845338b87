"""fastllm.ops 2:4 sparse matmuls: out = x @ W.T with W (N, K) 2:4-sparse along K and stored
compressed by fastllm.sparse.compress (values (N, K // 2) + packed 2-bit indices meta).

    out = sparse24_matmul(x, values, meta, bias=None)                          # fp16 / bf16
    acc = sparse24_int8_matmul_int32(a, values, meta)                          # int8, exact int32
    out = sparse24_int8_matmul(a, values, meta, a_scale, w_scale, bias=None, out_dtype=torch.bfloat16)

sparse24_matmul(x, values, meta, bias=None, *, backend="auto")
  x (M, K) float16/bfloat16 (float32 too, on the triton and torch backends); values (N, K // 2) in x.dtype; meta int32 (N // 16, K // 2);
  bias (N,) float16/bfloat16/float32 or None. out = x @ decompress(values, meta).T + bias,
  summed in fp32, rounded once to x.dtype.
sparse24_int8_matmul_int32(a, values, meta, *, backend="auto")
  a (M, K) int8, values (N, K // 2) int8 (2:4 int8 weights) -> exact (M, N) int32.
sparse24_int8_matmul(a, values, meta, a_scale, w_scale, bias=None, *, out_dtype=torch.bfloat16,
                     backend="auto")
  The int8 epilogue of fastllm.ops.int8_matmul: (fp32(acc) * a_scale[m]) * w_scale[n] + bias[n],
  a_scale (M,) per token or one element / a Python float (per tensor), w_scale (N,) fp32.

Shapes: any M >= 0; N a multiple of 16 and K a multiple of 64 (the metadata block of
fastllm/sparse/format.py); int8: K * 128 * 128 < 2**31. Any strides on the Triton and torch
backends; the CUDA kernel states its needs in `supports`. Semantics: fastllm/ref/sparse24.py.

Backends: "cuda" (csrc/sparse24: mma.sp on sparse tensor cores; UNVERIFIED until run on a GPU),
"triton" (triton_kernels/sparse24_gemm.py: compressed loads, dense tl.dot), "torch" (the
reference: decompress + dense matmul).
Custom ops: fastllm::sparse24_matmul, fastllm::sparse24_int8_matmul_int32, fastllm::sparse24_int8_matmul.
"""
from typing import Optional, Union

import torch

from .. import ref
from ..sparse.format import check_compressed
from ._checks import FLOAT_DTYPES, check_tensor
from .int8 import MAX_K, _check_same_device, _check_vector, _int32_torch, check_epilogue
from .registry import new_op

OP = new_op("sparse24_matmul")
OP_INT32 = new_op("sparse24_int8_matmul_int32")
OP_INT8 = new_op("sparse24_int8_matmul")

def _meta_args(M, N, K, dtype):
    return (torch.empty(M, K, dtype=dtype, device="meta"), torch.empty(N, K // 2, dtype=dtype, device="meta"),
            torch.empty(N // 16, K // 2, dtype=torch.int32, device="meta"))


OP.example = lambda: ("x (16, 4096) bf16, W (4096, 4096) 2:4 bf16", _meta_args(16, 4096, 4096, torch.bfloat16) +
                      (None,), {})
OP_INT32.example = lambda: ("a (16, 4096) int8, W (4096, 4096) 2:4 int8", _meta_args(16, 4096, 4096, torch.int8), {})
OP_INT8.example = lambda: ("a (16, 4096) int8 per-token, W (4096, 4096) 2:4 int8 -> bf16",
                           _meta_args(16, 4096, 4096, torch.int8) + (
                               torch.empty(16, device="meta"), torch.empty(4096, device="meta"), None,
                               torch.bfloat16), {})


# ----------------------------------------------------------------------------------------------
# Backends.

@OP.register("torch")
def _torch(x, values, meta, bias):
    return ref.sparse24_matmul(x, values, meta, bias)


@OP.register("triton")
def _triton(x, values, meta, bias):
    from ..triton_kernels.sparse24_gemm import sparse24_matmul
    return sparse24_matmul(x, values, meta, bias)


def _cuda_supports(*args):
    from ._sparse24_cuda import cuda_supports
    return cuda_supports(*args)


@OP.register("cuda", supports=lambda x, values, meta, bias: _cuda_supports(x, values, meta, bias, None, None))
def _cuda(x, values, meta, bias):
    from ._sparse24_cuda import sparse24_cuda
    return sparse24_cuda(x, values, meta, bias)


@OP_INT32.register("torch")
def _int32_torch_impl(a, values, meta):
    from ..sparse.format import decompress
    return _int32_torch(a, decompress(values, meta))


@OP_INT32.register("triton")
def _int32_triton(a, values, meta):
    from ..triton_kernels.sparse24_gemm import sparse24_matmul
    return sparse24_matmul(a, values, meta)


@OP_INT32.register("cuda", supports=lambda a, values, meta: _cuda_supports(a, values, meta, None, None, None))
def _int32_cuda(a, values, meta):
    from ._sparse24_cuda import sparse24_cuda
    return sparse24_cuda(a, values, meta)


@OP_INT8.register("torch")
def _int8_torch(a, values, meta, a_scale, w_scale, bias, out_dtype):
    from ..ref.int8 import scale_epilogue
    return scale_epilogue(_int32_torch_impl(a, values, meta), a_scale, w_scale, bias, out_dtype)


@OP_INT8.register("triton")
def _int8_triton(a, values, meta, a_scale, w_scale, bias, out_dtype):
    from ..triton_kernels.sparse24_gemm import sparse24_matmul
    return sparse24_matmul(a, values, meta, bias, a_scale, w_scale, out_dtype)


@OP_INT8.register("cuda", supports=lambda a, values, meta, a_scale, w_scale, bias, out_dtype:
                  _cuda_supports(a, values, meta, bias, a_scale, w_scale))
def _int8_cuda(a, values, meta, a_scale, w_scale, bias, out_dtype):
    from ._sparse24_cuda import sparse24_cuda
    return sparse24_cuda(a, values, meta, bias, a_scale, w_scale, out_dtype)


# ----------------------------------------------------------------------------------------------
# Custom ops (the backend is an argument, resolved before the op is entered).

@OP.bind
@torch.library.custom_op("fastllm::sparse24_matmul", mutates_args=())
def _op(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: Optional[torch.Tensor],
        backend: str) -> torch.Tensor:
    return OP.impls[backend](x, values, meta, bias)


@_op.register_fake
def _(x, values, meta, bias, backend):
    return x.new_empty((x.shape[0], values.shape[0]))


@OP_INT32.bind
@torch.library.custom_op("fastllm::sparse24_int8_matmul_int32", mutates_args=())
def _op_int32(a: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, backend: str) -> torch.Tensor:
    return OP_INT32.impls[backend](a, values, meta)


@_op_int32.register_fake
def _(a, values, meta, backend):
    return a.new_empty((a.shape[0], values.shape[0]), dtype=torch.int32)


@OP_INT8.bind
@torch.library.custom_op("fastllm::sparse24_int8_matmul", mutates_args=())
def _op_int8(a: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, a_scale: torch.Tensor,
             w_scale: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype,
             backend: str) -> torch.Tensor:
    return OP_INT8.impls[backend](a, values, meta, a_scale, w_scale, bias, out_dtype)


@_op_int8.register_fake
def _(a, values, meta, a_scale, w_scale, bias, out_dtype, backend):
    return a.new_empty((a.shape[0], values.shape[0]), dtype=out_dtype)


# ----------------------------------------------------------------------------------------------
# Argument checks.

def _check_operands(op, x_name, x, values, meta, dtypes):
    check_tensor(op, x_name, x, ndim=2, dtypes=dtypes)
    check_tensor(op, "values", values, ndim=2)
    if values.dtype != x.dtype:
        raise TypeError(f"{op}: argument 'values' must have the dtype of '{x_name}' "
                        f"({str(x.dtype).replace('torch.', '')}), got {str(values.dtype).replace('torch.', '')}")
    N, K = check_compressed(op, values, meta, x.shape[1])
    _check_same_device(op, x_name, x, values=values, meta=meta)
    return N, K


def sparse24_matmul(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: Optional[torch.Tensor] = None,
                    *, backend: str = "auto") -> torch.Tensor:
    """x @ W.T + bias with W 2:4-sparse, compressed: x (M, K) fp16/bf16/fp32, values (N, K // 2) in
    x.dtype, meta int32 (N // 16, K // 2) (fastllm.sparse.compress), bias (N,) or None.
    N % 16 == 0, K % 64 == 0. backend: "auto" | "cuda" | "triton" | "torch"."""
    op = "sparse24_matmul"
    N, _ = _check_operands(op, "x", x, values, meta, FLOAT_DTYPES)
    if bias is not None:
        _check_vector(op, "bias", bias, N, "one per output channel", FLOAT_DTYPES)
        _check_same_device(op, "x", x, bias=bias)
    be = OP.select(backend, x.device, x, values, meta, bias)
    return OP.call(be, x, values, meta, bias)


def _check_int8(op, a, values, meta):
    N, K = _check_operands(op, "a", a, values, meta, (torch.int8,))
    if K > MAX_K:
        raise ValueError(f"{op}: argument 'a': K = {K} > {MAX_K}: the int32 accumulator could overflow")
    return N, K


def sparse24_int8_matmul_int32(a: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, *,
                               backend: str = "auto") -> torch.Tensor:
    """Exact a @ W.T in int32: a (M, K) int8, W 2:4 int8 compressed (values (N, K // 2) int8,
    meta int32 (N // 16, K // 2)). backend: "auto" | "cuda" | "triton" | "torch"."""
    _check_int8("sparse24_int8_matmul_int32", a, values, meta)
    return OP_INT32.call(OP_INT32.select(backend, a.device, a, values, meta), a, values, meta)


def sparse24_int8_matmul(a: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                         a_scale: Union[torch.Tensor, float], w_scale: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, *, out_dtype: torch.dtype = torch.bfloat16,
                         backend: str = "auto") -> torch.Tensor:
    """2:4 W8A8 GEMM with fused dequantization: (a @ W.T) * a_scale[:, None] * w_scale + bias.
    a_scale float32 (M,) per token, or one element / a Python float (per tensor); w_scale
    float32 (N,); bias (N,) or None; out_dtype float16 / bfloat16 / float32."""
    op = "sparse24_int8_matmul"
    N, _ = _check_int8(op, a, values, meta)
    M = a.shape[0]
    a_scale = check_epilogue(op, a, M, N, a_scale, w_scale, bias, out_dtype, "output channel")
    be = OP_INT8.select(backend, a.device, a, values, meta, a_scale, w_scale, bias, out_dtype)
    return OP_INT8.call(be, a, values, meta, a_scale, w_scale, bias, out_dtype)
