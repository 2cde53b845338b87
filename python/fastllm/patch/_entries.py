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
from .rules import as_linear, score_bias_source


def _int(v):
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def _module_head_dim(m):
    """head_dim, or for MLA modules (DeepSeek-V3: qk_head_dim, v_head_dim) the wider one, which
    fastllm runs them at (zero padding); None if the module names none."""
    dims = [d for d in (_int(getattr(m, a, None)) for a in ("head_dim", "qk_head_dim", "v_head_dim")) if d]
    return max(dims) if dims else None


def _head_dims(model, attn) -> List[int]:
    """The head dims the attention modules compute with, most common first: per module, not one
    config value (Gemma 4's full-attention layers use global_head_dim, 512 by default, while
    the config's head_dim is the sliding layers'; vision configs list heads per stage)."""
    dims = [d for d in (_module_head_dim(m) for _, m in attn) if d]
    if not dims:
        cfg = text_config(model)
        heads = _int(cfg_get(cfg, "num_attention_heads", None)) or 1
        dims = [_int(cfg_get(cfg, "head_dim", None)) or (_int(cfg_get(cfg, "hidden_size", None)) or 64) // heads]
    return sorted(set(dims), key=lambda d: (-dims.count(d), d))


def _example_call(model, device, dtype, head_dim):
    """Arguments of a typical flash_attention call for this model (for the registry)."""
    cfg = text_config(model)
    heads = _int(cfg_get(cfg, "num_attention_heads", None)) or 1
    kv_heads = _int(cfg_get(cfg, "num_key_value_heads", None)) or heads
    if heads % kv_heads:
        heads, kv_heads = 1, 1
    softcap = float(cfg_get(cfg, "attn_logit_softcapping", None) or 0.0)
    q = torch.empty(1, heads, 16, head_dim, device=device, dtype=dtype)
    k = torch.empty(1, kv_heads, 16, head_dim, device=device, dtype=dtype)
    return (q, k, k, None, True, head_dim ** -0.5, 0, softcap)


def _per_head_dim(op, model, attn, backend, device, dtype, make_args, note) -> OpEntry:
    """One entry for the op over every head dim the model uses: the first one nothing can serve
    (a forced backend then fails at patch time, not inside a forward), else the most common
    dim's; its note is `note`, then the dims and which other backend serves some of them."""
    dims = _head_dims(model, attn)
    entries = {d: _entry(op, backend, device, make_args(_example_call(model, device, dtype, d))) for d in dims}
    entry = next((e for e in entries.values() if e.selected is None), entries[dims[0]])
    others = [f"head dim {d}: {e.selected}" for d, e in entries.items() if e.selected != entry.selected]
    if len(dims) > 1:
        note += f"; head dims {dims}" + (f" ({'; '.join(others)})" if others else "")
    entry.note = note
    return entry


def attention_entry(model, attn, backend, device, dtype) -> OpEntry:
    prefill, decode = _attention.kernel_name_for(512), _attention.kernel_name_for(1)
    note = (f"every call goes to {prefill}, decode (Sq = 1) included: no decode kernel yet" if prefill == decode
            else f"prefill calls go to {prefill}, decode calls (few queries) to {decode}")
    if backend != resolve_request(backend):
        note += f"; FASTLLM_BACKEND={resolve_request(backend)}"
    make_args = _identity
    src = score_bias_source(model, attn)
    if src:   # probed with a bias (no CUDA bias kernel at head dim 256): the backend these calls get
        note += f"; its scores get an additive bias ({src}), which flash_attention adds"
        make_args = _with_bias
    return _per_head_dim(OPS["flash_attention"], model, attn, backend, device, dtype, make_args, note)


def _identity(a):
    return a


def _with_bias(a):
    """A typical call's arguments plus sinks None and a per-head (1, Hq, Sq, Skv) bias."""
    q, k = a[0], a[1]
    return a + (None, q.new_empty(1, q.shape[1], q.shape[2], k.shape[2]))


def decode_entry(model, attn, backend, device, dtype) -> OpEntry:
    """decode_attention on a typical decode step (1 query against 64 cached keys)."""
    def args(a):
        q, k, _, _, _, scale, _, softcap = a
        q1, kc = q[:, :, :1], k.new_empty(k.shape[0], k.shape[1], 64, k.shape[3])
        return (q1, kc, kc, None, None, None, scale, 0, softcap, 0)
    return _per_head_dim(OPS["decode_attention"], model, attn, backend, device, dtype, args,
                         "decode steps (<= 16 queries against a longer cache)")


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
