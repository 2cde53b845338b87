"""The report's op entries: which backend the registry picks on this device for the ops a
patched model calls (flash_attention, decode_attention, the swapped linears' ops), probed with
a typical call built from the model's config and layer shapes."""
import functools
from typing import List, Tuple

import torch

from ..ops.registry import OPS, resolve_request
from . import _attention, _linear
from ._model import cfg_get, text_config
from .report import OpEntry
from .rules import as_linear


def _example_call(model, device, dtype):
    """Arguments of a typical flash_attention call for this model (for the registry)."""
    cfg = text_config(model)
    heads = cfg_get(cfg, "num_attention_heads", None) or 1
    kv_heads = cfg_get(cfg, "num_key_value_heads", None) or heads
    head_dim = cfg_get(cfg, "head_dim", None) or (cfg_get(cfg, "hidden_size", 64) // heads)
    softcap = float(cfg_get(cfg, "attn_logit_softcapping", None) or 0.0)
    q = torch.empty(1, heads, 16, head_dim, device=device, dtype=dtype)
    k = torch.empty(1, kv_heads, 16, head_dim, device=device, dtype=dtype)
    return (q, k, k, None, True, head_dim ** -0.5, 0, softcap)


def attention_entry(model, backend, device, dtype) -> OpEntry:
    op = OPS["flash_attention"]
    args = _example_call(model, device, dtype)
    entry = _entry(op, backend, device, args)
    prefill, decode = _attention.kernel_name_for(512), _attention.kernel_name_for(1)
    note = (f"every call goes to {prefill}, decode (Sq = 1) included: no decode kernel yet" if prefill == decode
            else f"prefill calls go to {prefill}, decode calls (few queries) to {decode}")
    if backend != resolve_request(backend):
        note += f"; FASTLLM_BACKEND={resolve_request(backend)}"
    entry.note = note
    return entry


def decode_entry(model, backend, device, dtype) -> OpEntry:
    """decode_attention on a typical decode step (1 query against 64 cached keys)."""
    q, k, _, _, _, scale, _, softcap = _example_call(model, device, dtype)
    q1, kc = q[:, :, :1], k.new_empty(k.shape[0], k.shape[1], 64, k.shape[3])
    entry = _entry(OPS["decode_attention"], backend, device, (q1, kc, kc, None, None, None, scale, 0, softcap, 0))
    entry.note = "decode steps (<= 16 queries against a longer cache)"
    return entry


def _entry(op, backend, device, args) -> OpEntry:
    req = resolve_request(backend)
    if req == "auto":
        reasons = op.reasons(device, *args)
    else:
        reasons = {b: (op.reason(b, device, *args) if b == req else "not requested") for b in op.order}
    selected = next((b for b in op.order if reasons[b] is None), None)
    if selected is not None:
        # Resolve once eagerly: the registry logs its choice on the first call per device, and a
        # logging call inside a torch.compile(fullgraph=True) trace is a graph break.
        op.select(backend, device, *args)
    return OpEntry(op.name, backend, selected, reasons)


def _linear_example(name, linear, options, device, dtype):
    """Arguments of a typical call of registry op `name` for a swapped `linear` (16 tokens)."""
    K, N, M = linear.in_features, linear.out_features, 16
    e = functools.partial(torch.empty, device=device)
    if name == "quantize_per_token":
        return (e(M, K, dtype=dtype),)
    if name == "int8_matmul_dynamic":
        return (e(M, K, dtype=dtype), e(N, K, dtype=torch.int8), e(N), None, None)
    if name == "int8_matmul_static":
        return (e(M, K, dtype=dtype), e(N, K, dtype=torch.int8), e(1), e(1), e(N), None)
    if name == "w8a16_matmul":
        gs = options["group_size"]
        return (e(M, K, dtype=dtype), e(N, K, dtype=torch.int8), e(N, K // gs) if gs else e(N), None, gs or 0)
    return None


def linear_op_entries(options, chosen, backend, device, dtype) -> Tuple[List[OpEntry], List[str]]:
    """OpEntry per registry op the swapped linears use (checked on the first chosen layer's shapes)."""
    entries, notes, seen = [], [], set()
    for rule in _linear.swap_rules(options):
        layers = [(n, m) for n, m, r in chosen if r is rule]
        if not layers:
            continue
        for name in rule.ops(options):
            if name in seen:
                continue
            seen.add(name)
            op = OPS.get(name)
            if op is None:
                if rule.name != "sparse24_linear":
                    notes.append(f"{rule.name}: op {name} is not registered")
                continue
            args = _linear_example(name, as_linear(layers[0][1]), options, device, dtype)
            if args is None:   # an op whose call we do not model: device-level reasons only
                from ..ops.registry import device_reason
                reasons = {b: (device_reason(b, device, auto=resolve_request(backend) == "auto")
                               if b in op.impls else f"{name} has no {b} implementation") for b in op.order}
                sel = next((b for b in op.order if reasons[b] is None), None)
                entries.append(OpEntry(name, backend, sel, reasons, f"used by {rule.name} (device-level check)"))
                continue
            ent = _entry(op, backend, device, args)
            ent.note = f"used by {rule.name} ({len(layers)} layers)"
            if name in ("int8_matmul", "int8_matmul_int32") and device.type == "cpu" and ent.selected == "torch":
                from ..ops.int8 import cpu_int_mm_ok
                ent.note += ("; on CPU torch._int_mm (exactness-probed)" if cpu_int_mm_ok()
                             else "; on CPU the int32 reference matmul")
            entries.append(ent)
    return entries, notes
