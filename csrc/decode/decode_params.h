// The plain parameter struct of the split-KV decode kernels (no tensors, no torch) and the
// declarations tying the launcher (decode_launcher.cu) to the instantiation units.
// UNVERIFIED on a GPU.
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

namespace fastllm {
namespace decode {

// Strides in elements. Layouts:
//   q     (B, Hq, Sq, D)              any batch / head / row strides, unit stride along D
//   k, v  contiguous: (B, Hkv, S_max, D), strides (batch, head, row)
//         paged (block_table != nullptr): (num_pages, page_size, Hkv, D), strides given as
//         (page, head, slot) in the batch / head / row fields; key j of sequence b is slot
//         j % page_size of page block_table[b * block_table_stride + j / page_size]
//   out   (B, Sq, Hq, D) contiguous, lse (B, Hq, Sq) contiguous fp32
//   out_partial (B, Hq, Sq, num_splits, D), lse_partial (B, Hq, Sq, num_splits): fp32, used
//         when num_splits > 1 (the combine kernel then writes out / lse)
//   mask  optional (B, Sq, capacity) bytes, any strides (0 where broadcast), nonzero = attend
// Metadata is clamped, never trusted: length into [0, capacity], page id into [0, num_pages).
struct DecodeParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;
  float* out_partial;
  float* lse_partial;
  const int* cache_seqlens;  // nullptr: every sequence has `capacity` keys
  const int* block_table;    // nullptr: contiguous cache
  const uint8_t* mask;       // nullptr: none (then causal among the Sq queries, bottom-right)
  const float* sinks;        // nullptr: none; else (Hq,) fp32 attention-sink logits

  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
  int64_t block_table_stride;
  int64_t mask_batch_stride, mask_row_stride, mask_col_stride;

  int batch, heads_q, heads_kv, group, seqlen_q;
  int rows;        // group * seqlen_q: the packed M dimension of one kv head (row = g * Sq + i)
  int capacity;    // S_max, or max_pages * page_size
  int page_size, num_pages;
  int num_splits;

  int window;      // > 0: query at position p sees keys > p - window (no mask); 0: none
  bool has_softcap;
  // Scores in the log2 domain (exp2 is the hardware instruction), as the prefill kernel:
  float scale_log2;   // no softcap: s_log2 = (q.k) * scale * log2(e)
  float softcap_in;   // softcap: s_log2 = tanh((q.k) * softcap_in) * softcap_out
  float softcap_out;
};

// One per instantiation unit (decode_hdim{D}_{dtype}.cu): the split kernel for element type T
// and head dim D, plus (num_splits > 1) the combine kernel. Returns 0 or a cudaError_t.
template <typename T, int D>
int run_decode(const DecodeParams& params, cudaStream_t stream);

}  // namespace decode
}  // namespace fastllm
