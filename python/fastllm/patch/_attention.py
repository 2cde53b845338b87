"""The attention function fastllm registers with transformers' AttentionInterface.

transformers (>= 5.0; checked against 5.17, 5.23 and 5.24) calls, from every attention module that
dispatches through `ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)`:

    out, weights = fn(module, query, key, value, attention_mask, dropout=p, scaling=s, **kwargs)

    query  (B, Hq, Sq, D)   a transposed view of the (B, Sq, Hq, D) projection
    key    (B, Hkv, Skv, D) value likewise; GQA heads NOT repeated; already concatenated with
                            the KV cache (so Skv >= Sq; for a StaticCache, Skv = max_cache_len)
    attention_mask          what the mask function registered under the same name built. We
                            register transformers' own `sdpa_mask`, so it is None or a bool
                            (B, 1, Sq, Skv), True = attend. A model given a 4-D mask by the user
                            passes that through unchanged (it may be a float additive mask), and
                            some models hand an additive score bias over as the mask (relative
                            positions: Swin's combined_mask, BEiT, Parakeet's matrix_bd).
    kwargs                  softcap (Gemma 2: attn_logit_softcapping, maybe None),
                            sliding_window (Mistral / Qwen2 / Qwen3 / Gemma 2 / Phi-3),
                            is_causal (overrides module.is_causal; seq2seq models), plus the
                            model's forward kwargs (position_ids, output_attentions, ...).
    returns                 out (B, Sq, Hq, D), weights (None: never materialized)

What the mask means when it is None (`sdpa_mask` skips building it, exactly as for SDPA):
  * Sq == 1: the single query attends to every key (decode, nothing padded);
  * Sq > 1, causal module: causal with top-left alignment. Either Skv == Sq (no cache, no
    padding), or Skv > Sq when prefilling an empty StaticCache: the keys past Sq are unwritten
    cache slots (sdpa_mask only skips when q_offset == 0). Like transformers' sdpa
    integration we slice k/v to the first Sq keys; then top-left == bottom-right alignment;
  * not causal (encoders: module.is_causal False; is_causal=False kwarg): attend to all.
A float mask that is exactly a mask (every value 0 or hugely negative) becomes a bool mask;
any other float mask is an additive bias (per head allowed), passed as flash_attention's
`bias` (calls with a bias always go to flash_attention; on a GPU the CUDA kernels take one up to
head dim 128, Triton above). A bool mask whose heads differ becomes such a bias too.
When a mask is given it already holds causality, padding and the sliding window, in absolute
cache positions, so the op gets causal=False and no window: its bottom-right aligned `window`
would be wrong against a StaticCache (Skv = max_cache_len, not the number of tokens seen).
`sliding_window` is therefore never passed on; that is what SDPA and eager do too (the mask
carries it). The kernels skip what the mask rules out wholesale: each finds the first and last
key its query rows attend and loops over that range (a decode step against a StaticCache reads
the filled part, not max_cache_len). Tiles inside the range that the window excludes are still
computed and masked.

Dropout: transformers passes dropout=0.0 in eval mode and config.attention_dropout while
training. The kernels have no dropout, so dropout > 0 raises (model.eval(); the modules copied
the config's value when built, so editing the config afterwards does not help) rather than
silently computing something else. The ops have no backward: forward works with grad enabled
(eager and compiled), backward raises NotImplementedError (fastllm/ops/_inference_only.py).

Kernel routing, prefill vs decode, lives in one place: `_kernel_for`. A decode call (Sq <= 16
queries against more keys, Skv > Sq) goes to decode_attention (split-KV: the key range is cut
across SMs, partials merged) with the same meaning: a given bool mask is passed as its `mask`
(exactly the mask decides, as with flash_attention(causal=False, mask=...)); without a mask
only Sq == 1 is routed there, where "no cache_seqlens, no mask" means every key. Everything
else (prefill, a non-causal Sq > 1 call without a mask) goes to flash_attention.
"""
import warnings

import torch
import torch.nn.functional as F

from ..ops._checks import FLOAT_DTYPES
from ..ops.attention import flash_attention
from ..ops.decode import MAX_QUERIES as DECODE_MAX_Q
from ..ops.decode import decode_attention

#: Name prefix registered with transformers. Neutral on purpose: transformers treats names
#: containing "flash", "sdpa" or "flex_attention" specially (kernels hub, FA checks, ...).
IMPL_PREFIX = "fastllm"

#: kwargs that change attention in ways the kernels do not implement: raise, never ignore.
UNSUPPORTED_KWARGS = {
    "position_bias": "an additive position bias (T5-style relative attention)",
    "cache": "a paged KV cache (continuous batching)",
    # Block-sparse layers: the key blocks each query may read. Ignoring them would attend
    # everything. (Per-key `indices=`, DeepSeek-V3.2's indexer, are applied as a mask.)
    "block_indices": "block-sparse attention (block_indices=)",
}


def impl_name(backend: str) -> str:
    """The AttentionInterface name for a backend request: "fastllm" (auto), "fastllm_triton", ..."""
    return IMPL_PREFIX if backend == "auto" else f"{IMPL_PREFIX}_{backend}"


def _kernel_for(q_len, kv_len=None, has_mask=True):
    """THE place that picks the attention kernel for a call: decode_attention for a few
    queries against a longer cache (kv_len None: assume so), when its semantics equal the
    call's (a bool mask, or one query seeing every key); flash_attention otherwise."""
    # kv_len <= q_len first: without a cache both are one symbol under torch.compile / export,
    # and that test needs no guard, where `q_len <= 16` would pin the length to 1..16.
    if kv_len is not None and kv_len <= q_len:
        return flash_attention
    if q_len <= DECODE_MAX_Q and (has_mask or q_len == 1):
        return decode_attention
    return flash_attention


def kernel_name_for(q_len) -> str:
    """What the report says serves a call with this many queries."""
    return _kernel_for(q_len).__name__


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      *, _fastllm_backend="auto", **kwargs):
    """transformers AttentionInterface function backed by fastllm.ops.flash_attention and
    fastllm.ops.decode_attention (see `_kernel_for`)."""
    if dropout:   # a float; 0.0 in eval mode
        raise ValueError(
            f"fastllm attention has no dropout, but {type(module).__name__} asked for dropout={dropout} "
            "(the model is in training mode with attention dropout). Call model.eval() for inference, "
            "or fastllm.unpatch(model) to train.")
    for name, what in UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"fastllm attention does not implement {what} ({name}=...), which "
                f"{type(module).__name__} uses; fastllm.unpatch(model) to run it.")
    if kwargs.get("output_attentions"):
        # What transformers' sdpa and flash integrations do: the weights are never materialized.
        warnings.warn("fastllm attention does not return attention weights (output_attentions=True gives "
                      "none); fastllm.unpatch(model) or model.set_attn_implementation('eager') to get them.",
                      UserWarning, stacklevel=2)
    mask, bias = attention_mask, None
    q_len = query.shape[2]
    if mask is not None:
        if mask.dtype != torch.bool:
            mask, bias = _split_additive(mask, module)
        if mask is not None and mask.dim() == 4 and mask.shape[1] > 1:
            mask, bias = _one_mask_for_all_heads(mask)
        causal = False   # the mask holds causality (and padding, window) in cache positions
        if kwargs.get("indices") is not None:
            mask, bias = _select_keys(mask, bias, kwargs["indices"], key.shape[2], module)
    elif kwargs.get("indices") is not None:
        raise NotImplementedError(
            f"fastllm attention: {type(module).__name__} passes indices= (the keys each query may read) without "
            "an attention mask; fastllm applies them to the mask. fastllm.unpatch(model) to run it.")
    else:
        is_causal = kwargs.get("is_causal")
        if is_causal is None:
            is_causal = getattr(module, "is_causal", True)
        causal = bool(is_causal) and bool(q_len > 1)   # bool(): a 0-dim tensor under torch.jit.trace
        if causal and key.shape[2] > q_len:
            # Prefill into an empty StaticCache: keys past q_len are unwritten slots.
            key = key[:, :, :q_len]
            value = value[:, :, :q_len]
    softcap = kwargs.get("softcap") or None
    sinks = _sinks(module, query.shape[1], kwargs)
    # MLA (DeepSeek-V2 / V3, MiniCPM3): V's head dim differs from Q / K's. Zero columns change
    # neither the scores nor the kept outputs: pad the narrower side, slice the output back.
    dq, dv = query.shape[-1], value.shape[-1]
    if dq != dv:
        if scaling is None:
            scaling = dq ** -0.5
        if dv < dq:
            value = F.pad(value, (0, dq - dv))
        else:
            query, key = F.pad(query, (0, dv - dq)), F.pad(key, (0, dv - dq))
    if bias is None and _kernel_for(q_len, key.shape[2], mask is not None) is decode_attention:
        # mask given: it alone decides (causal is False above); else Sq == 1 sees every key.
        out = decode_attention(query, key, value, scale=scaling, mask=mask, softcap=softcap, sinks=sinks,
                               backend=_fastllm_backend)
    else:
        out = flash_attention(query, key, value, causal=causal, scale=scaling, mask=mask,
                              softcap=softcap, sinks=sinks, bias=bias, backend=_fastllm_backend)
    return (out[..., :dv] if dq != dv else out), None


def _sinks(module, n_heads, kwargs):
    """Attention sinks as the ops take them ((Hq,), one logit per query head): gpt-oss and its
    kin pass `s_aux=self.sinks`. Per-query sinks (a learned projection of each token) are not
    implemented: raise rather than drop them."""
    given = [(n, kwargs[n]) for n in ("s_aux", "sinks") if kwargs.get(n) is not None]
    if not given:
        return None
    name, sinks = given[0]
    if not isinstance(sinks, torch.Tensor) or sinks.dim() != 1 or sinks.shape[0] != n_heads:
        shape = tuple(sinks.shape) if isinstance(sinks, torch.Tensor) else type(sinks).__name__
        raise NotImplementedError(
            f"fastllm attention: {type(module).__name__} passes attention sinks {name}= of shape {shape}; "
            f"fastllm implements one sink logit per query head ({n_heads},). fastllm.unpatch(model) to run it.")
    return sinks


#: An additive mask value at or below this masks its key: its softmax weight, exp(-1e4 + s - max),
#: is 0 in fp32 unless the masked score s tops the row's kept ones by ~1e4 (scores are far
#: smaller), so the old -10000.0 convention is a mask as exactly as -inf or the dtype's minimum.
MASKED_AT_OR_BELOW = -1e4


def _split_additive(mask, module):
    """(bool mask, None) or (None, bias) for a float mask as transformers' eager path uses it
    (added to the scores). Exactly a mask when every value is 0 (attend) or hugely negative
    (-inf, the dtype's minimum, -1e4 and below; Pixtral's block mask): then the kernels skip
    what it rules out, and decode calls keep the decode kernel. Anything else is a bias (relative
    positions, Swin's shifted-window -100), added by flash_attention, broadcast from the left to
    4-D as eager broadcasting does."""
    if not mask.is_floating_point():
        raise TypeError(f"fastllm attention: {type(module).__name__} got a {mask.dtype} attention mask; "
                        "expected bool (True = attend) or a float additive mask")
    if mask.dim() > 4:
        raise NotImplementedError(
            f"fastllm attention: {type(module).__name__} got a {mask.dim()}-D additive mask {tuple(mask.shape)}; "
            "fastllm adds masks broadcastable to (B, Hq, Sq, Skv). fastllm.unpatch(model) for this model.")
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    allowed = mask == 0
    if (allowed | (mask <= MASKED_AT_OR_BELOW)).all():
        return allowed, None
    return None, (mask if mask.dtype in FLOAT_DTYPES else mask.float())


def _select_keys(mask, bias, indices, n_keys, module):
    """DeepSeek-V3.2-style sparse attention: indices (B, Sq, topk) are the keys each query may
    read (its indexer's top-k; out-of-range entries ignored), applied on top of the mask as
    transformers' eager / sdpa paths do. Exact; costs a (B, 1, Sq, Skv) bool mask per call."""
    if not isinstance(indices, torch.Tensor) or indices.dim() != 3 or indices.is_floating_point():
        got = tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise NotImplementedError(f"fastllm attention: {type(module).__name__} passes indices= {got}; fastllm "
                                  "applies integer (B, Sq, topk) key indices. fastllm.unpatch(model) to run it.")
    idx = indices.long()
    idx = torch.where((idx >= 0) & (idx < n_keys), idx, n_keys)   # the spare column takes the rest
    chosen = torch.zeros(*idx.shape[:2], n_keys + 1, dtype=torch.bool, device=idx.device)
    chosen = chosen.scatter_(-1, idx, True)[..., :n_keys].unsqueeze(1)
    if bias is not None:
        return None, torch.where(chosen, bias, float("-inf"))
    return mask & chosen, None


def _one_mask_for_all_heads(mask):
    """A (B, H, Sq, Skv) bool mask: the kernels take one mask for all heads (B, 1, Sq, Skv); one
    whose heads differ becomes an additive bias (0 / -inf) instead."""
    if torch.equal(mask, mask[:, :1].expand_as(mask)):
        return mask[:, :1], None
    return None, torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))


_REGISTERED = set()


def register(backend: str) -> str:
    """Register the attention function and its mask function with transformers under
    impl_name(backend); returns the name. Idempotent. The registrations are global in
    transformers (a name in a dict); they change nothing until a model selects the name."""
    name = impl_name(backend)
    if name in _REGISTERED:
        return name
    import functools

    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    fn = functools.partial(attention_forward, _fastllm_backend=backend)
    functools.update_wrapper(fn, attention_forward)
    AttentionInterface.register(name, fn)
    # Without a mask function of the same name, transformers' mask builders return None for
    # any name they do not know (see masking_utils._preprocess_mask_arguments): padded batches
    # would silently attend to padding. sdpa_mask gives bool masks and None where SDPA's
    # is_causal would do (the cases handled above).
    AttentionMaskInterface.register(name, sdpa_mask)
    _REGISTERED.add(name)
    return name
