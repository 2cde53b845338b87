// Host side of the TMA-fed Hopper W8A8 GEMM (int8_wgmma_tma_kernel.cuh): tensor maps of the
// int8 operands. cuTensorMapEncodeTiled is a driver function; the extension links no libcuda
// (static cudart only), so it is looked up once through the runtime's driver entry point.
// UNVERIFIED: compiled, never run on a GPU.
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>

#include "common/common.h"
#include "int8/int8_wgmma_tma_kernel.cuh"

namespace fastllm {
namespace int8 {
namespace {

using EncodeTiled = PFN_cuTensorMapEncodeTiled_v12000;  // the driver's own typedef: checked signature

EncodeTiled encode_fn() {
  static EncodeTiled fn = nullptr;
  static std::once_flag once;
  std::call_once(once, [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q) ==
            cudaSuccess &&
        q == cudaDriverEntryPointSuccess)
      fn = reinterpret_cast<EncodeTiled>(p);
    else
      cudaGetLastError();  // a failed lookup must not linger as the next launch's error
  });
  return fn;
}

}  // namespace

int make_operand_map(CUtensorMap* map, const int8_t* base, int64_t rows, int64_t K, int64_t ld, int box_rows) {
  const EncodeTiled encode = encode_fn();
  if (encode == nullptr) return kErrUnsupportedArch;
  if (rows <= 0 || K <= 0 || ld % 16 || reinterpret_cast<uintptr_t>(base) % 16) return kErrMisaligned;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(K), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(ld)};  // bytes between rows
  const cuuint32_t box[2] = {128, static_cast<cuuint32_t>(box_rows)};  // 128 bytes = one swizzle row
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUresult r = encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<int8_t*>(base), dims, strides, box,
                            elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? kOk : kErrMisaligned;
}

}  // namespace int8
}  // namespace fastllm
