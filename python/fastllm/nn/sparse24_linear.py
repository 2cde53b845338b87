"""Sparse24Linear: a drop-in nn.Linear whose weight is 2:4 sparse along K, stored compressed.

    s = Sparse24Linear.from_linear(linear)                             # weight must already be 2:4
    s = Sparse24Linear.from_linear(linear, prune="magnitude")          # prune here
    s = Sparse24Linear.from_linear(linear, prune="wanda", act_norm=n)  # n: (K,) from collect_act_norms
    s = Sparse24Linear.from_linear(linear, prune="magnitude", int8=True)   # 2:4 + W8A8
    s.prune_report                                                     # PruneReport or None

Forward: fastllm.ops.sparse24_matmul (16-bit / fp32 activations: x is cast to the weight's
dtype and the output back to x's), or with int8=True: the input is quantized per token
(fastllm.ops.quantize_per_token) and fastllm.ops.sparse24_int8_matmul applies the int8
epilogue (per-token x per-channel scales, bias) in fp32.

Buffers (all in the state dict, safetensors-friendly): values (N, K // 2) (the weight's dtype,
or int8), metadata (N // 16, K // 2) int32 (fastllm/sparse/format.py; `.meta` reads it too),
bias (N,) or absent, weight_scale (N,) fp32 (int8 only; `.half()` / `.to(dtype)` leave it fp32).
in_features must be a multiple of 64 and out_features of 16 (the compressed format's metadata
block). Whole models: fastllm.sparse.sparsify_linears, save_sparse, load_sparse.
"""
from typing import Optional

import torch
from torch import nn

from .. import ops
from ..ops._checks import FLOAT_DTYPES
from ..sparse.format import check_meta_values
from ._input import KeepsFp32Scales, as_rows, fmt as _fmt, in_weight_dtype

PRUNE_METHODS = (None, "magnitude", "wanda")



class Sparse24Linear(KeepsFp32Scales):
    """2:4-sparse linear layer; build with Sparse24Linear.from_linear (module docstring)."""
    _FP32_BUFFERS = ("weight_scale",)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, int8: bool = False,
                 dtype: torch.dtype = torch.float16, bias_dtype: Optional[torch.dtype] = None, device=None,
                 backend: str = "auto"):
        super().__init__()
        if not isinstance(in_features, int) or in_features <= 0 or in_features % 64:
            raise ValueError(f"Sparse24Linear: in_features = {in_features!r} must be a positive multiple of 64 (the "
                             "2:4 format's metadata block along K); keep this layer dense")
        if not isinstance(out_features, int) or out_features <= 0 or out_features % 16:
            raise ValueError(f"Sparse24Linear: out_features = {out_features!r} must be a positive multiple of 16; "
                             "keep this layer dense")
        if not isinstance(int8, bool):
            raise TypeError(f"Sparse24Linear: argument 'int8' must be a bool, got {type(int8).__name__}")
        if not int8 and dtype not in FLOAT_DTYPES:
            raise TypeError(f"Sparse24Linear: argument 'dtype' must be float16, bfloat16 or float32, got {dtype!r}")
        if bias and (bias_dtype or dtype) not in FLOAT_DTYPES:
            raise TypeError(f"Sparse24Linear: the bias dtype must be float16, bfloat16 or float32 (the kernels' "
                            f"epilogue), got {_fmt(bias_dtype)}")
        self.in_features, self.out_features = in_features, out_features
        self.int8, self.backend = bool(int8), backend
        self.prune_report = None
        vdtype = torch.int8 if int8 else dtype
        self.register_buffer("values", torch.zeros(out_features, in_features // 2, dtype=vdtype, device=device))
        # Nibble 0b0100 (positions 0, 1) in every slot: a valid all-zero weight until loaded.
        self.register_buffer("metadata", torch.full((out_features // 16, in_features // 2), 0x44444444,
                                                    dtype=torch.int32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype or (torch.float32 if int8 else dtype),
                                                 device=device) if bias else None)
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device)
                             if int8 else None)

    # ------------------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Module, prune: Optional[str] = None, act_norm: Optional[torch.Tensor] = None,
                    int8: bool = False, backend: str = "auto") -> "Sparse24Linear":
        """Compress `linear` (an nn.Linear, float16/bfloat16/float32 weight) to 2:4.

        prune: None (the weight must already be 2:4 along K: raises NotSparse24Error naming the
        first offending (row, group) otherwise), "magnitude", or "wanda" (needs act_norm (K,),
        the per-input-channel L2 norm from fastllm.sparse.collect_act_norms). int8: also
        quantize the kept weights per output channel and run W8A8 (dynamic per-token activations).
        """
        from ..sparse.format import check_24, compress
        from ..sparse.prune import prune_24
        name = "Sparse24Linear.from_linear"
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name}: argument 'linear' must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        if w.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: the linear's weight has dtype {_fmt(w.dtype)}; expected float16, bfloat16 "
                            "or float32")
        if w.device.type == "meta":
            raise ValueError(f"{name}: the linear's weight is on the meta device (not loaded)")
        if not bool(torch.isfinite(w).all()):
            # As Int8Linear: pruning ranks magnitudes, which NaN / inf make meaningless.
            raise ValueError(f"{name}: the linear's weight holds NaN or inf; fix the weight before compressing it")
        if prune not in PRUNE_METHODS:
            raise ValueError(f"{name}: argument 'prune' must be None, 'magnitude' or 'wanda', got {prune!r}")
        if prune == "wanda" and act_norm is None:
            raise ValueError(f"{name}: prune='wanda' needs act_norm ({linear.in_features},) "
                             "(fastllm.sparse.collect_act_norms)")
        if prune != "wanda" and act_norm is not None:
            raise ValueError(f"{name}: act_norm is only used by prune='wanda' (prune is {prune!r})")
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, int8=int8, dtype=w.dtype,
                bias_dtype=linear.bias.dtype if linear.bias is not None else None, device=w.device, backend=backend)
        w = w.detach()
        if prune is None:
            check_24(w, "linear.weight")
        else:
            w, m.prune_report = prune_24(w, prune, act_norm)
        if int8:
            from ..quant.weights import quantize_weight_per_channel
            q, scale = quantize_weight_per_channel(w)      # zeros stay zero: still 2:4
            m.weight_scale.copy_(scale)
            w = q
        values, meta = compress(w)
        m.values.copy_(values)
        m.metadata.copy_(meta)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach())
        return m

    def dense_weight(self) -> torch.Tensor:
        """The (dequantized) dense weight (N, K), fp32 for int8 layers."""
        from ..sparse.format import decompress
        w = decompress(self.values, self.metadata)
        return w.float() * self.weight_scale.reshape(-1, 1) if self.int8 else w

    # The metadata buffer was named `meta` until 2026-11: a root module with a buffer of that name
    # cannot be exported (torch.export's GraphModule has a `meta` dict). Old state dicts still load
    # (here, and in fastllm._layer_io's key check before a load).
    RENAMED_BUFFERS = {"meta": "metadata"}

    @property
    def meta(self) -> torch.Tensor:
        return self.metadata

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for old, new in self.RENAMED_BUFFERS.items():
            if prefix + old in state_dict and prefix + new not in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        meta = state_dict.get(prefix + "metadata")
        # Checked once here, on any device: the ops check metadata values on CPU only (a check
        # per call would sync on CUDA), and a corrupted word is undefined behaviour for mma.sp.
        if isinstance(meta, torch.Tensor) and meta.dtype == torch.int32:
            check_meta_values(f"Sparse24Linear load ({prefix}metadata)", meta, any_device=True)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The dense weight this layer applies (decompressed; int8: times weight_scale), a new
        tensor on every read, for model code that reads `.weight` instead of calling the layer.
        16-bit layers give it in their own dtype; the forward never builds it."""
        return in_weight_dtype(self.dense_weight(), self.bias) if self.int8 else self.dense_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2, lead = as_rows("Sparse24Linear", x, self.in_features)
        if self.int8:
            if x2.stride(1) != 1 and self.in_features > 1:
                x2 = x2.contiguous()  # the quantize kernels read rows with unit stride (as int8_matmul_dynamic)
            q, a_scale = ops.quantize_per_token(x2, backend=self.backend)
            y = ops.sparse24_int8_matmul(q, self.values, self.metadata, a_scale, self.weight_scale, self.bias,
                                         out_dtype=x2.dtype, backend=self.backend)
        else:
            bias = self.bias
            y = ops.sparse24_matmul(x2.to(self.values.dtype), self.values, self.metadata, bias,
                                    backend=self.backend).to(x2.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"sparsity=2:4, int8={self.int8}, dtype={_fmt(self.values.dtype)}")
