// Tile configs of the 2:4 sparse GEMM: the one place that knows them (Python never does).
//
// The weight W is mma.sp's sparse operand A (its rows are the MMA's M), the activations x are
// B (tokens are the MMA's N = 8), so a CTA computes a kBW x kBT tile of out^T. One "step" is one
// mma.sp k-slice: 32 K columns for 16-bit types (m16n8k32), 64 for int8 (m16n8k64); in bytes it
// is the same for both: 32 bytes of a compressed W row, 64 bytes of an x row, one metadata word
// per lane. A pipeline stage holds kSteps steps.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "common/common.h"  // split_k_for_tiles

namespace fastllm {
namespace sparse24 {

template <typename T_, int kBW_, int kBT_, int kWarpsW_, int kWarpsT_, int kStages_>
struct Traits {
  using T = T_;
  static constexpr bool kS8 = std::is_same<T, int8_t>::value;
  using Acc = typename std::conditional<kS8, int32_t, float>::type;
  static constexpr int kBW = kBW_, kBT = kBT_, kWarpsW = kWarpsW_, kWarpsT = kWarpsT_, kStages = kStages_;
  static constexpr int kThreads = 32 * kWarpsW * kWarpsT;
  static constexpr int kSteps = 4;                              // mma.sp k-slices per stage
  static constexpr int kColsPerStep = kS8 ? 64 : 32;            // K columns per k-slice
  static constexpr int kStageK = kSteps * kColsPerStep;         // 256 int8 / 128 16-bit columns
  static constexpr int kMetaBlocks = kStageK / 64;              // 64-column metadata blocks per stage
  static constexpr int kValRowBytes = kSteps * 32;              // compressed W bytes per row per stage
  static constexpr int kXRowBytes = kSteps * 64;                // x bytes per row per stage
  static constexpr int kWarpW = kBW / kWarpsW;                  // W rows per warp
  static constexpr int kWarpT = kBT / kWarpsT;                  // tokens per warp
  static constexpr int kMTiles = kWarpW / 16;
  static constexpr int kNTiles = kWarpT / 8;
  static constexpr int kValBytes = kBW * kValRowBytes;
  static constexpr int kXBytes = kBT * kXRowBytes;
  static constexpr int kMetaBytes = (kBW / 16) * kMetaBlocks * 128;  // 32 words per (16 rows, block)
  static constexpr int kStageBytes = kValBytes + kXBytes + kMetaBytes;
  static constexpr int kSmemBytes = kStages * kStageBytes;
  static_assert(kWarpW % 16 == 0 && kWarpT % 8 == 0, "warp tile: whole m16 x n8 MMAs");
  static_assert(kValRowBytes == 128 && kXRowBytes == 256, "the smem swizzles assume 128 / 256-byte rows");
};

// Decode / small M: 4 warps side by side along W (16 rows x 16 tokens each); 4 stages, ~57 KB.
template <typename T> using SmallM = Traits<T, 64, 16, 4, 1, 4>;
// Decode on a narrow layer: SmallM gives N / 64 CTAs, fewer than the SMs when N / 64 < SMs
// (64 at N = 4096 on a 132-SM H100) and the weight stream is the whole cost; 32-row CTAs of
// 2 warps double the CTAs (and the SMs streaming), ~31 KB each.
template <typename T> using NarrowM = Traits<T, 32, 16, 2, 1, 4>;

// Prefill: 8 warps as 2 (W) x 4 (tokens), each 64 rows x 32 tokens (4 x 4 MMAs per k-slice);
// 3 stages, ~156 KB (needs the sm80/sm90 shared-memory opt-in; smaller parts use SmallM).
template <typename T> using LargeM = Traits<T, 128, 128, 2, 4, 3>;

// Hopper (sm_90a builds, sparse24_wgmma_kernel.cuh), for the calls LargeM serves (M > 64): two
// warpgroups of 64 W rows x 128 tokens (m64n128 wgmma.sp), 4 stages (~200 / 208 KB + 1 KB
// alignment slack; the sm90 opt-in is 227 KB).
template <typename T> using HopperM = Traits<T, 128, 128, 2, 4, 4>;
// The Hopper kernel takes whole stages of K only, and needs its shared memory (+ 1 KB slack).
template <typename T>
inline bool hopper_fits(int64_t K, int smem_optin) {
  return K % HopperM<T>::kStageK == 0 && HopperM<T>::kSmemBytes + 1024 <= smem_optin;
}

// Grid-level split-K (common.h split_k_for_tiles) for the small-M configs at M <= kSplitKMaxM:
// pass 1 writes raw accumulators (fp32, or int32 for s8) per K slice into a workspace of
// splits * M * N * 4 bytes, pass 2 sums them in a fixed order and applies the epilogue.
constexpr int kSplitKMaxM = 32;

// The config for a call: 0 = NarrowM, 1 = SmallM, 2 = LargeM. smem_optin: the device's
// per-block shared-memory opt-in (sm_86/89 ~99 KB: LargeM does not fit, SmallM serves all M).
template <typename T>
inline int choose_config(int64_t M, int64_t N, int num_sms, int smem_optin) {
  if (M > 64 && LargeM<T>::kSmemBytes <= smem_optin) return 2;
  if (M <= 16 && (N + SmallM<T>::kBW - 1) / SmallM<T>::kBW < num_sms) return 0;
  return 1;
}

// K splits for a call of config `config` (0 / 1 / 2, as choose_config returned).
template <typename T>
inline int choose_split_k(int config, int64_t M, int64_t N, int64_t K, int num_sms) {
  if (config == 2 || M > kSplitKMaxM || M <= 0 || N <= 0) return 1;
  const int bw = config == 0 ? NarrowM<T>::kBW : SmallM<T>::kBW;
  const int bt = config == 0 ? NarrowM<T>::kBT : SmallM<T>::kBT;
  const int64_t stage_k = SmallM<T>::kStageK;   // the same for every config of T
  const long long tiles = static_cast<long long>((M + bt - 1) / bt) * ((N + bw - 1) / bw);
  return split_k_for_tiles(tiles, (K + stage_k - 1) / stage_k, num_sms);
}

}  // namespace sparse24
}  // namespace fastllm
