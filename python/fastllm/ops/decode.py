"""fastllm.ops.decode_attention: a few new queries against a KV cache (split-KV "flash-decoding").

    out = decode_attention(q, k_cache, v_cache, cache_seqlens=lens)              # (B, Sq, Hq, D)
    out = decode_attention(q, k_pages, v_pages, cache_seqlens=lens, block_table=bt)
    out, lse = decode_attention(q, k_cache, v_cache, mask=m, return_lse=True)

decode_attention(q, k_cache, v_cache, *, cache_seqlens=None, block_table=None, scale=None,
                 mask=None, window=None, softcap=None, sinks=None, return_lse=False, num_splits=None,
                 validate=False, backend="auto")
  q: (B, Hq, Sq, D), 1 <= Sq <= MAX_QUERIES (16): a decode step or speculative verification;
     any strides with unit stride in D. dtypes float16, bfloat16, float32 (float32 accumulation).
     Under torch.autocast they are first cast to the autocast dtype, as SDPA's are
     (fastllm/ops/_autocast.py).
  k_cache, v_cache: (B, Hkv, S_max, D), the layout of transformers' DynamicCache / StaticCache,
     any strides with unit stride in D (a StaticCache is longer than what is filled); or, with
     block_table, paged: (num_pages, page_size, Hkv, D), any page_size >= 1.
  block_table: (B, max_pages) int32: logical key j of sequence b is row j % page_size of page
     block_table[b, j // page_size]. Capacity S_cap = S_max, or max_pages * page_size.
  cache_seqlens: (B,) int32, valid keys per sequence (the Sq queries are the last Sq of them,
     causal among themselves, bottom-right aligned); or
  mask: bool broadcastable to (B, 1, Sq, S_cap), True = attend (transformers' sdpa mask, e.g.
     left-padded batches): then exactly the mask decides (no causal / length / window logic;
     not combinable with cache_seqlens or window). Neither: every sequence has S_cap keys.
  window=W: the query at position p sees keys > p - W only. softcap=c: s = c tanh(s / c).
  sinks: (Hq,) attention-sink logits (gpt-oss), as in fastllm.ops.flash_attention.
  scale: defaults to 1 / sqrt(D).
  Returns out (B, Sq, Hq, D) contiguous in q.dtype (flash_attention's layout) and, with
  return_lse=True, lse (B, Hq, Sq) float32. A row with nothing allowed: out 0, lse -inf.
  Exact semantics: fastllm/ref/decode.py. Cache slots past cache_seqlens (or outside the
  block table's pages in use) are never read and may hold anything. A key a mask excludes may
  be read and weighted by 0, so K / V must be finite at masked keys (NaN / inf there give NaN
  on the cuda and triton backends, as in plain matmul attention; fastllm.ref stays finite).

Metadata on the device (cache_seqlens, block_table): checking its values needs a device sync,
so for CUDA tensors it is not checked unless validate=True (which syncs and raises ValueError
naming the argument). Without it every backend clamps: lengths into [0, S_cap], page ids that
are read (pages j // page_size for j < length; with a mask, from the first to the last key any
mask row attends) into [0, num_pages): a bad table reads a wrong page, never out of bounds. Pages
past those may hold -1 or anything. CPU tensors are always checked (no sync needed), except while
torch.compile traces (values are unknown then).

num_splits: how many pieces the key range is cut into, 1 to 256 (None: split_heuristic, the one
place that decides it). The kernels write a partial (out, lse) per piece and a combine kernel
merges them exactly.

Custom op fastllm::decode_attention always returns (out, lse); inside it the arguments are
normalized: scale a float, window an int (<= 0: none), softcap a float (0.0: none),
num_splits an int (0: heuristic).

Backends: "cuda" (csrc/decode via fastllm.ops._decode_cuda), "triton"
(triton_kernels/decode_attention.py), "torch" (fastllm/ref/decode.py).
"""
import functools
import numbers
from typing import Optional

import torch

from ..ref import decode as ref_decode
from ._autocast import to_autocast_dtype
from ._checks import FLOAT_DTYPES, GRID_YZ_MAX, attended_key_slice, broadcasts_to, check_tensor
from ._sinks import check_sinks
from .attention import _normalize
from .registry import new_op

OP = new_op("decode_attention")
NAME = "decode_attention"

#: Largest Sq served (speculative decoding verifies a handful of tokens); prefill -> flash_attention.
MAX_QUERIES = 16

# ----------------------------------------------------------------------------------------------
# Split heuristic: THE place that decides how many pieces the key range is cut into.

#: Fewer keys than this per split and the partials' write + combine cost more than the
#: parallelism gains (a split of 256 keys x D 128 x bf16 is 64 KB of K+V per kv head).
MIN_KEYS_PER_SPLIT = 256
#: Upper bound (the combine kernel reads all partials of a row; 64 pieces of >= 256 keys cover
#: 16k keys per program already).
MAX_SPLITS = 64
#: What num_splits= may ask for (the CUDA launcher's bound, decode_launcher.cu, as well).
MAX_NUM_SPLITS = 256
#: Programs per SM to aim for: decode is bandwidth bound, and more resident programs keep
#: more loads in flight; beyond ~2 waves extra splits only add partials traffic.
PROGRAMS_PER_SM = 2
#: Notional SM count for the Triton interpreter (CPU): small, so tests exercise splitting.
INTERPRETER_SMS = 4


def split_heuristic(batch: int, heads_kv: int, seqlen: int, num_sms: int) -> int:
    """Number of key-range splits for a decode call: enough (batch * kv head * split)
    programs to give every SM PROGRAMS_PER_SM of them, but no split shorter than
    MIN_KEYS_PER_SPLIT keys and at most MAX_SPLITS. `seqlen` is the longest key range a
    sequence can have (the capacity, or window + Sq - 1 with a window)."""
    programs = max(1, batch * heads_kv)
    want = -(-PROGRAMS_PER_SM * max(1, num_sms) // programs)      # ceil
    by_length = max(1, seqlen // MIN_KEYS_PER_SPLIT)
    return max(1, min(want, by_length, MAX_SPLITS))


@functools.lru_cache(None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER_SMS


def capacity_of(k_cache, block_table) -> int:
    """Key slots per sequence: S_max, or max_pages * page_size for a paged cache."""
    return block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[2]


def kv_heads_of(k_cache, block_table) -> int:
    """Hkv: dim 1 of a contiguous cache (B, Hkv, S_max, D), dim 2 of a paged one."""
    return k_cache.shape[2] if block_table is not None else k_cache.shape[1]


def choose_splits(q, k_cache, block_table, window: int, num_splits: int) -> int:
    """num_splits if given (> 0), else split_heuristic for this call."""
    if num_splits > 0:
        return num_splits
    heads_kv = kv_heads_of(k_cache, block_table)
    seqlen = capacity_of(k_cache, block_table)
    if window > 0:
        seqlen = min(seqlen, window + q.shape[2] - 1)
    return split_heuristic(q.shape[0], heads_kv, seqlen, num_sms(q.device))


def _example():
    def t(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, dtype=dtype, device="meta")
    q = t(8, 1, 32, 128).transpose(1, 2)                       # (B, Hq, 1, D) view
    k = t(8, 8, 8192, 128)
    lens = t(8, dtype=torch.int32)
    return ("q (8, 32, 1, 128) bf16 vs an 8192-slot cache, 8 kv heads, cache_seqlens",
            (q, k, k, lens, None, None, 128 ** -0.5, 0, 0.0, 0, None), {})


OP.example = _example


# ----------------------------------------------------------------------------------------------
# Backends: each takes the normalized arguments and returns (out, lse), with sinks folded into its
# softmax.

@OP.register("torch")
def _torch(q, k_cache, v_cache, cache_seqlens, block_table, mask, scale, window, softcap, num_splits, sinks):
    keys = attended_key_slice(mask, k_cache.shape[2]) if block_table is None else None
    if keys is not None:   # a mask alone decides (no lengths / window): the unattended slots go
        k_cache, v_cache, mask = k_cache[:, :, keys], v_cache[:, :, keys], mask[..., keys]
    return ref_decode.decode_attention(q, k_cache, v_cache, cache_seqlens=cache_seqlens,
                                       block_table=block_table, scale=scale, mask=mask,
                                       window=window if window > 0 else None,
                                       softcap=softcap if softcap > 0 else None, sinks=sinks)


def _triton_supports(q, k_cache, v_cache, cache_seqlens, block_table, *args):
    if q.shape[-1] > 256:
        return f"head dim {q.shape[-1]} > 256 (the Triton kernel's largest)"
    # The kernel's key positions and split bounds are int32; its grid z is rows / BLOCK_M (>= 16).
    capacity = capacity_of(k_cache, block_table)
    if capacity > 2 ** 30:
        return f"cache capacity {capacity} above 2^30 keys (int32 positions)"
    rows = q.shape[1] // max(kv_heads_of(k_cache, block_table), 1) * q.shape[2]
    if -(-rows // 16) > GRID_YZ_MAX:
        return f"{rows} packed query rows per kv head (grid z over 16-row blocks above {GRID_YZ_MAX})"
    return None


@OP.register("triton", supports=_triton_supports)
def _triton(q, k_cache, v_cache, cache_seqlens, block_table, mask, scale, window, softcap, num_splits, sinks):
    from ..triton_kernels.decode_attention import decode_attention
    splits = choose_splits(q, k_cache, block_table, window, num_splits)
    return decode_attention(q, k_cache, v_cache, cache_seqlens, block_table, mask, scale, window, softcap, splits,
                            sinks)


def _cuda_supports(*args):
    from ._decode_cuda import cuda_supports
    return cuda_supports(*args)


@OP.register("cuda", supports=_cuda_supports)
def _cuda(q, k_cache, v_cache, cache_seqlens, block_table, mask, scale, window, softcap, num_splits, sinks):
    from ._decode_cuda import decode_attention_cuda
    splits = choose_splits(q, k_cache, block_table, window, num_splits)
    return decode_attention_cuda(q, k_cache, v_cache, cache_seqlens, block_table, mask, scale, window,
                                 softcap, splits, sinks)


# ----------------------------------------------------------------------------------------------
# Custom op.

@OP.bind
@torch.library.custom_op("fastllm::decode_attention", mutates_args=())
def _op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: Optional[torch.Tensor],
        block_table: Optional[torch.Tensor], mask: Optional[torch.Tensor], scale: float, window: int,
        softcap: float, num_splits: int, sinks: Optional[torch.Tensor], backend: str
        ) -> tuple[torch.Tensor, torch.Tensor]:
    return OP.impls[backend](q, k_cache, v_cache, cache_seqlens, block_table, mask, scale, window, softcap,
                             num_splits, sinks)


@_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, block_table, mask, scale, window, softcap, num_splits, sinks,
      backend):
    B, Hq, Sq, D = q.shape
    return q.new_empty((B, Sq, Hq, D)), q.new_empty((B, Hq, Sq), dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Argument checks (each error names the argument) and the public function.

def _dt(t):
    return str(t.dtype).replace("torch.", "")


def _same_device(name, t, q):
    if t.device != q.device:
        raise ValueError(f"{NAME}: argument '{name}' must be on the device of 'q' ({q.device}), got {t.device}")


def _check_values(cache_seqlens, block_table, mask, capacity, page_size, num_pages):
    """Value checks of the metadata (a device sync on CUDA: only on CPU or with validate)."""
    if cache_seqlens is not None and cache_seqlens.numel():
        lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
        if lo < 0 or hi > capacity:
            raise ValueError(f"{NAME}: argument 'cache_seqlens' must be in [0, {capacity}] (the cache "
                             f"capacity), got values in [{lo}, {hi}]")
    if block_table is not None and block_table.numel():
        B, max_pages = block_table.shape
        if cache_seqlens is not None:
            lens = cache_seqlens.long().clamp(0, capacity)
            used = torch.arange(max_pages, device=block_table.device)[None, :] * page_size < lens[:, None]
        elif mask is not None:
            # The kernels read the pages from the first to the last key any mask row attends.
            att = torch.broadcast_to(mask, (B, 1, mask.shape[2], capacity)).any(2)[:, 0]     # (B, capacity)
            key = torch.arange(capacity, device=att.device)
            first = torch.where(att, key, capacity).amin(1, keepdim=True) // page_size
            last = torch.where(att, key, -page_size).amax(1, keepdim=True) // page_size
            page = torch.arange(max_pages, device=att.device)[None, :]
            used = (page >= first) & (page <= last)
        else:
            used = torch.ones_like(block_table, dtype=torch.bool)
        ids = block_table[used]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_pages):
            raise ValueError(f"{NAME}: argument 'block_table' holds page ids outside [0, {num_pages}) among the "
                             f"pages the sequences use (got values in [{int(ids.min())}, {int(ids.max())}])")


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
                     cache_seqlens: Optional[torch.Tensor] = None, block_table: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None, mask: Optional[torch.Tensor] = None,
                     window: Optional[int] = None, softcap: Optional[float] = None,
                     sinks: Optional[torch.Tensor] = None, return_lse: bool = False,
                     num_splits: Optional[int] = None, validate: bool = False, backend: str = "auto"):
    """Attention of a few new queries against a KV cache; see the module docstring.
    Returns out (B, Sq, Hq, D), or (out, lse (B, Hq, Sq))."""
    q, k_cache, v_cache = to_autocast_dtype(q, k_cache, v_cache)
    check_tensor(NAME, "q", q, ndim=4, dtypes=FLOAT_DTYPES)
    for n, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(NAME, n, t, ndim=4, dtypes=FLOAT_DTYPES)
        if t.dtype != q.dtype:
            raise TypeError(f"{NAME}: argument '{n}' must have the dtype of 'q' ({_dt(q)}), got {_dt(t)}")
        _same_device(n, t, q)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{NAME}: arguments 'k_cache' and 'v_cache' must have the same shape, got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    B, Hq, Sq, D = q.shape
    if not 1 <= Sq <= MAX_QUERIES:
        raise ValueError(f"{NAME}: argument 'q' must hold 1 to {MAX_QUERIES} queries per sequence (dim 2), "
                         f"got shape {tuple(q.shape)}; use flash_attention for prefill")
    if D == 0 or k_cache.shape[-1] != D:
        raise ValueError(f"{NAME}: argument 'k_cache' must have the head dim of 'q' ({D}), got shape "
                         f"{tuple(k_cache.shape)}")
    paged = block_table is not None
    if paged:
        check_tensor(NAME, "block_table", block_table, ndim=2, dtypes=(torch.int32,))
        _same_device("block_table", block_table, q)
        if block_table.shape[0] != B:
            raise ValueError(f"{NAME}: argument 'block_table' must have the batch size of 'q' ({B}) rows, got "
                             f"shape {tuple(block_table.shape)}")
        num_pages, page_size, Hkv, _ = k_cache.shape
        if page_size < 1:
            raise ValueError(f"{NAME}: argument 'k_cache' (paged: num_pages, page_size, Hkv, D) must have "
                             f"page_size >= 1, got shape {tuple(k_cache.shape)}")
        if num_pages < 1 and block_table.numel():
            raise ValueError(f"{NAME}: argument 'k_cache' (paged) has no pages but 'block_table' is not empty")
        if block_table.shape[1] > 1 and block_table.stride(1) != 1:
            raise ValueError(f"{NAME}: argument 'block_table' must have unit stride in dim 1, got strides "
                             f"{tuple(block_table.stride())}")
    else:
        if k_cache.shape[0] != B:
            raise ValueError(f"{NAME}: argument 'k_cache' must have the batch size of 'q' ({B}), got shape "
                             f"{tuple(k_cache.shape)} (a paged cache needs 'block_table')")
        num_pages, page_size, Hkv = 0, 0, k_cache.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"{NAME}: the number of query heads ({Hq}) must be a multiple of the number of kv "
                         f"heads in 'k_cache'/'v_cache' ({Hkv})")
    for n, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if D > 1 and t.stride(-1) != 1:
            raise ValueError(f"{NAME}: argument '{n}' must have unit stride in the head dim (last dim), "
                             f"got strides {tuple(t.stride())}")
    capacity = capacity_of(k_cache, block_table)
    if cache_seqlens is not None:
        check_tensor(NAME, "cache_seqlens", cache_seqlens, ndim=1, dtypes=(torch.int32,))
        _same_device("cache_seqlens", cache_seqlens, q)
        if cache_seqlens.shape[0] != B:
            raise ValueError(f"{NAME}: argument 'cache_seqlens' must have {B} entries (the batch size of 'q'), "
                             f"got shape {tuple(cache_seqlens.shape)}")
        cache_seqlens = cache_seqlens.contiguous()     # the kernels index it densely
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"{NAME}: argument 'mask' must be a bool torch.Tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"{NAME}: argument 'mask' must have dtype bool (True = attend), got {_dt(mask)}")
        _same_device("mask", mask, q)
        ms = tuple(mask.shape)
        if not broadcasts_to(ms, (B, 1, Sq, capacity)):
            raise ValueError(f"{NAME}: argument 'mask' must be broadcastable as ({B} or 1, 1, {Sq}, {capacity}) "
                             f"(B, 1, Sq, cache capacity), got shape {ms}")
        if cache_seqlens is not None:
            raise ValueError(f"{NAME}: pass either 'cache_seqlens' or 'mask', not both (the mask holds the lengths)")
        if window is not None:
            raise ValueError(f"{NAME}: argument 'window' cannot be combined with 'mask' (the mask holds the window)")
    _, scale, window, softcap = _normalize(NAME, D, True, scale, window, softcap)
    if num_splits is None:
        num_splits = 0
    elif isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral):
        raise TypeError(f"{NAME}: argument 'num_splits' must be an int in [1, {MAX_NUM_SPLITS}] or None, got "
                        f"{type(num_splits).__name__}")
    elif not 1 <= num_splits <= MAX_NUM_SPLITS:
        # The bound keeps the fp32 partials (B, Hq, Sq, num_splits, D) a sane size.
        raise ValueError(f"{NAME}: argument 'num_splits' must be an int in [1, {MAX_NUM_SPLITS}] or None, "
                         f"got {num_splits}")
    if not isinstance(validate, bool):
        raise TypeError(f"{NAME}: argument 'validate' must be a bool, got {type(validate).__name__}")
    if (validate or q.device.type == "cpu") and not torch.compiler.is_compiling():
        _check_values(cache_seqlens, block_table, mask, capacity, page_size, num_pages)
    args = (q, k_cache, v_cache, cache_seqlens, block_table, mask, scale, window, softcap, int(num_splits),
            check_sinks(NAME, sinks, q, Hq))
    b = OP.select(backend, q.device, *args)
    out, lse = OP.call(b, *args)
    return (out, lse) if return_lse else out


__all__ = ["decode_attention", "split_heuristic", "MAX_QUERIES"]
