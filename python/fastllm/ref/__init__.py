"""Pure-PyTorch references of every op: the tests' ground truth, the CPU backend and the
benchmarks' baseline. Written for clarity, in float32 (or exact integer) arithmetic."""
from .attention import flash_attention, flash_attention_varlen
from .decode import decode_attention
from .int8 import (int8_matmul, int8_matmul_dynamic, int8_matmul_int32, int8_matmul_static, quantize_static,
                   w8a16_matmul)
from .quantize import quantize_per_token
from .sparse24 import sparse24_int8_matmul, sparse24_int8_matmul_int32, sparse24_matmul

__all__ = ["flash_attention", "flash_attention_varlen", "decode_attention", "quantize_per_token", "quantize_static",
           "int8_matmul", "int8_matmul_int32", "int8_matmul_static", "int8_matmul_dynamic", "w8a16_matmul", "sparse24_matmul",
           "sparse24_int8_matmul", "sparse24_int8_matmul_int32"]
