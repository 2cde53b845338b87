"""Shared test helpers."""
import re

import torch


def poison_(t):
    """Fill an output buffer with NaN (or an extreme int) so unwritten elements show."""
    if t.dtype.is_floating_point:
        return t.fill_(float("nan"))
    return t.fill_(torch.iinfo(t.dtype).min)


def strided_rows(M, K, dtype, device, pad=7):
    """(M, K) view with a row stride of K + pad: kernels must not assume contiguity."""
    base = torch.randn(M, K + pad, dtype=torch.float32, device=device).to(dtype)
    return base[:, :K]


def _norm_source(s):
    return re.sub(r"\s+", " ", s).strip()


def assert_mirrored(sources):
    """The emulation files transcribe kernel lines into Python: each (path, lines) pair lists lines
    that must still be in the file verbatim (whitespace-normalized), so an edit of the kernel
    fails the emulation's drift test until its mirror is updated."""
    missing = []
    for path, lines in sources:
        src = _norm_source(path.read_text())
        missing += [f"{path.name}: {line}" for line in lines if _norm_source(line) not in src]
    assert not missing, "the kernel changed; update the emulation in this file:\n" + "\n".join(missing)
