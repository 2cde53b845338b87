// One element of a float tensor whose dtype is only known at run time (a common.h dtype code),
// read as fp32: the GEMM epilogue biases take float16, bfloat16 or float32 without a conversion
// pass in Python. The switch is uniform across a launch. (Attention's score bias switches once per
// tile instead and reads through a typed pointer: add_bias_log2 in flash_fwd_kernel.cuh.)
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#include "common/common.h"

namespace fastllm {

__device__ __forceinline__ float load_float(const void* p, int dtype, int64_t i) {
  switch (dtype) {
    case kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    case kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

}  // namespace fastllm
