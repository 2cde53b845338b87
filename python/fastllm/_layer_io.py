"""Shared plumbing of the whole-model layer swaps (fastllm.quant.model for Int8Linear,
fastllm.sparse.model for Sparse24Linear): pick the nn.Linear layers, set a submodule by name,
and save / load a model whose swapped layers are listed in the safetensors metadata, so that a
loader can rebuild them inside a fresh floating-point model before loading the state dict."""
import json
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Type

import torch
from torch import nn


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def select_linears(model: nn.Module, layers: Optional[Iterable[str]], who: str) -> Tuple[Dict[str, nn.Module], List[str]]:
    """(named modules, names to convert): every nn.Linear when layers is None, else the names
    given, each checked to exist and be an nn.Linear."""
    named = dict(model.named_modules())
    if layers is None:
        return named, [n for n, m in named.items() if isinstance(m, nn.Linear)]
    names = list(layers)
    for n in names:
        if n not in named:
            raise ValueError(f"{who}: argument 'layers': the model has no module named {n!r}")
        if not isinstance(named[n], nn.Linear):
            raise TypeError(f"{who}: argument 'layers': {n!r} is a {type(named[n]).__name__}, not an nn.Linear")
    return named, names


def _is_peft_tuner(m) -> bool:
    """A PEFT adapter layer (LoRA, IA3, ...: peft.tuners.tuners_utils.BaseTunerLayer), told by
    class name so that peft need not be imported."""
    return any(c.__name__ == "BaseTunerLayer" for c in type(m).__mro__)


def peft_reasons(named: Dict[str, nn.Module], names: Iterable[str], verb: str) -> Dict[str, str]:
    """{name: why it stays float} for the names inside a PEFT adapter layer. PEFT merges an
    adapter by writing base_layer.weight in place; a swapped layer's .weight is a fresh
    dequantized / decompressed tensor, so merge_and_unload() would silently drop the adapter."""
    tuners = [n for n, m in named.items() if _is_peft_tuner(m)]
    out = {}
    for n in names:
        tuner = next((a for a in tuners if n.startswith(a + ".")), None)
        if tuner is not None:
            out[n] = (f"inside PEFT adapter layer {tuner!r}: merging writes its weight in place "
                      f"(merge_and_unload() first, or {verb} before adding adapters)")
    return out


def save_layers(model: nn.Module, path: str, cls: Type[nn.Module], config: Callable[[nn.Module], dict],
                key: str, version: int, who: str, hint: str) -> None:
    """The whole state dict to `path`, with metadata key = JSON {version, layers: {name: config(m)}}
    for every `cls` module."""
    from safetensors.torch import save_model
    layers = {n: config(m) for n, m in model.named_modules() if isinstance(m, cls)}
    if not layers:
        raise ValueError(f"{who}: the model has no {cls.__name__} layer ({hint})")
    save_model(model, path, metadata={key: json.dumps({"version": version, "layers": layers})})


def load_layers(model: nn.Module, path: str, cls: Type[nn.Module], build: Callable[[dict, torch.device], nn.Module],
                key: str, version: int, who: str, writer: str, verb: str, strict: bool = True) -> nn.Module:
    """Rebuild the layers listed in `path`'s metadata (build(config, device)) in place of the
    model's nn.Linear (or already swapped) modules of the same sizes, then load the state.
    cls.RENAMED_BUFFERS, if any: {old buffer name: new} in older files (its load hook maps them).
    A failed load leaves the model as it was."""
    from safetensors import safe_open
    from safetensors.torch import load_model
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if key not in meta:
        raise ValueError(f"{who}: {path} has no '{key}' metadata (not written by {writer})")
    info = json.loads(meta[key])
    if info.get("version") != version:
        raise ValueError(f"{who}: {path} has format version {info.get('version')}, expected {version}")
    meta_t = next((n for n, t in model.state_dict().items() if t.device.type == "meta"), None)
    if meta_t is not None:
        raise ValueError(f"{who}: the model is on the meta device ({meta_t!r}): loading would copy into tensors "
                         "without storage. Materialize it first (model.to_empty(device=...)).")
    named = dict(model.named_modules())
    built = []
    for n, cfg in info["layers"].items():
        old = named.get(n)
        if not isinstance(old, (nn.Linear, cls)):
            raise ValueError(f"{who}: the file {verb} layer {n!r}, which the model "
                             f"{'lacks' if old is None else 'has as a ' + type(old).__name__}")
        if (old.in_features, old.out_features) != (cfg["in_features"], cfg["out_features"]):
            raise ValueError(f"{who}: layer {n!r} is {old.in_features}->{old.out_features} in the model, "
                             f"{cfg['in_features']}->{cfg['out_features']} in the file")
        dev = next(iter(old.buffers() if isinstance(old, cls) else old.parameters())).device
        built.append((n, old, build(cfg, dev)))
    for n, _, new in built:
        set_module(model, n, new)
    try:
        # torch copies every matching tensor before it reports a missing one: check first, so a
        # failed load leaves the model as it was.
        _check_stored(model, path, who, strict, getattr(cls, "RENAMED_BUFFERS", {}))
        load_model(model, path, strict=strict)
    except BaseException:
        for n, old, _ in built:
            set_module(model, n, old)
        raise
    return model


def _check_stored(model: nn.Module, path: str, who: str, strict: bool, renamed: Dict[str, str]) -> None:
    from safetensors import safe_open
    want = model.state_dict()

    def current(k):
        head, _, leaf = k.rpartition(".")
        new = renamed.get(leaf)
        return f"{head}.{new}" if new and head else (new or k)
    with safe_open(path, framework="pt") as f:
        stored = {k if k in want else current(k): k for k in f.keys()}
        keys = set(stored)
        for k in keys & set(want):
            shape = tuple(f.get_slice(stored[k]).get_shape())
            if shape != tuple(want[k].shape):
                raise ValueError(f"{who}: tensor {k!r} is {shape} in {path}, {tuple(want[k].shape)} in the model")
    missing, unexpected = sorted(set(want) - keys), sorted(keys - set(want))
    if strict and (missing or unexpected):
        raise ValueError(f"{who}: {path} does not match the model: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}. The model was left unchanged.")
