"""Calibration: run user batches through a model and record, for chosen nn.Linear layers, the
per-input-channel abs-maximum of their inputs.

    amax = calibrate(model, batches)                     # {"layers.0.q_proj": (K,) fp32, ...}
    amax = calibrate(model, batches, layers=["fc1"])     # names (or modules) to watch

These maxima drive SmoothQuant (fastllm.quant.smoothquant) and static activation scales
(max over channels / 127). The hooks are forward pre-hooks, removed when calibration ends,
also on an exception. Batches: a dict is passed as model(**batch), a tuple/list as
model(*batch), anything else as model(batch); the model runs under torch.no_grad().
"""
from typing import Callable, Dict, Iterable, Optional, Union

import torch
from torch import nn


def _select(model: nn.Module, layers, who: str) -> Dict[str, nn.Linear]:
    named = dict(model.named_modules())
    if layers is None:
        chosen = {n: m for n, m in named.items() if isinstance(m, nn.Linear)}
    else:
        if isinstance(layers, (str, nn.Module)):
            raise TypeError(f"{who}: argument 'layers' must be a list of module names or modules, got one "
                            f"{type(layers).__name__} (wrap it in a list)")
        by_id = {id(m): n for n, m in named.items()}
        chosen = {}
        for item in layers:
            if isinstance(item, str):
                if item not in named:
                    raise ValueError(f"{who}: argument 'layers': the model has no module named {item!r}")
                name, mod = item, named[item]
            elif isinstance(item, nn.Module):
                if id(item) not in by_id:
                    raise ValueError(f"{who}: argument 'layers': {type(item).__name__} is not a submodule "
                                     "of the model")
                name, mod = by_id[id(item)], item
            else:
                raise TypeError(f"{who}: argument 'layers' must hold module names or modules, got "
                                f"{type(item).__name__}")
            if not isinstance(mod, nn.Linear):
                raise TypeError(f"{who}: argument 'layers': {name!r} is a {type(mod).__name__}, not an nn.Linear")
            chosen[name] = mod
    if not chosen:
        raise ValueError(f"{who}: the model has no nn.Linear layer to calibrate")
    return chosen


def eval_mode(model: nn.Module) -> Dict[nn.Module, bool]:
    """Put every submodule in eval mode; returns their modes for restore_modes (per module: a
    model whose parts were in different modes gets exactly those back)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    return modes


def restore_modes(modes: Dict[nn.Module, bool]) -> None:
    for m, training in modes.items():
        m.training = training


def observe_inputs(model: nn.Module, batches: Iterable, layers, stat: Callable[[torch.Tensor], torch.Tensor],
                   merge: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], who: str) -> Dict[str, torch.Tensor]:
    """Run the batches through the model and fold stat(x) of each chosen Linear's input x
    (flattened to (tokens, K)) into {name: merge(previous, new)}. Shared by calibrate and
    fastllm.sparse.collect_act_norms. Runs in eval mode; the hooks are removed and every module's
    training mode restored afterwards, also on error."""
    if not isinstance(batches, Iterable) or isinstance(batches, (str, torch.Tensor)):
        raise TypeError(f"{who}: argument 'batches' must be an iterable of model inputs (a list of input_ids "
                        f"tensors, of kwargs dicts, ...), got {type(batches).__name__}")
    chosen = _select(model, layers, who)
    acc: Dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(mod, args, kwargs):
            x = args[0] if args else kwargs.get("input")  # nn.Linear.forward(input)
            if not isinstance(x, torch.Tensor) or x.numel() == 0:
                return
            v = stat(x.detach().reshape(-1, x.shape[-1]))
            acc[name] = v if name not in acc else merge(acc[name], v)
        return hook

    handles = [mod.register_forward_pre_hook(hook_for(name), with_kwargs=True) for name, mod in chosen.items()]
    n = 0
    # Statistics of inference: dropout in training mode would inflate and randomise them.
    modes = eval_mode(model)
    try:
        with torch.no_grad():
            for batch in batches:
                if isinstance(batch, dict):
                    model(**batch)
                elif isinstance(batch, (tuple, list)):
                    model(*batch)
                else:
                    model(batch)
                n += 1
    finally:
        for h in handles:
            h.remove()
        restore_modes(modes)
    if n == 0:
        raise ValueError(f"{who}: argument 'batches' yielded no batch; calibration needs at least one")
    missing = [name for name in chosen if name not in acc]
    if missing and (layers is not None or not acc):
        raise ValueError(f"{who}: these layers never ran on the calibration batches: {', '.join(missing)}")
    return acc


def calibrate(model: nn.Module, batches: Iterable, layers: Optional[Iterable[Union[str, nn.Module]]] = None
              ) -> Dict[str, torch.Tensor]:
    """Per-input-channel max |x| of each chosen Linear's input over all batches: {name: (K,) fp32}.

    layers: None (every nn.Linear that runs; unused ones are left out of the result) or names /
    module objects. Raises ValueError when `batches` yields nothing, or a layer named in `layers`
    never ran (its statistics would be meaningless).
    """
    return observe_inputs(model, batches, layers, lambda x: x.abs().amax(dim=0).float(), torch.maximum, "calibrate")
