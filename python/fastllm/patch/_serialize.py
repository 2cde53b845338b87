"""save / load of a model whose linears fastllm.patch swapped (int8, 2:4): no calibration to reload.

Directory layout:
  config.json, generation_config.json   the model's own (transformers)
  model.fastllm.safetensors             the whole state dict after patching: int8 / 2:4 weights
                                        and scales, SmoothQuant-folded norms, everything else
  fastllm_config.json                   versions, dtype, the patch options, and one record per
                                        swapped layer: class, sizes, constructor settings
Loading builds the float model from config.json (random init, then overwritten), puts an
empty module of the recorded class and settings at each swapped name, loads the state strictly
(every tensor accounted for) and patches attention / skip_attention with the saved options.
"""
import copy
import json
import os

import torch
from torch import nn

from .. import __version__
from ..nn.int8_linear import Int8Linear
from . import _linear
from .rules import sparse24_class

WEIGHTS = "model.fastllm.safetensors"
FORMAT = "fastllm-swapped-linears"
VERSION = 1
#: patch_overrides accepted when loading a swapped checkpoint (the rest is baked into the weights).
OVERRIDABLE = ("attention", "backend", "skip_attention")


def _record(m: nn.Module, options) -> dict:
    if isinstance(m, Int8Linear):
        return {"class": "Int8Linear", "in_features": m.in_features, "out_features": m.out_features,
                "bias": m.bias is not None, "mode": m.mode, "group_size": m.group_size,
                "smooth": m.smooth is not None,
                "bias_dtype": str(m.bias.dtype).replace("torch.", "") if m.bias is not None else None}
    if isinstance(m, sparse24_class()):
        return {"class": "Sparse24Linear", "in_features": m.in_features, "out_features": m.out_features,
                "bias": m.bias is not None, "int8": m.int8,
                "bias_dtype": str(m.bias.dtype).replace("torch.", "") if m.bias is not None else None}
    raise TypeError(f"fastllm.save_pretrained: cannot record a swapped {type(m).__name__}")


def save(model, state, directory, transformers):
    from safetensors.torch import save_model
    os.makedirs(directory, exist_ok=True)
    config = copy.deepcopy(model.config)     # never write to the model's own config
    config.architectures = [type(model).__name__]
    config.save_pretrained(directory)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(directory)
    layers = {s.name: _record(s.new, state.options) for s in state.swaps}
    save_model(model, os.path.join(directory, WEIGHTS), metadata={"format": "pt", "fastllm": FORMAT})
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    options = {k: (list(v) if isinstance(v, tuple) else v) for k, v in state.options.items()}
    with open(os.path.join(directory, "fastllm_config.json"), "w") as f:
        json.dump({"fastllm_version": __version__, "transformers_version": transformers.__version__,
                   "format": FORMAT, "format_version": VERSION, "weights": WEIGHTS, "dtype": dtype,
                   "patch": options, "layers": layers}, f, indent=2)
    return directory


def _build(rec, device, dtype, backend):
    if rec["class"] == "Int8Linear":
        bias_dtype = getattr(torch, rec["bias_dtype"]) if rec["bias_dtype"] else torch.float32
        return Int8Linear(rec["in_features"], rec["out_features"], rec["bias"], mode=rec["mode"],
                          group_size=rec["group_size"], smooth=rec["smooth"], bias_dtype=bias_dtype, device=device,
                          backend=backend)
    if rec["class"] == "Sparse24Linear":
        # Empty buffers of the right sizes and dtypes; load_model then overwrites every tensor.
        bias_dtype = getattr(torch, rec["bias_dtype"]) if rec.get("bias_dtype") else None
        return sparse24_class()(rec["in_features"], rec["out_features"], rec["bias"], int8=rec["int8"],
                                dtype=dtype, bias_dtype=bias_dtype, device=device, backend=backend)
    raise ValueError(f"fastllm.from_pretrained: unknown layer class {rec['class']!r} in fastllm_config.json")


def load(directory, saved, model_class, overrides, kwargs, transformers):
    """(model with the swapped layers loaded, [(name, module)], patch options)."""
    from safetensors.torch import load_model
    if saved.get("format") != FORMAT or saved.get("format_version") != VERSION:
        raise ValueError(f"{directory}/fastllm_config.json: format {saved.get('format')!r} version "
                         f"{saved.get('format_version')!r}, expected {FORMAT!r} version {VERSION}")
    bad = sorted(set(overrides) - set(OVERRIDABLE))
    if bad:
        raise ValueError(f"patch_overrides {bad} cannot change a quantized / pruned checkpoint (only "
                         f"{', '.join(OVERRIDABLE)}); re-patch the float model instead")
    dtype = kwargs.pop("dtype", None) or getattr(torch, saved["dtype"])
    device = torch.device(kwargs.pop("device", None) or "cpu")
    if kwargs:
        raise TypeError(f"fastllm.from_pretrained: a quantized / pruned checkpoint takes only dtype= and device=, "
                        f"got {sorted(kwargs)}")
    options = dict(saved["patch"])
    options.update(overrides)
    for k in ("include", "exclude"):
        options[k] = tuple(options[k]) if options[k] is not None else None
    options["keep_original"] = False
    config = transformers.AutoConfig.from_pretrained(directory)
    with torch.device(device):
        model = model_class._from_config(config, dtype=dtype)
    model.eval()
    if os.path.exists(os.path.join(directory, "generation_config.json")):
        model.generation_config = transformers.GenerationConfig.from_pretrained(directory)
    loaded = []
    for name, rec in saved["layers"].items():
        m = _build(rec, device, dtype, options["backend"])
        m.eval()
        _linear._set(model, name, m)
        loaded.append((name, m))
    load_model(model, os.path.join(directory, saved["weights"]), strict=True, device=str(device))
    return model, loaded, options
