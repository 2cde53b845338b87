// PTX wrappers of the int8 kernels (sm80+): the shared ones from common/ptx.cuh (cp.async,
// ldmatrix, fp16/bf16 mma for W8A16), the s8 mma, a streaming load and epilogue helpers.
// Fragment layouts are written beside each; int8_gemm_kernel.cuh / w8a16_gemm_kernel.cuh use them.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#include "common/common.h"
#include "common/load_float.cuh"
#include "common/ptx.cuh"

namespace fastllm {
namespace int8 {

using ptx::cp_async_16;
using ptx::cp_async_commit;
using ptx::cp_async_wait;
using ptx::ldmatrix_x4;
using ptx::mma_16816;
using ptx::smem_u32;

// D (16x8 s32) += A (16x32 s8, row) * B (32x8 s8, col). g = lane / 4, c = lane % 4:
//   A: a[0] = row g, k 4c..4c+3     a[1] = row g+8, k 4c..     a[2] = row g, k 16+4c..   a[3] = row g+8, k 16+4c..
//   B: b[0] = col g, k 4c..4c+3     b[1] = col g, k 16+4c..4c+19
//   D: d[0], d[1] = (g, 2c), (g, 2c+1)     d[2], d[3] = (g+8, 2c), (g+8, 2c+1)
// Integer accumulation is exact (wraps only past 2^31, which the op's K bound excludes).
__device__ __forceinline__ void mma_s8_16832(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16-byte global load for data read exactly once (W8A16 weights): not kept in L1, so L1
// stays for the activations every warp re-reads.
__device__ __forceinline__ uint4 ld_stream_16(const void* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// bias[i] as fp32 for a bias of dtype code `dtype` (common.h), 0 when there is no bias.
__device__ __forceinline__ float bias_at(const void* bias, int dtype, int i) {
  return bias == nullptr ? 0.f : load_float(bias, dtype, i);
}

// The swap-AB decode kernels (W8A16, fused W8A8): lane (g, c)'s token rows g + 8t at column 16c.
// A padding token (m >= M) points at row 0 and is never read (t_ok false).
template <typename T, int kTokenTiles>
__device__ __forceinline__ void decode_token_rows(const void* x, int64_t ldx, int M, int g, int c,
                                                  const T* (&x_t)[kTokenTiles], bool (&t_ok)[kTokenTiles]) {
#pragma unroll
  for (int t = 0; t < kTokenTiles; ++t) {
    const int m = g + 8 * t;
    t_ok[t] = m < M;
    x_t[t] = static_cast<const T*>(x) + (t_ok[t] ? static_cast<int64_t>(m) * ldx : 0) + 16 * c;
  }
}

// Their loads of one 64-k block at k (ok: the lane's 16-k chunk lies inside K): 16 weight bytes
// of rows g and g + 8 (read once: ld_stream_16) and the 16 activations of each token (sizeof(T)
// 16-byte words, through L1). Padding tokens and K tails must be zeros, not stale memory
// (0 * NaN = NaN).
template <typename T, int kTokenTiles>
__device__ __forceinline__ void decode_block_loads(const int8_t* w_g, int64_t w_next8, const T* const (&x_t)[kTokenTiles],
                                                   const bool (&t_ok)[kTokenTiles], int k, bool ok, uint4 (&wv)[2],
                                                   uint4 (&xv)[kTokenTiles][sizeof(T)]) {
  const uint4 z = make_uint4(0, 0, 0, 0);
  wv[0] = ok ? ld_stream_16(w_g + k) : z;
  wv[1] = ok ? ld_stream_16(w_g + w_next8 + k) : z;
#pragma unroll
  for (int t = 0; t < kTokenTiles; ++t)
#pragma unroll
    for (int i = 0; i < static_cast<int>(sizeof(T)); ++i)
      xv[t][i] = ok && t_ok[t] ? __ldg(reinterpret_cast<const uint4*>(x_t[t] + k) + i) : z;
}

// The swap-AB decode kernels (W8A16, fused W8A8): one warp's m16n8 D fragments of kTokenTiles
// token tiles -> its slice red[token][channel] of the cross-warp reduction buffer. D rows are
// channels g / g + 8, columns tokens 2c / 2c + 1 of tile t.
template <typename Acc, int kTokenTiles, int kRows>
__device__ __forceinline__ void stash_d_fragments(Acc (*red)[kRows], const Acc (&acc)[kTokenTiles][4], int g, int c) {
#pragma unroll
  for (int t = 0; t < kTokenTiles; ++t) {
    red[8 * t + 2 * c][g] = acc[t][0];
    red[8 * t + 2 * c + 1][g] = acc[t][1];
    red[8 * t + 2 * c][g + 8] = acc[t][2];
    red[8 * t + 2 * c + 1][g + 8] = acc[t][3];
  }
}

// fp32 -> the output dtype, round to nearest even (as the W8A8 epilogue's store_pair).
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

}  // namespace int8
}  // namespace fastllm
