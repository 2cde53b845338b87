// W8A8 GEMM for Hopper (sm_90a), TMA-fed variant: a producer warp streams the tiles with bulk
// tensor copies, two consumer warpgroups run wgmma. EXPERIMENTAL and UNVERIFIED: compiled for
// sm_90a, never run; opt-in with FASTLLM_INT8_WGMMA=tma (default: the cp.async variant,
// int8_wgmma_kernel.cuh). Same Int8GemmParams, same exact int32 sums, same epilogue.
//
// Why: the cp.async variant makes every math thread compute addresses, issue copies, fence the
// proxies and meet at a CTA barrier each K step; here the math warps only wait on a per-slot
// barrier, and the copy engine zero-fills tails itself (no masks).
//
// Structure (one CTA = one 128 x kBN tile of out; configs WgmmaTmaConfig in int8_traits.h):
//   warps 0-7: two consumer warpgroups (rows 64w..64w+63), warp 8: producer (one thread);
//   ring of kStages slots, each with a full and an empty mbarrier (common/tma.cuh protocol):
//     producer, step kt, slot s = kt % kStages, round u = kt / kStages:
//       wait empty[s] parity (u & 1) ^ 1; arrive.expect_tx(full[s], stage bytes);
//       TMA a box (k0, m0) 128 x 128 and b box (k0, n0) kBN x 128 into slot s (128-byte swizzle:
//       the layout of common/wgmma.cuh, written by the copy engine);
//     consumers, step kt: wait full[s] parity u & 1; four m64nNk32 MMAs; commit; wait_group 1
//       (step kt - 1 retired); one thread per warpgroup arrives on empty[(kt - 1) % kStages].
// Launcher: int8_launcher.cu builds the two tensor maps (driver entry point, no libcuda link).
// Emulation of the barrier protocol: tests/test_int8_wgmma_emulated.py; this source (TMA, mbarrier
// and wgmma modelled) run on CPU by the SIMT emulator: tests/test_simt_hopper.py.
#pragma once

#include "common/tma.cuh"
#include "common/wgmma.cuh"
#include "int8/int8_wgmma_kernel.cuh"

namespace fastllm {
namespace int8 {

template <typename Cfg, typename OutT>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    int8_wgmma_tma_kernel(const Int8GemmParams p, const __grid_constant__ CUtensorMap map_a,
                          const __grid_constant__ CUtensorMap map_b) {
  constexpr int kBM = Cfg::kBM, kBN = Cfg::kBN, kBK = Cfg::kBK, kStages = Cfg::kStages;
  constexpr int kABytes = kBM * kBK, kBBytes = kBN * kBK;

  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t sA = (smem_u32(smem) + 1023u) & ~1023u;  // 128-byte swizzle: 1024-aligned tiles
  const uint32_t sB = sA + kStages * kABytes;
  const uint32_t full = sB + kStages * kBBytes;  // kStages 8-byte barriers, then kStages "empty"
  const uint32_t empty = full + kStages * 8;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      tma::mbar_init(full + 8 * s, 1);   // the producer's arrive.expect_tx
      tma::mbar_init(empty + 8 * s, 2);  // one arrive per consumer warpgroup
    }
    tma::mbar_fence_init();
    wgmma::fence_proxy_async_smem();
  }
  // The last CTA-wide barrier: the producer warp returns early below, so nothing after this
  // line may use __syncthreads (a consumer-only sync would be a named barrier of 256 threads).
  __syncthreads();

  int tile_m, tile_n;
  grouped_tile((p.M + kBM - 1) / kBM, (p.N + kBN - 1) / kBN, static_cast<int>(blockIdx.x), tile_m, tile_n);
  const int m0 = tile_m * kBM, n0 = tile_n * kBN;
  const int KT = (p.K + kBK - 1) / kBK;

  if (warp == 8) {
    if (lane == 0) {
      for (int kt = 0; kt < KT; ++kt) {
        const int s = kt % kStages;
        const uint32_t u = static_cast<uint32_t>(kt / kStages);
        tma::mbar_wait(empty + 8 * s, (u & 1) ^ 1);
        tma::mbar_arrive_expect_tx(full + 8 * s, kABytes + kBBytes);
        tma::load_2d(sA + s * kABytes, &map_a, kt * kBK, m0, full + 8 * s);
        tma::load_2d(sB + s * kBBytes, &map_b, kt * kBK, n0, full + 8 * s);
      }
    }
    return;
  }

  const int wg = warp / 4, wwarp = warp % 4;
  int acc[kBN / 2];
#pragma unroll
  for (int i = 0; i < kBN / 2; ++i) acc[i] = 0;

  for (int kt = 0; kt < KT; ++kt) {
    const int s = kt % kStages;
    tma::mbar_wait(full + 8 * s, static_cast<uint32_t>(kt / kStages) & 1);
    const uint64_t da = wgmma::desc_sw128(sA + s * kABytes + wg * 64 * kBK);
    const uint64_t db = wgmma::desc_sw128(sB + s * kBBytes);
    wgmma::fence();
    wgmma::fence_operands(acc);
#pragma unroll
    for (int ks = 0; ks < kBK / 32; ++ks) wgmma_s8<kBN>(acc, da + 2 * ks, db + 2 * ks);
    wgmma::commit_group();
    wgmma::fence_operands(acc);
    wgmma::wait_group<1>();  // step kt - 1 retired: its slot may be refilled
    if (kt > 0 && wwarp == 0 && lane == 0) tma::mbar_arrive(empty + 8 * ((kt - 1) % kStages));
  }
  wgmma::wait_group<0>();
  wgmma::fence_operands(acc);

  store_wgmma_tile<kBN, OutT>(p, acc, m0, n0, wg, wwarp, lane);
}

// Tensor map of a (rows, K) int8 row-major operand with row stride ld bytes, box kBK x box_rows,
// 128-byte swizzle, zero fill outside. Returns kOk, or non-zero when the driver function is
// missing or refuses the arguments.
int make_operand_map(CUtensorMap* map, const int8_t* base, int64_t rows, int64_t K, int64_t ld, int box_rows);

template <typename OutT, int kConfig>
int run_int8_wgmma_tma(const Int8GemmParams& p, cudaStream_t stream) {
  using Cfg = WgmmaTmaConfig<kConfig>;
  constexpr int kSmem = Cfg::kSmemBytes;
  if (const int e = opt_in_dynamic_smem<int8_wgmma_tma_kernel<Cfg, OutT>>(kSmem)) return e;
  const long long tiles =
      static_cast<long long>((p.M + Cfg::kBM - 1) / Cfg::kBM) * ((p.N + Cfg::kBN - 1) / Cfg::kBN);
  if (tiles > 0x7fffffffLL || p.splits != 1) return kErrBadShape;
  // A tensor map the driver refuses (or no driver entry point): the cp.async-fed kernel serves
  // the call instead (this variant is opt-in, the other one the default).
  CUtensorMap map_a, map_b;
  if (make_operand_map(&map_a, p.a, p.M, p.K, p.lda, Cfg::kBM) != kOk ||
      make_operand_map(&map_b, p.b, p.N, p.K, p.ldb, Cfg::kBN) != kOk)
    return run_int8_wgmma<OutT, kConfig>(p, stream);
  int8_wgmma_tma_kernel<Cfg, OutT><<<static_cast<unsigned>(tiles), Cfg::kThreads, kSmem, stream>>>(p, map_a, map_b);
  return launch_status();
}

}  // namespace int8
}  // namespace fastllm
