// The plain parameter struct the prefill flash-attention kernels see (no tensors, no torch),
// and the declarations tying the launcher (flash_fwd_launcher.cu) to the per-(dtype, head dim)
// instantiation units (flash_fwd_hdim*_*.cu).
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

namespace fastllm {
namespace attention {

// All strides are in elements. Layouts:
//   q   (B, Hq,  Sq,  D)  any batch/head/seq strides, unit stride along D, 16-byte aligned rows
//   k,v (B, Hkv, Skv, D)  same rules; query head h reads kv head h / group
//   out (B, Sq, Hq, D)    contiguous (written by the kernel, layout fixed)
//   lse (B, Hq, Sq)       contiguous fp32
//   mask (B, Sq, Skv)     optional uint8/bool, any strides (0 where broadcast), nonzero = attend
//   bias (B, Hq, Sq, Skv) optional fp16/bf16/fp32 (bias_dtype), any strides (0 where broadcast),
//                         added to the (softcapped) scaled scores; dense calls only
//   sinks (Hq)            optional fp32 logits, one per query head (attention sinks)
// Varlen (cu_seqlens_q != nullptr, flash-attn's packed layout): sequence b is rows
// [cu_seqlens_q[b], cu_seqlens_q[b + 1]) of q / out and [cu_seqlens_k[b], ..) of k / v; batch
// strides are then 0, seqlen_q / seqlen_kv are only the maxima that size the grid, and each
// row offset (q_start, k_start) is added through the row strides. out is (total_q, Hq, D),
// lse (Hq, total_q); no mask. The kernel clamps the offsets (start into [0, total], end into
// [start, total]): unchecked cu_seqlens values can give wrong rows, never stray accesses.
struct FlashFwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;
  const uint8_t* mask;  // nullptr: no mask
  const void* bias;     // nullptr: no bias
  const float* sinks;   // nullptr: no sinks
  const int* cu_seqlens_q;  // nullptr: dense batch
  const int* cu_seqlens_k;

  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
  int64_t mask_batch_stride, mask_row_stride, mask_col_stride;
  int64_t bias_batch_stride, bias_head_stride, bias_row_stride, bias_col_stride;
  int bias_dtype;  // common.h DType: kFloat16, kBFloat16 or kFloat32
  int64_t out_batch_stride;                   // out row stride is always heads_q * D
  int64_t lse_batch_stride, lse_head_stride;  // lse row stride is 1

  int batch, heads_q, heads_kv, group;  // group = heads_q / heads_kv
  int seqlen_q, seqlen_kv;
  int total_q, total_kv;  // varlen: rows of q / out and of k / v (the offsets are clamped into them)

  bool causal;        // bottom-right aligned: query i sits at key position i + Skv - Sq
  int window;         // > 0: query at position p sees keys > p - window; 0: none
  bool has_softcap;
  // Scores live in the log2 domain inside the kernel (exp2 is the hardware instruction):
  float scale_log2;     // no softcap: s_log2 = (q.k) * scale * log2(e)
  float softcap_in;     // softcap:    s_log2 = tanh((q.k) * softcap_in) * softcap_out
  float softcap_out;    //             softcap_in = scale / softcap, softcap_out = softcap * log2(e)
  // With a bias the scores are first formed in natural units (the bias's), then moved into the
  // log2 domain: s = (tanh((q.k) * softcap_in) * softcap or (q.k) * scale) + bias.
  float scale;
  float softcap;
};

// One per instantiation unit: runs the sm80 (mma.sync) kernel for element type T and head
// dim D. Returns 0 or a cudaError_t.
template <typename T, int D>
int run_flash_fwd_sm80(const FlashFwdParams& params, cudaStream_t stream);
// The Hopper (wgmma) kernel, D in {64, 128, 256}; instantiated only in 90a builds.
template <typename T, int D>
int run_flash_fwd_sm90(const FlashFwdParams& params, cudaStream_t stream);

}  // namespace attention
}  // namespace fastllm
