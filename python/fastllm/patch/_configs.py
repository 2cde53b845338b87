"""Config isolation: patch gives the model private copies of every config object its modules
hold (models built from one config object stay independent); unpatch puts the originals back
with the user's later edits of the copies carried over."""
import copy
import weakref
from typing import Dict, List, Tuple

from torch import nn


def privatize(model, transformers) -> List[Tuple[nn.Module, str, object]]:
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


def restore(refs):
    for mod, attr, val in refs:
        PATCHED_HOLDERS.discard(mod)
        mod.__dict__[attr] = val


#: The modules of patched models (and of deepcopy / unpickled copies of them) that hold one of
#: the patch's private configs: patching one of them on its own would nest two patches. Modules,
#: not configs: a new model built from a patched model's config shares the config object and is
#: still free to be patched.
PATCHED_HOLDERS = weakref.WeakSet()


def register_holders(refs):
    for mod, _, _ in refs:
        PATCHED_HOLDERS.add(mod)


def config_attrs(cfg, transformers) -> Dict[str, object]:
    """The config's own attributes (not sub-configs, which are snapshotted on their own), copied
    deeply so that later in-place edits (a list appended to) show as differences."""
    return {k: copy.deepcopy(v) for k, v in vars(cfg).items() if not isinstance(v, transformers.PretrainedConfig)}


def _same(a, b) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:        # noqa: BLE001 - values whose == is not a bool (tensors): changed
        return False


def carry_edits(refs, snapshots, transformers):
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
        for k, v in config_attrs(cur, transformers).items():
            if "attn_implementation" not in k and not (k in before and _same(before[k], v)):
                original.__dict__[k] = v
