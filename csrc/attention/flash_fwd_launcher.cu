// Prefill flash-attention forward: the launcher (argument checks, params, dispatch).
//
// What the kernel computes and how: flash_fwd_kernel.cuh (sm80+, mma.sync) and
// flash_fwd_wgmma.cuh (Hopper, wgmma; same skeleton). This unit holds no attention kernel; it
// maps (arch, dtype, head dim) to an instantiation (flash_fwd_hdim{D}_{dtype}[_sm90a].cu) whose
// tile config is in flash_traits.h. Python (python/fastllm/ops/_attention_cuda.py) checks the tensors
// first; the checks here repeat what the kernel relies on, so a bad call gets a status code
// instead of a fault. The one kernel here serves calls without keys (Skv == 0).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cmath>

#include "attention/flash_fwd.h"
#include "attention/flash_params.h"
#include "common/common.h"

namespace fastllm {
namespace attention {
namespace {

constexpr double kLog2e = 1.4426950408889634;

// Skv == 0: every row is empty, so out = 0 and lse = -inf (or the head's sink); a plain fill,
// instead of launching the attention kernel (and its shared-memory opt-in) for nothing.
// Grid-stride over 16-byte chunks of out (D * 2 bytes is a multiple of 16) and over lse
// (B, Hq, Sq): element i is head (i / Sq) % Hq.
constexpr int kFillThreads = 256;
__global__ void __launch_bounds__(kFillThreads) flash_fwd_no_keys_kernel(uint4* out, int64_t out_chunks, float* lse,
                                                                         int64_t lse_len, const float* sinks,
                                                                         int heads_q, int seqlen_q) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kFillThreads;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kFillThreads) + threadIdx.x; i < out_chunks; i += stride)
    out[i] = make_uint4(0, 0, 0, 0);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kFillThreads) + threadIdx.x; i < lse_len; i += stride)
    lse[i] = sinks != nullptr ? sinks[(i / seqlen_q) % heads_q] : -INFINITY;
}

int launch_no_keys(const FlashFwdParams& p, int head_dim, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q;
  const int64_t chunks = rows * head_dim / 8;
  const int64_t blocks = (chunks + kFillThreads - 1) / kFillThreads;
  const unsigned grid = static_cast<unsigned>(blocks < 1024 ? blocks : 1024);
  flash_fwd_no_keys_kernel<<<grid, kFillThreads, 0, stream>>>(static_cast<uint4*>(p.out), chunks, p.lse, rows,
                                                              p.sinks, p.heads_q, p.seqlen_q);
  return launch_status();
}

template <typename T>
int run_sm80_head_dim(const FlashFwdParams& p, int head_dim, cudaStream_t stream) {
  switch (head_dim) {
    case 64: return run_flash_fwd_sm80<T, 64>(p, stream);
    case 80: return run_flash_fwd_sm80<T, 80>(p, stream);
    case 96: return run_flash_fwd_sm80<T, 96>(p, stream);
    case 128: return run_flash_fwd_sm80<T, 128>(p, stream);
    case 256: return run_flash_fwd_sm80<T, 256>(p, stream);
    default: return kErrBadShape;
  }
}

#if FASTLLM_HAS_SM90A
template <typename T>
int run_sm90_head_dim(const FlashFwdParams& p, int head_dim, cudaStream_t stream) {
  switch (head_dim) {
    case 64: return run_flash_fwd_sm90<T, 64>(p, stream);
    case 128: return run_flash_fwd_sm90<T, 128>(p, stream);
    default: return run_flash_fwd_sm90<T, 256>(p, stream);
  }
}
#endif

// Whether the Hopper wgmma kernel serves this call: a 90a build (sm_90a SASS runs on compute
// capability 9.0 only), D in {64, 128, 256}, not switched off with FASTLLM_ATTN_WGMMA=0 (read
// per call, so the benchmark and the tests compare both kernels in one process).
bool use_wgmma(int major, int minor, int head_dim) {
#if FASTLLM_HAS_SM90A
  return major == 9 && minor == 0 && (head_dim == 64 || head_dim == 128 || head_dim == 256) &&
         !env_is("FASTLLM_ATTN_WGMMA", "0");
#else
  (void)major, (void)minor, (void)head_dim;
  return false;
#endif
}

// The one place that picks a kernel family by GPU arch.
int dispatch(const FlashFwdParams& p, int device, int dtype, int head_dim, cudaStream_t stream) {
  int major = 0, minor = 0;
  cudaError_t e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (e != cudaSuccess) return static_cast<int>(e);
  if (major < 8) return kErrUnsupportedArch;  // cp.async / bf16 mma.sync need sm80
  // Dense calls without keys: a plain fill. Varlen key counts live on the device, so there
  // the kernel writes out = 0 / lse = -inf for a sequence without keys itself.
  if (p.seqlen_kv == 0 && p.cu_seqlens_q == nullptr) return launch_no_keys(p, head_dim, stream);
#if FASTLLM_HAS_SM90A
  if (use_wgmma(major, minor, head_dim)) {
    return dtype == kFloat16 ? run_sm90_head_dim<__half>(p, head_dim, stream)
                             : run_sm90_head_dim<__nv_bfloat16>(p, head_dim, stream);
  }
#endif
  switch (dtype) {
    case kFloat16: return run_sm80_head_dim<__half>(p, head_dim, stream);
    case kBFloat16: return run_sm80_head_dim<__nv_bfloat16>(p, head_dim, stream);
    default: return kErrUnsupportedDtype;
  }
}

bool aligned16(uintptr_t ptr) { return ptr % 16 == 0; }
// 16-byte vector loads along D need every row start 16-byte aligned: strides in elements
// must be multiples of 8 (fp16/bf16).
bool strides_ok(int64_t a, int64_t b, int64_t c) { return a % 8 == 0 && b % 8 == 0 && c % 8 == 0; }

// Checks shared by the dense and varlen entry points.
int check_common(int dtype, int64_t batch, int64_t heads_q, int64_t heads_kv, int64_t seqlen_q, int64_t seqlen_kv,
                 int64_t head_dim, double scale, double softcap) {
  if (dtype != kFloat16 && dtype != kBFloat16) return kErrUnsupportedDtype;
  if (head_dim != 64 && head_dim != 80 && head_dim != 96 && head_dim != 128 && head_dim != 256)
    return kErrBadShape;
  // Grid: x = query blocks, y = heads (<= 65535), z = batch (<= 65535). Positions i + Skv - Sq
  // and block ends m0 + kBlockM stay well inside int with the INT_MAX / 2 bound.
  if (batch < 0 || heads_q < 0 || heads_kv < 1 || seqlen_q < 0 || seqlen_kv < 0) return kErrBadShape;
  if (batch > 65535 || heads_q > 65535 || seqlen_q > INT_MAX / 2 || seqlen_kv > INT_MAX / 2)
    return kErrBadShape;
  if (heads_q % heads_kv != 0) return kErrBadShape;
  // scale > 0: the kernel takes the row max of unscaled scores (scale folded into exp2's FMA).
  if (!(scale > 0.0) || !std::isfinite(scale) || !(softcap >= 0.0) || !std::isfinite(softcap))
    return kErrBadShape;
  return kOk;
}

void set_common(FlashFwdParams& p, int64_t batch, int64_t heads_q, int64_t heads_kv, int64_t seqlen_q,
                int64_t seqlen_kv, double scale, int64_t window, double softcap, bool causal) {
  p.batch = static_cast<int>(batch);
  p.heads_q = static_cast<int>(heads_q);
  p.heads_kv = static_cast<int>(heads_kv);
  p.group = static_cast<int>(heads_q / heads_kv);
  p.seqlen_q = static_cast<int>(seqlen_q);
  p.seqlen_kv = static_cast<int>(seqlen_kv);
  p.causal = causal;
  // A window of >= Skv keys restricts nothing (every key j >= 0 > p - W for p <= Skv - 1).
  p.window = (window > 0 && window < seqlen_kv) ? static_cast<int>(window) : 0;
  p.has_softcap = softcap > 0.0;
  p.scale_log2 = static_cast<float>(scale * kLog2e);
  p.softcap_in = p.has_softcap ? static_cast<float>(scale / softcap) : 0.f;
  p.softcap_out = p.has_softcap ? static_cast<float>(softcap * kLog2e) : 0.f;
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
}

}  // namespace
}  // namespace attention

int flash_attention_fwd(int device, int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out,
                        uintptr_t lse, uintptr_t mask, int64_t batch, int64_t heads_q, int64_t heads_kv,
                        int64_t seqlen_q, int64_t seqlen_kv, int64_t head_dim, int64_t q_batch_stride,
                        int64_t q_head_stride, int64_t q_row_stride, int64_t k_batch_stride,
                        int64_t k_head_stride, int64_t k_row_stride, int64_t v_batch_stride,
                        int64_t v_head_stride, int64_t v_row_stride, int64_t mask_batch_stride,
                        int64_t mask_row_stride, int64_t mask_col_stride, uintptr_t sinks, uintptr_t bias,
                        int bias_dtype, int64_t bias_batch_stride, int64_t bias_head_stride,
                        int64_t bias_row_stride, int64_t bias_col_stride, double scale, int64_t window,
                        double softcap, bool causal, uintptr_t stream) {
  using namespace attention;
  const int st = check_common(dtype, batch, heads_q, heads_kv, seqlen_q, seqlen_kv, head_dim, scale, softcap);
  if (st != kOk) return st;
  if (bias != 0 && !float_dtype(bias_dtype)) return kErrUnsupportedDtype;
  if (batch == 0 || heads_q == 0 || seqlen_q == 0) return kOk;
  if (!aligned16(q) || !aligned16(k) || !aligned16(v) || !aligned16(out) || lse % 4 != 0 || sinks % 4 != 0)
    return kErrMisaligned;
  if (bias != 0 && bias % dtype_bytes(bias_dtype) != 0) return kErrMisaligned;
  if (!strides_ok(q_batch_stride, q_head_stride, q_row_stride) ||
      !strides_ok(k_batch_stride, k_head_stride, k_row_stride) ||
      !strides_ok(v_batch_stride, v_head_stride, v_row_stride))
    return kErrMisaligned;

  FlashFwdParams p{};
  p.q = reinterpret_cast<const void*>(q);
  p.k = reinterpret_cast<const void*>(k);
  p.v = reinterpret_cast<const void*>(v);
  p.out = reinterpret_cast<void*>(out);
  p.lse = reinterpret_cast<float*>(lse);
  p.mask = reinterpret_cast<const uint8_t*>(mask);
  p.q_batch_stride = q_batch_stride, p.q_head_stride = q_head_stride, p.q_row_stride = q_row_stride;
  p.k_batch_stride = k_batch_stride, p.k_head_stride = k_head_stride, p.k_row_stride = k_row_stride;
  p.v_batch_stride = v_batch_stride, p.v_head_stride = v_head_stride, p.v_row_stride = v_row_stride;
  p.mask_batch_stride = mask_batch_stride, p.mask_row_stride = mask_row_stride;
  p.mask_col_stride = mask_col_stride;
  p.sinks = reinterpret_cast<const float*>(sinks);
  p.bias = reinterpret_cast<const void*>(bias);
  p.bias_dtype = bias_dtype;
  p.bias_batch_stride = bias_batch_stride, p.bias_head_stride = bias_head_stride;
  p.bias_row_stride = bias_row_stride, p.bias_col_stride = bias_col_stride;
  p.out_batch_stride = seqlen_q * heads_q * head_dim;
  p.lse_batch_stride = heads_q * seqlen_q;
  p.lse_head_stride = seqlen_q;
  set_common(p, batch, heads_q, heads_kv, seqlen_q, seqlen_kv, scale, window, softcap, causal);
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return guard.status();
  return dispatch(p, device, dtype, static_cast<int>(head_dim), reinterpret_cast<cudaStream_t>(stream));
}

int flash_attention_varlen_fwd(int device, int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out,
                               uintptr_t lse, uintptr_t cu_seqlens_q, uintptr_t cu_seqlens_k, uintptr_t sinks,
                               int64_t batch, int64_t total_q, int64_t total_k, int64_t heads_q, int64_t heads_kv,
                               int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t head_dim, int64_t q_head_stride,
                               int64_t q_row_stride, int64_t k_head_stride, int64_t k_row_stride,
                               int64_t v_head_stride, int64_t v_row_stride, double scale, int64_t window,
                               double softcap, bool causal, uintptr_t stream) {
  using namespace attention;
  const int st = check_common(dtype, batch, heads_q, heads_kv, max_seqlen_q, max_seqlen_k, head_dim, scale, softcap);
  if (st != kOk) return st;
  if (total_q < 0 || total_q > INT_MAX / 2 || total_k < 0 || total_k > INT_MAX / 2) return kErrBadShape;
  if (batch == 0 || heads_q == 0 || max_seqlen_q == 0 || total_q == 0) return kOk;
  if (cu_seqlens_q == 0 || cu_seqlens_k == 0 || cu_seqlens_q % 4 != 0 || cu_seqlens_k % 4 != 0) return kErrMisaligned;
  if (!aligned16(q) || !aligned16(k) || !aligned16(v) || !aligned16(out) || lse % 4 != 0 || sinks % 4 != 0)
    return kErrMisaligned;
  if (!strides_ok(0, q_head_stride, q_row_stride) || !strides_ok(0, k_head_stride, k_row_stride) ||
      !strides_ok(0, v_head_stride, v_row_stride))
    return kErrMisaligned;

  FlashFwdParams p{};
  p.q = reinterpret_cast<const void*>(q);
  p.k = reinterpret_cast<const void*>(k);
  p.v = reinterpret_cast<const void*>(v);
  p.out = reinterpret_cast<void*>(out);
  p.lse = reinterpret_cast<float*>(lse);
  p.cu_seqlens_q = reinterpret_cast<const int*>(cu_seqlens_q);
  p.cu_seqlens_k = reinterpret_cast<const int*>(cu_seqlens_k);
  p.sinks = reinterpret_cast<const float*>(sinks);
  p.q_head_stride = q_head_stride, p.q_row_stride = q_row_stride;
  p.k_head_stride = k_head_stride, p.k_row_stride = k_row_stride;
  p.v_head_stride = v_head_stride, p.v_row_stride = v_row_stride;
  p.lse_head_stride = total_q;  // lse (Hq, total_q); batch strides stay 0
  p.total_q = static_cast<int>(total_q), p.total_kv = static_cast<int>(total_k);
  // The window is per sequence (each has its own Skv): keep it, capped at INT_MAX / 2. Positions
  // are below INT_MAX / 2, so the cap restricts nothing more, and the kernel's m0 + offset -
  // window (offset = Skv - Sq < 0 when Sq > Skv) stays inside int (at INT_MAX it wrapped around:
  // found by tests/test_attention_kernel_emulated.py).
  set_common(p, batch, heads_q, heads_kv, max_seqlen_q, max_seqlen_k, scale, 0, softcap, causal);
  p.window = window > 0 ? static_cast<int>(window < INT_MAX / 2 ? window : INT_MAX / 2) : 0;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return guard.status();
  return dispatch(p, device, dtype, static_cast<int>(head_dim), reinterpret_cast<cudaStream_t>(stream));
}

}  // namespace fastllm
