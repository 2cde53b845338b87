"""skip_attention on CPU: speed and output change of fastllm.patch(skip_attention=k) on a
Llama-style model with random weights (no downloads here); medians of 7 prefills and 3
generations (fastllm.bench.timing.Timer), and the KV cache's size after the prefill.
Numbers in README "Patching a model".

    python bench/skip_attention_cpu.py
"""
import copy, torch, transformers, fastllm
from fastllm.bench.timing import Timer
torch.manual_seed(0)
torch.set_num_threads(2)
cfg = transformers.LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                               num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048)
base = transformers.LlamaForCausalLM(cfg).eval()
ids = torch.randint(0, 4096, (1, 256))

def cache_bytes(cache):
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))

def bench(model):
    with torch.no_grad():
        o = model(ids, use_cache=True)
        logits, kv = o.logits, cache_bytes(getattr(o, "cache", None) or o.past_key_values)
        for _ in range(2):
            model.generate(ids[:, :64], max_new_tokens=8, do_sample=False)
        pre = ids.shape[1] / Timer("cpu", warmup=0, reps=7)(lambda: model(ids))
        gen = lambda: model.generate(ids[:, :64], max_new_tokens=64, min_new_tokens=64, do_sample=False)  # noqa: E731
        dec = 64 / Timer("cpu", warmup=0, reps=3)(gen)
        out = gen()   # greedy: the same tokens as the timed runs
    return logits, out, pre, dec, kv

ref_logits, ref_out, pre0, dec0, kv0 = bench(base)
print(f"unpatched (sdpa): prefill {pre0:.0f} tok/s, decode {dec0:.1f} tok/s, KV cache {kv0 / 2**20:.2f} MiB")
for kw in ({}, {"skip_attention": 1}, {"skip_attention": 2}):
    m = fastllm.patch(copy.deepcopy(base), **kw)
    lg, out, pre, dec, kv = bench(m)
    d = (lg - ref_logits).abs().max().item()
    top1 = (lg.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    same = (out[:, 64:] == ref_out[:, 64:]).float().mean().item()
    print(f"patch({kw}): prefill {pre:.0f} tok/s ({pre/pre0:.2f}x), decode {dec:.1f} tok/s ({dec/dec0:.2f}x), "
          f"KV cache {kv / 2**20:.2f} MiB, max|dlogit| {d:.3g}, top-1 agreement {top1:.3f}, "
          f"generated tokens equal {same:.3f}")
