"""Public ops. Each is a torch.library custom op (fastllm::<name>) with a fake impl, served
by the cuda, triton or torch backend chosen through fastllm.ops.registry."""
from .attention import flash_attention, flash_attention_varlen
from .decode import decode_attention
from .int8 import int8_matmul, int8_matmul_int32, w8a16_matmul
from .int8_dynamic import int8_matmul_dynamic
from .int8_static import int8_matmul_static
from .quantize import quantize_per_token
from .registry import BACKENDS, OPS
from .sparse24 import sparse24_int8_matmul, sparse24_int8_matmul_int32, sparse24_matmul

from . import _inference_only  # noqa: E402  (after every op is defined)

_inference_only.register()

__all__ = ["flash_attention", "flash_attention_varlen", "decode_attention", "quantize_per_token", "int8_matmul",
           "int8_matmul_int32", "int8_matmul_static", "int8_matmul_dynamic", "w8a16_matmul", "sparse24_matmul", "sparse24_int8_matmul",
           "sparse24_int8_matmul_int32", "BACKENDS", "OPS"]
