// W8A8 GEMM, sm80+ (mma.sync m16n8k32 s8, ldmatrix, cp.async ring, swizzled shared memory).
// UNVERIFIED: written and compiled (sm_80, sm_90a, 0 spills) without a GPU to run it on.
//
// Computes, for a (M, K) int8 row-major (any 16-byte-multiple row stride) and b (N, K) int8
// (nn.Linear layout):
//   acc[m, n] = sum_k a[m, k] * b[n, k]                                   exact int32
//   out[m, n] = acc                                                      (OutT = int32_t)
//   out[m, n] = rn_OutT(fma(fp32(acc) * a_scale[m or 0], w_scale[n], bias[n]))   (fp16/bf16/fp32)
// out is (M, N) contiguous. Reference: python/fastllm/ref/int8.py (the epilogue there is
// two multiplies and an add; this one fuses the last multiply with the add, one rounding
// fewer, which the op's semantics allow).
//
// Algorithm (one CTA = one kBM x kBN tile of out; tile shapes in int8_traits.h):
//   1. The CTA's tile index is rasterised in groups of kGroupM M-tiles (L2 reuse of B;
//      grouped_tile, int8_epilogue.cuh, shared with the Hopper kernel).
//   2. kStages - 1 K-tiles of A (kBM x kBK bytes) and B (kBN x kBK) are put in flight with
//      16-byte cp.async into a ring of shared-memory stages; rows past M / N and 16-byte chunks
//      past K are zero-filled (cp.async src-size 0), so tails need no masks in the math and K
//      need only be a multiple of 16. Each main-loop step waits for the oldest stage, issues
//      the load of the stage kStages - 1 ahead, and runs kBK / 32 mma k-steps on it.
//   3. Fragments come from shared memory with ldmatrix.x4: an 8x8 b16 matrix is 8 rows x 16
//      bytes, i.e. for int8 exactly the m16n8k32 register layout (4 consecutive k per
//      register). Shared rows are XOR-swizzled in 16-byte chunks (SwizzledTile) so the 8 row
//      addresses of each ldmatrix phase hit 8 different bank groups.
//   4. Epilogue straight from registers: each thread holds column pairs (2c, 2c+1), stored as
//      one 8-byte (int32 / fp32) or 4-byte (fp16 / bf16) write, masked by row < M (N is a
//      multiple of 16, so a pair is all in or all out).
// Launcher (checks, config choice, dispatch): int8_launcher.cu. Instantiations:
// int8_gemm_{i32,f16,bf16,f32}.cu. Test: pytest tests/test_int8_cuda.py (GPU).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <algorithm>
#include <cstdint>

#include "common/common.h"
#include "int8/int8_epilogue.cuh"
#include "int8/int8_gemm_params.h"
#include "int8/int8_ptx.cuh"
#include "int8/int8_traits.h"

namespace fastllm {
namespace int8 {

// Shared tile of kRows rows x kChunks 16-byte chunks. The row is cut into column blocks of
// kGroup = min(8, kChunks) chunks stored block-major, so one block row is kGroup * 16 bytes
// and kRowsPerLine = 8 / kGroup consecutive rows share a 128-byte bank line. Chunk c of row r
// sits at position (c % kGroup) ^ ((r / kRowsPerLine) % kGroup) of its block row. The 8 rows
// r0..r0+7 (r0 % 8 == 0) of an ldmatrix phase, same logical chunk, then cover every
// (row-in-line, xor) pair once: 8 distinct bank groups, no conflicts. (Checked by the NumPy
// emulation in tests/test_int8_cuda.py.)
template <int kRows, int kChunks>
struct SwizzledTile {
  static constexpr int kGroup = kChunks < 8 ? kChunks : 8;
  static constexpr int kRowsPerLine = 8 / kGroup;
  static constexpr int kRowBytes = kGroup * 16;
  static_assert(kChunks % kGroup == 0 && (kGroup == 4 || kGroup == 8), "4, 8 or 8k chunks per row");
  static_assert(kRows % 8 == 0, "rows come in ldmatrix phases of 8");

  __device__ static __forceinline__ uint32_t offset(int row, int chunk) {
    const int phys = (chunk % kGroup) ^ ((row / kRowsPerLine) % kGroup);
    return static_cast<uint32_t>(((chunk / kGroup) * kRows + row) * kRowBytes + phys * 16);
  }
  // ldmatrix address of row (row0 + r), chunk (chunk0 + cb) with row0 % 8 == 0, chunk0 even,
  // cb in {0, 1}: row0 adds nothing to the xor term and chunk0 does not touch cb's bit, so
  //   offset = row_part(r) + block_part(row0, chunk0) + (((chunk0 % kGroup) ^ lane_xor) << 4)
  // with the lane-dependent parts computed once.
  __device__ static __forceinline__ uint32_t lane_row(int r) { return static_cast<uint32_t>(r * kRowBytes); }
  __device__ static __forceinline__ int lane_xor(int r, int cb) { return cb ^ ((r / kRowsPerLine) % kGroup); }
  __device__ static __forceinline__ uint32_t addr(uint32_t base_plus_lane_row, int lane_x, int row0, int chunk0) {
    return base_plus_lane_row + static_cast<uint32_t>(((chunk0 / kGroup) * kRows + row0) * kRowBytes) +
           static_cast<uint32_t>(((chunk0 % kGroup) ^ lane_x) << 4);
  }
};

// cp.async one kRows x kChunks tile (global rows of stride ld bytes starting at column k0) into
// a swizzled stage; rows >= rows_valid and chunks at k >= K are zero-filled. Consecutive
// threads take consecutive chunks of a row: a warp reads whole 32-byte sectors.
template <int kRows, int kChunks, int kThreads>
__device__ __forceinline__ void load_tile(uint32_t stage, const int8_t* g, int64_t ld, int rows_valid, int k0,
                                          int K, int tid) {
  using Tile = SwizzledTile<kRows, kChunks>;
  constexpr int kTotal = kRows * kChunks;
#pragma unroll
  for (int i0 = 0; i0 < kTotal; i0 += kThreads) {
    const int i = i0 + tid;
    if (kTotal % kThreads == 0 || i < kTotal) {
      const int row = i / kChunks, chunk = i % kChunks;
      const int k = k0 + chunk * 16;
      const bool valid = row < rows_valid && k < K;
      const int8_t* src = valid ? g + row * ld + k : g;
      cp_async_16(stage + Tile::offset(row, chunk), src, valid);
    }
  }
}

template <typename Cfg, typename OutT>
__global__ void __launch_bounds__(Cfg::kThreads, 1) int8_gemm_kernel(const Int8GemmParams p) {
  constexpr int kBM = Cfg::kBM, kBN = Cfg::kBN, kBK = Cfg::kBK, kStages = Cfg::kStages;
  constexpr int kThreads = Cfg::kThreads, kChunks = Cfg::kChunks;
  constexpr int kMT = Cfg::kMT, kNT = Cfg::kNT;
  using ATile = SwizzledTile<kBM, kChunks>;
  using BTile = SwizzledTile<kBN, kChunks>;

  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t sA = smem_u32(smem);              // kStages A stages (kBM * kBK bytes each)
  const uint32_t sB = sA + kStages * kBM * kBK;    // kStages B stages (kBN * kBK bytes each)

  int tile_m, tile_n;
  grouped_tile((p.M + kBM - 1) / kBM, (p.N + kBN - 1) / kBN, static_cast<int>(blockIdx.x), tile_m, tile_n);
  const int m0 = tile_m * kBM, n0 = tile_n * kBN;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int wm = warp / Cfg::kWarpsN, wn = warp % Cfg::kWarpsN;
  // Split-K: this CTA sums K columns [k_begin, k_begin + k_len) (all of K without a split):
  // the operand pointers start at k_begin, so the loop below is the unsplit one over k_len.
  int k_begin, k_len;
  k_slice<kBK>(p, k_begin, k_len);
  const int8_t* ga = p.a + static_cast<int64_t>(m0) * p.lda + k_begin;
  const int8_t* gb = p.b + static_cast<int64_t>(n0) * p.ldb + k_begin;
  const int rows_a = min(kBM, p.M - m0), rows_b = min(kBN, p.N - n0);
  const int KT = (k_len + kBK - 1) / kBK;

  auto load_stage = [&](int stage, int kt) {
    load_tile<kBM, kChunks, kThreads>(sA + stage * kBM * kBK, ga, p.lda, rows_a, kt * kBK, k_len, tid);
    load_tile<kBN, kChunks, kThreads>(sB + stage * kBN * kBK, gb, p.ldb, rows_b, kt * kBK, k_len, tid);
  };

  // ldmatrix lanes. A (x4 = rows 0-7 / 8-15 of k-chunk 0, then of chunk 1 -> a[0..3]):
  // lane l gives row l % 8 + 8 * ((l / 8) % 2), chunk bit l / 16. B (x4 = n rows 0-7 chunk 0,
  // chunk 1, rows 8-15 chunk 0, chunk 1 -> b0, b1 of two n8 tiles): row l % 8 + 8 * (l / 16),
  // chunk bit (l / 8) % 2.
  const int ra = lane % 8 + 8 * ((lane / 8) % 2), ca = lane / 16;
  const int rb = lane % 8 + 8 * (lane / 16), cb = (lane / 8) % 2;
  const uint32_t a_lane = sA + ATile::lane_row(ra);
  const uint32_t b_lane = sB + BTile::lane_row(rb);
  const int a_x = ATile::lane_xor(ra, ca), b_x = BTile::lane_xor(rb, cb);

  int acc[kMT][kNT][4];
#pragma unroll
  for (int i = 0; i < kMT; ++i)
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < KT) load_stage(s, s);
    cp_async_commit();  // empty groups too: the wait count below assumes one group per tile
  }

  for (int kt = 0; kt < KT; ++kt) {
    // Groups committed so far: kStages - 1 + kt; leaving kStages - 2 in flight means tile kt
    // (group kt) has landed. The barrier also tells every thread that all warps are done
    // with the stage the next load overwrites (the one computed in step kt - 1).
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int next = kt + kStages - 1;
    if (next < KT) load_stage(next % kStages, next);
    cp_async_commit();

    const int stage = kt % kStages;
    const uint32_t a_st = a_lane + stage * kBM * kBK, b_st = b_lane + stage * kBN * kBK;
#pragma unroll
    for (int ks = 0; ks < kBK / 32; ++ks) {
      uint32_t af[kMT][4];
      uint32_t bf[kNT / 2][4];
#pragma unroll
      for (int i = 0; i < kMT; ++i) ldmatrix_x4(af[i], ATile::addr(a_st, a_x, wm * Cfg::kWM + i * 16, 2 * ks));
#pragma unroll
      for (int j = 0; j < kNT / 2; ++j) ldmatrix_x4(bf[j], BTile::addr(b_st, b_x, wn * Cfg::kWN + j * 16, 2 * ks));
#pragma unroll
      for (int i = 0; i < kMT; ++i)
#pragma unroll
        for (int j = 0; j < kNT; ++j) mma_s8_16832(acc[i][j], af[i], bf[j / 2][(j % 2) * 2], bf[j / 2][(j % 2) * 2 + 1]);
    }
  }

  // Epilogue: registers -> global. Row g / g + 8 of each m16 tile, columns 2c, 2c + 1 of each
  // n8 tile.
  const int g = lane / 4, c = lane % 4;
  OutT* out = split_plane<OutT>(p);
#pragma unroll
  for (int j = 0; j < kNT; ++j) {
    const int n = n0 + wn * Cfg::kWN + j * 8 + 2 * c;
    if (n >= p.N) continue;
    const ColumnPair col = column_pair<OutT>(p, n);
#pragma unroll
    for (int i = 0; i < kMT; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = m0 + wm * Cfg::kWM + i * 16 + g + 8 * h;
        if (m < p.M) store_acc_pair<OutT>(p, out, m, n, acc[i][j][2 * h], acc[i][j][2 * h + 1], col);
      }
    }
  }
}

template <typename OutT, int kConfig>
int run_int8_gemm(const Int8GemmParams& p, cudaStream_t stream) {
  using Cfg = GemmConfig<kConfig>;
  auto kernel = int8_gemm_kernel<Cfg, OutT>;
  constexpr int kSmem = Cfg::kSmemBytes;
  if (const int e = opt_in_dynamic_smem<int8_gemm_kernel<Cfg, OutT>>(kSmem)) return e;
  const long long tiles =
      static_cast<long long>((p.M + Cfg::kBM - 1) / Cfg::kBM) * ((p.N + Cfg::kBN - 1) / Cfg::kBN);
  if (tiles > 0x7fffffffLL || p.splits < 1 || p.splits > 65535) return kErrBadShape;
  kernel<<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(p.splits)), Cfg::kThreads, kSmem, stream>>>(p);
  return launch_status();
}

// Split-K second pass: out[m, n] = epilogue(sum_s partial[s][m, n]), two columns per thread
// (N is a multiple of 16, so a pair never straddles rows). The int32 sum is exact: every
// partial and prefix sum is bounded by K * 128 * 128 < 2^31, as the whole sum is.
template <typename OutT>
__global__ void __launch_bounds__(256) int8_splitk_reduce_kernel(const Int8GemmParams p, const int32_t* partial,
                                                                  int splits) {
  const int64_t pairs = static_cast<int64_t>(p.M) * p.N / 2;
  for (int64_t i = blockIdx.x * 256LL + threadIdx.x; i < pairs; i += static_cast<int64_t>(gridDim.x) * 256) {
    const int64_t e = 2 * i;
    int2 s = make_int2(0, 0);
    for (int k = 0; k < splits; ++k) {
      const int2 v = *reinterpret_cast<const int2*>(partial + k * p.split_stride + e);
      s.x += v.x, s.y += v.y;
    }
    const int m = static_cast<int>(e / p.N), n = static_cast<int>(e % p.N);
    store_acc_pair<OutT>(p, static_cast<OutT*>(p.out), m, n, s.x, s.y, column_pair<OutT>(p, n));
  }
}

template <typename OutT>
int run_int8_splitk_reduce(const Int8GemmParams& p, const int32_t* partial, int splits, cudaStream_t stream) {
  const int64_t pairs = static_cast<int64_t>(p.M) * p.N / 2;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((pairs + 255) / 256, 4096));
  int8_splitk_reduce_kernel<OutT><<<blocks, 256, 0, stream>>>(p, partial, splits);
  return launch_status();
}

}  // namespace int8
}  // namespace fastllm
