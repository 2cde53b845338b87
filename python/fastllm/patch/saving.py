"""fastllm.save_pretrained / fastllm.from_pretrained: a patched model to a directory and back.

Two formats, told apart by fastllm_config.json (`layers` present or not):
  plain    nothing was swapped (attention / skip_attention only, or linear-swap options that
           matched no layer): transformers' own checkpoint plus fastllm_config.json holding
           the patch options; reload = transformers' from_pretrained, then patch(options).
  swapped  int8 / 2:4 layers: the swapped state in safetensors (_serialize.py); reload needs
           no calibration data.
A save removes the other format's weight files from the directory first: transformers would
otherwise load a stale model.safetensors left from an earlier float save, without a word.
"""
import inspect
import json
import os

from .. import __version__
from . import _serialize
from ._model import import_transformers, model_info
from ._options import check_runtime_options
from .core import STATE_ATTR, _patch, patch

CONFIG_FILE = "fastllm_config.json"
#: Linear-swap options. A plain checkpoint of a model where they swapped nothing stores them as
#: None (kept under "unswapped"): reloading would otherwise ask for calibration data (w8a8-static,
#: smooth_alpha, wanda) for a swap that does not happen.
SWAP_OPTIONS = ("quantize", "sparsity", "prune", "smooth_alpha", "group_size", "calibration", "include",
                "exclude")


def save_pretrained(model, save_directory, **kwargs):
    """Save a patched model so fastllm.from_pretrained reloads it patched, with identical outputs.

    Nothing swapped: model.save_pretrained(save_directory, **kwargs) (a plain transformers
    checkpoint) plus fastllm_config.json with the patch options. With quantized / pruned
    layers: config.json, the whole state (int8 / 2:4 weights and scales, folded norms) in
    model.fastllm.safetensors, and fastllm_config.json recording each swapped layer and the
    report lines about them; that directory needs fastllm.from_pretrained (no calibration data
    needed to reload), and takes no kwargs (transformers' push_to_hub, sharding, ... do not
    apply to it: TypeError)."""
    state = model.__dict__.get(STATE_ATTR)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not patched by fastllm; use model.save_pretrained")
    transformers = import_transformers()
    if state.swaps:
        if kwargs:
            raise TypeError(f"fastllm.save_pretrained: a quantized / pruned model is written by fastllm itself, "
                            f"which takes no keyword arguments (got {sorted(kwargs)}); nothing was written")
        return _serialize.save(model, state, save_directory, transformers, model_info(model)[1])
    model.save_pretrained(save_directory, **kwargs)
    _serialize.remove_weight_files(save_directory, (_serialize.WEIGHTS,))
    options = _serialize.json_options(state.options)
    unswapped = {k: options[k] for k in SWAP_OPTIONS if options.get(k) is not None}
    if options.get("quantize") or options.get("sparsity"):
        options.update(dict.fromkeys(SWAP_OPTIONS))
    else:
        unswapped = {}
    with open(os.path.join(save_directory, CONFIG_FILE), "w") as f:
        json.dump({"fastllm_version": __version__, "transformers_version": transformers.__version__,
                   "patch": options, **({"unswapped": unswapped} if unswapped else {})}, f, indent=2)
    return save_directory


def _read_config(path):
    try:
        with open(path) as f:
            saved = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("patch"), dict):
        raise ValueError(f"{path}: expected an object with a 'patch' object of patch() options (written by "
                         "fastllm.save_pretrained)")
    known = set(inspect.signature(patch).parameters) - {"model"}
    bad = sorted(set(saved["patch"]) - known)
    if bad:
        raise ValueError(f"{path}: 'patch' holds options fastllm.patch does not take: {bad}")
    return saved


def from_pretrained(load_directory, *, model_class=None, patch_overrides=None, **kwargs):
    """Load a model saved by fastllm.save_pretrained and patch it with the saved options.

    model_class: a transformers model class (default: config.json's `architectures[0]`).
    patch_overrides: dict of patch() options replacing saved ones (e.g. {"backend": "torch"});
    for quantized / pruned checkpoints only attention, backend and skip_attention.
    kwargs go to model_class.from_pretrained (dtype=, device_map=, ...); for quantized / pruned
    checkpoints only dtype= (a torch dtype or its name; default or "auto": the saved one) and
    device=.
    """
    transformers = import_transformers()
    path = os.path.join(load_directory, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {load_directory} was not saved by fastllm.save_pretrained")
    saved = _read_config(path)
    if patch_overrides is None:
        patch_overrides = {}
    if not isinstance(patch_overrides, dict):
        raise TypeError(f"argument 'patch_overrides' must be a dict of patch() options or None, got "
                        f"{type(patch_overrides).__name__}")
    options = dict(saved["patch"])
    options.update(patch_overrides)
    if model_class is None:
        with open(os.path.join(load_directory, "config.json")) as f:
            archs = json.load(f).get("architectures") or []
        if not archs or not hasattr(transformers, archs[0]):
            raise ValueError(f"cannot tell the model class from {load_directory}/config.json "
                             f"(architectures={archs}); pass model_class=")
        model_class = getattr(transformers, archs[0])
    if "layers" in saved:
        _serialize.check_saved(path, saved, patch_overrides)
        # The overridable options get patch()'s own checks (the rest was checked when saved).
        options["skip_attention"] = check_runtime_options(options["attention"], options["backend"],
                                                          options["skip_attention"])
        model, loaded, options, carried = _serialize.load(load_directory, saved, model_class, options, kwargs,
                                                          transformers)
        return _patch(model, options, None, loaded=(str(load_directory), loaded, carried))
    model = model_class.from_pretrained(load_directory, **kwargs)
    options.pop("calibration", None)
    return patch(model, **options)
