// fastllm._C: the only file that includes pybind11.
//
// Every launcher takes integer device pointers, sizes, strides, a device index and a stream
// handle, and returns an int status (0, a cudaError_t, or a fastllm code from common.h).
// Python (python/fastllm/_ext.py) checks tensors before the call and raises on non-zero.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "attention/flash_fwd.h"
#include "decode/decode.h"
#include "common/common.h"
#include "int8/int8_gemm.h"
#include "int8/quantize_per_token.h"
#include "int8/quantize_static.h"
#include "sparse24/sparse24_gemm.h"

namespace py = pybind11;

#ifndef FASTLLM_BUILT_ARCHS
#error "FASTLLM_BUILT_ARCHS must be defined by the build (CMakeLists.txt)"
#endif

namespace {

// Number of devices, or a negative cudaError_t (e.g. -35 "insufficient driver" on a
// machine without a GPU driver): this lets `import fastllm` work everywhere.
int device_count() {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return -static_cast<int>(e);
  }
  return n;
}

// (major, minor) of a device, or raises with the CUDA error string.
std::vector<int> device_capability(int device) {
  cudaDeviceProp p{};
  cudaError_t e = cudaGetDeviceProperties(&p, device);
  if (e != cudaSuccess) throw std::runtime_error(cudaGetErrorString(e));
  return {p.major, p.minor, p.multiProcessorCount};
}

int runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

int driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) return 0;
  return v;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastllm CUDA kernels (no libtorch; pointers in, status code out)";
  m.attr("built_archs") = std::string(FASTLLM_BUILT_ARCHS);
  m.attr("ERR_BASE") = static_cast<int>(fastllm::kErrBase);
  m.def("error_string", &fastllm::status_string, "message for a status code");
  m.def("device_count", &device_count);
  m.def("device_capability", &device_capability);
  m.def("runtime_version", &runtime_version);
  m.def("driver_version", &driver_version);

  // Kernels run without the GIL so other Python threads are not held up by launches.
  m.def("quantize_per_token", &fastllm::quantize_per_token, py::call_guard<py::gil_scoped_release>(),
        py::arg("device"), py::arg("x"), py::arg("dtype"), py::arg("M"), py::arg("K"),
        py::arg("stride_x"), py::arg("q"), py::arg("scale"), py::arg("stream"));
  m.def("quantize_static", &fastllm::quantize_static, py::call_guard<py::gil_scoped_release>(),
        py::arg("device"), py::arg("x"), py::arg("dtype"), py::arg("M"), py::arg("K"), py::arg("stride_x"),
        py::arg("mul"), py::arg("mul_len"), py::arg("q"), py::arg("stream"));
  m.def("int8_gemm", &fastllm::int8_gemm, py::call_guard<py::gil_scoped_release>(), py::arg("device"), py::arg("a"),
        py::arg("lda"), py::arg("b"), py::arg("ldb"), py::arg("out"), py::arg("out_dtype"), py::arg("a_scale"),
        py::arg("a_scale_len"), py::arg("w_scale"), py::arg("bias"), py::arg("bias_dtype"), py::arg("M"),
        py::arg("N"), py::arg("K"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"));
  m.def("int8_gemm_workspace", &fastllm::int8_gemm_workspace, py::arg("device"), py::arg("M"), py::arg("N"),
        py::arg("K"));
  m.def("int8_gemm_plan", &fastllm::int8_gemm_plan, py::arg("M"), py::arg("N"), py::arg("K"), py::arg("num_sms"),
        py::arg("hopper") = false,
        "(config index, K splits) the W8A8 launcher picks (hopper: an sm_90 GPU and a 90a build, where "
        "indices >= 5 are the wgmma configs); host only, works without a GPU");
  m.def("w8a16_gemm", &fastllm::w8a16_gemm, py::call_guard<py::gil_scoped_release>(), py::arg("device"),
        py::arg("dtype"), py::arg("x"), py::arg("ldx"), py::arg("w"), py::arg("ldw"), py::arg("w_scale"),
        py::arg("s_stride_n"), py::arg("s_stride_g"), py::arg("group_size"), py::arg("bias"), py::arg("bias_dtype"),
        py::arg("out"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("stream"));
  m.def("w8a8_decode_gemm", &fastllm::w8a8_decode_gemm, py::call_guard<py::gil_scoped_release>(),
        py::arg("device"), py::arg("dtype"), py::arg("x"), py::arg("ldx"), py::arg("w"), py::arg("ldw"),
        py::arg("w_scale"), py::arg("bias"), py::arg("bias_dtype"), py::arg("in_mul"), py::arg("in_mul_len"),
        py::arg("act_scale"), py::arg("dynamic"), py::arg("out"), py::arg("M"), py::arg("N"), py::arg("K"),
        py::arg("stream"));
  m.def("flash_attention_fwd", &fastllm::flash_attention_fwd, py::call_guard<py::gil_scoped_release>(),
        py::arg("device"), py::arg("dtype"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("lse"), py::arg("mask"), py::arg("batch"), py::arg("heads_q"), py::arg("heads_kv"),
        py::arg("seqlen_q"), py::arg("seqlen_kv"), py::arg("head_dim"), py::arg("q_batch_stride"),
        py::arg("q_head_stride"), py::arg("q_row_stride"), py::arg("k_batch_stride"),
        py::arg("k_head_stride"), py::arg("k_row_stride"), py::arg("v_batch_stride"),
        py::arg("v_head_stride"), py::arg("v_row_stride"), py::arg("mask_batch_stride"),
        py::arg("mask_row_stride"), py::arg("mask_col_stride"), py::arg("sinks"), py::arg("bias"),
        py::arg("bias_dtype"), py::arg("bias_batch_stride"), py::arg("bias_head_stride"),
        py::arg("bias_row_stride"), py::arg("bias_col_stride"), py::arg("scale"), py::arg("window"),
        py::arg("softcap"), py::arg("causal"), py::arg("stream"));
  m.def("flash_attention_varlen_fwd", &fastllm::flash_attention_varlen_fwd,
        py::call_guard<py::gil_scoped_release>(), py::arg("device"), py::arg("dtype"), py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"),
        py::arg("sinks"), py::arg("batch"), py::arg("total_q"), py::arg("total_k"), py::arg("heads_q"),
        py::arg("heads_kv"),
        py::arg("max_seqlen_q"), py::arg("max_seqlen_k"), py::arg("head_dim"), py::arg("q_head_stride"), py::arg("q_row_stride"),
        py::arg("k_head_stride"), py::arg("k_row_stride"), py::arg("v_head_stride"), py::arg("v_row_stride"),
        py::arg("scale"), py::arg("window"), py::arg("softcap"), py::arg("causal"), py::arg("stream"));
  m.def("sparse24_gemm", &fastllm::sparse24_gemm, py::call_guard<py::gil_scoped_release>(), py::arg("device"),
        py::arg("dtype"), py::arg("x"), py::arg("values"), py::arg("meta"), py::arg("out"), py::arg("out_dtype"),
        py::arg("M"), py::arg("N"), py::arg("K"), py::arg("x_row_stride"), py::arg("bias"), py::arg("bias_dtype"),
        py::arg("a_scale"), py::arg("a_scale_per_row"), py::arg("w_scale"), py::arg("workspace"),
        py::arg("workspace_bytes"), py::arg("stream"));
  m.def("sparse24_gemm_workspace", &fastllm::sparse24_gemm_workspace, py::arg("device"), py::arg("dtype"),
        py::arg("M"), py::arg("N"), py::arg("K"));
  m.def("sparse24_gemm_plan", &fastllm::sparse24_gemm_plan, py::arg("dtype"), py::arg("M"), py::arg("N"),
        py::arg("K"), py::arg("num_sms"), py::arg("smem_optin"),
        "(config index 0 NarrowM / 1 SmallM / 2 LargeM, K splits) the 2:4 launcher picks; host only");
  m.def("decode_attention_fwd", &fastllm::decode_attention_fwd, py::call_guard<py::gil_scoped_release>(),
        py::arg("device"), py::arg("dtype"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("lse"), py::arg("out_partial"), py::arg("lse_partial"), py::arg("cache_seqlens"),
        py::arg("block_table"), py::arg("mask"), py::arg("batch"), py::arg("heads_q"), py::arg("heads_kv"),
        py::arg("seqlen_q"), py::arg("head_dim"), py::arg("capacity"), py::arg("page_size"), py::arg("num_pages"),
        py::arg("block_table_stride"), py::arg("q_batch_stride"), py::arg("q_head_stride"), py::arg("q_row_stride"),
        py::arg("k_batch_stride"), py::arg("k_head_stride"), py::arg("k_row_stride"), py::arg("v_batch_stride"),
        py::arg("v_head_stride"), py::arg("v_row_stride"), py::arg("mask_batch_stride"), py::arg("mask_row_stride"),
        py::arg("mask_col_stride"), py::arg("sinks"), py::arg("scale"), py::arg("window"), py::arg("softcap"),
        py::arg("num_splits"), py::arg("stream"));
}
