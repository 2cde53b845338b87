"""fastllm.patch with linear swaps: quantize= (int8), sparsity= (2:4), calibration, SmoothQuant,
include / exclude, keep_original / unpatch, save / load; and the `model` benchmark's CPU smoke run.

Tiny random models from tests/test_patch.py (fp32, CPU, torch backend unless said otherwise).
Accuracy is the relative error of the logits vs the unpatched model on the non-pad positions,
||patched - unpatched|| / ||unpatched|| (Frobenius). Bounds per mode, ~1.5-2x the largest value
measured over 3 seeds x 7 model families (hidden 64, 2 layers; Gemma 2 is the worst: its
embedding scaling and soft-capping amplify errors):
    w8a16 0.016, w8a8 (dynamic) 0.024, w8a8-static 0.064 (calibrated on 2 batches) measured.
Random weights have no activation outliers, so these are the int8 rounding floor; the
SmoothQuant test injects outlier channels to show what it is for.
"""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastllm  # noqa: E402
from fastllm.errors import BackendUnavailableError, FastllmError  # noqa: E402
from fastllm.nn import Int8Linear  # noqa: E402
from fastllm.patch import OriginalsDiscardedError, is_patched  # noqa: E402
from fastllm.patch import _linear  # noqa: E402
from fastllm.patch.rules import sparse24_class  # noqa: E402

from test_patch import (DECODERS, VOCAB, _triton_attention_available, assert_same_tokens,  # noqa: E402
                        assert_untouched, batch, build, greedy, out, state_snapshot)

BOUND = {"w8a16": 0.03, "w8a8": 0.04, "w8a8-static": 0.1}
# Not gpt_oss: its tiny top-1-of-2 MoE flips experts under int8 rounding, which moves the logits
# by more than any bound on quantization error means (its attention is tested in test_patch).
KINDS = [k for k in DECODERS if k != "gpt_oss"] + ["bert"]


def calib(n=2, B=2, S=16):
    return [torch.randint(3, VOCAB, (B, S)) for _ in range(n)]


def rel_err(got, ref, mask):
    v = mask.bool()
    return ((got - ref)[v].norm() / ref[v].norm()).item()


def swapped(model):
    return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, Int8Linear)}


# ----------------------------------------------------------------------------------------------
# Accuracy per mode, on every model family.

@pytest.mark.parametrize("mode", list(BOUND))
@pytest.mark.parametrize("kind", KINDS)
def test_int8_error_within_bounds(kind, mode):
    model = build(kind)
    ids, mask = batch()
    ref = out(model, ids, mask)
    kw = {"calibration": calib()} if mode == "w8a8-static" else {}
    fastllm.patch(model, quantize=mode, backend="torch", **kw)
    err = rel_err(out(model, ids, mask), ref, mask)
    rep = fastllm.patch_report(model)
    n = len(swapped(model))
    print(f"{kind} {mode}: relative logit error {err:.4f} (bound {BOUND[mode]}), {n} layers, "
          f"{rep.bytes_saved} bytes saved")
    assert err <= BOUND[mode], f"{kind} {mode}: relative logit error {err:.4f} > {BOUND[mode]}"
    assert err > 0                                                   # it really is quantized
    assert n >= 6 and len([m for m in rep.replaced if "Int8Linear" in m.detail]) == n
    assert rep.bytes_saved > 0 and all(m.bytes_saved > 0 for m in rep.replaced if "Int8Linear" in m.detail)
    ops = {o.op: o.selected for o in rep.ops}
    # The ops the layers really call (regression: the report named int8_matmul for w8a8 modes).
    assert ops.get({"w8a16": "w8a16_matmul", "w8a8": "int8_matmul_dynamic",
                    "w8a8-static": "int8_matmul_static"}[mode]) == "torch"
    if kind != "bert":
        assert ops.get("decode_attention") == "torch"
    if kind != "bert":
        assert any(m.name == "lm_head" and m.action == "left" for m in rep.modules)
        assert "lm_head" not in swapped(model)


def test_sizes_not_multiple_of_16_are_reported_skipped():
    model = build("qwen3")     # head_dim 24, 1 kv head: k_proj / v_proj are 64 -> 24
    fastllm.patch(model, quantize="w8a8", backend="torch")
    rep = fastllm.patch_report(model)
    sk = {m.name: m.detail for m in rep.skipped}
    assert set(sk) == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("k_proj", "v_proj")}
    assert all("multiples of 16" in d for d in sk.values())
    assert type(model.model.layers[0].self_attn.k_proj) is torch.nn.Linear


# ----------------------------------------------------------------------------------------------
# SmoothQuant and static calibration.

def _inject_outliers(model, channels=(3, 17, 40), factor=40.0):
    """Same float function, but a few hidden channels 40x larger at the norms' outputs (as in
    trained LLMs): the norm weight is scaled up and the consuming columns down."""
    with torch.no_grad():
        for layer in model.model.layers:
            for norm, lins in ((layer.input_layernorm, ("q_proj", "k_proj", "v_proj")),
                               (layer.post_attention_layernorm, ("gate_proj", "up_proj"))):
                norm.weight[list(channels)] *= factor
                parent = layer.self_attn if lins[0] == "q_proj" else layer.mlp
                for n in lins:
                    getattr(parent, n).weight[:, list(channels)] /= factor


def test_smoothquant_folds_into_norms_and_fixes_outliers():
    model = build("llama", layers=3)
    _inject_outliers(model)
    ids, mask = batch()
    ref = out(model, ids, mask)
    errs = {}
    for alpha in (None, 0.5):
        kw = {"calibration": calib(), "smooth_alpha": alpha} if alpha else {}
        fastllm.patch(model, quantize="w8a8", backend="torch", keep_original=True, **kw)
        errs[alpha] = rel_err(out(model, ids, mask), ref, mask)
        st = model._fastllm_patch
        if alpha:
            # q/k/v and gate/up are folded into the 2 norms of each layer; o_proj and down_proj
            # (inputs from attention / the activation, no norm) keep 1/s inside the layer.
            assert sorted(f.name for f in st.folds) == sorted(
                f"model.layers.{i}.{n}" for i in range(3) for n in ("input_layernorm", "post_attention_layernorm"))
            smooth_inside = {n for n, m in model.named_modules() if isinstance(m, Int8Linear) and m.smooth is not None}
            assert smooth_inside == {f"model.layers.{i}.{p}" for i in range(3)
                                     for p in ("self_attn.o_proj", "mlp.down_proj")}
            assert "SmoothQuant" in str(fastllm.patch_report(model))
        fastllm.unpatch(model)
    print(f"w8a8 with outlier channels: error {errs[None]:.4f} plain, {errs[0.5]:.4f} with SmoothQuant")
    assert errs[0.5] < 0.5 * errs[None]
    assert errs[0.5] <= BOUND["w8a8"]


def test_a_folded_layer_that_cannot_be_swapped_refuses_the_patch(monkeypatch):
    # SmoothQuant plans to divide a norm by s and multiply its linears by s. If one of those
    # linears then fails to build, keeping it in float under the divided norm would silently
    # compute something else: the patch must refuse and leave the model as it was.
    model = build("llama", layers=2)
    ids, mask = batch()
    before = out(model, ids, mask)
    norm = model.model.layers[1].post_attention_layernorm.weight.clone()
    real = Int8Linear.from_linear.__func__

    def failing(cls, linear, *a, **kw):
        if linear.out_features == model.config.intermediate_size:   # gate_proj / up_proj
            raise ValueError("simulated failure")
        return real(cls, linear, *a, **kw)

    monkeypatch.setattr(Int8Linear, "from_linear", classmethod(failing))
    with pytest.raises(ValueError, match=r"mlp\.(gate|up)_proj cannot be swapped .*simulated failure.*SmoothQuant "
                                         r"was to fold .*Model left unchanged"):
        fastllm.patch(model, quantize="w8a8", backend="torch", calibration=calib(), smooth_alpha=0.5)
    assert not is_patched(model)
    assert torch.equal(model.model.layers[1].post_attention_layernorm.weight, norm)
    assert torch.equal(out(model, ids, mask), before)


@pytest.mark.parametrize("kind", ["gemma2", "bert"])
def test_smoothquant_not_folded_where_it_would_be_wrong(kind):
    """Gemma's norm is x * (1 + w) (probe a); BERT's LayerNorm output is also the residual
    stream (probe b): SmoothQuant stays inside the layers, and the result is still accurate."""
    model = build(kind)
    ids, mask = batch()
    ref = out(model, ids, mask)
    fastllm.patch(model, quantize="w8a8", calibration=calib(), smooth_alpha=0.5, backend="torch")
    assert model._fastllm_patch.folds == []
    assert all(m.smooth is not None for m in model.modules() if isinstance(m, Int8Linear))
    assert rel_err(out(model, ids, mask), ref, mask) <= BOUND["w8a8"]


def test_static_calibration_accepts_dicts_and_tuples():
    model = build("llama")
    ids, mask = batch()
    ref = out(model, ids, mask)
    cal = [{"input_ids": ids, "attention_mask": mask}, (torch.randint(3, VOCAB, (1, 9)),)]
    fastllm.patch(model, quantize="w8a8-static", calibration=iter(cal), backend="torch")   # a generator is fine
    scales = [m.act_scale.item() for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(scales) == 14 and all(s > 0 for s in scales)
    assert model._fastllm_patch.options["calibration"] == 2
    assert rel_err(out(model, ids, mask), ref, mask) <= BOUND["w8a8-static"]


@pytest.mark.parametrize("kw, exc, match", [
    ({"quantize": "w8a8-static"}, ValueError, "calibration"),
    ({"quantize": "w8a8", "smooth_alpha": 0.5}, ValueError, "calibration"),
    ({"quantize": "w8a8-static", "calibration": []}, ValueError, "empty"),
    ({"quantize": "w8a8-static", "calibration": iter(())}, ValueError, "empty"),
    ({"quantize": "w8a8-static", "calibration": torch.zeros(2, 3, dtype=torch.long)}, TypeError, r"\[batch\]"),
    ({"quantize": "w8a8-static", "calibration": [3]}, TypeError, "batch 0"),
    ({"quantize": "w8a8", "calibration": [torch.zeros(1, 3, dtype=torch.long)]}, ValueError, "nothing uses it"),
    ({"quantize": "int4"}, ValueError, "quantize"),
    ({"quantize": "w8a8", "smooth_alpha": 1.5, "calibration": calib(1)}, ValueError, "smooth_alpha"),
    ({"quantize": "w8a16", "smooth_alpha": 0.5, "calibration": calib(1)}, ValueError, "smooth_alpha"),
    ({"quantize": "w8a8", "group_size": 32}, ValueError, "group_size"),
    ({"quantize": "w8a16", "group_size": 24}, ValueError, "group_size"),
    ({"quantize": "w8a8", "keep_original": 1}, TypeError, "keep_original"),
    ({"quantize": "w8a8", "exclude": 5}, TypeError, "exclude"),
    ({"prune": "wanda"}, ValueError, "prune"),
    ({"sparsity": "1:4"}, ValueError, "sparsity"),
    ({"quantize": "w8a8", "backend": "cuda"}, BackendUnavailableError, "cuda"),
])
def test_bad_arguments_leave_model_untouched(kw, exc, match):
    model = build("llama")
    cfg, sd = model.config, state_snapshot(model)
    with pytest.raises(exc, match=match):
        fastllm.patch(model, **kw)
    assert_untouched(model, cfg, "sdpa", sd)
    assert all(type(m) is not Int8Linear for m in model.modules())


def test_failure_while_swapping_undoes_everything(monkeypatch):
    model = build("llama")
    cfg, sd = model.config, state_snapshot(model)
    modules = dict(model.named_modules())
    calls = []
    real_set = _linear._set

    def flaky_set(m, name, new):
        calls.append(name)
        if len(calls) == 5:
            raise RuntimeError("injected failure")
        real_set(m, name, new)
    monkeypatch.setattr(_linear, "_set", flaky_set)
    with pytest.raises(RuntimeError, match="injected"):
        fastllm.patch(model, quantize="w8a8", calibration=calib(1), smooth_alpha=0.5, skip_attention=1,
                      backend="torch")
    monkeypatch.setattr(_linear, "_set", real_set)
    assert_untouched(model, cfg, "sdpa", sd)
    assert all(dict(model.named_modules())[n] is m for n, m in modules.items())


# ----------------------------------------------------------------------------------------------
# include / exclude.

def test_include_exclude():
    model = build("llama")
    fastllm.patch(model, quantize="w8a16", include="*mlp*", exclude="*down_proj", backend="torch")
    assert sorted(swapped(model)) == [f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj")]
    why = {m.name: m.detail for m in fastllm.patch_report(model).modules if m.action == "left"}
    assert why["model.layers.0.mlp.down_proj"] == "matches exclude"
    assert why["model.layers.1.self_attn.q_proj"] == "not matched by include"
    assert why["lm_head"] == "not matched by include"


class BaseTunerLayer:
    """Stands in for peft.tuners.tuners_utils.BaseTunerLayer (fastllm tells it by class name)."""


class FakeLora(torch.nn.Module, BaseTunerLayer):
    def __init__(self, base, r=16):
        super().__init__()
        self.base_layer = base
        self.lora_A = torch.nn.Linear(base.in_features, r, bias=False)
        self.lora_B = torch.nn.Linear(r, base.out_features, bias=False)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


def test_linears_inside_peft_adapters_are_left_alone():
    # Regression: patch(peft_model.base_model.model, quantize=...) swapped the adapters' base
    # layers (and lora_A / lora_B); PEFT's merge writes base_layer.weight in place, which a
    # swapped layer's dequantized .weight drops: merge_and_unload() silently lost the LoRA.
    model = build("llama")
    attn = model.model.layers[0].self_attn
    attn.q_proj = FakeLora(attn.q_proj)
    fastllm.patch(model, quantize="w8a16", backend="torch")
    why = {m.name: m.detail for m in fastllm.patch_report(model).modules if m.action == "left"}
    for n in ("base_layer", "lora_A", "lora_B"):
        assert "inside PEFT adapter layer 'model.layers.0.self_attn.q_proj'" in why[f"model.layers.0.self_attn.q_proj.{n}"]
        assert type(getattr(attn.q_proj, n)) is torch.nn.Linear
    assert "model.layers.0.self_attn.k_proj" in swapped(model)


def test_quantize_and_sparsify_linears_leave_peft_adapters_alone():
    # The same hazard through the whole-model helpers: their report says why, the layers stay float.
    from fastllm.quant import quantize_linears
    from fastllm.sparse import sparsify_linears
    for convert, key in ((lambda m: quantize_linears(m, "w8a16"), "quantized"),
                         (lambda m: sparsify_linears(m, "magnitude"), "sparsified")):
        model = torch.nn.Sequential(FakeLora(torch.nn.Linear(64, 64)), torch.nn.Linear(64, 64))
        rep = convert(model)
        assert list(rep[key]) == ["1"]
        for n in ("0.base_layer", "0.lora_A", "0.lora_B"):
            assert "inside PEFT adapter layer '0'" in rep["skipped"][n]
        assert type(model[0].base_layer) is torch.nn.Linear


def test_moe_routers_left_alone_and_weight_readers_work():
    # MoE routers are excluded by default (HunYuan's gate reads `wg.weight.dtype`: every forward
    # raised AttributeError once wg was an Int8Linear). Code that reads `.weight` of a swapped
    # layer (MobileBERT's MLM head matmuls `dense.weight`) gets the dequantized weight.
    T = transformers
    model = T.HunYuanMoEV1ForCausalLM(T.HunYuanMoEV1Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_experts=16, moe_topk=2, pad_token_id=0)).eval()
    ids = torch.randint(3, VOCAB, (2, 7))
    fastllm.patch(model, quantize="w8a16", backend="torch")
    why = {m.name: m.detail for m in fastllm.patch_report(model).modules if m.action == "left"}
    assert "default" in why["model.layers.0.mlp.gate.wg"], why
    assert "model.layers.0.self_attn.q_proj" in swapped(model)
    with torch.no_grad():
        model(ids)
    model = T.MobileBertForMaskedLM(T.MobileBertConfig(
        vocab_size=VOCAB, hidden_size=64, embedding_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, intra_bottleneck_size=32, true_hidden_size=32, num_feedforward_networks=1,
        pad_token_id=0)).eval()
    with torch.no_grad():
        base = model(ids).logits
        fastllm.patch(model, quantize="w8a16", include="cls.*", backend="torch")
        assert "cls.predictions.dense" in swapped(model)
        assert (model(ids).logits - base).abs().max() < 0.05 * base.abs().max()


def test_output_heads_left_alone_by_default():
    # The vocabulary projection is left whatever it is called: RoBERTa's lm_head is a module
    # (lm_head.dense, lm_head.decoder), BERT's is cls.predictions.decoder (both were quantized).
    T = transformers
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                  max_position_embeddings=64, pad_token_id=0, tie_word_embeddings=False)
    roberta = T.RobertaForMaskedLM(T.RobertaConfig(**common)).eval()
    fastllm.patch(roberta, quantize="w8a16", backend="torch")
    assert not [n for n in swapped(roberta) if n.startswith("lm_head")] and swapped(roberta)
    bert = T.BertForMaskedLM(T.BertConfig(**common)).eval()
    fastllm.patch(bert, quantize="w8a16", backend="torch")
    why = {m.name: m.detail for m in fastllm.patch_report(bert).modules if m.action == "left"}
    assert "cls.predictions.decoder" not in swapped(bert) and "default" in why["cls.predictions.decoder"]
    bert = T.BertForMaskedLM(T.BertConfig(**common)).eval()
    fastllm.patch(bert, quantize="w8a16", include="cls.predictions.decoder", backend="torch")
    assert list(swapped(bert)) == ["cls.predictions.decoder"]


def test_include_names_lm_head_explicitly():
    model = build("llama")
    fastllm.patch(model, quantize="w8a8", include=["lm_head", "*.o_proj"], backend="torch")
    assert sorted(swapped(model)) == ["lm_head"] + [f"model.layers.{i}.self_attn.o_proj" for i in range(2)]
    tied = build("gemma2")     # tie_word_embeddings: lm_head shares the embedding matrix
    with pytest.warns(UserWarning, match="quantize='w8a8' swapped no layer"):
        fastllm.patch(tied, quantize="w8a8", include="lm_head", backend="torch")
    assert swapped(tied) == {}
    assert "quantize='w8a8' swapped no layer" in str(fastllm.patch_report(tied))
    assert any(m.name == "lm_head" and "tied" in m.detail for m in fastllm.patch_report(tied).modules)


def test_failure_while_reporting_rolls_back(monkeypatch):
    # patch() warns when quantize= swapped nothing. With warnings as errors (-W error) that
    # raised after the model was changed, before its patch state was set: attention stayed on
    # fastllm's private config and unpatch said "not patched". Anything raising there (the
    # warning, or the report itself after swaps) now undoes the whole patch.
    import warnings

    from fastllm.patch import core
    model = build("llama")
    cfg, sd = model.config, state_snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="swapped no layer"):
            fastllm.patch(model, quantize="w8a16", include="nothing*", backend="torch")
    assert_untouched(model, cfg, "sdpa", sd)

    def broken(*a, **k):
        raise RuntimeError("report failed")
    monkeypatch.setattr(core, "_build_report", broken)
    modules = dict(model.named_modules())
    with pytest.raises(RuntimeError, match="report failed"):
        fastllm.patch(model, quantize="w8a8-static", calibration=calib(), smooth_alpha=0.5, backend="torch")
    assert_untouched(model, cfg, "sdpa", sd)
    assert all(dict(model.named_modules())[n] is m for n, m in modules.items())


# ----------------------------------------------------------------------------------------------
# keep_original / unpatch, idempotence.

def test_keep_original_round_trip_is_bit_identical():
    model = build("qwen2", layers=3)
    cfg, sd = model.config, state_snapshot(model)
    modules = dict(model.named_modules())
    ids, mask = batch()
    before = out(model, ids, mask)
    fastllm.patch(model, quantize="w8a8-static", calibration=calib(), smooth_alpha=0.5, keep_original=True,
                  skip_attention=1, backend="torch")
    assert model._fastllm_patch.folds                                # norm weights were changed too
    assert not torch.equal(out(model, ids, mask), before)
    fastllm.unpatch(model)
    assert_untouched(model, cfg, "sdpa", sd)
    assert all(dict(model.named_modules())[n] is m for n, m in modules.items())
    assert torch.equal(out(model, ids, mask), before)


def test_unpatch_after_the_model_changed_dtype():
    # Regression: the kept fp32 originals went back into a model converted to bf16 after patch
    # (mixed dtypes: every later forward raised). They follow the model's dtype / device now.
    model = build("qwen2")
    want = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    fastllm.patch(model, quantize="w8a8-static", calibration=calib(), smooth_alpha=0.5, keep_original=True,
                  backend="torch")
    assert model._fastllm_patch.folds
    model.to(torch.bfloat16)
    fastllm.unpatch(model)
    sd = model.state_dict()
    assert sd.keys() == want.keys() and all(torch.equal(sd[k], want[k]) for k in want)
    ids, mask = batch()
    out(model, ids, mask)


def test_unpatch_without_keep_original_raises_and_stays_patched():
    model = build("llama")
    ids, mask = batch()
    fastllm.patch(model, quantize="w8a16", backend="torch")
    patched = out(model, ids, mask)
    with pytest.raises(OriginalsDiscardedError, match="gone.*keep_original=True"):
        fastllm.unpatch(model)
    assert is_patched(model) and model.config._attn_implementation == "fastllm_torch"
    assert torch.equal(out(model, ids, mask), patched)
    assert all(m.old is None for m in model._fastllm_patch.swaps)   # memory really released


def test_patch_twice_with_quantize():
    model = build("llama")
    fastllm.patch(model, quantize="w8a8", backend="torch")
    layers = swapped(model)
    assert fastllm.patch(model, quantize="w8a8", backend="torch") is model
    assert swapped(model) == layers
    with pytest.raises(FastllmError, match="already patched"):
        fastllm.patch(model, quantize="w8a16", backend="torch")


def test_quantize_without_fastllm_attention():
    model = build("llama")
    fastllm.patch(model, attention=False, quantize="w8a8", backend="torch", keep_original=True)
    assert model.config._attn_implementation == "sdpa" and len(swapped(model)) == 14
    assert [o.op for o in fastllm.patch_report(model).ops] == ["int8_matmul_dynamic"]
    fastllm.unpatch(model)


# ----------------------------------------------------------------------------------------------
# generate, save / load.

def assert_same_tokens_until_int8_tie(ref_tokens, ref_logits, tokens, what, tie=0.05):
    """Token-identical, except from a step where the unpatched model's two tokens were closer
    than `tie` x max |logit| (int8 moves logits by ~1-2% of their range)."""
    for b in range(ref_tokens.shape[0]):
        for t in range(ref_tokens.shape[1]):
            a, c = ref_tokens[b, t].item(), tokens[b, t].item()
            if a != c:
                lg = ref_logits[b, t]
                gap = (lg[a] - lg[c]).abs().item()
                assert gap <= tie * lg.abs().max().item(), f"{what}: row {b} step {t}: gap {gap:.3g} is no tie"
                break


@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_after_quantize(mode, cache):
    model = build("mistral")
    ids, mask = batch()
    kw = {"cache_implementation": "static"} if cache == "static" else {}
    ref_tokens, ref_logits = greedy(model, ids, mask, **kw)
    fastllm.patch(model, quantize=mode, backend="torch")
    tokens, logits = greedy(model, ids, mask, **kw)
    assert tokens.shape == (3, 6) and torch.isfinite(logits).all()
    # The first generated step is the prompt's last position of a plain forward pass.
    assert torch.allclose(logits[:, 0], out(model, ids, mask)[:, -1], rtol=1e-5, atol=1e-5)
    assert_same_tokens_until_int8_tie(ref_tokens, ref_logits, tokens, f"{mode} {cache}")


@pytest.mark.parametrize("mode, extra", [("w8a8-static", {"smooth_alpha": 0.5}), ("w8a16", {"group_size": 32}),
                                         ("w8a8", {"skip_attention": 1})])
def test_save_load_identical_outputs(tmp_path, mode, extra):
    model = build("llama")
    ids, mask = batch()
    cal = {"calibration": calib()} if mode == "w8a8-static" else {}
    fastllm.patch(model, quantize=mode, backend="torch", **cal, **extra)
    expected = out(model, ids, mask)
    fastllm.save_pretrained(model, tmp_path)
    assert (tmp_path / "fastllm_config.json").exists() and (tmp_path / "model.fastllm.safetensors").exists()
    loaded = fastllm.from_pretrained(tmp_path)           # no calibration data
    assert is_patched(loaded) and swapped(loaded) == swapped(model)
    assert torch.equal(out(loaded, ids, mask), expected)
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    rep, rep2 = fastllm.patch_report(model), fastllm.patch_report(loaded)
    assert all("loaded from" in m.detail for m in rep2.replaced if "Int8" in m.detail)
    # Regression: the reloaded report said 0 bytes saved and lost the int8 ops.
    assert rep2.bytes_saved == rep.bytes_saved > 0
    assert [(o.op, o.selected) for o in rep2.ops] == [(o.op, o.selected) for o in rep.ops]
    tokens, _ = greedy(loaded, ids, mask, n=3)
    assert torch.equal(tokens, greedy(model, ids, mask, n=3)[0])
    with pytest.raises(OriginalsDiscardedError):
        fastllm.unpatch(loaded)
    with pytest.raises(ValueError, match="patch_overrides"):
        fastllm.from_pretrained(tmp_path, patch_overrides={"quantize": "w8a16"})


# ----------------------------------------------------------------------------------------------
# Triton (interpreter) int8 kernels inside a model: tiny on purpose.

@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
def test_triton_backend_int8(mode):
    why = _triton_attention_available()
    if why:
        pytest.skip(f"Triton unavailable here: {why}")
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, pad_token_id=0)
    cfg = transformers.LlamaConfig(**common)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids, mask = torch.randint(3, 64, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0
    ref = out(model, ids, mask)
    twin = copy.deepcopy(model)
    fastllm.patch(twin, quantize=mode, backend="torch")
    fastllm.patch(model, quantize=mode, backend="triton")
    assert {o.op: o.selected for o in fastllm.patch_report(model).ops}["flash_attention"] == "triton"
    got, want = out(model, ids, mask), out(twin, ids, mask)
    # Same int8 weights and int32 products; only fp32 summation order / rounding differ.
    assert (got - want)[mask.bool()].abs().max() <= 1e-4 * want.abs().max()
    assert rel_err(got, ref, mask) <= BOUND[mode]


# ----------------------------------------------------------------------------------------------
# 2:4 sparsity (fastllm.nn.Sparse24Linear).

SPARSE = sparse24_class()


@pytest.mark.parametrize("kw", [{"prune": "magnitude"}, {"prune": "wanda", "calibration": "cal"},
                                {"quantize": "w8a8"}])
def test_sparsity_24(tmp_path, kw):
    kw = {k: (calib() if v == "cal" else v) for k, v in kw.items()}
    model = build("llama")
    cfg, sd = model.config, state_snapshot(model)
    ids, mask = batch()
    ref = out(model, ids, mask)
    fastllm.patch(model, sparsity="2:4", backend="torch", keep_original=True, **kw)
    layers = [m for m in model.modules() if isinstance(m, SPARSE)]
    assert len(layers) == 14 and type(model.lm_head) is torch.nn.Linear
    got = out(model, ids, mask)
    err = rel_err(got, ref, mask)
    rep = fastllm.patch_report(model)
    print(f"2:4 {kw}: relative logit error {err:.3f}, {rep.bytes_saved} bytes saved")
    # Half the weights are gone: random weights give no redundancy; this only bounds blow-ups.
    assert torch.isfinite(got).all() and 0 < err < 1.5
    greedy(model, ids, mask, n=3)
    fastllm.save_pretrained(model, tmp_path)
    loaded = fastllm.from_pretrained(tmp_path)
    assert torch.equal(out(loaded, ids, mask), got)
    fastllm.unpatch(model)
    assert_untouched(model, cfg, "sdpa", sd)
    assert torch.equal(out(model, ids, mask), ref)


def test_wanda_needs_calibration():
    with pytest.raises(ValueError, match="calibration"):
        fastllm.patch(build("llama"), sparsity="2:4", prune="wanda")
    with pytest.raises(ValueError, match="quantize='w8a8' only"):
        fastllm.patch(build("llama"), sparsity="2:4", quantize="w8a16")


@pytest.mark.parametrize("kw", [{"prune": "wanda"}, {"quantize": "w8a8"}])
def test_sparsity_wiring(monkeypatch, tmp_path, kw):
    """What patch hands Sparse24Linear.from_linear: the prune method, the int8 flag and, for
    Wanda, the per-input-channel L2 norm of the layer's inputs over all calibration tokens."""
    calls, real = [], SPARSE.from_linear.__func__

    def spy(cls, linear, prune=None, act_norm=None, int8=False, backend="auto"):
        calls.append(dict(prune=prune, act_norm=act_norm, int8=int8, backend=backend))
        return real(cls, linear, prune=prune, act_norm=act_norm, int8=int8, backend=backend)

    monkeypatch.setattr(SPARSE, "from_linear", classmethod(spy))
    model = build("llama")
    cfg, sd = model.config, state_snapshot(model)
    ids, mask = batch()
    ref = out(model, ids, mask)
    cal = calib() if kw.get("prune") == "wanda" else None
    norms = {}
    if cal:   # the Wanda statistic, independently
        h = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(
            lambda m, a: norms.__setitem__("s", norms.get("s", 0) + a[0].reshape(-1, a[0].shape[-1]).pow(2).sum(0)))
        for b in cal:
            out(model, b)
        h.remove()
    fastllm.patch(model, sparsity="2:4", backend="torch", keep_original=True, calibration=cal, **kw)
    assert len(calls) == 14 and type(model.lm_head) is torch.nn.Linear
    assert all(c["prune"] == kw.get("prune", "magnitude") and c["int8"] == ("quantize" in kw) for c in calls)
    if cal:
        assert torch.allclose(calls[-1]["act_norm"], norms["s"].sqrt(), rtol=1e-5)
    rep = fastllm.patch_report(model)
    assert len([m for m in rep.replaced if "Sparse24Linear" in m.detail]) == 14
    assert not torch.equal(out(model, ids, mask), ref)
    fastllm.unpatch(model)
    assert_untouched(model, cfg, "sdpa", sd)


# ----------------------------------------------------------------------------------------------
# GPU: bf16 with the native backends.

def _gpu_llama():
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()


@pytest.mark.gpu
def test_gpu_bf16_exact_attention_cuda_backend():
    model = _gpu_llama()
    ids = torch.randint(3, 512, (3, 61), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :9] = 0
    ref = out(model, ids, mask)
    ref_tokens, ref_logits = greedy(model, ids, mask, n=8)
    ref_static, ref_static_logits = greedy(model, ids, mask, n=8, cache_implementation="static")
    fastllm.patch(model, backend="cuda")
    got = out(model, ids, mask)
    v = mask.bool()
    # bf16 logits: attention rounding differs from SDPA's by a few bf16 ulps of the logits.
    assert (got - ref)[v].abs().max() <= 0.05 * ref[v].abs().max()
    # A tie within that same bound is a tie (1e-4, the fp32 default, is below one bf16 ulp).
    tokens, _ = greedy(model, ids, mask, n=8)
    assert_same_tokens(ref_tokens, ref_logits, tokens, "cuda bf16 dynamic", tie=0.05)
    tokens, _ = greedy(model, ids, mask, n=8, cache_implementation="static")
    assert_same_tokens(ref_static, ref_static_logits, tokens, "cuda bf16 static", tie=0.05)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", list(BOUND))
def test_gpu_bf16_int8(mode):
    model = _gpu_llama()
    ids = torch.randint(3, 512, (2, 33), device="cuda")
    mask = torch.ones_like(ids)
    ref = out(model, ids, mask)
    cal = {"calibration": [torch.randint(3, 512, (2, 64), device="cuda")]} if mode == "w8a8-static" else {}
    fastllm.patch(model, quantize=mode, **cal)           # auto: cuda / triton per op
    err = rel_err(out(model, ids, mask), ref, mask)
    ops = [(o.op, o.selected) for o in fastllm.patch_report(model).ops]
    print(f"cuda bf16 {mode}: relative logit error {err:.4f}; ops {ops}")
    assert err <= BOUND[mode] + 0.02     # + bf16 activation rounding
    tokens, logits = greedy(model, ids, mask, n=4, cache_implementation="static")
    assert torch.isfinite(logits).all()


# ----------------------------------------------------------------------------------------------
# The `model` benchmark suite: CPU smoke run.

def test_demo_quantize(capsys):
    from fastllm import demo
    demo.main(["--tokens", "2", "--batch", "2", "--prompt-len", "8", "--quantize", "w8a8-static", "--size", "small"])
    text = capsys.readouterr().out
    assert "quantize='w8a8-static'" in text and "MiB saved" in text and "relative error" in text


def test_model_bench_cpu_smoke():
    """The suite's CPU path (tiny config, fp32) with a light timer; `python -m fastllm.bench model`
    adds only the shared harness (peaks, tables) around it."""
    import types

    from fastllm.bench import report
    from fastllm.bench.suites import model as suite
    from fastllm.bench.timing import Timer
    ctx = types.SimpleNamespace(device=torch.device("cpu"), quick=True, dtypes=[torch.float32], shapes=None,
                                timer=Timer("cpu", warmup=1, reps=2), missing=[],
                                progress=lambda items, desc: items, presets=None, rows=list)
    rows = suite.run(ctx)
    modes = {r["mode"] for r in rows}
    assert {"unpatched", "exact", "w8a16", "w8a8", "skip_attention"} <= modes
    assert all(r["tokens/s"] > 0 for r in rows), [r for r in rows if not r["tokens/s"]]
    assert {r["phase"] for r in rows} == {"prefill", "decode"}
    exact = [r for r in rows if r["mode"] == "exact"]
    assert exact[0]["ok"] == "yes" and exact[0]["rel_err"] <= 1e-4
    assert all(r["ok"] == "yes" for r in rows if r["mode"] in ("w8a16", "w8a8"))
    assert [r for r in rows if r["mode"] == "w8a8"][0]["weights_MiB"] < exact[0]["weights_MiB"]
    assert {"2:4", "2:4+int8"} <= modes and not ctx.missing
    assert "tokens/s" in report.markdown(rows, suite.COLUMNS)


@pytest.mark.parametrize("kw, bound", [(dict(quantize="w8a16"), 0.03), (dict(quantize="w8a8"), 0.04),
                                       (dict(quantize="w8a8-static", smooth_alpha=0.5), 0.1)])
def test_gpt2_conv1d_layers(kw, bound):
    # GPT-2's projections are transformers Conv1D (y = x @ W + b, W stored (in, out)): quantize=
    # used to swap nothing there. They are swapped through an nn.Linear view of the weight
    # (SmoothQuant folds into ln_1 / ln_2 too), and unpatch restores the Conv1D bit for bit.
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2)).eval()
    ids, mask = batch()
    base, sd = out(model, ids, mask), {k: v.clone() for k, v in model.state_dict().items()}
    cal = {"calibration": calib()} if "smooth_alpha" in kw else {}
    fastllm.patch(model, backend="torch", keep_original=True, **kw, **cal)
    assert sorted(n for n in swapped(model) if n.startswith("transformer.h.0.")) == [
        "transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj"]
    assert rel_err(out(model, ids, mask), base, mask.bool()) < bound
    if cal:
        assert any("folded into 4 norm(s)" in n for n in fastllm.patch_report(model).notes)
    fastllm.unpatch(model)
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    after = model.state_dict()
    assert after.keys() == sd.keys() and all(torch.equal(after[k], v) for k, v in sd.items())


def test_weights_no_rule_swaps_are_reported():
    # Fused 3-D expert weights are not linears: the report lists them as kept in float.
    model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)).eval()
    fastllm.patch(model, quantize="w8a16", backend="torch")
    left = {m.name: m.detail for m in fastllm.patch_report(model).modules if m.action == "left"}
    experts = next(n for n in left if n.endswith("mlp.experts"))
    assert "not an nn.Linear" in left[experts] and "(4, " in left[experts]
