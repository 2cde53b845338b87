// Per-token (row-wise) symmetric int8 quantization.
//
//   x: (M, K) fp16 / bf16 / fp32, unit stride along K, any row stride
//   scale[m] = amax_m / 127                 (amax_m = max_k |x[m, k]|)
//   q[m, k]  = rne(x[m, k] * (127 / amax_m)), clamped to [-127, 127]
// Edge rows: amax == 0 -> scale 1 and q 0 (never a 0 or NaN scale); a row holding NaN/inf
// -> scale NaN and q 0, so the bad row shows instead of turning into plausible integers.
//
// Algorithm: one thread block per row; pass 1 reduces amax (warp shuffles, then shared
// memory), pass 2 re-reads the row (now in L2) and writes int8. 16-byte vector loads when
// the row start and K allow them, scalar loads otherwise. The op is memory bound: it reads
// 2x and writes 0.5x (fp16) of the input bytes per row.
//
// Bit-exactness with the reference (python/fastllm/ref/quantize.py): 127/amax is an IEEE
// division, x * inv uses __fmul_rn (never fused into an FMA) and rounding is to nearest
// even, which is what torch.round does.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/common.h"
#include "int8/quantize_convert.cuh"
#include "int8/quantize_per_token.h"

namespace fastllm {
namespace {

// 256 threads: enough loads in flight per SM at one block per row for K >= 2048, and the
// amax reduction stays two shuffle rounds deep. Tiny K wastes threads but costs little.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

using quant::to_float;
using quant::Vec;

__device__ __forceinline__ float block_max(float v, float* smem) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < kWarps ? smem[lane] : 0.f;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;  // every thread holds the block's max
}

// VEC elements per load: 16 / sizeof(T) when aligned, 1 otherwise.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
quantize_per_token_kernel(const T* __restrict__ x, int64_t stride_x, int8_t* __restrict__ q,
                          float* __restrict__ scale, int64_t K) {
  __shared__ float smem[kWarps];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * stride_x;
  int8_t* qr = q + row * K;
  const int64_t nvec = K / VEC;

  // Pass 1: amax, and whether anything is NaN/inf (fmaxf would drop a NaN silently).
  float amax = 0.f;
  bool bad = false;
  for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {
    Vec<T, VEC> vx = reinterpret_cast<const Vec<T, VEC>*>(xr)[i];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float f = fabsf(to_float(vx.v[j]));
      bad |= !(f <= 3.402823466e38f);  // true for NaN and inf
      amax = fmaxf(amax, f);
    }
  }
  amax = block_max(bad ? INFINITY : amax, smem);
  const bool row_bad = !(amax <= 3.402823466e38f);
  const float inv = (amax > 0.f && !row_bad) ? 127.f / amax : 0.f;
  if (threadIdx.x == 0) scale[row] = row_bad ? NAN : (amax > 0.f ? amax / 127.f : 1.f);

  // Pass 2: quantize; the row is re-read from L2.
  for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {
    Vec<T, VEC> vx = reinterpret_cast<const Vec<T, VEC>*>(xr)[i];
    Vec<int8_t, VEC> vq;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int r = __float2int_rn(__fmul_rn(to_float(vx.v[j]), inv));
      vq.v[j] = static_cast<int8_t>(max(-127, min(127, r)));
    }
    reinterpret_cast<Vec<int8_t, VEC>*>(qr)[i] = vq;
  }
}

template <typename T>
int launch(const void* x, int64_t M, int64_t K, int64_t stride_x, void* q, float* scale,
           cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec_ok = reinterpret_cast<uintptr_t>(x) % 16 == 0 && (stride_x * sizeof(T)) % 16 == 0 &&
                      K % kVec == 0 && reinterpret_cast<uintptr_t>(q) % kVec == 0;
  const dim3 grid(static_cast<unsigned>(M));
  if (vec_ok) {
    quantize_per_token_kernel<T, kVec><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(x), stride_x, static_cast<int8_t*>(q), scale, K);
  } else {
    quantize_per_token_kernel<T, 1><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(x), stride_x, static_cast<int8_t*>(q), scale, K);
  }
  return launch_status();
}

}  // namespace

int quantize_per_token(int device, uintptr_t x, int dtype, int64_t M, int64_t K, int64_t stride_x,
                       uintptr_t q, uintptr_t scale, uintptr_t stream) {
  // Rows may overlap (a broadcast x has row stride 0): the kernel only reads x.
  if (M < 0 || K < 0 || M > 0x7fffffff || (M > 1 && stride_x < 0)) return kErrBadShape;
  if (M == 0) return kOk;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return guard.status();
  auto s = reinterpret_cast<cudaStream_t>(stream);
  auto* qp = reinterpret_cast<void*>(q);
  auto* sp = reinterpret_cast<float*>(scale);
  const auto* xp = reinterpret_cast<const void*>(x);
  switch (dtype) {
    case kFloat16: return launch<__half>(xp, M, K, stride_x, qp, sp, s);
    case kBFloat16: return launch<__nv_bfloat16>(xp, M, K, stride_x, qp, sp, s);
    case kFloat32: return launch<float>(xp, M, K, stride_x, qp, sp, s);
    default: return kErrUnsupportedDtype;
  }
}

}  // namespace fastllm
