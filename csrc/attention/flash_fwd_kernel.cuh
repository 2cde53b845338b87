// Prefill flash attention, forward (FlashAttention-2 algorithm), sm80+ (mma.sync).
//
// Computes, per batch b and query head h (kv head h / group, GQA/MQA without copies):
//   s[i, j]  = scale * <q_i, k_j>                      fp16/bf16 inputs, fp32 accumulation
//   s        = softcap * tanh(s / softcap)             if softcap
//   s        = max(s + bias[b, h, i, j], -2^126)       if bias (-inf stays -inf: masks the key)
//   allowed  = j < Skv & mask[b, i, j] & (j <= p_i if causal) & (j > p_i - W if window W)
//              with p_i = i + Skv - Sq (bottom-right aligned causal)
//   lse[i]   = log (sum_{allowed j} exp(s[i, j]) + exp(z_h))   (-inf if nothing is allowed and
//              there is no sink; z_h = sinks[h], the attention sink, or -inf without sinks)
//   out[i]   = sum_{allowed j} exp(s[i, j] - lse[i]) v_j   (0 if nothing is allowed)
// out is (B, Sq, Hq, D) contiguous, lse (B, Hq, Sq) fp32; varlen (packed sequences, see
// flash_params.h) is the same kernel reading per-sequence offsets. The reference is
// python/fastllm/ref/attention.py.
//
// Algorithm (one CTA = kBlockM query rows of one (b, h); one warp = 16 of those rows):
//   1. cp.async the Q tile and the first K/V tile into swizzled shared memory; Q is then read
//      into registers with ldmatrix once (mma A fragments) and stays there.
//   2. Walk the key tiles that can be visible to this CTA's rows, from the last one down to
//      the first (causal/window tiles outside that range, and with a mask the tiles wholly
//      before the first / after the last key any of the rows attends, common/mask_range.cuh,
//      are skipped by the loop bounds, never loaded or computed). While tile n computes, tile n-1 is in flight (cp.async double buffer).
//      S = Q K^T with mma.m16n8k16 (K fragments by ldmatrix), then mask (only tiles that cross
//      the sequence end, the causal diagonal or the window edge, or when a mask tensor is
//      given: a CTA-uniform branch), then the online softmax in registers: running row max m
//      and row sum l, exp2 with scale * log2(e) folded into one FMA, O rescaled by
//      2^(m_old - m_new). P (fp32 -> fp16/bf16) is reused in registers as the A operand of
//      O += P V, V fragments by ldmatrix.trans.
//      With a bias, S is moved into the log2 domain right after Q K^T (bias loads per element:
//      biases are small tables or broadcast views, read through L1/L2 like the mask).
//   3. A sink joins l (and m), O / l is staged through shared memory (the Q tile's space) and
//      written with 16-byte coalesced stores; lse = (m + log2 l) * ln 2.
// Tile sizes per head dim: flash_traits.h. Instantiations: flash_fwd_hdim*_{fp16,bf16}.cu.
// Launcher (argument checks, dispatch by arch/dtype/head dim): flash_fwd_launcher.cu.
//
// Run it: python -c "import torch, fastllm; q = torch.randn(1, 8, 1025, 128, device='cuda',
//   dtype=torch.half); print(fastllm.ops.flash_attention(q, q, q, causal=True, backend='cuda'))"
// Test: pytest tests/test_attention_cuda.py (GPU); memcheck: compute-sanitizer --tool memcheck
//   python bench/sanitize_cases.py flash_attention.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#include "attention/flash_params.h"
#include "attention/flash_ptx.cuh"
#include "attention/flash_traits.h"
#include "common/common.h"
#include "common/mask_range.cuh"

namespace fastllm {
namespace attention {

constexpr float kLn2 = 0.69314718055994531f;
constexpr float kLog2eF = 1.44269504088896341f;
// Floor of finite biased scores (fastllm/ref/attention.py SCORE_FLOOR): the dtype minimum that
// transformers writes for "masked" would overflow to -inf times log2(e), and a row of nothing but
// such keys must average them uniformly, as eager attention does.
constexpr float kScoreFloor = -8.5070591730234616e37f;  // -2^126

// Shared-memory tile of kRows rows x kChunks 16-byte chunks, XOR-swizzled so that the 8 row
// addresses of one ldmatrix 8x8 matrix (8 consecutive rows, same logical chunk) fall in 8
// different 16-byte bank groups (no bank conflicts), for any head dim that is a multiple of 16.
//
// The row is cut into column blocks of kGroup chunks (8 when kChunks allows, else 4 (D=96),
// else 2 (D=80)); block-major storage, so a block row is kGroup * 16 bytes and 8 / kGroup
// consecutive rows fill one 128-byte bank line. Inside a block, chunk c of row r is stored at
// c ^ ((r / (8 / kGroup)) % kGroup). Rows r = 0..7 then cover every (row-in-line, xor) pair once,
// so the 8 chunks land in 8 distinct bank groups. The fragment writes of the O epilogue
// (rows g = 0..7, 4-byte columns) are conflict-free by the same argument.
template <int kRows, int kChunks>
struct SmemTile {
  static constexpr int kGroup = kChunks % 8 == 0 ? 8 : (kChunks % 4 == 0 ? 4 : 2);
  static constexpr int kRowsPerPhase = 8 / kGroup;
  static constexpr int kRowBytes = kGroup * 16;  // one row of one column block
  static_assert(kChunks % kGroup == 0 && kRows % 8 == 0, "bad smem tile shape");

  // Element offset of (row, chunk): cp.async fills and the O epilogue.
  __device__ static __forceinline__ int offset(int row, int chunk) {
    const int phys = (chunk % kGroup) ^ ((row / kRowsPerPhase) % kGroup);
    return ((chunk / kGroup) * kRows + row) * (kGroup * 8) + phys * 8;
  }
  // ldmatrix addressing, split so the per-lane part is computed once: the address of
  // (row0 + r, chunk0 + cl) for row0 % 8 == 0, chunk0 even, cl in {0, 1} is
  //   lane_base + block_part(row0, chunk0) + ((chunk0 % kGroup) ^ lane_xor) * 16
  // because row0 does not change the xor term and chunk0 (even) does not overlap cl's bit.
  __device__ static __forceinline__ uint32_t lane_base(int r) { return r * kRowBytes; }
  __device__ static __forceinline__ int lane_xor(int r, int cl) { return cl ^ ((r / kRowsPerPhase) % kGroup); }
  __device__ static __forceinline__ uint32_t addr(uint32_t tile_lane_base, int lane_x, int row0, int chunk0) {
    return tile_lane_base + ((chunk0 / kGroup) * kRows + row0) * kRowBytes +
           (((chunk0 % kGroup) ^ lane_x) << 4);
  }

  // Conflict-free cp.async fills: 16-byte shared stores go in phases of 8 lanes, and a phase is
  // served in one wavefront when its 8 chunks lie in 8 different 16-byte bank groups.
  // fill_row<kTPR>(q): the row that row slot q (= tid / kTPR) fills when kTPR threads share a row
  // and each instruction takes kTPR consecutive chunks of it (cb + k kTPR). A phase holds 8 / kTPR
  // slots; taken in order they would be rows whose swizzle xor agrees above the kTPR chunks (2-way
  // conflicts), so inside each 8-row group the slots of a phase get rows that differ in their
  // place in the 128-byte line (r % kRowsPerPhase) or in that xor ((r / kRowsPerPhase) / kTPR).
  // The rows a warp instruction reads from global memory stay the same (whole 8-row groups).
  template <int kTPR>
  __device__ static __forceinline__ int fill_row(int q) {
    if constexpr (kTPR > kGroup || 8 % kTPR != 0) {
      return q;  // no tile config here: kTPR chunks would span column blocks
    } else {
      constexpr int kSlots = 8 / kTPR;
      const int j = q % 8, phase = j / kSlots, w = j % kSlots;
      return q - j + w % kRowsPerPhase + kRowsPerPhase * (phase + kTPR * (w / kRowsPerPhase));
    }
  }
  // Flattened fills: (row, chunk) of the i-th 16-byte chunk in storage order (column block, row,
  // chunk in block), so consecutive lanes fill consecutive slots of one 128-byte line (the
  // row-major order puts a row's column blocks, kRows * kRowBytes apart, in one phase); a warp
  // still reads whole 32-byte sectors (kGroup >= 2 chunks of each row).
  __device__ static __forceinline__ int storage_row(int i) { return i / kGroup % kRows; }
  __device__ static __forceinline__ int storage_chunk(int i) { return i / (kGroup * kRows) * kGroup + i % kGroup; }
};

// cp.async a kRows x (kChunks * 8) tile from global (row stride `row_stride` elements, unit
// stride inside a row) into a swizzled tile; rows >= rows_valid are zero-filled (so padded
// keys give finite scores and padded V rows contribute 0, never NaN).
// Work split: when the shape allows, each thread owns one row and takes every kTPR-th chunk of
// it (kTPR threads per row), so its global addresses are one pointer plus compile-time
// offsets (few registers: the K/V prefetch runs inside the register-tight main loop); a warp
// instruction still reads kTPR consecutive 16-byte chunks of 32 / kTPR rows (whole sectors).
// Otherwise (D=80 K/V tiles) consecutive threads take consecutive chunks of the tile in storage
// order. Both are free of shared-memory bank conflicts (SmemTile::fill_row / storage_row;
// tests/test_simt_bank_conflicts.py counts them).
template <int kRows, int kChunks, int kThreads, typename T>
__device__ __forceinline__ void load_tile_async(uint32_t smem_base, const T* gmem, int64_t row_stride,
                                                int rows_valid, int tid) {
  using Tile = SmemTile<kRows, kChunks>;
  constexpr int kTPR = kThreads / kRows;  // threads per row in the row-owned split
  if constexpr (kThreads % kRows == 0 && kChunks % kTPR == 0) {
    const int row = Tile::template fill_row<kTPR>(tid / kTPR), cb = tid % kTPR;
    const bool valid = row < rows_valid;
    const T* src = valid ? gmem + row * row_stride + cb * 8 : gmem;
#pragma unroll
    for (int k = 0; k < kChunks / kTPR; ++k)
      cp_async_16(smem_base + Tile::offset(row, cb + k * kTPR) * 2, valid ? src + k * kTPR * 8 : src, valid);
  } else {
    constexpr int kTotal = kRows * kChunks;
#pragma unroll
    for (int i0 = 0; i0 < kTotal; i0 += kThreads) {
      const int i = i0 + tid;
      if (kTotal % kThreads == 0 || i < kTotal) {
        const int row = Tile::storage_row(i), chunk = Tile::storage_chunk(i);
        const bool valid = row < rows_valid;
        const T* src = valid ? gmem + row * row_stride + chunk * 8 : gmem;
        cp_async_16(smem_base + Tile::offset(row, chunk) * 2, src, valid);
      }
    }
  }
}

// P (the exponentiated S, fp32) of key step ks (keys 16ks..16ks+15) as the 16-bit A operand of
// P V: the S accumulator layout of n-tiles 2ks, 2ks+1 is exactly the m16n8k16 A fragment (and
// wgmma's A register fragment): a[0] = (g, keys 2c4..), a[1] = (g+8, 2c4..), a[2] = (g,
// 8+2c4..), a[3] = (g+8, 8+2c4..).
template <typename T, int kNT>
__device__ __forceinline__ void p_fragment(uint32_t (&a)[4], const float (&s)[kNT][4], int ks) {
  a[0] = pack2<T>(s[2 * ks][0], s[2 * ks][1]);
  a[1] = pack2<T>(s[2 * ks][2], s[2 * ks][3]);
  a[2] = pack2<T>(s[2 * ks + 1][0], s[2 * ks + 1][1]);
  a[3] = pack2<T>(s[2 * ks + 1][2], s[2 * ks + 1][3]);
}

// The tensor-core part of the kernel for sm80+ (mma.sync m16n8k16 + ldmatrix): S = Q K^T and
// O += P V for one warp's 16 query rows. The skeleton below (flash_fwd_kernel) owns loads,
// masking, the online softmax and the epilogue; flash_fwd_wgmma.cuh is the Hopper policy.
// Per-lane ldmatrix address parts (see SmemTile::addr):
//   Q (A operand, x4): lane l addresses row l % 16, chunk l / 16 of the warp's 16 x 16 block:
//     matrices = rows 0-7/k 0-7, rows 8-15/k 0-7, rows 0-7/k 8-15, rows 8-15/k 8-15 = a[0..3].
//   K (B operand of Q K^T, x4, not transposed: K rows are the mma's n, D its k): lane l
//     addresses key (l / 16) * 8 + l % 8, chunk (l / 8) % 2: matrices = keys 0-7/k 0-7,
//     keys 0-7/k 8-15, keys 8-15/k 0-7, keys 8-15/k 8-15 = b0, b1 of n-tile 0, b0, b1 of
//     n-tile 1.
//   V (B operand of P V, x4.trans: V rows are the mma's k, D its n): lane l addresses key
//     l % 16, chunk l / 16: matrices = keys 0-7/d 0-7, keys 8-15/d 0-7, keys 0-7/d 8-15,
//     keys 8-15/d 8-15 = b0, b1 of d-tile 0, b0, b1 of d-tile 1.
template <typename Traits_, typename T_>
struct Sm80Mma {
  using Traits = Traits_;
  using T = T_;
  static constexpr int kD = Traits::kHeadDim, kBM = Traits::kBlockM, kBN = Traits::kBlockN;
  static constexpr int kNT = kBN / 8, kDT = kD / 8, kKS = kD / 16;
  using QTile = SmemTile<kBM, Traits::kChunks>;
  using KVTile = SmemTile<kBN, Traits::kChunks>;

  uint32_t q_frag[Traits::kQInRegs ? kKS : 1][4];
  uint32_t q_lane, k_lane, v_lane;
  int q_x, k_x, v_x, warp;

  __device__ __forceinline__ Sm80Mma(uint32_t sQ, uint32_t sK, uint32_t sV, int warp_, int lane) : warp(warp_) {
    const int q_r = lane % 16, q_cl = lane / 16;
    q_lane = sQ + QTile::lane_base(q_r);
    q_x = QTile::lane_xor(q_r, q_cl);
    const int k_r = (lane / 16) * 8 + lane % 8, k_cl = (lane / 8) % 2;
    k_lane = sK + KVTile::lane_base(k_r);
    k_x = KVTile::lane_xor(k_r, k_cl);
    v_lane = sV + KVTile::lane_base(q_r);
    v_x = KVTile::lane_xor(q_r, q_cl);
  }
  // Copies into shared memory have landed (this thread's; a barrier follows): nothing to do for
  // ldmatrix, which reads through the generic proxy.
  __device__ static __forceinline__ void copies_landed() {}
  // The Q tile is in shared memory (after the barrier): Q fragments into registers, once.
  __device__ __forceinline__ void q_ready() {
    if constexpr (Traits::kQInRegs) {
#pragma unroll
      for (int kk = 0; kk < kKS; ++kk) ldmatrix_x4(q_frag[kk], QTile::addr(q_lane, q_x, warp * 16, kk * 2));
    }
  }
  // S = Q K^T: 16 x kBN per warp, fp32, from the K tile at byte offset `stage` of the K buffers.
  __device__ __forceinline__ void qk(float (&s)[kNT][4], uint32_t stage) {
#pragma unroll
    for (int i = 0; i < kNT; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
    const uint32_t k_stage = k_lane + stage;
#pragma unroll
    for (int kk = 0; kk < kKS; ++kk) {
      uint32_t a[4];
      if constexpr (Traits::kQInRegs) {
        a[0] = q_frag[kk][0], a[1] = q_frag[kk][1], a[2] = q_frag[kk][2], a[3] = q_frag[kk][3];
      } else {
        ldmatrix_x4(a, QTile::addr(q_lane, q_x, warp * 16, kk * 2));
      }
#pragma unroll
      for (int np = 0; np < kBN / 16; ++np) {
        uint32_t b[4];
        ldmatrix_x4(b, KVTile::addr(k_stage, k_x, np * 16, kk * 2));
        mma_16816<T>(s[2 * np], a, b[0], b[1]);
        mma_16816<T>(s[2 * np + 1], a, b[2], b[3]);
      }
    }
  }
  // O += P V with P = the exponentiated S (p_fragment), V from the tile at byte offset `stage`.
  __device__ __forceinline__ void pv(float (&o)[kDT][4], const float (&s)[kNT][4], uint32_t stage) {
    const uint32_t v_stage = v_lane + stage;
#pragma unroll
    for (int ks = 0; ks < kBN / 16; ++ks) {
      uint32_t a[4];
      p_fragment<T>(a, s, ks);
#pragma unroll
      for (int dp = 0; dp < kD / 16; ++dp) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, KVTile::addr(v_stage, v_x, ks * 16, dp * 2));
        mma_16816<T>(o[2 * dp], a, b[0], b[1]);
        mma_16816<T>(o[2 * dp + 1], a, b[2], b[3]);
      }
    }
  }
};

// Attention sink (gpt-oss): one more score z without a value (log2 domain; -inf: none) joined
// to a row's final softmax state, m (log2-domain max, -inf: no key) and l (sum of 2^(s - m)).
// Returns the factor the row's O accumulator takes (1 unless the sink is the new max). A row
// with no key but a sink ends with m = z, l = 1: lse = z, out = 0.
__device__ __forceinline__ float fold_sink(float& m, float& l, float z) {
  if (z > m) {
    const float alpha = exp2f(m - z);  // 0 when m = -inf
    l = fmaf(l, alpha, 1.f);
    m = z;
    return alpha;
  }
  if (z != -INFINITY) l += exp2f(z - m);
  return 1.f;
}

// Additive score bias, per element type B of the bias: s (this thread's scores in natural units;
// accumulator layout: s[nt][2r + j] is row row0 + 8r, key col0 + 8nt + j) becomes the log2-domain
// s + bias, finite sums floored at kScoreFloor. The bias is read for rows < Sq and keys < Skv only
// (other positions are never stored, or masked later).
template <typename B, int kNT>
__device__ __forceinline__ void add_bias_log2(float (&s)[kNT][4], const FlashFwdParams& p, int batch, int head,
                                              int row0, int col0, int Sq, int Skv) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + 8 * r;
    const B* brow = static_cast<const B*>(p.bias) + batch * p.bias_batch_stride + head * p.bias_head_stride +
                    row * p.bias_row_stride;
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int col = col0 + nt * 8 + j;
        float x = s[nt][2 * r + j];
        if (row < Sq && col < Skv) x += static_cast<float>(brow[col * p.bias_col_stride]);
        s[nt][2 * r + j] = (x == -INFINITY ? x : fmaxf(x, kScoreFloor)) * kLog2eF;
      }
    }
  }
}

// Raw q.k -> log2-domain scores of softcap(scale q.k) + bias (the bias is in natural units, so
// the scores are formed there first).
template <int kNT>
__device__ __forceinline__ void bias_scores(float (&s)[kNT][4], const FlashFwdParams& p, int batch, int head,
                                            int row0, int col0, int Sq, int Skv) {
  const float sc = p.has_softcap ? p.softcap_in : p.scale;
#pragma unroll
  for (int i = 0; i < kNT; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[i][e] = p.has_softcap ? tanhf(s[i][e] * sc) * p.softcap : s[i][e] * sc;
  switch (p.bias_dtype) {
    case kFloat16: add_bias_log2<__half>(s, p, batch, head, row0, col0, Sq, Skv); break;
    case kBFloat16: add_bias_log2<__nv_bfloat16>(s, p, batch, head, row0, col0, Sq, Skv); break;
    default: add_bias_log2<float>(s, p, batch, head, row0, col0, Sq, Skv);
  }
}

// The kernel skeleton: everything but the two matrix products, which the policy `Mma` computes
// (Sm80Mma above; Sm90Mma in flash_fwd_wgmma.cuh). Both policies hold a warp's S and O in the
// mma.sync m16n8 accumulator layout, so masking, softmax and the epilogue are shared.
// kBias: the kernel with the additive score bias path (a separate instantiation, so the bias
// loads cost the plain kernel no registers).
template <typename Mma, bool kBias>
__global__ void __launch_bounds__(Mma::Traits::kThreads, Mma::Traits::kMinBlocksPerSM)
    flash_fwd_kernel(const FlashFwdParams p) {
  using Traits = typename Mma::Traits;
  using T = typename Mma::T;
  constexpr int kD = Traits::kHeadDim;
  constexpr int kBM = Traits::kBlockM;
  constexpr int kBN = Traits::kBlockN;
  constexpr int kThreads = Traits::kThreads;
  constexpr int kChunks = Traits::kChunks;
  constexpr int kNT = kBN / 8;   // 8-key n-tiles of S per warp
  constexpr int kDT = kD / 8;    // 8-dim n-tiles of O per warp
  constexpr uint32_t kKVStageBytes = Traits::kSmemKVElems * 2;
  using QTile = SmemTile<kBM, kChunks>;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  // wgmma's swizzle is a function of address bits 4-9: its tiles start 1024-byte aligned.
  constexpr uint32_t kAlign = Traits::kSmemAlign;
  unsigned char* smem = smem_raw;
  if constexpr (kAlign > 128) smem += (kAlign - smem_u32(smem_raw) % kAlign) % kAlign;
  T* sQ = reinterpret_cast<T*>(smem);  // Q tile, later the O staging tile
  const uint32_t sQ_u32 = smem_u32(smem);
  const uint32_t sK_u32 = sQ_u32 + Traits::kSmemQElems * 2;             // kStages K tiles
  const uint32_t sV_u32 = sK_u32 + Traits::kStages * kKVStageBytes;     // kStages V tiles

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, c4 = lane % 4;  // mma fragment row group / column pair
  // Reverse order: with causal masking the last query blocks see the most keys; start them
  // first so the long tail of the grid is the short blocks.
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int head = blockIdx.y, batch = blockIdx.z;
  const int kv_head = head / p.group;
  int Sq = p.seqlen_q, Skv = p.seqlen_kv;
  int q_start = 0, k_start = 0;  // varlen: this sequence's first row in the packed tensors
  if (p.cu_seqlens_q != nullptr) {  // offsets clamped into the packed tensors (flash_params.h)
    q_start = min(max(p.cu_seqlens_q[batch], 0), p.total_q);
    Sq = min(max(p.cu_seqlens_q[batch + 1], q_start), p.total_q) - q_start;
    k_start = min(max(p.cu_seqlens_k[batch], 0), p.total_kv);
    Skv = min(max(p.cu_seqlens_k[batch + 1], k_start), p.total_kv) - k_start;
  }
  const int offset = Skv - Sq;  // absolute position of query i is i + offset
  const int m0 = m_block * kBM;
  if (m0 >= Sq) return;  // varlen: a shorter sequence than the grid's maximum (CTA-uniform)

  // Output addresses, computed where they are used (early exit, epilogue) rather than kept live
  // across the main loop: the D=256 config sits at the register cap.
  auto out_ptr = [&]() {
    return static_cast<T*>(p.out) + batch * p.out_batch_stride + ((int64_t)q_start * p.heads_q + head) * kD;
  };
  auto lse_ptr = [&]() { return p.lse + batch * p.lse_batch_stride + head * p.lse_head_stride + q_start; };
  const int64_t out_row_stride = (int64_t)p.heads_q * kD;

  // Keys any row of this CTA can see: [n_lo, n_hi).
  const int row_last = min(m0 + kBM, Sq) - 1;
  int n_lo = 0, n_hi = Skv;
  if (p.causal) n_hi = min(Skv, row_last + offset + 1);
  if (p.window > 0) n_lo = max(0, m0 + offset - p.window + 1);
  if (p.mask != nullptr) {  // and only keys some row of this CTA attends (one pass over its mask rows)
    const int2 r = mask_key_range<kThreads>(p.mask + batch * p.mask_batch_stride + (int64_t)m0 * p.mask_row_stride,
                                            p.mask_row_stride, p.mask_col_stride, row_last - m0 + 1, Skv,
                                            reinterpret_cast<int*>(smem));
    n_lo = max(n_lo, r.x);
    n_hi = min(n_hi, r.y);
  }
  if (n_hi <= n_lo) {  // no row of this CTA sees any key: out = 0, lse = -inf
    T* out_base = out_ptr();
    float* lse_base = lse_ptr();
    for (int i = tid; i < kBM * kChunks; i += kThreads) {
      const int r = i / kChunks, c = i % kChunks;
      if (m0 + r < Sq)
        *reinterpret_cast<uint4*>(out_base + (m0 + r) * out_row_stride + c * 8) = make_uint4(0, 0, 0, 0);
    }
    const float lse_empty = p.sinks != nullptr ? p.sinks[head] : -INFINITY;  // a sink alone: lse = z
    for (int r = tid; r < kBM; r += kThreads)
      if (m0 + r < Sq) lse_base[m0 + r] = lse_empty;
    return;
  }
  const int nb_first = n_lo / kBN;                 // lowest key tile
  const int nb_last = (n_hi + kBN - 1) / kBN - 1;  // highest key tile (processed first)
  const int n_tiles = nb_last - nb_first + 1;

  const T* gQ = static_cast<const T*>(p.q) + batch * p.q_batch_stride + head * p.q_head_stride +
                (int64_t)(q_start + m0) * p.q_row_stride;
  const T* gK = static_cast<const T*>(p.k) + batch * p.k_batch_stride + kv_head * p.k_head_stride +
                (int64_t)k_start * p.k_row_stride;
  const T* gV = static_cast<const T*>(p.v) + batch * p.v_batch_stride + kv_head * p.v_head_stride +
                (int64_t)k_start * p.v_row_stride;

  // Prologue: group 0 = Q, group 1 = K/V of the first (highest) key tile, into stage 0.
  load_tile_async<kBM, kChunks, kThreads>(sQ_u32, gQ, p.q_row_stride, Sq - m0, tid);
  cp_async_commit();
  load_tile_async<kBN, kChunks, kThreads>(sK_u32, gK + nb_last * kBN * p.k_row_stride, p.k_row_stride,
                                          Skv - nb_last * kBN, tid);
  load_tile_async<kBN, kChunks, kThreads>(sV_u32, gV + nb_last * kBN * p.v_row_stride, p.v_row_stride,
                                          Skv - nb_last * kBN, tid);
  cp_async_commit();

  Mma mma(sQ_u32, sK_u32, sV_u32, warp, lane);
  // Q: wait for group 0 only (the first K/V tile may still be in flight).
  cp_async_wait<1>();
  Mma::copies_landed();
  __syncthreads();
  mma.q_ready();

  // Each thread owns rows g and g + 8 of its warp's 16 (index r = 0, 1 below); a row's state
  // is replicated in the 4 threads of its quad.
  float acc_o[kDT][4];
#pragma unroll
  for (int i = 0; i < kDT; ++i) acc_o[i][0] = acc_o[i][1] = acc_o[i][2] = acc_o[i][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};  // running max, in the units of s below
  float row_sum[2] = {0.f, 0.f};              // this thread's partial sum (quad-reduced at the end)
  // Multiplier from s to log2-domain scores. With softcap or bias, s is transformed in place into
  // the log2 domain, so the multiplier is 1. scale > 0 (launcher-checked) keeps max(s) = max(mult*s).
  const float mult = p.has_softcap || kBias ? 1.f : p.scale_log2;
  const int warp_row0 = m0 + warp * 16;  // first query row of this warp

  for (int it = 0; it < n_tiles; ++it) {
    const int nb = nb_last - it;
    const int stage = it & 1;
    if (it + 1 < n_tiles) {  // prefetch the next (lower) key tile into the other stage
      const int nn = nb - 1;
      const uint32_t st = (stage ^ 1) * kKVStageBytes;
      load_tile_async<kBN, kChunks, kThreads>(sK_u32 + st, gK + nn * kBN * p.k_row_stride, p.k_row_stride,
                                              Skv - nn * kBN, tid);
      load_tile_async<kBN, kChunks, kThreads>(sV_u32 + st, gV + nn * kBN * p.v_row_stride, p.v_row_stride,
                                              Skv - nn * kBN, tid);
      cp_async_commit();
      cp_async_wait<1>();  // this tile's group has landed; the prefetch stays in flight
    } else {
      cp_async_wait<0>();
    }
    Mma::copies_landed();
    __syncthreads();

    // ---- S = Q K^T: 16 x kBN per warp, fp32.
    float s[kNT][4];
    mma.qk(s, stage * kKVStageBytes);

    const int n0 = nb * kBN;
    // ---- bias, or softcap alone: s <- tanh(s * scale / cap) * cap * log2(e) (log2 domain, so mult = 1).
    if constexpr (kBias) {
      bias_scores(s, p, batch, head, warp_row0 + g, n0 + 2 * c4, Sq, Skv);
    } else if (p.has_softcap) {
#pragma unroll
      for (int i = 0; i < kNT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[i][e] = tanhf(s[i][e] * p.softcap_in) * p.softcap_out;
    }

    // ---- masking, only for tiles that need it (the condition is uniform over the CTA).
    // s[nt][2r + j] is row warp_row0 + g + 8r, key n0 + nt * 8 + 2 * c4 + j.
    const bool need_mask = p.mask != nullptr || n0 + kBN > Skv ||
                           (p.causal && n0 + kBN - 1 > m0 + offset) ||
                           (p.window > 0 && n0 <= m0 + kBM - 1 + offset - p.window);
    if (need_mask) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = warp_row0 + g + 8 * r;
        const int pos = row + offset;
        const uint8_t* mrow = nullptr;
        if (p.mask != nullptr && row < Sq) mrow = p.mask + batch * p.mask_batch_stride + row * p.mask_row_stride;
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const int col = n0 + nt * 8 + 2 * c4 + j;
            bool ok = col < Skv;
            if (p.causal) ok = ok && col <= pos;
            if (p.window > 0) ok = ok && col > pos - p.window;
            if (p.mask != nullptr) ok = ok && mrow != nullptr && mrow[col * p.mask_col_stride] != 0;
            if (!ok) s[nt][2 * r + j] = -INFINITY;
          }
        }
      }
    }

    // ---- online softmax (per row: max over the quad, rescale, exponentiate, partial sums).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = row_max[r];
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      // A row with nothing allowed so far keeps max -inf; subtracting 0 then keeps every
      // exp2(-inf) = 0 and avoids (-inf) - (-inf) = NaN.
      const float m_scaled = mx == -INFINITY ? 0.f : mx * mult;
      const float corr = exp2_approx(row_max[r] * mult - m_scaled);  // 0 when the old max was -inf
      row_max[r] = mx;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const float e = exp2_approx(fmaf(s[nt][2 * r + j], mult, -m_scaled));
          s[nt][2 * r + j] = e;
          sum += e;
        }
      }
      row_sum[r] = row_sum[r] * corr + sum;
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        acc_o[dt][2 * r] *= corr;
        acc_o[dt][2 * r + 1] *= corr;
      }
    }

    // ---- O += P V.
    mma.pv(acc_o, s, stage * kKVStageBytes);
    __syncthreads();  // every warp is done with this stage before the next prefetch overwrites it
  }

  // ---- epilogue: l over the quad, the sink, lse, O / l staged in smem (own 16 rows of the Q
  // tile, which only this warp ever read), then 16-byte coalesced stores.
  T* out_base = out_ptr();
  float* lse_base = lse_ptr();
  const float z_nat = p.sinks != nullptr ? p.sinks[head] : -INFINITY;  // the sink (-inf: none)
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = row_sum[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const bool any_key = l > 0.f;
    float m = any_key ? row_max[r] * mult : -INFINITY;
    const float alpha = fold_sink(m, l, z_nat * kLog2eF);
    inv[r] = any_key ? alpha / l : 0.f;
    const float lse = any_key ? (m + log2f(l)) * kLn2 : z_nat;  // no key: the sink alone, exactly
    const int row = warp_row0 + g + 8 * r;
    if (c4 == 0 && row < Sq) lse_base[row] = lse;
  }
#pragma unroll
  for (int dt = 0; dt < kDT; ++dt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp * 16 + g + 8 * r;
      *reinterpret_cast<uint32_t*>(sQ + QTile::offset(row, dt) + 2 * c4) =
          pack2<T>(acc_o[dt][2 * r] * inv[r], acc_o[dt][2 * r + 1] * inv[r]);
    }
  }
  __syncwarp();
  // Read-back in the staging tile's storage order (column block, row, chunk in the block): the
  // 8 lanes of one 16-byte shared-load phase then read one 128-byte line, 8 distinct bank
  // groups, for every kGroup (row order would conflict 2-way at D=96, 4-way at D=80); each row
  // still gets >= 32 contiguous bytes per store phase (whole sectors).
  constexpr int kG = QTile::kGroup;
#pragma unroll
  for (int i = lane; i < 16 * kChunks; i += 32) {
    const int r = (i / kG) % 16, c = (i / (16 * kG)) * kG + i % kG;
    const int row = warp_row0 + r;
    if (row < Sq)
      *reinterpret_cast<uint4*>(out_base + row * out_row_stride + c * 8) =
          *reinterpret_cast<const uint4*>(sQ + QTile::offset(warp * 16 + r, c));
  }
}

// Launch the skeleton with policy Mma (one CTA per kBlockM query rows of one (head, batch)).
template <typename Mma, bool kBias>
int launch_flash_fwd(const FlashFwdParams& p, cudaStream_t stream) {
  using Traits = typename Mma::Traits;
  constexpr int kSmem = Traits::kSmemBytes;
  if (const int e = opt_in_dynamic_smem<flash_fwd_kernel<Mma, kBias>>(kSmem)) return e;
  const dim3 grid((p.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM, p.heads_q, p.batch);
  flash_fwd_kernel<Mma, kBias><<<grid, Traits::kThreads, kSmem, stream>>>(p);
  return launch_status();
}

// The plain kernel on tile Traits, or for a call with a bias the bias kernel on tile BiasTraits
// (flash_traits.h; kBias false there: no bias kernel, the Python glue declines those calls).
template <template <typename, typename> class Mma, typename Traits, typename BiasTraits, typename T>
int launch_plain_or_bias(const FlashFwdParams& p, cudaStream_t stream) {
  if (p.bias == nullptr) return launch_flash_fwd<Mma<Traits, T>, false>(p, stream);
  if constexpr (BiasTraits::kBias) {
    return launch_flash_fwd<Mma<BiasTraits, T>, true>(p, stream);
  } else {
    return kErrBadShape;
  }
}

// Launch for element type T and head dim D (explicitly instantiated once per .cu file).
template <typename T, int D>
int run_flash_fwd_sm80(const FlashFwdParams& p, cudaStream_t stream) {
  return launch_plain_or_bias<Sm80Mma, FlashFwdTraits<D>, FlashFwdBiasTraits<D>, T>(p, stream);
}

}  // namespace attention
}  // namespace fastllm
