// Split-KV decode attention ("flash-decoding"), sm80+ (mma.sync, cp.async).
// UNVERIFIED: compiled for sm_80 / sm_90a with 0 spills; never run on a GPU.
//
// Computes, for each sequence b and query head h (kv head hk = h / group), for the Sq (1..16)
// new queries of a decode step (reference: python/fastllm/ref/decode.py):
//   L        = clamp(cache_seqlens[b], 0, capacity)    (capacity if no lengths)
//   allowed  = mask[b, i, j]                            if a mask is given, else
//              j <= p_i & (j > p_i - W if window W)     p_i = L - Sq + i (bottom-right causal)
//   s[i, j]  = scale * <q_i, k_j>  (softcap c: c * tanh(s / c));  fp16/bf16 in, fp32 accumulate
//   lse[i]   = log (sum_allowed exp(s[i, j]) + exp(z_h));  out[i] = sum_allowed exp(s[i, j] - lse[i]) v_j
// with z_h = sinks[h] (attention sinks) or -inf without; out 0 / lse -inf for a row with nothing
// allowed and no sink; out (B, Sq, Hq, D), lse (B, Hq, Sq).
//
// Algorithm. Grid (B * Hkv, num_splits, ceil(group * Sq / 16)); a CTA owns one kv head of one
// sequence, one piece of its key range and 16 packed query rows (GQA heads x queries, row
// g * Sq + i), so each K/V byte is read once for all the query heads that share it.
//   1. Key range [lo, L) (lo > 0 only with a window; with a mask, the first / one past the
//      last key any of the Sq mask rows attends: common/mask_range.cuh), cut into num_splits
//      pieces of whole kBlockN tiles; this CTA takes piece blockIdx.y.
//   2. Q (16 rows) and K/V tiles stream in with 16-byte cp.async copies (kStages-deep
//      pipeline); a paged cache is read one key row at a time (page id looked up, clamped), so
//      any page size works. Rows past the piece are zero-filled.
//   3. Warp w takes keys [16w, 16w + 16) of each tile: S = Q K^T with mma.m16n8k16 (ldmatrix),
//      masked only on tiles that need it, online softmax in registers (exp2, scale folded into
//      one FMA), O += P V (ldmatrix.trans). The warps' (max, sum, O) merge through shared memory.
//   4. One piece: out and lse are written directly (16-byte chunks of 4 elements per thread).
//      Several: fp32 partials (out_s normalised, lse_s) go to the workspace and the combine
//      kernel merges them exactly: lse = log sum_s exp(lse_s), out = sum_s exp(lse_s - lse) out_s.
//      A sink joins the one piece's softmax state, or the combine as one more empty partial.
// Tile configs: decode_traits.h. Launcher (argument checks, dispatch): decode_launcher.cu.
// Instantiations: decode_hdim*_{fp16,bf16}.cu (generate_instantiations.py).
//
// Run it: python -c "import torch, fastllm; q = torch.randn(4, 32, 1, 128, device='cuda',
//   dtype=torch.half); k = torch.randn(4, 8, 4096, 128, device='cuda', dtype=torch.half);
//   print(fastllm.ops.decode_attention(q, k, k, backend='cuda'))"
// Test: pytest tests/test_decode.py (GPU); memcheck: compute-sanitizer --tool memcheck
//   python bench/sanitize_cases.py decode_attention.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

// SmemTile (swizzled shared-memory tiles that ldmatrix reads without bank conflicts) and the
// PTX wrappers (cp.async, ldmatrix, mma, exp2) of the prefill kernel, reused as they are.
#include "attention/flash_fwd_kernel.cuh"
#include "common/mask_range.cuh"
#include "decode/decode_params.h"
#include "decode/decode_traits.h"

namespace fastllm {
namespace decode {

using attention::cp_async_16;
using attention::cp_async_commit;
using attention::cp_async_wait;
using attention::exp2_approx;
using attention::ldmatrix_x4;
using attention::ldmatrix_x4_trans;
using attention::mma_16816;
using attention::pack2;
using attention::smem_u32;
using attention::SmemTile;

constexpr float kLn2f = 0.69314718055994531f;

// Four fp32 values -> four T in 8 bytes (for 8-byte aligned stores of out).
template <typename T>
__device__ __forceinline__ uint2 pack4(float a, float b, float c, float d) {
  return make_uint2(pack2<T>(a, b), pack2<T>(c, d));
}

template <typename Traits, typename T>
__global__ void __launch_bounds__(Traits::kThreads) decode_split_kernel(const DecodeParams p) {
  constexpr int kD = Traits::kHeadDim;
  constexpr int kBN = Traits::kBlockN;
  constexpr int kThreads = Traits::kThreads;
  constexpr int kChunks = Traits::kChunks;
  constexpr int kStages = Traits::kStages;
  constexpr int kNWarps = Traits::kNWarps;
  constexpr int kKS = kD / 16;  // k-steps of Q K^T
  constexpr int kDT = kD / 8;   // 8-wide d-tiles of O per warp
  constexpr int kTPR = kThreads / kBN;  // threads per K/V row in the tile loads
  constexpr uint32_t kStageBytes = Traits::kSmemStageBytes;
  using QTile = SmemTile<16, kChunks>;
  using KVTile = SmemTile<kBN, kChunks>;

  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t sQ = smem_u32(smem);
  const uint32_t sK = sQ + Traits::kSmemQBytes;       // kStages K tiles
  const uint32_t sV = sK + kStages * kStageBytes;     // kStages V tiles

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, c4 = lane % 4;
  const int b = blockIdx.x / p.heads_kv, hk = blockIdx.x % p.heads_kv;
  const int split = blockIdx.y;
  const int row0 = blockIdx.z * 16;  // first packed row of this CTA
  const int Sq = p.seqlen_q;

  // ---- key range of this CTA: [start, end).
  int L = p.capacity;
  if (p.cache_seqlens != nullptr) L = min(max(p.cache_seqlens[b], 0), p.capacity);
  int lo = 0, hi = L;
  if (p.window > 0 && p.mask == nullptr) lo = max(L - Sq - p.window + 1, 0);  // first query's first key
  if (p.mask != nullptr) {  // only keys some query row attends (one pass over the Sq mask rows)
    const int2 r = mask_key_range<kThreads>(p.mask + b * p.mask_batch_stride, p.mask_row_stride,
                                            p.mask_col_stride, Sq, p.capacity, reinterpret_cast<int*>(smem));
    lo = max(lo, r.x), hi = max(min(hi, r.y), lo);   // within [0, L) still (lengths + mask: both hold)
  }
  const int span = hi - lo;
  const int per_split = ((span + p.num_splits - 1) / p.num_splits + kBN - 1) / kBN * kBN;
  const int start = lo + split * per_split;  // <= capacity + 256 * kBN: no int overflow
  const int end = min(start + per_split, hi);
  const int n_tiles = end > start ? (end - start + kBN - 1) / kBN : 0;

  const T* gK = static_cast<const T*>(p.k);
  const T* gV = static_cast<const T*>(p.v);
  // cp.async one kBN-key K and V tile (keys t0 .. t0 + kBN - 1) into `stage`; keys >= end are
  // zero-filled. Each thread owns one key row (kTPR threads per row) and kChunks / kTPR of its
  // 16-byte chunks: one address (one page lookup) per thread per tile. Rows are dealt to the
  // threads by fill_row, which keeps the shared stores free of bank conflicts.
  auto load_kv = [&](int stage, int t0) {
    const int r = KVTile::template fill_row<kTPR>(tid / kTPR), cb = tid % kTPR;
    const int j = t0 + r;
    const bool valid = j < end;
    const T* kp = gK;
    const T* vp = gV;
    if (valid) {
      int64_t kb, vb;
      int slot;
      if (p.block_table != nullptr) {
        int page = p.block_table[b * p.block_table_stride + j / p.page_size];
        page = min(max(page, 0), p.num_pages - 1);  // a bad table reads a wrong page, not out of bounds
        slot = j % p.page_size;
        kb = page * p.k_batch_stride;
        vb = page * p.v_batch_stride;
      } else {
        slot = j;
        kb = b * p.k_batch_stride;
        vb = b * p.v_batch_stride;
      }
      kp = gK + kb + hk * p.k_head_stride + slot * p.k_row_stride;
      vp = gV + vb + hk * p.v_head_stride + slot * p.v_row_stride;
    }
    const uint32_t ks = sK + stage * kStageBytes, vs = sV + stage * kStageBytes;
#pragma unroll
    for (int c = 0; c < kChunks / kTPR; ++c) {
      const int chunk = cb + c * kTPR;
      cp_async_16(ks + KVTile::offset(r, chunk) * 2, valid ? kp + chunk * 8 : gK, valid);
      cp_async_16(vs + KVTile::offset(r, chunk) * 2, valid ? vp + chunk * 8 : gV, valid);
    }
  };

  // ---- prologue: group 0 = Q (16 packed rows; rows past group * Sq zero-filled), then
  // groups for the first kStages - 1 tiles (committed even when empty: uniform counting).
  for (int i = tid; i < 16 * kChunks; i += kThreads) {
    const int r = QTile::storage_row(i), c = QTile::storage_chunk(i);  // conflict-free shared stores
    const int R = row0 + r;
    const bool valid = R < p.rows;
    const T* src = static_cast<const T*>(p.q);
    if (valid) {
      const int h = hk * p.group + R / Sq, qi = R % Sq;
      src += b * p.q_batch_stride + h * p.q_head_stride + qi * p.q_row_stride + c * 8;
    }
    cp_async_16(sQ + QTile::offset(r, c) * 2, src, valid);
  }
  cp_async_commit();
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_tiles) load_kv(s, start + s * kBN);
    cp_async_commit();
  }

  // Per-lane ldmatrix addresses (as in the prefill kernel): Q as the A operand, K as the B
  // operand of Q K^T (keys are n), V as the B operand of P V through .trans (keys are k).
  const int q_r = lane % 16, q_cl = lane / 16;
  const uint32_t q_lane = sQ + QTile::lane_base(q_r);
  const int q_x = QTile::lane_xor(q_r, q_cl);
  const int k_r = (lane / 16) * 8 + lane % 8, k_cl = (lane / 8) % 2;
  const uint32_t k_lane = sK + KVTile::lane_base(k_r);
  const int k_x = KVTile::lane_xor(k_r, k_cl);
  const uint32_t v_lane = sV + KVTile::lane_base(q_r);
  const int v_x = KVTile::lane_xor(q_r, q_cl);

  cp_async_wait<kStages - 1>();  // Q landed (the K/V groups may still fly)
  __syncthreads();
  uint32_t q_frag[Traits::kQInRegs ? kKS : 1][4];
  if constexpr (Traits::kQInRegs) {
#pragma unroll
    for (int kk = 0; kk < kKS; ++kk) ldmatrix_x4(q_frag[kk], QTile::addr(q_lane, q_x, 0, kk * 2));
  }

  // This thread's two rows (g and g + 8 of the 16): query index and absolute position.
  int pos[2];
  const uint8_t* mrow[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int R = row0 + g + 8 * r;
    const int qi = (R < p.rows ? R : 0) % Sq;
    pos[r] = L - Sq + qi;
    mrow[r] = p.mask != nullptr && R < p.rows ? p.mask + b * p.mask_batch_stride + qi * p.mask_row_stride
                                               : nullptr;
  }

  float acc_o[kDT][4];
#pragma unroll
  for (int i = 0; i < kDT; ++i) acc_o[i][0] = acc_o[i][1] = acc_o[i][2] = acc_o[i][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};  // raw score units (see mult)
  float row_sum[2] = {0.f, 0.f};              // per-thread partial (quad-reduced at the end)
  const float mult = p.has_softcap ? 1.f : p.scale_log2;

  for (int it = 0; it < n_tiles; ++it) {
    cp_async_wait<kStages - 2>();  // tile `it` landed
    __syncthreads();               // ... for every thread; and stage (it - 1) is free again
    {
      const int nx = it + kStages - 1;
      if (nx < n_tiles) load_kv(nx % kStages, start + nx * kBN);
      cp_async_commit();
    }
    const int stage = it % kStages;
    const int t0 = start + it * kBN;

    // ---- S = Q K^T for this warp's 16 keys (two 8-key n-tiles), fp32.
    float s[2][4];
#pragma unroll
    for (int i = 0; i < 2; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
    const uint32_t k_stage = k_lane + stage * kStageBytes;
#pragma unroll
    for (int kk = 0; kk < kKS; ++kk) {
      uint32_t a[4];
      if constexpr (Traits::kQInRegs) {
        a[0] = q_frag[kk][0], a[1] = q_frag[kk][1], a[2] = q_frag[kk][2], a[3] = q_frag[kk][3];
      } else {
        ldmatrix_x4(a, QTile::addr(q_lane, q_x, 0, kk * 2));
      }
      uint32_t bk[4];
      ldmatrix_x4(bk, KVTile::addr(k_stage, k_x, warp * 16, kk * 2));
      mma_16816<T>(s[0], a, bk[0], bk[1]);
      mma_16816<T>(s[1], a, bk[2], bk[3]);
    }
    if (p.has_softcap) {
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[i][e] = tanhf(s[i][e] * p.softcap_in) * p.softcap_out;
    }

    // ---- masking, only on tiles that need it (a CTA-uniform condition). s[nt][2r + j] is
    // row g + 8r, key t0 + 16 warp + 8 nt + 2 c4 + j.
    const bool need_mask = p.mask != nullptr || t0 + kBN > end || t0 + kBN - 1 > L - Sq ||
                           (p.window > 0 && t0 <= L - 1 - p.window);
    if (need_mask) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const int key = t0 + warp * 16 + nt * 8 + 2 * c4 + j;
            bool ok = key < end;
            if (p.mask != nullptr) {
              ok = ok && mrow[r] != nullptr && mrow[r][key * p.mask_col_stride] != 0;
            } else {
              ok = ok && key <= pos[r];
              if (p.window > 0) ok = ok && key > pos[r] - p.window;
            }
            if (!ok) s[nt][2 * r + j] = -INFINITY;
          }
        }
      }
    }

    // ---- online softmax (the 4 threads of a quad share a row).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = fmaxf(row_max[r], fmaxf(fmaxf(s[0][2 * r], s[0][2 * r + 1]), fmaxf(s[1][2 * r], s[1][2 * r + 1])));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_scaled = mx == -INFINITY ? 0.f : mx * mult;  // nothing allowed yet: no NaN
      const float corr = exp2_approx(row_max[r] * mult - m_scaled);
      row_max[r] = mx;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const float e = exp2_approx(fmaf(s[nt][2 * r + j], mult, -m_scaled));
          s[nt][2 * r + j] = e;
          sum += e;
        }
      row_sum[r] = row_sum[r] * corr + sum;
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        acc_o[dt][2 * r] *= corr;
        acc_o[dt][2 * r + 1] *= corr;
      }
    }

    // ---- O += P V over this warp's 16 keys (one k-step; S's layout is P's A fragment).
    uint32_t a[4];
    a[0] = pack2<T>(s[0][0], s[0][1]);
    a[1] = pack2<T>(s[0][2], s[0][3]);
    a[2] = pack2<T>(s[1][0], s[1][1]);
    a[3] = pack2<T>(s[1][2], s[1][3]);
    const uint32_t v_stage = v_lane + stage * kStageBytes;
#pragma unroll
    for (int dp = 0; dp < kD / 16; ++dp) {
      uint32_t bv[4];
      ldmatrix_x4_trans(bv, KVTile::addr(v_stage, v_x, warp * 16, dp * 2));
      mma_16816<T>(acc_o[2 * dp], a, bv[0], bv[1]);
      mma_16816<T>(acc_o[2 * dp + 1], a, bv[2], bv[3]);
    }
  }
  cp_async_wait<0>();  // (only empty groups can remain) before the stages are reused
  __syncthreads();

  // ---- merge the warps: (max, sum) per warp and row, then O rows rescaled to the common max.
  float* red_ml = reinterpret_cast<float*>(smem + Traits::kSmemQBytes);  // [warp][16][2]
  float* red_o = red_ml + kNWarps * 16 * 2;                                // [warp][16][kRedStride]
  float* fin = red_o + kNWarps * 16 * Traits::kRedStride;                  // [16][2]: max, sum
  float own_m[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = row_sum[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    own_m[r] = row_max[r] == -INFINITY ? -INFINITY : row_max[r] * mult;  // log2 domain
    if (c4 == 0) {
      red_ml[(warp * 16 + g + 8 * r) * 2] = own_m[r];
      red_ml[(warp * 16 + g + 8 * r) * 2 + 1] = l;
    }
  }
  __syncthreads();
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int lr = g + 8 * r;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kNWarps; ++w) M = fmaxf(M, red_ml[(w * 16 + lr) * 2]);
    const float m_safe = M == -INFINITY ? 0.f : M;
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kNWarps; ++w) total += red_ml[(w * 16 + lr) * 2 + 1] * exp2f(red_ml[(w * 16 + lr) * 2] - m_safe);
    const float f = exp2f(own_m[r] - m_safe);  // 0 for a warp that saw nothing
    float* dst = red_o + (warp * 16 + lr) * Traits::kRedStride + 2 * c4;
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt)
      *reinterpret_cast<float2*>(dst + dt * 8) = make_float2(acc_o[dt][2 * r] * f, acc_o[dt][2 * r + 1] * f);
    if (warp == 0 && c4 == 0) {
      fin[lr * 2] = M;
      fin[lr * 2 + 1] = total;
    }
  }
  __syncthreads();

  // ---- write: 4 consecutive d per thread, rows of this CTA that exist.
  for (int idx = tid; idx < 16 * (kD / 4); idx += kThreads) {
    const int lr = idx / (kD / 4), c = idx % (kD / 4);
    const int R = row0 + lr;
    if (R >= p.rows) continue;
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int w = 0; w < kNWarps; ++w) {
      const float4 x = *reinterpret_cast<const float4*>(red_o + (w * 16 + lr) * Traits::kRedStride + 4 * c);
      o.x += x.x, o.y += x.y, o.z += x.z, o.w += x.w;
    }
    const int h = hk * p.group + R / Sq, qi = R % Sq;
    // One piece: the sink joins here (several: in the combine kernel).
    const float z_nat = p.num_splits == 1 && p.sinks != nullptr ? p.sinks[h] : -INFINITY;
    float total = fin[lr * 2 + 1];
    const bool any_key = total > 0.f;
    float m = any_key ? fin[lr * 2] : -INFINITY;
    const float alpha = attention::fold_sink(m, total, z_nat * attention::kLog2eF);
    const float inv = any_key ? alpha / total : 0.f;
    const float lse = any_key ? (m + log2f(total)) * kLn2f : z_nat;  // no key: the sink alone, exactly
    if (p.num_splits == 1) {
      T* out = static_cast<T*>(p.out) + ((static_cast<int64_t>(b) * Sq + qi) * p.heads_q + h) * kD + 4 * c;
      *reinterpret_cast<uint2*>(out) = pack4<T>(o.x * inv, o.y * inv, o.z * inv, o.w * inv);
      if (c == 0) p.lse[(static_cast<int64_t>(b) * p.heads_q + h) * Sq + qi] = lse;
    } else {
      const int64_t prow = ((static_cast<int64_t>(b) * p.heads_q + h) * Sq + qi) * p.num_splits + split;
      *reinterpret_cast<float4*>(p.out_partial + prow * kD + 4 * c) =
          make_float4(o.x * inv, o.y * inv, o.z * inv, o.w * inv);
      if (c == 0) p.lse_partial[prow] = lse;
    }
  }
}

// Merge of the num_splits partials of each output row (one warp per row, rows ordered
// (b, h, i) like lse): lse = M + log sum_s exp(lse_s - M), out = sum_s exp(lse_s - lse) out_s.
// A sink z_h is one more partial with lse z_h and out 0. All splits empty (every lse_s = -inf)
// and no sink: out 0, lse -inf.
constexpr int kCombineWarps = 4;

template <typename T, int head_dim>
__global__ void __launch_bounds__(kCombineWarps * 32) decode_combine_kernel(const DecodeParams p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t total_rows = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kCombineWarps + warp;
  if (row >= total_rows) return;
  const int S = p.num_splits;
  const float* lp = p.lse_partial + row * S;
  const int Sq = p.seqlen_q;
  const int64_t b = row / (static_cast<int64_t>(p.heads_q) * Sq);
  const int h = static_cast<int>((row / Sq) % p.heads_q), qi = static_cast<int>(row % Sq);
  const float z = p.sinks != nullptr ? p.sinks[h] : -INFINITY;
  float M = -INFINITY;
  for (int s = lane; s < S; s += 32) M = fmaxf(M, lp[s]);
#pragma unroll
  for (int o = 16; o > 0; o /= 2) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
  M = fmaxf(M, z);
  const float m_safe = M == -INFINITY ? 0.f : M;
  float sum = 0.f;
  for (int s = lane; s < S; s += 32) sum += expf(lp[s] - m_safe);
#pragma unroll
  for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  sum += expf(z - m_safe);  // 0 without a sink
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  T* out = static_cast<T*>(p.out) + ((b * Sq + qi) * p.heads_q + h) * head_dim;
  const float* op = p.out_partial + row * S * head_dim;
  for (int c = lane; c < head_dim / 4; c += 32) {
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int s = 0; s < S; ++s) {
      const float w = expf(lp[s] - m_safe);  // 0 for an empty split (its partial is 0 too)
      const float4 x = *reinterpret_cast<const float4*>(op + static_cast<int64_t>(s) * head_dim + 4 * c);
      acc.x += w * x.x, acc.y += w * x.y, acc.z += w * x.z, acc.w += w * x.w;
    }
    *reinterpret_cast<uint2*>(out + 4 * c) = pack4<T>(acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv);
  }
  if (lane == 0) p.lse[row] = sum > 0.f ? m_safe + logf(sum) : -INFINITY;
}

// Launch for element type T and head dim D (explicitly instantiated once per .cu file).
template <typename T, int D>
int run_decode(const DecodeParams& p, cudaStream_t stream) {
  using Traits = DecodeTraits<D>;
  auto kernel = decode_split_kernel<Traits, T>;
  constexpr int kSmem = Traits::kSmemBytes;
  if (const int e = opt_in_dynamic_smem<decode_split_kernel<Traits, T>>(kSmem)) return e;
  const dim3 grid(p.batch * p.heads_kv, p.num_splits, (p.rows + 15) / 16);
  kernel<<<grid, Traits::kThreads, kSmem, stream>>>(p);
  int st = launch_status();
  if (st != 0 || p.num_splits == 1) return st;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q;
  const unsigned blocks = static_cast<unsigned>((rows + kCombineWarps - 1) / kCombineWarps);
  decode_combine_kernel<T, D><<<blocks, kCombineWarps * 32, 0, stream>>>(p);
  return launch_status();
}

}  // namespace decode
}  // namespace fastllm
