"""fastllm.ops.flash_attention / flash_attention_varlen: exact prefill attention, three backends.

    out = flash_attention(q, k, v, causal=True)                      # (B, Sq, Hq, D)
    out, lse = flash_attention(q, k, v, causal=False, mask=m, return_lse=True)
    out = flash_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=True)  # (total_q, Hq, D)

flash_attention(q, k, v, *, causal, scale=None, mask=None, window=None, softcap=None,
                sinks=None, bias=None, return_lse=False, backend="auto")
  q: (B, Hq, Sq, D); k, v: (B, Hkv, Skv, D). Any strides with unit stride in D: transformers
     hands q as a transposed view of a (B, S, H, D) buffer, which is read in place, never copied.
  dtypes float16, bfloat16 (float32 accumulation) or float32; q, k, v share dtype and device.
     Under torch.autocast they are first cast to the autocast dtype, as SDPA's are
     (fastllm/ops/_autocast.py).
  GQA / MQA: Hq a multiple of Hkv; query head h reads kv head h // (Hq // Hkv); K/V are never
     repeated in memory.
  causal: bottom-right aligned. Query i sits at absolute position p_i = i + Skv - Sq (the
     queries are the last Sq tokens, e.g. a continuation against a KV cache) and sees keys
     j <= p_i. With Sq > Skv the first Sq - Skv rows see nothing.
  mask: optional bool tensor broadcastable to (B, 1, Sq, Skv) (each of dims 0, 2, 3 either full
     or 1; dim 1 is 1), True = attend: transformers' sdpa mask (left / right padding). Any
     strides, expanded views included. K / V must be finite at every key: the kernels skip
     whole tiles that causality, the window or the mask rule out, but an excluded key sharing a
     tile (or the mask's first..last allowed-key range) with an allowed one is read and
     weighted by 0 (NaN / inf there give NaN on the cuda and triton backends, as in plain
     matmul attention).
  window=W (int >= 1): sliding window as transformers' `sliding_window` (Mistral, Gemma): the
     query at position p sees only keys at positions > p - W (W keys, its own included). With
     causal=False it restricts only the left side.
  softcap=c (float > 0, Gemma 2): s = c * tanh(s / c) on the scaled scores, before masking.
  sinks: optional (Hq,) float tensor, attention sinks (gpt-oss's s_aux): one extra logit per
     query head in every row's softmax, with no value; lse then includes it. Every backend folds
     it into its softmax (the CUDA kernels into their epilogue).
  bias: optional float tensor (float16 / bfloat16 / float32, any strides) broadcastable to
     (B, Hq, Sq, Skv) (each dim full or 1): an additive score bias (relative position biases:
     Swin, BEiT, Parakeet; ALiBi), s = s + bias after softcap and before masking. -inf masks a
     key; finite sums are floored at -2^126 (fastllm/ref/attention.py), so a row whose keys all
     carry the dtype's minimum averages them uniformly, as eager attention does. The CUDA kernels
     take it at head dims 64 / 80 / 96 / 128 (auto picks Triton at 256); NaN / +inf in it give
     NaN rows.
  scale: defaults to 1 / sqrt(D).
  Returns out (B, Sq, Hq, D) contiguous in q.dtype (the layout transformers' attention
  interface returns) and, with return_lse=True, also lse (B, Hq, Sq) float32: the natural-log
  log-sum-exp of the scaled (softcapped, biased) scores over the allowed keys. A row with no allowed
  key gets out = 0 (never NaN) and lse = -inf.

flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                       causal, scale=None, window=None, softcap=None, sinks=None,
                       return_lse=False, backend="auto")
  flash-attn's packed layout, no padding tokens computed: q (total_q, Hq, D), k/v
  (total_k, Hkv, D), cu_seqlens_* int32 (B + 1,) non-decreasing prefix sums from 0 to at most
  total_q / total_k; max_seqlen_* are upper bounds of the per-sequence lengths (they size the
  launch grid). Same semantics per sequence (causal bottom-right aligned per sequence). Returns
  out (total_q, Hq, D) contiguous and, with return_lse, lse (Hq, total_q) float32 (flash-attn's
  varlen lse layout); rows past cu_seqlens_q[-1] get out 0, lse -inf. The values of cu_seqlens
  and max_seqlen are checked on CPU tensors (ValueError naming the argument); on CUDA only with
  validate=True (a device sync). Unchecked, every backend reads the offsets clamped into the
  packed tensors: bad values give wrong rows (past max_seqlen_q: 0), never out-of-bounds accesses.

Custom ops: fastllm::flash_attention and fastllm::flash_attention_varlen; both always return
(out, lse) (lse is cheap); the public functions drop lse unless return_lse. Inside the ops the
arguments are normalized: scale a float, window an int (<= 0: none), softcap a float
(0.0: none), mask None or a bool tensor broadcastable to (B, 1, Sq, Skv), sinks None or (Hq,)
float32, bias None or a float tensor broadcastable to (B, Hq, Sq, Skv).

Backends: "cuda" (csrc/attention, through the hook module fastllm.ops._attention_cuda: mma.sync
for D 64 / 80 / 96 / 128 / 256 on sm80+; on sm_90 with a 90a build D 64 / 128 / 256 run a wgmma
kernel with the same skeleton, FASTLLM_ATTN_WGMMA=0 keeps the mma.sync one; UNVERIFIED: compiled,
never run on a GPU), "triton" (triton_kernels/flash_attention.py, D <= 256), "torch"
(fastllm/ref/attention.py).
"""
import math
import numbers
from typing import Optional

import torch

from .. import ref
from ._autocast import to_autocast_dtype
from ._checks import FLOAT_DTYPES, GRID_YZ_MAX, as_bool, attended_key_slice, broadcasts_to, check_tensor
from ._sinks import check_sinks
from .registry import new_op

OP = new_op("flash_attention")
OP_VARLEN = new_op("flash_attention_varlen")

TRITON_MAX_HEAD_DIM = 256


def _example_qkv(total_q=None):
    def t(*shape):
        return torch.empty(*shape, dtype=torch.bfloat16, device="meta")
    if total_q is None:   # (B, H, S, D) views as transformers passes them
        return t(1, 4096, 32, 128).transpose(1, 2), t(1, 4096, 8, 128).transpose(1, 2), t(1, 4096, 8, 128).transpose(1, 2)
    return t(total_q, 32, 128), t(total_q, 8, 128), t(total_q, 8, 128)


OP.example = lambda: ("q (1, 32, 4096, 128) bf16, k/v 8 heads, causal",
                      _example_qkv() + (None, True, 128 ** -0.5, 0, 0.0, None, None), {})
OP_VARLEN.example = lambda: ("packed 4096 tokens, 32/8 heads, D 128 bf16, causal",
                             _example_qkv(4096) + (torch.empty(3, dtype=torch.int32, device="meta"),
                                                   torch.empty(3, dtype=torch.int32, device="meta"),
                                                   2048, 2048, True, 128 ** -0.5, 0, 0.0, None), {})


# ----------------------------------------------------------------------------------------------
# Backends. Every impl takes the normalized arguments and returns (out, lse); each folds sinks
# into its softmax.

@OP.register("torch")
def _torch(q, k, v, mask, causal, scale, window, softcap, sinks, bias):
    keys = None if causal or window > 0 else attended_key_slice(mask, k.shape[2])
    if keys is not None:   # (causal / window positions are relative to Skv: those keep every key)
        k, v, mask = k[:, :, keys], v[:, :, keys], mask[..., keys]
        bias = bias[..., keys] if bias is not None and bias.shape[-1] > 1 else bias
    return ref.flash_attention(q, k, v, causal=causal, scale=scale, mask=mask,
                               window=window if window > 0 else None,
                               softcap=softcap if softcap > 0 else None, sinks=sinks, bias=bias)


def _triton_supports(q, k, v, *args, batch=None):
    D = q.shape[-1]
    if D > TRITON_MAX_HEAD_DIM:
        return f"head dim {D} > {TRITON_MAX_HEAD_DIM} (the Triton kernel's largest)"
    B, Hq = (q.shape[0], q.shape[1]) if batch is None else (batch, q.shape[1])
    if max(B, Hq) > GRID_YZ_MAX:   # the Triton kernel puts heads on grid y, sequences on z
        return f"{B} sequences x {Hq} heads: the Triton grid allows at most {GRID_YZ_MAX} of each"
    return None


def _triton_varlen_supports(q, k, v, cu_q, *args):
    return _triton_supports(q, k, v, batch=cu_q.shape[0] - 1)


@OP.register("triton", supports=_triton_supports)
def _triton(q, k, v, mask, causal, scale, window, softcap, sinks, bias):
    from ..triton_kernels.flash_attention import flash_attention
    return flash_attention(q, k, v, mask, causal, scale, window, softcap, sinks, bias)


def _cuda_supports(q, k, v, mask, causal, scale, window, softcap, sinks=None, bias=None):
    from ._attention_cuda import cuda_supports
    return cuda_supports(q, k, v, mask, causal, scale, window, softcap, sinks, bias)


@OP.register("cuda", supports=_cuda_supports)
def _cuda(q, k, v, mask, causal, scale, window, softcap, sinks, bias):
    from ._attention_cuda import flash_attention_cuda
    return flash_attention_cuda(q, k, v, mask, causal, scale, window, softcap, sinks, bias)


@OP_VARLEN.register("torch")
def _torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window, softcap, sinks):
    return ref.flash_attention_varlen(q, k, v, cu_q, cu_k, causal=causal, scale=scale,
                                      window=window if window > 0 else None,
                                      softcap=softcap if softcap > 0 else None, sinks=sinks)


@OP_VARLEN.register("triton", supports=_triton_varlen_supports)
def _triton_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window, softcap, sinks):
    from ..triton_kernels.flash_attention import flash_attention_varlen
    return flash_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window, softcap, sinks)


def _cuda_varlen_supports(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window, softcap, sinks=None):
    from ._attention_cuda import cuda_varlen_supports
    return cuda_varlen_supports(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window, softcap, sinks)


@OP_VARLEN.register("cuda", supports=_cuda_varlen_supports)
def _cuda_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window, softcap, sinks):
    from ._attention_cuda import flash_attention_varlen_cuda
    return flash_attention_varlen_cuda(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window, softcap, sinks)


# ----------------------------------------------------------------------------------------------
# Custom ops.

@OP.bind
@torch.library.custom_op("fastllm::flash_attention", mutates_args=())
def _op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
        causal: bool, scale: float, window: int, softcap: float, sinks: Optional[torch.Tensor],
        bias: Optional[torch.Tensor], backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return OP.impls[backend](q, k, v, mask, causal, scale, window, softcap, sinks, bias)


@_op.register_fake
def _(q, k, v, mask, causal, scale, window, softcap, sinks, bias, backend):
    B, Hq, Sq, D = q.shape
    return (q.new_empty((B, Sq, Hq, D)), q.new_empty((B, Hq, Sq), dtype=torch.float32))


@OP_VARLEN.bind
@torch.library.custom_op("fastllm::flash_attention_varlen", mutates_args=())
def _op_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
               cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
               scale: float, window: int, softcap: float, sinks: Optional[torch.Tensor], backend: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    return OP_VARLEN.impls[backend](q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    causal, scale, window, softcap, sinks)


@_op_varlen.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window,
      softcap, sinks, backend):
    total_q, Hq, D = q.shape
    return (q.new_empty((total_q, Hq, D)), q.new_empty((Hq, total_q), dtype=torch.float32))


# ----------------------------------------------------------------------------------------------
# Argument checks (each error names the argument) and the public functions.

def _dt(t):
    return str(t.dtype).replace("torch.", "")


def _check_qkv(name, q, k, v, ndim, head_dim):
    for n, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, n, t, ndim=ndim, dtypes=FLOAT_DTYPES)
    for n, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: argument '{n}' must have the dtype of 'q' ({_dt(q)}), got {_dt(t)}")
        if t.device != q.device:
            raise ValueError(f"{name}: argument '{n}' must be on the device of 'q' ({q.device}), got {t.device}")
    if k.shape != v.shape:
        raise ValueError(f"{name}: arguments 'k' and 'v' must have the same shape, got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    D = q.shape[-1]
    if k.shape[-1] != D:
        raise ValueError(f"{name}: argument 'k' must have the head dim of 'q' ({D}), got shape {tuple(k.shape)}")
    if D == 0:
        raise ValueError(f"{name}: argument 'q' has head dim 0")
    Hq, Hkv = q.shape[head_dim], k.shape[head_dim]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"{name}: the number of query heads ({Hq}) must be a multiple of the number of "
                         f"kv heads in 'k'/'v' ({Hkv})")
    for n, t in (("q", q), ("k", k), ("v", v)):
        if D > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name}: argument '{n}' must have unit stride in the head dim (last dim), "
                             f"got strides {tuple(t.stride())}")


_FP32_MAX, _FP32_TINY = torch.finfo(torch.float32).max, torch.finfo(torch.float32).tiny
_WINDOW_MAX = 2 ** 31 - 1


def _normalize(name, D, causal, scale, window, softcap):
    """(causal, scale, window, softcap) as the custom ops take them (bool, float, int, float)."""
    causal = as_bool(name, "causal", causal)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{name}: argument 'scale' must be a float or None, got {type(scale).__name__}")
    elif not abs(scale) <= _FP32_MAX:   # the kernels compute in fp32 (NaN fails this too)
        raise ValueError(f"{name}: argument 'scale' must be finite in float32, got {scale}")
    if window is None:
        window = 0
    elif isinstance(window, bool) or not isinstance(window, numbers.Integral):
        raise TypeError(f"{name}: argument 'window' must be an int >= 1 or None, got {type(window).__name__}")
    elif window < 1:
        raise ValueError(f"{name}: argument 'window' must be >= 1 (or None for no window), got {window}")
    # A window at least as long as any sequence restricts nothing: capped so it fits every int type.
    window = min(int(window), _WINDOW_MAX)
    if softcap is None:
        softcap = 0.0
    elif isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"{name}: argument 'softcap' must be a float > 0 or None, got {type(softcap).__name__}")
    elif not 0 < softcap <= _FP32_MAX:
        raise ValueError(f"{name}: argument 'softcap' must be a finite float > 0 (within float32) or None, got {softcap}")
    elif scale != 0 and abs(scale) / softcap < _FP32_TINY:
        # scale / softcap is the kernels' fp32 multiplier inside tanh: it must not underflow.
        raise ValueError(f"{name}: argument 'softcap' = {softcap} is too large for scale {scale} "
                         f"(scale / softcap underflows float32)")
    return causal, float(scale), window, float(softcap)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                    scale: Optional[float] = None, mask: Optional[torch.Tensor] = None,
                    window: Optional[int] = None, softcap: Optional[float] = None,
                    sinks: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                    return_lse: bool = False, backend: str = "auto"):
    """Exact attention; see the module docstring. Returns out (B, Sq, Hq, D), or (out, lse)."""
    name = "flash_attention"
    q, k, v = to_autocast_dtype(q, k, v)
    _check_qkv(name, q, k, v, 4, 1)
    B, Hq, Sq, D = q.shape
    if k.shape[0] != B:
        raise ValueError(f"{name}: argument 'k' must have the batch size of 'q' ({B}), got shape {tuple(k.shape)}")
    Skv = k.shape[2]
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"{name}: argument 'mask' must be a bool torch.Tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"{name}: argument 'mask' must have dtype bool (True = attend), got {_dt(mask)}")
        if mask.device != q.device:
            raise ValueError(f"{name}: argument 'mask' must be on the device of 'q' ({q.device}), got {mask.device}")
        ms = tuple(mask.shape)
        if not broadcasts_to(ms, (B, 1, Sq, Skv)):
            raise ValueError(f"{name}: argument 'mask' must be broadcastable as ({B} or 1, 1, {Sq}, {Skv}) "
                             f"(B, 1, Sq, Skv), got shape {ms}")
    causal, scale, window, softcap = _normalize(name, D, causal, scale, window, softcap)
    sinks = check_sinks(name, sinks, q, Hq)
    _check_bias(name, bias, q, B, Hq, Sq, Skv)
    b = OP.select(backend, q.device, q, k, v, mask, causal, scale, window, softcap, sinks, bias)
    out, lse = OP.call(b, q, k, v, mask, causal, scale, window, softcap, sinks, bias)
    return (out, lse) if return_lse else out


def _check_bias(name, bias, q, B, Hq, Sq, Skv):
    if bias is None:
        return
    check_tensor(name, "bias", bias, dtypes=FLOAT_DTYPES)
    if bias.device != q.device:
        raise ValueError(f"{name}: argument 'bias' must be on the device of 'q' ({q.device}), got {bias.device}")
    bs = tuple(bias.shape)
    if not broadcasts_to(bs, (B, Hq, Sq, Skv)):
        raise ValueError(f"{name}: argument 'bias' must be broadcastable as ({B} or 1, {Hq} or 1, {Sq} or 1, "
                         f"{Skv} or 1) (B, Hq, Sq, Skv), got shape {bs}")


def _check_varlen_values(name, cu_q, cu_k, total_q, total_k, max_q, max_k):
    """Value checks of cu_seqlens (a device sync on CUDA: only on CPU or with validate)."""
    for n, cu, total, mx, mname in (("cu_seqlens_q", cu_q, total_q, max_q, "max_seqlen_q"),
                                    ("cu_seqlens_k", cu_k, total_k, max_k, "max_seqlen_k")):
        c = cu.long().cpu()
        lens = c[1:] - c[:-1]
        if int(c[0]) != 0 or (lens.numel() and int(lens.min()) < 0) or int(c[-1]) > total:
            raise ValueError(f"{name}: argument '{n}' must be non-decreasing prefix sums from 0 to at most "
                             f"{total} (the packed rows), got {c.tolist() if c.numel() <= 8 else c}")
        if lens.numel() and int(lens.max()) > mx:
            raise ValueError(f"{name}: argument '{mname}' = {mx} is below the longest sequence in '{n}' "
                             f"({int(lens.max())}); its rows past {mname} would not be computed")


def flash_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, *, causal: bool,
                           scale: Optional[float] = None, window: Optional[int] = None,
                           softcap: Optional[float] = None, sinks: Optional[torch.Tensor] = None,
                           return_lse: bool = False, validate: bool = False, backend: str = "auto"):
    """Exact attention over packed sequences; see the module docstring. Returns out
    (total_q, Hq, D), or (out, lse (Hq, total_q))."""
    name = "flash_attention_varlen"
    q, k, v = to_autocast_dtype(q, k, v)
    _check_qkv(name, q, k, v, 3, 1)
    for n, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_tensor(name, n, t, ndim=1, dtypes=(torch.int32,))
        if t.device != q.device:
            raise ValueError(f"{name}: argument '{n}' must be on the device of 'q' ({q.device}), got {t.device}")
        if t.shape[0] < 1:
            raise ValueError(f"{name}: argument '{n}' must have B + 1 >= 1 entries, got shape {tuple(t.shape)}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"{name}: arguments 'cu_seqlens_q' and 'cu_seqlens_k' must have the same length "
                         f"(B + 1), got {cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}")
    for n, x in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(x, bool) or not isinstance(x, numbers.Integral):
            raise TypeError(f"{name}: argument '{n}' must be an int >= 0, got {type(x).__name__}")
        if x < 0:
            raise ValueError(f"{name}: argument '{n}' must be an int >= 0, got {x}")
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()   # indexed densely
    causal, scale, window, softcap = _normalize(name, q.shape[-1], causal, scale, window, softcap)
    if not isinstance(validate, bool):
        raise TypeError(f"{name}: argument 'validate' must be a bool, got {type(validate).__name__}")
    if (validate or q.device.type == "cpu") and not torch.compiler.is_compiling():
        _check_varlen_values(name, cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k)
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), causal, scale,
            window, softcap, check_sinks(name, sinks, q, q.shape[1]))
    b = OP_VARLEN.select(backend, q.device, *args)
    out, lse = OP_VARLEN.call(b, *args)
    return (out, lse) if return_lse else out
