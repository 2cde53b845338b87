"""A register-level model of `mma.sp::ordered_metadata` (PTX ISA 9.7.14.6), written from the
ISA text, to prove the compressed format (format.py) without a GPU.

    d = mma_sp_m16n8k32(a, b, c, e, selector, dtype)   # f16/bf16, fp32 accumulate
    d = mma_sp_m16n8k64_s8(a, b, c, e)                 # s8, s32 accumulate, selector 0
    out = emulate_gemm(x, values, meta)                # the CUDA kernel's loads + the model above

Registers are per lane: a, b (32, 4) uint32 (as int64), c, d (32, 4), e (32,) metadata. With
groupID g = lane >> 2 and threadID_in_group t = lane % 4 (all from the ISA's fragment tables):

m16n8k32 .f16/.bf16 (A is 16x32 stored as 16x16 non-zeros, two per 4-wide chunk):
  A: reg j of lane (g, t) holds the 2 non-zeros of row g + 8 * (j % 2), chunk t + 4 * (j // 2)
     (columns 4 * chunk .. + 3), lower element in the low 16 bits.
  B: reg i holds rows (k) 2t + 8i and 2t + 8i + 1 of column (n) g, low half first.
  C/D: d[0], d[1] = row g, cols 2t, 2t + 1; d[2], d[3] = row g + 8, same cols.
  metadata: a thread pair per group contributes, T0/T1 for selector 0, T2/T3 for selector 1:
     the indices of reg j of thread t sit in the word of lane 4g + 2 * selector + j // 2,
     nibble t + 4 * (j % 2); a nibble is i0 | i1 << 2 (positions in the chunk, i0 < i1).
m16n8k64 .s8 (A 16x64 stored as 16x32):
  A: reg j of lane (g, t) holds 4 non-zeros (2 chunks) of row g + 8 * (j % 2), columns
     8t + 32 * (j // 2) .. + 7, lowest byte first.
  B: reg i holds rows 4t + 16i .. + 3 of column g, lowest byte first.
  C/D: as above (s32).
  metadata: all four threads contribute (selector must be 0): the indices of reg j of
     thread t sit in the word of lane 4g + j, nibbles 2t and 2t + 1.

Anything the ISA calls undefined (a nibble outside the six ordered encodings, a bad selector)
raises here, so the tests fail instead of passing on garbage.
"""
import torch

from .format import BLOCK_K, TILE_N, VALID_NIBBLES, check_compressed

_VALID = set(VALID_NIBBLES)


def _nibble(word: int, q: int):
    v = (int(word) >> (4 * q)) & 0xF
    if v not in _VALID:
        raise ValueError(f"mma.sp: metadata nibble {v:#06b} is undefined behaviour with ordered_metadata")
    return v & 3, v >> 2


def _halves(reg: int, dtype):
    bits = torch.tensor([int(reg) & 0xFFFF, (int(reg) >> 16) & 0xFFFF], dtype=torch.int32).to(torch.int16)
    return bits.view(dtype).to(torch.float64)


def _bytes(reg: int):
    b = [(int(reg) >> (8 * i)) & 0xFF for i in range(4)]
    return [v - 256 if v >= 128 else v for v in b]


def mma_sp_m16n8k32(a, b, c, e, selector: int, dtype) -> torch.Tensor:
    """D = A @ B + C for one warp; returns d (32, 4) fp64 (hardware: fp32 accumulation)."""
    if selector not in (0, 1):
        raise ValueError("mma.sp m16n8k32: sparsity selector must be 0 or 1")
    A = torch.zeros(16, 32, dtype=torch.float64)
    B = torch.zeros(32, 8, dtype=torch.float64)
    for lane in range(32):
        g, t = lane >> 2, lane % 4
        for j in range(4):
            row, chunk = g + 8 * (j % 2), t + 4 * (j // 2)
            i0, i1 = _nibble(e[4 * g + 2 * selector + j // 2], t + 4 * (j % 2))
            v = _halves(a[lane][j], dtype)
            A[row, 4 * chunk + i0] = v[0]
            A[row, 4 * chunk + i1] = v[1]
        for i in range(4):
            v = _halves(b[lane][i], dtype)
            B[2 * t + 8 * i, g], B[2 * t + 8 * i + 1, g] = v[0], v[1]
    return _accumulate(A @ B, c)


def mma_sp_m16n8k64_s8(a, b, c, e, selector: int = 0) -> torch.Tensor:
    """D = A @ B + C (int64, exact) for one warp; returns d (32, 4)."""
    if selector != 0:
        raise ValueError("mma.sp m16n8k64 s8: sparsity selector must be 0")
    A = torch.zeros(16, 64, dtype=torch.int64)
    B = torch.zeros(64, 8, dtype=torch.int64)
    for lane in range(32):
        g, t = lane >> 2, lane % 4
        for j in range(4):
            row, col0 = g + 8 * (j % 2), 8 * t + 32 * (j // 2)
            v = _bytes(a[lane][j])
            for h in range(2):                      # the register's two chunks
                i0, i1 = _nibble(e[4 * g + j], 2 * t + h)
                A[row, col0 + 4 * h + i0] = v[2 * h]
                A[row, col0 + 4 * h + i1] = v[2 * h + 1]
        for i in range(4):
            for k, v in enumerate(_bytes(b[lane][i])):
                B[4 * t + 16 * i + k, g] = v
    return _accumulate(A @ B, c)


def _accumulate(D, c):
    d = torch.as_tensor(c, dtype=D.dtype).clone()
    for lane in range(32):
        g, t = lane >> 2, lane % 4
        d[lane, 0] += D[g, 2 * t]
        d[lane, 1] += D[g, 2 * t + 1]
        d[lane, 2] += D[g + 8, 2 * t]
        d[lane, 3] += D[g + 8, 2 * t + 1]
    return d


# ----------------------------------------------------------------------------------------------
# What the CUDA kernel loads into each lane's registers (csrc/sparse24/sparse24_gemm_kernel.cuh
# does the same with ldmatrix on the values tile, a 32-bit load of meta[rb, 32 kb + lane], and
# plain (non-transposed) ldmatrix B fragments from the activation tile).

def _pack16(lo, hi) -> int:
    bits = torch.stack([lo, hi]).view(torch.int16).to(torch.int64) & 0xFFFF
    return int(bits[0]) | int(bits[1]) << 16


def _pack8(vals) -> int:
    return sum((int(v) & 0xFF) << (8 * i) for i, v in enumerate(vals))


def load_f16(values, meta, x, rb, kt, nb):
    """Registers for the m16n8k32 MMA of W rows 16 rb.., K columns 32 kt.., tokens 8 nb..
    -> (a, b, e, selector). Columns 32 kt .. of W are compressed columns 16 kt .. of values."""
    a, b, e = [], [], []
    kb, half = divmod(kt, 2)
    for lane in range(32):
        g, t = lane >> 2, lane % 4
        regs = []
        for j in range(4):
            row = TILE_N * rb + g + 8 * (j % 2)
            col = 16 * kt + 2 * t + 8 * (j // 2)
            regs.append(_pack16(values[row, col], values[row, col + 1]))
        a.append(regs)
        xr = x[8 * nb + g]
        b.append([_pack16(xr[32 * kt + 2 * t + 8 * i], xr[32 * kt + 2 * t + 8 * i + 1]) for i in range(4)])
        e.append(int(meta[rb, 32 * kb + lane]) & 0xFFFFFFFF)
    return a, b, e, half


def load_s8(values, meta, x, rb, kb, nb):
    """Registers for the m16n8k64 s8 MMA of W rows 16 rb.., K columns 64 kb.., tokens 8 nb.."""
    a, b, e = [], [], []
    for lane in range(32):
        g, t = lane >> 2, lane % 4
        regs = []
        for j in range(4):
            row = TILE_N * rb + g + 8 * (j % 2)
            col = 32 * kb + 4 * t + 16 * (j // 2)
            regs.append(_pack8(values[row, col:col + 4]))
        a.append(regs)
        xr = x[8 * nb + g]
        b.append([_pack8(xr[64 * kb + 4 * t + 16 * i: 64 * kb + 4 * t + 16 * i + 4]) for i in range(4)])
        e.append(int(meta[rb, 32 * kb + lane]) & 0xFFFFFFFF)
    return a, b, e, 0


def emulate_gemm(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """x @ W.T through the modelled instruction: x (M, K) (M a multiple of 8) and the compressed
    W. fp16/bf16 -> fp64 result of the fp32-accumulating MMAs; int8 -> exact int64."""
    N, K = check_compressed("emulate_gemm", values, meta, x.shape[1])
    M = x.shape[0]
    assert M % 8 == 0, "pad M to the MMA's n = 8"
    s8 = values.dtype == torch.int8
    out = torch.zeros(N, M, dtype=torch.int64 if s8 else torch.float64)      # out^T = W @ x^T
    for rb in range(N // TILE_N):
        for nb in range(M // 8):
            d = torch.zeros(32, 4, dtype=out.dtype)
            if s8:
                for kb in range(K // BLOCK_K):
                    a, b, e, sel = load_s8(values, meta, x, rb, kb, nb)
                    d = mma_sp_m16n8k64_s8(a, b, d, e, sel)
            else:
                for kt in range(K // 32):
                    a, b, e, sel = load_f16(values, meta, x, rb, kt, nb)
                    d = mma_sp_m16n8k32(a, b, d, e, sel, values.dtype)
            for lane in range(32):
                g, t = lane >> 2, lane % 4
                for i in range(4):
                    out[TILE_N * rb + g + 8 * (i // 2), 8 * nb + 2 * t + i % 2] = d[lane, i]
    return out.t()
