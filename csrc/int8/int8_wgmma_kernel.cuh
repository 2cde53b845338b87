// W8A8 GEMM for Hopper (sm_90a): wgmma.mma_async m64nNk32 s8 from shared memory, cp.async ring.
// UNVERIFIED: compiled for sm_90a (0 spills); never run on a GPU.
//
// Computes exactly what int8_gemm_kernel.cuh computes (same Int8GemmParams, same epilogue, same
// exact int32 accumulators): a (M, K) int8 row-major, b (N, K) int8 (nn.Linear layout),
//   out[m, n] = acc  or  rn_OutT(fma(fp32(acc) * a_scale[m or 0], w_scale[n], bias[n])).
// Why a second kernel: on an H100, mma.sync (the sm80 kernel) reaches only part of the tensor
// cores' int8 rate; the rest needs the warpgroup MMA, which reads its operands straight from
// shared memory (no ldmatrix, no fragment registers) and runs asynchronously.
//
// Algorithm (one CTA = one 128 x kBN tile of out; configs in int8_traits.h, WgmmaTile):
//   1. Tile index -> (tile_m, tile_n) in groups of kGroupM M-tiles (L2 reuse of b), as sm80.
//   2. K walks in 128-byte steps: one step of a tile is 128 (a) or kBN (b) rows of 128 bytes,
//      exactly one row per 128-byte swizzle row, so the cp.async loads of the sm80 kernel
//      (load_tile with SwizzledTile<rows, 8>: chunk c of row r at c ^ (r % 8)) write the
//      layout wgmma reads (common/wgmma.cuh). Rows past M / N and chunks past K are zero-filled.
//   3. Two warpgroups (256 threads): warpgroup w owns rows 64w..64w+63 of the tile and issues
//      four m64nNk32 MMAs per K step (A descriptor at its 64 rows, B descriptor at all kBN rows,
//      +32 bytes per k32 step), one commit group per K step, keeping one group running while
//      the next step is issued (wait_group 1).
//   4. Ring of kStages slots, loads kStages - 2 steps ahead: at step kt the barrier certifies
//      that every warpgroup has retired the MMAs of step kt - 2 (its wait_group 1 at the end of
//      step kt - 1), so once this step's MMAs are issued that slot is refilled with step
//      kt + kStages - 2 while they run.
//   5. Epilogue straight from the accumulator registers (the m16n8 layout per warp, repeated
//      over kBN / 8 column tiles), column pairs stored as one 8- or 4-byte write.
//   6. Split-K at M <= kWgmmaSplitMaxM when the tiles leave SMs idle (choose_wgmma_split): grid y
//      slices K as the sm80 kernel does, raw int32 partials to a workspace plane per slice, then
//      the shared reduce kernel applies the epilogue.
// Launcher: int8_launcher.cu (used on sm_90 for M > kWgmmaMinM when the build has 90a).
// Instantiations: int8_wgmma_{i32,f16,bf16,f32}_sm90a.cu. Test: pytest tests/test_int8_cuda.py
// (GPU); emulation of the layout and pipeline: tests/test_int8_wgmma_emulated.py; this source run
// on CPU by the SIMT emulator: tests/test_simt_hopper.py.
#pragma once

#include "common/wgmma.cuh"
#include "int8/int8_gemm_kernel.cuh"

namespace fastllm {
namespace int8 {

template <int kN>
__device__ __forceinline__ void wgmma_s8(int (&d)[kN / 2], uint64_t desc_a, uint64_t desc_b);
template <>
__device__ __forceinline__ void wgmma_s8<128>(int (&d)[64], uint64_t desc_a, uint64_t desc_b) {
  wgmma::wgmma_m64n128k32_s8(d, desc_a, desc_b);
}
template <>
__device__ __forceinline__ void wgmma_s8<256>(int (&d)[128], uint64_t desc_a, uint64_t desc_b) {
  wgmma::wgmma_m64n256k32_s8(d, desc_a, desc_b);
}

// Epilogue of one warpgroup's 64 x kBN accumulators, straight from registers: warp `warp` of
// warpgroup `wg` holds rows 64wg + 16warp + g (+8), columns 8j + 2c (+1). Shared by both Hopper
// kernels (cp.async- and TMA-fed).
template <int kBN, typename OutT>
__device__ __forceinline__ void store_wgmma_tile(const Int8GemmParams& p, const int (&acc)[kBN / 2], int m0, int n0,
                                                 int wg, int warp, int lane) {
  const int g = lane / 4, c = lane % 4;
  OutT* out = split_plane<OutT>(p);
  const int row0 = m0 + wg * 64 + warp * 16 + g;
#pragma unroll
  for (int j = 0; j < kBN / 8; ++j) {
    const int n = n0 + j * 8 + 2 * c;
    if (n >= p.N) continue;
    const ColumnPair col = column_pair<OutT>(p, n);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = row0 + 8 * h;
      if (m < p.M) store_acc_pair<OutT>(p, out, m, n, acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1], col);
    }
  }
}

template <typename Cfg, typename OutT>
__global__ void __launch_bounds__(Cfg::kThreads, 1) int8_wgmma_kernel(const Int8GemmParams p) {
  constexpr int kBM = Cfg::kBM, kBN = Cfg::kBN, kBK = Cfg::kBK, kStages = Cfg::kStages;
  constexpr int kThreads = Cfg::kThreads;
  constexpr int kABytes = kBM * kBK, kBBytes = kBN * kBK;  // one stage of a / b

  // The swizzle is a function of address bits 4-9: every tile starts 1024-byte aligned
  // (kSmemBytes reserves the slack; the stage sizes are multiples of 1024).
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t sA = (smem_u32(smem) + 1023u) & ~1023u;
  const uint32_t sB = sA + kStages * kABytes;

  int tile_m, tile_n;
  grouped_tile((p.M + kBM - 1) / kBM, (p.N + kBN - 1) / kBN, static_cast<int>(blockIdx.x), tile_m, tile_n);
  const int m0 = tile_m * kBM, n0 = tile_n * kBN;

  const int tid = threadIdx.x, wg = tid / 128, warp = (tid / 32) % 4, lane = tid % 32;
  // Split-K (as int8_gemm_kernel.cuh): the operand pointers start at this slice's k_begin, so the
  // loop is the unsplit one over k_len.
  int k_begin, k_len;
  k_slice<kBK>(p, k_begin, k_len);
  const int8_t* ga = p.a + static_cast<int64_t>(m0) * p.lda + k_begin;
  const int8_t* gb = p.b + static_cast<int64_t>(n0) * p.ldb + k_begin;
  const int rows_a = min(kBM, p.M - m0), rows_b = min(kBN, p.N - n0);
  const int KT = (k_len + kBK - 1) / kBK;

  auto load_stage = [&](int stage, int kt) {
    load_tile<kBM, kBK / 16, kThreads>(sA + stage * kABytes, ga, p.lda, rows_a, kt * kBK, k_len, tid);
    load_tile<kBN, kBK / 16, kThreads>(sB + stage * kBBytes, gb, p.ldb, rows_b, kt * kBK, k_len, tid);
  };

  int acc[kBN / 2];
#pragma unroll
  for (int i = 0; i < kBN / 2; ++i) acc[i] = 0;

#pragma unroll
  for (int s = 0; s < kStages - 2; ++s) {
    if (s < KT) load_stage(s, s);
    cp_async_commit();  // one group per step, empty ones too (the wait count counts them)
  }

  for (int kt = 0; kt < KT; ++kt) {
    // Committed so far: kStages - 2 + kt groups, group t = step t. Leaving kStages - 3 in
    // flight means step kt has landed (this thread's copies); the proxy fence hands them to
    // the tensor cores, the barrier makes everyone's visible and (see 4.) frees slot kt - 2.
    cp_async_wait<kStages - 3>();
    wgmma::fence_proxy_async_smem();
    __syncthreads();

    const int stage = kt % kStages;
    const uint64_t da = wgmma::desc_sw128(sA + stage * kABytes + wg * 64 * kBK);
    const uint64_t db = wgmma::desc_sw128(sB + stage * kBBytes);
    wgmma::fence();
    wgmma::fence_operands(acc);
#pragma unroll
    for (int ks = 0; ks < kBK / 32; ++ks) wgmma_s8<kBN>(acc, da + 2 * ks, db + 2 * ks);  // +32 B (>> 4)
    wgmma::commit_group();
    wgmma::fence_operands(acc);
    // The refill goes out while this step's MMAs run (its slot, kt - 2, is neither kt nor kt - 1).
    const int next = kt + kStages - 2;
    if (next < KT) load_stage(next % kStages, next);
    cp_async_commit();
    wgmma::wait_group<1>();
  }
  wgmma::wait_group<0>();
  wgmma::fence_operands(acc);

  store_wgmma_tile<kBN, OutT>(p, acc, m0, n0, wg, warp, lane);
}

template <typename OutT, int kConfig>
int run_int8_wgmma(const Int8GemmParams& p, cudaStream_t stream) {
  using Cfg = WgmmaConfig<kConfig>;
  constexpr int kSmem = Cfg::kSmemBytes;
  if (const int e = opt_in_dynamic_smem<int8_wgmma_kernel<Cfg, OutT>>(kSmem)) return e;
  const long long tiles =
      static_cast<long long>((p.M + Cfg::kBM - 1) / Cfg::kBM) * ((p.N + Cfg::kBN - 1) / Cfg::kBN);
  if (tiles > 0x7fffffffLL || p.splits < 1 || p.splits > 65535) return kErrBadShape;
  int8_wgmma_kernel<Cfg, OutT>
      <<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(p.splits)), Cfg::kThreads, kSmem, stream>>>(p);
  return launch_status();
}

}  // namespace int8
}  // namespace fastllm
