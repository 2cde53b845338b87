"""Whole-model helpers: swap nn.Linear layers for Sparse24Linear, save / load the sparse model.

    norms = collect_act_norms(model, batches)                     # only for Wanda
    report = sparsify_linears(model, prune="wanda", act_norms=norms, skip=["lm_head"])
    save_sparse(model, "model.sparse24.safetensors")
    model2 = build_float_model(); load_sparse(model2, "model.sparse24.safetensors")

The file is a safetensors file of the model's whole state dict (Sparse24Linear buffers:
values, metadata, bias, weight_scale; files whose key is the old `meta` still load), with
metadata "fastllm.sparse24" = JSON {version, layers: {name: {in_features, out_features, bias,
int8, dtype, bias_dtype}}} naming the modules to rebuild as Sparse24Linear before loading (as
fastllm/quant/model.py does for Int8Linear).
"""
from typing import Dict, Iterable, Optional, Union

import torch
from torch import nn

from .._layer_io import load_layers, peft_reasons, save_layers, select_linears, set_module
from ..nn.sparse24_linear import Sparse24Linear

FORMAT_KEY = "fastllm.sparse24"
FORMAT_VERSION = 1


def sparsify_linears(model: nn.Module, prune: Optional[str] = "magnitude", *, layers: Optional[Iterable[str]] = None,
                     skip: Iterable[str] = (), act_norms: Optional[Dict[str, torch.Tensor]] = None,
                     int8: bool = False, backend: str = "auto") -> Dict[str, Union[list, dict]]:
    """Replace nn.Linear layers by Sparse24Linear.from_linear(...) in place.

    Returns {"sparsified": {name: fraction of the norm removed}, "skipped": {name: reason}}.
    A layer whose sizes do not fit the format (in_features % 64, out_features % 16), without
    Wanda norms, inside a PEFT adapter layer, or (prune=None) whose weight is not 2:4, is skipped
    with the reason; a name in `layers` that is missing or not a Linear raises. An error leaves
    the model unchanged."""
    from .format import NotSparse24Error
    named, names = select_linears(model, layers, "sparsify_linears")
    skip = set(skip)
    in_adapter = peft_reasons(named, names, "sparsify")
    report = {"sparsified": {}, "skipped": {}}
    built = []
    for n in names:
        lin = named[n]
        if n in skip:
            report["skipped"][n] = "in skip"
        elif n in in_adapter:
            report["skipped"][n] = in_adapter[n]
        elif lin.in_features % 64 or lin.out_features % 16:
            report["skipped"][n] = (f"in_features={lin.in_features}, out_features={lin.out_features}: need "
                                    "multiples of 64 and 16")
        elif prune == "wanda" and (act_norms is None or n not in act_norms):
            report["skipped"][n] = "no activation norms (act_norms) for this layer"
        else:
            try:
                new = Sparse24Linear.from_linear(lin, prune, act_norms.get(n) if prune == "wanda" else None,
                                                 int8=int8, backend=backend)
            except NotSparse24Error as e:
                report["skipped"][n] = str(e)
                continue
            built.append((n, new))
            report["sparsified"][n] = new.prune_report.norm_removed if new.prune_report else 0.0
    # Swapped only once every layer was built: an error above leaves the model untouched.
    for n, new in built:
        set_module(model, n, new)
    return report


def _layer_config(m: Sparse24Linear) -> dict:
    dt = lambda t: str(t.dtype).replace("torch.", "") if t is not None else None  # noqa: E731
    return {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None,
            "int8": m.int8, "dtype": dt(m.values), "bias_dtype": dt(m.bias)}


def save_sparse(model: nn.Module, path: str) -> None:
    """Write the model's state (compressed 2:4 weights and everything else) to a safetensors file."""
    save_layers(model, path, Sparse24Linear, _layer_config, FORMAT_KEY, FORMAT_VERSION, "save_sparse",
                "sparsify it first")


def load_sparse(model: nn.Module, path: str, *, strict: bool = True, backend: str = "auto") -> nn.Module:
    """Rebuild the Sparse24Linear layers recorded in `path` inside `model` (the same architecture,
    dense) and load the saved state into it. Returns model."""
    def build(cfg, dev):
        return Sparse24Linear(cfg["in_features"], cfg["out_features"], cfg["bias"], int8=cfg["int8"],
                              dtype=getattr(torch, cfg["dtype"]) if not cfg["int8"] else torch.float16,
                              bias_dtype=getattr(torch, cfg["bias_dtype"]) if cfg["bias_dtype"] else None,
                              device=dev, backend=backend)
    return load_layers(model, path, Sparse24Linear, build, FORMAT_KEY, FORMAT_VERSION, "load_sparse", "save_sparse",
                       "sparsifies", strict)
