// Split-KV decode attention: the launcher (argument checks, params, dispatch). UNVERIFIED on a GPU.
//
// What the kernels compute and how: decode_kernel.cuh. This unit holds no kernel; it maps
// (arch, dtype, head dim) to an instantiation (decode_hdim{D}_{dtype}.cu) whose tile config is
// in decode_traits.h. Python (python/fastllm/ops/_decode_cuda.py) checks the tensors first and
// chooses num_splits (ops/decode.py split_heuristic); the checks here repeat what the kernels
// rely on, so a bad call gets a status code instead of a fault. Metadata values on the device
// (lengths, page ids) are not checked (that would need a sync): the kernel clamps them.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cmath>

#include "common/common.h"
#include "decode/decode.h"
#include "decode/decode_params.h"

namespace fastllm {
namespace decode {
namespace {

constexpr double kLog2e = 1.4426950408889634;
constexpr int64_t kMaxSplits = 256;  // bounds the combine kernel's per-row loop and the split arithmetic

template <typename T>
int run_head_dim(const DecodeParams& p, int head_dim, cudaStream_t stream) {
  switch (head_dim) {
    case 64: return run_decode<T, 64>(p, stream);
    case 80: return run_decode<T, 80>(p, stream);
    case 96: return run_decode<T, 96>(p, stream);
    case 128: return run_decode<T, 128>(p, stream);
    case 256: return run_decode<T, 256>(p, stream);
    default: return kErrBadShape;
  }
}

// The one place that picks a kernel family by GPU arch.
int dispatch(const DecodeParams& p, int device, int dtype, int head_dim, cudaStream_t stream) {
  int major = 0;
  const cudaError_t e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (e != cudaSuccess) return static_cast<int>(e);
  if (major < 8) return kErrUnsupportedArch;  // cp.async / bf16 mma.sync need sm80
  switch (dtype) {
    case kFloat16: return run_head_dim<__half>(p, head_dim, stream);
    case kBFloat16: return run_head_dim<__nv_bfloat16>(p, head_dim, stream);
    default: return kErrUnsupportedDtype;
  }
}

bool aligned(uintptr_t ptr, uintptr_t n) { return ptr % n == 0; }
// 16-byte vector loads along D: every row start 16-byte aligned, strides multiples of 8 elements.
bool strides_ok(int64_t a, int64_t b, int64_t c) { return a % 8 == 0 && b % 8 == 0 && c % 8 == 0; }

}  // namespace
}  // namespace decode

int decode_attention_fwd(int device, int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out,
                         uintptr_t lse, uintptr_t out_partial, uintptr_t lse_partial, uintptr_t cache_seqlens,
                         uintptr_t block_table, uintptr_t mask, int64_t batch, int64_t heads_q, int64_t heads_kv,
                         int64_t seqlen_q, int64_t head_dim, int64_t capacity, int64_t page_size, int64_t num_pages,
                         int64_t block_table_stride, int64_t q_batch_stride, int64_t q_head_stride,
                         int64_t q_row_stride, int64_t k_batch_stride, int64_t k_head_stride, int64_t k_row_stride,
                         int64_t v_batch_stride, int64_t v_head_stride, int64_t v_row_stride,
                         int64_t mask_batch_stride, int64_t mask_row_stride, int64_t mask_col_stride,
                         uintptr_t sinks, double scale, int64_t window, double softcap, int64_t num_splits,
                         uintptr_t stream) {
  using namespace decode;
  if (dtype != kFloat16 && dtype != kBFloat16) return kErrUnsupportedDtype;
  if (head_dim != 64 && head_dim != 80 && head_dim != 96 && head_dim != 128 && head_dim != 256) return kErrBadShape;
  if (batch < 0 || heads_q < 0 || heads_kv < 1 || seqlen_q < 0 || capacity < 0) return kErrBadShape;
  if (heads_q % heads_kv != 0) return kErrBadShape;
  if (batch == 0 || heads_q == 0 || seqlen_q == 0) return kOk;
  const int64_t rows = heads_q / heads_kv * seqlen_q;
  // Grid: x = batch * kv heads (< 2^31), y = splits (<= 256), z = 16-row blocks (<= 65535).
  // Positions (L - Sq + i, start + split * per_split) stay inside int with capacity <= INT_MAX / 2.
  if (batch * heads_kv > INT_MAX || (rows + 15) / 16 > 65535 || seqlen_q > 65535 || capacity > INT_MAX / 2)
    return kErrBadShape;
  if (num_splits < 1 || num_splits > kMaxSplits) return kErrBadShape;
  // The kernel works with scale * log2(e) in fp32: it must stay a positive normal float (a
  // scale that rounds to 0 there would turn exp2(-inf * 0) into NaN).
  if (!(scale * kLog2e >= 1.17549435e-38) || !std::isfinite(static_cast<float>(scale * kLog2e)) ||
      !(softcap >= 0.0) || !std::isfinite(softcap))
    return kErrBadShape;
  const bool paged = block_table != 0;
  // An empty paged cache (capacity 0) reads no page: every row is out 0 / lse -inf.
  if (paged && capacity > 0 && (page_size < 1 || num_pages < 1 || num_pages > INT_MAX || page_size > INT_MAX))
    return kErrBadShape;
  if (!aligned(q, 16) || !aligned(k, 16) || !aligned(v, 16) || !aligned(out, 16) || !aligned(lse, 4))
    return kErrMisaligned;
  if (!aligned(cache_seqlens, 4) || !aligned(block_table, 4) || !aligned(sinks, 4)) return kErrMisaligned;
  if (num_splits > 1 && (out_partial == 0 || lse_partial == 0 || !aligned(out_partial, 16) || !aligned(lse_partial, 4)))
    return kErrMisaligned;
  if (!strides_ok(q_batch_stride, q_head_stride, q_row_stride) ||
      !strides_ok(k_batch_stride, k_head_stride, k_row_stride) ||
      !strides_ok(v_batch_stride, v_head_stride, v_row_stride))
    return kErrMisaligned;

  DecodeParams p{};
  p.q = reinterpret_cast<const void*>(q);
  p.k = reinterpret_cast<const void*>(k);
  p.v = reinterpret_cast<const void*>(v);
  p.out = reinterpret_cast<void*>(out);
  p.lse = reinterpret_cast<float*>(lse);
  p.out_partial = reinterpret_cast<float*>(out_partial);
  p.lse_partial = reinterpret_cast<float*>(lse_partial);
  p.cache_seqlens = reinterpret_cast<const int*>(cache_seqlens);
  p.block_table = reinterpret_cast<const int*>(block_table);
  p.mask = reinterpret_cast<const uint8_t*>(mask);
  p.sinks = reinterpret_cast<const float*>(sinks);
  p.q_batch_stride = q_batch_stride, p.q_head_stride = q_head_stride, p.q_row_stride = q_row_stride;
  p.k_batch_stride = k_batch_stride, p.k_head_stride = k_head_stride, p.k_row_stride = k_row_stride;
  p.v_batch_stride = v_batch_stride, p.v_head_stride = v_head_stride, p.v_row_stride = v_row_stride;
  p.block_table_stride = block_table_stride;
  p.mask_batch_stride = mask_batch_stride, p.mask_row_stride = mask_row_stride;
  p.mask_col_stride = mask_col_stride;
  p.batch = static_cast<int>(batch);
  p.heads_q = static_cast<int>(heads_q);
  p.heads_kv = static_cast<int>(heads_kv);
  p.group = static_cast<int>(heads_q / heads_kv);
  p.seqlen_q = static_cast<int>(seqlen_q);
  p.rows = static_cast<int>(rows);
  p.capacity = static_cast<int>(capacity);
  p.page_size = paged ? static_cast<int>(page_size) : 1;
  p.num_pages = paged ? static_cast<int>(num_pages) : 1;
  p.num_splits = static_cast<int>(num_splits);
  // The mask holds the window (and causality); a window of >= capacity + Sq keys restricts nothing.
  p.window = (mask == 0 && window > 0 && window < capacity + seqlen_q) ? static_cast<int>(window) : 0;
  p.has_softcap = softcap > 0.0;
  p.scale_log2 = static_cast<float>(scale * kLog2e);
  p.softcap_in = p.has_softcap ? static_cast<float>(scale / softcap) : 0.f;
  p.softcap_out = p.has_softcap ? static_cast<float>(softcap * kLog2e) : 0.f;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return guard.status();
  return dispatch(p, device, dtype, static_cast<int>(head_dim), reinterpret_cast<cudaStream_t>(stream));
}

}  // namespace fastllm
