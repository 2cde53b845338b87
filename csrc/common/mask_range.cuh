// The key range a boolean attention mask allows, found by one CTA-wide pass over its rows:
// [first, last) = the first key and one past the last key that any of `rows` mask rows
// attends (first >= last: none). The attention kernels (prefill, decode) loop over that range
// only (prefill: the key tiles holding it), so the unwritten tail of a StaticCache and left
// padding cost neither K/V reads nor FLOPs beyond that; the mask still decides per key inside. UNVERIFIED on a GPU (compiled; the byte math
// of the 16-byte path is mirrored in tests/test_decode_kernel_emulated.py).
#pragma once

#include <cstdint>

namespace fastllm {

// Called by every thread of a kThreads-thread CTA (block-wide barriers inside). `red` is 2 ints
// of shared memory nobody else touches until this returns. Mask bytes: nonzero = attend; row r,
// key j at m[r * row_stride + j * col_stride] (strides may be 0: broadcast). Rows are read with
// 16-byte loads when keys are contiguous and every row is 16-byte aligned, else byte by byte.
template <int kThreads>
__device__ __forceinline__ int2 mask_key_range(const uint8_t* m, int64_t row_stride, int64_t col_stride,
                                               int rows, int n_keys, int* red) {
  static_assert(kThreads % 32 == 0, "whole warps");
  const int tid = threadIdx.x;
  if (tid == 0) red[0] = n_keys, red[1] = 0;
  __syncthreads();
  int first = n_keys, last = 0;
  if (row_stride == 0) rows = rows < 1 ? rows : 1;   // broadcast rows: one is all of them
  const bool vec = col_stride == 1 && reinterpret_cast<uintptr_t>(m) % 16 == 0 &&
                   (rows <= 1 || row_stride % 16 == 0);
  const int n_vec = vec ? n_keys / 16 : 0;
  for (int c = tid; c < n_vec; c += kThreads) {
    uint4 w = make_uint4(0u, 0u, 0u, 0u);
    for (int r = 0; r < rows; ++r) {
      const uint4 x = __ldg(reinterpret_cast<const uint4*>(m + r * row_stride) + c);
      w.x |= x.x, w.y |= x.y, w.z |= x.z, w.w |= x.w;
    }
    const uint32_t word[4] = {w.x, w.y, w.z, w.w};
    // Little-endian: byte b of word i is key 16c + 4i + b; the lowest set bit gives the first
    // attended byte of a word, the highest set bit the last.
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if (word[i] != 0u) first = min(first, 16 * c + 4 * i + (__ffs(word[i]) - 1) / 8);
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if (word[i] != 0u) last = max(last, 16 * c + 4 * i + (31 - __clz(word[i])) / 8 + 1);
  }
  for (int j = 16 * n_vec + tid; j < n_keys; j += kThreads) {
    bool any = false;
    for (int r = 0; r < rows && !any; ++r) any = m[r * row_stride + j * col_stride] != 0;
    if (any) first = min(first, j), last = max(last, j + 1);
  }
  first = __reduce_min_sync(0xffffffffu, first);
  last = __reduce_max_sync(0xffffffffu, last);
  if (tid % 32 == 0) {
    atomicMin(red, first);
    atomicMax(red + 1, last);
  }
  __syncthreads();
  const int2 range = make_int2(red[0], red[1]);
  __syncthreads();  // every thread has read `red` before the caller reuses that memory
  return range;
}

}  // namespace fastllm
