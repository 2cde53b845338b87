"""fastllm.save_pretrained / from_pretrained and the life of a patched model outside one
process: what a reload must reproduce (outputs, report, dtypes), what it must refuse (tampered
files, unchecked overrides), stale files, pickling, and unpatch on mixed-precision models.

Tiny random Llama from tests/test_patch.py (CPU, torch backend)."""
import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastllm  # noqa: E402

from test_patch import batch, build, out  # noqa: E402
from test_patch_quant import calib  # noqa: E402


def _report_lines(model):
    rep = fastllm.patch_report(model)
    # "loaded from <dir>" replaces the patch-time detail of swapped layers; the rest must match.
    return ([(m.name, m.action, m.detail if "loaded from" not in m.detail else "swap", m.bytes_saved)
             for m in rep.modules], rep.notes)


def test_reload_keeps_the_whole_report(tmp_path):
    # Regression: the reloaded report lost the SmoothQuant-folded norms, the linears left in
    # float (lm_head) and the planning notes.
    model = build("llama")
    fastllm.patch(model, quantize="w8a8-static", calibration=calib(), smooth_alpha=0.5, backend="torch")
    fastllm.save_pretrained(model, tmp_path)
    loaded = fastllm.from_pretrained(tmp_path)
    (mods, notes), (mods2, notes2) = _report_lines(model), _report_lines(loaded)
    key = lambda rows: sorted((n, a, b) for n, a, _, b in rows)  # noqa: E731
    assert key(mods2) == key(mods)
    folds = [r for r in mods if "folded into its weight" in r[2]]
    assert folds and [r for r in mods2 if "folded into its weight" in r[2]] == folds
    assert any(n == "lm_head" and a == "left" for n, a, _, _ in mods2)
    assert notes2 == notes
    # ... and a reloaded model saved again carries them on.
    fastllm.save_pretrained(loaded, tmp_path / "again")
    assert key(_report_lines(fastllm.from_pretrained(tmp_path / "again"))[0]) == key(mods)


def test_auto_model_class_reloads_a_quantized_checkpoint(tmp_path):
    # model_class=AutoModelForCausalLM worked for plain checkpoints and raised AttributeError
    # (_from_config) for quantized ones; it now resolves to the concrete class.
    model = build("llama")
    ids, mask = batch()
    fastllm.patch(model, quantize="w8a16", backend="torch")
    fastllm.save_pretrained(model, tmp_path)
    loaded = fastllm.from_pretrained(tmp_path, model_class=transformers.AutoModelForCausalLM)
    assert type(loaded) is type(model) and torch.equal(out(loaded, ids, mask), out(model, ids, mask))
    with pytest.raises(ValueError, match="AutoModelForImageClassification has no model for LlamaConfig"):
        fastllm.from_pretrained(tmp_path, model_class=transformers.AutoModelForImageClassification)


def test_swap_options_that_swapped_nothing_reload_without_calibration(tmp_path):
    # Regression: w8a8-static / smooth_alpha / wanda matching no layer saved a plain checkpoint
    # that from_pretrained could not reload (it asked for calibration data).
    model = build("llama")
    ids, mask = batch()
    fastllm.patch(model, quantize="w8a8-static", calibration=calib(), smooth_alpha=0.5, include=["nothing*"],
                  backend="torch")
    assert not model._fastllm_patch.swaps
    fastllm.save_pretrained(model, tmp_path)
    saved = json.loads((tmp_path / "fastllm_config.json").read_text())
    assert saved["patch"]["quantize"] is None and saved["unswapped"]["quantize"] == "w8a8-static"
    loaded = fastllm.from_pretrained(tmp_path)
    assert torch.equal(out(loaded, ids, mask), out(model, ids, mask))


def test_save_removes_the_other_formats_weights(tmp_path):
    # Regression: a quantized save into a directory holding a float checkpoint left
    # model.safetensors there, which transformers then loaded silently as the old model.
    model = build("llama")
    model.save_pretrained(tmp_path)
    fastllm.patch(model, quantize="w8a16", backend="torch")
    fastllm.save_pretrained(model, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
    with pytest.raises(OSError):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    plain = build("llama")
    fastllm.patch(plain, backend="torch")
    fastllm.save_pretrained(plain, tmp_path)            # attention-only over the quantized save
    assert not (tmp_path / "model.fastllm.safetensors").exists()
    assert "layers" not in json.loads((tmp_path / "fastllm_config.json").read_text())
    ids, mask = batch()
    assert torch.equal(out(fastllm.from_pretrained(tmp_path), ids, mask), out(plain, ids, mask))


def _quantized_save(tmp_path, **kw):
    model = build("llama")
    fastllm.patch(model, quantize="w8a8", backend="torch", **kw)
    fastllm.save_pretrained(model, tmp_path)
    return model


def test_tampered_dtype_is_refused(tmp_path):
    # Regression: load_state_dict cast silently (int16 values wrapped into other int8 weights).
    from safetensors.torch import load_file, save_file
    _quantized_save(tmp_path)
    path = tmp_path / "model.fastllm.safetensors"
    state = load_file(path)
    name = next(k for k in state if k.endswith("weight_int8"))
    state[name] = state[name].to(torch.int16) * 2
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"'{name}' is stored as I16"):
        fastllm.from_pretrained(tmp_path)


def test_dtype_override(tmp_path):
    model = _quantized_save(tmp_path)
    ids, mask = batch()
    assert torch.equal(out(fastllm.from_pretrained(tmp_path, dtype="auto"), ids, mask), out(model, ids, mask))
    bf = fastllm.from_pretrained(tmp_path, dtype="bfloat16")
    q = bf.model.layers[0].self_attn.q_proj
    # Regression: the bias stayed in the saved float32 inside a bf16 model.
    assert bf.model.embed_tokens.weight.dtype == torch.bfloat16
    assert q.bias is None or q.bias.dtype == torch.bfloat16
    assert torch.isfinite(out(bf, ids, mask)).all()
    with pytest.raises(TypeError, match="'dtype'"):
        fastllm.from_pretrained(tmp_path, dtype="not_a_dtype")


def test_overrides_are_checked(tmp_path):
    # Regression: overrides of a quantized checkpoint skipped patch()'s checks
    # ({"attention": "no"} turned attention on).
    _quantized_save(tmp_path)
    with pytest.raises(TypeError, match="'attention' must be a bool"):
        fastllm.from_pretrained(tmp_path, patch_overrides={"attention": "no"})
    with pytest.raises(TypeError, match="'skip_attention'"):
        fastllm.from_pretrained(tmp_path, patch_overrides={"skip_attention": True})
    with pytest.raises(TypeError, match="'patch_overrides' must be a dict"):
        fastllm.from_pretrained(tmp_path, patch_overrides=["attention"])


@pytest.mark.parametrize("drop", ["dtype", "weights", "patch.backend", "layer.mode"])
def test_missing_config_keys_are_named(tmp_path, drop):
    # Regression: a bare KeyError('dtype') with no file name.
    _quantized_save(tmp_path)
    path = tmp_path / "fastllm_config.json"
    saved = json.loads(path.read_text())
    if drop == "patch.backend":
        del saved["patch"]["backend"]
    elif drop == "layer.mode":
        del next(iter(saved["layers"].values()))["mode"]
    else:
        del saved[drop]
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=f"fastllm_config.json.*{drop.split('.')[-1]}"):
        fastllm.from_pretrained(tmp_path)


def test_swapped_save_takes_no_transformers_kwargs(tmp_path):
    model = build("llama")
    fastllm.patch(model, quantize="w8a16", backend="torch")
    with pytest.raises(TypeError, match="max_shard_size"):
        fastllm.save_pretrained(model, tmp_path, max_shard_size="1MB")
    assert not (tmp_path / "fastllm_config.json").exists()


def test_transformers_save_of_a_swapped_model_is_refused(tmp_path):
    # Regression: model.save_pretrained wrote weight_int8 / weight_scale keys that transformers'
    # from_pretrained reported as unexpected, initialising those layers at random: a different model.
    import copy
    import pickle
    from fastllm.patch import CheckpointFormatError
    model = build("llama")
    fastllm.patch(model, quantize="w8a16", keep_original=True, backend="torch")
    for m in (model, copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        with pytest.raises(CheckpointFormatError, match="fastllm.save_pretrained"):
            m.save_pretrained(tmp_path / "hf", safe_serialization=True)
        assert m.save_pretrained.model is m   # a copy's guard names the copy
    assert not (tmp_path / "hf").exists()
    fastllm.save_pretrained(model, tmp_path / "ours")
    with pytest.raises(CheckpointFormatError):
        fastllm.from_pretrained(tmp_path / "ours").save_pretrained(tmp_path / "hf")
    ids, mask = batch()
    fastllm.unpatch(model)   # the originals are back: transformers' checkpoint is right again
    model.save_pretrained(tmp_path / "hf")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert torch.equal(out(reloaded, ids, mask), out(model, ids, mask))
    fastllm.patch(model, backend="torch")   # attention only: the state dict is the model's own
    model.save_pretrained(tmp_path / "plain")
    assert (tmp_path / "plain" / "model.safetensors").exists()


def test_pickled_patched_model_runs_in_a_fresh_process(tmp_path):
    # Regression: torch.load in a new process gave "'fastllm' is not a valid attention
    # implementation": nothing registered fastllm's attention function on unpickling.
    model = build("llama")
    fastllm.patch(model, backend="torch")
    ids, mask = batch()
    torch.save((model, ids, mask, out(model, ids, mask)), tmp_path / "m.pt")
    code = ("import torch\n"
            f"m, ids, mask, ref = torch.load({str(tmp_path / 'm.pt')!r}, weights_only=False)\n"
            "with torch.no_grad():\n"
            "    got = m(ids, attention_mask=mask).logits.float()\n"
            "assert torch.equal(got, ref), 'outputs differ'\n"
            "print('ok', m.config._attn_implementation)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok fastllm" in r.stdout, r.stderr[-2000:]


def test_unpatch_restores_mixed_precision_bit_for_bit():
    # Regression: unpatch cast every kept original to the first float parameter's dtype: a
    # bf16 model with an fp32 lm_head got a rounded bf16 lm_head back (fp32 embeddings: every
    # restored linear became fp32 and the next forward failed).
    model = build("llama")
    model.model.to(torch.bfloat16)                      # body bf16, lm_head fp32
    model.lm_head.register_forward_pre_hook(lambda mod, a: (a[0].to(mod.weight.dtype),))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fastllm.patch(model, quantize="w8a16", include=["lm_head", "model.*"], keep_original=True, backend="torch")
    fastllm.unpatch(model)
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    # A dtype change after patch still reaches the originals (as if they had stayed in the model).
    fastllm.patch(model, quantize="w8a16", keep_original=True, backend="torch")
    model.float()
    fastllm.unpatch(model)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
