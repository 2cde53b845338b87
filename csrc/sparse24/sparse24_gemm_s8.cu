// 2:4 sparse GEMM instantiation for int8_t (both tile configs). UNVERIFIED: compiled, never run on a GPU.
// One dtype per unit so the units compile in parallel; the kernel is in sparse24_gemm_kernel.cuh.
#include "sparse24/sparse24_gemm_kernel.cuh"

namespace fastllm {
namespace sparse24 {
template int run<int8_t>(const Params& p, int num_sms, int smem_optin, void* workspace, int64_t workspace_bytes,
                       cudaStream_t stream);
}  // namespace sparse24
}  // namespace fastllm
