// 2:4 sparse GEMM on sparse tensor cores (mma.sp::ordered_metadata), sm80+.
// UNVERIFIED: compiled for sm_80 and sm_90a (0 spills), never run on a GPU. The metadata layout
// it relies on is proven on CPU by python/fastllm/sparse/mma_sp.py (tests/test_sparse24.py).
//
// Computes out[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) for fp16 / bf16 (fp32 accumulate),
// or for int8 the exact int32 sum, optionally with the int8 epilogue
//     out = (float(acc) * a_scale[m or 0]) * w_scale[n] + bias[n]      (fastllm/ref/int8.py)
// W arrives compressed (python/fastllm/sparse/format.py): values (N, K/2) and meta (N/16, K/2)
// int32, where meta[rb][32 kb + lane] is exactly the metadata register lane `lane` passes to
// mma.sp for rows 16 rb.. and K columns 64 kb.. (m16n8k32: selector 0 for columns 0..31 of the
// block, 1 for 32..63; m16n8k64 s8: selector 0).
//
// Algorithm: W is mma.sp's sparse A operand, x^T the dense B (tokens = the MMA's n8), so a CTA
// owns a kBW x kBT tile of out^T. Each pipeline stage copies, with cp.async (16 B, L2 only),
// the compressed W rows, the x rows and the matching metadata words into shared memory; warps
// read A and B fragments with ldmatrix (a compressed 16 x 32-byte W slice is laid out exactly
// like a dense m16n8k16 A tile; an 8-token x 64-byte slice gives the four B registers) and the
// metadata with one conflict-free 32-bit load per lane. The smem rows are XOR-swizzled by 16-byte
// chunk so that the 8 row addresses of an ldmatrix hit 8 different bank groups.
//
// Split-K (small M, few output tiles: sparse24_traits.h choose_split_k): grid z cuts K into
// slices of whole stages; each writes raw fp32 / int32 partials to a workspace and
// sparse24_splitk_reduce adds them in slice order and applies the epilogue.
//
// Tails: W rows past N are clamped to row N - 1 on load (valid memory, valid metadata -- a
// zero-filled metadata word would be undefined behaviour for mma.sp) and never stored; tokens
// past M are zero-filled; k-slices past K (K % 64 == 0, so only whole slices) are skipped
// with a warp-uniform branch. Needs: N % 16 == 0, K % 64 == 0, x rows / values / meta 16-byte
// aligned (the launcher checks).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "common/common.h"
#include "common/ptx.cuh"
#include "sparse24/sparse24_traits.h"

namespace fastllm {
namespace sparse24 {

struct Params {
  const uint8_t* x;            // (M, K) of T, row stride x_row_bytes
  const uint8_t* values;       // (N, K/2) of T, contiguous
  const uint32_t* meta;        // (N/16, K/2) words, contiguous
  void* out;                   // (M, N) of out_dtype, contiguous
  const void* bias;            // (N,) of bias_dtype, or null
  const float* a_scale;        // (M,) or (1,), null: no epilogue scaling (raw int32 / float out)
  const float* w_scale;        // (N,)
  int64_t M, N, K, x_row_bytes;
  int out_dtype, bias_dtype;
  bool a_scale_per_row;
  // Split-K (pass 1): grid z slice z covers K tiles [z, z + 1) * k_tiles_per_split and, with
  // `partials`, writes its raw accumulators (Acc) to out + z * M * N instead of the epilogue.
  int64_t k_tiles_per_split;
  bool partials;
};

// ---------------------------------------------------------------------------------------------
// PTX wrappers (one instruction each).

// cp.async (zero-filling past the end) and ldmatrix from common/ptx.cuh.
using ptx::cp_async_16;
using ptx::cp_async_commit;
using ptx::cp_async_wait;
using ptx::ldmatrix_x4;
using ptx::smem_u32;

// D += A (16 x 32, 2:4, as 16 x 16 non-zeros) * B (32 x 8); Sel picks the thread pair whose
// metadata is read (0: T0/T1 of each group, 1: T2/T3).
template <typename T, int Sel> struct MmaSp;
template <int Sel> struct MmaSp<__half, Sel> {
  __device__ __forceinline__ static void run(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4],
                                             uint32_t e) {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, %13;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e),
          "n"(Sel));
  }
};
template <int Sel> struct MmaSp<__nv_bfloat16, Sel> {
  __device__ __forceinline__ static void run(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4],
                                             uint32_t e) {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, %13;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e),
          "n"(Sel));
  }
};
// s8: A 16 x 64 (as 16 x 32 non-zeros), B 64 x 8, exact s32 accumulate; selector must be 0.
template <int Sel> struct MmaSp<int8_t, Sel> {
  static_assert(Sel == 0, "m16n8k64 s8: all four threads of a group hold metadata");
  __device__ __forceinline__ static void run(int32_t (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4],
                                             uint32_t e) {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k64.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
  }
};

// ---------------------------------------------------------------------------------------------
// Shared-memory layout of one stage: [W values kBW x 128 B][x kBT x 256 B][meta].
// Swizzle: 16-byte chunk c of row r lives at chunk c ^ (r & 7) (the low 3 bits of c for x's 16).

__device__ __forceinline__ int val_off(int r, int c) { return r * 128 + ((c ^ (r & 7)) << 4); }
__device__ __forceinline__ int x_off(int r, int c) { return r * 256 + (((c & 8) | ((c ^ r) & 7)) << 4); }

// x's layout for the sm80 kernel (above); the Hopper wgmma.sp kernel passes its own (two 128-byte
// column blocks, the canonical 128-byte-swizzled K-major layout wgmma reads).
struct XOffSm80 {
  __device__ __forceinline__ static int off(int r, int c) { return x_off(r, c); }
};

template <class Tr, class XOff = XOffSm80>
__device__ __forceinline__ void load_stage(const Params& p, uint8_t* st, int64_t kt, int64_t w0, int64_t t0,
                                           int tid) {
  constexpr int kElt = sizeof(typename Tr::T);
  const int64_t k0 = kt * Tr::kStageK;
  // Compressed W: kBW rows x 8 chunks; row bytes K/2 * elt.
  const int64_t v_row_bytes = p.K / 2 * kElt;
  const int64_t v_col0 = k0 / 2 * kElt;
  for (int i = tid; i < Tr::kBW * 8; i += Tr::kThreads) {
    const int r = i / 8, c = i % 8;
    const int64_t row = min(w0 + r, p.N - 1);
    const int64_t col = v_col0 + 16 * c;
    const bool ok = col < v_row_bytes;
    cp_async_16(smem_u32(st + val_off(r, c)), p.values + (ok ? row * v_row_bytes + col : 0), ok);
  }
  // x: kBT rows x 16 chunks.
  uint8_t* xs = st + Tr::kValBytes;
  const int64_t x_col0 = k0 * kElt;
  for (int i = tid; i < Tr::kBT * 16; i += Tr::kThreads) {
    const int r = i / 16, c = i % 16;
    const int64_t col = x_col0 + 16 * c;
    const bool ok = t0 + r < p.M && col < p.K * kElt;
    cp_async_16(smem_u32(xs + XOff::off(r, c)), p.x + (ok ? (t0 + r) * p.x_row_bytes + col : 0), ok);
  }
  // meta: (kBW / 16) row blocks x kMetaBlocks blocks x 8 chunks of 4 words.
  uint8_t* ms = xs + Tr::kXBytes;
  const int64_t blocks = p.K / 64, kb0 = k0 / 64, words_per_rb = p.K / 2;
  for (int i = tid; i < (Tr::kBW / 16) * Tr::kMetaBlocks * 8; i += Tr::kThreads) {
    const int b = i / (Tr::kMetaBlocks * 8), j = (i / 8) % Tr::kMetaBlocks, c = i % 8;
    const int64_t rb = min(w0 / 16 + b, p.N / 16 - 1);
    const bool ok = kb0 + j < blocks;
    cp_async_16(smem_u32(ms + (b * Tr::kMetaBlocks + j) * 128 + 16 * c),
                p.meta + (ok ? rb * words_per_rb + (kb0 + j) * 32 + 4 * c : 0), ok);
  }
}

__device__ __forceinline__ float load_bias(const void* bias, int dtype, int64_t n) {
  switch (dtype) {
    case kFloat16: return __half2float(static_cast<const __half*>(bias)[n]);
    case kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(bias)[n]);
    case kFloat32: return static_cast<const float*>(bias)[n];
    default: return 0.f;
  }
}

__device__ __forceinline__ void store_out(void* out, int dtype, int64_t i, float v) {
  switch (dtype) {
    case kFloat16: static_cast<__half*>(out)[i] = __float2half_rn(v); break;
    case kBFloat16: static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(out)[i] = v; break;
  }
}

// out[m, n] from the finished fp32 sum: the int8 epilogue's order, (acc * a_scale) * w_scale +
// bias, all fp32, each operation rounded on its own (_rn intrinsics are never contracted into an
// FMA: the one-pass kernel and the split-K reduce, compiled differently, give the same bits, and
// those of the reference); 16-bit types: acc + bias.
__device__ __forceinline__ void finish(const Params& p, int64_t m, int64_t n, float v) {
  if (p.a_scale != nullptr) v = __fmul_rn(__fmul_rn(v, p.a_scale[p.a_scale_per_row ? m : 0]), p.w_scale[n]);
  const float b = p.bias != nullptr ? load_bias(p.bias, p.bias_dtype, n) : 0.f;
  store_out(p.out, p.out_dtype, m * p.N + n, __fadd_rn(v, b));
}

template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads, 1) sparse24_gemm_kernel(const Params p) {
  using T = typename Tr::T;
  using Acc = typename Tr::Acc;
  extern __shared__ __align__(128) uint8_t smem[];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int warp_w = warp % Tr::kWarpsW, warp_t = warp / Tr::kWarpsW;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * Tr::kBT;   // tokens: grid x (up to 2^31 - 1)
  const int64_t w0 = static_cast<int64_t>(blockIdx.y) * Tr::kBW;   // W rows: grid y
  // This CTA's K tiles: [kt0, kt0 + k_tiles) (all of K unless split; never empty: the launcher
  // sizes the grid so every slice has tiles).
  const int64_t kt0 = static_cast<int64_t>(blockIdx.z) * p.k_tiles_per_split;
  const int64_t k_tiles = min(p.k_tiles_per_split, (p.K + Tr::kStageK - 1) / Tr::kStageK - kt0);
  const int64_t k_slices = p.K / Tr::kColsPerStep;

  Acc acc[Tr::kMTiles][Tr::kNTiles][4];
#pragma unroll
  for (int mi = 0; mi < Tr::kMTiles; ++mi)
#pragma unroll
    for (int ni = 0; ni < Tr::kNTiles; ++ni)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mi][ni][i] = Acc(0);

#pragma unroll
  for (int s = 0; s < Tr::kStages - 1; ++s) {
    if (s < k_tiles) load_stage<Tr>(p, smem + s * Tr::kStageBytes, kt0 + s, w0, t0, tid);
    cp_async_commit();
  }

  for (int64_t it = 0; it < k_tiles; ++it) {
    cp_async_wait<Tr::kStages - 2>();   // stage kt has landed (this thread's copies) ...
    __syncthreads();                    // ... and everyone's; stage kt - 1 is no longer read
    const int64_t next = it + Tr::kStages - 1;
    if (next < k_tiles) load_stage<Tr>(p, smem + (next % Tr::kStages) * Tr::kStageBytes, kt0 + next, w0, t0, tid);
    cp_async_commit();

    const int64_t kt = kt0 + it;   // absolute K tile
    const uint8_t* st = smem + (it % Tr::kStages) * Tr::kStageBytes;
    const uint8_t* xs = st + Tr::kValBytes;
    const uint32_t* ms = reinterpret_cast<const uint32_t*>(xs + Tr::kXBytes);
#pragma unroll
    for (int step = 0; step < Tr::kSteps; ++step) {
      if (kt * Tr::kSteps + step >= k_slices) break;   // K tail: whole slices, warp-uniform
      // 16-bit: two k-slices per metadata block (selector = step % 2); int8: one.
      constexpr int kSlicesPerBlock = Tr::kS8 ? 1 : 2;
      const int blk = step / kSlicesPerBlock;
      uint32_t e[Tr::kMTiles], a[Tr::kMTiles][4], b[Tr::kNTiles][4];
#pragma unroll
      for (int mi = 0; mi < Tr::kMTiles; ++mi) {
        const int rb = (warp_w * Tr::kWarpW) / 16 + mi;
        e[mi] = ms[(rb * Tr::kMetaBlocks + blk) * 32 + lane];
        // Matrix j = lane / 8: rows + 8 (j % 2), bytes + 16 (j / 2) of this slice's 32 bytes.
        const int r = warp_w * Tr::kWarpW + mi * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        ldmatrix_x4(a[mi], smem_u32(st + val_off(r, step * 2 + (lane >> 4))));
      }
#pragma unroll
      for (int ni = 0; ni < Tr::kNTiles; ++ni) {
        // Matrix j = lane / 8: bytes 16 j of this slice's 64 -> B register j (k rows 8j.. / 16j..).
        const int r = warp_t * Tr::kWarpT + ni * 8 + (lane & 7);
        ldmatrix_x4(b[ni], smem_u32(xs + x_off(r, step * 4 + (lane >> 3))));
      }
#pragma unroll
      for (int mi = 0; mi < Tr::kMTiles; ++mi)
#pragma unroll
        for (int ni = 0; ni < Tr::kNTiles; ++ni) {
          if (Tr::kS8 || step % 2 == 0)
            MmaSp<T, 0>::run(acc[mi][ni], a[mi], b[ni], e[mi]);
          else
            MmaSp<T, Tr::kS8 ? 0 : 1>::run(acc[mi][ni], a[mi], b[ni], e[mi]);
        }
    }
  }
  cp_async_wait<0>();  // nothing may be in flight into smem when the CTA exits

  // Epilogue: d[0], d[1] = W row g, tokens 2t, 2t + 1; d[2], d[3] = row g + 8.
  const int g = lane >> 2, t = lane & 3;
  const int64_t n_base = w0 + warp_w * Tr::kWarpW + g, m_base = t0 + warp_t * Tr::kWarpT + 2 * t;
  if (p.partials || (Tr::kS8 && p.a_scale == nullptr)) {   // raw accumulators (split-K slice, or int32 out)
    Acc* out = static_cast<Acc*>(p.out) + static_cast<int64_t>(blockIdx.z) * p.M * p.N;
#pragma unroll
    for (int mi = 0; mi < Tr::kMTiles; ++mi)
#pragma unroll
      for (int ni = 0; ni < Tr::kNTiles; ++ni)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int64_t n = n_base + mi * 16 + (i / 2) * 8, m = m_base + ni * 8 + (i % 2);
          if (n < p.N && m < p.M) out[m * p.N + n] = acc[mi][ni][i];
        }
    return;
  }
#pragma unroll
  for (int mi = 0; mi < Tr::kMTiles; ++mi)
#pragma unroll
    for (int ni = 0; ni < Tr::kNTiles; ++ni)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t n = n_base + mi * 16 + (i / 2) * 8, m = m_base + ni * 8 + (i % 2);
        if (n < p.N && m < p.M) finish(p, m, n, static_cast<float>(acc[mi][ni][i]));
      }
}

// Split-K pass 2: one thread per output element adds the `splits` partials (M * N apart) in
// slice order (deterministic; exact for int32) and applies the epilogue. p: the call's params.
template <typename Acc>
__global__ void __launch_bounds__(256) sparse24_splitk_reduce(const Params p, const Acc* partial, int splits) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t mn = p.M * p.N;
  if (i >= mn) return;
  Acc sum = partial[i];
  for (int z = 1; z < splits; ++z) sum += partial[z * mn + i];
  if (std::is_same<Acc, int32_t>::value && p.a_scale == nullptr) {
    static_cast<int32_t*>(p.out)[i] = static_cast<int32_t>(sum);
    return;
  }
  finish(p, i / p.N, i % p.N, static_cast<float>(sum));
}

// Launch one config (grid, shared-memory opt-in, launch status). Defined here, instantiated per
// dtype in sparse24_gemm_{f16,bf16,s8}.cu.
// With splits > 1 (and a workspace of splits * M * N * 4 bytes): pass 1 into the workspace,
// then the reduce; else one pass straight to p.out.
template <class Tr>
int launch(Params p, int splits, void* workspace, cudaStream_t stream) {
  const int64_t gx = (p.M + Tr::kBT - 1) / Tr::kBT, gy = (p.N + Tr::kBW - 1) / Tr::kBW;
  if (gx > 2147483647LL || gy > 65535) return kErrBadShape;
  const int64_t k_tiles = (p.K + Tr::kStageK - 1) / Tr::kStageK;
  p.k_tiles_per_split = (k_tiles + splits - 1) / splits;
  const int gz = static_cast<int>((k_tiles + p.k_tiles_per_split - 1) / p.k_tiles_per_split);  // no empty slice
  Params pass1 = p;
  if (gz > 1) {
    pass1.out = workspace;
    pass1.partials = true;
  }
  auto kernel = sparse24_gemm_kernel<Tr>;
  if (const int e = opt_in_dynamic_smem<sparse24_gemm_kernel<Tr>>(Tr::kSmemBytes)) return e;
  kernel<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), gz), Tr::kThreads, Tr::kSmemBytes, stream>>>(
      pass1);
  const int st = launch_status();
  if (st != 0 || gz == 1) return st;
  const int64_t blocks = (p.M * p.N + 255) / 256;
  if (blocks > 2147483647LL) return kErrBadShape;
  using Acc = typename Tr::Acc;
  sparse24_splitk_reduce<Acc><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
      p, static_cast<const Acc*>(workspace), gz);
  return launch_status();
}

// Launches the config choose_config (sparse24_traits.h) picks for this call and device, split
// over K when choose_split_k says so and the caller gave a big enough workspace.
template <typename T>
int run(const Params& p, int num_sms, int smem_optin, void* workspace, int64_t workspace_bytes,
        cudaStream_t stream) {
  const int config = choose_config<T>(p.M, p.N, num_sms, smem_optin);
  int splits = choose_split_k<T>(config, p.M, p.N, p.K, num_sms);
  if (workspace == nullptr || workspace_bytes < int64_t{splits} * p.M * p.N * 4) splits = 1;
  switch (config) {
    case 0: return launch<NarrowM<T>>(p, splits, workspace, stream);
    case 2: return launch<LargeM<T>>(p, 1, nullptr, stream);
    default:
      if (SmallM<T>::kSmemBytes > smem_optin) return kErrUnsupportedArch;
      return launch<SmallM<T>>(p, splits, workspace, stream);
  }
}

}  // namespace sparse24
}  // namespace fastllm
