// Launcher declaration for csrc/int8/quantize_per_token.cu (see that file's header).
#pragma once
#include <cstdint>

namespace fastllm {
// x: (M, K) at `x` with row stride `stride_x` (elements), dtype code from common.h;
// q: (M, K) int8 contiguous; scale: (M,) fp32. Returns 0 or an error code.
int quantize_per_token(int device, uintptr_t x, int dtype, int64_t M, int64_t K, int64_t stride_x,
                       uintptr_t q, uintptr_t scale, uintptr_t stream);
}  // namespace fastllm
