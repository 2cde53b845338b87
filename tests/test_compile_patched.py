"""Patched models under torch.compile / torch.export on CPU, where they differed from the
unpatched model: grad mode (the default outside no_grad) and dynamic sequence lengths.
(Op-level fullgraph compile is tests/test_registry.py's; generation with transformers' own
compile path is test_patch.py's.)"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastllm  # noqa: E402
from fastllm.nn import Int8Linear  # noqa: E402

from test_patch import build  # noqa: E402


class Logits(torch.nn.Module):
    """A model's cache-free logits as a one-input module (what export / jit.trace take)."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids):
        return self.m(input_ids=input_ids, use_cache=False).logits


@pytest.mark.parametrize("quantize", [None, "w8a8"])
def test_compile_in_grad_mode(quantize):
    # Regression: without an autograd formula AOTAutograd failed at compile time ("no autograd
    # formula") while the eager forward worked; now the forward compiles and a backward raises.
    model = build("llama")
    fastllm.patch(model, quantize=quantize, backend="torch")
    ids = torch.randint(3, 128, (2, 9))
    eager = model(ids).logits
    torch._dynamo.reset()
    got = torch.compile(model, backend="aot_eager", fullgraph=True)(ids).logits
    assert got.requires_grad and torch.equal(got, eager)
    with pytest.raises(NotImplementedError, match="has no backward"):
        got.sum().backward()
    with pytest.raises(NotImplementedError, match="has no backward"):
        eager.sum().backward()


def test_op_backward_names_the_op():
    lin = Int8Linear.from_linear(torch.nn.Linear(32, 16), mode="w8a16")
    x = torch.randn(3, 32, requires_grad=True)
    with pytest.raises(NotImplementedError, match="w8a16_matmul has no backward"):
        lin(x).sum().backward()
    q = torch.randn(1, 2, 5, 16, requires_grad=True)
    k = v = torch.randn(1, 1, 5, 16)
    with pytest.raises(NotImplementedError, match="flash_attention has no backward"):
        fastllm.ops.flash_attention(q, k, v, causal=True).sum().backward()


def test_export_with_a_dynamic_length_across_the_decode_bound():
    # Regression: the prefill / decode routing tested q_len <= 16 first, which pinned an
    # exported (cache-free) sequence length to 2..16; the unpatched model exports over 2..64.
    from torch.export import Dim, export

    model = build("llama")
    fastllm.patch(model, backend="torch")
    wrapped = Logits(model)
    with torch.no_grad():
        ep = export(wrapped, (torch.randint(3, 128, (1, 8)),),
                    dynamic_shapes={"input_ids": {1: Dim("s", min=2, max=64)}})
        for S in (5, 40):
            x = torch.randint(3, 128, (1, S))
            assert torch.equal(ep.module()(x), wrapped(x))


@pytest.mark.parametrize("grad", [False, True])
def test_jit_trace_records_the_ops(grad):
    # Regression: under torch.jit.trace the eager fast path called the backends directly, so the
    # traced graph held no fastllm op (a CUDA kernel launched through fastllm._C would not have
    # been replayed at all); with grad on, tracing failed ("argument 'causal' must be a bool",
    # a traced shape comparison).
    model = build("llama")
    fastllm.patch(model, quantize="w8a16", backend="torch")

    ids = torch.randint(3, 128, (2, 8))
    with torch.set_grad_enabled(grad):
        traced = torch.jit.trace(Logits(model), (ids,), check_trace=False)
    graph = str(traced.inlined_graph)
    assert graph.count("fastllm::flash_attention") == 2 and graph.count("fastllm::w8a16_matmul") == 14
    ids2 = torch.randint(3, 128, (2, 8))
    with torch.no_grad():
        assert torch.equal(traced(ids2), model(ids2, use_cache=False).logits)
