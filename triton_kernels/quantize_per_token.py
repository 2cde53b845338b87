"""Per-token symmetric int8 quantization in Triton (semantics: fastllm/ref/quantize.py).

One program per row: pass 1 reduces |x| to amax (and spots NaN/inf), pass 2 writes
q = rne(x * (127 / amax)). Bit-exact with the reference and the CUDA kernel: the division
is IEEE (div_rn) and the multiply is rounded on its own before rounding to integer; on a GPU
that needs mul_rn + rint from libdevice (a plain `*` may be fused into an FMA), which the
interpreter lacks, so INTERPRET selects numpy-exact equivalents there.
"""
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

# Rounds to nearest-even for |y| < 2**22: adding 1.5 * 2**23 leaves no fraction bits.
_RNE_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def quantize_per_token_kernel(x_ptr, q_ptr, scale_ptr, K, stride_x,
                              BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * K
    offs = tl.arange(0, BLOCK)

    amax = tl.zeros([BLOCK], dtype=tl.float32)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    for k in range(0, K, BLOCK):
        m = k + offs < K
        v = tl.abs(tl.load(x_row + k + offs, mask=m, other=0.0).to(tl.float32))
        bad |= (~(v <= 3.402823466e38)).to(tl.int32)  # NaN or inf
        amax = tl.maximum(amax, tl.where(v == v, v, 0.0))
    row_bad = tl.max(bad, axis=0) > 0
    a = tl.max(amax, axis=0)
    ok = (a > 0.0) & (~row_bad)
    inv = tl.where(ok, tl.math.div_rn(127.0, tl.where(ok, a, 1.0)), 0.0)
    scale = tl.where(row_bad, float("nan"), tl.where(a > 0.0, tl.math.div_rn(a, 127.0), 1.0))
    tl.store(scale_ptr + row, scale)

    for k in range(0, K, BLOCK):
        m = k + offs < K
        v = tl.load(x_row + k + offs, mask=m, other=0.0).to(tl.float32)
        if INTERPRET:
            y = (v * inv + _RNE_MAGIC) - _RNE_MAGIC
        else:
            y = libdevice.rint(libdevice.mul_rn(v, inv))
        # amax < 127 / FLT_MAX makes inv inf and a zero's product NaN, which the GPU's
        # tl.maximum (maxnum) would turn into -127 (the interpreter's np.maximum keeps NaN -> 0).
        y = tl.where(y == y, y, 0.0)
        y = tl.where(row_bad, 0.0, tl.minimum(tl.maximum(y, -127.0), 127.0))
        tl.store(q_row + k + offs, y.to(tl.int8), mask=m)


def quantize_per_token(x: torch.Tensor):
    """x: (M, K) fp16/bf16/fp32 with unit stride in K -> (q int8 (M, K), scale fp32 (M,))."""
    M, K = x.shape
    q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    scale = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M == 0:
        return q, scale
    # 16 B per thread per load at 4 warps for fp16; smaller K takes one pass per row.
    block = min(max(triton.next_power_of_2(K), 16), 2048)
    from . import interpreting
    quantize_per_token_kernel[(M,)](x, q, scale, K, x.stride(0), BLOCK=block, INTERPRET=interpreting())
    return q, scale
