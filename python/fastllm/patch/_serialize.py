"""save / load of a model whose linears fastllm.patch swapped (int8, 2:4): no calibration to reload.

Directory layout:
  config.json, generation_config.json   the model's own (transformers)
  model.fastllm.safetensors             the whole state dict after patching: int8 / 2:4 weights
                                        and scales, SmoothQuant-folded norms, everything else
  fastllm_config.json                   versions, dtype, the patch options, one record per
                                        swapped layer (class, sizes, constructor settings), and
                                        the report lines a reload cannot recompute ("report")
Loading builds the float model from config.json (random init, then overwritten), puts an
empty module of the recorded class and settings at each swapped name, checks every stored
tensor's dtype, loads the state strictly (every tensor accounted for) and patches attention /
skip_attention with the saved options.
"""
import copy
import dataclasses
import fnmatch
import json
import os

import torch
from torch import nn

from .. import __version__
from ..nn.int8_linear import Int8Linear
from . import _linear
from .report import ModuleEntry
from .rules import sparse24_class

WEIGHTS = "model.fastllm.safetensors"
FORMAT = "fastllm-swapped-linears"
VERSION = 1
#: patch_overrides accepted when loading a swapped checkpoint (the rest is baked into the weights).
OVERRIDABLE = ("attention", "backend", "skip_attention")
#: transformers' weight files: a swapped save removes them (a stale float model.safetensors beside
#: our config.json would load in transformers, silently, as the old model).
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors",
                   "pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin")
#: Keys of fastllm_config.json and of each layer record, checked before anything is built.
REQUIRED = ("format", "format_version", "weights", "dtype", "patch", "layers")
LAYER_KEYS = {"Int8Linear": ("in_features", "out_features", "bias", "mode", "group_size", "smooth", "bias_dtype"),
              "Sparse24Linear": ("in_features", "out_features", "bias", "int8")}   # bias_dtype: later saves
#: safetensors dtype names.
_ST_DTYPES = {torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
              torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
              torch.bool: "BOOL"}


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def json_options(options):
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()}


def remove_weight_files(directory, patterns):
    for name in os.listdir(directory):
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            os.remove(os.path.join(directory, name))


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


def save(model, state, directory, transformers, dtype):
    from safetensors.torch import save_model
    os.makedirs(directory, exist_ok=True)
    remove_weight_files(directory, HF_WEIGHT_FILES)
    config = copy.deepcopy(model.config)     # never write to the model's own config
    config.architectures = [type(model).__name__]
    config.save_pretrained(directory)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(directory)
    layers = {s.name: _record(s.new, state.options) for s in state.swaps}
    save_model(model, os.path.join(directory, WEIGHTS), metadata={"format": "pt", "fastllm": FORMAT})
    options = json_options(state.options)
    report = {"modules": [dataclasses.asdict(e) for e in state.carried[0]], "notes": list(state.carried[1])}
    with open(os.path.join(directory, "fastllm_config.json"), "w") as f:
        json.dump({"fastllm_version": __version__, "transformers_version": transformers.__version__,
                   "format": FORMAT, "format_version": VERSION, "weights": WEIGHTS, "dtype": _dtype_name(dtype),
                   "patch": options, "layers": layers, "report": report}, f, indent=2)
    return directory


def _bias_dtype(rec, dtype, saved_dtype):
    """A bias stored in the model's saved dtype follows a dtype= override (as model.to(dtype)
    would take it); any other bias dtype stays."""
    if not rec.get("bias_dtype"):
        return None
    return dtype if rec["bias_dtype"] == saved_dtype else getattr(torch, rec["bias_dtype"])


def _build(rec, device, dtype, saved_dtype, backend):
    bias_dtype = _bias_dtype(rec, dtype, saved_dtype)
    if rec["class"] == "Int8Linear":
        return Int8Linear(rec["in_features"], rec["out_features"], rec["bias"], mode=rec["mode"],
                          group_size=rec["group_size"], smooth=rec["smooth"], bias_dtype=bias_dtype or torch.float32,
                          device=device, backend=backend)
    # Sparse24Linear: empty buffers of the right sizes and dtypes; load_model overwrites every tensor.
    return sparse24_class()(rec["in_features"], rec["out_features"], rec["bias"], int8=rec["int8"],
                            dtype=dtype, bias_dtype=bias_dtype, device=device, backend=backend)


def check_saved(path, saved, overrides):
    """Raises ValueError naming the file and what is missing / wrong, before anything is built."""
    if saved.get("format") != FORMAT or saved.get("format_version") != VERSION:
        raise ValueError(f"{path}: format {saved.get('format')!r} version {saved.get('format_version')!r}, "
                         f"expected {FORMAT!r} version {VERSION}")
    missing = [k for k in REQUIRED if k not in saved]
    missing += [f"patch.{k}" for k in ("attention", "backend", "skip_attention", "include", "exclude")
                if k not in saved.get("patch", {})]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(map(repr, missing))} (written by fastllm.save_pretrained; "
                         "the file was edited or truncated)")
    if not isinstance(saved["layers"], dict) or not saved["layers"]:
        raise ValueError(f"{path}: 'layers' must be a non-empty object (swapped layer name -> record)")
    for name, rec in saved["layers"].items():
        keys = LAYER_KEYS.get(rec.get("class") if isinstance(rec, dict) else None)
        if keys is None:
            raise ValueError(f"{path}: layer {name!r} has unknown class "
                             f"{rec.get('class') if isinstance(rec, dict) else rec!r} (expected one of "
                             f"{', '.join(LAYER_KEYS)})")
        gone = [k for k in keys if k not in rec]
        if gone:
            raise ValueError(f"{path}: layer {name!r} record misses {', '.join(map(repr, gone))}")
    if not isinstance(getattr(torch, str(saved["dtype"]), None), torch.dtype):
        raise ValueError(f"{path}: 'dtype' {saved['dtype']!r} is not a torch dtype name")
    bad = sorted(set(overrides) - set(OVERRIDABLE))
    if bad:
        raise ValueError(f"patch_overrides {bad} cannot change a quantized / pruned checkpoint (only "
                         f"{', '.join(OVERRIDABLE)}); re-patch the float model instead")


def _target_dtype(requested, saved_dtype):
    """dtype= of from_pretrained: None / "auto" -> the saved one; a torch dtype or its name."""
    if requested is None or requested == "auto":
        return saved_dtype
    dtype = getattr(torch, requested, None) if isinstance(requested, str) else requested
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"fastllm.from_pretrained: argument 'dtype' must be a torch dtype, its name or 'auto', "
                        f"got {requested!r}")
    return dtype


def _check_stored_dtypes(path, model, saved_dtype, dtype):
    """Every stored tensor in the dtype the rebuilt model holds (int8 weights, int32 metadata,
    fp32 scales exactly), or, under a dtype= override, in the saved model dtype where the model
    holds the requested one: load_state_dict would cast anything else silently (int16 values
    wrapping into int8)."""
    from safetensors import safe_open
    want = model.state_dict()
    converted = (_ST_DTYPES.get(saved_dtype), _ST_DTYPES.get(dtype))
    with safe_open(path, framework="pt") as f:
        for k in f.keys():
            t = want.get(k)
            if t is None:
                continue           # load_model's strict check names unexpected tensors
            got, exp = f.get_slice(k).get_dtype(), _ST_DTYPES.get(t.dtype)
            if got != exp and (got, exp) != converted:
                raise ValueError(f"{path}: tensor {k!r} is stored as {got}, the rebuilt model holds "
                                 f"{_dtype_name(t.dtype)} there (the file was edited or written by something else)")


def load(directory, saved, model_class, options, kwargs, transformers):
    """(model with the swapped layers loaded, [(name, module)], patch options, carried report)."""
    from safetensors.torch import load_model
    saved_dtype = getattr(torch, saved["dtype"])
    dtype = _target_dtype(kwargs.pop("dtype", None), saved_dtype)
    device = torch.device(kwargs.pop("device", None) or "cpu")
    if kwargs:
        raise TypeError(f"fastllm.from_pretrained: a quantized / pruned checkpoint takes only dtype= and device=, "
                        f"got {sorted(kwargs)}")
    for k in ("include", "exclude"):
        options[k] = tuple(options[k]) if options[k] is not None else None
    options["keep_original"] = False
    config = transformers.AutoConfig.from_pretrained(directory)
    mapping = getattr(model_class, "_model_mapping", None)   # an Auto class: the concrete one for this config
    if mapping is not None:
        try:
            model_class = mapping[type(config)]
        except KeyError:
            raise ValueError(f"fastllm.from_pretrained: {model_class.__name__} has no model for "
                             f"{type(config).__name__} (saved from {config.architectures})") from None
    with torch.device(device):
        model = model_class._from_config(config, dtype=dtype)
    model.eval()
    if os.path.exists(os.path.join(directory, "generation_config.json")):
        model.generation_config = transformers.GenerationConfig.from_pretrained(directory)
    loaded = []
    for name, rec in saved["layers"].items():
        m = _build(rec, device, dtype, saved["dtype"], options["backend"])
        m.eval()
        _linear._set(model, name, m)
        loaded.append((name, m))
    path = os.path.join(directory, saved["weights"])
    _check_stored_dtypes(path, model, saved_dtype, dtype)
    load_model(model, path, strict=True, device=str(device))
    report = saved.get("report") or {}
    carried = ([ModuleEntry(**e) for e in report.get("modules", [])], list(report.get("notes", [])))
    return model, loaded, options, carried
