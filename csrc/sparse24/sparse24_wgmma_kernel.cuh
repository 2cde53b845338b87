// 2:4 sparse GEMM for Hopper (sm_90a): wgmma.mma_async.sp on the compressed weights, cp.async
// ring. UNVERIFIED: compiled for sm_90a (0 spills), never run on a GPU. The per-warp metadata
// layout is taken to be mma.sp's (the PTX ISA gives wgmma.sp's only as figures; CuTe's wgmma.sp
// metadata layouts, ELayout_64x32 / 64x64, say the same: each warp's 16 rows as in mma.sp); the
// GPU tests (tests/test_sparse24.py, M > 64 on an H100) are what will settle it. This source
// runs on CPU in the SIMT emulator (tests/test_simt_hopper.py), whose wgmma.sp model makes the
// same per-warp reading.
//
// Computes what sparse24_gemm_kernel.cuh computes (same Params, same compressed format, same
// finish() epilogue): out[m, n] = sum_k x[m, k] W[n, k] (+ bias; int8: raw int32 or the int8
// epilogue). W is the sparse A operand (its rows are the MMA's M), x the dense B (tokens = N).
//
// Algorithm (one CTA = 128 W rows x 128 tokens of out^T; HopperM in sparse24_traits.h):
//   * a stage is the sm80 kernel's (load_stage): 128 compressed W rows of 128 bytes (already the
//     128-byte-swizzled K-major layout, val_off), x as two 128-byte column blocks of 128 rows
//     (XOffWgmma: the same swizzle per block, so each block is a canonical K-major tile), and
//     the metadata words;
//   * warpgroup wg (warps 4wg..4wg+3) owns W rows 64wg..64wg+63; per k-slice (32 columns
//     fp16 / bf16, 64 int8) one m64n128 wgmma.sp: A descriptor at its rows + 32 bytes per slice,
//     B descriptor at x block slice / 2 + 64 bytes per odd slice, and each thread's metadata word
//     of row block 4wg + w for the slice's 64-column block (read from shared memory before the
//     stage's MMAs; selector 0, the odd 16-bit slice's words moved to thread pair 0, 1);
//   * ring of kStages slots loaded kStages - 2 ahead, the refill issued after the stage's MMAs,
//     wait_group 1 (the pipeline of int8/int8_wgmma_kernel.cuh);
//   * epilogue from registers: d[4j + 2h + e] = (W row 16w + g + 8h, token 8j + 2c + e).
// Used for M > 64 and K % kStageK == 0 (128 fp16 / bf16, 256 int8 columns: every Llama-sized K)
// only (sparse24_gemm_launcher.cu): no split-K and no K-tail path, whose branch would cut the
// stage's MMA group (ptxas inserts a dummy MMA at the join).
#pragma once

#include "common/wgmma.cuh"
#include "sparse24/sparse24_gemm_kernel.cuh"

namespace fastllm {
namespace sparse24 {

// x stage as kBlockRows-row column blocks of 128 bytes (chunk c of row r: block c / 8, position
// (c % 8) ^ (r % 8)): each block is a canonical 128-byte-swizzled K-major wgmma tile.
template <int kBlockRows>
struct XOffWgmma {
  __device__ __forceinline__ static int off(int r, int c) {
    return (c >> 3) * (kBlockRows * 128) + r * 128 + (((c & 7) ^ (r & 7)) << 4);
  }
};

template <typename T, int kSel> struct WgmmaSp;
template <int kSel> struct WgmmaSp<__half, kSel> {
  __device__ __forceinline__ static void run(float (&d)[64], uint64_t a, uint64_t b, uint32_t e) {
    wgmma::wgmma_sp_m64n128k32_f16<kSel>(d, a, b, e);
  }
};
template <int kSel> struct WgmmaSp<__nv_bfloat16, kSel> {
  __device__ __forceinline__ static void run(float (&d)[64], uint64_t a, uint64_t b, uint32_t e) {
    wgmma::wgmma_sp_m64n128k32_bf16<kSel>(d, a, b, e);
  }
};
template <int kSel> struct WgmmaSp<int8_t, kSel> {
  static_assert(kSel == 0, "s8 k64: all four threads of a quad hold metadata");
  __device__ __forceinline__ static void run(int (&d)[64], uint64_t a, uint64_t b, uint32_t e) {
    wgmma::wgmma_sp_m64n128k64_s8<0>(d, a, b, e);
  }
};

template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads, 1) sparse24_wgmma_kernel(const Params p) {
  using T = typename Tr::T;
  using Acc = typename Tr::Acc;
  using XOff = XOffWgmma<Tr::kBT>;
  constexpr int kStages = Tr::kStages;
  static_assert(Tr::kBW == 128 && Tr::kBT == 128 && Tr::kThreads == 256, "two warpgroups x m64n128");
  static_assert(Tr::kStageBytes % 1024 == 0 && Tr::kValBytes % 1024 == 0 && Tr::kXBytes % 2048 == 0,
                "128-byte swizzled tiles must start 1024-aligned");

  extern __shared__ __align__(128) uint8_t smem_raw[];
  uint8_t* smem = smem_raw + (((smem_u32(smem_raw) + 1023u) & ~1023u) - smem_u32(smem_raw));
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, wg = warp / 4, w = warp % 4;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * Tr::kBT;
  const int64_t w0 = static_cast<int64_t>(blockIdx.y) * Tr::kBW;
  const int64_t k_tiles = p.K / Tr::kStageK;  // the launcher sends only K % kStageK == 0

  Acc acc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = Acc(0);

#pragma unroll
  for (int s = 0; s < kStages - 2; ++s) {
    if (s < k_tiles) load_stage<Tr, XOff>(p, smem + s * Tr::kStageBytes, s, w0, t0, tid);
    cp_async_commit();
  }
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 3>();  // step kt landed (see int8_wgmma_kernel.cuh for the count)
    wgmma::fence_proxy_async_smem();
    __syncthreads();               // everyone's copies visible; slot kt - 2 retired everywhere
    const uint8_t* st = smem + (kt % kStages) * Tr::kStageBytes;
    const uint32_t vals = smem_u32(st), xs = vals + Tr::kValBytes;
    const uint32_t* ms = reinterpret_cast<const uint32_t*>(st + Tr::kValBytes + Tr::kXBytes);
    const int rb = wg * 4 + w;     // this warp's 16-row metadata block
    // The stage's metadata words, loaded before the fence (an ordinary load between the MMAs
    // would split their group). Sparsity selector always 0, as CUTLASS uses it: for 16-bit
    // types the odd slice's word (which mma.sp's layout gives to the thread pair 2, 3 of each
    // quad) is read by pair 0, 1 instead.
    uint32_t e[Tr::kSteps];
#pragma unroll
    for (int step = 0; step < Tr::kSteps; ++step)
      e[step] = Tr::kS8 ? ms[(rb * Tr::kMetaBlocks + step) * 32 + lane]
                        : ms[(rb * Tr::kMetaBlocks + step / 2) * 32 + ((lane & ~3) | (2 * (step & 1)) | (lane & 1))];
    wgmma::fence();
    wgmma::fence_operands(acc);
#pragma unroll
    for (int step = 0; step < Tr::kSteps; ++step) {  // whole stages only (K % kStageK == 0)
      const uint64_t da = wgmma::desc_sw128(vals + wg * 64 * 128 + step * 32);
      const uint64_t db = wgmma::desc_sw128(xs + (step / 2) * (Tr::kBT * 128) + (step % 2) * 64);
      WgmmaSp<T, 0>::run(acc, da, db, e[step]);
    }
    wgmma::commit_group();
    wgmma::fence_operands(acc);
    const int64_t next = kt + kStages - 2;  // refill slot kt - 2 while this stage's MMAs run
    if (next < k_tiles) load_stage<Tr, XOff>(p, smem + (next % kStages) * Tr::kStageBytes, next, w0, t0, tid);
    cp_async_commit();
    wgmma::wait_group<1>();
  }
  wgmma::wait_group<0>();
  wgmma::fence_operands(acc);
  cp_async_wait<0>();

  const int g = lane >> 2, c = lane & 3;
  const int64_t n0 = w0 + wg * 64 + w * 16 + g, m0 = t0 + 2 * c;
  const bool raw = Tr::kS8 && p.a_scale == nullptr;
#pragma unroll
  for (int j = 0; j < 16; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t n = n0 + (i / 2) * 8, m = m0 + 8 * j + (i % 2);
      if (n >= p.N || m >= p.M) continue;
      if (raw)
        static_cast<int32_t*>(p.out)[m * p.N + n] = static_cast<int32_t>(acc[4 * j + i]);
      else
        finish(p, m, n, static_cast<float>(acc[4 * j + i]));
    }
}

template <typename T>
int run_wgmma(const Params& p, cudaStream_t stream) {
  using Tr = HopperM<T>;
  constexpr int kSmem = Tr::kSmemBytes + 1024;  // + slack to align the tiles to 1024
  const int64_t gx = (p.M + Tr::kBT - 1) / Tr::kBT, gy = (p.N + Tr::kBW - 1) / Tr::kBW;
  if (gx > 2147483647LL || gy > 65535) return kErrBadShape;
  if (const int e = opt_in_dynamic_smem<sparse24_wgmma_kernel<Tr>>(kSmem)) return e;
  sparse24_wgmma_kernel<Tr><<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), Tr::kThreads, kSmem,
                              stream>>>(p);
  return launch_status();
}

}  // namespace sparse24
}  // namespace fastllm
