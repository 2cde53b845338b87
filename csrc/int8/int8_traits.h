// Tile configurations of the int8 kernels: the ONE place that maps a call's (M bucket, N, K,
// GPU size) to a compiled config. Python never repeats these numbers; the launcher
// (int8_launcher.cu) calls choose_*() and dispatches on the returned index, the kernels read
// the tile shapes from the structs below.
#pragma once

#include "common/common.h"  // split_k_for_tiles

namespace fastllm {
namespace int8 {

// ---------------------------------------------------------------------------------------------
// W8A8 GEMM (int8_gemm_kernel.cuh). A CTA computes a kBM x kBN tile of C, walking K in kBK-byte
// steps through a kStages-deep cp.async ring; kWarpsM x kWarpsN warps each own a
// (kBM / kWarpsM) x (kBN / kWarpsN) sub-tile held as int32 m16n8 accumulators.
template <int kBM_, int kBN_, int kBK_, int kWarpsM_, int kWarpsN_, int kStages_>
struct GemmTile {
  static constexpr int kBM = kBM_, kBN = kBN_, kBK = kBK_;
  static constexpr int kWarpsM = kWarpsM_, kWarpsN = kWarpsN_, kStages = kStages_;
  static constexpr int kWarps = kWarpsM * kWarpsN, kThreads = 32 * kWarps;
  static constexpr int kWM = kBM / kWarpsM, kWN = kBN / kWarpsN;  // warp tile
  static constexpr int kMT = kWM / 16, kNT = kWN / 8;               // m16 / n8 mma tiles per warp
  static constexpr int kChunks = kBK / 16;                            // 16-byte chunks per smem row
  static constexpr int kStageBytes = (kBM + kBN) * kBK;
  static constexpr int kSmemBytes = kStages * kStageBytes;
  static_assert(kWM % 16 == 0 && kWN % 16 == 0, "warp tile: m16 rows, pairs of n8 tiles (one ldmatrix.x4)");
  static_assert(kBK % 64 == 0, "kBK: the swizzle wants >= 4 chunks per row, mma k is 32");
  static_assert(kStages >= 2, "cp.async ring needs two stages");
  // sm86 / sm89 give a block at most 99 KB of shared memory; every config must run there.
  static_assert(kSmemBytes <= 99 * 1024, "tile does not fit the smallest sm80+ shared memory");
};

// Register budget per thread: accumulators kMT * kNT * 4 + fragments kMT * 4 + kNT * 2 per
// k-step (+ the next step's, when ptxas software-pipelines them) + addressing. The 64x64 warp
// tile (128 accumulators) is the largest that stays far from the 255-register cap.
// Index = the value choose_gemm_config() returns; instantiated in int8_gemm_*.cu.
template <int kConfig> struct GemmConfig;
// M <= 16 (decode): 16 x 32 tiles keep N / 32 CTAs streaming B (128 CTAs at N = 4096), deep K
// steps (256 bytes) and 4 stages keep 48 KB of B in flight per CTA: the weights are the cost.
template <> struct GemmConfig<0> : GemmTile<16, 32, 256, 1, 2, 4> {};
// M <= 32: warp tile 32 x 32.
template <> struct GemmConfig<1> : GemmTile<32, 64, 128, 1, 2, 4> {};
// M <= 64: warp tile 32 x 64, 48 KB.
template <> struct GemmConfig<2> : GemmTile<64, 128, 64, 2, 2, 4> {};
// M <= 128, or large M where 128 x 256 tiles would leave SMs idle: warp tile 64 x 64, 64 KB.
template <> struct GemmConfig<3> : GemmTile<128, 128, 64, 2, 2, 4> {};
// Large M: 128 x 256 x 64, 8 warps of 64 x 64, 3 stages (72 KB): the fewest L2 bytes per MAC.
template <> struct GemmConfig<4> : GemmTile<128, 256, 64, 2, 4, 3> {};
constexpr int kNumGemmConfigs = 5;

// CTA raster: kGroupM M-tiles walk the N-tiles together, so a B tile is read from DRAM once
// per group and served from L2 to the other kGroupM - 1 CTAs.
constexpr int kGroupM = 8;

inline int ceil_div(long long a, long long b) { return static_cast<int>((a + b - 1) / b); }

// The tile config for one W8A8 call. K does not change the tile (any K: the K tail is
// zero-filled); it sets the split-K factor below.
inline int choose_gemm_config(long long M, long long N, long long K, int num_sms) {
  (void)K;
  if (M <= 16) return 0;
  if (M <= 32) return 1;
  if (M <= 64) return 2;
  if (M <= 128) return 3;
  const long long big_tiles = static_cast<long long>(ceil_div(M, 128)) * ceil_div(N, 256);
  return big_tiles >= num_sms ? 4 : 3;
}

// Grid-level split-K for the configs of M <= 128 (0..3: decode, short prefill, serving chunks),
// which are weight-bandwidth bound (2M int8 ops per weight byte, under the ridge of every sm80+
// GPU) and whose N tiles alone can leave most SMs idle (M 128, N 4096: 32 CTAs): the rule is
// common.h's split_k_for_tiles over this config's (M, N) tiles and K tiles. Partials are raw
// int32 in a workspace of splits * M * N * 4 bytes (L2-resident for these sizes); a second
// kernel adds them and applies the epilogue (int8_gemm_kernel.cuh).
constexpr int kSplitKMaxM = 128;
template <int kConfig>
inline int split_k_for(long long M, long long N, long long K, int num_sms) {
  using C = GemmConfig<kConfig>;
  const long long tiles = static_cast<long long>(ceil_div(M, C::kBM)) * ceil_div(N, C::kBN);
  return split_k_for_tiles(tiles, ceil_div(K, C::kBK), num_sms);
}
inline int choose_split_k(int config, long long M, long long N, long long K, int num_sms) {
  switch (config) {
    case 0: return split_k_for<0>(M, N, K, num_sms);
    case 1: return split_k_for<1>(M, N, K, num_sms);
    case 2: return split_k_for<2>(M, N, K, num_sms);
    case 3: return M <= kSplitKMaxM ? split_k_for<3>(M, N, K, num_sms) : 1;
    default: return 1;
  }
}
// ---------------------------------------------------------------------------------------------
// W8A8 GEMM on Hopper (int8_wgmma_kernel.cuh, sm_90a builds only). Two warpgroups of 64 rows
// (kBM = 128), K steps of 128 bytes (one 128-byte swizzle row), a kStages-slot cp.async ring
// loading kStages - 2 steps ahead. Accumulators: kBN / 2 int32 registers per thread (128 at
// kBN = 256, the most that leaves room for addressing under the 255 cap); one CTA per SM.
template <int kBN_, int kStages_>
struct WgmmaTile {
  static constexpr int kBM = 128, kBN = kBN_, kBK = 128, kStages = kStages_;
  static constexpr int kThreads = 256;
  static constexpr int kStageBytes = (kBM + kBN) * kBK;
  static constexpr int kSmemBytes = kStages * kStageBytes + 1024;  // + slack to align to 1024
  static_assert(kBN == 128 || kBN == 256, "wgmma N of the instantiated wrappers");
  static_assert(kStages >= 3, "the ring keeps one slot for the MMAs still running");
  static_assert(kSmemBytes <= 227 * 1024, "over the H100's 227 KB per block");
};
template <int kConfig> struct WgmmaConfig;
// 128 x 128 tiles, 5 slots (161 KB): for grids that 128 x 256 tiles would leave short of SMs.
template <> struct WgmmaConfig<0> : WgmmaTile<128, 5> {};
// 128 x 256 tiles, 4 slots (193 KB): half the L2 traffic per MAC of 128 x 128.
template <> struct WgmmaConfig<1> : WgmmaTile<256, 4> {};
constexpr int kNumWgmmaConfigs = 2;

// The TMA-fed variant (int8_wgmma_tma_kernel.cuh, opt-in): the same tiles plus a producer warp
// (288 threads: the register cap stays 224, enough for 128 accumulators without the cp.async
// addressing), a full and an empty 8-byte mbarrier per slot.
template <int kBN_, int kStages_>
struct WgmmaTmaTile {
  static constexpr int kBM = 128, kBN = kBN_, kBK = 128, kStages = kStages_;
  static constexpr int kThreads = 288;
  static constexpr int kStageBytes = (kBM + kBN) * kBK;
  static constexpr int kSmemBytes = kStages * kStageBytes + 1024 + 2 * kStages * 8;
  static_assert(kSmemBytes <= 227 * 1024, "over the H100's 227 KB per block");
};
template <int kConfig> struct WgmmaTmaConfig;
template <> struct WgmmaTmaConfig<0> : WgmmaTmaTile<128, 6> {};  // 193 KB
template <> struct WgmmaTmaConfig<1> : WgmmaTmaTile<256, 4> {};  // 193 KB
// Below this M the sm80 configs (and their split-K) stay: a 128-row tile would be mostly padding
// and small M is weight-bandwidth bound, where the MMA flavour does not matter.
constexpr int kWgmmaMinM = 128;

// The wgmma config for (M, N) on a Hopper GPU, or -1 for "use the sm80 kernel".
inline int choose_wgmma_config(long long M, long long N, int num_sms) {
  if (M <= kWgmmaMinM) return -1;
  const long long big_tiles = static_cast<long long>(ceil_div(M, 128)) * ceil_div(N, 256);
  return big_tiles >= num_sms ? 1 : 0;
}

// Split-K on the wgmma path: M in (kWgmmaMinM, kWgmmaSplitMaxM] on narrow layers leaves SMs idle
// (M 256, N 4096: 64 tiles of 128 x 128 on 132 SMs). One CTA per SM (the ring takes most of
// shared memory), so a split pays while all slices run in one wave: the largest power of two
// s <= kMaxSplitK with tiles * s <= SMs and >= kMinKTilesPerSplit K steps per slice. (A second
// wave shortens the longest SM's work a little but multiplies the int32 partial traffic, which
// then no longer stays in L2 on the wide layers where it would apply.)
constexpr int kWgmmaSplitMaxM = 256;
inline int choose_wgmma_split(int config, long long M, long long N, long long K, int num_sms) {
  if (M > kWgmmaSplitMaxM) return 1;
  const long long tiles = static_cast<long long>(ceil_div(M, WgmmaConfig<0>::kBM)) *
                          ceil_div(N, config == 0 ? WgmmaConfig<0>::kBN : WgmmaConfig<1>::kBN);
  const long long k_tiles = ceil_div(K, WgmmaConfig<0>::kBK);
  int s = 1;
  while (2 * s <= kMaxSplitK && tiles * 2 * s <= num_sms && k_tiles / (2 * s) >= kMinKTilesPerSplit) s *= 2;
  return s;
}

// K tiles of a config (the split's unit).
inline int gemm_k_tile(int config) {
  switch (config) {
    case 0: return GemmConfig<0>::kBK;
    case 1: return GemmConfig<1>::kBK;
    case 2: return GemmConfig<2>::kBK;
    case 3: return GemmConfig<3>::kBK;
    default: return GemmConfig<4>::kBK;
  }
}

// ---------------------------------------------------------------------------------------------
// W8A16 (w8a16_gemm_kernel.cuh). A CTA owns 16 output channels (one m16 mma tile of W) and
// all M <= 16 tokens; its kWarps warps split K between them (64 k per warp step) and reduce
// their partial tiles through shared memory. kTokenTiles n8 tiles cover the tokens (1: M <= 8).
constexpr int kW8A16MaxM = 16;
constexpr int kW8A16RowsPerCta = 16;
// Weight loads in flight per thread: kW8A16Unroll 64-k steps x 2 rows x 16 bytes.
constexpr int kW8A16Unroll = 4;

struct W8A16Choice {
  int token_tiles;  // 1 or 2
  int warps;        // 4 or 8
};
// N / 16 CTAs of 8 warps: with N >= 2048 that is >= 1 CTA (8 warps x 4 KB of weight loads in
// flight) per SM. 4 warps when K is short (each warp should get >= 2 of its 64-k steps).
// Few CTAs (N / 16 < SMs) leave SMs idle: a grid-level split-K would fill them (not done).
inline W8A16Choice choose_w8a16_config(long long M, long long N, long long K, int num_sms) {
  (void)N, (void)num_sms;
  W8A16Choice c{M <= 8 ? 1 : 2, 8};
  if (K < 8 * 64 * 2) c.warps = 4;
  return c;
}

}  // namespace int8
}  // namespace fastllm
