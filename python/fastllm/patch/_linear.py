"""Linear swaps for fastllm.patch (quantize= / sparsity=): select, calibrate, build, commit.

Nothing here changes the model until `commit`: `plan` picks the linears through the rules
table (rules.py), runs the calibration batches through the untouched model with hooks that are
removed afterwards, and builds every replacement module off the model. `commit` then swaps
modules and SmoothQuant-folded norm weights in; `rollback` / `restore` put the originals back.

SmoothQuant folding without per-model code. A linear's smoothing 1/s can be folded into the
norm that produces its input when (a) that norm computes `normalized * weight (+ bias)`, and
(b) nothing but linears that are being smoothed reads the norm's output. Both are checked by
experiment, exactly, with per-channel powers of two p (x * p / p == x in floating point):
  (a) norm(x) with weight * p (and bias * p) must equal norm(x) * p bit for bit (Gemma's
      `(1 + weight)` fails);
  (b) a forward pass where the norm's output is multiplied by 1/p and each consuming linear's
      input by p must give bit-identical model outputs (a residual stream that reads the
      norm's output, as in BERT, fails).
Norms failing either keep the smoothing inside the Int8Linear (one elementwise multiply).
"""
import fnmatch
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch
from torch import nn

from .._layer_io import peft_reasons
from ..quant.calibrate import eval_mode, restore_modes
from .report import ModuleEntry
from .rules import DEFAULT_EXCLUDED, RULES, as_linear, is_linear


@dataclass
class Swap:
    name: str
    old: nn.Module
    new: nn.Module
    rule: str
    detail: str
    bytes_saved: int


@dataclass
class Fold:
    """SmoothQuant folded into a norm: its parameters become `new` (name -> Parameter)."""

    name: str
    module: nn.Module
    new: Dict[str, nn.Parameter]
    old: Dict[str, nn.Parameter] = field(default_factory=dict)
    consumers: Tuple[str, ...] = ()


@dataclass
class Plan:
    swaps: List[Swap] = field(default_factory=list)
    folds: List[Fold] = field(default_factory=list)
    entries: List[ModuleEntry] = field(default_factory=list)   # linears left, with the reason
    notes: List[str] = field(default_factory=list)


def module_bytes(m: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))


def swap_rules(options):
    return [r for r in RULES if r.kind == "module_swap" and options.get(r.option) is not None]


def calibration_needs(options) -> Dict[str, Tuple[str, ...]]:
    """{rule name: statistics it needs} for the enabled swap rules that need any."""
    out = {}
    for r in swap_rules(options):
        needs = r.calibration(options)
        if needs:
            out[r.name] = needs
        if r.name == "sparse24_linear":   # it takes quantize along: the int8 rule does not run
            break
    return out


def _matches(name, patterns):
    return any(fnmatch.fnmatchcase(name, p) for p in patterns or ())


def _output_head(model):
    """The model's vocabulary projection (get_output_embeddings()), None if it has none."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (AttributeError, NotImplementedError, TypeError):
        return None


def select(model, options) -> Tuple[List[Tuple[str, nn.Module, object]], List[ModuleEntry]]:
    """[(name, linear, rule)] to swap, and report entries for the linears left alone."""
    rules = swap_rules(options)
    include, exclude = options["include"], options["exclude"]
    named = dict(model.named_modules())
    owners = {}
    for n, m in named.items():
        for pn, p in m._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append(f"{n}.{pn}" if n else pn)
    in_adapter = peft_reasons(named, [n for n, m in named.items() if is_linear(n, m)], "patch")
    head = _output_head(model)
    chosen, left = [], []
    for n, m in named.items():
        if not is_linear(n, m):
            continue
        rule = next((r for r in rules if r.match(n, m)), None)
        if rule is None:
            continue
        if n in in_adapter:
            why = in_adapter[n]
        elif exclude and _matches(n, exclude):
            why = "matches exclude"
        elif include is not None and not _matches(n, include):
            why = "not matched by include"
        elif (_matches(n, rule.default_exclude) or m is head) and not (include and _matches(n, include)):
            why = f"excluded from linear swaps by default ({DEFAULT_EXCLUDED}; include it to swap it)"
        elif len(owners.get(id(m.weight), ())) > 1:
            others = [o for o in owners[id(m.weight)] if o != f"{n}.weight"]
            why = f"weight shared with {', '.join(others)} (tied); swapping would duplicate it"
        else:
            why = rule.unsupported(as_linear(m), options)
            if why:
                left.append(ModuleEntry(n, type(m).__name__, "skipped", f"{rule.name}: {why}"))
                continue
            chosen.append((n, m, rule))
            continue
        left.append(ModuleEntry(n, type(m).__name__, "left", why))
    if rules:   # weights no rule can swap: say so rather than leave them out of the report
        for n, m in model.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)) or is_linear(n, m):
                continue
            big = [(pn, tuple(p.shape)) for pn, p in m._parameters.items() if p is not None and p.dim() >= 2]
            if big:
                what = ", ".join(f"{pn} {shape}" for pn, shape in big)
                left.append(ModuleEntry(n, type(m).__name__, "left",
                                        f"holds {what} but is not an nn.Linear (e.g. fused 3-D expert weights, "
                                        "a convolution): no swap rule; kept in float"))
    return chosen, left


# ----------------------------------------------------------------------------------------------
# Calibration.

def _to(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def run_batch(model, batch, device):
    batch = _to(batch, device)
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _is_norm(name, m):
    w = m._parameters.get("weight")
    return (w is not None and w.dim() == 1 and not isinstance(m, (nn.Linear, nn.Embedding))
            and not any(True for _ in m.children()))


@torch.no_grad()
def collect(model, batches, linears: Dict[str, nn.Module], needs, device, find_consumers: bool):
    """Per-linear input statistics over all batches, and (first batch) which norm's output
    object each linear reads: ({name: {"amax": (K,), "l2": (K,)}}, {norm: [linear names]})."""
    stats = {n: {} for n in linears}
    norms = {n: m for n, m in model.named_modules() if _is_norm(n, m)} if find_consumers else {}
    produced, consumers, first = {}, {}, [True]

    def pre_hook(name):
        def hook(mod, args):
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or x.numel() == 0:
                return
            x2 = x.detach().reshape(-1, x.shape[-1]).float()
            st = stats[name]
            if "amax" in needs:
                a = x2.abs().amax(dim=0)
                st["amax"] = a if "amax" not in st else torch.maximum(st["amax"], a)
            if "l2" in needs:
                s = x2.pow(2).sum(dim=0)
                st["sumsq"] = s if "sumsq" not in st else st["sumsq"] + s
            if first[0] and id(x) in produced:
                consumers.setdefault(produced[id(x)][0], []).append(name)
        return hook

    def norm_hook(name):
        def hook(mod, args, out):
            if first[0] and isinstance(out, torch.Tensor):
                produced[id(out)] = (name, out)   # keep `out` alive: its id must not be reused
        return hook

    handles = [m.register_forward_pre_hook(pre_hook(n)) for n, m in linears.items()]
    handles += [m.register_forward_hook(norm_hook(n)) for n, m in norms.items()]
    modes = eval_mode(model)
    try:
        for b in batches:
            run_batch(model, b, device)
            first[0] = False
            produced.clear()
    finally:
        for h in handles:
            h.remove()
        restore_modes(modes)
    for st in stats.values():
        if "sumsq" in st:
            st["l2"] = st.pop("sumsq").sqrt()
    return stats, consumers


def _pow2(k, device, gen):
    return torch.pow(2.0, torch.randint(-2, 3, (k,), generator=gen).float()).to(device)


def _weight_is_scale(norm, device, gen) -> bool:
    """(a): norm(x; weight * p, bias * p) == norm(x) * p exactly, p per-channel powers of 2."""
    w = norm.weight
    k = w.shape[0]
    x = torch.randn(3, k, generator=gen).to(device=device, dtype=w.dtype)
    p = _pow2(k, device, gen)
    params = {"weight": (w.float() * p).to(w.dtype)}
    b = norm._parameters.get("bias")
    if b is not None:
        params["bias"] = (b.float() * p).to(b.dtype)
    try:
        base = norm(x)
        scaled = torch.func.functional_call(norm, params, (x,))
    except Exception:   # noqa: BLE001 - a norm we cannot probe is simply not folded into
        return False
    return isinstance(base, torch.Tensor) and torch.equal(scaled, base * p.to(base.dtype))


def _outputs(o):
    if isinstance(o, torch.Tensor):
        return [o]
    if isinstance(o, dict):
        return [t for v in o.values() for t in _outputs(v)]
    if isinstance(o, (tuple, list)):
        return [t for v in o for t in _outputs(v)]
    return []


@torch.no_grad()
def _exclusive(model, batch, device, groups: Dict[str, List[str]], gen) -> bool:
    """(b): scaling these norms' outputs by 1/p and their consumers' inputs by p changes nothing."""
    named = dict(model.named_modules())
    base = [t.clone() for t in _outputs(run_batch(model, batch, device))]
    handles = []
    for norm, lins in groups.items():
        p = _pow2(named[norm].weight.shape[0], device, gen)
        handles.append(named[norm].register_forward_hook(lambda m, a, out, p=p: out * (1.0 / p).to(out.dtype)))
        for n in lins:
            handles.append(named[n].register_forward_pre_hook(
                lambda m, a, p=p: (a[0] * p.to(a[0].dtype),) + tuple(a[1:])))
    try:
        got = _outputs(run_batch(model, batch, device))
    finally:
        for h in handles:
            h.remove()
    return len(got) == len(base) and all(torch.equal(a, b) for a, b in zip(got, base))


def _foldable(model, batch, device, candidates: Dict[str, List[str]]) -> Dict[str, List[str]]:
    gen = torch.Generator().manual_seed(0)
    named = dict(model.named_modules())
    ok = {n: c for n, c in candidates.items() if _weight_is_scale(named[n], device, gen)}
    if not ok or _exclusive(model, batch, device, ok, gen):
        return ok
    return {n: c for n, c in ok.items() if _exclusive(model, batch, device, {n: c}, gen)}


# ----------------------------------------------------------------------------------------------
# Planning.

def plan(model, options, batches, device, chosen, left) -> Plan:
    """Calibrate and build every replacement for `chosen` (from select); the model is left
    exactly as it was (hooks removed, nothing assigned)."""
    out = Plan(entries=list(left))
    if not chosen:
        out.notes.append("no linear layer was eligible for the requested swap")
        return out
    needs = set(n for v in calibration_needs(options).values() for n in v)
    alpha = options["smooth_alpha"]
    stats, consumers = {}, {}
    if batches:
        lin = {n: m for n, m, _ in chosen}
        stats, consumers = collect(model, batches, lin, needs, device, find_consumers=alpha is not None)
    layer = {n: {} for n, _, _ in chosen}
    for n, m, r in chosen:
        st = stats.get(n, {})
        for k in r.calibration(options):
            if k in st:
                layer[n][k] = st[k]
    missing = [n for n, _, r in chosen if any(k not in layer[n] for k in r.calibration(options))]
    folds = {}
    if alpha is not None:
        smoothed = {n for n, _, r in chosen if r.name == "int8_linear" and n not in missing}
        cands = {norm: lins for norm, lins in consumers.items() if lins and set(lins) <= smoothed}
        folds = _foldable(model, batches[0], device, cands) if cands else {}
        out.notes.append(f"SmoothQuant (alpha={alpha}): folded into {len(folds)} norm(s); the other smoothed "
                         "layers multiply their input by 1/s inside Int8Linear")
        folded_lins = {n for lins in folds.values() for n in lins}
        for n in smoothed - folded_lins:
            layer[n]["smooth_alpha"] = alpha
    named = dict(model.named_modules())
    temp = {}
    for norm, lins in folds.items():
        temp.update(_fold(out, norm, named[norm], {n: as_linear(named[n]) for n in lins}, layer, alpha))
    for n, m, r in chosen:
        if n in missing:
            out.entries.append(ModuleEntry(n, type(m).__name__, "skipped",
                                           f"{r.name}: did not run on the calibration batches (no statistics)"))
            continue
        try:
            new = r.replace(temp.get(n) or as_linear(m), options, layer[n])
        except ValueError as e:
            if n in temp:
                # Its norm already takes SmoothQuant's 1/s (planned fold): kept in float, the layer
                # would not apply the matching s, and the model would compute something else.
                raise ValueError(f"fastllm.patch: {n} cannot be swapped ({r.name}: {e}), but SmoothQuant was to "
                                 f"fold its scales into the norm before it. Model left unchanged.") from None
            out.entries.append(ModuleEntry(n, type(m).__name__, "skipped", f"{r.name}: {e}"))
            continue
        new.train(m.training)
        out.swaps.append(Swap(n, m, new, r.name, _describe(new, layer[n], n in temp),
                              module_bytes(m) - module_bytes(new)))
    return out


@torch.no_grad()
def _fold(out: Plan, norm_name, norm, lins: Dict[str, nn.Linear], layer, alpha):
    """SmoothQuant scales for a norm and its linears; returns {linear name: smoothed fp32 copy}."""
    from ..quant.smoothquant import divide_norm_weight, smooth_scales
    amax = layer[next(iter(lins))]["amax"] if "amax" in layer[next(iter(lins))] else None
    if amax is None:
        raise AssertionError("SmoothQuant folding without activation statistics")
    w = norm.weight
    s = smooth_scales(amax, [m.weight for m in lins.values()], alpha).to(w.device)
    # The norm weight is rounded to its dtype: scale the linears by the s it really applies.
    new_w, s_eff = divide_norm_weight(w, s)
    new = {"weight": nn.Parameter(new_w, requires_grad=w.requires_grad)}
    b = norm._parameters.get("bias")
    if b is not None:
        new["bias"] = nn.Parameter((b.float() / s_eff).to(b.dtype), requires_grad=b.requires_grad)
    out.folds.append(Fold(norm_name, norm, new, consumers=tuple(lins)))
    temp = {}
    for n, m in lins.items():
        t = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        t.weight = nn.Parameter(m.weight.float() * s_eff, requires_grad=False)
        if m.bias is not None:
            t.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=False)
        temp[n] = t
        layer[n]["amax"] = layer[n]["amax"] / s_eff
    return temp


def _describe(new, layer, folded):
    keep = [p for p in new.extra_repr().split(", ") if not p.startswith(("in_features=", "out_features="))]
    d = f"{type(new).__name__}({', '.join(keep)})"
    if folded:
        d += ", SmoothQuant folded into the preceding norm"
    return d


# ----------------------------------------------------------------------------------------------
# Commit / undo.

def _set(model, name, new):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def commit(model, plan_: Plan):
    """Swap the planned modules and folded norm parameters in. On error, undoes what it did."""
    done_swaps, done_folds = [], []
    try:
        for f in plan_.folds:
            for k, p in f.new.items():
                f.old[k] = f.module._parameters[k]
                f.module._parameters[k] = p
            done_folds.append(f)
        for s in plan_.swaps:
            _set(model, s.name, s.new)
            done_swaps.append(s)
    except BaseException:
        restore(model, done_swaps, done_folds)
        raise


def restore(model, swaps: List[Swap], folds: List[Fold], dtype=None):
    """Put the kept originals back, moved to where the model is now and, with `dtype` (the
    model's float dtype when it changed after patch), cast to it; None keeps their dtypes. After
    patch the model may have moved (model.to("cuda")) or changed dtype (model.half()), which
    reached the swapped-in layers and norms but not the kept originals."""
    for s in reversed(swaps):
        cur = model.get_submodule(s.name)
        t = next(iter(list(cur.buffers()) + list(cur.parameters())), None)
        if t is not None:
            s.old.to(device=t.device, dtype=dtype)
        _set(model, s.name, s.old)
    for f in reversed(folds):
        for k, p in f.old.items():
            cur = f.module._parameters.get(k)
            if cur is not None and (cur.dtype, cur.device) != (p.dtype, p.device):
                p = nn.Parameter(p.detach().to(device=cur.device, dtype=cur.dtype), requires_grad=p.requires_grad)
            f.module._parameters[k] = p


def offload(swaps: List[Swap]):
    """keep_original=True: the kept nn.Linear modules move to CPU memory (saving device memory);
    restore moves them back (to the device the model is on then)."""
    for s in swaps:
        s.old.to("cpu")

