"""int8 matmuls in Triton: W8A8 (int8 x int8 -> int32, fused dequant epilogue) and W8A16
(int8 weights dequantized in registers against fp16/bf16/fp32 activations).
Semantics: fastllm/ref/int8.py. Run the tests with `pytest tests/test_int8.py` (no GPU: the
Triton interpreter runs these kernels on CPU tensors).

W8A8.  C[m, n] = (fp32(sum_k A[m, k] * B[n, k]) * a_scale[m]) * w_scale[n] + bias[n]
  A (M, K) int8 activations, B (N, K) int8 weights (nn.Linear layout, read as B^T tiles).
  Each program owns a BLOCK_M x BLOCK_N tile of C, walks K in BLOCK_K steps with
  tl.dot(int8, int8) -> int32 (exact; tensor-core IMMA on a GPU, ~2x the bf16 rate), and
  applies the scales and bias in registers before the single store: the int32 accumulator
  never reaches memory (unless the caller asks for it: SCALED=False stores it raw).
  Bytes moved (naive): M*K + N*K in, M*N*out_bytes out; FLOPs 2*M*N*K.

W8A8, static activations (QUANT_A). A is the float activation X; each loaded X tile is
  quantized in registers, Aq = rne(clamp(fp32(X) * mul[k], -127, 127)) (mul: smoothing /
  act_scale per channel, or 1 / act_scale), before the same int8 tl.dot. With a calibrated
  scale there is no row reduction, so the quantization pass over X and its int8 copy in memory
  disappear; every N tile re-quantizes its A tiles (one multiply + round per element per
  BLOCK_N MACs). Bit-exact with fastllm/ref/int8.py quantize_static.

W8A8, dynamic per-token activations (QUANT_A + DYN_A), for small M. A is the float activation
  X (optionally times SmoothQuant factors mul[k]); a pre-pass over the program's BLOCK_M rows
  finds each row's amax (and NaN / inf) exactly as quantize_per_token.py does, then the main
  loop quantizes each loaded tile with the row's 127 / amax and the epilogue uses amax / 127 as
  a_scale. Bit-exact with quantize_per_token followed by the W8A8 GEMM. Every N tile redoes
  the row pre-pass (A read twice, mostly from L2): at decode sizes that is far less than the
  launch, the int8 copy of A and its re-read it replaces; at large M it is not, and the caller
  quantizes separately (fastllm/ops/int8_dynamic.py FUSE_MAX_M).

W8A16. C[m, n] = sum_k X[m, k] * (W[n, k] * s[n, k // group]) + bias[n]
  For decode (M = 1..16) the weights are the cost: N*K bytes (half of fp16) for 2*M*N*K
  FLOPs, so the kernel is bandwidth-bound and wants every SM streaming weights: BLOCK_M is
  small (16: tl.dot's minimum) and K is split across SPLIT_K programs when the N tiles alone
  do not fill the GPU; the SPLIT_K fp32 partial tiles (M*N*4 bytes each, tiny next to the
  weights at decode sizes) are summed by the wrapper. The int8 tile is converted to the
  activation dtype in registers (exact: |w| <= 128) and fed to tl.dot with an fp32
  accumulator. Per-channel scales multiply the accumulator once at the end; per-group scales
  multiply each BLOCK_K partial product (BLOCK_K divides group_size, so a K tile never
  straddles two groups) -- no rounding of dequantized weights to 16 bits at all.

Out-of-range rows/columns are not masked on load: their indices wrap (offs % M), so they read
valid memory and are simply never stored. K is masked only when BLOCK_K does not divide it
(EVEN_K is a constexpr, so the common case carries no masks).

Interpreter: a bf16 tl.dot multiplies raw bits there (triton#11584), so under INTERPRET the
W8A16 operands are upcast to fp32 (exact: both are exact in fp32 and the products are too).
int8 tl.dot is exact in the interpreter and on GPUs.

Tile configs live in ONE place, pick_config(); nothing else knows a tile size.
"""
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import capability, interpreting, k_offsets_fit, sm_count

# Rounds to nearest-even for |y| < 2**22 (the interpreter has no libdevice.rint).
_RNE_MAGIC = tl.constexpr(12582912.0)


class Config(NamedTuple):
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    SPLIT_K: int = 1
    GROUP_M: int = 8      # programs along M sharing the same N tiles, for L2 reuse of B
    num_warps: int = 4
    num_stages: int = 3


def pick_config(kind: str, M: int, N: int, K: int, *, group_size: int = 0, sms: int = 132,
                arch: int = 90, interpret: bool = False) -> Config:
    """The tile config for kind "w8a8", "w8a8-static" or "w8a16" at this (M bucket, N, K).

    GPU configs are the usual Hopper/Ampere shapes for 8-bit operands: int8 tl.dot needs
    BLOCK_K >= 32 (one m16n8k32 MMA); 128 int8 = 128 bytes per row per stage, the same bytes
    as a 64-wide bf16 tile. Small M gets BLOCK_M = 16 (nothing is gained computing padding
    rows) and wider N/K per program; large M gets 128x128/128x256 tiles with 8 warps.
    arch (capability, 80 / 86 / 89 / 90): the tiles below sm_90 are the ones that compile
    without spills under every Triton from 3.5 to 3.9 (bench/triton_versions_check.sh): no
    128x256 there (3.8+ spill 1.2 to 15.8 KB in the epilogue), 8 warps on 64x128x128 (4 warps
    spill under 3.7 to 3.9), BLOCK_K 64 for 16-bit A tiles at M > 32.
    Under the interpreter the configs are fixed and small: tiles far below the test shapes so
    that partial tiles, masked K and split-K are all exercised, with few enough programs to
    keep the CPU run short.
    """
    if kind in ("w8a8", "w8a8-static"):
        if interpret:
            return Config(16 if M <= 16 else 32, 32, 32, GROUP_M=2, num_stages=1)
        if M <= 16:
            cfg = Config(16, 64, 256, num_warps=4, num_stages=4)
        elif M <= 32:
            cfg = Config(32, 64, 256, num_warps=4, num_stages=4)
        elif M <= 64:
            cfg = Config(64, 128, 128, num_warps=4 if arch >= 90 else 8, num_stages=4)
        elif M <= 128:
            cfg = Config(128, 128, 128, num_warps=8, num_stages=3)
        else:
            # BLOCK_K 64, not 128: with 128 the raw-int32 variant spills on sm_80/86
            # (bench/triton_compile_check.py); one more stage keeps the same bytes in flight.
            cfg = Config(128, 256 if arch >= 90 else 128, 64, num_warps=8, num_stages=4)
        if kind == "w8a8-static" and cfg.BLOCK_K > 128:
            # The A tile arrives in 16 bits (twice the int8 bytes) and is quantized in
            # registers: K 256 spills (sm_86 at M 32, sm_90 at M 16) and fills shared memory.
            cfg = cfg._replace(BLOCK_K=128)
        if kind == "w8a8-static" and arch < 90 and M > 32 and cfg.BLOCK_K > 64:
            # With a 16-bit A tile, 128 x 128 x 128 spills 24-32 B below sm_90 (Triton 3.7+) and
            # 64 x 128 x 128 x 4 stages needs 104 KB of shared memory under Triton 3.2 (sm_86: 99).
            cfg = cfg._replace(BLOCK_K=64, num_stages=cfg.num_stages + 1)
        # Do not walk K in steps far larger than K itself (min 32: int8 MMA k-width).
        return cfg._replace(BLOCK_K=max(32, min(cfg.BLOCK_K, triton.next_power_of_2(K))))

    if kind != "w8a16":
        raise ValueError(f"unknown kind {kind!r}")
    if interpret:
        cfg = Config(16 if M <= 16 else 32, 32, 32, GROUP_M=2, num_stages=1)
    elif M <= 16:
        cfg = Config(16, 64, 256, num_warps=4, num_stages=4)
    elif M <= 64:
        cfg = Config(M if M <= 32 else 64, 64, 128, num_warps=4, num_stages=4)
        cfg = cfg._replace(BLOCK_M=triton.next_power_of_2(cfg.BLOCK_M))
    elif M <= 128:
        cfg = Config(128, 128, 64, num_warps=8, num_stages=3)
    elif group_size:
        # Per-group scales keep a second (partial) accumulator live: 128 x 256 spills.
        cfg = Config(128, 128, 64, num_warps=8, num_stages=3)
    else:
        # 128 x 256 spills below sm_90 under Triton 3.8+ (8 B fp16, 72 B bf16 at sm_80).
        cfg = Config(128, 256 if arch >= 90 else 128, 64, num_warps=8, num_stages=3)
    bk = max(16, min(cfg.BLOCK_K, triton.next_power_of_2(K)))
    if group_size:
        bk = min(bk, group_size & -group_size)  # a K tile must sit inside one group
    cfg = cfg._replace(BLOCK_K=bk)
    if M <= 16:
        cfg = cfg._replace(SPLIT_K=split_k(M, N, K, cfg, sms, interpret))
    return cfg


def split_k(M: int, N: int, K: int, cfg, sms: int, interpret: bool) -> int:
    """K splits for a decode-sized call (shared with sparse24_gemm.py): double them while the
    (M, N) tiles alone leave SMs idle, keeping >= 4 K tiles per split (2 under the
    interpreter, so the tests run split-K on their small shapes)."""
    tiles = triton.cdiv(M, cfg.BLOCK_M) * triton.cdiv(N, cfg.BLOCK_N)
    k_tiles = triton.cdiv(K, cfg.BLOCK_K)
    per_split, target = (2, 2) if interpret else (4, sms)
    split = 1
    while tiles * split < target and k_tiles // (split * 2) >= per_split:
        split *= 2
    return split


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped ordering: GROUP_M consecutive programs share one column of B tiles (L2 reuse).
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_rows = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_rows
    pid_n = (pid % num_pid_in_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _store_out(ptrs, x, mask, INTERPRET: tl.constexpr):
    """Store fp32 `x` rounded to the pointer's dtype. The interpreter's fp32 -> bf16 cast
    truncates (a GPU rounds to nearest even), so there the rounding is done on the bits first:
    add 0x7FFF plus the lowest kept bit, clear the low half; the cast is then exact."""
    if INTERPRET and ptrs.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _quantize_tile(x, mul, INTERPRET: tl.constexpr):
    """int8 rne(clamp(fp32(x) * mul, -127, 127)), NaN -> 0 (fastllm/ref/int8.py quantize_static)."""
    y = x.to(tl.float32)
    if INTERPRET:
        y = y * mul
    else:
        y = libdevice.mul_rn(y, mul)      # one rounding, as the reference
    y = tl.where(y == y, y, 0.0)
    y = tl.minimum(tl.maximum(y, -127.0), 127.0)
    if INTERPRET:
        y = (y + _RNE_MAGIC) - _RNE_MAGIC
    else:
        y = libdevice.rint(y)
    return y.to(tl.int8)


@triton.jit
def _scaled_input(x, mul, HAS_MUL: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32(x), times mul (one rounding, never fused into an FMA) when HAS_MUL."""
    y = x.to(tl.float32)
    if HAS_MUL:
        if INTERPRET:
            y = y * mul
        else:
            y = libdevice.mul_rn(y, mul)
    return y


@triton.jit
def _row_quant_params(a_ptrs, mul_ptrs, K, stride_ak, stride_mul, BLOCK_M: tl.constexpr,
                      BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, HAS_MUL: tl.constexpr,
                      INTERPRET: tl.constexpr):
    """Per row of the A tile rows: (inv = 127 / amax or 0, a_scale = amax / 127 (1 for an
    all-zero row, NaN for a row holding NaN / inf), bad) -- quantize_per_token.py's formulas."""
    offs_k = tl.arange(0, BLOCK_K)
    amax = tl.zeros([BLOCK_M], dtype=tl.float32)
    bad = tl.zeros([BLOCK_M], dtype=tl.int32)
    for kt in tl.range(0, tl.cdiv(K, BLOCK_K), num_stages=1):   # not pipelined: no shared memory
        if EVEN_K:
            x = tl.load(a_ptrs)
            mul = tl.load(mul_ptrs)[None, :] if HAS_MUL else 1.0
        else:
            k_ok = offs_k < K - kt * BLOCK_K
            x = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            mul = tl.load(mul_ptrs, mask=k_ok, other=0.0)[None, :] if HAS_MUL else 1.0
        v = tl.abs(_scaled_input(x, mul, HAS_MUL, INTERPRET))
        bad |= tl.max((~(v <= 3.402823466e38)).to(tl.int32), 1)      # NaN or inf
        amax = tl.maximum(amax, tl.max(tl.where(v == v, v, 0.0), 1))
        a_ptrs += BLOCK_K * stride_ak
        mul_ptrs += BLOCK_K * stride_mul
    row_bad = bad > 0
    ok = (amax > 0.0) & (~row_bad)
    inv = tl.where(ok, tl.math.div_rn(127.0, tl.where(ok, amax, 1.0)), 0.0)
    a_scale = tl.where(row_bad, float("nan"), tl.where(amax > 0.0, tl.math.div_rn(amax, 127.0), 1.0))
    return inv, a_scale, row_bad


@triton.jit
def _quantize_rows(x, mul, inv, row_bad, HAS_MUL: tl.constexpr, INTERPRET: tl.constexpr):
    """int8 rne(y * inv[m]) clamped to +-127, 0 on bad rows (quantize_per_token.py's pass 2)."""
    y = _scaled_input(x, mul, HAS_MUL, INTERPRET)
    if INTERPRET:
        y = (y * inv[:, None] + _RNE_MAGIC) - _RNE_MAGIC
    else:
        y = libdevice.rint(libdevice.mul_rn(y, inv[:, None]))
    y = tl.where(y == y, y, 0.0)   # 0 * inf (inv of an amax < 127 / FLT_MAX): 0, as the reference
    y = tl.where(row_bad[:, None], 0.0, tl.minimum(tl.maximum(y, -127.0), 127.0))
    return y.to(tl.int8)


@triton.jit
def int8_matmul_kernel(a_ptr, b_ptr, c_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, mul_ptr,
                       M, N, K,
                       stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
                       stride_as, stride_ws, stride_bias, stride_mul,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
                       SCALED: tl.constexpr, A_SCALE_PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr,
                       QUANT_A: tl.constexpr, DYN_A: tl.constexpr, HAS_MUL: tl.constexpr,
                       INTERPRET: tl.constexpr):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rm = (offs_m % M).to(tl.int64)  # wrapped: loads stay in bounds, these rows are not stored
    rn = (offs_n % N).to(tl.int64)
    a_ptrs = a_ptr + rm[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + rn[None, :] * stride_bn   # B^T tile (K, N)

    mul_ptrs = mul_ptr + offs_k * stride_mul     # stride 0: one per-tensor multiplier
    if DYN_A:   # per-row scales of this program's rows, before the main loop
        inv, row_scale, row_bad = _row_quant_params(a_ptrs, mul_ptrs, K, stride_ak, stride_mul, BLOCK_M,
                                                    BLOCK_K, EVEN_K, HAS_MUL, INTERPRET)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
            mul = tl.load(mul_ptrs)[None, :] if HAS_MUL else 1.0
        else:
            k_ok = offs_k < K - kt * BLOCK_K
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0)
            mul = tl.load(mul_ptrs, mask=k_ok, other=0.0)[None, :] if HAS_MUL else 1.0
        if QUANT_A:
            if DYN_A:
                a = _quantize_rows(a, mul, inv, row_bad, HAS_MUL, INTERPRET)
            else:
                a = _quantize_tile(a, mul, INTERPRET)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
        mul_ptrs += BLOCK_K * stride_mul

    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    c_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if SCALED:
        out = acc.to(tl.float32)
        if DYN_A:
            out = out * row_scale[:, None]
        elif A_SCALE_PER_ROW:
            out = out * tl.load(a_scale_ptr + rm * stride_as)[:, None]
        else:
            out = out * tl.load(a_scale_ptr)
        out = out * tl.load(w_scale_ptr + rn * stride_ws)[None, :]
        if HAS_BIAS:
            out = out + tl.load(bias_ptr + rn * stride_bias).to(tl.float32)[None, :]
        _store_out(c_ptrs, out, c_mask, INTERPRET)
    else:
        tl.store(c_ptrs, acc, mask=c_mask)


@triton.jit
def w8a16_matmul_kernel(x_ptr, w_ptr, c_ptr, s_ptr, bias_ptr,
                        M, N, K, group_size,
                        stride_xm, stride_xk, stride_wn, stride_wk, stride_cs, stride_cm, stride_cn,
                        stride_sn, stride_sg, stride_bias,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
                        PER_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_IEEE: tl.constexpr,
                        INTERPRET: tl.constexpr):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % N).to(tl.int64)
    x_offs = rm[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_offs = offs_k[:, None] * stride_wk + rn[None, :] * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Scalar base pointers advanced per tile: k0 * stride_xk in int32 passes 2^31 for a
    # column-major x (stride_xk = M) at M = 131072, K = 28672.
    x_k = x_ptr + (pid_k * BLOCK_K) * stride_xk
    w_k = w_ptr + (pid_k * BLOCK_K) * stride_wk
    # Split s of SPLIT_K takes K tiles s, s + SPLIT_K, ...
    for kt in range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K):
        k0 = kt * BLOCK_K
        if EVEN_K:
            x = tl.load(x_k + x_offs)
            w = tl.load(w_k + w_offs)
        else:
            k_ok = offs_k < K - k0
            x = tl.load(x_k + x_offs, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_k + w_offs, mask=k_ok[:, None], other=0)
        x_k += SPLIT_K * BLOCK_K * stride_xk
        w_k += SPLIT_K * BLOCK_K * stride_wk
        if INTERPRET:
            part = tl.dot(x.to(tl.float32), w.to(tl.float32))
        elif DOT_IEEE:
            part = tl.dot(x, w.to(x.dtype), input_precision="ieee")
        else:
            part = tl.dot(x, w.to(x.dtype))
        if PER_GROUP:
            g = k0 // group_size
            acc += part * tl.load(s_ptr + rn * stride_sn + g * stride_sg)[None, :]
        else:
            acc += part
    if not PER_GROUP:
        acc = acc * tl.load(s_ptr + rn * stride_sn)[None, :]

    c_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    c_ptrs = c_ptr + pid_k * stride_cs + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + rn * stride_bias).to(tl.float32)[None, :]
        _store_out(c_ptrs, acc, c_mask, INTERPRET)
    else:
        tl.store(c_ptrs, acc, mask=c_mask)  # fp32 partial; the wrapper sums the splits


def _on(t: torch.Tensor) -> dict:
    """pick_config's device arguments for t's GPU."""
    return dict(sms=sm_count(t.device), arch=capability(t.device))


def int8_matmul(a: torch.Tensor, b: torch.Tensor, a_scale: Optional[torch.Tensor] = None,
                w_scale: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                out_dtype: torch.dtype = torch.bfloat16, config: Optional[Config] = None,
                out: Optional[torch.Tensor] = None, in_mul: Optional[torch.Tensor] = None,
                dynamic: bool = False) -> torch.Tensor:
    """a (M, K) int8, b (N, K) int8, any strides. With a_scale is None: the raw int32 a @ b.T.
    Else a_scale (M,) or 1 element fp32, w_scale (N,) fp32, bias (N,) float or None -> out_dtype.
    in_mul (K,) or 1 element fp32: `a` is the float activation, quantized in the kernel as
    quantize_static(a, in_mul) (static W8A8; needs a_scale).
    dynamic: `a` is the float activation, quantized per row in the kernel as quantize_per_token
    (of fp32(a) * in_mul when in_mul (K,) is given: SmoothQuant); a_scale must be None (it comes
    from the rows); w_scale is required.
    config overrides pick_config; out (M, N), any strides, is written in place (tests poison it)."""
    a, b, in_mul = k_offsets_fit(a), k_offsets_fit(b), k_offsets_fit(in_mul)
    M, K = a.shape
    N = b.shape[0]
    if dynamic:
        if a_scale is not None or w_scale is None:
            raise ValueError("dynamic quantization computes a_scale itself and needs w_scale")
        a_scale = w_scale           # only a placeholder pointer: the kernel uses the row scales
    scaled = a_scale is not None
    if in_mul is not None and not scaled:
        raise ValueError("in_mul (static quantization) needs the scaled epilogue (a_scale, w_scale)")
    if out is None:
        out = torch.empty((M, N), dtype=out_dtype if scaled else torch.int32, device=a.device)
    if M == 0 or N == 0:
        return out
    quant_a = in_mul is not None or dynamic
    kind = "w8a8-static" if quant_a else "w8a8"     # (a 16-bit A tile either way)
    cfg = config or pick_config(kind, M, N, K, **_on(a), interpret=interpreting())
    grid = (triton.cdiv(M, cfg.BLOCK_M) * triton.cdiv(N, cfg.BLOCK_N),)
    per_row = scaled and not dynamic and a_scale.numel() > 1
    dummy = out  # never read when the matching flag is off
    has_mul = in_mul is not None
    int8_matmul_kernel[grid](
        a, b, out, a_scale if scaled else dummy, w_scale if scaled else dummy,
        bias if bias is not None else dummy, in_mul if has_mul else dummy,
        M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        a_scale.stride(0) if per_row else 0, w_scale.stride(0) if scaled else 0,
        bias.stride(0) if bias is not None else 0,
        in_mul.stride(0) if has_mul and in_mul.numel() > 1 else 0,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
        EVEN_K=K % cfg.BLOCK_K == 0, SCALED=scaled, A_SCALE_PER_ROW=per_row, HAS_BIAS=bias is not None,
        QUANT_A=quant_a, DYN_A=dynamic, HAS_MUL=has_mul, INTERPRET=interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def w8a16_matmul(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 group_size: int = 0, config: Optional[Config] = None,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (M, K) fp16/bf16/fp32, w (N, K) int8, w_scale (N,) (group_size 0) or (N, K // group_size)
    fp32, bias (N,) or None -> (M, N) in x.dtype. Any strides. config / out as in int8_matmul."""
    x, w, w_scale = k_offsets_fit(x), k_offsets_fit(w), k_offsets_fit(w_scale)
    M, K = x.shape
    N = w.shape[0]
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    interp = interpreting()
    cfg = config or pick_config("w8a16", M, N, K, group_size=group_size, **_on(x), interpret=interp)
    if group_size and group_size % cfg.BLOCK_K:
        raise ValueError(f"BLOCK_K {cfg.BLOCK_K} must divide group_size {group_size}")
    split = cfg.SPLIT_K
    c = out if split == 1 else torch.empty((split, M, N), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(M, cfg.BLOCK_M) * triton.cdiv(N, cfg.BLOCK_N), split)
    w8a16_matmul_kernel[grid](
        x, w, c, w_scale, bias if bias is not None else c,
        M, N, K, group_size,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1),
        c.stride(0) if split > 1 else 0, c.stride(-2), c.stride(-1),
        w_scale.stride(0), w_scale.stride(1) if group_size else 0,
        bias.stride(0) if bias is not None else 0,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, SPLIT_K=split, GROUP_M=cfg.GROUP_M,
        EVEN_K=K % cfg.BLOCK_K == 0, PER_GROUP=bool(group_size), HAS_BIAS=bias is not None,
        DOT_IEEE=x.dtype == torch.float32, INTERPRET=interp,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split > 1:
        acc = c.sum(0)
        if bias is not None:
            acc += bias.to(torch.float32)
        out.copy_(acc)
    return out


# ----------------------------------------------------------------------------------------------
# Benchmark (GPU): python -m fastllm.triton_kernels.int8_matmul [--sweep]
# W8A8 in TOP/s beside cuBLAS int8 (torch._int_mm, M > 16 only) and bf16 (torch.matmul);
# W8A16 at decode sizes in GB/s of weight bytes beside bf16 (which reads twice the bytes).

def _bench(sweep: bool = False):
    from triton.testing import do_bench
    dev = "cuda"
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    shapes = [(M, 4096, 4096) for M in (1, 16, 32, 64, 128, 512, 4096)] + [(M, 11008, 4096) for M in (16, 4096)]
    print("W8A8 (bf16 out, per-token scales)      TOP/s:  triton   _int_mm   bf16 mm")
    for M, N, K in shapes:
        a = torch.randint(-127, 128, (M, K), dtype=torch.int8, device=dev)
        b = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=dev)
        sa, sw = torch.rand(M, device=dev), torch.rand(N, device=dev)
        xa, xb = a.bfloat16(), b.bfloat16()
        ops = 2 * M * N * K
        t_tr = do_bench(lambda: int8_matmul(a, b, sa, sw, None, torch.bfloat16))
        t_cb = do_bench(lambda: torch._int_mm(a, b.t())) if M > 16 else float("nan")
        t_bf = do_bench(lambda: xa @ xb.t())
        print(f"  M={M:5d} N={N:5d} K={K:5d}  {pick_config('w8a8', M, N, K, **_on(a))}\n"
              f"{'':40s}{ops / t_tr * 1e-9:8.1f}  {ops / t_cb * 1e-9:8.1f}  {ops / t_bf * 1e-9:8.1f}")
        if sweep and N == 4096 and M in (1, 32, 128, 4096):
            best = []
            for bm in (16, 32, 64, 128):
                for bn in (64, 128, 256):
                    for bk in (128, 256):
                        for w, st in ((4, 4), (8, 3)):
                            if bm > max(16, triton.next_power_of_2(M)) or bm * bn * bk > 128 * 256 * 128:
                                continue
                            cfg = Config(bm, bn, bk, num_warps=w, num_stages=st)
                            try:
                                t = do_bench(lambda: int8_matmul(a, b, sa, sw, None, torch.bfloat16, config=cfg))
                            except Exception:  # noqa: BLE001 - out of shared memory etc.
                                continue
                            best.append((t, cfg))
            best.sort(key=lambda p: p[0])
            for t, cfg in best[:3]:
                print(f"{'':8s}sweep {ops / t * 1e-9:8.1f} TOP/s  {cfg}")
    print("W8A16 (bf16 x, per-channel / group 128)  GB/s of weights:  per-chan  group128  bf16 mm")
    for M, N, K in [(1, 4096, 4096), (4, 4096, 4096), (16, 4096, 4096), (1, 11008, 4096), (1, 4096, 11008),
                    (16, 11008, 4096), (128, 4096, 4096)]:
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        w = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=dev)
        s, sg = torch.rand(N, device=dev), torch.rand(N, K // 128, device=dev)
        wb = w.bfloat16()
        t1 = do_bench(lambda: w8a16_matmul(x, w, s))
        t2 = do_bench(lambda: w8a16_matmul(x, w, sg, None, 128))
        t3 = do_bench(lambda: x @ wb.t())
        print(f"  M={M:5d} N={N:5d} K={K:5d}  {pick_config('w8a16', M, N, K, **_on(x))}\n"
              f"{'':40s}{N * K / t1 * 1e-6:8.0f}  {N * K / t2 * 1e-6:8.0f}  {2 * N * K / t3 * 1e-6:8.0f}"
              f"   (time us: {t1 * 1e3:.1f} {t2 * 1e3:.1f} {t3 * 1e3:.1f})")
        if sweep and M in (1, 16) and N * K < 11008 * 4096 or (M, N) == (1, 11008):
            best = []
            for bn in (32, 64, 128):
                for bk in (128, 256):
                    for split in (1, 2, 4, 8):
                        for w_, st in ((4, 4),):
                            cfg = Config(16, bn, bk, SPLIT_K=split, num_warps=w_, num_stages=st)
                            try:
                                t = do_bench(lambda: w8a16_matmul(x, w, s, config=cfg))
                            except Exception:  # noqa: BLE001
                                continue
                            best.append((t, cfg))
            best.sort(key=lambda p: p[0])
            for t, cfg in best[:3]:
                print(f"{'':8s}sweep {N * K / t * 1e-6:8.0f} GB/s  {cfg}")


if __name__ == "__main__":
    import sys
    _bench(sweep="--sweep" in sys.argv)
