"""Attention modules fastllm does not serve, named in the report rather than passed over in
silence: those whose forward does not dispatch through transformers' attention interface
(PyTorch's nn.MultiheadAttention in SigLIP's pooling head; Kosmos-2.5's vision attention, which
looks its function up with getattr() and so always runs eager). Patching leaves them as they
were; the report says so, so a user does not take them for fastllm's."""
import re
from typing import List

from torch import nn

from .report import ModuleEntry, grouped_entries

#: Class names taken for attention modules (the suffix transformers' attention classes carry).
ATTENTION_CLASS_NAME = re.compile(r"(Attention|Attn)\d*$")

#: The report's detail for them (the type column says which are PyTorch's nn.MultiheadAttention).
UNSERVED = "does not call transformers' attention interface: runs unchanged"


def unserved_attention(model: nn.Module, attn, left: List[str]) -> List[ModuleEntry]:
    """'left' entries (alike ones grouped) for attention-named modules that are neither served
    (`attn`), nor inside / around a served one, nor inside a layer already left to its own
    modules (`left`, names: hybrids' linear-attention layers)."""
    around = [n for n, _ in attn] + left
    taken = []
    for n, m in model.named_modules():
        if not n or not (isinstance(m, nn.MultiheadAttention) or ATTENTION_CLASS_NAME.search(type(m).__name__)):
            continue
        if any(n == s or n.startswith(s + ".") or s.startswith(n + ".") for s in around) or \
                any(n.startswith(t + ".") for t, _, _ in taken):   # Aria's cross-attention holds an MHA
            continue
        taken.append((n, type(m).__name__, UNSERVED))
    return grouped_entries(taken, "left")
