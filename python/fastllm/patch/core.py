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
     switches the (copied) configs to it. No class in transformers is modified. Gemma 4's
     query slicing before its KV-shared layers gets an instance-level guard (_slicing.py).
  3. skip_attention: the chosen layers' attention sub-layer gets an instance-level `forward`
     returning zeros (_skip.py); deleting it restores the class forward.
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
import dataclasses
import fnmatch
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import __version__
from ..errors import BackendUnavailableError, FastllmError, OriginalsDiscardedError, UnsupportedModelError
from ..ops.registry import resolve_request
from . import _attention, _linear, _save_guard, _slicing
from ._configs import PATCHED_HOLDERS, carry_edits, config_attrs, privatize, register_holders, restore
from ._entries import attention_entry, decode_entry, linear_op_entries
from ._model import import_transformers, model_info, text_config
from ._layer_types import check_layer_types
from ._options import normalize_options
from ._skip import install_skip, remove_skip, resolve_skip
from ._unserved import unserved_attention
from .report import ModuleEntry, PatchReport, grouped_entries
from .rules import (DEFAULT_EXCLUDED, LINEAR_DEFAULT_EXCLUDE, RULES,
                    attention_unsupported_reason, sparse24_class)

STATE_ATTR = "_fastllm_patch"


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
        register_holders(self.config_refs)



def _attention_modules(model) -> List[Tuple[str, nn.Module]]:
    rule = RULES[0]
    return [(n, m) for n, m in model.named_modules() if rule.match(n, m)]


def _check_supported(model, options, transformers) -> Tuple[List[Tuple[str, nn.Module]], List[ModuleEntry]]:
    """Raise UnsupportedModelError (model untouched) unless fastllm's attention can serve it; else
    (the attention modules, report entries for the layers of other types it leaves alone)."""
    name = type(model).__name__
    if not isinstance(model, transformers.PreTrainedModel):
        raise UnsupportedModelError(f"fastllm.patch takes a transformers PreTrainedModel, got {name}")
    attn = _attention_modules(model)
    if not options["attention"]:
        return attn, []
    if not attn:
        raise UnsupportedModelError(
            f"{name}: no module dispatches attention through transformers' AttentionInterface "
            "(ALL_ATTENTION_FUNCTIONS.get_interface); fastllm cannot replace its attention.")
    for sub_name, sub in model.named_modules():
        # Sub-models holding attention modules must support custom attention functions; one
        # without any (DETR's ResNet backbone) is not touched by the switch.
        if not isinstance(sub, transformers.PreTrainedModel):
            continue
        if not sub_name or any(n.startswith(sub_name + ".") for n, _ in attn):
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
    cfg = text_config(model)
    bad = _slicing.unguardable(model)
    if bad:
        raise UnsupportedModelError(
            f"{name}: {bad[0]}.{bad[1]} slices the queries of some layers (with masks that may be None) and "
            "this transformers gives it no argument fastllm knows to turn that off. Model left unchanged.")
    left = check_layer_types(model, cfg, attn)
    return attn, grouped_entries(left, "left") + unserved_attention(model, attn, [n for n, _, _ in left])


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
    skip_attention: int k = skip the attention sub-layer of the last k decoder layers that
                    have one (hybrids: conv / linear-attention layers are not counted), or a
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
    options, batches = normalize_options(attention, quantize, sparsity, prune, calibration, smooth_alpha,
                                          group_size, keep_original, skip_attention, backend, include, exclude)
    return _patch(model, options, batches)


def _patch(model, options, batches, loaded=None):
    """patch() after argument checks. loaded: (directory, [(name, module)], (report entries,
    notes)) for from_pretrained: linear swaps already made by the loader (recorded, not
    recomputed) and the saved report lines about them (PatchState.carried)."""
    transformers = import_transformers()
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
    if model in PATCHED_HOLDERS:
        raise FastllmError(f"{type(model).__name__} is part of a model fastllm.patch already patched (it holds "
                           "that model's private config); patch or unpatch the whole model. Left unchanged.")
    attn, other_layers = _check_supported(model, options, transformers)
    skips = resolve_skip(model, options["skip_attention"])
    device, dtype = model_info(model)
    if options["attention"] and dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise UnsupportedModelError(
            f"{type(model).__name__} computes in {str(dtype).replace('torch.', '')}: fastllm's attention runs "
            "float16, bfloat16 and float32 models. Model left unchanged.")
    op_entry = attention_entry(model, attn, backend, device, dtype) if options["attention"] else None
    dec_entry = decode_entry(model, attn, backend, device, dtype) if options["attention"] else None
    forced = resolve_request(backend) != "auto"
    if op_entry is not None and forced and op_entry.selected is None:
        raise BackendUnavailableError(
            f"fastllm.patch(backend={backend!r}): flash_attention cannot run on {device} "
            f"({dtype}): {op_entry.reasons[resolve_request(backend)]}. Model left unchanged.")
    chosen, left = ([], []) if loaded else _linear.select(model, options)
    # Loaded swaps use the same ops as the ones patch would have made (report, forced backend).
    lin_ops, lin_notes = linear_op_entries(options, _loaded_as_chosen(options, loaded) if loaded else chosen,
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
            refs = privatize(model, transformers)
            impl = _attention.register(backend)
            model.set_attn_implementation(impl)
            wrong = [n for n, m in attn
                     if getattr(getattr(m, "config", None), "_attn_implementation", impl) != impl]
            if model.config._attn_implementation != impl or wrong:
                raise UnsupportedModelError(
                    f"{type(model).__name__}: set_attn_implementation({impl!r}) did not reach "
                    f"{wrong or ['the model config']}. Model left unchanged.")
            _slicing.install(model)
        for _, m in skips:
            install_skip(m)
            installed.append(m)
        _linear.commit(model, plan)
        committed = True
        # Inside the rollback: it may warn, and a warning turned into an error (-W error) left
        # the model patched with no patch state (unpatch could not undo it).
        report = _build_report(model, options, attn, skips, op_entry, device, dtype, transformers, plan,
                               lin_ops, loaded, carried)
    except BaseException:
        if committed:
            _linear.restore(model, plan.swaps, plan.folds, dtype)
        for m in installed:
            remove_skip(m)
        _slicing.remove(model)
        restore(refs)
        raise

    report.modules[len(attn):len(attn)] = other_layers   # after the attention rows
    keep = options["keep_original"] and not loaded
    if keep:
        _linear.offload(plan.swaps)
    else:   # drop the originals: this is where the memory is saved
        for sw in plan.swaps:
            sw.old = None
        for f in plan.folds:
            f.old = {}
    copies = list({id(m.__dict__[a]): m.__dict__[a] for m, a, _ in refs}.values())
    register_holders(refs)
    state = PatchState(options=options, impl=impl, config_refs=refs, skipped=skips, report=report,
                       original_impl=original_impl, swaps=plan.swaps, folds=plan.folds,
                       originals_kept=keep or not plan.swaps, dtype=dtype, carried=carried,
                       config_snapshots=[(c, config_attrs(c, transformers)) for c in copies])
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
    now = model_info(model)[1]
    _linear.restore(model, state.swaps, state.folds, now if now != state.dtype else None)
    for _, m in state.skipped:
        remove_skip(m)
    carry_edits(state.config_refs, getattr(state, "config_snapshots", []), import_transformers())
    restore(state.config_refs)
    _slicing.remove(model)
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
            "skip_attention: output replaced by zeros, its KV cache keeps only lengths (lossy; arXiv 2404.05741)"))
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
