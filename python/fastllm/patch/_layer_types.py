"""config.layer_types: which layers fastllm's attention serves, and which it leaves alone.

Hybrid models list layer types beside the attention ones (MiniMax and Granite 4
"linear_attention", LFM2 "conv", ...). Those layers compute with their own modules and never
call the attention function, so switching the attention implementation changes nothing there;
only a layer of an unknown type that does call it is a problem (its mask means something
fastllm does not know). Which layers call it is read from the modules, not from the type name.
"""
from typing import List, Tuple

from torch import nn

from ..errors import UnsupportedModelError
from .rules import SUPPORTED_LAYER_TYPES, uses_attention_interface


def _attention_calls(layer) -> List[str]:
    return [n for n, m in layer.named_modules() if uses_attention_interface(n, m)]


def check_layer_types(model, cfg, attn) -> List[Tuple[str, str, str]]:
    """Raise UnsupportedModelError (model untouched) if a layer of a type outside
    SUPPORTED_LAYER_TYPES calls the attention function, or if the layers cannot be told apart;
    else (name, class, why) of each layer of another type: left to its own modules."""
    name = type(model).__name__
    layer_types = list(getattr(cfg, "layer_types", None) or ())
    unknown = sorted(set(layer_types) - set(SUPPORTED_LAYER_TYPES))
    if not unknown:
        return []
    # The decoder layer list: as long as layer_types, and holding the attention modules.
    attn_names = {n for n, _ in attn}
    lists = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) == len(layer_types)
             and any(a.startswith(f"{n}.") for a in attn_names)]
    if len(lists) != 1:
        raise UnsupportedModelError(
            f"{name}: config.layer_types has {unknown}, and fastllm cannot tell which layers those are "
            f"(no single list of {len(layer_types)} layers holding the attention modules); its attention "
            f"serves only {list(SUPPORTED_LAYER_TYPES)}. Model left unchanged.")
    list_name, layers = lists[0]
    left = []
    for i, (kind, layer) in enumerate(zip(layer_types, layers)):
        if kind not in unknown:
            continue
        calls = _attention_calls(layer)
        if calls:
            raise UnsupportedModelError(
                f"{name}: layer {list_name}.{i} has layer type {kind!r} and calls the attention function "
                f"({list_name}.{i}.{calls[0]}); fastllm's attention serves only {list(SUPPORTED_LAYER_TYPES)} "
                f"(what a {kind!r} mask means is unknown to it). Model left unchanged.")
        left.append((f"{list_name}.{i}", type(layer).__name__,
                     f"{kind!r} layer: no attention-function call, runs its own modules"))
    return left
