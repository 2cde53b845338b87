"""Whole-model helpers: swap nn.Linear layers for Int8Linear, save / load the quantized model.

    report = quantize_linears(model, "w8a8-static", act_amax=calibrate(model, batches), smooth_alpha=0.5)
    save_quantized(model, "model.int8.safetensors")
    model2 = build_float_model(); load_quantized(model2, "model.int8.safetensors")   # no recalibration

The file is a safetensors file of the model's whole state dict (Int8Linear buffers included,
so norms that SmoothQuant folded into come back smoothed), with metadata
"fastllm.int8" = JSON {layer name: {mode, in_features, out_features, bias, group_size, smooth,
bias_dtype}} describing which modules to rebuild as Int8Linear before loading.
"""
import json
from typing import Dict, Iterable, Optional, Union

import torch
from torch import nn

from ..nn.int8_linear import Int8Linear

FORMAT_KEY = "fastllm.int8"
FORMAT_VERSION = 1


def _set_module(model: nn.Module, name: str, new: nn.Module):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_linears(model: nn.Module, mode: str = "w8a8-dynamic", *,
                     layers: Optional[Iterable[str]] = None, skip: Iterable[str] = (),
                     act_amax: Optional[Dict[str, torch.Tensor]] = None, smooth_alpha: Optional[float] = None,
                     group_size: Optional[int] = None, backend: str = "auto") -> Dict[str, Union[list, dict]]:
    """Replace nn.Linear layers by Int8Linear.from_linear(...) in place.

    layers: names to convert (None: every nn.Linear); skip: names to leave alone (e.g.
    "lm_head"). act_amax: {name: (K,)} from fastllm.quant.calibrate, needed for static mode
    and smooth_alpha. Returns {"quantized": [names], "skipped": {name: reason}}: a layer whose
    sizes are not multiples of 16, or (static / SmoothQuant) that has no calibration data, is
    skipped with the reason, not an error; a name in `layers` that is missing or not a Linear
    raises.
    """
    named = dict(model.named_modules())
    skip = set(skip)
    if layers is None:
        names = [n for n, m in named.items() if isinstance(m, nn.Linear)]
    else:
        names = list(layers)
        for n in names:
            if n not in named:
                raise ValueError(f"quantize_linears: argument 'layers': the model has no module named {n!r}")
            if not isinstance(named[n], nn.Linear):
                raise TypeError(f"quantize_linears: argument 'layers': {n!r} is a {type(named[n]).__name__}, "
                                "not an nn.Linear")
    needs_amax = mode == "w8a8-static" or smooth_alpha is not None
    report = {"quantized": [], "skipped": {}}
    for n in names:
        lin = named[n]
        if n in skip:
            report["skipped"][n] = "in skip"
        elif lin.in_features % 16 or lin.out_features % 16:
            report["skipped"][n] = (f"in_features={lin.in_features}, out_features={lin.out_features}: "
                                    "not multiples of 16")
        elif needs_amax and (act_amax is None or n not in act_amax):
            report["skipped"][n] = "no calibration data (act_amax) for this layer"
        else:
            _set_module(model, n, Int8Linear.from_linear(
                lin, mode, act_amax=act_amax.get(n) if act_amax else None, smooth_alpha=smooth_alpha,
                group_size=group_size, backend=backend))
            report["quantized"].append(n)
    return report


def _layer_config(m: Int8Linear) -> dict:
    return {"mode": m.mode, "in_features": m.in_features, "out_features": m.out_features,
            "bias": m.bias is not None, "group_size": m.group_size, "smooth": m.smooth is not None,
            "bias_dtype": str(m.bias.dtype).replace("torch.", "") if m.bias is not None else None}


def save_quantized(model: nn.Module, path: str) -> None:
    """Write the model's state (int8 weights, scales, modes, everything else) to a safetensors file."""
    from safetensors.torch import save_model
    layers = {n: _layer_config(m) for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    if not layers:
        raise ValueError("save_quantized: the model has no Int8Linear layer (quantize it first)")
    meta = {FORMAT_KEY: json.dumps({"version": FORMAT_VERSION, "layers": layers})}
    save_model(model, path, metadata=meta)


def load_quantized(model: nn.Module, path: str, *, strict: bool = True, backend: str = "auto") -> nn.Module:
    """Rebuild the Int8Linear layers recorded in `path` inside `model` (the same architecture,
    in floating point) and load the saved state into it. No calibration runs. Returns model."""
    from safetensors import safe_open
    from safetensors.torch import load_model
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if FORMAT_KEY not in meta:
        raise ValueError(f"load_quantized: {path} has no '{FORMAT_KEY}' metadata (not written by save_quantized)")
    info = json.loads(meta[FORMAT_KEY])
    if info.get("version") != FORMAT_VERSION:
        raise ValueError(f"load_quantized: {path} has format version {info.get('version')}, expected {FORMAT_VERSION}")
    named = dict(model.named_modules())
    for n, cfg in info["layers"].items():
        old = named.get(n)
        if not isinstance(old, (nn.Linear, Int8Linear)):
            raise ValueError(f"load_quantized: the file quantizes layer {n!r}, which the model "
                             f"{'lacks' if old is None else 'has as a ' + type(old).__name__}")
        if (old.in_features, old.out_features) != (cfg["in_features"], cfg["out_features"]):
            raise ValueError(f"load_quantized: layer {n!r} is {old.in_features}->{old.out_features} in the model, "
                             f"{cfg['in_features']}->{cfg['out_features']} in the file")
        dev = next(iter(old.buffers() if isinstance(old, Int8Linear) else old.parameters())).device
        bias_dtype = getattr(torch, cfg["bias_dtype"]) if cfg["bias_dtype"] else torch.float32
        _set_module(model, n, Int8Linear(cfg["in_features"], cfg["out_features"], cfg["bias"], mode=cfg["mode"],
                                         group_size=cfg["group_size"], smooth=cfg["smooth"], bias_dtype=bias_dtype,
                                         device=dev, backend=backend))
    missing, unexpected = load_model(model, path, strict=strict)
    return model
