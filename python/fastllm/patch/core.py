"""patch / unpatch / patch_report: the reversible replacement layer, on one model instance.

What patch(model) changes, all of it on this instance and all of it undone by unpatch(model):

  1. config: every PretrainedConfig object the model's modules hold (model.config, the inner
     model's, each attention module's self.config, ...) is replaced by a private deep copy,
     references shared as before. Models built from one config object share it, and
     set_attn_implementation writes config._attn_implementation: on the shared object it would
     switch the sibling model too. unpatch puts the original objects back, with the attributes
     the user changed on the copies meanwhile (model.config.use_cache = False) carried over.
  2. attention: fastllm's function is registered with transformers under a neutral name
     ("fastllm", or "fastllm_<backend>" for a forced backend; see _attention.py) together with
     transformers' own sdpa_mask as its mask function, and model.set_attn_implementation(name)
     switches the (copied) configs to it. No class in transformers is modified.
  3. skip_attention: the chosen layers' attention sub-layer gets an instance-level `forward`
     returning zeros (see _skipped_attention_forward); deleting it restores the class forward.
  4. quantize / sparsity (lossy, opt-in): nn.Linear modules chosen by the rules table
     (rules.py; include / exclude; lm_head and MoE routers left alone by default, embeddings
     always) are replaced by fastllm.nn.Int8Linear / Sparse24Linear, built off the model first
     (_linear.py: calibration through hooks, SmoothQuant folded into norms where an exact
     probe allows). The originals are dropped, or kept (keep_original=True, moved to CPU
     memory) for unpatch.
Without 4, weights and buffers are not touched (state_dict bit-identical across patch /
unpatch); with 4 and keep_original=True, unpatch restores them bit-identically too.
Every argument is checked, and all calibration and module building done, before the model is
touched; an error during the changes undoes them. The record of all this is kept in
model._fastllm_patch (a PatchState).
"""
import copy
import dataclasses
import fnmatch
import functools
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import __version__
from ..errors import BackendUnavailableError, FastllmError
from ..ops.registry import OPS, resolve_request
from . import _attention, _linear, _save_guard
from .report import ModuleEntry, OpEntry, PatchReport
from .rules import (ATTENTION_SUBLAYER_NAMES, DEFAULT_EXCLUDED, INT8_MODES, KV_SHARING_ATTRIBUTE,
                    LINEAR_DEFAULT_EXCLUDE, PRUNE, QUERY_SLICING_METHODS, RULES, SPARSITY, SUPPORTED_LAYER_TYPES,
                    as_linear, attention_unsupported_reason, sparse24_class)

STATE_ATTR = "_fastllm_patch"


class UnsupportedModelError(FastllmError, ValueError):
    """fastllm.patch cannot serve this model; the model was left untouched."""


class OriginalsDiscardedError(FastllmError):
    """unpatch cannot restore quantized / pruned layers: patch dropped the originals."""


@dataclass
class PatchState:
    options: Dict[str, object]
    impl: Optional[str]                                  # attention implementation set, or None
    config_refs: List[Tuple[nn.Module, str, object]]     # (module, attr, original config)
    skipped: List[Tuple[str, nn.Module]]                 # attention modules with zeroed output
    report: PatchReport
    original_impl: Optional[str] = None                  # before patch (for information)
    swaps: List["_linear.Swap"] = field(default_factory=list)   # linear swaps (old kept or None)
    folds: List["_linear.Fold"] = field(default_factory=list)   # SmoothQuant folds into norms
    originals_kept: bool = True                          # False: unpatch cannot undo the swaps
    dtype: Optional[torch.dtype] = None                  # the model's float dtype when patched
    # Report lines a reload cannot recompute (SmoothQuant folds, linears left in float) and the
    # linear planning notes: save_pretrained writes them, from_pretrained puts them back.
    carried: Tuple[List[ModuleEntry], List[str]] = ((), ())
    # (private config copy, its attributes right after patch): unpatch carries the user's later
    # edits of the copies (model.config.use_cache = False, ...) over to the originals.
    config_snapshots: List[Tuple[object, Dict[str, object]]] = field(default_factory=list)

    def __setstate__(self, state):
        # Unpickling a patched model (torch.load in a fresh process) must register fastllm's
        # attention function again: the config names it, transformers' registry does not have it.
        self.__dict__.update(state)
        if self.impl is not None:
            _attention.register(self.options["backend"])
        # A copy's modules are part of a patched model too (patching one of its submodules would
        # nest two patches): deepcopy and unpickling come through here.
        _register_holders(self.config_refs)


# ----------------------------------------------------------------------------------------------
# Argument checks: all of them run before the model is touched.

def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("fastllm.patch needs transformers: pip install 'fastllm[hf]' "
                          f"(or pip install transformers) ({e})") from None
    return transformers


def _check_patterns(name, value) -> Optional[Tuple[str, ...]]:
    if value is None:
        return None
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise TypeError(f"argument '{name}' must be a module-name pattern (str) or a list of them, "
                        f"got {value!r}")
    return tuple(value)


def _check_calibration(calibration, options):
    """The calibration batches as a list (checked), or None; errors before the model is touched."""
    needs = _linear.calibration_needs(options)
    why = {"int8_linear": (f"quantize={options['quantize']!r}" if options["smooth_alpha"] is None else
                           f"SmoothQuant (smooth_alpha={options['smooth_alpha']})") + " needs per-channel "
                          "activation maxima",
           "sparse24_linear": "prune='wanda' needs per-input-channel activation norms"}
    if calibration is None:
        if needs:
            raise ValueError(f"argument 'calibration': {'; '.join(why[n] for n in needs)}: pass "
                             "calibration=<an iterable of input batches> (dicts of model inputs or "
                             "input_ids tensors). Nothing was changed.")
        return None
    if not needs:
        raise ValueError("argument 'calibration' was given but nothing uses it (it serves quantize="
                         "'w8a8-static', smooth_alpha=... and prune='wanda'). Nothing was changed.")
    if isinstance(calibration, (torch.Tensor, dict, str, bytes)):
        raise TypeError(f"argument 'calibration' must be an iterable of batches, got one "
                        f"{type(calibration).__name__} (wrap a single batch in a list: [batch])")
    try:
        batches = list(calibration)
    except TypeError:
        raise TypeError(f"argument 'calibration' must be an iterable of batches, got "
                        f"{type(calibration).__name__}") from None
    if not batches:
        raise ValueError("argument 'calibration' is empty: calibration needs at least one batch. "
                         "Nothing was changed.")
    for i, b in enumerate(batches):
        if not isinstance(b, (torch.Tensor, dict, tuple, list)):
            raise TypeError(f"argument 'calibration': batch {i} is a {type(b).__name__}; expected a dict of "
                            "model inputs, an input_ids tensor, or a tuple of positional inputs")
    return batches


def check_runtime_options(attention, backend, skip_attention):
    """Checks the options that do not touch weights (the ones from_pretrained lets a caller
    override); returns skip_attention normalized (a list of indices, an int, or None)."""
    if not isinstance(attention, bool):
        raise TypeError(f"argument 'attention' must be a bool, got {attention!r}")
    resolve_request(backend)   # validates the name (and FASTLLM_BACKEND)
    if skip_attention is not None:
        if isinstance(skip_attention, bool) or not isinstance(skip_attention, (int, list, tuple)):
            raise TypeError("argument 'skip_attention' must be an int (the last k layers) or a list of "
                            f"layer indices, got {skip_attention!r}")
        if isinstance(skip_attention, (list, tuple)):
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in skip_attention):
                raise TypeError(f"argument 'skip_attention': layer indices must be ints, got {skip_attention!r}")
            skip_attention = list(skip_attention)
    return skip_attention


def _normalize_options(attention, quantize, sparsity, prune, calibration, smooth_alpha, group_size,
                       keep_original, skip_attention, backend, include, exclude):
    """(options dict, calibration batches or None). Raises before anything is touched."""
    skip_attention = check_runtime_options(attention, backend, skip_attention)
    if quantize is not None and quantize not in INT8_MODES:
        raise ValueError(f"argument 'quantize' must be None or one of {', '.join(map(repr, INT8_MODES))}, "
                         f"got {quantize!r}")
    if sparsity is not None and sparsity not in SPARSITY:
        raise ValueError(f"argument 'sparsity' must be None or one of {', '.join(map(repr, SPARSITY))}, "
                         f"got {sparsity!r}")
    if prune is not None:
        if sparsity is None:
            raise ValueError(f"argument 'prune'={prune!r} is for sparsity='2:4' (sparsity is None)")
        if prune not in PRUNE:
            raise ValueError(f"argument 'prune' must be one of {', '.join(map(repr, PRUNE))}, got {prune!r}")
    if sparsity is not None:
        prune = prune or "magnitude"
        if quantize not in (None, "w8a8"):
            raise ValueError(f"sparsity='2:4' combines with quantize='w8a8' only (2:4 + int8 is W8A8 with "
                             f"per-token activations), got quantize={quantize!r}")
    if smooth_alpha is not None:
        if isinstance(smooth_alpha, bool) or not isinstance(smooth_alpha, (int, float)) \
                or not 0.0 <= smooth_alpha <= 1.0:
            raise ValueError(f"argument 'smooth_alpha' must be None or a number in [0, 1], got {smooth_alpha!r}")
        if quantize not in ("w8a8", "w8a8-static") or sparsity is not None:
            raise ValueError("argument 'smooth_alpha' (SmoothQuant) is for quantize='w8a8' / 'w8a8-static' "
                             f"without sparsity (quantize={quantize!r}, sparsity={sparsity!r})")
        smooth_alpha = float(smooth_alpha)
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 or group_size % 16:
            raise ValueError(f"argument 'group_size' must be None or a positive multiple of 16, got {group_size!r}")
        if quantize != "w8a16":
            raise ValueError(f"argument 'group_size' is for quantize='w8a16' (quantize={quantize!r})")
    if not isinstance(keep_original, bool):
        raise TypeError(f"argument 'keep_original' must be a bool, got {keep_original!r}")
    options = {"attention": attention, "backend": backend, "skip_attention": skip_attention,
               "include": _check_patterns("include", include), "exclude": _check_patterns("exclude", exclude),
               "quantize": quantize, "sparsity": sparsity, "prune": prune, "smooth_alpha": smooth_alpha,
               "group_size": group_size, "keep_original": keep_original}
    batches = _check_calibration(calibration, options)
    options["calibration"] = None if batches is None else len(batches)
    return options, batches


def _model_info(model):
    """(device, dtype) of the model's first floating-point parameter (cpu / float32 if none)."""
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    if p is None:
        return torch.device("cpu"), torch.float32
    return p.device, p.dtype


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _attention_modules(model) -> List[Tuple[str, nn.Module]]:
    rule = RULES[0]
    return [(n, m) for n, m in model.named_modules() if rule.match(n, m)]


def _check_supported(model, options, transformers) -> List[Tuple[str, nn.Module]]:
    """Raise UnsupportedModelError (model untouched) unless fastllm's attention can serve it."""
    name = type(model).__name__
    if not isinstance(model, transformers.PreTrainedModel):
        raise UnsupportedModelError(f"fastllm.patch takes a transformers PreTrainedModel, got {name}")
    attn = _attention_modules(model)
    if not options["attention"]:
        return attn
    if not attn:
        raise UnsupportedModelError(
            f"{name}: no module dispatches attention through transformers' AttentionInterface "
            "(ALL_ATTENTION_FUNCTIONS.get_interface); fastllm cannot replace its attention.")
    for sub in model.modules():
        if isinstance(sub, transformers.PreTrainedModel):
            cls = type(sub)
            if not getattr(cls, "_supports_attention_backend", False):
                raise UnsupportedModelError(
                    f"{cls.__name__} does not declare support for custom attention functions "
                    "(_supports_attention_backend is False in transformers); fastllm.patch would not "
                    "know what its attention modules pass. Model left unchanged.")
            if not cls._can_set_attn_implementation():
                raise UnsupportedModelError(
                    f"{cls.__name__} cannot switch its attention implementation after loading "
                    "(transformers' _can_set_attn_implementation). Model left unchanged.")
    for n, m in attn:
        why = attention_unsupported_reason(m)
        if why:
            raise UnsupportedModelError(f"{name}: attention module {n} ({type(m).__name__}): {why}. "
                                        "Model left unchanged.")
    cfg = _text_config(model)
    for method, count in QUERY_SLICING_METHODS:
        if _cfg_get(cfg, count, 0) and any(hasattr(m, method) for m in model.modules()):
            raise UnsupportedModelError(
                f"{name}: {method} hands its {count} = {_cfg_get(cfg, count, 0)} shared layers fewer queries "
                "than keys with attention_mask=None, which transformers leaves undefined for registered "
                "attention functions (fastllm would compute the wrong positions). Model left unchanged.")
    layer_types = getattr(cfg, "layer_types", None) or ()
    unknown = sorted(set(layer_types) - set(SUPPORTED_LAYER_TYPES))
    if unknown:
        raise UnsupportedModelError(
            f"{name}: config.layer_types has {unknown}; fastllm's attention serves only "
            f"{list(SUPPORTED_LAYER_TYPES)}. Model left unchanged.")
    return attn


def _cfg_get(cfg, attr, default):
    """getattr that survives per-layer configs (Gemma 4): transformers raises a RuntimeError
    (AmbiguousGlobalPerLayerAttributeError) for a global read of a per-layer attribute."""
    try:
        return getattr(cfg, attr, default)
    except RuntimeError:
        return default


def _example_call(model, device, dtype):
    """Arguments of a typical flash_attention call for this model (for the registry)."""
    cfg = _text_config(model)
    heads = _cfg_get(cfg, "num_attention_heads", None) or 1
    kv_heads = _cfg_get(cfg, "num_key_value_heads", None) or heads
    head_dim = _cfg_get(cfg, "head_dim", None) or (_cfg_get(cfg, "hidden_size", 64) // heads)
    softcap = float(_cfg_get(cfg, "attn_logit_softcapping", None) or 0.0)
    q = torch.empty(1, heads, 16, head_dim, device=device, dtype=dtype)
    k = torch.empty(1, kv_heads, 16, head_dim, device=device, dtype=dtype)
    return (q, k, k, None, True, head_dim ** -0.5, 0, softcap)


def _op_entry(model, backend, device, dtype) -> OpEntry:
    op = OPS["flash_attention"]
    args = _example_call(model, device, dtype)
    entry = _entry(op, backend, device, args)
    prefill, decode = _attention.kernel_name_for(512), _attention.kernel_name_for(1)
    note = (f"every call goes to {prefill}, decode (Sq = 1) included: no decode kernel yet" if prefill == decode
            else f"prefill calls go to {prefill}, decode calls (few queries) to {decode}")
    if backend != resolve_request(backend):
        note += f"; FASTLLM_BACKEND={resolve_request(backend)}"
    entry.note = note
    return entry


def _decode_entry(model, backend, device, dtype) -> OpEntry:
    """decode_attention on a typical decode step (1 query against 64 cached keys)."""
    q, k, _, _, _, scale, _, softcap = _example_call(model, device, dtype)
    q1, kc = q[:, :, :1], k.new_empty(k.shape[0], k.shape[1], 64, k.shape[3])
    entry = _entry(OPS["decode_attention"], backend, device, (q1, kc, kc, None, None, None, scale, 0, softcap, 0))
    entry.note = "decode steps (<= 16 queries against a longer cache)"
    return entry


def _entry(op, backend, device, args) -> OpEntry:
    req = resolve_request(backend)
    if req == "auto":
        reasons = op.reasons(device, *args)
    else:
        reasons = {b: (op.reason(b, device, *args) if b == req else "not requested") for b in op.order}
    selected = next((b for b in op.order if reasons[b] is None), None)
    if selected is not None:
        # Resolve once eagerly: the registry logs its choice on the first call per device, and a
        # logging call inside a torch.compile(fullgraph=True) trace is a graph break.
        op.select(backend, device, *args)
    return OpEntry(op.name, backend, selected, reasons)


def _linear_example(name, linear, options, device, dtype):
    """Arguments of a typical call of registry op `name` for a swapped `linear` (16 tokens)."""
    K, N, M = linear.in_features, linear.out_features, 16
    e = functools.partial(torch.empty, device=device)
    if name == "quantize_per_token":
        return (e(M, K, dtype=dtype),)
    if name == "int8_matmul_dynamic":
        return (e(M, K, dtype=dtype), e(N, K, dtype=torch.int8), e(N), None, None)
    if name == "int8_matmul_static":
        return (e(M, K, dtype=dtype), e(N, K, dtype=torch.int8), e(1), e(1), e(N), None)
    if name == "w8a16_matmul":
        gs = options["group_size"]
        return (e(M, K, dtype=dtype), e(N, K, dtype=torch.int8), e(N, K // gs) if gs else e(N), None, gs or 0)
    return None


def _loaded_as_chosen(options, loaded):
    """[(name, module, rule)] for the layers from_pretrained rebuilt, as select() gives them."""
    rules = {r.name: r for r in _linear.swap_rules(options)}
    out = []
    for n, m in loaded[1]:
        r = rules.get("sparse24_linear" if isinstance(m, sparse24_class()) else "int8_linear")
        if r is not None:
            out.append((n, m, r))
    return out


def _float_bytes(m, dtype) -> int:
    """Parameter bytes of the float nn.Linear that `m` (a rebuilt swapped layer) replaced."""
    n = m.in_features * m.out_features + (m.out_features if m.bias is not None else 0)
    return n * torch.empty(0, dtype=dtype).element_size()


def _linear_op_entries(options, chosen, backend, device, dtype) -> Tuple[List[OpEntry], List[str]]:
    """OpEntry per registry op the swapped linears use (checked on the first chosen layer's shapes)."""
    entries, notes, seen = [], [], set()
    for rule in _linear.swap_rules(options):
        layers = [(n, m) for n, m, r in chosen if r is rule]
        if not layers:
            continue
        for name in rule.ops(options):
            if name in seen:
                continue
            seen.add(name)
            op = OPS.get(name)
            if op is None:
                if rule.name != "sparse24_linear":
                    notes.append(f"{rule.name}: op {name} is not registered")
                continue
            args = _linear_example(name, as_linear(layers[0][1]), options, device, dtype)
            if args is None:   # an op whose call we do not model: device-level reasons only
                from ..ops.registry import device_reason
                reasons = {b: (device_reason(b, device, auto=resolve_request(backend) == "auto")
                               if b in op.impls else f"{name} has no {b} implementation") for b in op.order}
                sel = next((b for b in op.order if reasons[b] is None), None)
                entries.append(OpEntry(name, backend, sel, reasons, f"used by {rule.name} (device-level check)"))
                continue
            ent = _entry(op, backend, device, args)
            ent.note = f"used by {rule.name} ({len(layers)} layers)"
            if name in ("int8_matmul", "int8_matmul_int32") and device.type == "cpu" and ent.selected == "torch":
                from ..ops.int8 import cpu_int_mm_ok
                ent.note += ("; on CPU torch._int_mm (exactness-probed)" if cpu_int_mm_ok()
                             else "; on CPU the int32 reference matmul")
            entries.append(ent)
    return entries, notes


def _decoder_layers(model) -> Tuple[str, nn.ModuleList, str]:
    """(qualified name, the ModuleList of decoder layers, the attention child's name)."""
    n_layers = getattr(_text_config(model), "num_hidden_layers", None)
    found = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            for child in ATTENTION_SUBLAYER_NAMES:
                if all(isinstance(getattr(layer, child, None), nn.Module) for layer in mod):
                    found.append((name, mod, child))
                    break
    if n_layers is not None:
        found = [f for f in found if len(f[1]) == n_layers] or found
    if len(found) != 1:
        raise UnsupportedModelError(
            f"skip_attention: {type(model).__name__} has no single list of decoder layers with an "
            f"attention sub-layer named one of {list(ATTENTION_SUBLAYER_NAMES)} (found "
            f"{[f[0] for f in found]}); its attention cannot be skipped by zeroing that output.")
    return found[0]


def _resolve_skip(model, skip) -> List[Tuple[str, nn.Module]]:
    if skip is None:
        return []
    shared = _cfg_get(_text_config(model), KV_SHARING_ATTRIBUTE, 0)
    if shared:
        raise UnsupportedModelError(
            f"skip_attention: {type(model).__name__} has {KV_SHARING_ATTRIBUTE} = {shared} (layers read K/V "
            "other layers compute); a skipped attention sub-layer would break them. Model left unchanged.")
    list_name, layers, child = _decoder_layers(model)
    n = len(layers)
    if isinstance(skip, int):
        if not 0 <= skip <= n:
            raise ValueError(f"skip_attention={skip}: must be between 0 and the number of layers ({n})")
        idx = list(range(n - skip, n))
    else:
        idx = []
        for i in skip:
            if not -n <= i < n:
                raise ValueError(f"skip_attention: layer index {i} out of range for {n} layers")
            idx.append(i % n)
        idx = sorted(set(idx))
    return [(f"{list_name}.{i}.{child}", getattr(layers[i], child)) for i in idx]


# ----------------------------------------------------------------------------------------------
# skip_attention (arXiv 2404.05741: the attention sub-layers of the last layers contribute
# little; dropping them saves their compute and most of their time).

def _skipped_attention_forward(module, n_kv_heads, head_dim, *args, **kwargs):
    """Instance-level forward of a skipped attention sub-layer: (zeros, None).

    The layer adds the output to the residual stream, so zeros remove this attention and
    nothing else (Gemma 2's post-attention RMSNorm maps zeros to zeros). The KV cache still
    gets zero keys/values for this layer, so every layer's cached length, the mask sizes
    computed from the cache and StaticCache positions stay what they would be unskipped
    (skipping layer 0 included); the memory for this layer's cache is not saved.

    Measured on the demo model (random Llama, hidden 256, 4 layers, fp32, CPU, 1 thread,
    torch reference attention, batch 4, medians of 4): skipping 1 / 2 of 4 layers cut prefill
    from 72 to 61 / 49 ms (64-token prompts) and 1675 to 1268 / 1128 ms (512-token prompts),
    and 17-token generation from 292 to 262 / 246 ms and 1939 to 1710 / 1325 ms. Prompt
    logits moved by max 0.86 / 1.31 (mean 0.16 / 0.25; logits up to ~1.5), top-1 agreement
    20% / 3%: random weights have no redundancy to exploit; the cost on a trained model must
    be measured on it (the paper reports small losses for the last layers of Llama 2).
    """
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    cache = kwargs.get("past_key_values")
    if cache is None:
        cache = kwargs.get("past_key_value")
    if cache is not None and hasattr(cache, "update"):
        shape = (hidden.shape[0], n_kv_heads, hidden.shape[1], head_dim)
        cache.update(hidden.new_zeros(shape), hidden.new_zeros(shape), module.layer_idx)
    return hidden.new_zeros(hidden.shape), None


def _install_skip(module, cfg):
    # The module's own sizes first: per-layer configs (Gemma 4) have no global ones.
    mcfg = getattr(module, "config", None) or cfg
    heads = _cfg_get(mcfg, "num_attention_heads", None) or _cfg_get(cfg, "num_attention_heads", None)
    kv_heads = _cfg_get(mcfg, "num_key_value_heads", None) or _cfg_get(cfg, "num_key_value_heads", None)
    groups = getattr(module, "num_key_value_groups", None)
    if heads and not kv_heads:
        kv_heads = heads // groups if groups else heads
    head_dim = getattr(module, "head_dim", None) or _cfg_get(mcfg, "head_dim", None) or (
        heads and _cfg_get(cfg, "hidden_size", 0) // heads)
    if not (kv_heads and head_dim):
        raise UnsupportedModelError(f"skip_attention: cannot tell the K/V shape of {type(module).__name__} "
                                    "from its config (per-layer settings); model left unchanged")
    # functools.partial (not a bound method) so copy.deepcopy(model) keeps the skip.
    module.__dict__["forward"] = functools.partial(_skipped_attention_forward, module, kv_heads, head_dim)


def _remove_skip(module):
    fwd = module.__dict__.get("forward")
    if isinstance(fwd, functools.partial) and fwd.func is _skipped_attention_forward:
        del module.__dict__["forward"]


# ----------------------------------------------------------------------------------------------
# Config isolation.

def _privatize_configs(model, transformers) -> List[Tuple[nn.Module, str, object]]:
    """Give this model private copies of every config object its modules reference."""
    base = transformers.PretrainedConfig
    refs = []
    for mod in model.modules():
        for attr, val in list(vars(mod).items()):
            if isinstance(val, base):
                refs.append((mod, attr, val))
    originals = list({id(v): v for _, _, v in refs}.values())
    copies = copy.deepcopy(originals)          # one deepcopy: shared sub-configs stay shared
    by_id = {id(o): c for o, c in zip(originals, copies)}
    for mod, attr, val in refs:
        mod.__dict__[attr] = by_id[id(val)]
    return refs


def _restore_configs(refs):
    for mod, attr, val in refs:
        _PATCHED_HOLDERS.discard(mod)
        mod.__dict__[attr] = val


#: The modules of patched models (and of deepcopy / unpickled copies of them) that hold one of
#: the patch's private configs: patching one of them on its own would nest two patches. Modules,
#: not configs: a new model built from a patched model's config shares the config object and is
#: still free to be patched.
_PATCHED_HOLDERS = weakref.WeakSet()


def _register_holders(refs):
    for mod, _, _ in refs:
        _PATCHED_HOLDERS.add(mod)


def _config_attrs(cfg, transformers) -> Dict[str, object]:
    """The config's own attributes (not sub-configs, which are snapshotted on their own), copied
    deeply so that later in-place edits (a list appended to) show as differences."""
    return {k: copy.deepcopy(v) for k, v in vars(cfg).items() if not isinstance(v, transformers.PretrainedConfig)}


def _same(a, b) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:        # noqa: BLE001 - values whose == is not a bool (tensors): changed
        return False


def _carry_config_edits(refs, snapshots, transformers):
    """Copy the attributes the user changed on the private copies since patch onto the originals
    (the attention implementation excepted: unpatch restores the original's)."""
    snap = {id(c): attrs for c, attrs in snapshots}
    done = set()
    for mod, attr, original in refs:
        cur = mod.__dict__.get(attr)
        if id(cur) not in snap or id(cur) in done:
            continue
        done.add(id(cur))
        before = snap[id(cur)]
        for k, v in _config_attrs(cur, transformers).items():
            if "attn_implementation" not in k and not (k in before and _same(before[k], v)):
                original.__dict__[k] = v


# ----------------------------------------------------------------------------------------------
# Public API.

def patch(model, *, attention: bool = True, quantize=None, sparsity=None, calibration=None,
          skip_attention: Union[None, int, Sequence[int]] = None, backend: str = "auto",
          include=None, exclude=None, keep_original: bool = False, smooth_alpha=None, prune=None,
          group_size=None):
    """Make a transformers model use fastllm's kernels; returns the same model object.

    attention:      route attention through fastllm.ops.flash_attention (exact).
    backend:        "auto" | "cuda" | "triton" | "torch" for fastllm's ops; a forced backend
                    that cannot serve a call raises (never a silent fallback).
    skip_attention: int k = skip the attention sub-layer of the last k decoder layers, or a
                    list of layer indices (lossy; arXiv 2404.05741). Outputs change.
    quantize:       None | "w8a8" (int8 weights per channel, activations per token at run
                    time) | "w8a8-static" (one calibrated activation scale per layer) |
                    "w8a16" (int8 weights, 16-bit activations; group_size= for per-group
                    scales). Lossy; nn.Linear -> fastllm.nn.Int8Linear.
    sparsity:       None | "2:4" (prune="magnitude" | "wanda"): nn.Linear ->
                    fastllm.nn.Sparse24Linear; with quantize="w8a8", 2:4 + int8.
    calibration:    iterable of input batches (dicts of model inputs, input_ids tensors, or
                    tuples of positional inputs) run through the unpatched model: required by
                    "w8a8-static", smooth_alpha and prune="wanda", rejected otherwise.
    smooth_alpha:   SmoothQuant migration strength in [0, 1] (w8a8 modes), folded into the
                    preceding norm where that is exact, else applied inside the layer.
    include / exclude: fnmatch patterns on module names for the linear swaps (lm_head and
                    MoE routers are left alone unless `include` names them; embeddings
                    are never swapped).
    keep_original:  keep the original nn.Linear modules (in CPU memory) so unpatch can
                    restore them; without it unpatch of a quantized / pruned model raises.

    Every argument is checked and all calibration and module building done before the model is
    changed; an error leaves it untouched. Patching a patched model with the same options
    returns it unchanged; with other options raises (fastllm.unpatch first). An unsupported
    model raises UnsupportedModelError. fastllm.patch_report(model) says what was done.
    """
    options, batches = _normalize_options(attention, quantize, sparsity, prune, calibration, smooth_alpha,
                                          group_size, keep_original, skip_attention, backend, include, exclude)
    return _patch(model, options, batches)


def _patch(model, options, batches, loaded=None):
    """patch() after argument checks. loaded: (directory, [(name, module)], (report entries,
    notes)) for from_pretrained: linear swaps already made by the loader (recorded, not
    recomputed) and the saved report lines about them (PatchState.carried)."""
    transformers = _transformers()
    backend = options["backend"]
    state = getattr(model, STATE_ATTR, None)
    if state is not None:
        if state.options == options:
            if state.impl is not None and model.config._attn_implementation != state.impl:
                # The user switched away (set_attn_implementation) and patches again to get
                # fastllm's attention back: give it back rather than return silently unchanged.
                model.set_attn_implementation(state.impl)
            return model
        raise FastllmError(f"{type(model).__name__} is already patched with {state.options}; "
                           f"fastllm.unpatch(model) before patching with {options}.")
    inner = next((n for n, m in model.named_modules() if n and STATE_ATTR in m.__dict__), None)
    if inner is not None:
        raise FastllmError(f"{type(model).__name__}: its submodule {inner!r} is already patched; "
                           f"fastllm.unpatch(model.{inner}) first (patch the whole model once). Model left unchanged.")
    if model in _PATCHED_HOLDERS:
        raise FastllmError(f"{type(model).__name__} is part of a model fastllm.patch already patched (it holds "
                           "that model's private config); patch or unpatch the whole model. Left unchanged.")
    attn = _check_supported(model, options, transformers)
    skips = _resolve_skip(model, options["skip_attention"])
    device, dtype = _model_info(model)
    if options["attention"] and dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise UnsupportedModelError(
            f"{type(model).__name__} computes in {str(dtype).replace('torch.', '')}: fastllm's attention runs "
            "float16, bfloat16 and float32 models. Model left unchanged.")
    op_entry = _op_entry(model, backend, device, dtype) if options["attention"] else None
    dec_entry = _decode_entry(model, backend, device, dtype) if options["attention"] else None
    forced = resolve_request(backend) != "auto"
    if op_entry is not None and forced and op_entry.selected is None:
        raise BackendUnavailableError(
            f"fastllm.patch(backend={backend!r}): flash_attention cannot run on {device} "
            f"({dtype}): {op_entry.reasons[resolve_request(backend)]}. Model left unchanged.")
    chosen, left = ([], []) if loaded else _linear.select(model, options)
    # Loaded swaps use the same ops as the ones patch would have made (report, forced backend).
    lin_ops, lin_notes = _linear_op_entries(options, _loaded_as_chosen(options, loaded) if loaded else chosen,
                                            backend, device, dtype)
    lin_ops = ([dec_entry] if dec_entry else []) + lin_ops   # the report lists them after flash_attention
    for e in lin_ops:
        if forced and e.selected is None:
            raise BackendUnavailableError(
                f"fastllm.patch(backend={backend!r}): {e.op} cannot run on {device} ({dtype}): "
                f"{e.reasons[resolve_request(backend)]}. Model left unchanged.")
    plan = _linear.Plan()
    if chosen or left:
        plan = _linear.plan(model, options, batches, device, chosen, left)
    carried = loaded[2] if loaded else (_fold_entries(plan) + plan.entries, list(plan.notes))
    plan.notes = list(carried[1]) + lin_notes   # a loaded model's plan is empty: its notes come from the save

    original_impl = model.config._attn_implementation
    refs, impl, installed, committed = [], None, [], False
    try:
        if options["attention"]:
            refs = _privatize_configs(model, transformers)
            impl = _attention.register(backend)
            model.set_attn_implementation(impl)
            wrong = [n for n, m in attn
                     if getattr(getattr(m, "config", None), "_attn_implementation", impl) != impl]
            if model.config._attn_implementation != impl or wrong:
                raise UnsupportedModelError(
                    f"{type(model).__name__}: set_attn_implementation({impl!r}) did not reach "
                    f"{wrong or ['the model config']}. Model left unchanged.")
        cfg = _text_config(model)
        for _, m in skips:
            _install_skip(m, cfg)
            installed.append(m)
        _linear.commit(model, plan)
        committed = True
    except BaseException:
        if committed:
            _linear.restore(model, plan.swaps, plan.folds, dtype)
        for m in installed:
            _remove_skip(m)
        _restore_configs(refs)
        raise

    report = _build_report(model, options, attn, skips, op_entry, device, dtype, transformers, plan,
                           lin_ops, loaded, carried)
    keep = options["keep_original"] and not loaded
    if keep:
        _linear.offload(plan.swaps)
    else:   # drop the originals: this is where the memory is saved
        for sw in plan.swaps:
            sw.old = None
        for f in plan.folds:
            f.old = {}
    copies = list({id(m.__dict__[a]): m.__dict__[a] for m, a, _ in refs}.values())
    _register_holders(refs)
    state = PatchState(options=options, impl=impl, config_refs=refs, skipped=skips, report=report,
                       original_impl=original_impl, swaps=plan.swaps, folds=plan.folds,
                       originals_kept=keep or not plan.swaps, dtype=dtype, carried=carried,
                       config_snapshots=[(c, _config_attrs(c, transformers)) for c in copies])
    if loaded:
        state.swaps = [_linear.Swap(n, None, m, "loaded", "", 0) for n, m in loaded[1]]
        state.originals_kept = not state.swaps
    model.__dict__[STATE_ATTR] = state
    if state.swaps:
        _save_guard.install(model, len(state.swaps))
    return model


def unpatch(model):
    """Undo fastllm.patch: original config objects and attention implementation, skip
    wrappers removed, and (keep_original=True) the original linear modules and norm weights.
    Returns the model. Raises ValueError if it is not patched, and OriginalsDiscardedError
    (the model staying patched and working) when quantized / pruned layers were not kept."""
    state = model.__dict__.get(STATE_ATTR)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not patched by fastllm (nothing to undo)")
    if not state.originals_kept:
        o = state.options
        how = ", ".join(f"{k}={o[k]!r}" for k in ("quantize", "sparsity") if o.get(k)) or "loaded quantized"
        raise OriginalsDiscardedError(
            f"fastllm.unpatch: the original weights of {len(state.swaps)} layers ({how}) are gone: "
            "patch() was called without keep_original=True (or the model was loaded quantized), so "
            "they were dropped to save memory. The model is still patched and works. Reload the "
            "float model to get it back, or patch with keep_original=True to be able to unpatch.")
    # Originals go back as they were, unless the model changed dtype after patch (model.half()):
    # then they take the new dtype, as they would have had they stayed in the model.
    now = _model_info(model)[1]
    _linear.restore(model, state.swaps, state.folds, now if now != state.dtype else None)
    for _, m in state.skipped:
        _remove_skip(m)
    _carry_config_edits(state.config_refs, getattr(state, "config_snapshots", []), _transformers())
    _restore_configs(state.config_refs)
    _save_guard.remove(model)
    del model.__dict__[STATE_ATTR]
    return model


def is_patched(model) -> bool:
    return STATE_ATTR in getattr(model, "__dict__", {})


def patch_report(model) -> PatchReport:
    """The PatchReport of a patched model (print it for a table)."""
    state = model.__dict__.get(STATE_ATTR)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not patched by fastllm; call fastllm.patch(model)")
    now = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if state.impl is not None and now != state.impl:
        return dataclasses.replace(state.report, notes=state.report.notes + [
            f"the model was switched to attention implementation {now!r} after patch "
            f"(set_attn_implementation): fastllm's attention ({state.impl!r}) is not in use now"])
    return state.report


def _fold_entries(plan) -> List[ModuleEntry]:
    return [ModuleEntry(f.name, type(f.module).__name__, "replaced",
                        f"SmoothQuant 1/s folded into its weight (for {', '.join(f.consumers)})")
            for f in plan.folds]


def _build_report(model, options, attn, skips, op_entry, device, dtype, transformers, plan, lin_ops,
                  loaded, carried) -> PatchReport:
    report = PatchReport(
        model=type(model).__name__, device=str(device), dtype=str(dtype).replace("torch.", ""),
        options=dict(options),
        versions={"fastllm": __version__, "transformers": transformers.__version__,
                  "torch": torch.__version__})
    if op_entry is not None:
        report.ops.append(op_entry)
    report.ops += lin_ops
    skipped_ids = {id(m) for _, m in skips}
    impl = _attention.impl_name(options["backend"])
    for n, m in attn:
        if options["attention"]:
            detail = f"attention -> {impl} (fastllm.ops.flash_attention, {op_entry.selected or 'no backend'})"
            report.modules.append(ModuleEntry(n, type(m).__name__, "replaced", detail, 0))
        elif id(m) not in skipped_ids:
            report.modules.append(ModuleEntry(n, type(m).__name__, "left", "attention=False"))
    for n, m in skips:
        report.modules.append(ModuleEntry(
            n, type(m).__name__, "skipped",
            "skip_attention: output replaced by zeros, KV cache fed zeros (lossy; arXiv 2404.05741)"))
    if loaded:
        for n, m in loaded[1]:
            report.modules.append(ModuleEntry(n, "Linear", "replaced",
                                              f"{type(m).__name__}({m.extra_repr()}), loaded from {loaded[0]}",
                                              _float_bytes(m, dtype) - _linear.module_bytes(m)))
    for sw in plan.swaps:
        report.modules.append(ModuleEntry(sw.name, type(sw.old).__name__, "replaced", sw.detail, sw.bytes_saved))
    report.modules += carried[0]    # folds, then the linears left in float (plan.entries)
    swapping = bool(_linear.swap_rules(options))
    left = []
    if not swapping and not loaded:
        left = [ModuleEntry(n, "Linear", "left", f"excluded from linear swaps by default ({DEFAULT_EXCLUDED})")
                for n, m in model.named_modules() if type(m) is nn.Linear and
                any(fnmatch.fnmatchcase(n, p) for p in LINEAR_DEFAULT_EXCLUDE)]
        rest = sum(type(m) is nn.Linear for _, m in model.named_modules()) - len(left)
        if rest:
            left.append(ModuleEntry(f"{rest} x nn.Linear", "Linear", "left",
                                    "no linear swap requested (quantize= / sparsity=)"))
        if options["include"] or options["exclude"]:
            report.notes.append("include / exclude apply to linear swaps (quantize= / sparsity=), which were "
                                "not requested: they changed nothing")
    report.modules += left
    for n, m in model.named_modules():
        if isinstance(m, nn.Embedding):
            report.modules.append(ModuleEntry(n, type(m).__name__, "left", "embeddings are never swapped"))
    report.notes += plan.notes
    asked = ", ".join(f"{k}={options[k]!r}" for k in ("quantize", "sparsity") if options.get(k))
    if asked and not plan.swaps and not loaded:
        nothing = (f"{asked} swapped no layer: every candidate linear was left or skipped (the rows above "
                   "say why); the model's linears are unchanged")
        report.notes.append(nothing)
        warnings.warn(f"fastllm.patch: {nothing}", UserWarning, stacklevel=4)
    report.notes.append("attention bytes saved are 0 by construction: exact attention, weights untouched")
    if plan.swaps or (loaded and loaded[1]):
        report.notes.append(
            "bytes saved = the float layer's parameters minus the new layer's parameters and buffers; "
            + ("the originals are kept in CPU memory for unpatch (keep_original=True)" if options["keep_original"]
               else "the originals were dropped (unpatch cannot restore them: keep_original=False)"))
    if device.type == "cpu" and op_entry is not None and op_entry.selected == "torch":
        report.notes.append("on CPU the reference (PyTorch) backend serves attention: correct, not faster")
    return report
