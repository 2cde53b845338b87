// W8A16 (weight-only int8) GEMM for decode, sm80+: mma.sync on weights dequantized in registers.
// UNVERIFIED: written and compiled (sm_80, sm_90a, 0 spills) without a GPU to run it on.
//
// Computes, for x (M, K) fp16/bf16 (M <= 16), w (N, K) int8, fp32 scales s (per channel, or
// per group of `group` columns, group % 64 == 0):
//   out[m, n] = rn_T( sum_k x[m, k] * w[n, k] * s[n, k / group] + bias[n] )       fp32 sums
// out is (M, N) contiguous in x's dtype. Reference: python/fastllm/ref/int8.py.
//
// Why mma.sync and not a CUDA-core dot product: at M = 16 a CUDA-core kernel does 16 fp32 FMAs
// per weight byte, which on an H100 is about as slow as streaming the weights (compute-bound
// at the very sizes where int8 weights should win); the tensor core does them for free. So:
//   * Swap AB: out^T = W x^T. W supplies the m16 A operand (16 output channels per CTA), the
//     tokens the n8 B operand (1 n8 tile for M <= 8, 2 for M <= 16; padding tokens are zeros).
//   * No weight repacking: each lane loads 16 contiguous int8 of its two rows (g, g + 8) with
//     one 16-byte load per row, straight from the nn.Linear layout. The mma sums over k in any
//     order, so the kernel feeds it a permutation of k: for the 64-k block at k0, mma step
//     s (0..3), lane (g, c) gives A cols (2c, 2c+1) := k0 + 16c + 4s + (0, 1) and
//     (2c+8, 2c+9) := k0 + 16c + 4s + (2, 3), and the B fragment the same k of token g, which
//     are x[g, k0 + 16c .. k0 + 16c + 15]: two 16-byte loads. Every k of the block is used
//     once, by A and B alike. (NumPy emulation: tests/test_int8_cuda.py.)
//   * Dequantization: int8 -> fp16 exactly with the 0x6400 magic (byte ^ 0x80 as the low
//     mantissa byte of 1024.0, minus 1152); -> bf16 through the fp32 magic 0x4B000000 and one
//     cvt.rn.bf16x2 (exact: |w| <= 128). The scale is never folded into the 16-bit weight
//     (that would round w * s to 16 bits); it multiplies fp32 accumulators: once at the end
//     (per channel), or per 64-k block (per group, the block lies in one group).
//   * Bandwidth: the weights are read once (ld.global.nc.L1::no_allocate), kW8A16Unroll blocks
//     of 2 x 16 bytes per lane in flight. A CTA's kWarps warps split K (block b goes to warp
//     b % kWarps) and reduce their fp32 partial tiles in shared memory, so the grid is N / 16
//     CTAs without a second pass. x is read through L1 (every CTA reads all of it).
// Launcher: int8_launcher.cu (config from choose_w8a16_config, int8_traits.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#include "common/common.h"
#include "int8/int8_gemm_params.h"
#include "int8/int8_ptx.cuh"
#include "int8/int8_traits.h"

namespace fastllm {
namespace int8 {

// Four int8 (one 32-bit word, byte i = k offset i) -> two registers of two 16-bit values:
// lo = (byte 0, byte 1), hi = (byte 2, byte 3), the lower k in the low half.
template <typename T> __device__ __forceinline__ void dequant4(uint32_t w, uint32_t& lo, uint32_t& hi);
template <>
__device__ __forceinline__ void dequant4<__half>(uint32_t w, uint32_t& lo, uint32_t& hi) {
  const uint32_t u = w ^ 0x80808080u;                    // byte b -> b + 128 (0..255)
  uint32_t l = __byte_perm(u, 0x64646464u, 0x4140);      // halves 0x64uu = 1024 + u
  uint32_t h = __byte_perm(u, 0x64646464u, 0x4342);
  const __half2 bias = __halves2half2(__ushort_as_half(0x6480), __ushort_as_half(0x6480));  // 1152
  __half2 hl = __hsub2(*reinterpret_cast<__half2*>(&l), bias);
  __half2 hh = __hsub2(*reinterpret_cast<__half2*>(&h), bias);
  lo = *reinterpret_cast<uint32_t*>(&hl);
  hi = *reinterpret_cast<uint32_t*>(&hh);
}
template <>
__device__ __forceinline__ void dequant4<__nv_bfloat16>(uint32_t w, uint32_t& lo, uint32_t& hi) {
  const uint32_t u = w ^ 0x80808080u;
  // fp32 bits 0x4B0000uu = 2^23 + u; minus 2^23 + 128 gives the signed value exactly.
  const float f0 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7440)) - 8388736.f;
  const float f1 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7441)) - 8388736.f;
  const float f2 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7442)) - 8388736.f;
  const float f3 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7443)) - 8388736.f;
  __nv_bfloat162 bl = __floats2bfloat162_rn(f0, f1), bh = __floats2bfloat162_rn(f2, f3);
  lo = *reinterpret_cast<uint32_t*>(&bl);
  hi = *reinterpret_cast<uint32_t*>(&bh);
}

// kTokenTiles: n8 tiles of tokens (M <= 8 * kTokenTiles). kWarps: warps splitting K.
template <typename T, int kTokenTiles, int kWarps>
__global__ void __launch_bounds__(kWarps * 32) w8a16_kernel(const W8A16Params p) {
  constexpr int kUnroll = kW8A16Unroll;
  constexpr int kTok = 8 * kTokenTiles;
  __shared__ float red[kWarps][kTok][kW8A16RowsPerCta];

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, c = lane % 4;
  const int n0 = blockIdx.x * kW8A16RowsPerCta;
  const int8_t* w_g = p.w + static_cast<int64_t>(n0 + g) * p.ldw + 16 * c;  // row g; row g + 8 is + 8 * ldw
  const int64_t w_next8 = 8 * p.ldw;
  const T* x_t[kTokenTiles];
  bool t_ok[kTokenTiles];
  decode_token_rows<T, kTokenTiles>(p.x, p.ldx, p.M, g, c, x_t, t_ok);
  const bool grouped = p.group > 0;
  const float* s_g = p.w_scale + static_cast<int64_t>(n0 + g) * p.s_stride_n;
  const float* s_g8 = s_g + 8 * p.s_stride_n;

  float acc[kTokenTiles][4];
#pragma unroll
  for (int t = 0; t < kTokenTiles; ++t)
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[t][r] = 0.f;

  const int nblocks = (p.K + 63) / 64;
  for (int b0 = warp; b0 < nblocks; b0 += kWarps * kUnroll) {
    uint4 wv[kUnroll][2];
    uint4 xv[kUnroll][kTokenTiles][2];
    // All loads of kUnroll blocks first (bytes in flight), then the math.
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int k = (b0 + u * kWarps) * 64;
      const bool ok = b0 + u * kWarps < nblocks && k + 16 * c < p.K;  // K % 16 == 0: a chunk is in or out
      decode_block_loads<T, kTokenTiles>(w_g, w_next8, x_t, t_ok, k, ok, wv[u], xv[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int blk = b0 + u * kWarps;
      if (blk >= nblocks) break;  // warp-uniform
      float part[kTokenTiles][4];
#pragma unroll
      for (int t = 0; t < kTokenTiles; ++t)
#pragma unroll
        for (int r = 0; r < 4; ++r) part[t][r] = 0.f;
      const uint32_t* w0 = reinterpret_cast<const uint32_t*>(&wv[u][0]);
      const uint32_t* w8 = reinterpret_cast<const uint32_t*>(&wv[u][1]);
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        uint32_t a[4];
        dequant4<T>(w0[s], a[0], a[2]);
        dequant4<T>(w8[s], a[1], a[3]);
#pragma unroll
        for (int t = 0; t < kTokenTiles; ++t) {
          const uint32_t* xw = reinterpret_cast<const uint32_t*>(&xv[u][t][s / 2]);
          mma_16816<T>(part[t], a, xw[(s % 2) * 2], xw[(s % 2) * 2 + 1]);
        }
      }
      // Per group: the 64-k block lies in one group (group % 64 == 0), scale its partial sum.
      // Per channel: scale 1 here, the channel scale multiplies the total at the end.
      float sc0 = 1.f, sc8 = 1.f;
      if (grouped) {
        const int64_t gi = static_cast<int64_t>(blk * 64 / p.group) * p.s_stride_g;
        sc0 = s_g[gi], sc8 = s_g8[gi];
      }
#pragma unroll
      for (int t = 0; t < kTokenTiles; ++t) {
        acc[t][0] = fmaf(part[t][0], sc0, acc[t][0]);
        acc[t][1] = fmaf(part[t][1], sc0, acc[t][1]);
        acc[t][2] = fmaf(part[t][2], sc8, acc[t][2]);
        acc[t][3] = fmaf(part[t][3], sc8, acc[t][3]);
      }
    }
  }

  stash_d_fragments(red[warp], acc, g, c);
  __syncthreads();
  for (int i = tid; i < kTok * kW8A16RowsPerCta; i += kWarps * 32) {
    const int m = i / kW8A16RowsPerCta, r = i % kW8A16RowsPerCta;
    if (m >= p.M) continue;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += red[w][m][r];
    const int n = n0 + r;
    if (!grouped) v *= p.w_scale[static_cast<int64_t>(n) * p.s_stride_n];
    v += bias_at(p.bias, p.bias_dtype, n);
    static_cast<T*>(p.out)[static_cast<int64_t>(m) * p.N + n] = from_float<T>(v);
  }
}

template <typename T, int kTokenTiles, int kWarps>
int run_w8a16(const W8A16Params& p, cudaStream_t stream) {
  w8a16_kernel<T, kTokenTiles, kWarps><<<p.N / kW8A16RowsPerCta, kWarps * 32, 0, stream>>>(p);
  return launch_status();
}

}  // namespace int8
}  // namespace fastllm
