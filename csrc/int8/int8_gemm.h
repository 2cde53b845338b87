// Launcher declarations of the int8 matmul kernels (csrc/int8/int8_launcher.cu).
// UNVERIFIED: compiled for sm_80 / sm_90a, never run on a GPU yet.
#pragma once
#include <cstdint>
#include <utility>

namespace fastllm {
// W8A8: out (M, N) contiguous = a (M, K) int8 @ b (N, K) int8 ^T, raw int32 when out_dtype is
// kInt32, else fmaf(fp32(acc) * a_scale[m or 0], w_scale[n], bias[n]) rounded to out_dtype
// (fp16 / bf16 / fp32). lda / ldb: row strides in elements (multiples of 16); a_scale_len: 1
// (per tensor) or M (per token); w_scale (N,) fp32; bias (N,) of bias_dtype, or 0 for none.
// K, N multiples of 16, K <= 131071. workspace: device memory of workspace_bytes (8-byte aligned)
// for split-K partials, or 0; with less than int8_gemm_workspace() asks for, no split is made.
// Returns 0 or an error code (common.h Status / cudaError_t).
int int8_gemm(int device, uintptr_t a, int64_t lda, uintptr_t b, int64_t ldb, uintptr_t out, int out_dtype,
              uintptr_t a_scale, int64_t a_scale_len, uintptr_t w_scale, uintptr_t bias, int bias_dtype, int64_t M,
              int64_t N, int64_t K, uintptr_t workspace, int64_t workspace_bytes, uintptr_t stream);
// Bytes of split-K workspace int8_gemm wants for this call on `device` (0: no split; also 0
// when the device cannot be queried).
int64_t int8_gemm_workspace(int device, int64_t M, int64_t N, int64_t K);
// The plan for (M, N, K) on a GPU with num_sms SMs, without a GPU: {config index, splits}.
// hopper: the GPU is sm_90 and the build has 90a code, so the wgmma configs may be chosen
// (index kNumGemmConfigs + WgmmaConfig index). For tests and `fastllm.info`; the launcher uses
// the same functions (int8_traits.h).
std::pair<int, int> int8_gemm_plan(int64_t M, int64_t N, int64_t K, int num_sms, bool hopper = false);
// W8A16: out (M, N) contiguous in dtype = x (M, K) @ (w (N, K) int8 * scale)^T + bias, M <= 16.
// dtype fp16 / bf16; ldx (multiple of 8) / ldw (multiple of 16) row strides in elements;
// scale of (n, k) = w_scale[n * s_stride_n + (k / group_size) * s_stride_g], group_size 0 (per
// channel) or a multiple of 64 dividing K; bias (N,) of bias_dtype or 0. K, N multiples of 16.
int w8a16_gemm(int device, int dtype, uintptr_t x, int64_t ldx, uintptr_t w, int64_t ldw, uintptr_t w_scale,
               int64_t s_stride_n, int64_t s_stride_g, int64_t group_size, uintptr_t bias, int bias_dtype,
               uintptr_t out, int64_t M, int64_t N, int64_t K, uintptr_t stream);
// W8A8 at decode M (<= 16) with the activation quantization fused in: out (M, N) contiguous in
// dtype (fp16 / bf16 / fp32, x's) = fmaf(fp32(quantize(x) @ w^T) * a_scale[m], w_scale[n], bias[n]).
// dynamic != 0: per-token scales found in the kernel (quantize_per_token), in_mul (K,) SmoothQuant
// factors applied first (in_mul_len K) or none (0); dynamic == 0: q = rne(clamp(x * in_mul)),
// in_mul_len 1 or K (16-byte aligned when K), a_scale = act_scale[0]. ldx: x's row stride in
// elements (16-byte rows); ldw multiple of 16. K, N multiples of 16, K <= 131071.
int w8a8_decode_gemm(int device, int dtype, uintptr_t x, int64_t ldx, uintptr_t w, int64_t ldw, uintptr_t w_scale,
                     uintptr_t bias, int bias_dtype, uintptr_t in_mul, int64_t in_mul_len, uintptr_t act_scale,
                     int dynamic, uintptr_t out, int64_t M, int64_t N, int64_t K, uintptr_t stream);
}  // namespace fastllm
