// Launcher declaration for the prefill flash-attention forward (csrc/attention/flash_fwd_launcher.cu).
#pragma once
#include <cstdint>

namespace fastllm {
// out = softmax(scale * q k^T [softcapped, biased, masked], sink) v, plus the natural-log lse of
// each row. Shapes and layouts: see csrc/attention/flash_params.h. Strides in elements (mask:
// bytes). mask == 0: no mask. sinks == 0: none, else (Hq,) fp32. bias == 0: none, else a
// bias_dtype (common.h: fp16 / bf16 / fp32) tensor read through its 4 strides. window <= 0: none.
// softcap == 0: none. Returns 0 or an error code (common.h Status or a cudaError_t).
int flash_attention_fwd(int device, int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out,
                        uintptr_t lse, uintptr_t mask, int64_t batch, int64_t heads_q, int64_t heads_kv,
                        int64_t seqlen_q, int64_t seqlen_kv, int64_t head_dim, int64_t q_batch_stride,
                        int64_t q_head_stride, int64_t q_row_stride, int64_t k_batch_stride,
                        int64_t k_head_stride, int64_t k_row_stride, int64_t v_batch_stride,
                        int64_t v_head_stride, int64_t v_row_stride, int64_t mask_batch_stride,
                        int64_t mask_row_stride, int64_t mask_col_stride, uintptr_t sinks, uintptr_t bias,
                        int bias_dtype, int64_t bias_batch_stride, int64_t bias_head_stride,
                        int64_t bias_row_stride, int64_t bias_col_stride, double scale, int64_t window,
                        double softcap, bool causal, uintptr_t stream);
// The same over packed sequences (flash-attn's varlen layout): q (total_q, Hq, D), k/v
// (total_k, Hkv, D), cu_seqlens_* int32 (batch + 1) device pointers, sinks as above (no bias);
// out (total_q, Hq, D) contiguous, lse (Hq, total_q). max_seqlen_* bound the per-sequence lengths (grid size). The
// kernel reads the offsets clamped into [0, total_q] / [0, total_k]: bad values give wrong rows,
// never out-of-bounds accesses.
int flash_attention_varlen_fwd(int device, int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out,
                               uintptr_t lse, uintptr_t cu_seqlens_q, uintptr_t cu_seqlens_k, uintptr_t sinks,
                               int64_t batch, int64_t total_q, int64_t total_k, int64_t heads_q, int64_t heads_kv,
                               int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t head_dim, int64_t q_head_stride,
                               int64_t q_row_stride, int64_t k_head_stride, int64_t k_row_stride,
                               int64_t v_head_stride, int64_t v_row_stride, double scale, int64_t window,
                               double softcap, bool causal, uintptr_t stream);
}  // namespace fastllm
