// fastllm common: error codes, dtype codes and the device guard every launcher uses.
//
// The extension never sees a torch tensor (DESIGN.md, decision 1). A launcher gets raw
// device pointers, sizes, strides, a dtype code and a stream, checks what it can, launches,
// and returns an int: 0 on success, a cudaError_t value on a CUDA failure, or one of the
// fastllm codes below (>= kErrBase) when the arguments are wrong. Python turns a non-zero
// code into an exception through fastllm_error_string().
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace fastllm {

// Own codes start well above every cudaError_t value so the two never collide.
enum Status : int {
  kOk = 0,
  kErrBase = 10000,
  kErrUnsupportedDtype = 10001,  // dtype code the kernel has no instantiation for
  kErrBadShape = 10002,          // a size is negative / zero where it must not be
  kErrMisaligned = 10003,        // a pointer or stride breaks the kernel's alignment needs
  kErrUnsupportedArch = 10004,   // the device's arch has no code in this build
  kErrLast
};

// Must match python/fastllm/_ext.py DTYPE_CODES.
enum DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kInt8 = 3, kInt32 = 4 };
// The float codes (inputs, outputs and biases the launchers accept in any float dtype) and their
// element size.
inline bool float_dtype(int d) { return d == kFloat16 || d == kBFloat16 || d == kFloat32; }
inline int dtype_bytes(int d) { return d == kFloat32 ? 4 : 2; }

inline const char* status_string(int code) {
  switch (code) {
    case kErrUnsupportedDtype: return "unsupported dtype for this kernel";
    case kErrBadShape: return "invalid shape passed to the kernel launcher";
    case kErrMisaligned: return "pointer or stride not aligned as the kernel requires";
    case kErrUnsupportedArch: return "no code for this GPU architecture in this build";
    default: return cudaGetErrorString(static_cast<cudaError_t>(code));
  }
}

// Makes `device` current for the launch and restores the caller's device afterwards, so a
// launch never changes the device PyTorch (or the user) thinks is current.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    status_ = cudaGetDevice(&previous_);
    if (status_ == cudaSuccess && previous_ != device) status_ = cudaSetDevice(device);
  }
  ~DeviceGuard() {
    if (status_ == cudaSuccess) cudaSetDevice(previous_);
  }
  cudaError_t status() const { return status_; }

 private:
  int previous_ = 0;
  cudaError_t status_ = cudaSuccess;
};

// Grid-level split-K for the GEMMs' small-M configs (int8 W8A8, 2:4), where the weights are the
// cost: while the output tiles leave SMs idle, double the K splits, keeping >= kMinKTilesPerSplit
// K tiles (a pipeline's worth) per split, at most kMaxSplitK. Host code (plans run without a GPU).
constexpr int kMaxSplitK = 16;
constexpr int kMinKTilesPerSplit = 4;
inline int split_k_for_tiles(long long tiles, long long k_tiles, int num_sms) {
  int split = 1;
  while (split < kMaxSplitK && tiles * split < num_sms && k_tiles / (2 * split) >= kMinKTilesPerSplit) split *= 2;
  return split;
}

// Kernel switches (FASTLLM_INT8_WGMMA, FASTLLM_SPARSE24_WGMMA): environment variable `name` equals
// `value`. Read per call, so a benchmark can flip a launcher's choice between runs.
inline bool env_is(const char* name, const char* value) {
  const char* e = std::getenv(name);
  return e != nullptr && std::strcmp(e, value) == 0;
}

// Launch epilogue: a bad grid or missing arch shows up here, not at the next sync.
inline int launch_status() { return static_cast<int>(cudaGetLastError()); }

// Opts kernel `Kernel` into `bytes` of dynamic shared memory (needed above 48 KB). The attribute
// belongs to the (function, device) pair, so it is set once per device, not on every launch: a
// driver call per launch is microseconds per layer per decoded token. `Kernel` is a template
// argument so each kernel has its own flags (devices 0..63; others set it every time).
template <auto Kernel>
inline int opt_in_dynamic_smem(int bytes) {
  if (bytes <= 48 * 1024) return 0;
  static std::atomic<uint64_t> done{0};
  int device = 0;
  const cudaError_t ge = cudaGetDevice(&device);
  if (ge != cudaSuccess) return static_cast<int>(ge);
  const uint64_t bit = device < 64 ? (uint64_t{1} << device) : 0;
  if (bit && (done.load(std::memory_order_relaxed) & bit)) return 0;
  const cudaError_t e = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e != cudaSuccess) {
    cudaGetLastError();  // not sticky: clear it, or the next launch_status() would report it
    return static_cast<int>(e);
  }
  done.fetch_or(bit, std::memory_order_relaxed);
  return 0;
}

}  // namespace fastllm
