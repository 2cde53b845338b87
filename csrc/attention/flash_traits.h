// Tile configuration of the prefill flash-attention kernels: the ONE place that maps a head
// dim to (kBlockM, kBlockN, kNWarps, Q residency) and derives the shared-memory layout.
// Python never repeats these numbers; the launcher and the kernel read them from here.
//
// Shared by every config:
//   * one warp owns 16 query rows (one m16n8k16 M tile), so kBlockM = 16 * kNWarps; a row's
//     softmax state (max, sum) then lives in the 4 threads of a quad and reductions are two
//     shuffles;
//   * K and V tiles are double-buffered (cp.async stage s+1 loads while stage s computes);
//   * O accumulates in fp32 registers: 16 x D per warp = D / 2 floats per thread.
// Per-thread register budget (the binding constraint): Q fragments D / 4 (when resident in
// registers) + O accumulator D / 2 + S tile kBlockN / 2 + addressing. ptxas -v results land
// in python/fastllm/_build_info.json; every config must report 0 spill bytes.
#pragma once

namespace fastllm {
namespace attention {

// kSmemAlign_: where the kernel's tiles must start (the extern array itself is 128-aligned; more
// costs that many bytes of slack). kSmemLimitKB_: the smallest per-block shared memory of the
// archs the tile is built for.
template <int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, bool kQInRegs_, int kMinBlocksPerSM_ = 1,
          int kSmemAlign_ = 128, int kSmemLimitKB_ = 99>
struct FlashFwdTile {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;   // query rows per CTA
  static constexpr int kBlockN = kBlockN_;   // keys per K/V tile (one main-loop iteration)
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kThreads = kNWarps * 32;
  // true: Q fragments are loaded from shared memory into registers once, before the loop.
  // false: Q stays resident in shared memory and is re-read with ldmatrix per k-step
  // (only where D / 4 extra registers would push the kernel into spills).
  static constexpr bool kQInRegs = kQInRegs_;
  static constexpr int kStages = 2;          // K/V double buffering
  // __launch_bounds__ min blocks per SM: 2 caps registers at 65536 / (2 * kThreads) so two
  // CTAs fit an SM (only where their shared memory fits too); 1 lets ptxas use up to 255.
  static constexpr int kMinBlocksPerSM = kMinBlocksPerSM_;
  // As a BiasTraits (below): whether a kernel with the additive score bias path exists.
  static constexpr bool kBias = true;

  static_assert(kBlockM == 16 * kNWarps, "one 16-row mma tile per warp");
  static_assert(kHeadDim % 16 == 0, "head dim must be a multiple of the mma K (16)");
  static_assert(kBlockN % 16 == 0, "kBlockN must be a multiple of 16 (P is the A operand of P.V)");

  // Shared memory tiles are rows of kChunks 16-byte chunks (8 fp16/bf16 elements), swizzled
  // (see SmemTile in flash_fwd_kernel.cuh).
  static constexpr int kChunks = kHeadDim / 8;
  static constexpr int kSmemQElems = kBlockM * kHeadDim;   // also the O staging tile
  static constexpr int kSmemKVElems = kBlockN * kHeadDim;  // one K (or V) stage
  static constexpr int kSmemAlign = kSmemAlign_;
  static constexpr int kSmemSlack = kSmemAlign > 128 ? kSmemAlign : 0;
  static constexpr int kSmemBytes = (kSmemQElems + 2 * kStages * kSmemKVElems) * 2 + kSmemSlack;
  // sm86 / sm89 allow at most 99 KB of dynamic shared memory per block, sm90 227 KB.
  static_assert(kSmemBytes <= kSmemLimitKB_ * 1024, "tile does not fit the target archs' shared memory");
};

template <int D> struct FlashFwdTraits;

// D=64: 8 warps x 16 rows; 128 query rows per CTA halve K/V re-reads from L2 compared with 64.
// 48 KB smem. (kMinBlocksPerSM = 2, i.e. <= 128 registers, spills ~50 bytes: left at 1.)
template <> struct FlashFwdTraits<64> : FlashFwdTile<64, 128, 64, 8, true> {};
// D=80 / 96: same shape as 64; 60 KB / 72 KB smem. (80 is Phi-2/StableLM-2; 96 is Phi-3-mini.)
template <> struct FlashFwdTraits<80> : FlashFwdTile<80, 128, 64, 8, true> {};
template <> struct FlashFwdTraits<96> : FlashFwdTile<96, 128, 64, 8, true> {};
// D=128: 128 x 64 tiles; 96 KB smem (fits sm86/89's 99 KB); Q 32 + O 64 + S 32 registers
// of state, the rest is ptxas keeping K/V fragments in flight.
template <> struct FlashFwdTraits<128> : FlashFwdTile<128, 128, 64, 8, true> {};
// D=256: O alone is 128 registers per thread, so 4 warps x 16 rows and 32-key tiles keep the
// S tile at 16 registers; 96 KB smem. Q stays resident in shared memory (re-read by ldmatrix
// each k-step): with Q in registers too (64 more) ptxas spills at the 255-register cap.
template <> struct FlashFwdTraits<256> : FlashFwdTile<256, 64, 32, 4, false> {};

// Tiles of the kernels with the additive score bias (flash_attention's bias=; a separate
// instantiation, flash_fwd_kernel<Mma, true>): the plain tile unless its per-element bias loads
// spill. kBias = false: no bias kernel for that head dim; the Python glue
// (fastllm/ops/_attention_cuda.py BIAS_HEAD_DIMS) declines those calls, Triton serves them.
template <int D> struct FlashFwdBiasTraits : FlashFwdTraits<D> {};
// D=128: Q read from shared memory per k-step (resident in registers it spilled on sm_80).
template <> struct FlashFwdBiasTraits<128> : FlashFwdTile<128, 128, 64, 8, false> {};
// D=256: none (the plain config is already at the 255-register cap; the bias kernel spilled).
template <> struct FlashFwdBiasTraits<256> : FlashFwdTraits<256> {
  static constexpr bool kBias = false;
};

// Hopper (sm_90a) tiles of the wgmma kernel (flash_fwd_wgmma.cuh): two warpgroups, each owning
// 64 query rows (one m64 MMA), so kBlockM = 128 and 8 warps as above (a warp still owns 16 rows:
// the wgmma accumulator layout per warp is mma.sync's). Q stays in shared memory (wgmma reads A
// there); K / V tiles double-buffered. Shared memory: the swizzled tiles of SmemTile with
// kGroup = 8 are exactly wgmma's 128-byte-swizzle layout, which needs D % 64 == 0 and tiles
// starting 1024-byte aligned (kSmemBytes holds 1024 bytes of slack for that).
// Registers per thread: S kBlockN / 2 + O D / 2 + P kBlockN / 4 fp32 / packed values.
template <int kHeadDim_, int kBlockN_>
struct FlashFwdTileSm90 : FlashFwdTile<kHeadDim_, 128, kBlockN_, 8, false, 1, 1024, 227> {
  static_assert(kHeadDim_ % 64 == 0, "wgmma's 128-byte swizzle rows hold 64 16-bit values");
  static_assert(kBlockN_ % 64 == 0 && kBlockN_ <= 256, "S = Q K^T is one m64nN wgmma per k step");
};

template <int D> struct FlashFwdTraitsSm90;
// D=64 / 128: 128 x 128 tiles (S 64, O 32 / 64 registers); 82 KB / 162 KB smem.
template <> struct FlashFwdTraitsSm90<64> : FlashFwdTileSm90<64, 128> {};
template <> struct FlashFwdTraitsSm90<128> : FlashFwdTileSm90<128, 128> {};
// D=256: O alone is 128 registers per thread: 64-key tiles keep S at 32; 194 KB smem.
template <> struct FlashFwdTraitsSm90<256> : FlashFwdTileSm90<256, 64> {};
// Bias kernels (see FlashFwdBiasTraits): the plain tiles; none at D=256, as for sm80 (one rule
// for the glue).
template <int D> struct FlashFwdBiasTraitsSm90 : FlashFwdTraitsSm90<D> {};
template <> struct FlashFwdBiasTraitsSm90<256> : FlashFwdTraitsSm90<256> {
  static constexpr bool kBias = false;
};

}  // namespace attention
}  // namespace fastllm
