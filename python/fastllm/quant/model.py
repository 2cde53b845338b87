"""Whole-model helpers: swap nn.Linear layers for Int8Linear, save / load the quantized model.

    report = quantize_linears(model, "w8a8-static", act_amax=calibrate(model, batches), smooth_alpha=0.5)
    save_quantized(model, "model.int8.safetensors")
    model2 = build_float_model(); load_quantized(model2, "model.int8.safetensors")   # no recalibration

The file is a safetensors file of the model's whole state dict (Int8Linear buffers included,
so norms that SmoothQuant folded into come back smoothed), with metadata
"fastllm.int8" = JSON {version, layers: {name: {mode, in_features, out_features, bias, group_size,
smooth, bias_dtype}}} describing which modules to rebuild as Int8Linear before loading.
"""
import numbers
from typing import Dict, Iterable, Optional, Union

import torch
from torch import nn

from .._layer_io import load_layers, peft_reasons, save_layers, select_linears, set_module
from ..nn.int8_linear import Int8Linear, check_act_amax_read, reads_act_amax

FORMAT_KEY = "fastllm.int8"
FORMAT_VERSION = 1


def quantize_linears(model: nn.Module, mode: str = "w8a8-dynamic", *,
                     layers: Optional[Iterable[str]] = None, skip: Iterable[str] = (),
                     act_amax: Optional[Dict[str, torch.Tensor]] = None, smooth_alpha: Optional[float] = None,
                     group_size: Optional[int] = None, backend: str = "auto") -> Dict[str, Union[list, dict]]:
    """Replace nn.Linear layers by Int8Linear.from_linear(...) in place.

    layers: names to convert (None: every nn.Linear); skip: names to leave alone (e.g.
    "lm_head"). act_amax: {name: (K,)} from fastllm.quant.calibrate, needed for static mode
    and smooth_alpha. Returns {"quantized": [names], "skipped": {name: reason}}: a layer whose
    sizes are not multiples of 16 (or in_features of group_size), or (static / SmoothQuant) that
    has no calibration data, or that sits inside a PEFT adapter layer (its merge writes the
    weight in place), is skipped with the reason, not an error; a name in `layers` that is
    missing or not a Linear raises. An error leaves the model unchanged.
    """
    named, names = select_linears(model, layers, "quantize_linears")
    skip = set(skip)
    in_adapter = peft_reasons(named, names, "quantize")
    needs_amax = reads_act_amax(mode, smooth_alpha)
    if act_amax is not None:
        check_act_amax_read("quantize_linears", mode, smooth_alpha)
    report = {"quantized": [], "skipped": {}}
    built = []
    for n in names:
        lin = named[n]
        if n in skip:
            report["skipped"][n] = "in skip"
        elif n in in_adapter:
            report["skipped"][n] = in_adapter[n]
        elif lin.in_features % 16 or lin.out_features % 16:
            report["skipped"][n] = (f"in_features={lin.in_features}, out_features={lin.out_features}: "
                                    "not multiples of 16")
        elif isinstance(group_size, numbers.Integral) and group_size > 0 and lin.in_features % group_size:
            report["skipped"][n] = f"in_features={lin.in_features} is not a multiple of group_size={group_size}"
        elif needs_amax and (act_amax is None or n not in act_amax):
            report["skipped"][n] = "no calibration data (act_amax) for this layer"
        else:
            built.append((n, Int8Linear.from_linear(
                lin, mode, act_amax=act_amax.get(n) if act_amax else None, smooth_alpha=smooth_alpha,
                group_size=group_size, backend=backend)))
            report["quantized"].append(n)
    # Swapped only once every layer was built: an error above leaves the model untouched.
    for n, q in built:
        set_module(model, n, q)
    return report


def _layer_config(m: Int8Linear) -> dict:
    return {"mode": m.mode, "in_features": m.in_features, "out_features": m.out_features,
            "bias": m.bias is not None, "group_size": m.group_size, "smooth": m.smooth is not None,
            "bias_dtype": str(m.bias.dtype).replace("torch.", "") if m.bias is not None else None}


def save_quantized(model: nn.Module, path: str) -> None:
    """Write the model's state (int8 weights, scales, modes, everything else) to a safetensors file."""
    save_layers(model, path, Int8Linear, _layer_config, FORMAT_KEY, FORMAT_VERSION, "save_quantized", "quantize it first")


def load_quantized(model: nn.Module, path: str, *, strict: bool = True, backend: str = "auto") -> nn.Module:
    """Rebuild the Int8Linear layers recorded in `path` inside `model` (the same architecture,
    in floating point) and load the saved state into it. No calibration runs. Returns model."""
    def build(cfg, dev):
        bias_dtype = getattr(torch, cfg["bias_dtype"]) if cfg["bias_dtype"] else torch.float32
        return Int8Linear(cfg["in_features"], cfg["out_features"], cfg["bias"], mode=cfg["mode"],
                          group_size=cfg["group_size"], smooth=cfg["smooth"], bias_dtype=bias_dtype,
                          device=dev, backend=backend)
    return load_layers(model, path, Int8Linear, build, FORMAT_KEY, FORMAT_VERSION, "load_quantized",
                       "save_quantized", "quantizes", strict)
