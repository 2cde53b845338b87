"""The eager fast path (registry.Op.call): in plain eager inference an op calls its backend's
implementation directly instead of going through its torch custom op (~10 us of Python dispatch
per call). It must give exactly what the custom op gives, and must not be taken where the
custom op matters: autograd, torch.compile / FakeTensor / dispatch modes, functorch, forward AD,
the profiler (which should show fastllm::<op>)."""
import pytest
import torch

import fastllm
from fastllm.ops import registry
from fastllm.sparse import compress, prune_24

from conftest import DEVICE


def _calls():
    """(op name, public call) for every custom op, on small odd shapes (torch reference on CPU)."""
    g = torch.Generator().manual_seed(5)

    def r(*s, dtype=torch.float32):
        return torch.randn(*s, generator=g).to(DEVICE, dtype)

    def i8(*s):
        return torch.randint(-128, 128, s, generator=g, dtype=torch.int8).to(DEVICE)
    dt = torch.float32 if DEVICE == "cpu" else torch.float16
    q, k, v = r(2, 4, 5, 64, dtype=dt), r(2, 2, 9, 64, dtype=dt), r(2, 2, 9, 64, dtype=dt)
    x, a, b = r(3, 64, dtype=dt), i8(3, 64), i8(32, 64)
    sa, sw = r(3).abs() + 0.1, r(32).abs() + 0.1
    vals, meta = compress(prune_24(r(32, 64))[0].to(dt))
    vals8, meta8 = compress(prune_24(i8(32, 64).float())[0].to(torch.int8))
    cu = torch.tensor([0, 2, 5], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([3, 9], dtype=torch.int32, device=DEVICE)
    ops = fastllm.ops
    return {
        "flash_attention": lambda: ops.flash_attention(q, k, v, causal=True, return_lse=True),
        "flash_attention_varlen": lambda: ops.flash_attention_varlen(
            q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu, 3, 3, causal=True),
        "decode_attention": lambda: ops.decode_attention(q[:, :, :1], k, v, cache_seqlens=lens, return_lse=True),
        "quantize_per_token": lambda: ops.quantize_per_token(x),
        "int8_matmul_int32": lambda: ops.int8_matmul_int32(a, b),
        "int8_matmul": lambda: ops.int8_matmul(a, b, sa, sw, out_dtype=dt),
        "w8a16_matmul": lambda: ops.w8a16_matmul(x, b, sw),
        "int8_matmul_dynamic": lambda: ops.int8_matmul_dynamic(x, b, sw),
        "int8_matmul_static": lambda: ops.int8_matmul_static(x, b, 0.05, sw),
        "sparse24_matmul": lambda: ops.sparse24_matmul(x, vals, meta),
        "sparse24_int8_matmul_int32": lambda: ops.sparse24_int8_matmul_int32(a, vals8, meta8),
        "sparse24_int8_matmul": lambda: ops.sparse24_int8_matmul(a, vals8, meta8, sa, sw, out_dtype=dt),
    }


def _flat(out):
    return list(out) if isinstance(out, tuple) else [out]


def test_every_op_is_bound_to_its_custom_op():
    assert set(_calls()) == set(registry.OPS)
    for name, op in registry.OPS.items():
        assert op.custom is not None and op.custom._qualname == f"fastllm::{name}", name


@pytest.mark.parametrize("name", sorted(registry.OPS))
def test_fast_path_equals_the_custom_op(name, monkeypatch):
    call = _calls()[name]
    with torch.no_grad():
        monkeypatch.setattr(registry, "EAGER_FAST_PATH", False)
        via_op = _flat(call())
        monkeypatch.setattr(registry, "EAGER_FAST_PATH", True)
        # Taken: the custom op is not called at all.
        monkeypatch.setattr(registry.OPS[name], "custom", lambda *a: pytest.fail("custom op called"))
        direct = _flat(call())
    assert len(direct) == len(via_op)
    for d, o in zip(direct, via_op):
        assert d.dtype == o.dtype and d.shape == o.shape and d.stride() == o.stride()
        assert torch.equal(d, o)


def _spy(monkeypatch, name):
    """Records calls of the op's custom op (the slow path)."""
    op = registry.OPS[name]
    seen, real = [], op.custom
    monkeypatch.setattr(op, "custom", lambda *a: seen.append(1) or real(*a))
    return seen


def test_autograd_goes_through_the_custom_op(monkeypatch):
    seen = _spy(monkeypatch, "flash_attention")
    q = torch.randn(1, 2, 3, 64, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 2, 3, 64, device=DEVICE)
    out = fastllm.ops.flash_attention(q, k, k, causal=True)
    assert seen and out.requires_grad
    with pytest.raises(NotImplementedError, match="flash_attention has no backward"):
        out.sum().backward()
    seen.clear()
    with torch.no_grad():
        fastllm.ops.flash_attention(q, k, k, causal=True)     # no autograd to record: direct
    assert not seen


def _with_float_input():
    """(op name, (f, x)): f(x) calls the op with x as its float tensor input, for every op that
    has one (the int32 ops take only integer tensors, which cannot carry a tangent)."""
    g = torch.Generator().manual_seed(7)
    dt = torch.float32 if DEVICE == "cpu" else torch.float16
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE, dt)          # noqa: E731
    i8 = torch.randint(-128, 128, (32, 64), generator=g, dtype=torch.int8).to(DEVICE)
    q, k = r(1, 2, 5, 64), r(1, 1, 7, 64)
    x, sw = r(3, 64), r(32).float().abs() + 0.1       # scales are fp32 (the ops' contract)
    vals, meta = compress(prune_24(r(32, 64).float())[0].to(dt))
    vals8, meta8 = compress(prune_24(i8.float())[0].to(torch.int8))
    cu = torch.tensor([0, 2, 5], dtype=torch.int32, device=DEVICE)
    ops = fastllm.ops
    return {
        "flash_attention": (lambda t: ops.flash_attention(t, k, k, causal=True), q),
        "flash_attention_varlen": (lambda t: ops.flash_attention_varlen(t, t, t, cu, cu, 3, 3, causal=False),
                                   q[0].transpose(0, 1)),
        "decode_attention": (lambda t: ops.decode_attention(t, k, k), q[:, :, :1]),
        "quantize_per_token": (lambda t: ops.quantize_per_token(t)[1], x),
        "int8_matmul": (lambda t: ops.int8_matmul(i8[:3], i8, t, sw, out_dtype=dt), sw[:3]),
        "w8a16_matmul": (lambda t: ops.w8a16_matmul(t, i8, sw), x),
        "int8_matmul_dynamic": (lambda t: ops.int8_matmul_dynamic(t, i8, sw), x),
        "int8_matmul_static": (lambda t: ops.int8_matmul_static(t, i8, 0.05, sw), x),
        "sparse24_matmul": (lambda t: ops.sparse24_matmul(t, vals, meta), x),
        "sparse24_int8_matmul": (lambda t: ops.sparse24_int8_matmul(i8[:3], vals8, meta8, t, sw, out_dtype=dt),
                                 sw[:3]),
    }


@pytest.mark.parametrize("name", sorted(_with_float_input()))
def test_forward_mode_ad_raises_instead_of_zero_tangents(name):
    # Regression: a dual tensor does not require grad, so torch ran the custom op below autograd
    # and jvp / jacfwd silently returned zero tangents.
    f, x = _with_float_input()[name]
    with pytest.raises(NotImplementedError, match=f"{name} has no forward-mode derivative"):
        torch.func.jvp(f, (x,), (torch.ones_like(x),))
    with torch.autograd.forward_ad.dual_level():
        with pytest.raises(NotImplementedError, match=f"{name} has no forward-mode derivative"):
            f(torch.autograd.forward_ad.make_dual(x, torch.ones_like(x)))
        # Inputs without tangents inside a dual level: computed, as outside it.
        got = f(x)
    assert torch.equal(got, f(x))


def test_every_op_with_a_float_input_is_checked_for_tangents():
    ints = {n for n in registry.OPS if n.endswith("_int32")}
    assert set(_with_float_input()) == set(registry.OPS) - ints


def test_profiler_sees_the_op(monkeypatch):
    seen = _spy(monkeypatch, "quantize_per_token")
    x = torch.randn(3, 64, device=DEVICE)
    with torch.autograd.profiler.profile() as prof:
        fastllm.ops.quantize_per_token(x)
    assert seen
    assert any(e.key == "fastllm::quantize_per_token" for e in prof.key_averages())


def test_modes_and_transforms_go_through_the_custom_op(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode
    x = torch.randn(3, 64, device=DEVICE)
    assert registry.plain_eager((x,))

    class Noop(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))
    with Noop():
        assert not registry.plain_eager((x,))
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
        q, s = fastllm.ops.quantize_per_token(fake)         # the fake implementation answers
        assert q.shape == (3, 64) and s.shape == (3,)
    class PassThrough(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))
    with PassThrough():
        assert not registry.plain_eager((x,))
    assert not registry.plain_eager((x.to("meta"),))
    assert not registry.plain_eager((x, x.detach().requires_grad_()))
    with torch.autograd.forward_ad.dual_level():
        assert not registry.plain_eager((x.detach(),))
    seen = []

    def inside(t):
        seen.append(registry.plain_eager((t,)))
        return t
    torch.vmap(inside)(x.detach())
    assert seen == [False]
    with torch.no_grad():
        assert registry.plain_eager((x, torch.nn.Parameter(x.detach())))   # a Parameter is a plain tensor


def test_compiled_calls_go_through_the_custom_op():
    # Dynamo evaluates is_compiling() as True: the graph holds fastllm::quantize_per_token.
    from torch._dynamo.testing import CompileCounterWithBackend
    cnt = CompileCounterWithBackend("eager")
    x = torch.randn(3, 64, device=DEVICE)
    torch._dynamo.reset()
    out = torch.compile(lambda t: fastllm.ops.quantize_per_token(t), backend=cnt, fullgraph=True)(x)
    assert cnt.frame_count == 1
    targets = [str(n.target) for g in cnt.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert any("fastllm.quantize_per_token" in t for t in targets), targets
    assert torch.equal(out[0], fastllm.ops.quantize_per_token(x)[0])
