// int8 matmuls: the launchers (argument checks, config choice, dispatch). No kernel here.
// UNVERIFIED: compiled for sm_80 / sm_90a, never run on a GPU yet.
//
// What the kernels compute: int8_gemm_kernel.cuh (W8A8), w8a16_gemm_kernel.cuh (W8A16) and
// w8a8_decode_kernel.cuh (W8A8 at decode M with the activation quantization fused in).
// Python (python/fastllm/ops/_int8_cuda.py) checks the tensors first; the checks here repeat
// everything the kernels rely on (alignment, strides, shapes, dtypes), so a bad call returns
// a status code instead of faulting. Tile configs are chosen in int8_traits.h only.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>

#include "common/common.h"
#include "int8/int8_gemm.h"
#include "int8/int8_gemm_params.h"
#include "int8/int8_traits.h"

namespace fastllm {
namespace int8 {
namespace {

// K * 128 * 128 must stay below 2^31 for the int32 accumulator to be exact (as the op checks).
constexpr int64_t kMaxK = (static_cast<int64_t>(INT_MAX)) / (128 * 128);
// Row / tile index arithmetic is int: keep M and N (plus one tile) inside it.
constexpr int64_t kMaxDim = INT_MAX - 1024;

bool aligned(uintptr_t p, int bytes) { return p % bytes == 0; }

int sm_info(int device, int* major, int* sms, int* minor = nullptr) {
  cudaError_t e = cudaDeviceGetAttribute(major, cudaDevAttrComputeCapabilityMajor, device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device);
  if (e == cudaSuccess && minor) e = cudaDeviceGetAttribute(minor, cudaDevAttrComputeCapabilityMinor, device);
  return static_cast<int>(e);
}

template <typename OutT>
int gemm_config(const Int8GemmParams& p, int config, cudaStream_t s) {
  switch (config) {
    case 0: return run_int8_gemm<OutT, 0>(p, s);
    case 1: return run_int8_gemm<OutT, 1>(p, s);
    case 2: return run_int8_gemm<OutT, 2>(p, s);
    case 3: return run_int8_gemm<OutT, 3>(p, s);
    case 4: return run_int8_gemm<OutT, 4>(p, s);
    default: return kErrBadShape;
  }
}
static_assert(kNumGemmConfigs == 5, "update gemm_config() and generate_instantiations.py");

#if FASTLLM_HAS_SM90A
template <typename OutT>
int wgmma_config(const Int8GemmParams& p, int config, bool tma, cudaStream_t s) {
  if (tma) return config == 0 ? run_int8_wgmma_tma<OutT, 0>(p, s) : run_int8_wgmma_tma<OutT, 1>(p, s);
  return config == 0 ? run_int8_wgmma<OutT, 0>(p, s) : run_int8_wgmma<OutT, 1>(p, s);
}
static_assert(kNumWgmmaConfigs == 2, "update wgmma_config() and generate_instantiations.py");

// Which Hopper kernel: FASTLLM_INT8_WGMMA=0 keeps Hopper on the sm80 kernel, =tma selects the
// experimental TMA-fed variant, anything else the cp.async-fed wgmma kernel.
enum class WgmmaMode { kOff, kCpAsync, kTma };
WgmmaMode wgmma_mode() {
  if (env_is("FASTLLM_INT8_WGMMA", "0")) return WgmmaMode::kOff;
  return env_is("FASTLLM_INT8_WGMMA", "tma") ? WgmmaMode::kTma : WgmmaMode::kCpAsync;
}
#endif

// Split-K: pass 1 (`partials`, a kernel launch writing raw int32) sums K slices of k_tile-wide
// steps into per-slice planes of the workspace; pass 2 adds them and applies the epilogue.
template <typename Pass1>
int split_k_gemm(Int8GemmParams p, int splits, int k_tile, int out_dtype, uintptr_t workspace, cudaStream_t s,
                 Pass1 partials) {
  const int k_tiles = ceil_div(p.K, k_tile);
  Int8GemmParams q = p;
  q.k_tiles_per_split = ceil_div(k_tiles, splits);
  q.splits = ceil_div(k_tiles, q.k_tiles_per_split);  // every launched slice is non-empty
  q.split_stride = static_cast<int64_t>(p.M) * p.N;
  q.out = reinterpret_cast<void*>(workspace);
  if (const int e = partials(q)) return e;
  const auto* partial = reinterpret_cast<const int32_t*>(workspace);
  p.split_stride = q.split_stride;
  switch (out_dtype) {
    case kInt32: return run_int8_splitk_reduce<int32_t>(p, partial, q.splits, s);
    case kFloat16: return run_int8_splitk_reduce<__half>(p, partial, q.splits, s);
    case kBFloat16: return run_int8_splitk_reduce<__nv_bfloat16>(p, partial, q.splits, s);
    default: return run_int8_splitk_reduce<float>(p, partial, q.splits, s);
  }
}

bool workspace_fits(int splits, int64_t M, int64_t N, uintptr_t workspace, int64_t workspace_bytes) {
  return splits > 1 && workspace != 0 && aligned(workspace, 8) && workspace_bytes >= int64_t{splits} * M * N * 4;
}

// Whether int8_gemm runs the cp.async-fed wgmma kernel on this device (the one path besides sm80
// that splits K): a 90a build on an sm_90 GPU, not switched off or to the TMA variant.
bool wgmma_split_capable(int major, int minor) {
#if FASTLLM_HAS_SM90A
  return major == 9 && minor == 0 && wgmma_mode() == WgmmaMode::kCpAsync;
#else
  (void)major, (void)minor;
  return false;
#endif
}

template <typename T>
int w8a16_variant(const W8A16Params& p, const W8A16Choice& c, cudaStream_t s) {
  if (c.token_tiles == 1) return c.warps == 4 ? run_w8a16<T, 1, 4>(p, s) : run_w8a16<T, 1, 8>(p, s);
  return c.warps == 4 ? run_w8a16<T, 2, 4>(p, s) : run_w8a16<T, 2, 8>(p, s);
}

template <typename T>
int w8a8_decode_variant(const W8A8DecodeParams& p, const W8A16Choice& c, cudaStream_t s) {
  if (c.token_tiles == 1) return c.warps == 4 ? run_w8a8_decode<T, 1, 4>(p, s) : run_w8a8_decode<T, 1, 8>(p, s);
  return c.warps == 4 ? run_w8a8_decode<T, 2, 4>(p, s) : run_w8a8_decode<T, 2, 8>(p, s);
}

// The decode kernels' (W8A16, fused W8A8) common tail: on `device` (the guard lives until the
// launch returns), check the arch (bf16 / s8 mma.sync need sm80), pick the 16-channels-per-CTA
// plan for this SM count and run `launch(plan, stream)`.
template <typename Launch>
int launch_decode_plan(int device, int64_t M, int64_t N, int64_t K, uintptr_t stream, Launch launch) {
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return guard.status();
  int major = 0, sms = 0;
  if (const int e = sm_info(device, &major, &sms)) return e;
  if (major < 8) return kErrUnsupportedArch;
  return launch(choose_w8a16_config(M, N, K, sms), reinterpret_cast<cudaStream_t>(stream));
}

}  // namespace
}  // namespace int8

std::pair<int, int> int8_gemm_plan(int64_t M, int64_t N, int64_t K, int num_sms, bool hopper) {
  using namespace int8;
  if (hopper) {
    const int wc = choose_wgmma_config(M, N, num_sms);
    if (wc >= 0) return {kNumGemmConfigs + wc, choose_wgmma_split(wc, M, N, K, num_sms)};
  }
  const int config = choose_gemm_config(M, N, K, num_sms);
  return {config, choose_split_k(config, M, N, K, num_sms)};
}

int64_t int8_gemm_workspace(int device, int64_t M, int64_t N, int64_t K) {
  using namespace int8;
  int sms = 0, major = 0, minor = 0;
  if (M <= 0 || N <= 0 || K <= 0 || sm_info(device, &major, &sms, &minor) != 0) {
    cudaGetLastError();  // a failed query must not linger as the next launch's error
    return 0;
  }
  const int splits = int8_gemm_plan(M, N, K, sms, wgmma_split_capable(major, minor)).second;
  return splits > 1 ? static_cast<int64_t>(splits) * M * N * 4 : 0;
}

int int8_gemm(int device, uintptr_t a, int64_t lda, uintptr_t b, int64_t ldb, uintptr_t out, int out_dtype,
              uintptr_t a_scale, int64_t a_scale_len, uintptr_t w_scale, uintptr_t bias, int bias_dtype, int64_t M,
              int64_t N, int64_t K, uintptr_t workspace, int64_t workspace_bytes, uintptr_t stream) {
  using namespace int8;
  if (out_dtype != kInt32 && !float_dtype(out_dtype)) return kErrUnsupportedDtype;
  if (M < 0 || N < 0 || K < 0 || M > kMaxDim || N > kMaxDim || K > kMaxK || N % 16 || K % 16) return kErrBadShape;
  if (M == 0 || N == 0) return kOk;
  // cp.async moves 16-byte chunks: 16-byte aligned rows. A single row's stride is never used,
  // nor any stride when K == 0 (PyTorch gives an empty (M, 0) tensor strides (1, 1)).
  if (K == 0) lda = ldb = 0;
  if (M > 1 && lda < K) return kErrBadShape;
  if (ldb < K && N > 1) return kErrBadShape;
  if (!aligned(a, 16) || !aligned(b, 16) || lda % 16 || ldb % 16) return kErrMisaligned;
  if (!aligned(out, out_dtype == kInt32 || out_dtype == kFloat32 ? 8 : 4)) return kErrMisaligned;  // pair stores
  const bool scaled = out_dtype != kInt32;
  if (scaled) {
    if (a_scale == 0 || w_scale == 0 || !aligned(a_scale, 4) || !aligned(w_scale, 4)) return kErrMisaligned;
    if (a_scale_len != 1 && a_scale_len != M) return kErrBadShape;
    if (bias != 0 && (!float_dtype(bias_dtype) || !aligned(bias, dtype_bytes(bias_dtype)))) return kErrUnsupportedDtype;
  }
  Int8GemmParams p{};
  p.a = reinterpret_cast<const int8_t*>(a);
  p.b = reinterpret_cast<const int8_t*>(b);
  p.out = reinterpret_cast<void*>(out);
  p.a_scale = scaled ? reinterpret_cast<const float*>(a_scale) : nullptr;
  p.w_scale = scaled ? reinterpret_cast<const float*>(w_scale) : nullptr;
  p.bias = scaled ? reinterpret_cast<const void*>(bias) : nullptr;
  p.lda = M > 1 ? lda : K;
  p.ldb = N > 1 ? ldb : K;
  p.a_scale_stride = a_scale_len == 1 ? 0 : 1;
  p.bias_dtype = bias_dtype;
  p.M = static_cast<int>(M), p.N = static_cast<int>(N), p.K = static_cast<int>(K);

  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return guard.status();
  int major = 0, minor = 0, sms = 0;
  if (const int e = sm_info(device, &major, &sms, &minor)) return e;
  if (major < 8) return kErrUnsupportedArch;  // cp.async, ldmatrix and s8 m16n8k32 need sm80
  auto s = reinterpret_cast<cudaStream_t>(stream);
#if FASTLLM_HAS_SM90A
  // Hopper with 90a code in the build: the wgmma kernel for M > kWgmmaMinM (the units carry
  // sm_90a SASS only, which runs on compute capability 9.0 alone).
  const WgmmaMode mode = wgmma_mode();
  if (major == 9 && minor == 0 && mode != WgmmaMode::kOff) {
    const int wc = choose_wgmma_config(M, N, sms);
    const bool tma = mode == WgmmaMode::kTma && K > 0;  // a tensor map needs a non-empty K
    if (wc >= 0) {
      const int splits = mode == WgmmaMode::kCpAsync ? choose_wgmma_split(wc, M, N, K, sms) : 1;
      if (workspace_fits(splits, M, N, workspace, workspace_bytes)) {
        return split_k_gemm(p, splits, WgmmaConfig<0>::kBK, out_dtype, workspace, s,
                            [&](const Int8GemmParams& q) { return wgmma_config<int32_t>(q, wc, false, s); });
      }
      switch (out_dtype) {
        case kInt32: return wgmma_config<int32_t>(p, wc, tma, s);
        case kFloat16: return wgmma_config<__half>(p, wc, tma, s);
        case kBFloat16: return wgmma_config<__nv_bfloat16>(p, wc, tma, s);
        default: return wgmma_config<float>(p, wc, tma, s);
      }
    }
  }
#endif
  const int config = choose_gemm_config(M, N, K, sms);
  const int splits = choose_split_k(config, M, N, K, sms);
  if (workspace_fits(splits, M, N, workspace, workspace_bytes)) {
    return split_k_gemm(p, splits, gemm_k_tile(config), out_dtype, workspace, s,
                        [&](const Int8GemmParams& q) { return gemm_config<int32_t>(q, config, s); });
  }
  switch (out_dtype) {
    case kInt32: return gemm_config<int32_t>(p, config, s);
    case kFloat16: return gemm_config<__half>(p, config, s);
    case kBFloat16: return gemm_config<__nv_bfloat16>(p, config, s);
    default: return gemm_config<float>(p, config, s);
  }
}

int w8a16_gemm(int device, int dtype, uintptr_t x, int64_t ldx, uintptr_t w, int64_t ldw, uintptr_t w_scale,
               int64_t s_stride_n, int64_t s_stride_g, int64_t group_size, uintptr_t bias, int bias_dtype,
               uintptr_t out, int64_t M, int64_t N, int64_t K, uintptr_t stream) {
  using namespace int8;
  if (dtype != kFloat16 && dtype != kBFloat16) return kErrUnsupportedDtype;
  if (M < 0 || M > kW8A16MaxM || N < 0 || K < 0 || N > kMaxDim || K > kMaxDim || N % 16 || K % 16)
    return kErrBadShape;
  if (group_size < 0 || (group_size > 0 && (group_size % 64 || K % group_size))) return kErrBadShape;
  if (M == 0 || N == 0) return kOk;
  if (K == 0) ldx = ldw = 0;  // no row is read (and an empty (M, 0) tensor has stride 1)
  if (M > 1 && ldx < K) return kErrBadShape;
  if (ldw < K && N > 1) return kErrBadShape;
  if (!aligned(x, 16) || !aligned(w, 16) || ldx % 8 || ldw % 16 || !aligned(out, 2)) return kErrMisaligned;
  if (w_scale == 0 || !aligned(w_scale, 4) || s_stride_n < 0 || s_stride_g < 0) return kErrMisaligned;
  if (bias != 0 && (!float_dtype(bias_dtype) || !aligned(bias, dtype_bytes(bias_dtype)))) return kErrUnsupportedDtype;
  W8A16Params p{};
  p.x = reinterpret_cast<const void*>(x);
  p.w = reinterpret_cast<const int8_t*>(w);
  p.w_scale = reinterpret_cast<const float*>(w_scale);
  p.bias = reinterpret_cast<const void*>(bias);
  p.out = reinterpret_cast<void*>(out);
  p.ldx = M > 1 ? ldx : 0;
  p.ldw = N > 1 ? ldw : K;
  p.s_stride_n = s_stride_n, p.s_stride_g = group_size > 0 ? s_stride_g : 0;
  p.group = static_cast<int>(group_size);
  p.bias_dtype = bias_dtype;
  p.M = static_cast<int>(M), p.N = static_cast<int>(N), p.K = static_cast<int>(K);

  return launch_decode_plan(device, M, N, K, stream, [&](const W8A16Choice& c, cudaStream_t s) {
    return dtype == kFloat16 ? w8a16_variant<__half>(p, c, s) : w8a16_variant<__nv_bfloat16>(p, c, s);
  });
}

int w8a8_decode_gemm(int device, int dtype, uintptr_t x, int64_t ldx, uintptr_t w, int64_t ldw, uintptr_t w_scale,
                     uintptr_t bias, int bias_dtype, uintptr_t in_mul, int64_t in_mul_len, uintptr_t act_scale,
                     int dynamic, uintptr_t out, int64_t M, int64_t N, int64_t K, uintptr_t stream) {
  using namespace int8;
  if (!float_dtype(dtype)) return kErrUnsupportedDtype;
  if (M < 0 || M > kW8A16MaxM || N < 0 || K < 0 || N > kMaxDim || K > kMaxK || N % 16 || K % 16)
    return kErrBadShape;
  // dynamic: no multiplier or K SmoothQuant factors; static: one per tensor or one per channel.
  if (dynamic ? (in_mul_len != 0 && in_mul_len != K) : (in_mul_len != 1 && in_mul_len != K)) return kErrBadShape;
  if (M == 0 || N == 0) return kOk;
  if (K == 0) ldx = ldw = 0;  // no row is read
  if (M > 1 && ldx < K) return kErrBadShape;
  if (ldw < K && N > 1) return kErrBadShape;
  const int xb = dtype_bytes(dtype);
  if (!aligned(x, 16) || !aligned(w, 16) || (ldx * xb) % 16 || ldw % 16 || !aligned(out, xb)) return kErrMisaligned;
  if (w_scale == 0 || !aligned(w_scale, 4)) return kErrMisaligned;
  // Per-channel multipliers are read as float4.
  if (in_mul_len > 0 && (in_mul == 0 || !aligned(in_mul, in_mul_len > 1 ? 16 : 4))) return kErrMisaligned;
  if (!dynamic && (act_scale == 0 || !aligned(act_scale, 4))) return kErrMisaligned;
  if (bias != 0 && (!float_dtype(bias_dtype) || !aligned(bias, dtype_bytes(bias_dtype)))) return kErrUnsupportedDtype;
  W8A8DecodeParams p{};
  p.x = reinterpret_cast<const void*>(x);
  p.w = reinterpret_cast<const int8_t*>(w);
  p.w_scale = reinterpret_cast<const float*>(w_scale);
  p.bias = reinterpret_cast<const void*>(bias);
  p.in_mul = in_mul_len > 0 ? reinterpret_cast<const float*>(in_mul) : nullptr;
  p.act_scale = dynamic ? nullptr : reinterpret_cast<const float*>(act_scale);
  p.out = reinterpret_cast<void*>(out);
  p.ldx = M > 1 ? ldx : 0;
  p.ldw = N > 1 ? ldw : K;
  p.in_mul_len = static_cast<int>(in_mul_len);
  p.dynamic = dynamic ? 1 : 0;
  p.bias_dtype = bias_dtype;
  p.M = static_cast<int>(M), p.N = static_cast<int>(N), p.K = static_cast<int>(K);

  return launch_decode_plan(device, M, N, K, stream, [&](const W8A16Choice& c, cudaStream_t s) {
    switch (dtype) {
      case kFloat16: return w8a8_decode_variant<__half>(p, c, s);
      case kBFloat16: return w8a8_decode_variant<__nv_bfloat16>(p, c, s);
      default: return w8a8_decode_variant<float>(p, c, s);
    }
  });
}

}  // namespace fastllm
