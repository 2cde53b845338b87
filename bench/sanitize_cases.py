"""Small cases of every CUDA op, run under compute-sanitizer by bench/gpu_suite.sh.

    compute-sanitizer --tool memcheck python bench/sanitize_cases.py [op ...]

Each case runs the cuda backend once on odd shapes (so tails and masks are exercised) and
checks the result against the reference, so a race that changes values fails here too.
"""
import sys

import torch

import fastllm
from fastllm import ref

CASES = {}


def case(name):
    def deco(fn):
        CASES[name] = fn
        return fn
    return deco


@case("quantize_per_token")
def _quantize():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for M, K in ((3, 17), (5, 1032)):
            x = torch.randn(M, K, device="cuda", dtype=dtype)
            q, s = fastllm.ops.quantize_per_token(x, backend="cuda")
            rq, rs = ref.quantize_per_token(x)
            assert torch.equal(q, rq) and torch.equal(s, rs), (dtype, M, K)


@case("flash_attention")
def _flash_attention():
    # Odd lengths (tails of the 128-row / 64-key tiles), GQA, a padding mask with an empty
    # batch row, causal with Sq > Skv, window + softcap; every dtype and head dim once.
    from fastllm.ops._attention_cuda import HEAD_DIMS, flash_attention_cuda
    cases = [dict(B=2, Hq=4, Hkv=2, Sq=37, Skv=70, causal=True),
             dict(B=2, Hq=4, Hkv=1, Sq=70, Skv=37, causal=True),
             dict(B=2, Hq=2, Hkv=2, Sq=19, Skv=133, causal=False, window=40, softcap=20.0, mask=True)]
    for i, D in enumerate(HEAD_DIMS):
        for dtype in (torch.float16, torch.bfloat16):
            c = dict(cases[i % len(cases)])
            B, Hq, Hkv, Sq, Skv = (c.pop(n) for n in ("B", "Hq", "Hkv", "Sq", "Skv"))
            q = torch.randn(B, Sq, Hq, D, device="cuda", dtype=dtype).transpose(1, 2)
            k = torch.randn(B, Skv, Hkv, D, device="cuda", dtype=dtype).transpose(1, 2)
            v = torch.randn(B, Skv, Hkv, D, device="cuda", dtype=dtype).transpose(1, 2)
            mask = None
            if c.pop("mask", False):
                mask = torch.rand(B, 1, 1, Skv, device="cuda") > 0.3
                mask[1] = False
            scale = D ** -0.5
            out, lse = flash_attention_cuda(q, k, v, mask, c["causal"], scale, c.get("window", 0),
                                            c.get("softcap", 0.0))
            rout, rlse = ref.flash_attention(q.float(), k.float(), v.float(), scale=scale, mask=mask, **c)
            assert not out.isnan().any() and not lse.isnan().any(), (D, dtype)
            err = (out.float() - rout).abs().max().item()
            assert err < 2e-2, (D, dtype, err)
            empty = torch.isinf(rlse)
            assert torch.equal(torch.isinf(lse), empty), (D, dtype)
            assert (lse[~empty] - rlse[~empty]).abs().max().item() < 1e-2, (D, dtype)


@case("flash_attention_varlen")
def _flash_attention_varlen():
    # Packed sequences with an empty query run, an empty key run and q longer than k.
    from fastllm.ops._attention_cuda import flash_attention_varlen_cuda
    lens_q, lens_k = [3, 0, 70, 19], [40, 5, 37, 0]
    cu_q = torch.tensor([0] + lens_q, device="cuda").cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k, device="cuda").cumsum(0).to(torch.int32)
    for D, dtype in ((64, torch.float16), (256, torch.bfloat16)):
        q = torch.randn(int(cu_q[-1]), 4, D, device="cuda", dtype=dtype)
        k = torch.randn(int(cu_k[-1]), 2, D, device="cuda", dtype=dtype)
        v = torch.randn(int(cu_k[-1]), 2, D, device="cuda", dtype=dtype)
        out, lse = flash_attention_varlen_cuda(q, k, v, cu_q, cu_k, 70, 40, True, D ** -0.5, 0, 0.0)
        rout, rlse = ref.flash_attention_varlen(q.float(), k.float(), v.float(), cu_q, cu_k, causal=True)
        assert (out.float() - rout).abs().max().item() < 2e-2, (D, dtype)
        assert torch.equal(torch.isinf(lse), torch.isinf(rlse)), (D, dtype)

def main(names):
    for name in names or CASES:
        CASES[name]()
        torch.cuda.synchronize()
        print(f"sanitize case {name}: ok")


if __name__ == "__main__":
    main(sys.argv[1:])
