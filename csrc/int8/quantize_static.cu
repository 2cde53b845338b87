// Static (calibrated) int8 activation quantization: the first half of a W8A8-static linear.
//
//   x: (M, K) fp16 / bf16 / fp32, unit stride along K, any row stride
//   mul: fp32 (K,) per input channel (SmoothQuant's smoothing / act_scale) or (1,) (1 / act_scale)
//   q[m, k] = rne(clamp(x[m, k] * mul[k], -127, 127)); NaN -> 0, +-inf -> +-127
//
// No reduction (the scale is known), so this is a flat elementwise pass: a grid-stride loop
// over 16-byte vectors when the row start, row stride and K allow them, scalars otherwise.
// Memory bound: reads the input once and writes a quarter (fp32) to a half (16-bit) of it.
//
// Bit-exactness with the reference (python/fastllm/ref/int8.py quantize_static): the product
// is __fmul_rn (never fused), the clamp is exact on integers and rounding is to nearest even
// (torch.round).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "common/common.h"
#include "int8/quantize_convert.cuh"
#include "int8/quantize_static.h"

namespace fastllm {
namespace {

using quant::to_float;
using quant::Vec;

constexpr int kThreads = 256;

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
quantize_static_kernel(const T* __restrict__ x, int64_t stride_x, const float* __restrict__ mul,
                       bool per_channel, int8_t* __restrict__ q, int64_t M, int64_t K) {
  const int64_t nvec = K / VEC;
  const int64_t total = M * nvec;
  const float mul0 = per_channel ? 0.f : mul[0];
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t row = i / nvec;
    const int64_t col = (i - row * nvec) * VEC;
    const Vec<T, VEC> vx = *reinterpret_cast<const Vec<T, VEC>*>(x + row * stride_x + col);
    Vec<int8_t, VEC> vq;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float y = __fmul_rn(to_float(vx.v[j]), per_channel ? __ldg(mul + col + j) : mul0);
      y = (y != y) ? 0.f : fminf(fmaxf(y, -127.f), 127.f);  // NaN first: fminf/fmaxf drop it
      vq.v[j] = static_cast<int8_t>(__float2int_rn(y));
    }
    *reinterpret_cast<Vec<int8_t, VEC>*>(q + row * K + col) = vq;
  }
}

template <typename T>
int launch(const void* x, int64_t M, int64_t K, int64_t stride_x, const float* mul, bool per_channel,
           void* q, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec_ok = reinterpret_cast<uintptr_t>(x) % 16 == 0 && (stride_x * sizeof(T)) % 16 == 0 &&
                      K % kVec == 0 && reinterpret_cast<uintptr_t>(q) % kVec == 0;
  const int vec = vec_ok ? kVec : 1;
  // Enough blocks to cover the tensor, capped: the grid-stride loop does the rest.
  const int64_t blocks = std::min<int64_t>((M * (K / vec) + kThreads - 1) / kThreads, 8192);
  const dim3 grid(static_cast<unsigned>(std::max<int64_t>(blocks, 1)));
  if (vec_ok) {
    quantize_static_kernel<T, kVec><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(x), stride_x, mul, per_channel, static_cast<int8_t*>(q), M, K);
  } else {
    quantize_static_kernel<T, 1><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(x), stride_x, mul, per_channel, static_cast<int8_t*>(q), M, K);
  }
  return launch_status();
}

}  // namespace

int quantize_static(int device, uintptr_t x, int dtype, int64_t M, int64_t K, int64_t stride_x,
                    uintptr_t mul, int64_t mul_len, uintptr_t q, uintptr_t stream) {
  // Rows may overlap (a broadcast x has row stride 0): the kernel only reads x.
  if (M < 0 || K < 0 || (M > 1 && stride_x < 0) || (mul_len != 1 && mul_len != K)) return kErrBadShape;
  if (M == 0 || K == 0) return kOk;
  if (mul == 0) return kErrBadShape;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return guard.status();
  auto s = reinterpret_cast<cudaStream_t>(stream);
  auto* qp = reinterpret_cast<void*>(q);
  const auto* mp = reinterpret_cast<const float*>(mul);
  const auto* xp = reinterpret_cast<const void*>(x);
  const bool per_channel = mul_len == K && K > 1;
  switch (dtype) {
    case kFloat16: return launch<__half>(xp, M, K, stride_x, mp, per_channel, qp, s);
    case kBFloat16: return launch<__nv_bfloat16>(xp, M, K, stride_x, mp, per_channel, qp, s);
    case kFloat32: return launch<float>(xp, M, K, stride_x, mp, per_channel, qp, s);
    default: return kErrUnsupportedDtype;
  }
}

}  // namespace fastllm
