// W8A8 GEMM for decode with the activation quantization fused in, sm80+: mma.sync m16n8k32 .s8.
// UNVERIFIED: written and compiled (sm_80 .. sm_90a, 0 spills) without a GPU to run it on.
//
// Computes, for x (M, K) fp16/bf16/fp32 (M <= 16), w (N, K) int8, w_scale (N,) fp32, bias (N,):
//   dynamic: xs = fp32(x) [* in_mul[k]] (SmoothQuant), amax_m = max_k |xs[m, k]|,
//            q = rne(xs * (127 / amax_m)),  a_scale_m = amax_m / 127  (all-zero row: 1; a row
//            holding NaN/inf: NaN)                                     = quantize_per_token.cu
//   static:  q = rne(clamp(fp32(x) * in_mul[k or 0], -127, 127)), NaN -> 0; a_scale_m = act_scale
//                                                                      = quantize_static.cu
//   out[m, n] = rn_T(fmaf(fp32(sum_k q[m, k] w[n, k]) * a_scale_m, w_scale[n], bias[n]))
// which is bit for bit the two-launch path (a quantize kernel, then the W8A8 GEMM's epilogue,
// int8_epilogue.cuh), only without the int8 copy of x and the second launch. out is (M, N)
// contiguous in x's dtype. Reference: python/fastllm/ref/int8.py (int8_matmul_dynamic / _static).
//
// Why: at decode M a W8A8 linear streams its weights once and does little else; unfused it is
// two launches with an x round trip between them, which at M = 1 costs about as much as the GEMM.
// The structure is w8a16_gemm_kernel.cuh's (see there for the reasons), with int8 on both sides:
//   * Swap AB: W is the m16 A operand (16 output channels per CTA), the tokens the n8 B operand
//     (1 n8 tile for M <= 8, 2 for M <= 16). kWarps warps split K and reduce their exact int32
//     partial tiles through shared memory; grid N / 16, no second pass.
//   * No repacking: for the 64-k block at k0, lane (g, c) loads 16 contiguous weight bytes of rows
//     g and g + 8 at k0 + 16c and the 16 activations of token g at the same k. mma step s (0, 1)
//     takes words 2s, 2s + 1 of each as the k groups (4c..4c+3) and (16+4c..16+4c+3): a
//     permutation of the block's k, the same for A and B, so every k is summed once.
//   * Dynamic scales: the whole CTA reduces each token's amax over K (warp shuffles, then shared
//     memory) while its first weight loads are in flight. Every CTA repeats this pass over x
//     (M x K elements, from L2), which is why the op fuses only at decode M.
//   * Quantizing in registers: the fp32 product rounded once (__fmul_rn), then + 1.5 * 2^23
//     (__fadd_rn): the sum's ulp is 1, so it rounds to the nearest even integer and leaves
//     r + 2^22 in the mantissa, whose low byte is int8(r) for |r| <= 127. Three full-rate ALU
//     ops per element (and __byte_perm packing) instead of a quarter-rate cvt.rni.
//     Dynamic rows need no clamp (|x * 127 / amax| <= 127), except a row whose amax is below
//     127 / FLT_MAX (denormal-range activations): there 127 / amax = inf and the two-launch path
//     gives +-127 (x != 0) or 0 (x == 0, from 0 * inf = NaN). A CTA-uniform flag runs the main
//     loop with the static path's clamp and NaN select only when such a row exists.
//     In a dynamic row holding NaN/inf the q bits are arbitrary, but the row's a_scale is NaN, so
//     its outputs are NaN exactly as on the two-launch path; no other token reads them.
// Launcher: int8_launcher.cu (w8a8_decode_gemm; variant from choose_w8a16_config).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <type_traits>

#include "common/common.h"
#include "int8/int8_gemm_params.h"
#include "int8/int8_ptx.cuh"
#include "int8/int8_traits.h"
#include "int8/quantize_convert.cuh"

namespace fastllm {
namespace int8 {

// 1.5 * 2^23: adding it rounds an fp32 in (-2^22, 2^22) to the nearest even integer r and leaves
// the bits 0x4B400000 + r (two's complement r in the low byte when |r| <= 127).
constexpr float kRoundMagic = 12582912.f;

// Four rounded values (each x + kRoundMagic) -> one word of four int8, the first in byte 0.
__device__ __forceinline__ uint32_t pack_int8x4(float a, float b, float c, float d) {
  const uint32_t lo = __byte_perm(__float_as_uint(a), __float_as_uint(b), 0x0040);
  const uint32_t hi = __byte_perm(__float_as_uint(c), __float_as_uint(d), 0x0040);
  return __byte_perm(lo, hi, 0x5410);
}

// How quantize16 scales: static (x * in_mul, clamped), dynamic (x [* smooth] * inv, no clamp),
// dynamic clamped (the same, clamped as static: for rows with inv = inf).
enum QuantMode { kQuantStatic, kQuantDynamic, kQuantDynamicClamped };

// 16 activations (kXWords 16-byte words of T) of one token -> 4 words of int8, byte j = k + j.
// mul: per-channel multipliers of these 16 k, used when per_channel; m0: the per-tensor
// multiplier (static); inv: the token's 127 / amax (dynamic). (mul by reference, not a pointer
// that may be null: an array whose address escapes would live in local memory.)
template <typename T, int kMode>
__device__ __forceinline__ void quantize16(const uint4* raw, const float (&mul)[16], bool per_channel, float m0,
                                           float inv, uint32_t (&q)[4]) {
  const T* e = reinterpret_cast<const T*>(raw);
  float r[16];
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    float v = quant::to_float(e[j]);
    if (kMode != kQuantStatic) {
      if (per_channel) v = __fmul_rn(v, mul[j]);
      v = __fmul_rn(v, inv);  // |v| <= 127 (1 + 2^-23) in a finite row with a finite inv
    } else {
      v = __fmul_rn(v, per_channel ? mul[j] : m0);
    }
    if (kMode != kQuantDynamic) v = (v != v) ? 0.f : fminf(fmaxf(v, -127.f), 127.f);  // NaN first: fminf/fmaxf drop it
    r[j] = __fadd_rn(v, kRoundMagic);
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) q[i] = pack_int8x4(r[4 * i], r[4 * i + 1], r[4 * i + 2], r[4 * i + 3]);
}

// Per token m < M: s_inv[m] = 127 / amax (0 for an all-zero or bad row) and s_scale[m] = amax /
// 127 (1 / NaN), exactly as quantize_per_token.cu; s_inv[m] = 0 for the padding tokens m >= M.
// Returns, in every thread, whether some token's inv is inf (amax < 127 / FLT_MAX).
template <typename T, int kTok, int kWarps>
__device__ __forceinline__ bool token_scales(const W8A8DecodeParams& p, float (*s_red)[kTok], float* s_inv,
                                             float* s_scale) {
  constexpr int kVec = 16 / sizeof(T);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const T* x = static_cast<const T*>(p.x);
  float amax[kTok];
  bool bad[kTok];
#pragma unroll
  for (int t = 0; t < kTok; ++t) amax[t] = 0.f, bad[t] = false;
  for (int i = tid; i < p.K / kVec; i += kWarps * 32) {
    const int k = i * kVec;
    float mul[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) mul[j] = p.in_mul != nullptr ? __ldg(p.in_mul + k + j) : 1.f;
#pragma unroll
    for (int t = 0; t < kTok; ++t) {
      if (t >= p.M) break;
      const quant::Vec<T, kVec> v = *reinterpret_cast<const quant::Vec<T, kVec>*>(x + t * p.ldx + k);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        float f = quant::to_float(v.v[j]);
        if (p.in_mul != nullptr) f = __fmul_rn(f, mul[j]);
        f = fabsf(f);
        bad[t] |= !(f <= 3.402823466e38f);  // NaN and inf (fmaxf would drop a NaN)
        amax[t] = fmaxf(amax[t], f);
      }
    }
  }
#pragma unroll
  for (int t = 0; t < kTok; ++t) {
    float v = bad[t] ? INFINITY : amax[t];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    if (lane == 0) s_red[warp][t] = v;
  }
  __syncthreads();
  float inv = 0.f;
  if (tid < kTok) {
    float a = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) a = fmaxf(a, s_red[w][tid]);
    const bool row_bad = !(a <= 3.402823466e38f);
    inv = (tid < p.M && a > 0.f && !row_bad) ? 127.f / a : 0.f;
    s_inv[tid] = inv;
    s_scale[tid] = row_bad ? NAN : (a > 0.f ? a / 127.f : 1.f);
  }
  return __syncthreads_or(isinf(inv)) != 0;
}

// kTokenTiles: n8 tiles of tokens (M <= 8 * kTokenTiles). kWarps: warps splitting K.
template <typename T, int kTokenTiles, int kWarps, bool kDynamic>
__global__ void __launch_bounds__(kWarps * 32, 1) w8a8_decode_kernel(const W8A8DecodeParams p) {
  // 16-bit x: kW8A16Unroll blocks in flight; fp32 x holds twice the bytes per block in registers.
  constexpr int kUnroll = sizeof(T) == 4 ? kW8A16Unroll / 2 : kW8A16Unroll;
  constexpr int kTok = 8 * kTokenTiles;
  constexpr int kXWords = sizeof(T);  // 16-byte words per 16 activations
  __shared__ int red[kWarps][kTok][kW8A16RowsPerCta];
  __shared__ float s_red[kWarps][kTok];
  __shared__ float s_inv[kTok], s_scale[kTok];

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, c = lane % 4;
  const int n0 = blockIdx.x * kW8A16RowsPerCta;
  const int8_t* w_g = p.w + static_cast<int64_t>(n0 + g) * p.ldw + 16 * c;  // row g; row g + 8 is + 8 * ldw
  const int64_t w_next8 = 8 * p.ldw;
  const T* x_t[kTokenTiles];
  bool t_ok[kTokenTiles];
  decode_token_rows<T, kTokenTiles>(p.x, p.ldx, p.M, g, c, x_t, t_ok);
  const bool per_channel = p.in_mul_len == p.K && p.in_mul_len > 1;
  const float m0 = !kDynamic && !per_channel && p.K > 0 ? p.in_mul[0] : 1.f;  // K == 0: no multiplier passed

  int acc[kTokenTiles][4];
#pragma unroll
  for (int t = 0; t < kTokenTiles; ++t)
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[t][r] = 0;

  const int nblocks = (p.K + 63) / 64;
  uint4 wv[kUnroll][2];
  uint4 xv[kUnroll][kTokenTiles][kXWords];
  // The loads of kUnroll blocks (bytes in flight); padding tokens and K tails read as zeros.
  auto load = [&](int b0) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int k = (b0 + u * kWarps) * 64;
      const bool ok = b0 + u * kWarps < nblocks && k + 16 * c < p.K;  // K % 16 == 0: a chunk is in or out
      decode_block_loads<T, kTokenTiles>(w_g, w_next8, x_t, t_ok, k, ok, wv[u], xv[u]);
    }
  };
  load(warp);
  const bool tiny = kDynamic && token_scales<T, kTok, kWarps>(p, s_red, s_inv, s_scale);
  float inv[kTokenTiles];
#pragma unroll
  for (int t = 0; t < kTokenTiles; ++t) inv[t] = kDynamic ? s_inv[g + 8 * t] : 0.f;

  // The main loop, compiled per quantization mode (the clamped dynamic one only runs when the
  // CTA-uniform `tiny` says a row needs it).
  auto main_loop = [&](auto mode) {
    constexpr int kMode = decltype(mode)::value;
    for (int b0 = warp; b0 < nblocks; b0 += kWarps * kUnroll) {
      if (b0 != warp) load(b0);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int blk = b0 + u * kWarps;
        if (blk >= nblocks) break;  // warp-uniform
        const int k = blk * 64 + 16 * c;
        float mul[16] = {};
        if (per_channel) {
          // A chunk past K is all zeros (x and w), so its multipliers are never used: not loaded.
#pragma unroll
          for (int j = 0; j < 16; j += 4) {
            const float4 f =
                k < p.K ? __ldg(reinterpret_cast<const float4*>(p.in_mul + k + j)) : make_float4(0, 0, 0, 0);
            mul[j] = f.x, mul[j + 1] = f.y, mul[j + 2] = f.z, mul[j + 3] = f.w;
          }
        }
        uint32_t q[kTokenTiles][4];
#pragma unroll
        for (int t = 0; t < kTokenTiles; ++t)
          quantize16<T, kMode>(xv[u][t], mul, per_channel, m0, inv[t], q[t]);
        const uint32_t* w0 = reinterpret_cast<const uint32_t*>(&wv[u][0]);
        const uint32_t* w8 = reinterpret_cast<const uint32_t*>(&wv[u][1]);
#pragma unroll
        for (int s = 0; s < 2; ++s) {
          const uint32_t a[4] = {w0[2 * s], w8[2 * s], w0[2 * s + 1], w8[2 * s + 1]};
#pragma unroll
          for (int t = 0; t < kTokenTiles; ++t) mma_s8_16832(acc[t], a, q[t][2 * s], q[t][2 * s + 1]);
        }
      }
    }
  };
  if (!kDynamic) {
    main_loop(std::integral_constant<int, kQuantStatic>{});
  } else if (!tiny) {
    main_loop(std::integral_constant<int, kQuantDynamic>{});
  } else {
    main_loop(std::integral_constant<int, kQuantDynamicClamped>{});
  }

  stash_d_fragments(red[warp], acc, g, c);
  __syncthreads();
  for (int i = tid; i < kTok * kW8A16RowsPerCta; i += kWarps * 32) {
    const int m = i / kW8A16RowsPerCta, r = i % kW8A16RowsPerCta;
    if (m >= p.M) continue;
    int v = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += red[w][m][r];  // exact: |sum| < 2^31 (the K bound)
    const int n = n0 + r;
    const float as = kDynamic ? s_scale[m] : p.act_scale[0];
    const float y = fmaf(__fmul_rn(__int2float_rn(v), as), p.w_scale[n], bias_at(p.bias, p.bias_dtype, n));
    static_cast<T*>(p.out)[static_cast<int64_t>(m) * p.N + n] = from_float<T>(y);
  }
}

template <typename T, int kTokenTiles, int kWarps>
int run_w8a8_decode(const W8A8DecodeParams& p, cudaStream_t stream) {
  const dim3 grid(p.N / kW8A16RowsPerCta);
  if (p.dynamic) {
    w8a8_decode_kernel<T, kTokenTiles, kWarps, true><<<grid, kWarps * 32, 0, stream>>>(p);
  } else {
    w8a8_decode_kernel<T, kTokenTiles, kWarps, false><<<grid, kWarps * 32, 0, stream>>>(p);
  }
  return launch_status();
}

}  // namespace int8
}  // namespace fastllm
