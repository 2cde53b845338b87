"""fastllm's ops have no backward: an autograd formula that says so when a backward RUNS.

Without any formula, torch.compile of a model in grad mode (the default outside no_grad) failed
at compile time (AOTAutograd traces the backward up front and found none), although the eager
forward works. With this formula the forward works in eager and compiled, the traced backward
holds a call to fastllm::backward_unsupported, and running it raises NotImplementedError naming
the op. Forward-mode AD (torch.func.jvp / jacfwd, forward_ad dual tensors) would silently get zero
tangents through a custom op (a dual tensor does not require grad, so torch runs the op below
autograd): `refuse_tangents`, called by fastllm.ops before the custom op, raises instead.
"""
from typing import List, Optional, Tuple

import torch

OPS = ("flash_attention", "flash_attention_varlen", "decode_attention", "quantize_per_token", "int8_matmul",
       "int8_matmul_int32", "int8_matmul_dynamic", "int8_matmul_static", "w8a16_matmul", "sparse24_matmul",
       "sparse24_int8_matmul", "sparse24_int8_matmul_int32")


@torch.library.custom_op("fastllm::backward_unsupported", mutates_args=())
def backward_unsupported(op: str, grad: torch.Tensor) -> torch.Tensor:
    raise NotImplementedError(
        f"fastllm.ops.{op} has no backward: fastllm's kernels are for inference. Run the forward under "
        "torch.no_grad() / torch.inference_mode(), or fastllm.unpatch(model) to train.")


@backward_unsupported.register_fake
def _(op, grad):
    return grad.new_empty(())


def _setup_context(ctx, inputs, output):
    # Shapes and dtypes only: keeping the inputs alive would cost memory for nothing.
    ctx.wants = [(t.shape, t.dtype) if isinstance(t, torch.Tensor) and t.requires_grad else None for t in inputs]


def _backward(name):
    def backward(ctx, *grads) -> Tuple[Optional[torch.Tensor], ...]:
        g = next(x for x in grads if x is not None)
        marker = backward_unsupported(name, g)
        return tuple(marker.to(w[1]).expand(w[0]) if w is not None else None for w in ctx.wants)
    return backward


def refuse_tangents(name: str, args) -> None:
    """NotImplementedError if a forward-mode tangent would be dropped (eager only: under
    torch.compile the check would be traced into the graph)."""
    from torch.autograd import forward_ad
    if forward_ad._current_level < 0 or torch.compiler.is_compiling():
        return
    for a in args:
        if isinstance(a, torch.Tensor) and forward_ad.unpack_dual(a).tangent is not None:
            raise NotImplementedError(
                f"fastllm.ops.{name} has no forward-mode derivative (jvp): fastllm's kernels are for "
                "inference. Call it on tensors without tangents, or fastllm.unpatch(model) to differentiate.")


def register(names: List[str] = OPS):
    for name in names:
        torch.library.register_autograd(f"fastllm::{name}", _backward(name), setup_context=_setup_context)
