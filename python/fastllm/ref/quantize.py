"""Reference per-token symmetric int8 quantization (see csrc/int8/quantize_per_token.cu).

scale[m] = amax_m / 127; q = round_half_even(x * (127 / amax_m)) clamped to +-127.
amax == 0 -> scale 1, q 0. A row with NaN/inf -> scale NaN, q 0. A row whose amax is below
127 / FLT_MAX (~3.7e-37, below fp16's range) has 127 / amax = inf: its nonzero values become
+-127 and its zeros 0 on every backend alike (kept rather than special-cased in every kernel).
The CUDA and Triton kernels reproduce this bit for bit (same fp32 division, one rounded
multiply, round-half-even).
"""
import torch


def quantize_per_token(x: torch.Tensor):
    xf = x.float()
    amax = xf.abs().amax(dim=1) if x.shape[1] > 0 else xf.new_zeros(x.shape[0])
    finite = torch.isfinite(xf).all(dim=1) if x.shape[1] > 0 else torch.ones_like(amax, dtype=torch.bool)
    ok = finite & (amax > 0)
    # Not `127.0 / t`: PyTorch computes that as t.reciprocal() * 127, off by an ulp at times.
    inv = torch.full_like(amax, 127.0).div(torch.where(ok, amax, torch.ones_like(amax)))
    inv = torch.where(ok, inv, torch.zeros_like(amax))
    q = torch.round(torch.nan_to_num(xf, nan=0.0, posinf=0.0, neginf=0.0) * inv[:, None])
    q = q.clamp_(-127, 127).to(torch.int8).contiguous()  # elementwise ops keep x's layout; q is row-major
    # Tensor / tensor: on CUDA PyTorch turns `t / 127.0` into t * fl(1/127) (an ulp off for ~5%
    # of values); the kernels divide (IEEE), and so must the reference on every device.
    scale = torch.where(finite, torch.where(amax > 0, amax.div(torch.full_like(amax, 127.0)), torch.ones_like(amax)),
                        torch.full_like(amax, float("nan")))
    return q, scale
