// 2:4 sparse GEMM on Hopper (wgmma.sp), instantiation for __nv_bfloat16. sm_90a only (CMakeLists.txt builds
// *_sm90a.cu units for compute_90a alone). UNVERIFIED: compiled, never run on a GPU.
#include "sparse24/sparse24_wgmma_kernel.cuh"

namespace fastllm {
namespace sparse24 {
template int run_wgmma<__nv_bfloat16>(const Params& p, cudaStream_t stream);
}  // namespace sparse24
}  // namespace fastllm
