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


def norm_source(s):
    """Source text with every run of whitespace one space (what the drift checks compare)."""
    return re.sub(r"\s+", " ", s).strip()


def assert_mirrored(sources):
    """The emulation files transcribe kernel lines into Python: each (path, lines) pair lists lines
    that must still be in the file verbatim (whitespace-normalized), so an edit of the kernel
    fails the emulation's drift test until its mirror is updated. path may be a tuple of paths
    (lines found in any of them)."""
    missing = []
    for path, lines in sources:
        paths = path if isinstance(path, tuple) else (path,)
        src = norm_source("\n".join(p.read_text() for p in paths))
        missing += [f"{paths[0].name}: {line}" for line in lines if norm_source(line) not in src]
    assert not missing, "the kernel changed; update the emulation in this file:\n" + "\n".join(missing)
