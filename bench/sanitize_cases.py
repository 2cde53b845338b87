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


def main(names):
    for name in names or CASES:
        CASES[name]()
        torch.cuda.synchronize()
        print(f"sanitize case {name}: ok")


if __name__ == "__main__":
    main(sys.argv[1:])
