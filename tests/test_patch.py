"""fastllm.patch on tiny random transformers models (built from configs; no downloads; fp32).

Every comparison is patched vs unpatched on the same instance. Logit checks follow STYLE.md:
the error vs a float64 eager copy of the model must be at most ~2x the error of transformers'
own attention (sdpa; eager for Gemma 2) in float32, plus a float32 rounding floor. Greedy
generations must agree token for token, except after a step where the unpatched model itself
had a near-tie between the two tokens (random weights make ties possible).
"""
import copy
import inspect
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastllm  # noqa: E402
from fastllm.errors import BackendUnavailableError, FastllmError  # noqa: E402
from fastllm.patch import UnsupportedModelError, is_patched  # noqa: E402
from fastllm.patch import _attention, _slicing  # noqa: E402

T = transformers
VOCAB = 128
DECODERS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt_oss"]
WINDOW = 5   # sliding window well below the test sequence lengths, so it matters


def build(kind, hidden=64, layers=2):
    """A tiny random model of `kind` in eval mode (fresh weights from the per-test seed)."""
    common = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=4, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2, max_position_embeddings=256)
    if kind == "llama":
        model = T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=2, **common))
    elif kind == "mistral":      # sliding window on every layer
        model = T.MistralForCausalLM(T.MistralConfig(num_key_value_heads=2, sliding_window=WINDOW, **common))
    elif kind == "qwen2":        # layer 0 full, layer 1 sliding (max_window_layers=1)
        model = T.Qwen2ForCausalLM(T.Qwen2Config(num_key_value_heads=2, use_sliding_window=True,
                                                 sliding_window=WINDOW, max_window_layers=1, **common))
    elif kind == "qwen3":        # MQA, q/k norms, head_dim != hidden / heads
        model = T.Qwen3ForCausalLM(T.Qwen3Config(num_key_value_heads=1, head_dim=24, **common))
    elif kind == "gemma2":       # softcap, query_pre_attn_scalar scaling, sliding/full alternating
        model = T.Gemma2ForCausalLM(T.Gemma2Config(
            num_key_value_heads=2, head_dim=16, sliding_window=WINDOW, attn_logit_softcapping=2.0,
            final_logit_softcapping=30.0, query_pre_attn_scalar=20,
            # eager: transformers 5.17 defaulted Gemma 2 to sdpa, which dropped the softcap (the
            # reference would mean something else there); 5.23 defaults to eager.
            attn_implementation="eager", **common))
    elif kind == "phi3":         # fused qkv, partial sliding window config
        model = T.Phi3ForCausalLM(T.Phi3Config(num_key_value_heads=2, sliding_window=WINDOW, **common))
    elif kind == "gpt_oss":      # attention sinks (s_aux), sliding/full alternating, MoE
        model = T.GptOssForCausalLM(T.GptOssConfig(num_key_value_heads=2, head_dim=16, sliding_window=WINDOW,
                                                   num_local_experts=2, num_experts_per_tok=1, **common))
        for layer in model.model.layers:   # init is ~0: spread them so that they matter
            layer.self_attn.sinks.data = torch.randn(4) * 2
    elif kind == "llama4":       # chunked attention (blocks of 4) on layer 0, MoE
        model = T.Llama4ForCausalLM(T.Llama4TextConfig(
            num_key_value_heads=2, head_dim=16, attention_chunk_size=4, intermediate_size_mlp=2 * hidden,
            no_rope_layers=[1, 0], interleave_moe_layer_step=1, num_local_experts=2, **common))
    elif kind == "lfm2":         # hybrid: a convolution layer, then an attention layer
        model = T.Lfm2ForCausalLM(T.Lfm2Config(num_key_value_heads=2, layer_types=["conv", "full_attention"],
                                               **common))
    elif kind == "minimax":      # hybrid: a linear-attention (lightning) layer, then softmax attention
        model = T.MiniMaxForCausalLM(T.MiniMaxConfig(
            num_key_value_heads=2, head_dim=16, layer_types=["linear_attention", "full_attention"],
            num_local_experts=2, num_experts_per_tok=1, **common))
    elif kind == "deepseek_v3":  # MLA: caches a latent (width kv_lora_rank) and a rope key, one "head"
        model = T.DeepseekV3ForCausalLM(T.DeepseekV3Config(
            num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
            v_head_dim=16, moe_intermediate_size=hidden // 2, n_routed_experts=4, num_experts_per_tok=2,
            n_group=1, topk_group=1, first_k_dense_replace=1, **common))
    elif kind == "bert":         # bidirectional encoder
        model = T.BertModel(T.BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                                         num_attention_heads=4, intermediate_size=2 * hidden,
                                         max_position_embeddings=256, pad_token_id=0))
    else:
        raise ValueError(kind)
    return model.eval()


def batch(B=3, S=13, pad=(4, 0, 7)):
    """Left-padded batch: row b has pad[b] padding tokens (mask 0) in front."""
    ids = torch.randint(3, VOCAB, (B, S))
    mask = torch.ones_like(ids)
    for b, p in enumerate(pad[:B]):
        ids[b, :p] = 0
        mask[b, :p] = 0
    return ids, mask


@torch.no_grad()
def out(model, ids, mask=None):
    o = model(ids, attention_mask=mask)
    return (o.logits if hasattr(o, "logits") else o.last_hidden_state).float()


@torch.no_grad()
def float64_reference(model, ids, mask=None):
    """Ground truth in float64, independent of transformers' and fastllm's mask handling.

    Decoders: each row run alone without its padding, eager attention (RoPE makes the logits
    independent of the position offset the padding adds). Eager cannot take the padded batch
    in float64: it adds finfo(float64).min and softmaxes in float32, so fully-masked pad rows
    become NaN and spread. BERT (absolute position embeddings, no fully-masked rows): the
    padded batch through sdpa in float64.
    """
    m = copy.deepcopy(model).double()
    if isinstance(model, T.BertModel):
        m.set_attn_implementation("sdpa")
        return out(m, ids, mask).double()
    m.set_attn_implementation("eager")
    if m._can_set_experts_implementation():
        m.set_experts_implementation("eager")   # MoE: grouped_mm takes no float64
    mask = torch.ones_like(ids) if mask is None else mask
    res = None
    for b in range(ids.shape[0]):
        keep = mask[b].bool()
        row = out(m, ids[b:b + 1, keep]).double()
        if res is None:
            res = torch.full((*ids.shape, row.shape[-1]), float("nan"), dtype=torch.float64)
        res[b, keep] = row[0]
    return res


def assert_close_to_reference(got, base, ref, valid, what):
    """got (fastllm) vs ref (float64) within 2x base's (transformers' attention) error + rounding."""
    ref = ref.double()
    err = (got.double() - ref)[valid].abs().max().item()
    base_err = (base.double() - ref)[valid].abs().max().item()
    floor = 4 * torch.finfo(torch.float32).eps * ref[valid].abs().max().item()
    assert err <= 2 * base_err + floor, f"{what}: error {err:.3g} vs transformers' {base_err:.3g} (floor {floor:.3g})"


@torch.no_grad()
def greedy(model, ids, mask, n=6, **kw):
    # disable_compile: on CUDA transformers compiles static-cache decode steps by itself (slow, and
    # not what these tests compare).
    o = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=0, return_dict_in_generate=True, output_logits=True, disable_compile=True,
                       **kw)
    return o.sequences[:, ids.shape[1]:], torch.stack(o.logits, 1).float()


def assert_same_tokens(ref_tokens, ref_logits, tokens, what, tie=1e-4):
    """Token-identical, except after a step where ref itself had a near-tie between the two
    (closer than tie x max |logit|; the default suits fp32 logits)."""
    for b in range(ref_tokens.shape[0]):
        for t in range(ref_tokens.shape[1]):
            a, c = ref_tokens[b, t].item(), tokens[b, t].item()
            if a != c:
                lg = ref_logits[b, t]
                gap = (lg[a] - lg[c]).abs().item()
                assert gap <= tie * lg.abs().max().item(), (
                    f"{what}: row {b} step {t}: token {c} != {a} (reference logit gap {gap:.3g}: not a tie)")
                break


def state_snapshot(model):
    """Weights, and which config object every module holds (identity, not value)."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(m, a, v) for m in model.modules() for a, v in vars(m).items()
             if isinstance(v, T.PretrainedConfig)])


def assert_untouched(model, cfg, impl, snapshot):
    sd, refs = snapshot
    assert not is_patched(model)
    assert model.config is cfg and cfg._attn_implementation == impl
    assert all(m.__dict__[a] is v for m, a, v in refs)
    assert all("forward" not in m.__dict__ for m in model.modules())
    now = model.state_dict()
    assert now.keys() == sd.keys() and all(torch.equal(now[k], sd[k]) for k in sd)


# ----------------------------------------------------------------------------------------------
# Exactness: logits and generation.

@pytest.mark.parametrize("kind", DECODERS + ["bert"])
def test_logits_match(kind):
    model = build(kind)
    ids, mask = batch()
    ref = float64_reference(model, ids, mask)
    base = out(model, ids, mask)
    fastllm.patch(model, backend="torch")
    got = out(model, ids, mask)
    assert_close_to_reference(got, base, ref, mask.bool(), kind)
    # Unpadded batch: the masks are skipped (None) and causality comes from `causal`.
    ids2 = torch.randint(3, VOCAB, (2, 11))
    got2 = out(model, ids2)
    fastllm.unpatch(model)
    assert_close_to_reference(got2, out(model, ids2), float64_reference(model, ids2),
                              torch.ones(2, 11, dtype=torch.bool), kind + " unpadded")


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("kind", DECODERS)
def test_generate_left_padded(kind, cache):
    model = build(kind)
    ids, mask = batch()
    kw = {"cache_implementation": "static"} if cache == "static" else {}
    ref_tokens, ref_logits = greedy(model, ids, mask, **kw)
    fastllm.patch(model, backend="torch")
    tokens, _ = greedy(model, ids, mask, **kw)
    assert_same_tokens(ref_tokens, ref_logits, tokens, f"{kind} {cache}")


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_generate_static_unpadded(kind):
    """No padding: the StaticCache prefill gets mask=None with Skv = max_cache_len > Sq."""
    model = build(kind)
    ids, mask = batch(pad=(0, 0, 0))
    ref_tokens, ref_logits = greedy(model, ids, mask, cache_implementation="static")
    fastllm.patch(model, backend="torch")
    tokens, _ = greedy(model, ids, mask, cache_implementation="static")
    assert_same_tokens(ref_tokens, ref_logits, tokens, f"{kind} static unpadded")


def test_static_cache_prefill_slices_unwritten_slots():
    """mask None with Sq > 1 and Skv > Sq (empty StaticCache prefill): top-left causal."""
    q = torch.randn(2, 4, 5, 8).transpose(1, 2).contiguous().transpose(1, 2)  # (B, H, S, D) view
    k, v = torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    module = torch.nn.Module()
    module.is_causal = True
    got, w = _attention.attention_forward(module, q, k, v, None, scaling=0.3, _fastllm_backend="torch")
    assert w is None
    ref = fastllm.ops.flash_attention(q, k[:, :, :5], v[:, :, :5], causal=True, scale=0.3, backend="torch")
    assert torch.equal(got, ref)
    # Sq == 1 with no mask: attends to every key.
    got1, _ = _attention.attention_forward(module, q[:, :, :1], k, v, None, scaling=0.3, _fastllm_backend="torch")
    assert torch.equal(got1, fastllm.ops.flash_attention(q[:, :, :1], k, v, causal=False, scale=0.3, backend="torch"))


def _eager(q, k, v, add, scale):
    """transformers' eager attention: softmax(q k^T * scale + add) v, K/V repeated for GQA."""
    g = q.shape[1] // k.shape[1]
    s = q @ k.repeat_interleave(g, 1).transpose(-1, -2) * scale + add
    return (s.softmax(-1) @ v.repeat_interleave(g, 1)).transpose(1, 2)


def test_attention_function_adds_biases_and_per_head_masks():
    """A float mask that is not exactly a mask is an additive bias (relative positions; Swin's
    shifted-window -100; -9999 is still a small weight), broadcast from the left as eager does;
    a bool mask whose heads differ becomes a 0 / -inf bias. Both go to flash_attention, also for
    a single query (the decode kernel takes no bias)."""
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    module = torch.nn.Module()
    for add in (torch.randn(2, 4, 5, 7), torch.randn(1, 4, 5, 7), torch.randn(5, 7),
                torch.full((1, 1, 5, 7), -9999.0).triu(1), torch.zeros(1, 1, 5, 7).masked_fill(
                    torch.rand(1, 1, 5, 7) > 0.5, -100.0).double()):
        got, _ = _attention.attention_forward(module, q, k, v, add, scaling=0.3, _fastllm_backend="torch")
        torch.testing.assert_close(got, _eager(q, k, v, add.float(), 0.3), rtol=1e-5, atol=1e-5)
    add = torch.randn(2, 4, 1, 7)
    got, _ = _attention.attention_forward(module, q[:, :, :1], k, v, add, scaling=0.3, _fastllm_backend="torch")
    torch.testing.assert_close(got, _eager(q[:, :, :1], k, v, add, 0.3), rtol=1e-5, atol=1e-5)
    per_head = torch.rand(2, 4, 5, 7) > 0.3
    per_head[..., 0] = True
    got, _ = _attention.attention_forward(module, q, k, v, per_head, scaling=0.3, _fastllm_backend="torch")
    add = torch.zeros(per_head.shape).masked_fill(~per_head, float("-inf"))
    torch.testing.assert_close(got, _eager(q, k, v, add, 0.3), rtol=1e-5, atol=1e-5)
    exact = torch.zeros(5, 7).masked_fill(torch.ones(5, 7, dtype=torch.bool).triu(3), float("-inf"))   # 2-D, a mask
    got, _ = _attention.attention_forward(module, q, k, v, exact, scaling=0.3, _fastllm_backend="torch")
    torch.testing.assert_close(got, _eager(q, k, v, exact, 0.3), rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match=r"5-D additive mask"):
        _attention.attention_forward(module, q, k, v, torch.randn(1, 2, 4, 5, 7))


def test_attention_function_rejects_what_it_cannot_do():
    q = torch.randn(1, 2, 3, 8)
    module = torch.nn.Module()
    with pytest.raises(TypeError, match="expected bool"):
        _attention.attention_forward(module, q, q, q, torch.ones(1, 1, 3, 3, dtype=torch.int64))
    with pytest.raises(NotImplementedError, match=r"sinks sinks= of shape \(1, 2, 3, 1\); .* one sink logit per query"):
        _attention.attention_forward(module, q, q, q, None, sinks=torch.zeros(1, 2, 3, 1))   # per query
    with pytest.raises(NotImplementedError, match=r"passes indices= \(the keys each query may read\) without"):
        _attention.attention_forward(module, q, q, q, None, indices=torch.zeros(1, 3, 2, dtype=torch.long))
    with pytest.raises(NotImplementedError, match=r"block-sparse attention \(block_indices=\)"):
        _attention.attention_forward(module, q, q, q, None, block_indices=torch.zeros(1, 3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="dropout"):
        _attention.attention_forward(module, q, q, q, None, dropout=0.1)


def test_attention_function_float_masks_and_mla_head_dims():
    # A pure additive float mask (0 / -inf or the dtype's minimum: what some models build
    # themselves, e.g. Pixtral's block mask) is the bool mask it encodes.
    q, k, v = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16)
    allowed = torch.rand(2, 1, 5, 7) > 0.3
    want, _ = _attention.attention_forward(torch.nn.Module(), q, k, v, allowed)
    # -10000.0: the old transformers / BERT convention, exact in fp32 too (exp(-1e4) is 0); and the
    # float16 minimum held in a float32 mask.
    for neg in (float("-inf"), torch.finfo(torch.float32).min, -10000.0, torch.finfo(torch.float16).min):
        additive = torch.zeros(2, 1, 5, 7).masked_fill(~allowed, neg)
        got, _ = _attention.attention_forward(torch.nn.Module(), q, k, v, additive)
        assert torch.equal(got, want)
        if neg == -10000.0:   # what SDPA makes of it: the same (rows with a kept key)
            sdpa = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                  attn_mask=additive).transpose(1, 2)
            rows = allowed.any(-1)[:, 0]                                      # (B, Sq)
            torch.testing.assert_close(got[rows], sdpa[rows], rtol=1e-5, atol=1e-6)
    # A (B, H, Sq, Skv) mask equal across heads is the one mask (a user's 4-D per-head mask).
    got, _ = _attention.attention_forward(torch.nn.Module(), q, k, v, allowed.expand(2, 4, 5, 7).clone())
    assert torch.equal(got, want)
    # MLA (V head dim != Q/K's): zero padding, output sliced back; == attention computed
    # directly on the unpadded tensors (both directions of the mismatch, prefill and decode).
    for dqk, dv in ((24, 16), (16, 24)):
        for sq, skv in ((7, 7), (1, 7)):   # causal prefill, one query seeing every key
            q, k, v = torch.randn(2, 4, sq, dqk), torch.randn(2, 2, skv, dqk), torch.randn(2, 2, skv, dv)
            got, _ = _attention.attention_forward(torch.nn.Module(), q, k, v, None, scaling=0.3)
            s = (q.reshape(2, 2, 2 * sq, dqk) @ k.transpose(-1, -2)).reshape(2, 4, sq, skv) * 0.3
            s = s.masked_fill(torch.ones(sq, skv, dtype=torch.bool).triu(skv - sq + 1), float("-inf"))
            ref = (s.softmax(-1).reshape(2, 2, 2 * sq, skv) @ v).reshape(2, 4, sq, dv).transpose(1, 2)
            assert got.shape == (2, sq, 4, dv)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_mla_model():
    # DeepSeek-V3 (MLA: qk head dim 24, v head dim 16): every forward raised before.
    model = T.DeepseekV3ForCausalLM(T.DeepseekV3Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
        first_k_dense_replace=1, n_group=1, topk_group=1, pad_token_id=0)).eval()
    ids, mask = batch()
    base = out(model, ids, mask)
    tokens, logits = greedy(model, ids, mask, cache_implementation="static")
    fastllm.patch(model, backend="torch")
    got = out(model, ids, mask)
    assert (got - base)[mask.bool()].abs().max() < 1e-4
    assert_same_tokens(tokens, logits, greedy(model, ids, mask, cache_implementation="static")[0], "mla static")


def test_training_with_attention_dropout_raises():
    model = build("llama")
    model.config.attention_dropout = 0.1   # before patch: the attention modules read it at init...
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    fastllm.patch(model, backend="torch")
    ids, _ = batch(B=1, pad=(0,))
    model.train()
    with pytest.raises(ValueError, match="dropout"):
        model(ids)
    model.eval()
    model(ids)   # dropout=0.0 in eval mode


def test_torch_compile_fullgraph():
    model = build("llama")
    ids, mask = batch()
    fastllm.patch(model, backend="auto")
    eager = out(model, ids, mask)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    try:
        got = out(compiled, ids, mask)
        got_unpadded = out(compiled, ids[1:2])
    finally:
        torch._dynamo.reset()
    valid = mask.bool()
    assert torch.allclose(got[valid], eager[valid], rtol=0, atol=0) or \
        (got - eager)[valid].abs().max() <= 4 * torch.finfo(torch.float32).eps * eager.abs().max()
    assert torch.allclose(got_unpadded, out(model, ids[1:2]), rtol=1e-6, atol=1e-6)


def test_compiled_generate_static_then_dynamic_cache():
    # A sliding-window model's compiled forward, generating with a StaticCache, then a DynamicCache
    # (recompiled with symbolic sizes): decode_attention refused its valid mask under Dynamo
    # ("must be broadcastable as (3 or 1, 1, 1, 5) ..., got shape (3, 1, 1, 5)") as the size
    # checks were written `n not in (1, full)`; they compare with == now (ops._checks.broadcasts_to).
    model = build("mistral")
    ids, mask = batch()
    fastllm.patch(model, backend="torch")
    want = [greedy(model, ids, mask, cache_implementation="static"), greedy(model, ids, mask)]
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="eager", fullgraph=True)
    try:
        got = [greedy(model, ids, mask, cache_implementation="static"), greedy(model, ids, mask)]
    finally:
        del model.forward
        torch._dynamo.reset()
    for (t, lg), (rt, rlg) in zip(got, want):
        assert_same_tokens(rt, rlg, t, "compiled generate")


def _triton_attention_available():
    try:
        import fastllm.triton_kernels.flash_attention  # noqa: F401
    except ImportError as e:
        return str(e)
    from fastllm.ops.registry import device_reason
    return device_reason("triton", torch.device("cpu"), auto=False)


@pytest.mark.parametrize("kind", ["llama", "gemma2", "gpt_oss"])
def test_triton_backend_logits(kind):
    """The real Triton kernel (interpreter on CPU) inside the model: tiny on purpose (slow)."""
    why = _triton_attention_available()
    if why:
        pytest.skip(f"Triton flash attention unavailable here: {why}")
    model = build(kind)
    ids, mask = batch(B=2, S=13, pad=(4, 0))
    ref = float64_reference(model, ids, mask)
    base = out(model, ids, mask)
    fastllm.patch(model, backend="triton")
    assert fastllm.patch_report(model).ops[0].selected == "triton"
    got = out(model, ids, mask)
    assert_close_to_reference(got, base, ref, mask.bool(), kind + " triton")


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_triton_backend_generate(cache):
    """Decode steps (Sq = 1, masks over a StaticCache) through the Triton kernel."""
    why = _triton_attention_available()
    if why:
        pytest.skip(f"Triton flash attention unavailable here: {why}")
    model = build("mistral")
    ids, mask = batch(B=2, S=9, pad=(3, 0))
    kw = {"cache_implementation": "static"} if cache == "static" else {}
    ref_tokens, ref_logits = greedy(model, ids, mask, n=4, **kw)
    fastllm.patch(model, backend="triton")
    tokens, _ = greedy(model, ids, mask, n=4, **kw)
    assert_same_tokens(ref_tokens, ref_logits, tokens, f"triton {cache}")


# ----------------------------------------------------------------------------------------------
# Reversibility, isolation, idempotence, errors.

def test_unpatch_round_trip_is_exact():
    model = build("qwen2")
    cfg, impl = model.config, model.config._attn_implementation
    cfg_dict = cfg.to_dict()
    sd = state_snapshot(model)
    ids, mask = batch()
    before = out(model, ids, mask)
    fastllm.patch(model, backend="torch", skip_attention=1)
    assert model.config is not cfg and model.config._attn_implementation == "fastllm_torch"
    assert cfg._attn_implementation == impl          # the original object is never written
    fastllm.unpatch(model)
    assert_untouched(model, cfg, impl, sd)
    assert cfg.to_dict() == cfg_dict
    assert all(getattr(m, "config", cfg) is cfg for m in model.modules())
    assert torch.equal(out(model, ids, mask), before)
    with pytest.raises(ValueError, match="not patched"):
        fastllm.unpatch(model)


def test_config_not_shared_with_sibling():
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    a, b = T.LlamaForCausalLM(cfg).eval(), T.LlamaForCausalLM(cfg).eval()
    assert a.config is b.config
    fastllm.patch(a)
    assert a.config._attn_implementation == "fastllm"
    assert b.config is cfg and cfg._attn_implementation == "sdpa"
    assert all(m.config is cfg for m in b.modules() if hasattr(m, "config"))
    assert all(m.config is a.config for m in a.modules() if hasattr(m, "config"))
    fastllm.unpatch(a)
    assert a.config is cfg


def test_patch_twice():
    model = build("llama")
    fastllm.patch(model, backend="torch")
    state = model._fastllm_patch
    assert fastllm.patch(model, backend="torch") is model      # same options: no-op
    assert model._fastllm_patch is state
    with pytest.raises(FastllmError, match="already patched"):
        fastllm.patch(model, backend="torch", skip_attention=1)
    assert model._fastllm_patch is state


def test_config_edits_while_patched_survive_unpatch():
    # Regression: the edits went to the private copy and unpatch put the untouched original back.
    model = build("qwen2")
    cfg = model.config
    fastllm.patch(model, backend="torch")
    model.config.use_cache = False
    model.config.output_hidden_states = True
    model.config.layer_types.append("full_attention")     # an in-place edit of a list
    model.set_attn_implementation("eager")                 # not carried: unpatch restores sdpa
    fastllm.unpatch(model)
    assert model.config is cfg and cfg.use_cache is False and cfg.output_hidden_states is True
    assert cfg.layer_types[-1] == "full_attention" and len(cfg.layer_types) == 3
    assert cfg._attn_implementation == "sdpa"


def test_nested_patch_is_refused():
    # Regression: patch(m.model) then patch(m) copied the inner patch's private configs, and the
    # final unpatch left fastllm attention in place with no record of it.
    model = build("llama")
    fastllm.patch(model.model, backend="torch")
    with pytest.raises(FastllmError, match="its submodule 'model' is already patched"):
        fastllm.patch(model, backend="torch")
    assert not is_patched(model)
    fastllm.unpatch(model.model)
    fastllm.patch(model, backend="torch")
    with pytest.raises(FastllmError, match="is part of a model fastllm.patch already patched"):
        fastllm.patch(model.model, backend="torch")
    assert not is_patched(model.model)
    fastllm.unpatch(model)
    assert model.config._attn_implementation == "sdpa"
    fastllm.patch(model.model, backend="torch")          # unpatched: the inner model alone is fine again
    fastllm.unpatch(model.model)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_nested_patch_is_refused_on_a_copy(how):
    # Regression: the guard's registry was filled by patch() only, so a deepcopy / unpickled copy
    # accepted patch(copy.model); after both unpatches the "unpatched" copy still ran fastllm
    # attention, its config split in two.
    import pickle
    model = fastllm.patch(build("llama"), backend="torch")
    dup = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    with pytest.raises(FastllmError, match="is part of a model fastllm.patch already patched"):
        fastllm.patch(dup.model, backend="torch")
    fastllm.unpatch(dup)
    assert dup.config._attn_implementation == "sdpa" and dup.model.config is dup.config
    fastllm.patch(dup.model, backend="torch")            # unpatched: its inner model alone is fine
    fastllm.unpatch(dup.model)


def test_a_model_built_from_a_patched_models_config_can_be_patched():
    # Regression: the guard keyed on the config object, so a new model sharing the patched
    # model's (private) config was refused as "part of a model already patched".
    a = fastllm.patch(build("llama"), backend="torch")
    b = T.LlamaForCausalLM(a.config).eval()
    assert b.config is a.config
    fastllm.patch(b, backend="torch")
    fastllm.unpatch(b)
    assert b.config is a.config
    with pytest.raises(FastllmError, match="is part of a model fastllm.patch already patched"):
        fastllm.patch(a.model, backend="torch")


def test_output_attentions_warns_and_switching_away_shows_in_the_report():
    model = build("gemma2")                        # eager by default: it returned weights before
    ids = torch.randint(3, VOCAB, (1, 6))
    assert len(model(ids, output_attentions=True).attentions) == 2
    fastllm.patch(model, backend="torch")
    with pytest.warns(UserWarning, match="does not return attention weights"):
        model(ids, output_attentions=True)
    assert not any("switched" in n for n in fastllm.patch_report(model).notes)
    model.set_attn_implementation("eager")
    assert "switched to attention implementation 'eager'" in fastllm.patch_report(model).notes[-1]
    # Patching again with the same options puts fastllm's attention back (it returned silently).
    fastllm.patch(model, backend="torch")
    assert model.config._attn_implementation == _attention.impl_name("torch")
    assert not any("switched" in n for n in fastllm.patch_report(model).notes)


def test_bad_arguments():
    model = build("llama")
    with pytest.raises(ValueError, match="backend"):
        fastllm.patch(model, backend="fast")
    with pytest.raises(TypeError, match="skip_attention"):
        fastllm.patch(model, skip_attention="last")
    with pytest.raises(ValueError, match="between 0"):
        fastllm.patch(model, skip_attention=3)
    with pytest.raises(ValueError, match="out of range"):
        fastllm.patch(model, skip_attention=[2])
    with pytest.raises(TypeError, match="include"):
        fastllm.patch(model, include=3)
    assert not is_patched(model)


def test_forced_backend_that_cannot_run_raises_before_touching():
    model = build("llama")
    cfg, sd = model.config, state_snapshot(model)
    with pytest.raises(BackendUnavailableError, match="cuda"):
        fastllm.patch(model, backend="cuda")
    assert_untouched(model, cfg, "sdpa", sd)


def _gemma4(shared=0):
    return T.Gemma4ForCausalLM(T.Gemma4TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, global_head_dim=32, sliding_window=5,
        layer_types=["sliding_attention", "full_attention"] * 2, num_kv_shared_layers=shared,
        hidden_size_per_layer_input=16, vocab_size_per_layer_input=128, pad_token_id=0, bos_token_id=1,
        eos_token_id=2))


def _gemma3n_skip():
    model = T.Gemma3nForCausalLM(T.Gemma3nTextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=[128] * 4, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=5, layer_types=["sliding_attention", "full_attention"] * 2,
        num_kv_shared_layers=2, hidden_size_per_layer_input=16, vocab_size_per_layer_input=128, laurel_rank=8,
        activation_sparsity_pattern=[0.0] * 4, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    model.skip_kw = dict(skip_attention=1)
    return model


def _glm_dsa_skip():
    """GLM-MoE-DSA's attention returns (out, weights, top-k indices) and the next layers reuse the
    indices: a skipped sub-layer could not produce them (the stand-in's two values failed the
    layer's unpacking at the first forward)."""
    model = T.GlmMoeDsaForCausalLM(T.GlmMoeDsaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, intermediate_size=128,
        moe_intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=256, n_routed_experts=4,
        num_experts_per_tok=2, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, kv_lora_rank=32,
        q_lora_rank=32))
    model.skip_kw = dict(skip_attention=1, backend="torch")
    return model


@pytest.mark.parametrize("make, match", [
    (_gemma3n_skip, "num_kv_shared_layers = 2"),   # skipping a layer others read K/V from
    (_glm_dsa_skip, r"GlmMoeDsaAttention.forward returns 3 values"),
    (lambda: build("llama").double(), "computes in float64"),   # the ops take 16/32-bit floats
    (lambda: T.MambaForCausalLM(T.MambaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                              state_size=4, pad_token_id=0)), "AttentionInterface"),
    (lambda: T.T5ForConditionalGeneration(T.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=32,
                                                     num_layers=1, num_heads=4, pad_token_id=0)),
     "_supports_attention_backend"),
])
def test_unsupported_model_raises_and_is_untouched(make, match):
    model = make().eval()
    cfg, impl, sd = model.config, model.config._attn_implementation, state_snapshot(model)
    with pytest.raises(UnsupportedModelError, match=match):
        fastllm.patch(model, **getattr(model, "skip_kw", {}))
    assert_untouched(model, cfg, impl, sd)


def _random_rel_bias(model):
    """Relative position bias tables are zero-initialized: randomize them so that they matter."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "relative_position" in n:
                p.normal_(0.0, 2.0)
    return model.eval()


BIAS_MODELS = {
    # Swin: per-head relative position bias + the shifted-window mask (-100), as combined_mask
    "swin": (lambda: T.SwinModel(T.SwinConfig(image_size=32, patch_size=4, embed_dim=32, depths=[2, 1],
                                              num_heads=[2, 4], window_size=4)),
             lambda: dict(pixel_values=torch.randn(2, 3, 32, 32))),
    # BEiT: a learned relative position bias per layer, or one shared, added by the parent module
    "beit": (lambda: T.BeitModel(T.BeitConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                              intermediate_size=128, image_size=32, patch_size=8,
                                              use_relative_position_bias=True)),
             lambda: dict(pixel_values=torch.randn(2, 3, 32, 32))),
    "beit_shared": (lambda: T.BeitModel(T.BeitConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                     intermediate_size=128, image_size=32, patch_size=8,
                                                     use_shared_relative_position_bias=True)),
                    lambda: dict(pixel_values=torch.randn(2, 3, 32, 32))),
    # Parakeet: Transformer-XL relative scores (matrix_bd), padded frames at the dtype's minimum
    "parakeet": (lambda: T.ParakeetEncoder(T.ParakeetEncoderConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, intermediate_size=128,
        num_mel_bins=16, subsampling_conv_channels=16, subsampling_factor=4)),
        lambda: dict(input_features=torch.randn(2, 80, 16),
                     attention_mask=(torch.arange(80)[None] < torch.tensor([[80], [50]])).long())),
}


@pytest.mark.parametrize("name", BIAS_MODELS)
def test_models_with_additive_score_biases(name):
    """Relative position biases handed to the attention function as its mask: patch refused these
    models (an additive bias was not implemented); flash_attention adds them now."""
    make, inputs = BIAS_MODELS[name]
    model, x = _random_rel_bias(make()), inputs()
    with torch.no_grad():
        base = model(**x).last_hidden_state
        fastllm.patch(model, backend="torch")
        got = model(**x).last_hidden_state
    assert (got - base).abs().max() <= 1e-5 * max(1.0, base.abs().max().item())
    assert "additive bias" in fastllm.patch_report(model).ops[0].note
    if name == "swin" and _triton_attention_available() is None:   # the Triton kernel's bias path, in a model
        fastllm.unpatch(model)
        fastllm.patch(model, backend="triton")
        with torch.no_grad():
            got = model(**x).last_hidden_state
        assert (got - base).abs().max() <= 1e-5 * max(1.0, base.abs().max().item())


def _patched_decoder_matches(model):
    """Patched (torch backend) == unpatched on a left-padded batch: logits, and greedy generate with
    a dynamic and a static cache token for token."""
    ids, am = torch.randint(3, 128, (2, 11)), torch.ones(2, 11, dtype=torch.long)
    am[1, :3] = 0
    with torch.no_grad():
        base = model(ids, attention_mask=am).logits
        gens = [model.generate(ids, attention_mask=am, max_new_tokens=5, do_sample=False, cache_implementation=c)
                for c in ("dynamic", "static")]
        fastllm.patch(model, backend="torch")
        assert (model(ids, attention_mask=am).logits - base).abs().max() < 1e-5
        for c, want in zip(("dynamic", "static"), gens):
            got = model.generate(ids, attention_mask=am, max_new_tokens=5, do_sample=False, cache_implementation=c)
            assert torch.equal(got, want), c


def test_doge_dynamic_mask():
    """Doge adds a learned per-head bias (and top-k key selection) through its mask on every call:
    refused before, served as a bias now, prefill and generate (decode steps carry the bias too)."""
    model = T.DogeForCausalLM(T.DogeConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                           is_moe=False, keep_window_size=6)).eval()
    _patched_decoder_matches(model)


def test_indexed_attention_model():
    """DeepSeek-V3.2's sparse attention (layer type indexed_attention): the indexer's top-k keys per
    query come as indices= beside a materialized causal mask. Refused before; applied as a mask now
    (the test fails without it: logits off by ~0.2)."""
    model = T.DeepseekV32ForCausalLM(T.DeepseekV32Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, n_group=1, topk_group=1, index_topk=4, index_head_dim=16, index_n_heads=2,
        pad_token_id=0)).eval()
    assert set(model.config.layer_types) in ({"indexed_attention"}, {"deepseek_sparse_attention"})   # 5.23 / 5.17
    _patched_decoder_matches(model)


def test_attention_function_applies_key_indices():
    """indices= (B, Sq, topk): the keys each query may read, on top of a bool mask or a bias;
    out-of-range entries (-1, >= Skv) select nothing."""
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    idx = torch.randint(0, 7, (2, 5, 3))
    idx[0, 0, 0], idx[1, 2, 1] = -1, 7
    chosen = torch.zeros(2, 5, 8, dtype=torch.bool).scatter_(-1, idx.clamp(0, 7), True)[..., :7]
    chosen[0, 0, 0] = (idx[0, 0, 1:] == 0).any()    # -1 selected nothing; key 0 only if listed again
    chosen = chosen[:, None]
    mask = torch.rand(2, 1, 5, 7) > 0.2
    for add, want_add in ((mask, torch.zeros(2, 1, 5, 7).masked_fill(~mask, float("-inf"))),
                          (torch.randn(1, 4, 5, 7), None)):
        want_add = add if want_add is None else want_add
        got, _ = _attention.attention_forward(torch.nn.Module(), q, k, v, add, scaling=0.3, indices=idx,
                                              _fastllm_backend="torch")
        want = _eager(q, k, v, torch.where(chosen, want_add, float("-inf")), 0.3).nan_to_num(0.0)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_sub_model_without_attention_does_not_block_patch():
    """DETR: its ResNet backbone is a PreTrainedModel that does not declare custom attention
    support, but holds no attention: the encoder / decoder (with a padded pixel mask) are served."""
    bb = T.ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                        out_features=["stage1", "stage2"])
    model = T.DetrModel(T.DetrConfig(
        use_timm_backbone=False, backbone_config=bb, use_pretrained_backbone=False, d_model=64, encoder_layers=2,
        decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
        decoder_ffn_dim=128, num_queries=5)).eval()
    px, pm = torch.randn(2, 3, 64, 64), torch.ones(2, 64, 64, dtype=torch.long)
    pm[1, :, 40:] = 0
    with torch.no_grad():
        base = model(pixel_values=px, pixel_mask=pm).last_hidden_state
        fastllm.patch(model, backend="torch")
        got = model(pixel_values=px, pixel_mask=pm).last_hidden_state
    assert (got - base).abs().max() <= 1e-5 * max(1.0, base.abs().max().item())
    assert len(fastllm.patch_report(model).replaced) == 2 * 1 + 2 * 2   # encoder self, decoder self + cross


def test_per_layer_config_model():
    # Gemma 4's config forbids global reads of per-layer attributes (head_dim): patch crashed
    # with transformers' RuntimeError. Without KV sharing it is an ordinary model.
    model = _gemma4().eval()
    ids = torch.randint(3, 128, (2, 9))
    base = out(model, ids)
    fastllm.patch(model, backend="torch")
    assert (out(model, ids) - base).abs().max() < 1e-5
    assert "flash_attention" in str(fastllm.patch_report(model))


def test_gemma4_kv_shared_layers_get_the_right_query_positions():
    """Gemma 4 slices the queries (and masks, None included) before its KV-shared layers to the last
    logits_to_keep. With a mask None and several kept queries fastllm read the call as a static-cache
    prefill (logits off by ~0.2): patch() used to refuse the model; now a guard turns the slicing off
    in exactly those cases (as transformers does for sdpa) and lets the others through."""
    model = _gemma4(shared=2).eval()
    sliced = [m for m in model.modules() if hasattr(type(m), "_maybe_slice_kv_shared_inputs")]
    ids = torch.randint(3, 128, (2, 9))
    am = torch.ones_like(ids)
    am[1, :3] = 0
    cases = [(k, m) for k in (0, 1, 3) for m in (None, am)]
    with torch.no_grad():
        base = [model(ids, attention_mask=m, logits_to_keep=k).logits for k, m in cases]
        gens = [model.generate(ids, attention_mask=m, max_new_tokens=5, do_sample=False, cache_implementation=c)
                for m in (None, am) for c in ("dynamic", "static")]
        fastllm.patch(model, backend="torch")
        for (k, m), b in zip(cases, base):
            got = model(ids, attention_mask=m, logits_to_keep=k).logits
            assert (got - b).abs().max() < 1e-5, (k, m is None)
        got = [model.generate(ids, attention_mask=m, max_new_tokens=5, do_sample=False, cache_implementation=c)
               for m in (None, am) for c in ("dynamic", "static")]
        assert all(torch.equal(a, b) for a, b in zip(got, gens))
        if sliced:   # where unambiguous the shortcut stays: the last (shared) layer sees 1 query
            seen = []
            h = model.model.layers[-1].register_forward_pre_hook(
                lambda mod, a, kw: seen.append((a[0] if a else kw["hidden_states"]).shape[1]), with_kwargs=True)
            model(ids, logits_to_keep=1)
            model(ids, logits_to_keep=3)
            h.remove()
            assert seen == [1, 9], seen
        twin = copy.deepcopy(model)   # the guard follows the copy's module, not the original's
        assert (twin(ids, logits_to_keep=3).logits - base[4]).abs().max() < 1e-5
        if sliced:   # transformers 5.17 feeds KV-shared layers every query: nothing to guard
            _slicing.remove(model)   # the case the guard exists for (the test can fail)
            assert (model(ids, logits_to_keep=3).logits - base[4]).abs().max() > 1e-3
    fastllm.unpatch(twin)
    assert not any("_maybe_slice_kv_shared_inputs" in m.__dict__ for m in twin.modules())


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_slice_guard_reads_the_cache_under_either_name(name):
    # transformers 5.24 renamed the methods' past_key_values to cache: read under the old name
    # only, a static cache looked absent and the guard let an ambiguous slicing through.
    class Static:
        is_compileable = True
    masks = {"full_attention": None, "sliding_attention": torch.ones(1, 1, 2, 2, dtype=torch.bool)}
    assert _slicing._ambiguous(1, {"causal_mask_mapping": masks, name: Static()})
    assert not _slicing._ambiguous(1, {"causal_mask_mapping": masks, name: object()})   # dynamic: exact
    assert _slicing._ambiguous(3, {"causal_mask_mapping": masks, name: None})


def test_backends_are_probed_at_every_head_dim_the_model_uses():
    # Regression: the probe read one head dim from the config. Gemma 4's full-attention layers use
    # global_head_dim (512 here) > every kernel's 256: backend="triton" patched, then every forward
    # raised. Vision configs listing heads per stage (Segformer) made patch raise a bare TypeError.
    model = T.Gemma4ForCausalLM(T.Gemma4TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, global_head_dim=512, sliding_window=5,
        layer_types=["sliding_attention", "full_attention"], hidden_size_per_layer_input=16,
        vocab_size_per_layer_input=128, pad_token_id=0)).eval()
    cfg, sd = model.config, state_snapshot(model)
    # (On a GPU machine Triton refuses this CPU model for its device first: no interpreter there.)
    why = _triton_attention_available()
    with pytest.raises(BackendUnavailableError, match="head dim 512 > 256" if why is None else "TRITON_INTERPRET"):
        fastllm.patch(model, backend="triton")
    assert_untouched(model, cfg, "sdpa", sd)
    ids = torch.randint(3, 128, (2, 9))
    base = out(model, ids)
    fastllm.patch(model)
    assert (out(model, ids) - base).abs().max() < 1e-5
    entry = fastllm.patch_report(model).ops[0]
    assert "head dims [16, 512]" in entry.note, entry.note
    if entry.selected != "torch":   # a GPU: a kernel serves 16, the reference 512
        assert "(head dim 512: torch)" in entry.note, entry.note
    seg = T.SegformerModel(T.SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[32, 64],
                                             patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2],
                                             mlp_ratios=[2, 2])).eval()
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        base = seg(pixel_values=px).last_hidden_state
        fastllm.patch(seg, backend="torch")
        assert (seg(pixel_values=px).last_hidden_state - base).abs().max() < 1e-5


@pytest.mark.parametrize("kind,backend", [("llama4", "torch"), ("lfm2", "torch"), ("minimax", "torch"),
                                          ("llama4", "triton")])
def test_chunked_and_hybrid_models(kind, backend):
    """Llama 4's chunked attention is served (transformers builds its block mask through
    fastllm's mask function); the conv (LFM2) and linear-attention (MiniMax) layers of hybrids
    never call the attention function: they keep their own modules, the attention layers get
    fastllm's. Left-padded prompts (9 of 13 tokens, so chunk boundaries shift), generation with
    dynamic and static caches."""
    why = _triton_attention_available() if backend == "triton" else None
    if why:
        pytest.skip(f"Triton flash attention unavailable here: {why}")
    model = build(kind)
    ids, mask = batch()
    valid = mask.bool()
    base = out(model, ids, mask)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    own = (out(eager, ids, mask) - base)[valid].abs().max().item()   # transformers' own spread
    gen = {}
    for c in ("dynamic", "static"):
        try:
            gen[c] = greedy(model, ids, mask, cache_implementation=c)
        except TypeError as e:   # unpatched: transformers 5.17 cannot generate Llama 4 with a static cache
            warnings.warn(f"{kind}: unpatched generate with a {c} cache fails ({e}); not compared")
    fastllm.patch(model, backend=backend)
    err = (out(model, ids, mask) - base)[valid].abs().max().item()
    assert err <= 2 * own + 4 * torch.finfo(torch.float32).eps * base.abs().max().item(), (kind, err, own)
    for c, (ref_tokens, ref_logits) in gen.items():
        assert_same_tokens(ref_tokens, ref_logits, greedy(model, ids, mask, cache_implementation=c)[0], f"{kind} {c}")
    rep = fastllm.patch_report(model)
    layer_types = model.config.layer_types
    attention = [f"model.layers.{i}.self_attn" for i, t in enumerate(layer_types)
                 if t in ("full_attention", "chunked_attention")]
    assert [m.name for m in rep.replaced] == attention
    others = [m for m in rep.modules if m.name.startswith("model.layers.{")]
    assert [(m.name, m.action) for m in others] == ([] if kind == "llama4" else [("model.layers.{0}", "left")])
    if others:
        assert repr(layer_types[0]) in others[0].detail and "no attention-function call" in others[0].detail


def test_unknown_layer_type_raises():
    # A layer of an unknown type that calls the attention function: what its mask means is unknown.
    model = build("llama")
    model.config.layer_types = ["full_attention", "linear_attention"]
    cfg, sd = model.config, state_snapshot(model)
    with pytest.raises(UnsupportedModelError, match=r"model.layers.1 has layer type 'linear_attention' and calls"):
        fastllm.patch(model)
    assert_untouched(model, cfg, "sdpa", sd)
    # layer_types that match no list of layers: which layers the unknown ones are cannot be told.
    model.config.layer_types = ["full_attention", "conv", "full_attention"]
    with pytest.raises(UnsupportedModelError, match=r"\['conv'\], and fastllm cannot tell which layers"):
        fastllm.patch(model)
    assert_untouched(model, cfg, "sdpa", sd)
    with pytest.raises(UnsupportedModelError, match="PreTrainedModel"):
        fastllm.patch(torch.nn.Linear(2, 2))


def test_import_without_transformers():
    code = textwrap.dedent("""
        import sys
        sys.modules["transformers"] = None
        import fastllm
        try:
            fastllm.patch(object())
        except ImportError as e:
            print("ImportError:", e)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "ImportError: fastllm.patch needs transformers" in r.stdout


# ----------------------------------------------------------------------------------------------
# skip_attention.

def test_skip_attention_is_zeroed_attention_and_reversible():
    model = build("llama", layers=3)
    ids, mask = batch()
    before = out(model, ids, mask)
    # Reference: the same model with the skipped layers' o_proj zeroed (attention output 0).
    zeroed = copy.deepcopy(model)
    for i in (0, 2):
        torch.nn.init.zeros_(zeroed.model.layers[i].self_attn.o_proj.weight)
    fastllm.patch(model, backend="torch", skip_attention=[0, -1])
    rep = fastllm.patch_report(model)
    assert [m.name for m in rep.skipped] == ["model.layers.0.self_attn", "model.layers.2.self_attn"]
    got = out(model, ids, mask)
    valid = mask.bool()
    assert (got - before)[valid].abs().max() > 1e-3                      # outputs change
    assert torch.allclose(got[valid], out(zeroed, ids, mask)[valid], rtol=1e-5, atol=1e-5)
    # Generation with a cache (layer 0 skipped: the cache lengths must still be right).
    for kw in ({}, {"cache_implementation": "static"}):
        ref_tokens, ref_logits = greedy(zeroed, ids, mask, **kw)
        tokens, _ = greedy(model, ids, mask, **kw)
        assert_same_tokens(ref_tokens, ref_logits, tokens, f"skip {kw}")
    fastllm.unpatch(model)
    assert torch.equal(out(model, ids, mask), before)


def with_cache(model, ids, cache, **kw):
    """model(ids, ...) filling `cache` (transformers 5.24 renamed past_key_values to cache)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        return model(ids, use_cache=True, **{name: cache}, **kw)


def zeroed_attention_reference(model, names):
    """A deep copy whose attention modules `names` run their original forward (so they fill the
    KV cache as unpatched) and return zeros in place of the output."""
    ref = copy.deepcopy(model)
    for name in names:
        mod = ref.get_submodule(name)

        def fwd(*a, _orig=mod.forward, **k):
            o = _orig(*a, **k)
            return (torch.zeros_like(o[0]), *o[1:])
        mod.forward = fwd
    return ref


def test_skip_attention_on_mla_caches_stand_in_zeros():
    """DeepSeek-V3 caches (B, 1, S, kv_lora_rank) latents and (B, 1, S, rope) keys, not
    (B, Hkv, S, head_dim): the skipped layer's stand-in must not assume the layout. Its zeros
    are (B, 1, S, 1): lengths right for the cache's bookkeeping, ~no memory."""
    model = build("deepseek_v3")
    ids, mask = batch()
    ref = zeroed_attention_reference(model, ["model.layers.0.self_attn"])
    fastllm.patch(model, backend="torch", skip_attention=[0])
    valid = mask.bool()
    assert torch.allclose(out(model, ids, mask)[valid], out(ref, ids, mask)[valid], rtol=1e-5, atol=1e-5)
    for kw in ({}, {"cache_implementation": "static"}):
        ref_tokens, ref_logits = greedy(ref, ids, mask, **kw)
        assert_same_tokens(ref_tokens, ref_logits, greedy(model, ids, mask, **kw)[0], f"mla skip {kw}")
    caches = []
    for m in (model, ref):
        caches.append(T.DynamicCache(config=model.config))
        with_cache(m, ids, caches[-1], attention_mask=mask)
    got, want = ([(tuple(layer.keys.shape), tuple(layer.values.shape)) for layer in c.layers] for c in caches)
    B, S = ids.shape
    assert got[0] == ((B, 1, S, 1), (B, 1, S, 1)) and want[0] == ((B, 1, S, 16), (B, 1, S, 8))
    assert got[1:] == want[1:]


@pytest.mark.parametrize("cache", ["dynamic, prefilled unskipped", "static, initialized early"])
def test_skip_attention_keeps_an_allocated_cache_layout(cache):
    """A cache that already holds the skipped layer's buffers (a prompt prefilled before patching,
    a StaticCache initialized early as torch.export / chunked prefill do) gets zeros of their
    shape, so its update works; the next step's logits equal the zeroed-attention reference's."""
    model = build("llama")
    ids, mask = batch()
    B, S = ids.shape
    if cache.startswith("dynamic"):
        c = T.DynamicCache(config=model.config)
        with_cache(model, ids, c, attention_mask=mask)
        step, pos = torch.randint(3, VOCAB, (B, 1)), S
        step_mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], 1)
    else:
        c = T.StaticCache(config=model.config, max_cache_len=S + 4)
        c.early_initialization(batch_size=B, num_heads=2, head_dim=16, dtype=torch.float32, device="cpu")
        step, pos, step_mask = ids, 0, mask
    ref = zeroed_attention_reference(model, ["model.layers.0.self_attn"])
    ref_cache = copy.deepcopy(c)
    fastllm.patch(model, backend="torch", skip_attention=[0])
    logits = []
    for m, kv in ((model, c), (ref, ref_cache)):
        logits.append(with_cache(m, step, kv, attention_mask=step_mask,
                                 position_ids=torch.arange(pos, pos + step.shape[1]).expand(B, -1)).logits)
    valid = step_mask[:, -step.shape[1]:].bool()
    assert torch.allclose(logits[0][valid], logits[1][valid], rtol=1e-5, atol=1e-5)
    assert c.layers[0].keys.shape == ref_cache.layers[0].keys.shape
    assert c.get_seq_length() == ref_cache.get_seq_length() == pos + step.shape[1]


def test_skip_attention_on_longcat_skips_both_attention_modules():
    """LongCat-Flash: a layer's self_attn is a ModuleList of two MLA modules called one by one
    (cache slots 2i, 2i + 1). Both get the stand-in; on the list itself (never called) the skip
    was a silent no-op that the report still listed."""
    cfg = T.LongcatFlashConfig(
        vocab_size=VOCAB, hidden_size=64, num_layers=2, num_attention_heads=4, num_key_value_heads=4,
        ffn_hidden_size=128, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        head_dim=8, v_head_dim=16, moe_topk=2, n_routed_experts=4, zero_expert_num=2, expert_ffn_hidden_size=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=256)
    model = T.LongcatFlashForCausalLM(cfg).eval()
    ids, mask = batch()
    valid = mask.bool()
    names = ["model.layers.1.self_attn.0", "model.layers.1.self_attn.1"]
    ref = zeroed_attention_reference(model, names)
    before = out(model, ids, mask)
    fastllm.patch(model, backend="torch", skip_attention=1)
    assert [m.name for m in fastllm.patch_report(model).skipped] == names
    got = out(model, ids, mask)
    assert (got - before)[valid].abs().max() > 1e-3
    assert torch.allclose(got[valid], out(ref, ids, mask)[valid], rtol=1e-5, atol=1e-5)
    ref_tokens, ref_logits = greedy(ref, ids, mask)
    assert_same_tokens(ref_tokens, ref_logits, greedy(model, ids, mask)[0], "longcat skip")
    fastllm.unpatch(model)
    assert torch.equal(out(model, ids, mask), before)


def test_skip_attention_refuses_a_sub_layer_without_a_cache_slot():
    """The stand-in writes the layer's KV cache slot (layer_idx): without one, skipping could
    not keep the cache consistent. Refused, model untouched."""
    model = build("llama")
    del model.model.layers[1].self_attn.layer_idx
    cfg, sd = model.config, state_snapshot(model)
    with pytest.raises(UnsupportedModelError, match=r"model.layers.1.self_attn \(LlamaAttention\) is not an "
                                                    r"attention module with a layer_idx"):
        fastllm.patch(model, skip_attention=1)
    assert_untouched(model, cfg, "sdpa", sd)


def test_skip_attention_without_fastllm_attention():
    model = build("gemma2")
    ids, mask = batch()
    before, impl = out(model, ids, mask), model.config._attn_implementation
    fastllm.patch(model, attention=False, skip_attention=1)
    assert model.config._attn_implementation == impl
    assert len(fastllm.patch_report(model).skipped) == 1
    assert (out(model, ids, mask) - before)[mask.bool()].abs().max() > 1e-4
    greedy(model, ids, mask, n=3)
    fastllm.unpatch(model)
    assert torch.equal(out(model, ids, mask), before)


def test_skip_attention_on_a_hybrid_counts_its_attention_layers():
    """LFM2 (layer 0 conv, 1 and 2 attention): skip_attention=1 is the last attention layer; an
    index naming the conv layer is an error, not a silent no-op."""
    model = build("lfm2")
    model.config.num_hidden_layers = 3
    model.config.layer_types = ["conv", "full_attention", "full_attention"]
    model = T.Lfm2ForCausalLM(model.config).eval()
    ids, mask = batch()
    zeroed = copy.deepcopy(model)
    torch.nn.init.zeros_(zeroed.model.layers[2].self_attn.out_proj.weight)
    fastllm.patch(model, backend="torch", skip_attention=1)
    assert [m.name for m in fastllm.patch_report(model).skipped] == ["model.layers.2.self_attn"]
    valid = mask.bool()
    assert torch.allclose(out(model, ids, mask)[valid], out(zeroed, ids, mask)[valid], rtol=1e-5, atol=1e-5)
    ref_tokens, ref_logits = greedy(zeroed, ids, mask)
    assert_same_tokens(ref_tokens, ref_logits, greedy(model, ids, mask)[0], "lfm2 skip")
    fastllm.unpatch(model)
    with pytest.raises(ValueError, match=r"layer 0 \(Lfm2DecoderLayer\) has no attention sub-layer"):
        fastllm.patch(model, skip_attention=[0])
    with pytest.raises(ValueError, match=r"number of attention layers of its 3 \(2\)"):
        fastllm.patch(model, skip_attention=3)
    assert not is_patched(model)
    # MiniMax names its linear-attention mixer `self_attn` too: layer_types decides what counts.
    model = build("minimax")
    with pytest.raises(ValueError, match=r"layer 0 \(MiniMaxDecoderLayer\) has no attention sub-layer"):
        fastllm.patch(model, skip_attention=[0])
    with pytest.raises(ValueError, match=r"number of attention layers of its 2 \(1\)"):
        fastllm.patch(model, skip_attention=2)
    fastllm.patch(model, backend="torch", skip_attention=1)
    assert [m.name for m in fastllm.patch_report(model).skipped] == ["model.layers.1.self_attn"]


def test_skip_attention_needs_decoder_layers():
    model = build("bert")
    cfg, sd = model.config, state_snapshot(model)
    with pytest.raises(UnsupportedModelError, match="self_attn"):
        fastllm.patch(model, skip_attention=1)
    assert_untouched(model, cfg, "sdpa", sd)


# ----------------------------------------------------------------------------------------------
# Report, save / load.

def test_report():
    model = build("mistral")
    fastllm.patch(model, backend="torch", include="*mlp*")
    rep = fastllm.patch_report(model)
    names = [m.name for m in rep.replaced]
    assert names == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert rep.bytes_saved == 0 and rep.skipped == []
    assert rep.ops[0].op == "flash_attention" and rep.ops[0].selected == "torch"
    assert rep.ops[0].reasons["cuda"]                      # why not cuda, in words
    assert any(m.name == "lm_head" and m.action == "left" for m in rep.modules)
    text = str(rep)
    for s in ("flash_attention", "model.layers.1.self_attn", "replaced", "lm_head", "bytes saved",
              "include / exclude"):
        assert s in text
    assert rep.to_dict()["options"]["backend"] == "torch"
    fastllm.unpatch(model)
    with pytest.raises(ValueError, match="not patched"):
        fastllm.patch_report(model)


def test_report_names_attention_it_does_not_serve():
    """SigLIP's pooling head is PyTorch's nn.MultiheadAttention, which never goes through
    transformers' attention interface: left as it was, and the report says so (not silence)."""
    cfg = T.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               image_size=28, patch_size=14)
    model = T.SiglipVisionModel(cfg).eval()
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        before = model(pixel_values=pixels).pooler_output
    fastllm.patch(model, backend="torch")
    rep = fastllm.patch_report(model)
    assert [m.name for m in rep.replaced] == [f"encoder.layers.{i}.self_attn" for i in range(2)]
    left = [m for m in rep.modules if m.type == "MultiheadAttention"]
    assert [(m.name, m.action) for m in left] == [("head.attention", "left")]
    assert "does not call transformers' attention interface" in left[0].detail
    assert "head.attention" in str(rep)
    with torch.no_grad():
        assert torch.allclose(model(pixel_values=pixels).pooler_output, before, rtol=1e-5, atol=1e-5)


def test_save_and_load(tmp_path):
    model = build("qwen3")
    ids, mask = batch()
    fastllm.patch(model, backend="torch", skip_attention=1)
    expected = out(model, ids, mask)
    fastllm.save_pretrained(model, tmp_path)
    assert (tmp_path / "fastllm_config.json").exists()
    loaded = fastllm.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert is_patched(loaded)
    assert loaded._fastllm_patch.options == model._fastllm_patch.options
    assert torch.equal(out(loaded, ids, mask), expected)
    # The saved directory is a plain transformers checkpoint too.
    plain = T.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert plain.config._attn_implementation != "fastllm_torch"
    fastllm.unpatch(model)
    assert torch.equal(out(plain, ids, mask), out(model, ids, mask))
    with pytest.raises(FileNotFoundError, match="fastllm.save_pretrained"):
        fastllm.from_pretrained(tmp_path / "nowhere")


def test_demo_runs(capsys):
    from fastllm import demo
    assert demo.main(["--tokens", "3", "--batch", "2", "--prompt-len", "8", "--skip-attention", "1",
                      "--size", "small"]) == 0
    text = capsys.readouterr().out
    assert "max |logit difference|" in text and "tokens/s" in text and "skip_attention=1" in text
