// Launcher declaration for split-KV decode attention (csrc/decode/decode_launcher.cu).
// UNVERIFIED: compiled for sm_80 / sm_90a with 0 spills, never run on a GPU.
#pragma once
#include <cstdint>

namespace fastllm {
// out = attention of Sq (1..16) queries per sequence against a KV cache, split over the key
// range (num_splits pieces, merged exactly). Layouts: csrc/decode/decode_params.h. Strides in
// elements (mask: bytes; a bool mask). cache_seqlens / block_table / mask / sinks ((Hq,) fp32
// attention-sink logits): 0 for none.
// out_partial / lse_partial: fp32 workspaces of B*Hq*Sq*num_splits*(D | 1) elements, needed
// (non-zero) only when num_splits > 1. Returns 0 or an error code (common.h Status or a
// cudaError_t).
int decode_attention_fwd(int device, int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out,
                         uintptr_t lse, uintptr_t out_partial, uintptr_t lse_partial, uintptr_t cache_seqlens,
                         uintptr_t block_table, uintptr_t mask, int64_t batch, int64_t heads_q, int64_t heads_kv,
                         int64_t seqlen_q, int64_t head_dim, int64_t capacity, int64_t page_size, int64_t num_pages,
                         int64_t block_table_stride, int64_t q_batch_stride, int64_t q_head_stride,
                         int64_t q_row_stride, int64_t k_batch_stride, int64_t k_head_stride, int64_t k_row_stride,
                         int64_t v_batch_stride, int64_t v_head_stride, int64_t v_row_stride,
                         int64_t mask_batch_stride, int64_t mask_row_stride, int64_t mask_col_stride,
                         uintptr_t sinks, double scale, int64_t window, double softcap, int64_t num_splits,
                         uintptr_t stream);
}  // namespace fastllm
