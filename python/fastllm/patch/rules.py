"""What fastllm.patch replaces, as data: one Rule per kind of replacement, no per-model code.

A rule says which modules it matches (a predicate on (qualified name, module)), which patch()
option turns it on, how it is applied, and which registry op serves it (for the report).
Two kinds:

  "attention_interface"  the model's attention implementation is switched to fastllm's
                         function (transformers' AttentionInterface); modules stay in place.
  "module_swap"          each matching module is replaced by `replace(module, options)` and
                         the original kept for unpatch. Matches are filtered by the patch()
                         arguments include / exclude (fnmatch patterns on qualified module
                         names); `default_exclude` holds what is left alone unless included
                         explicitly (lm_head, embeddings).

Today only the attention rule exists. The int8 (quantize="w8a8" / "w8a16") and 2:4
(sparsity="2:4") rules are module swaps of nn.Linear for fastllm.nn modules; they are listed in
PLANNED so patch() can say which piece of work adds them.
"""
import inspect
import re
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from torch import nn

#: Left alone by linear swaps unless `include` names them: output head and embeddings hold
#: most of the accuracy risk and little of the time.
LINEAR_DEFAULT_EXCLUDE: Tuple[str, ...] = ("lm_head", "*.lm_head", "*embed*")

#: Children of a decoder layer that are the attention sub-layer proper: they return
#: (attn_output, attn_weights) and the layer adds attn_output to the residual stream itself,
#: so replacing attn_output by zeros removes attention from that layer and nothing else
#: (skip_attention). BERT-style `attention` children hold the residual + LayerNorm inside and
#: are not listed.
ATTENTION_SUBLAYER_NAMES: Tuple[str, ...] = ("self_attn",)

#: Known layer_types entries (config.layer_types) whose attention fastllm serves.
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")

_INTERFACE_CALL = "ALL_ATTENTION_FUNCTIONS.get_interface("
# Keyword arguments an attention module may hand the interface that fastllm does not implement.
_UNSUPPORTED_SOURCE = re.compile(r"\b(s_aux|sinks|position_bias)\s*=")
_source_cache = {}


def _forward_source(cls) -> str:
    if cls not in _source_cache:
        try:
            _source_cache[cls] = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            _source_cache[cls] = ""
    return _source_cache[cls]


def uses_attention_interface(name: str, module: nn.Module) -> bool:
    """True for modules whose forward dispatches through transformers' AttentionInterface."""
    return _INTERFACE_CALL in _forward_source(type(module))


def attention_unsupported_reason(module: nn.Module) -> Optional[str]:
    """Why fastllm's attention cannot serve this attention module, or None."""
    m = _UNSUPPORTED_SOURCE.search(_forward_source(type(module)))
    if m:
        return f"its forward passes {m.group(1)}=... to the attention function (not implemented)"
    return None


def is_linear(name: str, module: nn.Module) -> bool:
    return type(module) is nn.Linear


@dataclass(frozen=True)
class Rule:
    name: str                                   # shown in the report
    option: str                                 # patch() argument that enables it
    kind: str                                   # "attention_interface" | "module_swap"
    match: Callable[[str, nn.Module], bool]     # (qualified name, module) -> bool
    op: str                                     # fastllm.ops.registry.OPS key serving it
    replace: Optional[Callable] = None          # module_swap: (module, options) -> new module
    default_exclude: Tuple[str, ...] = ()
    note: str = ""


RULES: Tuple[Rule, ...] = (
    Rule(name="attention", option="attention", kind="attention_interface",
         match=uses_attention_interface, op="flash_attention",
         note="exact; transformers' AttentionInterface, weights untouched (0 bytes saved)"),
)

#: Rules that will exist once their kernels land: option value -> what adds it. patch() raises
#: NotImplementedError naming it when one of these options is passed.
PLANNED = {
    "quantize": ("int8 linears (W8A8 / W8A16): the int8 matmul issue "
                 "(fastllm.ops int8 GEMM + fastllm.nn.Int8Linear, a module_swap rule on nn.Linear)"),
    "sparsity": ("2:4 sparse linears: the 2:4 sparse GEMM issue "
                 "(mma.sp kernel + fastllm.nn.Sparse24Linear, a module_swap rule on nn.Linear)"),
    "calibration": ("calibration batches are used by quantize / sparsity, which the int8 and "
                    "2:4 issues add"),
}
