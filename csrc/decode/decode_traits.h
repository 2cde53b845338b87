// Tile configuration of the split-KV decode kernel: the ONE place that maps a head dim to
// (warps, pipeline stages, Q residency) and derives the shared-memory layout. Python never
// repeats these numbers. UNVERIFIED on a GPU (compiled, 0 spills; not tuned).
//
// Shared by every config:
//   * one 16-row M tile (mma m16n8k16) per CTA, shared by all warps: the packed rows of one kv
//     head (GQA heads x Sq queries; more rows -> more CTAs along grid z);
//   * each warp takes its own 16 keys of every kBlockN = 16 * kNWarps key tile, keeps its own
//     online-softmax state, and the warps merge through shared memory at the end (the key
//     range of a CTA is split once more, inside it);
//   * K/V tiles stream through kStages cp.async stages (16-byte copies, L1 bypassed).
// Shared memory must fit sm86/sm89's 99 KB; registers: O is D / 2 floats per thread.
#pragma once

namespace fastllm {
namespace decode {

template <int kHeadDim_, int kNWarps_, int kStages_, bool kQInRegs_>
struct DecodeTile {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kThreads = 32 * kNWarps;
  static constexpr int kBlockM = 16;
  static constexpr int kBlockN = 16 * kNWarps;  // keys per tile: 16 per warp (one P V k-step)
  static constexpr int kStages = kStages_;
  // true: Q fragments live in registers (D / 4 of them); false: re-read by ldmatrix per k-step.
  static constexpr bool kQInRegs = kQInRegs_;
  static constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
  static constexpr int kSmemQBytes = kBlockM * kHeadDim * 2;
  static constexpr int kSmemStageBytes = kBlockN * kHeadDim * 2;  // one K (or V) stage
  static constexpr int kSmemBytes = kSmemQBytes + 2 * kStages * kSmemStageBytes;
  // End-of-CTA merge (reuses the K/V stages): per warp (max, sum) of 16 rows and its O rows
  // (padded by 8 floats: the fragment stores of rows g = 0..7 then hit different banks), plus
  // the merged (max, sum) of 16 rows.
  static constexpr int kRedStride = kHeadDim + 8;
  static constexpr int kSmemRedBytes = (kNWarps * kBlockM * 2 + kNWarps * kBlockM * kRedStride + kBlockM * 2) * 4;

  static_assert(kHeadDim % 16 == 0, "head dim must be a multiple of the mma K (16)");
  static_assert(kThreads % kBlockN == 0 && kChunks % (kThreads / kBlockN) == 0,
                "K/V loads: whole threads per key row, whole chunks per thread");
  static_assert(kSmemBytes <= 99 * 1024, "tile does not fit the smallest sm80+ shared memory");
  static_assert(kSmemRedBytes <= 2 * kStages * kSmemStageBytes, "merge buffers must fit the K/V stages");
};

template <int D> struct DecodeTraits;
// D 64: 64-key tiles, 4 stages in flight (66 KB).
template <> struct DecodeTraits<64> : DecodeTile<64, 4, 4, true> {};
// D 80 / 96: 3 stages (63 / 75 KB).
template <> struct DecodeTraits<80> : DecodeTile<80, 4, 3, true> {};
template <> struct DecodeTraits<96> : DecodeTile<96, 4, 3, true> {};
// D 128: 2 stages (68 KB; 3 would be 100 KB, over sm86's 99 KB); 3 CTAs per H100 SM.
template <> struct DecodeTraits<128> : DecodeTile<128, 4, 2, true> {};
// D 256: O alone is 128 registers per thread, so Q stays in shared memory; 2 warps x 16 keys,
// 2 stages (72 KB).
template <> struct DecodeTraits<256> : DecodeTile<256, 2, 2, false> {};

}  // namespace decode
}  // namespace fastllm
