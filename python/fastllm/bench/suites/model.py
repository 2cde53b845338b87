"""End to end: a transformers model built from a config, unpatched (SDPA) vs fastllm.patch in
each mode: prefill tokens/s, decode tokens/s with a StaticCache, peak memory, logit difference.

    python -m fastllm.bench model [--quick] [--shapes llama3.2-1b] [--json out.json]

Model (--shapes, column config): Llama-3.2-1B shapes by default (hidden 2048, 16 layers, 32 / 8
heads, head dim 64, MLP 8192, vocab 128256); llama3-8b, mistral-7b, qwen2.5-7b are Llama-
architecture stand-ins with that model's shapes. Random weights, bf16 on GPU (or each --dtype
given). On CPU a tiny config in fp32 whatever --dtype / --shapes say (the report notes it; the
numbers are labelled CPU: a harness smoke test, not kernel speed).

Modes: unpatched (transformers' SDPA), exact (fastllm attention), w8a16, w8a8 (dynamic),
2:4 and 2:4+int8, skip_attention (the last quarter of the layers; lossy, arXiv 2404.05741). Each mode patches a
fresh copy of the unpatched model, so every mode sees the same weights. While the patched
modes run, the unpatched model waits on the CPU (GPU runs), so each mode's peak is its own.

Rows:
  prefill  batch 1, S = 512..8192 prompt tokens, one forward (logits of the last position
           only, logits_to_keep=1): tokens/s = S / time.
  decode   batch B = 1..64, one token per sequence against a StaticCache holding a
           512-token prompt (max_cache_len 1024): tokens/s = B / time of one step. Eager
           (no CUDA graphs, no torch.compile), the same for every mode.
Before timing, each mode's prompt logits are compared with a reference: the relative error
||patched - reference|| / ||reference|| (column rel_err; max_logit_diff the max |difference|)
must stay under the mode's bound or the mode is reported WRONG and not timed. Reference and
bound: exact: the unpatched model, EXACT_BOUND (1e-4 fp32, 0.05 bf16, 0.02 fp16); w8a16 0.15,
w8a8 0.25: the unpatched model; 2:4: the unpatched model carrying the same pruned weights
(each swapped layer's .weight), EXACT_BOUND; 2:4+int8: the same with the dequantized weights,
0.25 (activation quantization is the remaining loss). JSON rows also give rel_err_unpatched
(against the unpatched model with its dense weights: what pruning costs). skip_attention is
lossy and unchecked. peak_MiB: torch.cuda.max_memory_allocated over the mode's check and runs
with only that mode's model on the GPU (absolute, weights included; GPU only);
weights_MiB: parameters + buffers of the patched model.
"""
import copy
import inspect
import math

import torch

import fastllm
from fastllm.bench import check

COLUMNS = ["config", "mode", "dtype", "phase", "B", "S", "ms", "tokens/s", "speedup", "weights_MiB", "peak_MiB",
           "rel_err", "max_logit_diff", "ok"]
PLOT = dict(x="n", y="tokens/s", series=("config", "dtype", "mode", "phase"))

# name: (hidden, layers, heads, kv heads, head dim, intermediate, vocab, tie embeddings)
CONFIGS = {
    "llama3.2-1b": (2048, 16, 32, 8, 64, 8192, 128256, True),
    "llama3-8b": (4096, 32, 32, 8, 128, 14336, 128256, False),
    "mistral-7b": (4096, 32, 32, 8, 128, 14336, 32768, False),
    "qwen2.5-7b": (3584, 28, 28, 4, 128, 18944, 152064, False),
}
PRESETS = CONFIGS
CPU_CONFIG = (128, 2, 4, 2, 32, 256, 512, False)

PREFILL = [512, 1024, 2048, 4096, 8192]
QUICK_PREFILL = [512, 2048, 8192]
DECODE = [1, 4, 16, 64]
QUICK_DECODE = [1, 16, 64]
DECODE_CONTEXT = 512
CPU_PREFILL, CPU_DECODE, CPU_CONTEXT = [32, 128], [1, 4], 32

#: mode -> patch() keyword arguments (None: the unpatched model).
MODES = {
    "unpatched": None,
    "exact": {},
    "w8a16": {"quantize": "w8a16"},
    "w8a8": {"quantize": "w8a8"},
    "2:4": {"sparsity": "2:4"},
    "2:4+int8": {"sparsity": "2:4", "quantize": "w8a8"},
    "skip_attention": {"skip_attention": "quarter"},
}
EXACT_BOUND = {torch.float32: 1e-4, torch.bfloat16: 0.05, torch.float16: 0.02}
LOSSY_BOUND = {"w8a16": 0.15, "w8a8": 0.25, "2:4+int8": 0.25}
SPARSE_MODES = ("2:4", "2:4+int8")


def build(spec, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    hidden, layers, heads, kv, hd, inter, vocab, tie = spec
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, head_dim=hd, intermediate_size=inter, vocab_size=vocab,
                      tie_word_embeddings=tie, max_position_embeddings=16384, rope_theta=500000.0,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def _bytes(model):
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


@torch.no_grad()
def _decode_step_fn(model, B, context, vocab, device):
    """A callable running one decode step (B tokens at position `context`) on a StaticCache
    prefilled with `context` random tokens; calling it again rewrites the same slot."""
    from transformers import StaticCache
    cache = StaticCache(config=model.config, max_cache_len=2 * context)
    # transformers 5.24 renamed the forward's past_key_values to cache (the old name warns until 5.40).
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    prompt = torch.randint(3, vocab, (B, context), device=device)
    model(prompt, use_cache=True, logits_to_keep=1, cache_position=torch.arange(context, device=device),
          **{kw: cache})
    tok = torch.randint(3, vocab, (B, 1), device=device)
    pos = torch.tensor([context], device=device)
    mask = torch.ones(B, context + 1, dtype=torch.long, device=device)
    return lambda: model(tok, attention_mask=mask, use_cache=True, cache_position=pos, **{kw: cache})


def _pruned_reference(base, patched, device):
    """The unpatched model carrying the weights `patched` applies: a copy of `base` whose every
    swapped linear gets the swapped layer's .weight (decompressed 2:4, dequantized for int8)."""
    from fastllm.nn import Int8Linear, Sparse24Linear
    model = copy.deepcopy(base)
    n = 0
    with torch.no_grad():
        for name, mod in patched.named_modules():
            if isinstance(mod, (Sparse24Linear, Int8Linear)):
                model.get_submodule(name).weight.copy_(mod.weight)
                n += 1
    if n == 0:
        raise RuntimeError("2:4 mode swapped no linear: nothing to check against")
    return model.to(device)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def _cmp(got, want):
    return (got - want).abs().max().item(), ((got - want).norm() / want.norm()).item()


def run(ctx):
    dev = ctx.device
    on_gpu = dev.type == "cuda"
    explicit = getattr(ctx, "dtype_given", False)   # a bare test namespace has no flag: default dtype
    if on_gpu:
        dtypes = ctx.dtypes if explicit else [torch.bfloat16]
        specs = [(n, CONFIGS[n]) for n in ctx.shapes or ["llama3.2-1b"]]
        prefill, decode = (QUICK_PREFILL, QUICK_DECODE) if ctx.quick else (PREFILL, DECODE)
        context = DECODE_CONTEXT
    else:
        dtypes = [torch.float32]
        if explicit and list(ctx.dtypes) != [torch.float32]:
            ctx.note("model: on CPU the model runs in float32; --dtype is not used")
        if ctx.shapes:
            ctx.note("model: on CPU the suite runs its tiny config; --shapes is not used")
        specs = [("tiny-llama (CPU)", CPU_CONFIG)]
        prefill, decode = ([CPU_PREFILL[0]], [CPU_DECODE[0]]) if ctx.quick else (CPU_PREFILL, CPU_DECODE)
        context = CPU_CONTEXT
    rows = ctx.rows()   # kept by ctx: an interrupted run saves them
    for cfg_name, spec in specs:
        for dtype in dtypes:
            rows += _run_config(ctx, cfg_name, spec, dtype, prefill, decode, context)
    return rows


def _run_config(ctx, cfg_name, spec, dtype, prefill, decode, context):
    dev = ctx.device
    on_gpu = dev.type == "cuda"
    base = build(spec, dev, dtype)
    vocab = base.config.vocab_size
    check_ids = torch.randint(3, vocab, (1, min(256, prefill[0])), device=dev)
    ref = _logits(base, check_ids)
    base_tps = {}
    rows = []
    for mode in ctx.progress(list(MODES), f"model {cfg_name} {dtype}"):
        try:
            rows += _run_mode(ctx, mode, base, ref, check_ids, base_tps, cfg_name, dtype, prefill, decode, context)
        except Exception as e:  # noqa: BLE001 - one mode failing (a kernel raising) costs that mode's rows only
            if mode == "unpatched":
                raise
            ctx.impl_raised(f"fastllm model mode {mode}", f"{cfg_name} {dtype}", e)
        if on_gpu:
            torch.cuda.empty_cache()
    del base
    return rows


def _run_mode(ctx, mode, base, ref, check_ids, base_tps, cfg_name, dtype, prefill, decode, context):
    """Rows of one mode: patch a copy of base, check its logits, time prefill and decode."""
    dev = ctx.device
    on_gpu = dev.type == "cuda"
    vocab = base.config.vocab_size
    n_layers = base.config.num_hidden_layers
    rows = []
    kw = MODES[mode]
    if kw is not None and kw.get("skip_attention") == "quarter":
        kw = {"skip_attention": max(1, n_layers // 4)}
    model, want, vs_unpatched = base, ref, None
    if kw is not None:
        if on_gpu and next(base.parameters()).device.type != "cpu":
            base.to("cpu")     # only the mode's own model on the GPU from here on
            torch.cuda.empty_cache()
        model = copy.deepcopy(base).to(dev)
        try:
            fastllm.patch(model, **kw)
        except (NotImplementedError, fastllm.BackendUnavailableError, ValueError) as e:
            ctx.missing.append((f"model mode {mode}", check.error_line(e, 160)))
            del model
            return []
        if mode in SPARSE_MODES:
            vs_unpatched = _cmp(_logits(model, check_ids), ref)[1]
            r = _pruned_reference(base, model, dev)
            want = _logits(r, check_ids)
            del r
    if on_gpu:
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    diff, rel = _cmp(_logits(model, check_ids), want)
    if mode == "unpatched":
        bound = None
    elif mode in ("exact", "2:4"):
        bound = EXACT_BOUND[dtype]
    else:
        bound = LOSSY_BOUND.get(mode)
    ok = math.isfinite(rel) and (bound is None or rel <= bound)
    status = ("yes" if bound is not None else "reference" if mode == "unpatched" else "lossy (unchecked)") \
        if ok else \
        f"WRONG (rel err {rel:.3g} > {bound})"
    common = dict(mode=mode, config=cfg_name, dtype=str(dtype).replace("torch.", ""),
                  weights_MiB=_bytes(model) / 2 ** 20, rel_err=rel, max_logit_diff=diff, ok=status,
                  checked_against="unpatched, same pruned weights" if mode in SPARSE_MODES else
                  "unpatched" if bound is not None else None,
                  rel_err_unpatched=rel if vs_unpatched is None else vs_unpatched)
    mode_rows = []
    for S in prefill:
        ids = torch.randint(3, vocab, (1, S), device=dev)
        t = None
        if ok:
            with torch.no_grad():
                t = ctx.timer(lambda: model(ids, use_cache=False, logits_to_keep=1), host=True)
        mode_rows.append(dict(common, phase="prefill", B=1, S=S, n=S, t=t, tokens=S))
    for B in decode:
        t = None
        if ok:
            step = _decode_step_fn(model, B, context, vocab, dev)
            with torch.no_grad():
                t = ctx.timer(step, host=True)
            del step
        mode_rows.append(dict(common, phase="decode", B=B, S=context, n=B, t=t, tokens=B))
    peak = torch.cuda.max_memory_allocated(dev) / 2 ** 20 if on_gpu else None
    for r in mode_rows:
        t, tokens = r.pop("t"), r.pop("tokens")
        tps = t and tokens / t
        key = (r["phase"], r["B"], r["S"])
        if mode == "unpatched":
            base_tps[key] = tps
        r.update({"ms": t and t * 1e3, "tokens/s": tps, "peak_MiB": peak,
                  "speedup": tps and base_tps.get(key) and tps / base_tps[key]})
        rows.append(r)
    return rows
