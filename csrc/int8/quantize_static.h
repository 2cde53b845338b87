// Launcher declaration for csrc/int8/quantize_static.cu (see that file's header).
#pragma once
#include <cstdint>

namespace fastllm {
// x: (M, K) at `x` with row stride `stride_x` (elements), dtype code from common.h;
// mul: fp32, K elements (per channel) or 1 (per tensor, mul_len 1); q: (M, K) int8 contiguous.
// Returns 0 or an error code.
int quantize_static(int device, uintptr_t x, int dtype, int64_t M, int64_t K, int64_t stride_x,
                    uintptr_t mul, int64_t mul_len, uintptr_t q, uintptr_t stream);
}  // namespace fastllm
