"""The compressed 2:4 format: values + 2-bit indices in the layout the sparse tensor cores read.

    check_24(w)                      # raises NotSparse24Error at the first group with > 2 non-zeros
    values, meta = compress(w)       # w (N, K) 2:4 along K -> values (N, K/2), meta (N/16, K/2) int32
    w2 = decompress(values, meta)    # back to dense (N, K), exact

The weight W (N, K) of an nn.Linear is the *sparse operand A* of `mma.sp` (out^T = W @ x^T):
its rows are the MMA's M dimension, K the reduction. Along K every group of 4 consecutive
elements ("chunk") holds at most 2 non-zeros; the 2 kept elements of chunk j of row n are
values[n, 2j], values[n, 2j + 1] (in increasing column order), and their positions i0 < i1 in
the chunk form the 4-bit "nibble" i0 | i1 << 2 (the PTX ISA's `::ordered_metadata` encoding:
0b0100, 0b1000, 0b1100, 0b1001, 0b1101, 0b1110; a chunk with fewer non-zeros keeps zeros at the
lowest free positions, so every nibble is one of these six).

meta: int32 (N // 16, K // 2), one 32-bit metadata register per (16-row block, 64-column K
block, lane): meta[rb, 32 * kb + lane] is what lane `lane` of a warp hands to `mma.sp` for rows
16 rb .. 16 rb + 15 and columns 64 kb .. 64 kb + 63, so a warp loads its metadata with one
coalesced 128-byte read. With lane = 4 g + t (g = groupID, t = thread in group), nibble q
(bits 4q .. 4q + 3) of that word describes chunk `c` (0..15, 4 columns each) of row-in-tile
`r` (0..15) of that block (PTX ISA 9.7.14.6, figures "Sparse MMA .m16n8k32 metadata layout
for .f16/.bf16" and ".m16n8k64 metadata layout for .u8/.s8"):

  16-bit values (m16n8k32: two MMAs per 64-column block, sparsity selector 0 for columns 0..31
  read from lanes t = 0, 1 and selector 1 for columns 32..63 from lanes t = 2, 3):
      r = g + 8 * (q // 4),   c = 4 t + q % 4
  int8 values (m16n8k64: one MMA per block, selector 0, all four lanes of a group):
      r = g + 8 * (t % 2),    c = 8 * (t // 2) + q

So the format needs N % 16 == 0 and K % 64 == 0 (BLOCK_K below); pruning / check_24 need only
K % 4 == 0. The int8 and 16-bit layouts differ: compress picks by the values' dtype, and
decompress and the ops read meta in the layout of the values' dtype. Casting values across that
line (quantizing compressed fp16 values to int8, or back) needs `convert_meta` on the metadata:
every nibble is valid in both layouts, so no check can tell, and the product would be wrong. mma_sp.py models the
instruction from the ISA text and the tests prove compress -> emulated mma.sp == dense matmul.
"""
from typing import Tuple

import torch

GROUP = 4          # 2:4 along K: chunks of 4 columns
TILE_N = 16        # rows per metadata block (the MMA's M)
BLOCK_K = 64       # columns per metadata block (one m16n8k64 s8 MMA, two m16n8k32 f16 MMAs)
LANES = 32
# The six valid ordered nibbles i0 | i1 << 2 with i0 < i1.
VALID_NIBBLES = (0b0100, 0b1000, 0b1100, 0b1001, 0b1101, 0b1110)


class NotSparse24Error(ValueError):
    """A weight that is not 2:4 sparse along K where 2:4 was required."""


def layout_kind(dtype: torch.dtype) -> str:
    """"s8" for int8 values (m16n8k64 metadata), "f16" for every other dtype (m16n8k32)."""
    return "s8" if dtype == torch.int8 else "f16"


def nibble_map(kind: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(r, c): int64 (32 lanes, 8 nibbles) row-in-tile and chunk-in-block of every nibble of
    every lane's metadata word (the formulas in the module docstring)."""
    lane = torch.arange(LANES).reshape(-1, 1)
    q = torch.arange(8).reshape(1, -1)
    g, t = lane // 4, lane % 4
    if kind == "f16":
        return g + 8 * (q // 4), 4 * t + q % 4
    if kind == "s8":
        return (g + 8 * (t % 2)).expand(-1, 8), 8 * (t // 2) + q
    raise ValueError(f"unknown metadata layout {kind!r}")


def meta_shape(N: int, K: int) -> Tuple[int, int]:
    return (N // TILE_N, K // 2)


def check_24(w: torch.Tensor, name: str = "w") -> None:
    """Raise NotSparse24Error naming the first (row, group) of `w` (N, K) with more than 2
    non-zeros among its 4 columns 4*group .. 4*group + 3 (row-major order)."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"check_24: argument '{name}' must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"check_24: argument '{name}' must be 2-D (N, K), got shape {tuple(w.shape)}")
    N, K = w.shape
    if K % GROUP:
        raise ValueError(f"check_24: argument '{name}': K = {K} is not a multiple of {GROUP} (2:4 groups along K)")
    nnz = (w != 0).reshape(N, K // GROUP, GROUP).sum(-1)
    bad = nnz > 2
    if bad.any():
        first = int(bad.reshape(-1).nonzero()[0])
        row, grp = divmod(first, K // GROUP)
        raise NotSparse24Error(
            f"argument '{name}' is not 2:4 sparse along K: row {row}, group {grp} (columns {GROUP * grp}.."
            f"{GROUP * grp + 3}) has {int(nnz[row, grp])} non-zeros; prune it first (fastllm.sparse.prune_24)")


def is_24(w: torch.Tensor) -> bool:
    try:
        check_24(w)
    except ValueError:
        return False
    return True


def _check_format_shape(op: str, N: int, K: int, name: str):
    if N % TILE_N:
        raise ValueError(f"{op}: argument '{name}': N = {N} must be a multiple of {TILE_N} (rows per "
                         "metadata block)")
    if K % BLOCK_K:
        raise ValueError(f"{op}: argument '{name}': K = {K} must be a multiple of {BLOCK_K} (columns per "
                         "metadata block: one m16n8k64 int8 / two m16n8k32 fp16 mma.sp)")


def _to_int32_bits(words: torch.Tensor) -> torch.Tensor:
    """int64 words in [0, 2**32) -> int32 with the same 32 bits."""
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def compress(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(values, meta) of a 2:4-sparse `w` (N, K); raises NotSparse24Error if it is not 2:4.
    values: (N, K // 2) in w.dtype; meta: int32 (N // 16, K // 2) (module docstring)."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"compress: argument 'w' must be a torch.Tensor, got {type(w).__name__}")
    check_24(w)
    N, K = w.shape
    _check_format_shape("compress", N, K, "w")
    chunks = w.reshape(N, K // GROUP, GROUP)
    # Non-zeros first, then zeros, each by increasing position (stable): the 2 kept positions.
    order = torch.argsort((chunks != 0).to(torch.int8), dim=-1, descending=True, stable=True)
    idx = order[..., :2].sort(dim=-1).values                      # (N, K/4, 2), i0 < i1
    values = torch.gather(chunks, -1, idx).reshape(N, K // 2).contiguous()
    nib = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.int64)      # (N, K/4)
    return values, _pack_meta(nib, N, K, layout_kind(w.dtype))


def _pack_meta(nib: torch.Tensor, N: int, K: int, kind: str) -> torch.Tensor:
    r, c = nibble_map(kind)                                       # (32, 8)
    r, c = r.to(nib.device), c.to(nib.device)
    nib = nib.reshape(N // TILE_N, TILE_N, K // BLOCK_K, BLOCK_K // GROUP).permute(0, 2, 1, 3)
    sel = nib[:, :, r, c]                                         # (N/16, K/64, 32, 8)
    words = (sel << (4 * torch.arange(8, device=nib.device))).sum(-1)   # disjoint bits: sum == or
    return _to_int32_bits(words.reshape(N // TILE_N, K // 2).contiguous())


def unpack_meta(meta: torch.Tensor, N: int, K: int, kind: str) -> torch.Tensor:
    """int64 (N, K // 4) nibbles from the packed metadata (inverse of compress's packing)."""
    r, c = (i.to(meta.device) for i in nibble_map(kind))
    words = meta.to(torch.int64).reshape(N // TILE_N, K // BLOCK_K, LANES) & 0xFFFFFFFF
    nibs = (words.unsqueeze(-1) >> (4 * torch.arange(8, device=meta.device))) & 0xF   # (N/16, K/64, 32, 8)
    out = torch.empty(N // TILE_N, K // BLOCK_K, TILE_N, BLOCK_K // GROUP, dtype=torch.int64, device=meta.device)
    out[:, :, r, c] = nibs
    return out.permute(0, 2, 1, 3).reshape(N, K // GROUP)


def convert_meta(meta: torch.Tensor, from_dtype: torch.dtype, to_dtype: torch.dtype) -> torch.Tensor:
    """`meta` packed for values of `from_dtype`, repacked for values of `to_dtype` (the int8 and
    16-bit layouts differ; module docstring). Use it when casting compressed values between int8
    and a float dtype. Returns meta itself when both dtypes use the same layout."""
    if not isinstance(meta, torch.Tensor) or meta.dtype != torch.int32 or meta.dim() != 2:
        got = f"{meta.dtype} {tuple(meta.shape)}" if isinstance(meta, torch.Tensor) else type(meta).__name__
        raise TypeError(f"convert_meta: argument 'meta' must be a 2-D int32 tensor (N // 16, K // 2), got {got}")
    for name, dt in (("from_dtype", from_dtype), ("to_dtype", to_dtype)):
        if not isinstance(dt, torch.dtype):
            raise TypeError(f"convert_meta: argument '{name}' must be a torch.dtype, got {type(dt).__name__}")
    src, dst = layout_kind(from_dtype), layout_kind(to_dtype)
    N, K = meta.shape[0] * TILE_N, meta.shape[1] * 2
    _check_format_shape("convert_meta", N, K, "meta")
    if src == dst:
        return meta
    return _pack_meta(unpack_meta(meta, N, K, src), N, K, dst)


def check_compressed(op: str, values: torch.Tensor, meta: torch.Tensor, K: int = None) -> Tuple[int, int]:
    """Shape / dtype checks of a (values, meta) pair; returns (N, K). Errors name the argument."""
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"{op}: argument 'values' must be a torch.Tensor, got {type(values).__name__}")
    if not isinstance(meta, torch.Tensor):
        raise TypeError(f"{op}: argument 'meta' must be a torch.Tensor, got {type(meta).__name__}")
    if values.dim() != 2:
        raise ValueError(f"{op}: argument 'values' must be 2-D (N, K // 2), got shape {tuple(values.shape)}")
    N, K2 = values.shape
    if K is None:
        K = 2 * K2
    elif K2 * 2 != K:
        raise ValueError(f"{op}: argument 'values' must have shape (N, K // 2) = (N, {K // 2}), got "
                         f"{tuple(values.shape)}")
    _check_format_shape(op, N, K, "values")
    if meta.dtype != torch.int32:
        raise TypeError(f"{op}: argument 'meta' must have dtype int32 (packed 2-bit indices), got "
                        f"{str(meta.dtype).replace('torch.', '')}")
    if tuple(meta.shape) != meta_shape(N, K):
        raise ValueError(f"{op}: argument 'meta' must have shape (N // 16, K // 2) = {meta_shape(N, K)}, got "
                         f"{tuple(meta.shape)}")
    if meta.device != values.device:
        raise ValueError(f"{op}: argument 'meta' is on {meta.device}, 'values' on {values.device}")
    check_meta_values(op, meta)
    return N, K


def decompress(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Dense (N, K) in values.dtype from compress's (values, meta); exact."""
    N, K = check_compressed("decompress", values, meta)
    nib = unpack_meta(meta, N, K, layout_kind(values.dtype))
    idx = torch.stack((nib & 3, nib >> 2), -1)                    # (N, K/4, 2)
    dense = torch.zeros(N, K // GROUP, GROUP, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, idx, values.reshape(N, K // GROUP, 2))
    return dense.reshape(N, K)


def bad_meta_words(meta: torch.Tensor) -> torch.Tensor:
    """bool, meta's shape: True where a packed word holds a nibble outside VALID_NIBBLES.

    A nibble i0 | i1 << 2 is valid iff i1 > i0, whatever its place in the layout, so the packed
    words are checked as they are (SWAR, no unpacking): per nibble d = (4 + i1) - i0 lies in
    1..7 (no borrow into the next nibble) and is >= 5, i.e. bit 2 and (bit 1 or bit 0), iff
    i1 > i0. int32 arithmetic suffices: shifts are masked and d < 2**31."""
    w = meta.to(torch.int32)
    i0, i1 = w & 0x33333333, (w >> 2) & 0x33333333
    d = (i1 | 0x44444444) - i0
    return ((d >> 2) & (d | (d >> 1)) & 0x11111111) != 0x11111111


def valid_meta(meta: torch.Tensor) -> bool:
    """True if every nibble is one of the six ordered 2-of-4 encodings (anything else is
    undefined behaviour for mma.sp::ordered_metadata, and decompresses to a different weight
    on each backend). The check does not depend on the layout."""
    return not bool(bad_meta_words(meta).any())


def check_meta_values(op: str, meta: torch.Tensor, any_device: bool = False) -> None:
    """ValueError naming the first bad word of `meta`. Per-call op checks run on CPU tensors
    outside compiled code only (ops._checks.values_checkable); Sparse24Linear checks its
    metadata once, on any device, when it is loaded."""
    from ..ops._checks import values_checkable
    if not values_checkable(meta, any_device):
        return
    bad = bad_meta_words(meta)
    if bool(bad.any()):
        r, c = divmod(int(bad.reshape(-1).to(torch.uint8).argmax()), meta.shape[1])
        raise ValueError(f"{op}: argument 'meta': word ({r}, {c}) = {int(meta[r, c]) & 0xFFFFFFFF:#010x} holds a "
                         f"2-bit index pair that is not an ordered 2-of-4 choice (nibbles must be one of "
                         f"{[hex(v) for v in VALID_NIBBLES]}; others are undefined behaviour for mma.sp): not "
                         "metadata written by fastllm.sparse.compress")
