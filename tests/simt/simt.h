// SIMT emulator: runs fastllm's CUDA kernels, compiled from their own source by a host C++
// compiler, on the CPU (a test tool; tests/simt/build.py force-includes this header).
//
// Each thread of a block is a fiber with its own stack; all fibers of a block share the
// emulated shared memory, and blocks run one after the other. Fibers switch only at the
// points where threads synchronize: __syncthreads, and the warp-wide instructions (shuffles,
// ldmatrix, mma, reductions, __syncwarp), which gather the operands of all 32 lanes and
// compute them as the PTX ISA defines. build.py rewrites each `asm` statement of the sources
// into a call of simt::ptx::<mnemonic> below (and refuses instructions it has no model for),
// each `kernel<<<grid, block, smem, stream>>>(args)` into simt::launch, and the dynamic
// `extern __shared__` array into the block's shared-memory arena.
//
// Checks the hardware would turn into faults or garbage, reported as a launch failure with a
// message (cudaGetErrorString of the code): shared addresses outside the arena or misaligned,
// lanes of a warp in different warp-wide instructions, a lane exiting while its warp waits,
// deadlock at a barrier, dynamic shared memory above the opt-in, bad launch shapes. cp.async
// is modelled as asynchronous: the destination reads as NaN (0xFF bytes) from the issue until
// the issuing thread's cp.async.wait_group covers it AND that thread then reaches a barrier
// (__syncthreads / __syncwarp), so a missing wait or barrier shows in the results. (A thread
// reading its own copy after the wait without a barrier, legal on hardware, would read NaN too:
// no kernel here does.) The Hopper instructions (wgmma, mbarrier, TMA: simt_hopper.cpp) are
// asynchronous in the same spirit: see that file's header.
// Counted: the shared-memory wavefronts of ldmatrix and of each warp's cp.async against the
// conflict-free ideal (bank conflicts: simt_runtime.cpp bank_phase, backend.bank_counts).
// Not modelled: memory-model reordering, timing, registers; global-memory bounds only for
// buffers placed against an inaccessible page (backend.guarded, the glue's outputs).
#pragma once

// Before the CUDA headers: they define these only where the host compiler has not.
#define __global__
#define __device__
#define __host__
#define __launch_bounds__(...)
#define __grid_constant__

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

namespace simt {

// ---- the scheduler (simt_runtime.cpp) --------------------------------------------------------
struct ThreadState {
  uint3 tid;
  int lane, warp;
};
ThreadState& self();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
unsigned char* smem_base();
size_t smem_size();
[[noreturn]] void fail(const char* fmt, ...);
void syncthreads();
int syncthreads_or(int pred);
void syncwarp();
// Warp-wide exchange: every lane passes `in` (bytes) and a tag naming the instruction; when all
// lanes of the warp have arrived, the last one calls compute(ins, outs) once for the warp; then
// each lane gets its own `out`. Lanes in different instructions fail the launch.
using WarpCompute = void (*)(const unsigned char (*ins)[64], unsigned char (*outs)[64], const void* ctx);
void warp_exchange(const char* tag, const void* in, size_t in_bytes, void* out, size_t out_bytes,
                   WarpCompute compute, const void* ctx = nullptr);
// cp.async bookkeeping, per thread.
void cp_async_issue(uint32_t dst, const void* src, bool valid);
void cp_async_commit();
void cp_async_wait(int n);
void launch_grid(const void* kernel, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body);

template <typename T>
T* smem_at(uint32_t addr, size_t bytes, size_t align, const char* what) {
  if (addr % align != 0 || addr + bytes > smem_size())
    fail("%s: shared address %u (+%zu bytes) outside the %zu-byte arena or not %zu-byte aligned", what, addr, bytes,
         smem_size(), align);
  return reinterpret_cast<T*>(smem_base() + addr);
}

// Static shared arrays: poisoned (0xFF) once per block, by the first thread to declare them.
void poison_once(void* p, size_t bytes);

// Dynamic shared memory: `extern __shared__ T name[]` becomes `T* name = simt::dynamic_smem<T>()`.
template <typename T>
T* dynamic_smem() {
  return reinterpret_cast<T*>(smem_base());
}

// kernel<<<grid, block, smem, stream>>>(args...) -> simt::launch(kernel, grid, block, smem, stream, args...)
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t, A&&... args) {
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  launch_grid(reinterpret_cast<const void*>(kernel), grid, block, smem, [&] { std::apply(kernel, params); });
}

// ---- warp-wide instructions ------------------------------------------------------------------
template <typename T>
T shfl_xor(T v, int lane_mask, int width) {
  static_assert(sizeof(T) <= 8, "shuffle of a scalar");
  if (width != 32) fail("__shfl_xor_sync: width %d not modelled", width);
  struct In {
    T v;
    int mask;
  } in{v, lane_mask};
  T out;
  // shfl.sync.bfly: lane l reads lane l ^ (its own b & 31).
  warp_exchange("shfl.xor", &in, sizeof in, &out, sizeof(T),
                [](const unsigned char (*ins)[64], unsigned char (*outs)[64], const void*) {
                  for (int l = 0; l < 32; ++l) {
                    In mine;
                    std::memcpy(&mine, ins[l], sizeof mine);
                    In src;
                    std::memcpy(&src, ins[l ^ (mine.mask & 31)], sizeof src);
                    std::memcpy(outs[l], &src.v, sizeof(T));
                  }
                });
  return out;
}

template <typename T, bool Max>
T reduce_minmax(T v) {
  T out;
  warp_exchange(
      Max ? "redux.max" : "redux.min", &v, sizeof(T), &out, sizeof(T),
      [](const unsigned char (*ins)[64], unsigned char (*outs)[64], const void*) {
        T r;
        std::memcpy(&r, ins[0], sizeof(T));
        for (int l = 1; l < 32; ++l) {
          T x;
          std::memcpy(&x, ins[l], sizeof(T));
          r = Max ? (x > r ? x : r) : (x < r ? x : r);
        }
        for (int l = 0; l < 32; ++l) std::memcpy(outs[l], &r, sizeof(T));
      });
  return out;
}

inline void full_mask(unsigned mask, const char* what) {
  if (mask != 0xffffffffu) fail("%s: mask %#x is not the full warp (not modelled)", what, mask);
}

namespace ptx {
// The instructions build.py maps `asm` statements to, named after their mnemonics; operands in
// the order of the asm's %N numbering.
void cp_async_cg_shared_global(uint32_t dst, const void* src, int cp_size, int src_size);
void cp_async_commit_group();
void cp_async_wait_group(int n);
void ldmatrix_sync_aligned_m8n8_x4_shared_b16(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, uint32_t addr);
void ldmatrix_sync_aligned_m8n8_x4_trans_shared_b16(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3,
                                                     uint32_t addr);
void mma_sync_aligned_m16n8k16_row_col_f32_f16_f16_f32(float& d0, float& d1, float& d2, float& d3, uint32_t a0,
                                                      uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1);
void mma_sync_aligned_m16n8k16_row_col_f32_bf16_bf16_f32(float& d0, float& d1, float& d2, float& d3, uint32_t a0,
                                                        uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                                        uint32_t b1);
void mma_sync_aligned_m16n8k32_row_col_s32_s8_s8_s32(int& d0, int& d1, int& d2, int& d3,
                                                    uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                                    uint32_t b1);
void mma_sp_ordered_metadata_sync_aligned_m16n8k32_row_col_f32_f16_f16_f32(
    float& d0, float& d1, float& d2, float& d3, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
    uint32_t b1, uint32_t b2, uint32_t b3, uint32_t e, int sel);
void mma_sp_ordered_metadata_sync_aligned_m16n8k32_row_col_f32_bf16_bf16_f32(
    float& d0, float& d1, float& d2, float& d3, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
    uint32_t b1, uint32_t b2, uint32_t b3, uint32_t e, int sel);
void mma_sp_ordered_metadata_sync_aligned_m16n8k64_row_col_s32_s8_s8_s32(
    int& d0, int& d1, int& d2, int& d3, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
    uint32_t b0, uint32_t b1, uint32_t b2, uint32_t b3, uint32_t e, int sel);

// ---- Hopper (simt_hopper.cpp) ----
// wgmma: issued per thread, executed when a wgmma.wait_group of the whole warpgroup retires
// its group (operands read then: shared memory through the descriptors, the A registers as
// copied at issue; accumulators written back once no unretired op owns them).
enum WgType { kWgF16 = 0, kWgBF16 = 1, kWgS8 = 2 };
// `regs` = the N / 2 accumulator registers, `rest` = the other operands in template order.
void wgmma_issue(int n, int k, WgType type, bool sparse, void* const* regs, const uint64_t* rest, int nrest);
template <int N, int K, WgType Type, bool Sparse, typename... A>
void wgmma_call(A&&... a) {
  constexpr int kD = N / 2, kRest = static_cast<int>(sizeof...(A)) - N / 2;
  static_assert(kRest > 0, "wgmma: accumulators + operands");
  void* regs[kD];
  uint64_t rest[kRest];
  int i = 0;
  auto one = [&](auto&& x) {  // x is an lvalue here, also for an immediate
    if (i < kD)
      regs[i] = const_cast<void*>(static_cast<const void*>(&x));
    else
      rest[i - kD] = static_cast<uint64_t>(x);
    ++i;
  };
  (one(std::forward<A>(a)), ...);
  wgmma_issue(N, K, Type, Sparse, regs, rest, kRest);
}
#define SIMT_WGMMA(NAME, N, K, TYPE, SPARSE) \
  template <typename... A>                 \
  void NAME(A&&... a) {                    \
    wgmma_call<N, K, TYPE, SPARSE>(std::forward<A>(a)...); \
  }
SIMT_WGMMA(wgmma_mma_async_sync_aligned_m64n128k32_s32_s8_s8, 128, 32, kWgS8, false)
SIMT_WGMMA(wgmma_mma_async_sync_aligned_m64n256k32_s32_s8_s8, 256, 32, kWgS8, false)
SIMT_WGMMA(wgmma_mma_async_sp_sync_aligned_m64n128k32_f32_f16_f16, 128, 32, kWgF16, true)
SIMT_WGMMA(wgmma_mma_async_sp_sync_aligned_m64n128k32_f32_bf16_bf16, 128, 32, kWgBF16, true)
SIMT_WGMMA(wgmma_mma_async_sp_sync_aligned_m64n128k64_s32_s8_s8, 128, 64, kWgS8, true)
SIMT_WGMMA(wgmma_mma_async_sync_aligned_m64n64k16_f32_f16_f16, 64, 16, kWgF16, false)
SIMT_WGMMA(wgmma_mma_async_sync_aligned_m64n64k16_f32_bf16_bf16, 64, 16, kWgBF16, false)
SIMT_WGMMA(wgmma_mma_async_sync_aligned_m64n128k16_f32_f16_f16, 128, 16, kWgF16, false)
SIMT_WGMMA(wgmma_mma_async_sync_aligned_m64n128k16_f32_bf16_bf16, 128, 16, kWgBF16, false)
SIMT_WGMMA(wgmma_mma_async_sync_aligned_m64n256k16_f32_f16_f16, 256, 16, kWgF16, false)
SIMT_WGMMA(wgmma_mma_async_sync_aligned_m64n256k16_f32_bf16_bf16, 256, 16, kWgBF16, false)
#undef SIMT_WGMMA
void wgmma_fence_sync_aligned();
void wgmma_commit_group_sync_aligned();
void wgmma_wait_group_sync_aligned(int n);
void fence_proxy_async_shared_cta();
// mbarrier (an 8-byte shared object; its state is kept beside the arena) and TMA.
void mbarrier_init_shared_cta_b64(uint32_t bar, uint32_t count);
void fence_mbarrier_init_release_cluster();
void mbarrier_arrive_expect_tx_shared_cta_b64(uint32_t bar, uint32_t bytes);
void mbarrier_arrive_shared_cta_b64(uint32_t bar);
void mbarrier_try_wait_parity_shared_cta_b64(uint32_t& done, uint32_t bar, uint32_t parity);
void cp_async_bulk_tensor_2d_shared_cluster_global_mbarrier_complete_tx_bytes(uint32_t dst, uint64_t map, int c0,
                                                                            int c1, uint32_t bar);

inline void ex2_approx_ftz_f32(float& y, float x) {
  // ftz: subnormal inputs and results are flushed to (sign-preserving) zero.
  if (std::fpclassify(x) == FP_SUBNORMAL) x = 0.f;
  y = std::exp2(x);
  if (std::fpclassify(y) == FP_SUBNORMAL) y = 0.f;
}
inline void ld_global_nc_L1_no_allocate_v4_u32(uint32_t& x, uint32_t& y, uint32_t& z, uint32_t& w, const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16) fail("ld.global.v4.u32: address %p not 16-byte aligned", p);
  const uint32_t* q = static_cast<const uint32_t*>(p);
  x = q[0], y = q[1], z = q[2], w = q[3];
}
}  // namespace ptx
}  // namespace simt

// ---- CUDA built-ins --------------------------------------------------------------------------
#define threadIdx (::simt::self().tid)
#define blockIdx (::simt::block_idx())
#define blockDim (::simt::block_dim())
#define gridDim (::simt::grid_dim())

inline void __syncthreads() { ::simt::syncthreads(); }
inline int __syncthreads_or(int pred) { return ::simt::syncthreads_or(pred); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::simt::full_mask(mask, "__syncwarp");
  ::simt::syncwarp();
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  ::simt::full_mask(mask, "__shfl_xor_sync");
  return ::simt::shfl_xor(v, lane_mask, width);
}
// __reduce_{min,max}_sync exist for int and unsigned.
template <typename T, typename = std::enable_if_t<std::is_same<T, int>::value || std::is_same<T, unsigned>::value>>
inline T __reduce_min_sync(unsigned mask, T v) {
  ::simt::full_mask(mask, "__reduce_min_sync");
  return ::simt::reduce_minmax<T, false>(v);
}
template <typename T, typename = std::enable_if_t<std::is_same<T, int>::value || std::is_same<T, unsigned>::value>>
inline T __reduce_max_sync(unsigned mask, T v) {
  ::simt::full_mask(mask, "__reduce_max_sync");
  return ::simt::reduce_minmax<T, true>(v);
}
template <typename T>
inline T __ldg(const T* p) { return *p; }
inline uint32_t __cvta_generic_to_shared(const void* p) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  if (c < ::simt::smem_base() || c > ::simt::smem_base() + ::simt::smem_size())
    ::simt::fail("__cvta_generic_to_shared: %p is not in the block's shared memory", p);
  return static_cast<uint32_t>(c - ::simt::smem_base());
}
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t v = (static_cast<uint64_t>(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<unsigned>((v >> (8 * ((s >> (4 * i)) & 7))) & 0xFF) << (8 * i);
  return r;
}
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
// Built with -ffp-contract=off: these round once each, as the _rn intrinsics do.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float __int2float_rn(int i) { return static_cast<float>(i); }
inline int __float2int_rn(float f) {
  if (std::isnan(f)) return 0;
  const float r = std::nearbyint(f);   // default rounding mode: to nearest, ties to even
  if (r >= 2147483648.f) return 2147483647;
  if (r < -2147483648.f) return -2147483647 - 1;
  return static_cast<int>(r);
}

// Device-code min / max overloads (the CUDA math headers declare them for device code only).
#define SIMT_MINMAX(T)                                \
  inline T min(T a, T b) { return b < a ? b : a; }    \
  inline T max(T a, T b) { return a < b ? b : a; }
SIMT_MINMAX(int)
SIMT_MINMAX(unsigned)
SIMT_MINMAX(long)
SIMT_MINMAX(unsigned long)
SIMT_MINMAX(long long)
SIMT_MINMAX(unsigned long long)
#undef SIMT_MINMAX
// PTX min.f32 / max.f32: a NaN operand yields the other one; -0.0 < +0.0.
inline float min(float a, float b) {
  if (std::isnan(a)) return b;
  if (std::isnan(b)) return a;
  if (a == b) return std::signbit(a) ? a : b;
  return a < b ? a : b;
}
inline float max(float a, float b) {
  if (std::isnan(a)) return b;
  if (std::isnan(b)) return a;
  if (a == b) return std::signbit(a) ? b : a;
  return a < b ? b : a;
}
// The kernels' fminf / fmaxf are PTX min / max too (libm's differ on signed zeros). <cmath>
// was included above, so the macros touch only the code that follows.
#define fminf(a, b) min(static_cast<float>(a), static_cast<float>(b))
#define fmaxf(a, b) max(static_cast<float>(a), static_cast<float>(b))

// cuda_runtime.h's typed overload (declared for nvcc only).
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F* f, cudaFuncAttribute a, int v) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(f), a, v);
}

// Atomics: fibers switch only at synchronization points, so a plain read-modify-write is atomic.
template <typename T>
inline T atomicMin(T* p, T v) {
  const T old = *p;
  *p = v < old ? v : old;
  return old;
}
template <typename T>
inline T atomicMax(T* p, T v) {
  const T old = *p;
  *p = old < v ? v : old;
  return old;
}
template <typename T>
inline T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}

// Device math spelled without std:: in kernels.
using std::isinf;
using std::isnan;
using std::isfinite;
