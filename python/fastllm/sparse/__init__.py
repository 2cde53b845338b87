"""2:4 structured sparsity: prune weights to 2 of every 4 along K, compress them into the layout
the sparse tensor cores read (values + 2-bit indices), and save / load sparsified models.
The layers themselves are fastllm.nn.Sparse24Linear; the GEMM is fastllm.ops.sparse24_matmul."""
from .format import NotSparse24Error, check_24, compress, convert_meta, decompress, is_24
from .model import load_sparse, save_sparse, sparsify_linears
from .prune import PruneReport, collect_act_norms, mask_24, prune_24

__all__ = ["NotSparse24Error", "check_24", "compress", "convert_meta", "decompress", "is_24", "PruneReport",
           "collect_act_norms", "mask_24", "prune_24", "sparsify_linears", "save_sparse", "load_sparse"]
