"""What fastllm.patch replaces, as data: one Rule per kind of replacement, no per-model code.

A rule says which modules it matches (a predicate on (qualified name, module)), which patch()
option turns it on, how it is applied, and which registry ops serve it (for the report).
Two kinds:

  "attention_interface"  the model's attention implementation is switched to fastllm's
                         function (transformers' AttentionInterface); modules stay in place.
  "module_swap"          each matching module is replaced by `replace(module, options, layer)`
                         (layer: this module's calibration statistics). Matches are filtered by
                         the patch() arguments include / exclude (fnmatch patterns on qualified
                         module names); `default_exclude` holds what is left alone unless
                         `include` names it explicitly (lm_head, embeddings). The first enabled
                         module_swap rule that matches a module wins: the 2:4 rule comes first
                         and takes quantize="w8a8" along (2:4 + int8 in one module).

`unsupported(module, options)` says why a matching module cannot be swapped (it is then left
in place and reported as skipped, with that reason); `calibration(options)` which statistics
the rule needs from calibration batches ("amax": per-input-channel max |x|, for SmoothQuant and
static int8; "l2": per-input-channel L2 norm over all tokens, for Wanda), or ().
"""
import ast
import functools
import inspect
import re
import textwrap
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from torch import nn

#: Left alone by linear swaps unless `include` names them: output head and embeddings hold
#: most of the accuracy risk and little of the time; so do MoE routers (`*.gate`, HunYuan's
#: `gate.wg`, `*.router`: tiny, and a rounding error there changes which experts run). Not
#: `*gate_proj` (the gated MLP's projection). `lm_head.*`: heads that are modules (RoBERTa's
#: lm_head.dense / lm_head.decoder); the model's get_output_embeddings() is also left whatever
#: its name (BERT's cls.predictions.decoder): _linear.select.
LINEAR_DEFAULT_EXCLUDE: Tuple[str, ...] = ("lm_head", "*.lm_head", "lm_head.*", "*.lm_head.*", "*embed*", "*.gate",
                                           "*.gate.*", "*.router", "*.router.*")
#: What LINEAR_DEFAULT_EXCLUDE covers, in the report's words.
DEFAULT_EXCLUDED = "lm_head / output embeddings / embeddings / MoE routers"

#: Children of a decoder layer that are the attention sub-layer proper: they return
#: (attn_output, attn_weights) and the layer adds attn_output to the residual stream itself,
#: so replacing attn_output by zeros removes attention from that layer and nothing else
#: (skip_attention). BERT-style `attention` children hold the residual + LayerNorm inside and
#: are not listed.
ATTENTION_SUBLAYER_NAMES: Tuple[str, ...] = ("self_attn",)

#: layer_types entries (config.layer_types) whose attention fastllm serves: transformers builds
#: their masks through the mask function fastllm registers (a boolean mask, or None where plain
#: causal is exact), so the kernels see what the layer means. chunked_attention (Llama 4): causal
#: within blocks of attention_chunk_size. Layers of any other type are served only if they do not
#: call the attention function at all (hybrids: linear attention, convolution, state-space layers
#: keep their own modules); one that does is refused (see _layer_types).
#: indexed_attention (DeepSeek-V3.2's sparse attention, GLM-MoE-DSA, ...): a causal mask always
#: materialized, plus the indexer's top-k keys per query as `indices=`, which fastllm applies as
#: a mask (exactly what transformers' eager / sdpa paths do); transformers 5.17 (the GPU image) names
#: the same layers deepseek_sparse_attention.
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention", "indexed_attention",
                         "deepseek_sparse_attention")

#: Model methods that hand some layers fewer queries than keys, slicing a mask that may be None
#: along (a combination transformers turns off for its own sdpa, not for a registered function;
#: fastllm would read it as a static-cache prefill), with the argument that turns the slicing
#: off (0 = keep every position). patch() guards them on the instance (_slicing.py).
QUERY_SLICING_METHODS: Tuple[Tuple[str, str], ...] = (
    ("_maybe_slice_kv_shared_inputs", "logits_to_keep"),   # Gemma 4, Gemma 4 Unified
)

#: Names transformers gives the KV cache argument of a layer's forward (and of the model methods
#: above): transformers 5.24 renamed past_key_values to cache; older code said past_key_value.
CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value")


def cache_argument(arguments):
    """The KV cache among `arguments` (a layer's kwargs or bound arguments), else None."""
    return next((arguments[n] for n in CACHE_ARGUMENTS if arguments.get(n) is not None), None)


#: Config attribute (> 0) meaning some layers read the K/V another layer computed: their
#: attention cannot be skipped (skip_attention) without breaking the readers.
KV_SHARING_ATTRIBUTE = "num_kv_shared_layers"

_INTERFACE_CALL = "ALL_ATTENTION_FUNCTIONS.get_interface("
# What an attention module's forward may do that fastllm does not implement: (pattern, reason).
_UNSUPPORTED_SOURCE = (
    (re.compile(r"\b(position_bias)\s*="), "its forward passes {}=... to the attention function"),
)
#: Expressions an attention module passes as the attention function's mask that hold an
#: additive score bias, not a padding / causal mask (relative positions: Swin's combined_mask,
#: Parakeet's matrix_bd, T5-style position_bias, SAM's attention_similarity, ...). Served:
#: flash_attention adds it (bias=); listed so that the report probes the op with a bias (the
#: CUDA kernels take one up to head dim 128: at 256 these calls run on Triton).
BIAS_MASK_ARGUMENTS: Tuple[str, ...] = ("combined_mask", "matrix_bd", "attention_bias", "position_bias",
                                        "attention_similarity")
#: Parameters (leaf names) of models that add a learned relative position bias to the scores
#: through the mask, in a parent of the attention module (BEiT with use_relative_position_bias).
BIAS_PARAMETERS: Tuple[str, ...] = ("relative_position_bias_table",)


@functools.lru_cache(None)
def _interface_mask_args(cls) -> Tuple[str, ...]:
    """The source text of the mask argument (5th positional, or attention_mask=) of every
    attention_interface(...) call in cls.forward."""
    tree = _forward_tree(cls)
    if tree is None:
        return ()
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "attention_interface":
            arg = next((kw.value for kw in node.keywords if kw.arg == "attention_mask"), None)
            if arg is None and len(node.args) >= 5:
                arg = node.args[4]
            if arg is not None:
                out.append(ast.unparse(arg))
    return tuple(out)


def score_bias_source(model: nn.Module, attn) -> Optional[str]:
    """What hands the model's attention an additive score bias (for the report), or None."""
    for n, m in attn:
        bias = [a for a in _interface_mask_args(type(m)) if a in BIAS_MASK_ARGUMENTS]
        if bias:
            return f"{type(m).__name__} passes {bias[0]}"
    for n, _ in model.named_parameters():
        if n.rpartition(".")[2] in BIAS_PARAMETERS:
            return f"a learned relative position bias ({n})"
    return None


@functools.lru_cache(None)
def forward_return_arities(cls) -> Tuple[int, ...]:
    """The lengths of the tuples cls.forward returns literally (`return out, weights` -> 2), in
    the function itself, not in functions nested in it."""
    tree = _forward_tree(cls)
    if tree is None or not tree.body:
        return ()
    found, todo = set(), list(ast.iter_child_nodes(tree.body[0]))
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        if isinstance(node, ast.Return) and isinstance(node.value, ast.Tuple):
            found.add(len(node.value.elts))
        todo.extend(ast.iter_child_nodes(node))
    return tuple(sorted(found))


@functools.lru_cache(None)
def _forward_tree(cls) -> Optional[ast.Module]:
    """cls.forward's source parsed (a module holding the one def), or None when unparsable."""
    try:
        return ast.parse(textwrap.dedent(_forward_source(cls)))
    except SyntaxError:
        return None


@functools.lru_cache(None)
def _forward_source(cls) -> str:
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return ""


def uses_attention_interface(name: str, module: nn.Module) -> bool:
    """True for modules whose forward dispatches through transformers' AttentionInterface."""
    return _INTERFACE_CALL in _forward_source(type(module))


def attention_unsupported_reason(module: nn.Module) -> Optional[str]:
    """Why fastllm's attention cannot serve this attention module, or None."""
    src = _forward_source(type(module))
    for pattern, reason in _UNSUPPORTED_SOURCE:
        m = pattern.search(src)
        if m:
            return reason.format(m.group(1)) + " (not implemented)"
    return None


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 and kin): y = x @ W + b with W stored (in, out)."""
    t = type(module)
    return t.__name__ == "Conv1D" and t.__module__.startswith("transformers.")


def is_linear(name: str, module: nn.Module) -> bool:
    return type(module) is nn.Linear or _is_conv1d(module)


def as_linear(module: nn.Module) -> nn.Module:
    """The nn.Linear a module is_linear matches computes: itself, or for a Conv1D an nn.Linear
    whose weight is the transposed view of the Conv1D's (no copy) and whose bias is its bias.
    Swap rules, calibration planning and SmoothQuant folding read this view; the swap itself
    replaces (and unpatch restores) the original module."""
    if not _is_conv1d(module):
        return module
    w = module.weight
    lin = nn.Linear(w.shape[0], w.shape[1], bias=module.bias is not None, device="meta")
    lin.weight = nn.Parameter(w.detach().t(), requires_grad=False)
    if module.bias is not None:
        lin.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
    return lin


@dataclass(frozen=True)
class Rule:
    name: str                                   # shown in the report
    option: str                                 # patch() argument that enables it
    kind: str                                   # "attention_interface" | "module_swap"
    match: Callable[[str, nn.Module], bool]     # (qualified name, module) -> bool
    ops: Callable[[dict], Tuple[str, ...]]      # options -> fastllm.ops.registry.OPS keys serving it
    replace: Optional[Callable] = None          # module_swap: (module, options, layer stats) -> module
    unsupported: Callable[[nn.Module, dict], Optional[str]] = lambda m, o: None
    calibration: Callable[[dict], Tuple[str, ...]] = lambda o: ()
    default_exclude: Tuple[str, ...] = ()
    note: str = ""


# ----------------------------------------------------------------------------------------------
# int8 (fastllm.nn.Int8Linear) and 2:4 (fastllm.nn.Sparse24Linear) linear swaps.

#: patch(quantize=...) -> Int8Linear mode. "w8a8" is dynamic: activations quantized per token.
INT8_MODES = {"w8a8": "w8a8-dynamic", "w8a8-static": "w8a8-static", "w8a16": "w8a16"}
INT8_OPS = {"w8a8": ("int8_matmul_dynamic",), "w8a8-static": ("int8_matmul_static",),
            "w8a16": ("w8a16_matmul",)}
SPARSITY = ("2:4",)
PRUNE = ("magnitude", "wanda")
#: Registry ops a Sparse24Linear calls (16-bit / with quantize="w8a8": int8).
SPARSE24_OPS = {False: ("sparse24_matmul",), True: ("quantize_per_token", "sparse24_int8_matmul")}


def sparse24_class():
    """fastllm.nn.Sparse24Linear (imported late: fastllm.nn imports the ops)."""
    from ..nn import Sparse24Linear
    return Sparse24Linear


def _int8_unsupported(m, options):
    if m.in_features % 16 or m.out_features % 16:
        return (f"in_features={m.in_features}, out_features={m.out_features}: the int8 kernels need "
                "multiples of 16; kept in floating point")
    gs = options.get("group_size")
    if gs and m.in_features % gs:
        return f"in_features={m.in_features} is not a multiple of group_size={gs}; kept in floating point"
    return None


def _int8_calibration(options):
    from ..nn.int8_linear import reads_act_amax
    return ("amax",) if reads_act_amax(INT8_MODES[options["quantize"]], options["smooth_alpha"]) else ()


def _int8_replace(linear, options, layer):
    from ..nn.int8_linear import Int8Linear, reads_act_amax
    mode, alpha = INT8_MODES[options["quantize"]], layer.get("smooth_alpha")
    # A layer SmoothQuant folded into its norm has amax but no smooth_alpha: dynamic mode reads neither.
    amax = layer.get("amax") if reads_act_amax(mode, alpha) else None
    return Int8Linear.from_linear(linear, mode, act_amax=amax, smooth_alpha=alpha, group_size=options["group_size"],
                                  backend=options["backend"])


def _sparse_unsupported(m, options):
    if m.in_features % 4:
        return f"in_features={m.in_features} is not a multiple of 4 (2:4 groups); kept dense"
    if options["quantize"] and (m.in_features % 16 or m.out_features % 16):
        return (f"in_features={m.in_features}, out_features={m.out_features}: 2:4 + int8 needs multiples "
                "of 16; kept dense")
    return None


def _sparse_replace(linear, options, layer):
    return sparse24_class().from_linear(linear, prune=options["prune"], act_norm=layer.get("l2"),
                                        int8=options["quantize"] is not None, backend=options["backend"])


RULES: Tuple[Rule, ...] = (
    Rule(name="attention", option="attention", kind="attention_interface",
         match=uses_attention_interface, ops=lambda o: ("flash_attention",),
         note="exact; transformers' AttentionInterface, weights untouched (0 bytes saved)"),
    Rule(name="sparse24_linear", option="sparsity", kind="module_swap", match=is_linear,
         ops=lambda o: SPARSE24_OPS[o["quantize"] is not None], replace=_sparse_replace, unsupported=_sparse_unsupported,
         calibration=lambda o: ("l2",) if o["prune"] == "wanda" else (),
         default_exclude=LINEAR_DEFAULT_EXCLUDE,
         note="lossy: weights pruned to 2 of every 4 (prune=magnitude | wanda) and compressed; "
              "with quantize='w8a8' also int8"),
    Rule(name="int8_linear", option="quantize", kind="module_swap", match=is_linear,
         ops=lambda o: INT8_OPS[o["quantize"]], replace=_int8_replace, unsupported=_int8_unsupported,
         calibration=_int8_calibration, default_exclude=LINEAR_DEFAULT_EXCLUDE,
         note="lossy: int8 weights per output channel (w8a16: or per group); w8a8 also int8 activations"),
)
