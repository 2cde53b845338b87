"""fastllm demo: patch a small Llama-style model, generate, report.

    python -m fastllm.demo                        # CPU: seconds; GPU: bf16, a larger model
    python -m fastllm.demo --device cuda --dtype bfloat16 --backend triton --tokens 128
    python -m fastllm.demo --skip-attention 1     # also measure skipping the last layer's attention
    python -m fastllm.demo --quantize w8a8        # also measure int8 linears (w8a8 | w8a8-static | w8a16)

Builds the model from a config with random weights (no download), then on one left-padded
batch of random prompts:
  1. unpatched: prompt logits, greedy generate timed (tokens/s);
  2. fastllm.patch(model): the patch report, the same logits (max |difference| and relative
     error against ROUNDING_BOUND), the same generate timed, and whether the greedy tokens
     agree. A token difference is called a near-tie under rounding only when the logits of the
     prompt and of every generated step up to the first difference agree within the bound;
     logits beyond it mean a wrong kernel: the demo says so and exits with status 1;
  3. optionally skip_attention=k (lossy): tokens/s and how far the logits move;
  4. optionally quantize=... (lossy int8 linears): tokens/s, logit change, bytes saved.
Random weights make the text meaningless; the numbers (speed, agreement) are what it shows.
On CPU the reference (PyTorch) backend serves fastllm's attention: the demo says so rather than
suggesting a speedup.
"""
import argparse
import sys
import time

import torch

#: Relative error ||patched - unpatched|| / ||unpatched|| of logits that float rounding explains
#: (fastllm's exact attention vs SDPA): the bench's model suite's bound for its exact mode.
from .bench import parse_device  # noqa: E402
from .bench.suites.model import EXACT_BOUND as ROUNDING_BOUND  # noqa: E402

# hidden, layers, heads, kv heads, intermediate, vocab
SIZES = {
    "small": (256, 4, 8, 4, 688, 1000),          # CPU: a few seconds end to end
    "large": (2048, 16, 32, 8, 5632, 32000),     # GPU: ~1.1 B parameters, TinyLlama-shaped
}


def build_model(size, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    hidden, layers, heads, kv_heads, inter, vocab = SIZES[size]
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=inter, vocab_size=vocab,
                      max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def prompts(batch, length, vocab, device):
    """Random token prompts, left-padded to `length` (row b has b * length // (2 * batch) pads)."""
    ids = torch.randint(3, vocab, (batch, length), device=device)
    mask = torch.ones_like(ids)
    for b in range(batch):
        pad = b * length // (2 * batch)
        ids[b, :pad] = 0
        mask[b, :pad] = 0
    return ids, mask


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def timed_generate(model, ids, mask, tokens, repeats=2):
    """(sequences, tokens/s): best of `repeats` runs after one short warm-up."""
    kw = dict(attention_mask=mask, do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens,
              pad_token_id=0)
    model.generate(ids, **dict(kw, max_new_tokens=2, min_new_tokens=2))
    best, out = float("inf"), None
    for _ in range(repeats):
        _sync(ids.device)
        t = time.perf_counter()
        out = model.generate(ids, **kw)
        _sync(ids.device)
        best = min(best, time.perf_counter() - t)
    return out, ids.shape[0] * tokens / best


@torch.no_grad()
def logits(model, ids, mask):
    return model(ids, attention_mask=mask).logits.float()


@torch.no_grad()
def step_logits(model, ids, mask, tokens):
    """(sequences, logits (B, tokens, vocab) fp32 of every greedy step): untimed."""
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens,
                         pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, dim=1).float()


def rel_err(got, want):
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def agreement(a, b, prompt_len):
    """Fraction of generated tokens equal, and the first step where a row differs (or None)."""
    a, b = a[:, prompt_len:], b[:, prompt_len:]
    eq = a == b
    first = None
    if not eq.all():
        first = int((~eq).int().argmax(dim=1)[~eq.all(dim=1)].min())
    return eq.float().mean().item(), first


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastllm.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="auto: bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--backend", default="auto", choices=["auto", "cuda", "triton", "torch"])
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per sequence")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--size", default="auto", choices=["auto"] + list(SIZES),
                    help="auto: large on GPU, small on CPU")
    ap.add_argument("--skip-attention", type=int, default=0, metavar="K",
                    help="also measure skip_attention=K (skip the last K layers' attention; lossy)")
    ap.add_argument("--quantize", choices=["w8a8", "w8a8-static", "w8a16"],
                    help="also measure fastllm.patch(model, quantize=...) (int8 linears; lossy)")
    args = ap.parse_args(argv)
    for name in ("tokens", "batch", "prompt_len"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = parse_device(ap, args.device, "auto, cpu, cuda or cuda:N")
    on_gpu = device.type == "cuda"
    size = args.size if args.size != "auto" else ("large" if on_gpu else "small")
    n_layers = SIZES[size][1]
    if not 0 <= args.skip_attention <= n_layers:
        ap.error(f"--skip-attention {args.skip_attention}: must be between 0 and the {size} model's {n_layers} "
                 "layers")

    import fastllm
    try:
        import transformers
    except ImportError:
        sys.exit("the demo needs transformers: pip install 'fastllm[hf]'")

    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (torch.bfloat16 if on_gpu else torch.float32)
    dname = str(dtype)[6:]
    torch.manual_seed(0)

    model = build_model(size, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    cfg = model.config
    print(f"fastllm {fastllm.__version__} demo: random-weight Llama ({size}: hidden {cfg.hidden_size}, "
          f"{cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads / {cfg.num_key_value_heads} kv "
          f"heads, vocab {cfg.vocab_size}, {n_params / 1e6:.1f} M params) on {device} "
          f"({torch.cuda.get_device_name(device) if on_gpu else 'CPU'}), {str(dtype)[6:]}; "
          f"transformers {transformers.__version__}, torch {torch.__version__}")
    ids, mask = prompts(args.batch, args.prompt_len, cfg.vocab_size, device)
    print(f"batch {args.batch} x {args.prompt_len} prompt tokens (left-padded), {args.tokens} new tokens each, "
          "greedy, DynamicCache\n")

    base_impl = model.config._attn_implementation
    ref_logits = logits(model, ids, mask)
    ref_out, ref_tps = timed_generate(model, ids, mask, args.tokens)
    ref_seq, ref_steps = step_logits(model, ids, mask, args.tokens)

    fastllm.patch(model, backend=args.backend)
    report = fastllm.patch_report(model)
    print(report)
    print()
    out_logits = logits(model, ids, mask)
    out, tps = timed_generate(model, ids, mask, args.tokens)
    seq, steps = step_logits(model, ids, mask, args.tokens)
    valid = mask.bool()
    diff = (out_logits - ref_logits)[valid].abs().max().item()
    scale = ref_logits[valid].abs().max().item()
    bound = ROUNDING_BOUND[dtype]
    rel = rel_err(out_logits[valid], ref_logits[valid])
    agree, first = agreement(ref_seq, seq, ids.shape[1])
    served = report.ops[0].selected if report.ops else "?"
    beyond = not rel <= bound          # NaN counts as beyond
    print(f"max |logit difference| patched vs unpatched ({base_impl}): {diff:.3g} "
          f"(logits up to {scale:.3g}; non-pad positions); relative error {rel:.3g} "
          f"(rounding bound for {dname}: {bound:g})")
    # Every generated step's logits up to the first different token (inputs identical until
    # then) must agree within the bound too: a decode-only kernel bug shows here.
    n = args.tokens if first is None else first + 1
    step_rel = rel_err(steps[:, :n], ref_steps[:, :n])
    beyond = beyond or not step_rel <= bound
    print(f"logits of generated steps 0..{n - 1}: relative error {step_rel:.3g}")
    why = "" if first is None else (f": logits differ beyond {dname} rounding" if beyond else
                                    f": a near-tie under {dname} rounding, the logits up to it agree within "
                                    f"{bound:g}")
    print(f"greedy tokens equal: {agree:.1%}" + ("" if first is None else f" (first difference at step {first}{why})"))
    if beyond:
        print(f"ERROR: patched and unpatched outputs differ beyond {dname} rounding (bound {bound:g} on the "
              "relative logit error): a wrong kernel, not rounding")
    print(f"tokens/s unpatched ({base_impl}): {ref_tps:,.0f}")
    print(f"tokens/s fastllm ({served} backend): {tps:,.0f}  ({tps / ref_tps:.2f}x)")
    if served == "torch":
        print("  note: the torch backend is fastllm's pure-PyTorch reference (the CPU fallback): it is "
              "correct, not fast. The speedup comes from the cuda / triton kernels on a GPU.")
    from fastllm.patch import _attention
    if _attention.kernel_name_for(1) == _attention.kernel_name_for(512):
        print("  note: decode steps (1 query) also run the prefill flash_attention kernel; no decode "
              "(split-KV) kernel yet.")

    if args.skip_attention:
        k = args.skip_attention
        fastllm.unpatch(model)
        fastllm.patch(model, backend=args.backend, skip_attention=k)
        skip_logits = logits(model, ids, mask)
        skip_out, skip_tps = timed_generate(model, ids, mask, args.tokens)
        d = (skip_logits - ref_logits)[valid]
        top1 = (skip_logits.argmax(-1) == ref_logits.argmax(-1))[valid].float().mean().item()
        agree, _ = agreement(ref_out, skip_out, ids.shape[1])
        print(f"\nskip_attention={k} (attention of the last {k} of {cfg.num_hidden_layers} layers skipped; "
              "lossy, arXiv 2404.05741):")
        print(f"  tokens/s {skip_tps:,.0f} ({skip_tps / tps:.2f}x vs fastllm, {skip_tps / ref_tps:.2f}x vs unpatched)")
        print(f"  prompt logits: max |diff| {d.abs().max().item():.3g}, mean |diff| {d.abs().mean().item():.3g}, "
              f"top-1 agreement {top1:.1%}; greedy tokens equal {agree:.1%}")
        print("  (random weights: the accuracy cost on a trained model must be measured on that model)")

    if args.quantize:
        fastllm.unpatch(model)
        cal = None
        if args.quantize == "w8a8-static":   # static activation scales are calibrated on other prompts
            c_ids, c_mask = prompts(2, args.prompt_len, cfg.vocab_size, device)
            cal = [{"input_ids": c_ids, "attention_mask": c_mask}]
        fastllm.patch(model, backend=args.backend, quantize=args.quantize, calibration=cal, keep_original=True)
        rep = fastllm.patch_report(model)
        q_logits = logits(model, ids, mask)
        q_out, q_tps = timed_generate(model, ids, mask, args.tokens)
        d = (q_logits - ref_logits)[valid]
        rel = (d.norm() / ref_logits[valid].norm()).item()
        agree, _ = agreement(ref_out, q_out, ids.shape[1])
        ops = ", ".join(f"{o.op}: {o.selected}" for o in rep.ops)
        print(f"\nquantize={args.quantize!r} ({len([m for m in rep.replaced if 'Int8' in m.detail])} linears -> "
              f"Int8Linear, {rep.bytes_saved / 2 ** 20:.1f} MiB saved; {ops}; lossy):")
        print(f"  tokens/s {q_tps:,.0f} ({q_tps / ref_tps:.2f}x vs unpatched)")
        print(f"  prompt logits: max |diff| {d.abs().max().item():.3g}, relative error {rel:.3g}; "
              f"greedy tokens equal {agree:.1%}")
    else:
        print("\n(lossy int8 linears too: python -m fastllm.demo --quantize w8a8 | w8a8-static | w8a16)")

    fastllm.unpatch(model)
    assert model.config._attn_implementation == base_impl
    return 1 if beyond else 0


if __name__ == "__main__":
    sys.exit(main())
