// Launcher declaration for the 2:4 sparse GEMM (csrc/sparse24/sparse24_gemm_launcher.cu).
// UNVERIFIED: compiled for sm_80 / sm_90a with 0 spills, never run on a GPU.
#pragma once
#include <cstdint>
#include <utility>

namespace fastllm {
// out (M, N) contiguous = x (M, K) @ W^T, W (N, K) 2:4 along K given as values (N, K/2)
// contiguous + meta (N/16, K/2) int32 contiguous (python/fastllm/sparse/format.py).
// dtype: x and values (kFloat16 / kBFloat16 -> out_dtype must equal it; kInt8 -> out_dtype kInt32
// for the raw accumulator, or a float type with a_scale / w_scale for the int8 epilogue).
// x_row_stride in elements; bias (N,) of bias_dtype (or 0 with bias_dtype -1); a_scale (M,) or
// (1,) fp32 per a_scale_per_row; w_scale (N,) fp32. workspace: sparse24_gemm_workspace() bytes
// of device memory for split-K (0 / too small: no split). Returns 0 or an error code (common.h).
int sparse24_gemm(int device, int dtype, uintptr_t x, uintptr_t values, uintptr_t meta, uintptr_t out,
                  int out_dtype, int64_t M, int64_t N, int64_t K, int64_t x_row_stride, uintptr_t bias,
                  int bias_dtype, uintptr_t a_scale, bool a_scale_per_row, uintptr_t w_scale,
                  uintptr_t workspace, int64_t workspace_bytes, uintptr_t stream);
// Bytes of split-K workspace a call needs on `device` (0: it runs in one pass).
int64_t sparse24_gemm_workspace(int device, int dtype, int64_t M, int64_t N, int64_t K);
// (config: 0 NarrowM / 1 SmallM / 2 LargeM, K splits) the launcher picks; host only, no GPU needed.
std::pair<int, int> sparse24_gemm_plan(int dtype, int64_t M, int64_t N, int64_t K, int num_sms, int smem_optin);
}  // namespace fastllm
