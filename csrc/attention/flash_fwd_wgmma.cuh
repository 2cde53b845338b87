// Prefill flash attention, forward, for Hopper (sm_90a): the kernel of flash_fwd_kernel.cuh with
// its two matrix products on warpgroup MMAs (wgmma.mma_async m64nNk16, fp32 accumulators).
// UNVERIFIED: compiled for sm_90a; never run on a GPU.
//
// Computes exactly what flash_fwd_kernel.cuh documents (same FlashFwdParams, masks, causal /
// window / softcap, varlen, lse); only the tensor-core instructions differ, and with them the
// order of the fp32 additions inside each product.
// Why: on an H100, mma.sync reaches only part of the tensor cores' rate; wgmma reads its B
// operand (and here A of Q K^T) straight from shared memory, no ldmatrix, and runs async.
//
// Tiles (flash_traits.h, FlashFwdTraitsSm90): 128 query rows per CTA, two warpgroups of 64 rows;
// K / V tiles of kBlockN keys, double-buffered by the skeleton's cp.async loads. SmemTile with
// kGroup = 8 (D % 64 == 0) stores chunk c of row r of column block b at row (b * rows + r),
// chunk c ^ (r % 8): wgmma's 128-byte swizzle with 64-value rows, 8-row (1024-byte) atoms.
//   S = Q K^T (ss form): A = this warpgroup's 64 Q rows, B = the kBlockN K rows, both K-major
//     (D contiguous); k step kk (16 values) is column block kk / 4, +32 bytes per step inside
//     it; one m64n{kBlockN}k16 per step, the first with scale-d = 0 (no zeroing).
//   O += P V (rs form): A = P in registers (p_fragment: the S accumulator layout is the A
//     register fragment), B = 16 V rows (keys) x D, N-major (imm-trans-b = 1): key step ks
//     starts 16 * 128 bytes further, 64-wide D blocks are kBlockN * 128 bytes apart (the
//     descriptor's leading byte offset), 8-key groups 1024 bytes apart.
// Each product is one commit group, retired (wait_group 0) before its registers are read: the
// skeleton's barrier per key tile then certifies that no MMA still reads the stage the next
// prefetch overwrites. cp.async writes through the generic proxy, so the skeleton calls
// copies_landed (fence.proxy.async) before the barrier that publishes them to the tensor cores.
// Launcher: flash_fwd_launcher.cu (sm_90 with a 90a build, D 64 / 128 / 256; FASTLLM_ATTN_WGMMA=0
// keeps the sm80 kernel). Instantiations: flash_fwd_hdim*_*_sm90a.cu. Emulation of the layouts
// and descriptors: tests/test_attention_wgmma_emulated.py; this source run on CPU by the SIMT
// emulator: tests/test_simt_hopper.py; GPU test: tests/test_attention_cuda.py.
#pragma once

#include "attention/flash_fwd_kernel.cuh"
#include "common/wgmma.cuh"

namespace fastllm {
namespace attention {

// One k16 step of the two products for element type T (the wrappers of common/wgmma.cuh).
template <typename T, int kN>
__device__ __forceinline__ void wgmma_qk(float (&d)[kN / 2], uint64_t da, uint64_t db, int acc);
template <typename T, int kN>
__device__ __forceinline__ void wgmma_pv(float (&d)[kN / 2], const uint32_t (&a)[4], uint64_t db);

#define FASTLLM_FLASH_WGMMA(T, N, SS, RS)                                                                  \
  template <>                                                                                              \
  __device__ __forceinline__ void wgmma_qk<T, N>(float(&d)[N / 2], uint64_t da, uint64_t db, int acc) {    \
    wgmma::SS(d, da, db, acc);                                                                             \
  }                                                                                                        \
  template <>                                                                                              \
  __device__ __forceinline__ void wgmma_pv<T, N>(float(&d)[N / 2], const uint32_t(&a)[4], uint64_t db) { \
    wgmma::RS(d, a, db, 1);                                                                                \
  }
FASTLLM_FLASH_WGMMA(__half, 64, ss_m64n64k16_f16, rs_m64n64k16_f16)
FASTLLM_FLASH_WGMMA(__half, 128, ss_m64n128k16_f16, rs_m64n128k16_f16)
FASTLLM_FLASH_WGMMA(__nv_bfloat16, 64, ss_m64n64k16_bf16, rs_m64n64k16_bf16)
FASTLLM_FLASH_WGMMA(__nv_bfloat16, 128, ss_m64n128k16_bf16, rs_m64n128k16_bf16)
#undef FASTLLM_FLASH_WGMMA
// N = 256 exists only as P V (D = 256); S tiles are at most 128 keys wide.
template <>
__device__ __forceinline__ void wgmma_pv<__half, 256>(float (&d)[128], const uint32_t (&a)[4], uint64_t db) {
  wgmma::rs_m64n256k16_f16(d, a, db, 1);
}
template <>
__device__ __forceinline__ void wgmma_pv<__nv_bfloat16, 256>(float (&d)[128], const uint32_t (&a)[4], uint64_t db) {
  wgmma::rs_m64n256k16_bf16(d, a, db, 1);
}

// The Hopper policy of flash_fwd_kernel: same interface as Sm80Mma.
template <typename Traits_, typename T_>
struct Sm90Mma {
  using Traits = Traits_;
  using T = T_;
  static constexpr int kD = Traits::kHeadDim, kBM = Traits::kBlockM, kBN = Traits::kBlockN;
  static constexpr int kNT = kBN / 8, kDT = kD / 8;
  static_assert(kBM == 128 && Traits::kThreads == 256, "two warpgroups of 64 query rows");
  static constexpr uint32_t kRowBytes = 128;                // one swizzle row: 64 16-bit values
  static constexpr uint32_t kQBlockBytes = kBM * kRowBytes;  // one 64-wide column block of Q
  static constexpr uint32_t kKVBlockBytes = kBN * kRowBytes; // ... of a K or V tile

  uint64_t q_desc, k_desc, v_desc;  // descriptors at stage 0, k step 0

  __device__ __forceinline__ Sm90Mma(uint32_t sQ, uint32_t sK, uint32_t sV, int warp, int /*lane*/) {
    const int wg = warp / 4;
    q_desc = wgmma::desc_sw128(sQ + wg * 64 * kRowBytes);
    k_desc = wgmma::desc_sw128(sK);
    v_desc = wgmma::desc_sw128_mn(sV, kKVBlockBytes);
  }
  // cp.async wrote through the generic proxy; the tensor cores read through the async proxy.
  __device__ static __forceinline__ void copies_landed() { wgmma::fence_proxy_async_smem(); }
  __device__ __forceinline__ void q_ready() {}

  // Descriptor + byte offset: the start address field is bits 0-13 in 16-byte units, and every
  // address here stays below 256 KB, so adding (bytes >> 4) never carries out of the field.
  __device__ static __forceinline__ uint64_t at(uint64_t desc, uint32_t bytes) { return desc + (bytes >> 4); }

  __device__ __forceinline__ void qk(float (&s)[kNT][4], uint32_t stage) {
    float(&d)[kBN / 2] = reinterpret_cast<float(&)[kBN / 2]>(s);
    wgmma::fence();  // the previous tile's registers (S, P) were used by ordinary instructions
    wgmma::fence_operands(d);
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      const uint32_t block = kk / 4, in_row = (kk % 4) * 32u;
      wgmma_qk<T, kBN>(d, at(q_desc, block * kQBlockBytes + in_row),
                       at(k_desc, stage + block * kKVBlockBytes + in_row), kk > 0);
    }
    wgmma::commit_group();
    wgmma::wait_group<0>();
    wgmma::fence_operands(d);
  }

  __device__ __forceinline__ void pv(float (&o)[kDT][4], const float (&s)[kNT][4], uint32_t stage) {
    float(&d)[kD / 2] = reinterpret_cast<float(&)[kD / 2]>(o);
    uint32_t a[kBN / 16][4];
#pragma unroll
    for (int ks = 0; ks < kBN / 16; ++ks) p_fragment<T>(a[ks], s, ks);
    wgmma::fence();  // O was rescaled and P written by ordinary instructions
    wgmma::fence_operands(d);
#pragma unroll
    for (int ks = 0; ks < kBN / 16; ++ks) wgmma_pv<T, kD>(d, a[ks], at(v_desc, stage + ks * 16 * kRowBytes));
    wgmma::commit_group();
    wgmma::wait_group<0>();
    wgmma::fence_operands(d);
    // The MMAs read P from these registers asynchronously: keep them alive (unreused) until
    // the wait above has retired them.
#pragma unroll
    for (int ks = 0; ks < kBN / 16; ++ks) wgmma::fence_operands(a[ks]);
  }
};

template <typename T, int D>
int run_flash_fwd_sm90(const FlashFwdParams& p, cudaStream_t stream) {
  return launch_plain_or_bias<Sm90Mma, FlashFwdTraitsSm90<D>, FlashFwdBiasTraitsSm90<D>, T>(p, stream);
}

}  // namespace attention
}  // namespace fastllm
