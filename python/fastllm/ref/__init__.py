"""Pure-PyTorch references of every op: the tests' ground truth, the CPU backend and the
benchmarks' baseline. Written for clarity, in float32 (or exact integer) arithmetic."""
from .quantize import quantize_per_token

__all__ = ["quantize_per_token"]
