// Pieces both W8A8 GEMM kernels share (int8_gemm_kernel.cuh for sm80+, int8_wgmma_kernel.cuh for
// sm_90a): the grouped CTA raster, the split-K slice, and the epilogue of one accumulator pair,
//   out[m, n..n+1] = acc                                              (OutT = int32_t)
//   out[m, n..n+1] = rn_OutT(fma(fp32(acc) * a_scale[m or 0], w_scale[n], bias[n]))
// Keeping one copy keeps the two kernels' results bit-identical.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <type_traits>

#include "int8/int8_gemm_params.h"
#include "int8/int8_ptx.cuh"
#include "int8/int8_traits.h"

namespace fastllm {
namespace int8 {

// CTA index -> (tile_m, tile_n): kGroupM M-tiles sweep the N-tiles together, so a b tile is
// read from DRAM once per group and from L2 by the other kGroupM - 1 CTAs.
__device__ __forceinline__ void grouped_tile(int tiles_m, int tiles_n, int pid, int& tile_m, int& tile_n) {
  const int per_group = kGroupM * tiles_n;
  const int first_m = (pid / per_group) * kGroupM;
  const int group_rows = min(tiles_m - first_m, kGroupM);
  tile_m = first_m + (pid % per_group) % group_rows;
  tile_n = (pid % per_group) / group_rows;
}

// Split-K (k_tiles_per_split > 0): grid slice blockIdx.y sums the K columns [k_begin, k_begin +
// k_len) -- all of K without a split -- and writes plane blockIdx.y of p.out (a workspace).
template <int kBK>
__device__ __forceinline__ void k_slice(const Int8GemmParams& p, int& k_begin, int& k_len) {
  k_begin = p.k_tiles_per_split > 0 ? static_cast<int>(blockIdx.y) * p.k_tiles_per_split * kBK : 0;
  k_len = p.k_tiles_per_split > 0 ? max(0, min(p.K - k_begin, p.k_tiles_per_split * kBK)) : p.K;
}
template <typename OutT>
__device__ __forceinline__ OutT* split_plane(const Int8GemmParams& p) {
  return static_cast<OutT*>(p.out) + static_cast<int64_t>(blockIdx.y) * p.split_stride;
}

// Two adjacent outputs (columns n, n + 1 of one row) in one store.
template <typename OutT> __device__ __forceinline__ void store_pair(OutT* p, float lo, float hi);
template <> __device__ __forceinline__ void store_pair<float>(float* p, float lo, float hi) {
  *reinterpret_cast<float2*>(p) = make_float2(lo, hi);
}
template <> __device__ __forceinline__ void store_pair<__half>(__half* p, float lo, float hi) {
  *reinterpret_cast<__half2*>(p) = __floats2half2_rn(lo, hi);
}
template <> __device__ __forceinline__ void store_pair<__nv_bfloat16>(__nv_bfloat16* p, float lo, float hi) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(lo, hi);
}

// Per-column epilogue operands of columns n, n + 1 (read once per column pair, used per row).
struct ColumnPair {
  float ws0 = 0.f, ws1 = 0.f, b0 = 0.f, b1 = 0.f;
};
template <typename OutT>
__device__ __forceinline__ ColumnPair column_pair(const Int8GemmParams& p, int n) {
  ColumnPair c;
  if constexpr (!std::is_same<OutT, int32_t>::value) {
    c.ws0 = p.w_scale[n], c.ws1 = p.w_scale[n + 1];
    c.b0 = bias_at(p.bias, p.bias_dtype, n), c.b1 = bias_at(p.bias, p.bias_dtype, n + 1);
  }
  return c;
}
// out[m, n], out[m, n + 1] of a contiguous (M, N) out from the int32 accumulators a0, a1.
template <typename OutT>
__device__ __forceinline__ void store_acc_pair(const Int8GemmParams& p, OutT* out, int m, int n, int a0, int a1,
                                               const ColumnPair& col) {
  OutT* dst = out + static_cast<int64_t>(m) * p.N + n;
  if constexpr (std::is_same<OutT, int32_t>::value) {
    *reinterpret_cast<int2*>(dst) = make_int2(a0, a1);
  } else {
    const float as = p.a_scale[static_cast<int64_t>(m) * p.a_scale_stride];
    store_pair<OutT>(dst, fmaf(__int2float_rn(a0) * as, col.ws0, col.b0), fmaf(__int2float_rn(a1) * as, col.ws1, col.b1));
  }
}

}  // namespace int8
}  // namespace fastllm
