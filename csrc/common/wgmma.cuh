// Hopper (sm_90a) PTX wrappers: warpgroup MMA (wgmma) on shared-memory operands, its fences,
// and the shared-memory matrix descriptor. Included only by *_sm90a.cu units (CMakeLists.txt
// builds those for compute_90a alone: wgmma does not exist on other targets).
// UNVERIFIED: compiled for sm_90a; never run on a GPU.
//
// The operand layout used here (PTX ISA, "asynchronous warpgroup level matrix shared memory
// layout", 128-byte swizzle, K-major): a tile of R rows x 128 bytes (one row = 128 int8 k, or
// 64 fp16 k) stored row after row, 16-byte chunk c of row r at chunk position c ^ (r % 8). Eight
// rows (1024 bytes) make one swizzle atom; atoms follow each other along M / N, so the
// descriptor's stride byte offset (between 8-row groups) is 1024 and its leading byte offset is
// unused (the K extent of one MMA, 32 bytes, lies inside a row). The swizzle is a function of
// the address bits (bits 4-6 ^= bits 7-9), so a tile must start 1024-byte aligned, and a K
// step inside the row is just +32 bytes on the start address.
// This is exactly int8::SwizzledTile<rows, 8> (int8_gemm_kernel.cuh), which the cp.async loads
// of the sm80 kernel already write.
#pragma once

#include <cstdint>

namespace fastllm {
namespace wgmma {

// Descriptor of a 128-byte-swizzled tile at shared address `addr` (1024-aligned):
//   bits 0-13 start address >> 4, 16-29 leading byte offset >> 4, 32-45 stride byte offset >> 4
//   (1024 B between 8-row groups), 62-63 swizzle (1 = 128 B).
__device__ __forceinline__ uint64_t desc_sw128_lbo(uint32_t addr, uint32_t lbo_bytes) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>((lbo_bytes & 0x3FFFF) >> 4) << 16) |
         (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);
}
// K-major: the leading byte offset is unused (the K extent of one MMA lies inside a 128-byte
// row); set to 16 bytes (encoded 1).
__device__ __forceinline__ uint64_t desc_sw128(uint32_t addr) { return desc_sw128_lbo(addr, 16); }
// N-major (imm-trans-b = 1) B tile: the same storage as above read the other way round. Rows are
// the MMA's K (e.g. keys of a V tile), each row holds 64 16-bit N values (128 bytes), 8 rows
// make one 1024-byte atom (the stride byte offset, between 8-row groups along K), and the leading
// byte offset is the distance between 64-wide N blocks (`n_block_bytes`; one block's rows follow
// each other, then the next block's): PTX ISA, "leading dimension byte offset", MN-major
// swizzled layouts.
__device__ __forceinline__ uint64_t desc_sw128_mn(uint32_t addr, uint32_t n_block_bytes) {
  return desc_sw128_lbo(addr, n_block_bytes);
}

// Orders this thread's earlier register / shared-memory accesses before the warpgroup's next
// wgmma (needed before the first wgmma and whenever the accumulators were touched).
__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void commit_group() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Wait until at most N committed wgmma groups of this warpgroup are still running.
template <int N>
__device__ __forceinline__ void wait_group() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Tells the compiler the accumulators may change under it (the async MMA writes them): no read
// of them may move above the wait_group that retires it, nor a write below a wgmma.
template <int kN>
__device__ __forceinline__ void fence_operands(int (&d)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+r"(d[i])::"memory");
}
template <int kN>
__device__ __forceinline__ void fence_operands(uint32_t (&d)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+r"(d[i])::"memory");
}
template <int kN>
__device__ __forceinline__ void fence_operands(float (&d)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
// Shared memory written through the generic proxy (st.shared, cp.async) and read next by the
// tensor cores (async proxy): each writing thread fences before the barrier.
__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// The accumulator operands of an m64nN wgmma, written once: "{%0, ..., %(N/2 - 1)}" and the
// matching constraint list C(d[0]), ..., C(d[N/2 - 1]) (C is "+r" for s32, "+f" for f32).
#define FASTLLM_WGMMA_R0_31 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define FASTLLM_WGMMA_R0_63 \
  FASTLLM_WGMMA_R0_31 ", " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define FASTLLM_WGMMA_R64_127 \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
  "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
#define FASTLLM_WGMMA_D32 "{" FASTLLM_WGMMA_R0_31 "}"
#define FASTLLM_WGMMA_D64 "{" FASTLLM_WGMMA_R0_63 "}"
#define FASTLLM_WGMMA_D128 "{" FASTLLM_WGMMA_R0_63 ", " FASTLLM_WGMMA_R64_127 "}"
#define FASTLLM_WGMMA_OPS32(C) \
  C(d[0]), C(d[1]), C(d[2]), C(d[3]), C(d[4]), C(d[5]), C(d[6]), C(d[7]), \
  C(d[8]), C(d[9]), C(d[10]), C(d[11]), C(d[12]), C(d[13]), C(d[14]), C(d[15]), \
  C(d[16]), C(d[17]), C(d[18]), C(d[19]), C(d[20]), C(d[21]), C(d[22]), C(d[23]), \
  C(d[24]), C(d[25]), C(d[26]), C(d[27]), C(d[28]), C(d[29]), C(d[30]), C(d[31])
#define FASTLLM_WGMMA_OPS64(C) \
  FASTLLM_WGMMA_OPS32(C), \
  C(d[32]), C(d[33]), C(d[34]), C(d[35]), C(d[36]), C(d[37]), C(d[38]), C(d[39]), \
  C(d[40]), C(d[41]), C(d[42]), C(d[43]), C(d[44]), C(d[45]), C(d[46]), C(d[47]), \
  C(d[48]), C(d[49]), C(d[50]), C(d[51]), C(d[52]), C(d[53]), C(d[54]), C(d[55]), \
  C(d[56]), C(d[57]), C(d[58]), C(d[59]), C(d[60]), C(d[61]), C(d[62]), C(d[63])
#define FASTLLM_WGMMA_OPS128(C) \
  FASTLLM_WGMMA_OPS64(C), \
  C(d[64]), C(d[65]), C(d[66]), C(d[67]), C(d[68]), C(d[69]), C(d[70]), C(d[71]), \
  C(d[72]), C(d[73]), C(d[74]), C(d[75]), C(d[76]), C(d[77]), C(d[78]), C(d[79]), \
  C(d[80]), C(d[81]), C(d[82]), C(d[83]), C(d[84]), C(d[85]), C(d[86]), C(d[87]), \
  C(d[88]), C(d[89]), C(d[90]), C(d[91]), C(d[92]), C(d[93]), C(d[94]), C(d[95]), \
  C(d[96]), C(d[97]), C(d[98]), C(d[99]), C(d[100]), C(d[101]), C(d[102]), C(d[103]), \
  C(d[104]), C(d[105]), C(d[106]), C(d[107]), C(d[108]), C(d[109]), C(d[110]), C(d[111]), \
  C(d[112]), C(d[113]), C(d[114]), C(d[115]), C(d[116]), C(d[117]), C(d[118]), C(d[119]), \
  C(d[120]), C(d[121]), C(d[122]), C(d[123]), C(d[124]), C(d[125]), C(d[126]), C(d[127])

// D (64 x N s32) += A (64 x 32 s8) * B (32 x N s8); A, B K-major in shared memory (descriptors),
// scale-d = 1 (accumulate: the caller zeroes D first). The warpgroup's 128 threads hold D as
// N / 2 registers each: warp w of the group owns rows 16w..16w+15; with g = lane / 4,
// c = lane % 4, registers 4j..4j+3 hold (16w + g, 8j + 2c), (16w + g, 8j + 2c + 1),
// (16w + g + 8, 8j + 2c), (16w + g + 8, 8j + 2c + 1): the mma.sync m16n8 D layout, repeated
// over the N / 8 column tiles. Integer accumulation is exact.
__device__ __forceinline__ void wgmma_m64n128k32_s8(int (&d)[64], uint64_t desc_a, uint64_t desc_b) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 " FASTLLM_WGMMA_D64 ", %64, %65, 1;\n"
               : FASTLLM_WGMMA_OPS64("+r")
               : "l"(desc_a), "l"(desc_b)
               : "memory");
}
__device__ __forceinline__ void wgmma_m64n256k32_s8(int (&d)[128], uint64_t desc_a, uint64_t desc_b) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n256k32.s32.s8.s8 " FASTLLM_WGMMA_D128 ", %128, %129, 1;\n"
               : FASTLLM_WGMMA_OPS128("+r")
               : "l"(desc_a), "l"(desc_b)
               : "memory");
}

// Sparse A (2:4 along K): wgmma.mma_async.sp. A is the compressed (64 x K/2) matrix, laid out and
// described exactly like a dense K-major A of half the width (32 bytes per MMA: 16 fp16 / bf16
// or 32 int8 non-zeros); B is dense (K-major, 64 bytes per MMA). `meta` is this thread's
// metadata register, which per warp (rows 16w..16w+15 of the 64) follows mma.sp's layout
// (fp16 / bf16 m16n8k32: the thread pair kSel of each quad; s8 m16n8k64: all four threads,
// selector 0). scale-d = 1 (accumulate), A / B scales 1, no transposes (K-major).
#define FASTLLM_WGMMA_SP_16BIT(NAME, TYPE)                                                                   \
  template <int kSel>                                                                                       \
  __device__ __forceinline__ void NAME(float(&d)[64], uint64_t desc_a, uint64_t desc_b, uint32_t meta) {    \
    asm volatile("wgmma.mma_async.sp.sync.aligned.m64n128k32.f32." TYPE "." TYPE " " FASTLLM_WGMMA_D64      \
                 ", %64, %65, %66, %67, 1, 1, 1, 0, 0;\n"                                                   \
                 : FASTLLM_WGMMA_OPS64("+f")                                                                \
                 : "l"(desc_a), "l"(desc_b), "r"(meta), "n"(kSel)                                           \
                 : "memory");                                                                               \
  }
FASTLLM_WGMMA_SP_16BIT(wgmma_sp_m64n128k32_f16, "f16")
FASTLLM_WGMMA_SP_16BIT(wgmma_sp_m64n128k32_bf16, "bf16")
#undef FASTLLM_WGMMA_SP_16BIT
template <int kSel>
__device__ __forceinline__ void wgmma_sp_m64n128k64_s8(int (&d)[64], uint64_t desc_a, uint64_t desc_b, uint32_t meta) {
  static_assert(kSel == 0, "s8 k64: all four threads of a quad hold metadata");
  asm volatile("wgmma.mma_async.sp.sync.aligned.m64n128k64.s32.s8.s8 " FASTLLM_WGMMA_D64 ", %64, %65, %66, 0, 1;\n"
               : FASTLLM_WGMMA_OPS64("+r")
               : "l"(desc_a), "l"(desc_b), "r"(meta)
               : "memory");
}

// Dense 16-bit MMAs with fp32 accumulators (flash attention, flash_fwd_wgmma.cuh), D (64 x N):
//   ss: D (+)= A (64 x 16, K-major, descriptor) * B (16 x N, K-major, descriptor);
//   rs: D (+)= A (64 x 16, registers) * B (16 x N, N-major: imm-trans-b = 1, descriptor).
// `accumulate` is wgmma's scale-d as a predicate: 0 makes D = A * B (the first k step of a
// tile, so D need not be zeroed first). The A registers of the rs form follow mma.sync
// m16n8k16's A fragment per warp (warp w rows 16w..16w+15): a[0] (g, 2c..2c+1), a[1] (g + 8,
// 2c..), a[2] (g, 8 + 2c..), a[3] (g + 8, 8 + 2c..), two 16-bit values per register, the lower
// column in the low half; D is laid out as described above for s8.
#define FASTLLM_WGMMA_SS_16BIT(NAME, N, TYPE, DLIST, OPS, IA, IB, IS)                                         \
  __device__ __forceinline__ void NAME(float(&d)[N / 2], uint64_t desc_a, uint64_t desc_b, int accumulate) { \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" IS ", 0;\n"                                              \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TYPE "." TYPE " " DLIST ", %" IA ", %" IB  \
                 ", p, 1, 1, 0, 0;\n}\n"                                                                       \
                 : OPS("+f")                                                                                \
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate)                                                \
                 : "memory");                                                                               \
  }
#define FASTLLM_WGMMA_RS_16BIT(NAME, N, TYPE, DLIST, OPS, A0, A1, A2, A3, IB, IS)                             \
  __device__ __forceinline__ void NAME(float(&d)[N / 2], const uint32_t(&a)[4], uint64_t desc_b,             \
                                       int accumulate) {                                                    \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" IS ", 0;\n"                                              \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TYPE "." TYPE " " DLIST ", {%" A0 ", %" A1 \
                 ", %" A2 ", %" A3 "}, %" IB ", p, 1, 1, 1;\n}\n"                                               \
                 : OPS("+f")                                                                                \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate)                \
                 : "memory");                                                                               \
  }
FASTLLM_WGMMA_SS_16BIT(ss_m64n64k16_f16, 64, "f16", FASTLLM_WGMMA_D32, FASTLLM_WGMMA_OPS32, "32", "33", "34")
FASTLLM_WGMMA_SS_16BIT(ss_m64n64k16_bf16, 64, "bf16", FASTLLM_WGMMA_D32, FASTLLM_WGMMA_OPS32, "32", "33", "34")
FASTLLM_WGMMA_SS_16BIT(ss_m64n128k16_f16, 128, "f16", FASTLLM_WGMMA_D64, FASTLLM_WGMMA_OPS64, "64", "65", "66")
FASTLLM_WGMMA_SS_16BIT(ss_m64n128k16_bf16, 128, "bf16", FASTLLM_WGMMA_D64, FASTLLM_WGMMA_OPS64, "64", "65", "66")
FASTLLM_WGMMA_RS_16BIT(rs_m64n64k16_f16, 64, "f16", FASTLLM_WGMMA_D32, FASTLLM_WGMMA_OPS32, "32", "33", "34", "35", "36",
                       "37")
FASTLLM_WGMMA_RS_16BIT(rs_m64n64k16_bf16, 64, "bf16", FASTLLM_WGMMA_D32, FASTLLM_WGMMA_OPS32, "32", "33", "34", "35",
                       "36", "37")
FASTLLM_WGMMA_RS_16BIT(rs_m64n128k16_f16, 128, "f16", FASTLLM_WGMMA_D64, FASTLLM_WGMMA_OPS64, "64", "65", "66", "67",
                       "68", "69")
FASTLLM_WGMMA_RS_16BIT(rs_m64n128k16_bf16, 128, "bf16", FASTLLM_WGMMA_D64, FASTLLM_WGMMA_OPS64, "64", "65", "66",
                       "67", "68", "69")
FASTLLM_WGMMA_RS_16BIT(rs_m64n256k16_f16, 256, "f16", FASTLLM_WGMMA_D128, FASTLLM_WGMMA_OPS128, "128", "129", "130",
                       "131", "132", "133")
FASTLLM_WGMMA_RS_16BIT(rs_m64n256k16_bf16, 256, "bf16", FASTLLM_WGMMA_D128, FASTLLM_WGMMA_OPS128, "128", "129",
                       "130", "131", "132", "133")
#undef FASTLLM_WGMMA_SS_16BIT
#undef FASTLLM_WGMMA_RS_16BIT

#undef FASTLLM_WGMMA_R0_31
#undef FASTLLM_WGMMA_D32
#undef FASTLLM_WGMMA_OPS32
#undef FASTLLM_WGMMA_R0_63
#undef FASTLLM_WGMMA_R64_127
#undef FASTLLM_WGMMA_D64
#undef FASTLLM_WGMMA_D128
#undef FASTLLM_WGMMA_OPS64
#undef FASTLLM_WGMMA_OPS128

}  // namespace wgmma
}  // namespace fastllm
