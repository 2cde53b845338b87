"""patch()'s argument checks: all of them run before the model is touched (the options dict
PatchState keeps, the calibration batches as a checked list)."""
from typing import Optional, Tuple

import torch

from ..ops.registry import resolve_request
from . import _linear
from .rules import INT8_MODES, PRUNE, SPARSITY


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


def normalize_options(attention, quantize, sparsity, prune, calibration, smooth_alpha, group_size,
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
