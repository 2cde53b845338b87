// 2:4 sparse GEMM launcher: argument checks, params, arch / dtype dispatch. UNVERIFIED: compiled for
// sm_80 / sm_90a, never run on a GPU. What the kernel computes: sparse24_gemm_kernel.cuh. Python
// (python/fastllm/ops/_sparse24_cuda.py) checks the tensors first; these checks repeat what the
// kernel relies on, so a bad call gets a status code instead of a fault.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/common.h"
#include "sparse24/sparse24_gemm.h"
#include "sparse24/sparse24_traits.h"

namespace fastllm {
namespace sparse24 {
struct Params;
template <typename T>
int run(const Params& p, int num_sms, int smem_optin, void* workspace, int64_t workspace_bytes, cudaStream_t stream);
extern template int run<__half>(const Params&, int, int, void*, int64_t, cudaStream_t);
extern template int run<__nv_bfloat16>(const Params&, int, int, void*, int64_t, cudaStream_t);
extern template int run<int8_t>(const Params&, int, int, void*, int64_t, cudaStream_t);
// Hopper wgmma.sp kernel (sparse24_wgmma_kernel.cuh), in sparse24_wgmma_*_sm90a.cu: 90a builds only.
template <typename T>
int run_wgmma(const Params& p, cudaStream_t stream);
}  // namespace sparse24
}  // namespace fastllm

#include "sparse24/sparse24_gemm_kernel.cuh"

namespace fastllm {

std::pair<int, int> sparse24_gemm_plan(int dtype, int64_t M, int64_t N, int64_t K, int num_sms, int smem_optin) {
  using namespace sparse24;
  int config = 1, splits = 1;
  switch (dtype) {
    case kFloat16:
      config = choose_config<__half>(M, N, num_sms, smem_optin);
      splits = choose_split_k<__half>(config, M, N, K, num_sms);
      break;
    case kBFloat16:
      config = choose_config<__nv_bfloat16>(M, N, num_sms, smem_optin);
      splits = choose_split_k<__nv_bfloat16>(config, M, N, K, num_sms);
      break;
    default:
      config = choose_config<int8_t>(M, N, num_sms, smem_optin);
      splits = choose_split_k<int8_t>(config, M, N, K, num_sms);
  }
  return {config, splits};
}

int64_t sparse24_gemm_workspace(int device, int dtype, int64_t M, int64_t N, int64_t K) {
  int sms = 0, optin = 0;
  if (M <= 0 || N <= 0 || K <= 0 ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    cudaGetLastError();  // a failed query must not linger as the next launch's error
    return 0;
  }
  const int splits = sparse24_gemm_plan(dtype, M, N, K, sms, optin).second;
  return splits > 1 ? static_cast<int64_t>(splits) * M * N * 4 : 0;
}

int sparse24_gemm(int device, int dtype, uintptr_t x, uintptr_t values, uintptr_t meta, uintptr_t out,
                  int out_dtype, int64_t M, int64_t N, int64_t K, int64_t x_row_stride, uintptr_t bias,
                  int bias_dtype, uintptr_t a_scale, bool a_scale_per_row, uintptr_t w_scale,
                  uintptr_t workspace, int64_t workspace_bytes, uintptr_t stream) {
  const bool s8 = dtype == kInt8;
  if (dtype != kFloat16 && dtype != kBFloat16 && !s8) return kErrUnsupportedDtype;
  if (M < 0 || N < 0 || K <= 0 || N % 16 || K % 64) return kErrBadShape;
  if (M == 0 || N == 0) return kOk;
  if (s8) {
    if (a_scale == 0 ? out_dtype != kInt32 : (out_dtype != kFloat16 && out_dtype != kBFloat16 &&
                                              out_dtype != kFloat32))
      return kErrUnsupportedDtype;
    if ((a_scale == 0) != (w_scale == 0)) return kErrBadShape;
    if (a_scale == 0 && bias != 0) return kErrUnsupportedDtype;  // the raw int32 path adds no bias
    if (K > 2147483647LL / (128 * 128)) return kErrBadShape;   // the int32 accumulator could overflow
  } else if (out_dtype != dtype || a_scale != 0 || w_scale != 0) {
    return kErrUnsupportedDtype;
  }
  if (bias != 0 && !float_dtype(bias_dtype))
    return kErrUnsupportedDtype;
  const int64_t elt = s8 ? 1 : 2;
  // cp.async moves 16-byte chunks: every row start and base pointer must be 16-byte aligned.
  if (x % 16 || values % 16 || meta % 16 || (M > 1 && (x_row_stride * elt) % 16) || x_row_stride < K)
    return kErrMisaligned;
  if (workspace % 16) workspace = 0, workspace_bytes = 0;   // (caching-allocator blocks are aligned)

  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return static_cast<int>(guard.status());
  int major = 0, minor = 0, optin = 0, sms = 0;
  cudaError_t e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (e != cudaSuccess) return static_cast<int>(e);
  if (major < 8) return kErrUnsupportedArch;   // mma.sp / cp.async / ldmatrix need sm80

  sparse24::Params p{};
  p.x = reinterpret_cast<const uint8_t*>(x);
  p.values = reinterpret_cast<const uint8_t*>(values);
  p.meta = reinterpret_cast<const uint32_t*>(meta);
  p.out = reinterpret_cast<void*>(out);
  p.bias = bias ? reinterpret_cast<const void*>(bias) : nullptr;
  p.a_scale = a_scale ? reinterpret_cast<const float*>(a_scale) : nullptr;
  p.w_scale = w_scale ? reinterpret_cast<const float*>(w_scale) : nullptr;
  p.M = M;
  p.N = N;
  p.K = K;
  p.x_row_bytes = x_row_stride * elt;
  p.out_dtype = out_dtype;
  p.bias_dtype = bias ? bias_dtype : -1;
  p.a_scale_per_row = a_scale_per_row;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  void* ws = reinterpret_cast<void*>(workspace);
#if FASTLLM_HAS_SM90A
  // Hopper with 90a code in the build: the wgmma.sp kernel for the calls LargeM would serve
  // (M > 64) when K is whole stages (sm_90a SASS runs on compute capability 9.0 only).
  // FASTLLM_SPARSE24_WGMMA=0 keeps the mma.sp kernel (read per call, to compare the two).
  if (major == 9 && minor == 0 && !env_is("FASTLLM_SPARSE24_WGMMA", "0") &&
      sparse24_gemm_plan(dtype, M, N, K, sms, optin).first == 2) {
    switch (dtype) {
      case kFloat16:
        if (sparse24::hopper_fits<__half>(K, optin)) return sparse24::run_wgmma<__half>(p, st);
        break;
      case kBFloat16:
        if (sparse24::hopper_fits<__nv_bfloat16>(K, optin)) return sparse24::run_wgmma<__nv_bfloat16>(p, st);
        break;
      default:
        if (sparse24::hopper_fits<int8_t>(K, optin)) return sparse24::run_wgmma<int8_t>(p, st);
    }
  }
#endif
  switch (dtype) {
    case kFloat16: return sparse24::run<__half>(p, sms, optin, ws, workspace_bytes, st);
    case kBFloat16: return sparse24::run<__nv_bfloat16>(p, sms, optin, ws, workspace_bytes, st);
    default: return sparse24::run<int8_t>(p, sms, optin, ws, workspace_bytes, st);
  }
}

}  // namespace fastllm
