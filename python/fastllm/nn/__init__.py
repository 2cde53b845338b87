"""Drop-in nn.Modules backed by fastllm's kernels."""
from .int8_linear import MODES as INT8_MODES, Int8Linear
from .sparse24_linear import Sparse24Linear

__all__ = ["Int8Linear", "INT8_MODES", "Sparse24Linear"]
