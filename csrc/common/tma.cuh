// Hopper (sm_90) bulk tensor copies (TMA) and the shared-memory barriers (mbarrier) they
// complete on. Included only by *_sm90a.cu units. UNVERIFIED: compiled, never run on a GPU.
//
// Protocol used by the kernels (per ring slot s, a "full" and an "empty" barrier):
//   producer: wait empty[s] (parity of the round before), arrive.expect_tx(full[s], bytes),
//             issue the copies completing on full[s];
//   consumers: wait full[s] (parity of this round), compute, then one thread per consumer
//             group arrives on empty[s] once nothing reads the slot any more.
// A fresh barrier is in phase 0; waiting for parity 1 ("the phase before") returns at once,
// which is how the producer's first round starts without anyone arriving.
#pragma once

#include <cuda.h>  // CUtensorMap (a 128-byte, 64-byte-aligned opaque struct; no libcuda link)

#include <cstdint>

namespace fastllm {
namespace tma {

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Makes the initialised barriers visible to the async proxy (the TMA unit) and other threads
// (followed by a __syncthreads in the kernel).
__device__ __forceinline__ void mbar_fence_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Spins until the phase of parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n"
        "}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}

// 2-D tile copy global -> shared through the tensor map `map` (a __grid_constant__ kernel
// parameter): box at coordinates (c0 innermost, c1); elements outside the tensor arrive as zeros
// and still count toward the barrier's transaction bytes.
__device__ __forceinline__ void load_2d(uint32_t dst, const CUtensorMap* map, int c0, int c1, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}

}  // namespace tma
}  // namespace fastllm
