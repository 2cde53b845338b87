"""Argument checks shared by the public ops: each error names the op, the argument and
what was expected, so bad input never reaches a kernel."""
import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: CUDA's limit on grid dims y and z (x allows 2^31 - 1).
GRID_YZ_MAX = 65535
_LOG2E = math.log2(math.e)


def exp2_scalars_reason(scale, softcap):
    """None, or why the CUDA attention kernels cannot take this scale / softcap: they work in
    exp2 with scale * log2(e) and softcap * log2(e) as fp32 numbers. A scale whose product is 0
    (scale < 4.9e-46) gave -inf * 0 = NaN on masked tiles, inf (scale > 2.4e38) NaN everywhere;
    a softcap whose product overflows gave NaN."""
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and 1.17549435e-38 <= scale * _LOG2E < 3.4e38):
        return f"scale {scale!r} must be a finite float with scale * log2(e) a normal fp32 number for the CUDA kernel"
    if softcap is not None and not (math.isfinite(softcap) and 0 <= softcap * _LOG2E < 3.4028234e38):
        return f"softcap {softcap!r} must be >= 0 with softcap * log2(e) below the fp32 maximum for the CUDA kernel"
    return None


def as_bool(op, name, x) -> bool:
    """x as a Python bool: a bool, or a numpy bool (what comparing numpy values gives)."""
    if isinstance(x, bool):
        return x
    t = type(x)
    if t.__module__ == "numpy" and t.__name__ in ("bool", "bool_"):
        return bool(x)
    where = "" if t.__module__ == "builtins" else t.__module__ + "."
    raise TypeError(f"{op}: argument '{name}' must be a bool, got {where}{t.__name__}")


def check_channel_stats(op, name, t, K):
    """A calibrated per-input-channel statistic (max |x| or ||x||_2), as float32: a (K,) tensor,
    finite and >= 0. NaN / inf / negative values would silently become scales, smoothing factors
    or pruning scores."""
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != (K,):
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{op}: argument '{name}' must be a ({K},) tensor (one value per input channel), got {got}")
    t = t.detach().float()
    bad = ~torch.isfinite(t) | (t < 0)
    if bool(bad.any()):
        j = int(bad.nonzero()[0, 0])
        raise ValueError(f"{op}: argument '{name}' must be finite and >= 0 (a calibrated max |x| or norm per input "
                         f"channel), got {t[j].item()} at channel {j}")
    return t


def _fmt(dtypes):
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(op, name, t, *, ndim=None, dtypes=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: argument '{name}' must be {ndim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{op}: argument '{name}' must have dtype in ({_fmt(dtypes)}), got "
                        f"{str(t.dtype).replace('torch.', '')}")
    return t


def unit_stride_reason(name, t, dim=-1):
    """Reason string (for a backend's `supports`) when `t` is not unit-stride along `dim`."""
    if t.size(dim) > 1 and t.stride(dim) != 1:
        return f"'{name}' needs unit stride in dim {dim} (got strides {tuple(t.stride())})"
    return None


def attended_key_slice(mask, n_keys):
    """slice(lo, hi) of the keys some row of a bool mask (..., n_keys or 1) attends, or None when
    narrowing would not help (the mask attends the whole range, nothing, or only broadcasts over
    keys). For the torch backends on CPU, where the host values cost no device sync: a
    StaticCache holds max_cache_len slots of which the mask attends the filled ones, and the
    reference computes every slot otherwise. Not while torch.compile traces (values unknown)."""
    if (mask is None or mask.device.type != "cpu" or mask.shape[-1] <= 1 or mask.numel() == 0
            or torch.compiler.is_compiling()):
        return None
    cols = mask.reshape(-1, mask.shape[-1]).any(0).nonzero()
    if cols.numel() == 0:
        return None
    lo, hi = int(cols[0]), int(cols[-1]) + 1
    return slice(lo, hi) if hi - lo < n_keys else None


def broadcasts_to(shape, full) -> bool:
    """Every dim of `shape` is 1 or the matching dim of `full` (same length). Written as ==, not
    `n in (1, f)`: Dynamo (torch 2.13) got the tuple membership of symbolic sizes wrong under
    torch.compile(fullgraph=True) and a valid mask was refused mid-generate."""
    return len(shape) == len(full) and all(n == 1 or n == f for n, f in zip(shape, full))


def broadcast_strides(t: torch.Tensor, dims) -> tuple:
    """t's strides (elements) in `dims`, 0 for a dim of size 1: a kernel never steps over a
    broadcast dim, whatever stride it reports, so the launchers see one convention."""
    return tuple(t.stride(i) if t.size(i) > 1 else 0 for i in dims)


def misaligned16(t: torch.Tensor) -> bool:
    """True if t's data pointer is not 16-byte aligned (the kernels' vector loads). False while
    torch.compile traces, or for a tensor without storage (torch.func's wrappers under jvp / vmap,
    whose op call then refuses them with a clear error): no address to check; the CUDA glue
    checks again when the op runs, and the launcher too."""
    if torch.compiler.is_compiling():
        return False
    try:
        return t.data_ptr() % 16 != 0
    except RuntimeError:    # "Cannot access data pointer of Tensor that doesn't have storage"
        return False


def values_checkable(t: torch.Tensor, any_device: bool = False) -> bool:
    """Whether a check may read t's values: not a meta tensor, and (unless any_device, for
    one-off checks such as a module's load) a CPU tensor outside compiled code: on CUDA a
    per-call check would sync, and a compiled graph cannot branch on a value."""
    if t.numel() == 0 or t.device.type == "meta":
        return False
    return any_device or (t.device.type == "cpu" and not torch.compiler.is_compiling())


def check_values(op: str, name: str, t: torch.Tensor, ok, expected: str, any_device: bool = False) -> None:
    """ValueError naming the first value of t where ok(t) is False ("argument must {expected}"),
    if values_checkable(t, any_device)."""
    if not values_checkable(t, any_device):
        return
    good = ok(t)
    if not bool(good.all()):
        i = int((~good).reshape(-1).to(torch.uint8).argmax())
        where = f" (index {i})" if t.numel() > 1 else ""
        raise ValueError(f"{op}: argument '{name}' must {expected}, got {t.reshape(-1)[i].item()}{where}")


def check_positive_finite(op: str, name: str, t: torch.Tensor, any_device: bool = False) -> None:
    """ValueError unless every value of t is > 0 and finite (scales, SmoothQuant factors: 0 or
    NaN there zeroes or poisons a whole channel without a word). Per-call op checks run on CPU
    only (values_checkable); the modules check these values when they are set or loaded."""
    check_values(op, name, t, lambda x: (x > 0) & torch.isfinite(x), "be positive and finite", any_device)
