"""Int8Linear: a drop-in nn.Linear with int8 weights.

    q = Int8Linear.from_linear(linear)                                   # "w8a8-dynamic"
    q = Int8Linear.from_linear(linear, mode="w8a8-static", act_scale=0.02)
    q = Int8Linear.from_linear(linear, mode="w8a8-static", act_amax=amax)   # from calibrate()
    q = Int8Linear.from_linear(linear, act_amax=amax, smooth_alpha=0.5)    # SmoothQuant inside
    q = Int8Linear.from_linear(linear, mode="w8a16", group_size=128)

Modes:
- "w8a8-dynamic": each call quantizes its input per token and runs the int8 GEMM with those
  scales (int32 accumulate, fused dequant): fastllm.ops.int8_matmul_dynamic, which fuses the
  quantization into the GEMM at decode sizes (Triton) and is quantize_per_token + int8_matmul
  otherwise.
- "w8a8-static": one calibrated per-tensor activation scale `act_scale` (the int8 step:
  calibrated max|x| / 127); fastllm.ops.int8_matmul_static rounds x to int8 with it
  (saturating at +-127) inside the GEMM (Triton: fused into the tile loads). Cheaper at run
  time, less robust to unseen ranges. NaN inputs round to 0 there (the op's rule), so a NaN
  does not propagate to the output as it does in the other two modes.
- "w8a16": weight-only; fastllm.ops.w8a16_matmul dequantizes in registers (decode-friendly).
Weights are quantized symmetric per output channel (or per group of `group_size` input
channels in w8a16) by fastllm.quant.weights.

Buffers (all saved in the state dict): weight_int8 (N, K) int8, weight_scale (N,) or
(N, K // group_size) fp32, bias (N,) in the original dtype (or absent), act_scale (1,) fp32
(static mode), smooth (K,) fp32 (when SmoothQuant could not be folded into a norm: the input
is multiplied by it, i.e. smooth = 1 / s). `.half()` / `.to(dtype)` convert the bias only: the
int8 weight and the fp32 scales keep their dtype.

Inputs of any leading shape (..., K) in float16, bfloat16 or float32; output (..., N) in the
input's dtype. in_features and out_features must be multiples of 16 (the int8 kernels').
"""
import numbers
from typing import Optional

import torch
from torch import nn

from .. import ops
from ..ops._checks import FLOAT_DTYPES, check_channel_stats, check_positive_finite
from ._input import KeepsFp32Scales, as_rows, fmt as _fmt, in_weight_dtype

MODES = ("w8a8-dynamic", "w8a8-static", "w8a16")


def reads_act_amax(mode: str, smooth_alpha) -> bool:
    """Whether calibrated act_amax is used: static mode's activation scale, or SmoothQuant."""
    return mode == "w8a8-static" or smooth_alpha is not None


def check_act_amax_read(who: str, mode: str, smooth_alpha) -> None:
    """ValueError for act_amax given where `mode` / smooth_alpha would ignore it."""
    if not reads_act_amax(mode, smooth_alpha):
        raise ValueError(f"{who}: act_amax is read by mode 'w8a8-static' and by smooth_alpha; mode {mode!r} "
                         f"without smooth_alpha would ignore it")



class Int8Linear(KeepsFp32Scales):
    """int8-weight linear layer; build with Int8Linear.from_linear (see the module docstring)."""
    _FP32_BUFFERS = ("weight_scale", "act_scale", "smooth")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, mode: str = "w8a8-dynamic",
                 group_size: Optional[int] = None, smooth: bool = False, bias_dtype: torch.dtype = torch.float32,
                 device=None, backend: str = "auto"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"Int8Linear: argument 'mode' must be one of {', '.join(MODES)}, got {mode!r}")
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or v <= 0 or v % 16:
                raise ValueError(f"Int8Linear: {name} = {v!r} must be a positive multiple of 16 (the int8 kernels' "
                                 "granularity); keep this layer in floating point")
        if group_size is not None:
            if mode != "w8a16":
                raise ValueError(f"Int8Linear: argument 'group_size' is for mode 'w8a16' only (mode is {mode!r})")
            if (not isinstance(group_size, numbers.Integral) or isinstance(group_size, bool) or group_size <= 0
                    or group_size % 16 or in_features % group_size):
                raise ValueError(f"Int8Linear: argument 'group_size' must be a positive multiple of 16 dividing "
                                 f"in_features = {in_features}, got {group_size!r}")
            group_size = int(group_size)
        if bias and bias_dtype not in FLOAT_DTYPES:
            raise TypeError(f"Int8Linear: the bias dtype must be float16, bfloat16 or float32 (the kernels' epilogue), "
                            f"got {_fmt(bias_dtype)}")
        self.in_features, self.out_features = in_features, out_features
        self.mode, self.group_size, self.backend = mode, group_size, backend
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        scale_shape = (out_features,) if group_size is None else (out_features, in_features // group_size)
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)
        self.register_buffer("act_scale", torch.ones(1, dtype=torch.float32, device=device)
                             if mode == "w8a8-static" else None)
        self.register_buffer("smooth", torch.ones(in_features, dtype=torch.float32, device=device) if smooth else None)

    # ------------------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Module, mode: str = "w8a8-dynamic", act_scale=None, *,
                    act_amax: Optional[torch.Tensor] = None, smooth_alpha: Optional[float] = None,
                    group_size: Optional[int] = None, backend: str = "auto") -> "Int8Linear":
        """Quantize `linear` (an nn.Linear with a float16/bfloat16/float32 weight).

        act_scale: static mode's per-tensor activation step (float or 1-element tensor); or
        act_amax (K,), the calibrated per-channel max |x| (fastllm.quant.calibrate), from which
        static mode takes act_scale = max(act_amax / s) / 127. smooth_alpha: apply SmoothQuant
        with this strength inside the layer (needs act_amax; w8a8 modes). group_size: w8a16 only.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Int8Linear.from_linear: argument 'linear' must be an nn.Linear, got "
                            f"{type(linear).__name__}")
        w = linear.weight
        if w.dtype not in FLOAT_DTYPES:
            raise TypeError(f"Int8Linear.from_linear: the linear's weight has dtype {_fmt(w.dtype)}; expected one of "
                            f"float16, bfloat16, float32")
        if w.device.type == "meta":
            raise ValueError("Int8Linear.from_linear: the linear's weight is on the meta device (not loaded)")
        if smooth_alpha is not None:
            if mode == "w8a16":
                raise ValueError("Int8Linear.from_linear: smooth_alpha is for the w8a8 modes (w8a16 keeps 16-bit "
                                 "activations)")
            if act_amax is None:
                raise ValueError("Int8Linear.from_linear: smooth_alpha needs act_amax (from fastllm.quant.calibrate)")
        if act_amax is not None:
            check_act_amax_read("Int8Linear.from_linear", mode, smooth_alpha)
            act_amax = check_channel_stats("Int8Linear.from_linear", "act_amax", act_amax, linear.in_features)
        if mode == "w8a8-static" and act_scale is None and act_amax is None:
            raise ValueError("Int8Linear.from_linear: mode 'w8a8-static' needs act_scale (or act_amax from "
                             "fastllm.quant.calibrate)")
        if mode == "w8a8-static" and act_scale is not None and act_amax is not None:
            # With smooth_alpha the step must be that of x / s, which only act_amax gives: a step
            # calibrated on x would be applied to the smoothed input (several times the error).
            why = ("with smooth_alpha the step of the smoothed input comes from act_amax / s"
                   if smooth_alpha is not None else "act_amax would be ignored")
            raise ValueError(f"Int8Linear.from_linear: pass act_scale or act_amax for mode 'w8a8-static', not both "
                             f"({why})")
        if mode == "w8a8-static" and act_scale is None and not bool((act_amax > 0).any()):
            raise ValueError("Int8Linear.from_linear: argument 'act_amax' is all zero (calibration saw only zero "
                             "inputs): it gives no activation scale for mode 'w8a8-static'")
        if act_scale is not None and (isinstance(act_scale, bool)
                                      or not isinstance(act_scale, (numbers.Real, torch.Tensor))):
            raise TypeError(f"Int8Linear.from_linear: argument 'act_scale' must be a float or a 1-element tensor, "
                            f"got {type(act_scale).__name__}")
        if mode != "w8a8-static" and act_scale is not None:
            raise ValueError(f"Int8Linear.from_linear: act_scale is for mode 'w8a8-static' (mode is {mode!r})")

        from ..quant.smoothquant import smooth_scales
        from ..quant.weights import quantize_weight_per_channel, quantize_weight_per_group

        m = cls(linear.in_features, linear.out_features, linear.bias is not None, mode=mode, group_size=group_size,
                smooth=smooth_alpha is not None, bias_dtype=w.dtype if linear.bias is None else linear.bias.dtype,
                device=w.device, backend=backend)
        wf = w.detach().float()
        s = None
        if smooth_alpha is not None:
            s = smooth_scales(act_amax, wf, smooth_alpha)
            wf = wf * s
            m.smooth.copy_(1.0 / s)
        q, scale = quantize_weight_per_channel(wf) if group_size is None else quantize_weight_per_group(wf, group_size)
        m.weight_int8.copy_(q)
        m.weight_scale.copy_(scale)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach())
        if mode == "w8a8-static":
            if act_scale is None:
                amax = act_amax.to(w.device)
                if s is not None:
                    amax = amax / s
                act_scale = max(amax.max().item(), 1e-8) / 127.0
            act_scale = torch.as_tensor(act_scale, dtype=torch.float32).reshape(-1)
            if act_scale.numel() != 1 or not torch.isfinite(act_scale).all() or act_scale.item() <= 0:
                raise ValueError(f"Int8Linear.from_linear: argument 'act_scale' must be one positive finite number, "
                                 f"got {act_scale.tolist()}")
            m.act_scale.copy_(act_scale)
        return m

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The ops check scale / smooth values on CPU only (a per-call check would sync CUDA);
        # a loaded 0 or NaN there zeroes or poisons channels without a word: checked once here.
        for key in ("act_scale", "smooth", "weight_scale"):
            t = state_dict.get(prefix + key)
            if isinstance(t, torch.Tensor):
                check_positive_finite(f"Int8Linear load ({prefix}{key})", key, t.detach(), any_device=True)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def weight(self) -> torch.Tensor:
        """The weight this layer applies (int8 x scales, times the smoothing factors), dequantized
        into a new tensor on every read: for model code that reads `.weight` instead of calling
        the layer (a router's dtype check, a head that matmuls it). The forward never builds it."""
        from ..ref.int8 import dequantize_weight
        w = dequantize_weight(self.weight_int8, self.weight_scale, self.group_size)
        if self.smooth is not None:
            w = w * self.smooth.reshape(1, -1)
        return in_weight_dtype(w, self.bias)

    # ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2, lead = as_rows("Int8Linear", x, self.in_features)
        if self.mode == "w8a16":
            y = ops.w8a16_matmul(x2, self.weight_int8, self.weight_scale, self.bias, group_size=self.group_size,
                                 backend=self.backend)
        elif self.mode == "w8a8-static":
            # Quantization (x * smooth / act_scale, rounded) fused into the GEMM's loads.
            y = ops.int8_matmul_static(x2, self.weight_int8, self.act_scale, self.weight_scale, self.bias,
                                       smooth=self.smooth, backend=self.backend)
        else:
            # Per-token quantization (of x * smooth) fused into the GEMM at decode sizes.
            y = ops.int8_matmul_dynamic(x2, self.weight_int8, self.weight_scale, self.bias, smooth=self.smooth,
                                        backend=self.backend)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
            f"mode={self.mode}"
        if self.group_size:
            s += f", group_size={self.group_size}"
        if self.smooth is not None:
            s += ", smooth=True"
        return s
