"""skip_attention (arXiv 2404.05741: the attention sub-layers of the last layers contribute
little; dropping them saves their compute and most of their time): which sub-layers, and the
instance-level forward that replaces theirs."""
import functools
from typing import List, Tuple

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ._model import cfg_get, text_config
from .rules import (ATTENTION_SUBLAYER_NAMES, KV_SHARING_ATTRIBUTE, SUPPORTED_LAYER_TYPES, cache_argument,
                    forward_return_arities)


def _decoder_layers(model) -> Tuple[str, nn.ModuleList, str, List[int]]:
    """(qualified name, the ModuleList of decoder layers, the attention child's name, the indices
    of the layers that have that child: all of them, or the attention layers of a hybrid)."""
    n_layers = getattr(text_config(model), "num_hidden_layers", None)
    found = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            for child in ATTENTION_SUBLAYER_NAMES:
                have = [i for i, layer in enumerate(mod) if isinstance(getattr(layer, child, None), nn.Module)]
                if have:
                    found.append((name, mod, child, have))
                    break
    if n_layers is not None:
        found = [f for f in found if len(f[1]) == n_layers] or found
    # A hybrid's decoder list (some layers convolutions, linear attention, ...) must match the
    # layer count; a partial list of another length is not taken for the decoder layers.
    found = [f for f in found if len(f[3]) == len(f[1]) or len(f[1]) == n_layers]
    if len(found) != 1:
        raise UnsupportedModelError(
            f"skip_attention: {type(model).__name__} has no single list of decoder layers with an "
            f"attention sub-layer named one of {list(ATTENTION_SUBLAYER_NAMES)} (found "
            f"{[f[0] for f in found]}); its attention cannot be skipped by zeroing that output.")
    return found[0]


def resolve_skip(model, skip) -> List[Tuple[str, nn.Module]]:
    if skip is None:
        return []
    shared = cfg_get(text_config(model), KV_SHARING_ATTRIBUTE, 0)
    if shared:
        raise UnsupportedModelError(
            f"skip_attention: {type(model).__name__} has {KV_SHARING_ATTRIBUTE} = {shared} (layers read K/V "
            "other layers compute); a skipped attention sub-layer would break them. Model left unchanged.")
    list_name, layers, child, have = _decoder_layers(model)
    n = len(layers)
    # A hybrid may name its other layers' mixer `self_attn` too (MiniMax's linear attention):
    # only layers of the attention types count (config.layer_types, as in _layer_types).
    types = list(getattr(text_config(model), "layer_types", None) or ())
    if len(types) == n:
        have = [i for i in have if types[i] in SUPPORTED_LAYER_TYPES]
    if isinstance(skip, int):   # the last `skip` layers that have attention
        if not 0 <= skip <= len(have):
            what = "layers" if len(have) == n else f"attention layers of its {n}"
            raise ValueError(f"skip_attention={skip}: must be between 0 and the number of {what} ({len(have)})")
        idx = have[len(have) - skip:]
    else:
        idx = []
        for i in skip:
            if not -n <= i < n:
                raise ValueError(f"skip_attention: layer index {i} out of range for {n} layers")
            if i % n not in have:
                raise ValueError(f"skip_attention: layer {i} ({type(layers[i]).__name__}) has no attention "
                                 f"sub-layer {child!r} to skip (or it is not softmax attention: layer_types); "
                                 f"the layers that have one: {have}")
            idx.append(i % n)
        idx = sorted(set(idx))
    out = []
    for i in idx:
        sub = getattr(layers[i], child)
        # LongCat-Flash: a ModuleList of two attention modules, each called (and caching) on its
        # own; the stand-in goes on each, since the list's own forward is never called.
        parts = ([(f".{j}", m) for j, m in enumerate(sub)] if isinstance(sub, nn.ModuleList) else [("", sub)])
        for suffix, m in parts:
            if isinstance(m, (nn.ModuleList, nn.ModuleDict)) or not hasattr(m, "layer_idx"):
                raise UnsupportedModelError(
                    f"skip_attention: {list_name}.{i}.{child}{suffix} ({type(m).__name__}) is not an attention "
                    "module with a layer_idx (its KV cache slot); fastllm cannot tell what to skip there. "
                    "Model left unchanged.")
            extra = [a for a in forward_return_arities(type(m)) if a != 2]
            if extra:
                # e.g. GLM-MoE-DSA: (out, weights, top-k indices), the indices read by later layers.
                raise UnsupportedModelError(
                    f"skip_attention: {type(m).__name__}.forward returns {extra[0]} values, not (output, weights): "
                    "the layer uses the others (state later layers read), which a skipped sub-layer cannot "
                    "produce. Model left unchanged.")
            out.append((f"{list_name}.{i}.{child}{suffix}", m))
    return out


def _layer_buffers(cache, layer_idx):
    """The (keys, values) buffers a cache already holds for one layer, each (B, H, S, D), or None
    (not allocated yet: a DynamicLayer's first update, a lazily initialized StaticCache)."""
    layers = getattr(cache, "layers", None)
    if isinstance(layers, (list, tuple)) and 0 <= layer_idx < len(layers):
        kv = getattr(layers[layer_idx], "keys", None), getattr(layers[layer_idx], "values", None)
    else:   # hybrid caches (Jamba, Falcon-H1, LFM2, ...) keep per-layer lists
        kv = tuple(getattr(cache, n, None) for n in ("key_cache", "value_cache"))
        kv = tuple(t[layer_idx] if isinstance(t, (list, tuple)) and 0 <= layer_idx < len(t) else None for t in kv)
    ok = all(isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[-1] > 0 for t in kv)
    return kv if ok else None


def _skipped_attention_forward(module, *args, **kwargs):
    """Instance-level forward of a skipped attention sub-layer: (zeros, None).

    The layer adds the output to the residual stream, so zeros remove this attention and
    nothing else (Gemma 2's post-attention RMSNorm maps zeros to zeros). The KV cache still
    gets this layer's tokens, as zeros, so every layer's cached length, the mask sizes computed
    from the cache and StaticCache positions stay what they would be unskipped (skipping layer
    0 included). Nothing reads those zeros (K/V-sharing models are refused), so they are
    (B, 1, S, 1): the layer's cache costs ~nothing, and no guess at its layout is needed (MLA
    layers cache a latent and a rope key of other widths, some sliding layers more heads).
    Where the cache already holds buffers for the layer (a prompt prefilled unskipped, a
    StaticCache initialized early), the zeros take their head count, widths and dtypes.

    Measured on the demo model (random Llama, hidden 256, 4 layers, fp32, CPU, 1 thread,
    torch reference attention, batch 4, medians of 4): skipping 1 / 2 of 4 layers cut prefill
    from 72 to 61 / 49 ms (64-token prompts) and 1675 to 1268 / 1128 ms (512-token prompts),
    and 17-token generation from 292 to 262 / 246 ms and 1939 to 1710 / 1325 ms. Prompt
    logits moved by max 0.86 / 1.31 (mean 0.16 / 0.25; logits up to ~1.5), top-1 agreement
    20% / 3%: random weights have no redundancy to exploit; the cost on a trained model must
    be measured on it (the paper reports small losses for the last layers of Llama 2).
    """
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    cache = cache_argument(kwargs)
    if cache is not None and hasattr(cache, "update"):
        b, s = hidden.shape[:2]
        have = _layer_buffers(cache, module.layer_idx)
        k, v = ((hidden.new_zeros((b, t.shape[1], s, t.shape[3]), dtype=t.dtype) for t in have) if have
                else (hidden.new_zeros((b, 1, s, 1)) for _ in range(2)))
        cache.update(k, v, module.layer_idx)
    return hidden.new_zeros(hidden.shape), None


def install_skip(module):
    # functools.partial (not a bound method) so copy.deepcopy(model) keeps the skip.
    module.__dict__["forward"] = functools.partial(_skipped_attention_forward, module)


def remove_skip(module):
    fwd = module.__dict__.get("forward")
    if isinstance(fwd, functools.partial) and fwd.func is _skipped_attention_forward:
        del module.__dict__["forward"]
