// Kernels that exercise the SIMT emulator itself (tests/test_simt_emulator.py): written as CUDA,
// rewritten and built like csrc/ (build.py build_selftest), called through ctypes. Each entry
// point returns the launch status (cudaGetLastError); simt_error() gives the message.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

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

// One warpgroup: D (64 x 64, fp32) = A (64 x 16) * B (16 x 64) by one wgmma m64n64k16 (ss, both
// operands K-major with the 128-byte swizzle; A and B^T given as 64 x 16 row-major fp16). mode
// 0: canonical; 1: D read without wgmma.wait_group; 2: no wgmma.fence; 3: A staged by cp.async
// and published without fence.proxy.async; 4: a wait on an mbarrier nobody arrives on.
__global__ void wgmma_kernel(const __half* a, const __half* bt, float* d, int mode) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* smem = smem_raw + (1024 - smem_u32(smem_raw) % 1024) % 1024;
  const uint32_t sa = smem_u32(smem), sb = sa + 8192, bar = sb + 8192;
  const int t = threadIdx.x;
  // Row r (32 bytes) at (r % 8) * 128 + (r / 8) * 1024, its 16-byte chunk c at position c ^ (r % 8).
  for (int i = t; i < 128; i += 128) {
    const int r = i / 2, c = i % 2;
    const uint32_t off = (r % 8) * 128 + (r / 8) * 1024 + ((c ^ (r % 8)) << 4);
    if (mode == 3)
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(sa + off), "l"(a + r * 16 + c * 8),
                   "r"(16));
    else
      memcpy(smem + off, a + r * 16 + c * 8, 16);
    memcpy(smem + 8192 + off, bt + r * 16 + c * 8, 16);
  }
  if (mode == 3) {
    asm volatile("cp.async.commit_group;\n" ::);
    asm volatile("cp.async.wait_group %0;\n" ::"n"(0));
  }
  if (mode == 4) {
    if (t == 0) asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(1));
    __syncthreads();
    uint32_t done = 0;
    while (!done)
      asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                   : "=r"(done) : "r"(bar), "r"(0));
  }
  __syncthreads();
  float acc[32];
  for (int i = 0; i < 32; ++i) acc[i] = -1.f;
  // Descriptors: start >> 4, leading byte offset 16 (unused, K-major), stride 1024 between 8-row
  // groups, 128-byte swizzle.
  const uint64_t da = (sa >> 4) | (1ull << 16) | (64ull << 32) | (1ull << 62);
  const uint64_t db = (sb >> 4) | (1ull << 16) | (64ull << 32) | (1ull << 62);
  if (mode != 2) asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
               : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3]), "+f"(acc[4]), "+f"(acc[5]), "+f"(acc[6]), "+f"(acc[7]), "+f"(acc[8]), "+f"(acc[9]), "+f"(acc[10]), "+f"(acc[11]), "+f"(acc[12]), "+f"(acc[13]), "+f"(acc[14]), "+f"(acc[15]), "+f"(acc[16]), "+f"(acc[17]), "+f"(acc[18]), "+f"(acc[19]), "+f"(acc[20]), "+f"(acc[21]), "+f"(acc[22]), "+f"(acc[23]), "+f"(acc[24]), "+f"(acc[25]), "+f"(acc[26]), "+f"(acc[27]), "+f"(acc[28]), "+f"(acc[29]), "+f"(acc[30]), "+f"(acc[31])
               : "l"(da), "l"(db), "r"(0)
               : "memory");
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
  if (mode != 1) asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(0) : "memory");
  const int w = t / 32, g = (t % 32) / 4, c = t % 4;
  for (int j = 0; j < 8; ++j)
    for (int r = 0; r < 4; ++r) d[(16 * w + g + 8 * (r / 2)) * 64 + 8 * j + 2 * c + (r & 1)] = acc[4 * j + r];
}

// One warp, a 16-bit tile of 8 rows x 128 bytes: cp.async writes it column by column (lane l: row
// l % 8, chunks l / 8 and l / 8 + 4), ldmatrix.x4 reads chunks 0-3 of rows 0-7. Row-major, each
// phase's 8 rows share one 16-byte bank group (8 wavefronts); with chunk c of row r stored at
// c ^ r (swizzle), they hit 8 different groups (1 wavefront, simt_bank_stat).
__global__ void bank_kernel(const uint4* src, uint32_t* out, bool swizzle) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int lane = threadIdx.x, r = lane % 8;
  auto at = [&](int row, int chunk) { return smem_u32(smem + row * 128 + 16 * (swizzle ? chunk ^ row : chunk)); };
  for (int i = 0; i < 2; ++i) {
    const int c = lane / 8 + 4 * i;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(at(r, c)), "l"(src + 8 * r + c), "r"(16));
  }
  asm volatile("cp.async.commit_group;\n" ::);
  asm volatile("cp.async.wait_group %0;\n" ::"n"(0));
  __syncthreads();
  uint32_t x[4];
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(x[0]), "=r"(x[1]), "=r"(x[2]), "=r"(x[3])
               : "r"(at(r, lane / 8)));
  for (int j = 0; j < 4; ++j) out[4 * lane + j] = x[j];
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
int selftest_bank(const void* src, uint32_t* out, int swizzle) {
  bank_kernel<<<1, 32, 1024, 0>>>(static_cast<const uint4*>(src), out, swizzle != 0);
  return cudaGetLastError();
}
int selftest_big_smem(float* out, int opt_in) {
  if (opt_in) cudaFuncSetAttribute(big_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024);
  big_smem_kernel<<<1, 32, 64 * 1024, 0>>>(out);
  return cudaGetLastError();
}
int selftest_wgmma(const __half* a, const __half* bt, float* d, int mode) {
  wgmma_kernel<<<1, 128, 3 * 8192, 0>>>(a, bt, d, mode);
  return cudaGetLastError();
}
const char* simt_error(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }
}
