"""A guard on transformers' query slicing before KV-shared layers (Gemma 4).

Gemma 4's text model (`_maybe_slice_kv_shared_inputs`) feeds its KV-shared layers (they reuse
the K/V of earlier layers and write no cache) only the last `logits_to_keep` queries. A mask
the mask function left as None is sliced along: those layers then see Sq < Skv with
attention_mask=None. transformers turns the shortcut off for its own sdpa in exactly the cases
where that is ambiguous (logits_to_keep > 1, or a static cache, with some mask None), but not
for a registered function, and fastllm reads "None, Sq > 1, Skv > Sq" as an empty StaticCache's
prefill (top-left causal, see _attention.py): the sliced queries would get wrong positions.

So patch() puts a SliceGuard on the instance (module.__dict__[method], found before the class
method; a plain class holding the module, so deepcopy and pickle carry it) and unpatch() takes
it off. In those ambiguous cases the guard calls the method with logits_to_keep = 0 (keep every
position: nothing is sliced, the layers get every query and the model's own full masks); all
other calls go through unchanged. The remaining sliced calls are exact for fastllm as for sdpa:
every mask given (sliced with the queries), or one query (logits_to_keep = 1) against a dynamic
cache with mask None, which attends to every key.
"""
import functools
import inspect

from .rules import QUERY_SLICING_METHODS, cache_argument

_KEEP_ALL = 0   # transformers' logits_to_keep convention: 0 keeps every position


def _slicing_methods(module):
    """[(method, argument)] of QUERY_SLICING_METHODS that module's class defines."""
    return [(m, a) for m, a in QUERY_SLICING_METHODS if callable(getattr(type(module), m, None))]


@functools.lru_cache(None)
def _signature(cls, method):
    return inspect.signature(getattr(cls, method))


def unguardable(model):
    """(module name, method) of a slicing method whose signature has no argument to turn the
    shortcut off (a transformers version fastllm does not know), else None."""
    for name, mod in model.named_modules():
        for method, arg in _slicing_methods(mod):
            if arg not in _signature(type(mod), method).parameters:
                return name, method
    return None


class SliceGuard:
    def __init__(self, module, method, argument):
        self.module, self.method, self.argument = module, method, argument

    def __call__(self, *args, **kwargs):   # once per forward: the signature is parsed once per class
        cls = type(self.module)
        bound = _signature(cls, self.method).bind(self.module, *args, **kwargs)
        a = bound.arguments
        keep = a.get(self.argument)
        if isinstance(keep, int) and keep != _KEEP_ALL and _ambiguous(keep, a):
            a[self.argument] = _KEEP_ALL
        return getattr(cls, self.method)(*bound.args, **bound.kwargs)


def _ambiguous(keep, a) -> bool:
    """sdpa's condition: several queries, or a static cache, with some mask None. Masks not
    found by name: assume the worst (the shortcut only saves time)."""
    masks = a.get("causal_mask_mapping")
    if not isinstance(masks, dict):
        return True
    static = getattr(cache_argument(a), "is_compileable", False)
    return (keep > 1 or bool(static)) and any(m is None for m in masks.values())


def install(model) -> list:
    """Guard every slicing method in model; returns the guarded modules."""
    out = []
    for mod in model.modules():
        for method, arg in _slicing_methods(mod):
            mod.__dict__[method] = SliceGuard(mod, method, arg)
            out.append(mod)
    return out


def remove(model) -> None:
    for mod in model.modules():
        for method, _ in QUERY_SLICING_METHODS:
            if isinstance(mod.__dict__.get(method), SliceGuard):
                del mod.__dict__[method]
