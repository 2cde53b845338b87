// Kernels that exercise the SIMT emulator itself (tests/test_simt_emulator.py): written as CUDA,
// rewritten and built like csrc/ (build.py build_selftest), called through ctypes. Each entry
// point returns the launch status (cudaGetLastError); simt_error() gives the message.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// One warp: D (16 x 8, fp32) = A (16 x 16, row-major fp16) * B (16 x 8, given as B^T 8 x 16)
// with the canonical ldmatrix.x4 (A), ldmatrix.x4 of B^T rows and mma.m16n8k16.
__global__ void mma_kernel(const __half* a, const __half* bt, float* d) {
  extern __shared__ __align__(128) unsigned char smem[];
  __half* sa = reinterpret_cast<__half*>(smem);
  __half* sb = sa + 16 * 16;
  const int lane = threadIdx.x;
  for (int i = lane; i < 16 * 16; i += 32) sa[i] = a[i];
  for (int i = lane; i < 8 * 16; i += 32) sb[i] = bt[i];
  __syncthreads();
  uint32_t fa[4], fb[4];
  // A: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15).
  const int r = lane % 8, m = lane / 8;
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(fa[0]), "=r"(fa[1]), "=r"(fa[2]), "=r"(fa[3])
               : "r"(smem_u32(sa + (r + 8 * (m % 2)) * 16 + 8 * (m / 2))));
  // B^T rows n 0-7: matrices (k 0-7), (k 8-15) (registers 2, 3 repeat them).
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(fb[0]), "=r"(fb[1]), "=r"(fb[2]), "=r"(fb[3])
               : "r"(smem_u32(sb + r * 16 + 8 * (m % 2))));
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
      : "r"(fa[0]), "r"(fa[1]), "r"(fa[2]), "r"(fa[3]), "r"(fb[0]), "r"(fb[1]));
  const int g = lane / 4, c = lane % 4;
  d[g * 8 + 2 * c] = acc[0];
  d[g * 8 + 2 * c + 1] = acc[1];
  d[(g + 8) * 8 + 2 * c] = acc[2];
  d[(g + 8) * 8 + 2 * c + 1] = acc[3];
}

// 64 floats global -> shared by cp.async (16 threads x 16 bytes), then every thread copies them
// back out after a barrier; `wait` = false skips cp.async.wait_group (a bug the emulator shows).
__global__ void cp_async_kernel(const float* src, float* dst, bool wait) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int t = threadIdx.x;
  if (t < 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem + 16 * t)), "l"(src + 4 * t),
                 "r"(16));
  }
  asm volatile("cp.async.commit_group;\n" ::);
  if (wait) asm volatile("cp.async.wait_group %0;\n" ::"n"(0));
  __syncthreads();
  for (int i = t; i < 64; i += blockDim.x) dst[i] = reinterpret_cast<const float*>(smem)[i];
}

// 0: lanes of a warp in different warp-wide instructions (a fault), 1: half the block at a
// barrier while the other half exited (fine: exited threads count as arrived), 2: ldmatrix
// outside shared memory (a fault).
__global__ void fault_kernel(int which, float* out) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int t = threadIdx.x;
  if (which == 0) {
    float v = t % 2 ? __shfl_xor_sync(0xffffffffu, 1.f, 1) : static_cast<float>(__reduce_max_sync(0xffffffffu, t));
    out[t] = v;
  } else if (which == 1) {
    if (t >= 32) return;
    __syncthreads();
  } else {
    uint32_t r[4];
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(smem) + 1024u * 1024u));
    out[t] = static_cast<float>(r[0]);
  }
}

__global__ void big_smem_kernel(float* out) {
  extern __shared__ __align__(128) unsigned char smem[];
  out[threadIdx.x] = smem[0];
}

}  // namespace

extern "C" {
int selftest_mma(const __half* a, const __half* bt, float* d) {
  mma_kernel<<<1, 32, 16 * 16 * 2 + 8 * 16 * 2, 0>>>(a, bt, d);
  return cudaGetLastError();
}
int selftest_cp_async(const float* src, float* dst, int wait) {
  cp_async_kernel<<<1, 64, 256, 0>>>(src, dst, wait != 0);
  return cudaGetLastError();
}
int selftest_fault(int which, float* out) {
  fault_kernel<<<1, 64, 256, 0>>>(which, out);
  return cudaGetLastError();
}
int selftest_big_smem(float* out, int opt_in) {
  if (opt_in) cudaFuncSetAttribute(big_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024);
  big_smem_kernel<<<1, 32, 64 * 1024, 0>>>(out);
  return cudaGetLastError();
}
const char* simt_error(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }
}
