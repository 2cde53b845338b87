// Plain parameter structs of the int8 kernels (no tensors, no torch) and the declarations
// tying the launcher (int8_launcher.cu) to the instantiation units.
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

namespace fastllm {
namespace int8 {

// W8A8: out (M, N) = epilogue(a (M, K) @ b (N, K)^T). Strides in elements (= bytes for int8).
//   a: row stride lda (multiple of 16), unit stride along K, 16-byte aligned base
//   b: row stride ldb (multiple of 16), unit stride along K, 16-byte aligned base
//   out: contiguous (M, N), int32 (raw accumulators) or fp16/bf16/fp32 (scaled)
//   a_scale: fp32, indexed a_scale[m * a_scale_stride] (stride 1 per token, 0 per tensor)
//   w_scale: fp32 (N,) contiguous; bias: (N,) contiguous of dtype bias_dtype, or nullptr
// Split-K (k_tiles_per_split > 0): grid y = splits, split s sums K tiles [s * k_tiles_per_split,
// +k_tiles_per_split) and writes raw int32 partials to out + s * split_stride (a workspace);
// run_int8_splitk_reduce then adds the splits and applies the epilogue into the real output.
struct Int8GemmParams {
  const int8_t* a;
  const int8_t* b;
  void* out;
  const float* a_scale;
  const float* w_scale;
  const void* bias;
  int64_t lda, ldb;
  int a_scale_stride;
  int bias_dtype;  // common.h DType code; ignored when bias == nullptr
  int M, N, K;
  int splits = 1, k_tiles_per_split = 0;  // 0: one split over all of K
  int64_t split_stride = 0;               // elements between the splits' partial outputs
};

// W8A16: out (M, N) = x (M, K) @ (w (N, K) * scale)^T + bias, in x's dtype (fp16 / bf16).
//   x: row stride ldx (elements, multiple of 8), unit stride along K, 16-byte aligned base
//   w: row stride ldw (multiple of 16), unit stride along K, 16-byte aligned base
//   w_scale: fp32, scale of (n, k) at w_scale[n * s_stride_n + (k / group) * s_stride_g];
//            group == 0: per channel (only the n term)
//   out: contiguous (M, N) in x's dtype
struct W8A16Params {
  const void* x;
  const int8_t* w;
  const float* w_scale;
  const void* bias;
  void* out;
  int64_t ldx, ldw, s_stride_n, s_stride_g;
  int group;
  int bias_dtype;
  int M, N, K;
};

// W8A8 at decode M with the activation quantization fused in (w8a8_decode_kernel.cuh):
// out (M, N) = epilogue(quantize(x) (M, K) @ w (N, K)^T), out in x's dtype, M <= 16.
//   x: fp16 / bf16 / fp32, row stride ldx (elements; 16-byte aligned rows), unit stride along K
//   w: row stride ldw (multiple of 16), unit stride along K, 16-byte aligned base
//   dynamic: per-token scales found in the kernel; in_mul (K,) SmoothQuant factors or nullptr
//   static: q = rne(clamp(x * in_mul[k or 0])), in_mul (K,) or (1,); act_scale: one fp32 scale
//   in_mul_len: 0 (none), 1 or K; w_scale (N,) fp32, bias (N,) of bias_dtype or nullptr
struct W8A8DecodeParams {
  const void* x;
  const int8_t* w;
  const float* w_scale;
  const void* bias;
  const float* in_mul;
  const float* act_scale;
  void* out;
  int64_t ldx, ldw;
  int in_mul_len;
  int dynamic;
  int bias_dtype;
  int M, N, K;
};

// Instantiated in int8_gemm_{i32,f16,bf16,f32}.cu (OutT = int32_t: raw accumulators).
template <typename OutT, int kConfig>
int run_int8_gemm(const Int8GemmParams& p, cudaStream_t stream);
// out = epilogue(sum over `splits` int32 partials at partial + s * p.split_stride), same units.
template <typename OutT>
int run_int8_splitk_reduce(const Int8GemmParams& p, const int32_t* partial, int splits, cudaStream_t stream);

// Hopper wgmma kernel (int8_wgmma_kernel.cuh), instantiated in int8_wgmma_*_sm90a.cu, which
// exist in the build only when it targets 90a (FASTLLM_HAS_SM90A). No split-K (p.splits == 1).
template <typename OutT, int kConfig>
int run_int8_wgmma(const Int8GemmParams& p, cudaStream_t stream);
// Its TMA-fed variant (int8_wgmma_tma_kernel.cuh, opt-in), same units; needs K > 0.
template <typename OutT, int kConfig>
int run_int8_wgmma_tma(const Int8GemmParams& p, cudaStream_t stream);

// Instantiated in w8a16_gemm_{f16,bf16}.cu.
template <typename T, int kTokenTiles, int kWarps>
int run_w8a16(const W8A16Params& p, cudaStream_t stream);

// Instantiated in w8a8_decode_{f16,bf16,f32}.cu (T = x's and out's dtype).
template <typename T, int kTokenTiles, int kWarps>
int run_w8a8_decode(const W8A8DecodeParams& p, cudaStream_t stream);

}  // namespace int8
}  // namespace fastllm
