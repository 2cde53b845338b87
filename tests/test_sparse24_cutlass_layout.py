"""fastllm's 2:4 metadata words against an independent source: PyTorch's semi-structured encoder
(`sparse_semi_structured_from_dense_cutlass`, the CUTLASS layout PyTorch runs on real GPUs).

PyTorch stores metadata in CUTLASS's global layout (reorder_meta's row permutation and 2x2
transpose, then ColumnMajorInterleaved<2>); fastllm stores the 32 register words a warp hands to
`mma.sp`. What must agree is what each lane ends up holding, so the test replays CUTLASS 2.x's
warp metadata iterator on PyTorch's buffer (as read from CUTLASS's
SparseMmaTensorOpMetaTileIterator and MmaSparseTensorOp: shared memory is a plain copy of the
tile, each lane ldmatrix-loads 16-byte rows, E register m / kMaxID2 serves M tile m with
sparsity selector m % kMaxID2) and compares lane by lane. This ties format.py / mma_sp.py /
the emulator's meta_slot (written from the PTX ISA by us) to a layout that has run on hardware.
"""
import pytest
import torch

from fastllm.sparse import compress

conv = pytest.importorskip("torch.sparse._semi_structured_conversions")

WARP_M = 64      # rows of the warp tile the iterator walks (CUTLASS's sm80 sparse warp shape)


def random_24(M, K, dtype, gen):
    """Exactly two non-zeros in every chunk of 4 (both encoders agree on full chunks only:
    PyTorch writes an empty chunk as 0b1110, fastllm as 0b0100, both valid)."""
    keep = torch.rand(M, K // 4, 4, generator=gen).argsort(-1)[..., :2]
    mask = torch.zeros(M, K // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).reshape(M, K)
    if dtype == torch.int8:
        mag = torch.randint(1, 128, (M, K), generator=gen)
        w = (mag * (torch.randint(0, 2, (M, K), generator=gen) * 2 - 1)).to(torch.int8)
    else:
        w = (torch.rand(M, K, generator=gen) + 0.5).to(dtype) * (torch.randint(0, 2, (M, K), generator=gen) * 2 - 1)
    return w * mask


def lane_registers(meta_reordered, k_step):
    """The E register of every lane of the warp owning rows 0..WARP_M-1 at MMA k-step `k_step`,
    from PyTorch's (M, K / 16) int16 or (M, K / 32) int32 buffer: a list of 32 lists (one word
    per ldmatrix matrix)."""
    rows = meta_reordered.shape[0]
    ebits = meta_reordered.element_size() * 8
    h = meta_reordered.contiguous().view(torch.int16).reshape(-1).to(torch.int64) & 0xFFFF
    epa = 128 // ebits                   # E elements per 16-byte access
    k_row = 2 * WARP_M                   # the iterator's row extent (interleaved pairs)
    count = min(4, k_row // (8 * epa))   # ldmatrix .x2 (16-bit E) / .x4 (32-bit E)
    stride = 2 * rows                    # E elements between interleaved column pairs
    row_of = []
    for lane in range(32):
        e = (lane % (k_row // epa)) * epa + (lane // (k_row // epa)) * stride * epa + k_step * stride
        row_of.append(e * (ebits // 16))
    regs = []
    for lane in range(32):
        words = []
        for j in range(count):
            base = row_of[8 * j + lane // 4] + 2 * (lane % 4)
            words.append(int(h[base]) | int(h[base + 1]) << 16)
        regs.append(words)
    return regs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("seed", [0, 1])
def test_meta_words_equal_cutlass_lane_registers(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    K = 256
    w = random_24(WARP_M, K, dtype, gen)
    values, meta = compress(w)
    sparse, meta_reordered = conv.sparse_semi_structured_from_dense_cutlass(w)
    assert torch.equal(values, sparse), "kept values differ from PyTorch's"
    meta = meta.to(torch.int64) & 0xFFFFFFFF
    k_per_mma = 64 if dtype == torch.int8 else 32
    checked = 0
    for ks in range(K // k_per_mma):
        regs = lane_registers(meta_reordered, ks)
        for lane in range(32):
            g, t = divmod(lane, 4)
            for m_tile in range(WARP_M // 16):
                if dtype == torch.int8:            # m16n8k64: selector 0, every lane's word is read
                    got, ours = regs[lane][m_tile], int(meta[m_tile, 32 * ks + lane])
                else:                              # m16n8k32: E word serves two M tiles via the selector
                    if t // 2 != m_tile % 2:       # the hardware reads lanes 2 sel, 2 sel + 1 only
                        continue
                    # fastllm spends the selector on the two 32-column halves of a 64-column block
                    got = regs[lane][m_tile // 2]
                    ours = int(meta[m_tile, (ks // 2) * 32 + 4 * g + 2 * (ks % 2) + t % 2])
                checked += 1
                assert got == ours, (f"{dtype} k-step {ks} M tile {m_tile} lane {lane}: "
                                     f"CUTLASS {got:#010x}, fastllm {ours:#010x}")
    assert checked == 32 * (K // k_per_mma) * (4 if dtype == torch.int8 else 2)
