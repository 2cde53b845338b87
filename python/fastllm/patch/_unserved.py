"""Attention modules fastllm does not serve, named in the report rather than passed over in
silence: those whose forward does not dispatch through transformers' attention interface
(PyTorch's nn.MultiheadAttention in SigLIP's pooling head; Kosmos-2.5's vision attention, which
looks its function up with getattr() and so always runs eager). Patching leaves them as they
were; the report says so, so a user does not take them for fastllm's."""
import re
from collections import defaultdict
from typing import List

from torch import nn

from .report import ModuleEntry

#: Class names taken for attention modules (the suffix transformers' attention classes carry).
ATTENTION_CLASS_NAME = re.compile(r"(Attention|Attn)\d*$")


#: The report's detail for them (the type column says which are PyTorch's nn.MultiheadAttention).
UNSERVED = "does not call transformers' attention interface: runs unchanged"


def _expand(entry_name: str) -> List[str]:
    """'model.layers.{1,3}' -> ['model.layers.1', 'model.layers.3'] (the report's grouped names)."""
    m = re.search(r"\{([\d,]+)\}", entry_name)
    if not m:
        return [entry_name]
    return [entry_name[:m.start()] + i + entry_name[m.end():] for i in m.group(1).split(",")]


def unserved_attention(model: nn.Module, attn, left) -> List[ModuleEntry]:
    """One 'left' entry per (class, name pattern) for attention-named modules that are neither
    served (`attn`), nor inside / around a served one, nor inside a layer already reported as
    left (`left`, e.g. hybrids' linear-attention layers)."""
    served = [n for n, _ in attn]
    skip = [p for e in left for p in _expand(e.name)]
    groups, taken = defaultdict(list), []
    for n, m in model.named_modules():
        cls = type(m).__name__
        if not n or not (isinstance(m, nn.MultiheadAttention) or ATTENTION_CLASS_NAME.search(cls)):
            continue
        if any(n == s or n.startswith(s + ".") or s.startswith(n + ".") for s in served + skip) or \
                any(n.startswith(t + ".") for t in taken):   # Aria's cross-attention holds an nn.MultiheadAttention
            continue
        taken.append(n)
        idx = re.search(r"\.(\d+)(?=\.|$)", n)   # group layer.0.attention, layer.1.attention, ...
        key = (n[:idx.start() + 1] + "{}" + n[idx.end():], cls) if idx else (n, cls)
        groups[key].append(idx.group(1) if idx else None)
    out = []
    for (pattern, cls), idx in groups.items():
        name = pattern.replace("{}", "{" + ",".join(idx) + "}") if idx[0] is not None else pattern
        out.append(ModuleEntry(name, cls, "left", UNSERVED))
    return out
