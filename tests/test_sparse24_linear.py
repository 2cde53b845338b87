"""Sparse24Linear: from_linear (2:4 required / magnitude / Wanda / int8), forward vs the dense
layer of the same (pruned) weight, state_dict and safetensors save/load round trips."""
import pytest
import torch
from torch import nn

from fastllm import ref

from fastllm.nn import Sparse24Linear
from fastllm.sparse import (NotSparse24Error, collect_act_norms, decompress, load_sparse, prune_24, save_sparse,
                            sparsify_linears)

from conftest import DEVICE

BACKENDS = ["triton", "torch"] + (["cuda"] if DEVICE == "cuda" else [])


def linear(K, N, dtype=torch.float32, bias=True):
    lin = nn.Linear(K, N, bias=bias).to(device=DEVICE, dtype=dtype)
    return lin


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("backend", BACKENDS)
def test_from_linear_magnitude_forward(dtype, backend):
    lin = linear(192, 48, dtype)
    s = Sparse24Linear.from_linear(lin, prune="magnitude", backend=backend)
    w24, rep = prune_24(lin.weight.detach())
    assert torch.equal(s.dense_weight(), w24) and s.prune_report.norm_removed == rep.norm_removed
    x = torch.randn(2, 9, 192, device=DEVICE).to(dtype)
    y = s(x)
    want = nn.functional.linear(x.double(), w24.double(), lin.bias.double())
    assert y.shape == (2, 9, 48) and y.dtype == dtype
    tol = {torch.float16: 2e-2, torch.bfloat16: 1e-1, torch.float32: 1e-4}[dtype]
    torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol)


def test_from_linear_requires_24_unless_pruning():
    lin = linear(128, 32)
    with pytest.raises(NotSparse24Error, match=r"argument 'linear.weight' is not 2:4 sparse along K: row 0, group 0"):
        Sparse24Linear.from_linear(lin)
    with torch.no_grad():
        lin.weight.copy_(prune_24(lin.weight)[0])
    s = Sparse24Linear.from_linear(lin)               # already 2:4: compressed as is
    assert torch.equal(s.dense_weight(), lin.weight) and s.prune_report is None


def test_from_linear_bad_args():
    with pytest.raises(ValueError, match="in_features = 96 must be a positive multiple of 64"):
        Sparse24Linear.from_linear(linear(96, 32), prune="magnitude")
    with pytest.raises(ValueError, match="out_features = 24 must be a positive multiple of 16"):
        Sparse24Linear.from_linear(linear(128, 24), prune="magnitude")
    with pytest.raises(ValueError, match="prune='wanda' needs act_norm"):
        Sparse24Linear.from_linear(linear(128, 32), prune="wanda")
    with pytest.raises(ValueError, match="argument 'prune' must be None, 'magnitude' or 'wanda'"):
        Sparse24Linear.from_linear(linear(128, 32), prune="random")
    with pytest.raises(TypeError, match="argument 'linear' must be an nn.Linear"):
        Sparse24Linear.from_linear(nn.Conv1d(4, 4, 1))
    s = Sparse24Linear.from_linear(linear(128, 32), prune="magnitude")
    with pytest.raises(ValueError, match=r"input must have shape \(..., 128\)"):
        s(torch.randn(3, 127, device=DEVICE))


def test_wanda_and_int8():
    lin = linear(256, 32)
    x = torch.randn(64, 256, device=DEVICE)
    x[:, :4] *= 40
    norms = collect_act_norms(nn.Sequential(lin), [x])
    s = Sparse24Linear.from_linear(lin, prune="wanda", act_norm=norms["0"], backend="torch")
    assert s.prune_report.method == "wanda"
    q = Sparse24Linear.from_linear(lin, prune="wanda", act_norm=norms["0"], int8=True, backend="torch")
    assert q.values.dtype == torch.int8 and q.weight_scale.shape == (32,)
    # The int8 forward is exactly: per-token quantization, then the 2:4 int8 GEMM + epilogue.
    qx, sx = ref.quantize_per_token(x)
    want = ref.sparse24_int8_matmul(qx, q.values, q.meta, sx, q.weight_scale, q.bias, torch.float32)
    torch.testing.assert_close(q(x), want, rtol=0, atol=0)
    # And close to the 16-bit sparse layer on inputs without outliers (W8A8's own error).
    x = torch.randn(64, 256, device=DEVICE)
    assert (q(x) - s(x)).abs().max() <= 0.03 * s(x).abs().max()


@pytest.mark.parametrize("backend", ["torch", "triton"] + (["cuda"] if DEVICE == "cuda" else []))
def test_int8_column_major_input(backend):
    # Regression: the int8 layer handed a column-major input to quantize_per_token, whose
    # kernels need unit stride along K (a forced triton / cuda backend refused it).
    q = Sparse24Linear.from_linear(linear(64, 32), prune="magnitude", int8=True, backend=backend)
    x = torch.randn(64, 3, device=DEVICE).t()
    assert torch.equal(q(x), q(x.contiguous()))


def test_int8_model_bfloat16_keeps_fp32_scales():
    # Regression: .bfloat16() cast weight_scale to 16 bits and the int8 forward then failed.
    q = Sparse24Linear.from_linear(linear(128, 32), prune="magnitude", int8=True, backend="torch")
    scale = q.weight_scale.clone()
    q.bfloat16()
    assert q.weight_scale.dtype == torch.float32 and torch.equal(q.weight_scale, scale)
    assert q.values.dtype == torch.int8 and q.bias.dtype == torch.bfloat16
    x = torch.randn(3, 128, device=DEVICE, dtype=torch.bfloat16)
    assert q(x).dtype == torch.bfloat16


@pytest.mark.parametrize("int8", [False, True])
def test_save_load_roundtrip(tmp_path, int8):
    torch.manual_seed(torch.initial_seed() % 2 ** 31)

    def build():
        m = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 48, bias=False), nn.Linear(48, 16))
        return m.to(device=DEVICE, dtype=torch.float16 if not int8 else torch.float32)

    model = build()
    rep = sparsify_linears(model, "magnitude", int8=int8, backend="torch")
    assert set(rep["sparsified"]) == {"0", "2"} and "3" in rep["skipped"]      # 48 % 64 != 0
    x = torch.randn(5, 128, device=DEVICE).to(model[0].values.dtype if not int8 else torch.float32)
    y = model(x)
    sd = model.state_dict()
    assert sd["0.metadata"].dtype == torch.int32 and sd["0.values"].shape == (64, 64)
    path = str(tmp_path / "m.safetensors")
    save_sparse(model, path)
    model2 = load_sparse(build(), path, backend="torch")
    assert isinstance(model2[0], Sparse24Linear) and isinstance(model2[2], Sparse24Linear)
    assert model2[0].int8 == int8 and not isinstance(model2[3], Sparse24Linear)
    for k, v in model.state_dict().items():
        assert torch.equal(model2.state_dict()[k], v), k
    assert torch.equal(model2(x), y)
    assert torch.equal(decompress(model2[0].values, model2[0].meta), decompress(model[0].values, model[0].meta))


def test_state_dicts_with_the_old_buffer_name_load(tmp_path):
    # The metadata buffer was `meta` before it became `metadata` (torch.export could not hold a
    # root module with a buffer of that name); files written then still load.
    from safetensors.torch import load_file, save_file
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32)).to(DEVICE)
    sparsify_linears(model, "magnitude", backend="torch")
    path = str(tmp_path / "m.safetensors")
    save_sparse(model, path)
    stored = load_file(path)
    old = {k.replace(".metadata", ".meta"): v for k, v in stored.items()}
    assert "0.meta" in old and "0.metadata" not in old
    save_file(old, path, metadata=_file_metadata(path))
    model2 = load_sparse(nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32)).to(DEVICE), path)
    for k, v in model.state_dict().items():
        assert torch.equal(model2.state_dict()[k], v), k
    fresh = Sparse24Linear(128, 64, dtype=torch.float32)
    fresh.load_state_dict({"values": old["0.values"], "meta": old["0.meta"], "bias": old["0.bias"]})   # strict
    assert torch.equal(fresh.metadata, model[0].metadata.cpu())


def _file_metadata(path):
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        return f.metadata()


@pytest.mark.parametrize("int8", [False, True])
def test_torch_export_of_the_bare_layer(int8):
    # Regression: with a buffer named `meta` the exported program's module() raised
    # KeyError "attribute 'meta' already exists" (GraphModule.meta).
    s = Sparse24Linear.from_linear(linear(128, 32), prune="magnitude", int8=int8, backend="torch")
    x = torch.randn(3, 128, device=DEVICE, dtype=s.bias.dtype if not int8 else torch.float32)
    ep = torch.export.export(s, (x,))
    assert torch.equal(ep.module()(x), s(x))


def test_load_errors(tmp_path):
    model = nn.Sequential(nn.Linear(128, 64)).to(DEVICE)
    sparsify_linears(model, "magnitude")
    path = str(tmp_path / "m.safetensors")
    save_sparse(model, path)
    with pytest.raises(ValueError, match="layer '0' is 128->32 in the model, 128->64 in the file"):
        load_sparse(nn.Sequential(nn.Linear(128, 32)), path)
    with pytest.raises(ValueError, match="has no Sparse24Linear layer"):
        save_sparse(nn.Sequential(nn.Linear(128, 64)), path)


def test_corrupted_metadata_is_refused_at_load(tmp_path):
    # The ops check metadata values on CPU only; a layer checks what it loads, on any device.
    model = nn.Sequential(nn.Linear(128, 64)).to(DEVICE)
    sparsify_linears(model, "magnitude")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["0.metadata"][0, 3] = 0x44444400
    before = model[0].metadata.clone()
    with pytest.raises(ValueError, match=r"0.metadata.*word \(0, 3\).*not an ordered 2-of-4"):
        model.load_state_dict(state)
    assert torch.equal(model[0].metadata, before)


def test_failed_loads_leave_the_model_unchanged(tmp_path):
    # Regression: the layers were swapped before the strict load failed (missing keys), and a
    # meta-device model "loaded" into tensors without storage.
    model = nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 32)).to(DEVICE)
    sparsify_linears(model, "magnitude")
    path = str(tmp_path / "m.safetensors")
    save_sparse(model, path)
    bigger = nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 32), nn.Linear(32, 16)).to(DEVICE)
    before = [type(m) for m in bigger]
    with pytest.raises(ValueError, match=r"does not match the model: missing \['2.bias', '2.weight'\]"):
        load_sparse(bigger, path)
    assert [type(m) for m in bigger] == before
    with torch.device("meta"):
        ghost = nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 32))
    with pytest.raises(ValueError, match="the model is on the meta device"):
        load_sparse(ghost, path)
    assert [type(m) for m in ghost] == [nn.Linear, nn.Linear]
    lin = nn.Linear(128, 64)
    lin.bias.data = lin.bias.data.double()
    with pytest.raises(TypeError, match="Sparse24Linear: the bias dtype must be float16, bfloat16 or float32"):
        Sparse24Linear.from_linear(lin, prune="magnitude")
    with pytest.raises(TypeError, match="Sparse24Linear: argument 'int8' must be a bool, got str"):
        Sparse24Linear.from_linear(nn.Linear(128, 64), prune="magnitude", int8="no")
    nan = nn.Linear(128, 64)
    nan.weight.data[3, 5] = float("nan")
    for int8 in (False, True):   # refused with and without int8 (only int8 refused it before)
        with pytest.raises(ValueError, match="weight holds NaN or inf"):
            Sparse24Linear.from_linear(nan, prune="magnitude", int8=int8)


def test_sparsify_error_leaves_model_unchanged():
    # A layer that fails to build (float64 weight) after one that built: nothing is swapped.
    model = nn.Sequential(nn.Linear(128, 64), nn.Linear(128, 64, dtype=torch.float64)).to(DEVICE)
    with pytest.raises(TypeError):
        sparsify_linears(model, "magnitude")
    assert all(type(m) is nn.Linear for m in model)


@pytest.mark.parametrize("int8", [False, True])
def test_weight_property_is_the_dense_weight(int8):
    lin = linear(128, 32)
    s = Sparse24Linear.from_linear(lin, prune="magnitude", int8=int8, backend="torch")
    w = decompress(s.values, s.meta)
    want = w.float() * s.weight_scale.reshape(-1, 1) if int8 else w
    assert torch.equal(s.weight, want.to(s.bias.dtype) if int8 else want)
