// Loads shared by the int8 quantization kernels: 16-bit / fp32 element -> fp32, and an
// aligned vector of N elements for 16-byte loads and stores.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fastllm {
namespace quant {

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float(float v) { return v; }
template <> __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

}  // namespace quant
}  // namespace fastllm
