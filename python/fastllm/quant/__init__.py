"""Turning float weights into int8: weight quantization, calibration, SmoothQuant, whole-model
conversion and safetensors save/load. The int8 layers themselves are fastllm.nn.Int8Linear."""
from .calibrate import calibrate
from .model import load_quantized, quantize_linears, save_quantized
from .smoothquant import smooth_norm_linears, smooth_scales
from .weights import quantize_weight_per_channel, quantize_weight_per_group

__all__ = ["calibrate", "load_quantized", "quantize_linears", "save_quantized", "smooth_norm_linears",
           "smooth_scales", "quantize_weight_per_channel", "quantize_weight_per_group"]
