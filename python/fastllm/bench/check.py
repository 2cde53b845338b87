"""Correctness checks the suites run before timing: always over the whole output, in pieces
small enough that a GPU-sized shape never needs a second full-size float copy."""
import math

import torch

from fastllm import ref

# Elements per piece when comparing / building references (fp32: 256 MiB).
CHUNK_ELEMS = 1 << 26


def max_abs_err(got, want):
    """max |got - want| over every element, compared in flat pieces; NaN if either holds a NaN
    (the comparison must never turn a NaN into a pass)."""
    if got.shape != want.shape:
        raise ValueError(f"max_abs_err: shapes differ: got {tuple(got.shape)}, want {tuple(want.shape)}")
    g, w = got.reshape(-1), want.reshape(-1)
    worst = 0.0
    for i in range(0, g.numel(), CHUNK_ELEMS):
        d = (g[i:i + CHUNK_ELEMS].float() - w[i:i + CHUNK_ELEMS].float()).abs().max().item()
        if math.isnan(d):
            return math.nan
        worst = max(worst, d)
    return worst


#: With no other implementation to compare with, a result may be this many times the error of
#: the fp32 reference rounded to the output dtype (the least any result in that dtype can have).
ALONE_FACTOR = 16


def peer_bars(errs, round_err, floor=2e-3, impl_of=lambda key: key):
    """{key: the bar its error must meet}: 3x the best finite error of the OTHER implementations
    (the best peer's own rounding in this dtype) plus a floor; an implementation never sets its
    own bar (impl_of(key) names it: decode's (impl, layout) keys of one kernel are one). With no
    other finite error (no peer installed, the others declined or failed), ALONE_FACTOR x
    `round_err` (max |reference - reference rounded to the dtype|) plus the floor. NaN / inf
    errors never set a bar."""
    bars = {}
    for name in errs:
        others = [e for n, e in errs.items() if impl_of(n) != impl_of(name) and math.isfinite(e)]
        bars[name] = 3 * min(others) + floor if others else ALONE_FACTOR * round_err + floor
    return bars


def rounding_err(want, dtype):
    """max |want - want rounded to dtype|: the error of a perfect result stored in dtype."""
    err = 0.0
    w = want.reshape(-1)
    for i in range(0, w.numel(), CHUNK_ELEMS):
        piece = w[i:i + CHUNK_ELEMS].float()
        err = max(err, (piece.to(dtype).float() - piece).abs().max().item() if piece.numel() else 0.0)
    return err


def verdict(err, bar):
    """(ok, text for the ok column): a non-finite error or one over the bar is WRONG."""
    if not math.isfinite(err):
        return False, f"WRONG (err {err})"
    if err > bar:
        return False, f"WRONG (err {err:.3g} > {bar:.3g})"
    return True, "yes"


def attention_reference(q, k, v, causal, bias=None, window=0, sinks=None):
    """fp32 reference of flash_attention over the whole output (B, Sq, Hq, D): fastllm's
    reference, run on query-row pieces so the (B, Hq, rows, Skv) score block stays under
    CHUNK_ELEMS. Causal is bottom-right aligned; with Sq == Skv a piece of rows r0:r1 sees keys
    :r1, which is what ref.flash_attention computes for (q[r0:r1], k[:r1]) (its queries are the
    last rows of the keys), and a (bottom-right aligned) window stays aligned too. bias: an additive
    (B | 1, Hq | 1, Sq, Skv) score bias, cut alike; sinks: (Hq,) sink logits."""
    B, Hq, Sq, D = q.shape
    Skv = k.shape[2]
    if causal and Sq != Skv:
        raise ValueError(f"attention_reference: causal pieces need Sq == Skv (got {Sq}, {Skv})")
    rows = max(1, min(Sq, CHUNK_ELEMS // max(1, B * Hq * Skv)))
    out = torch.empty(B, Sq, Hq, D, device=q.device, dtype=torch.float32)
    for r0 in range(0, Sq, rows):
        r1 = min(Sq, r0 + rows)
        kk, vv = (k[:, :, :r1], v[:, :, :r1]) if causal else (k, v)
        b = None if bias is None else bias[:, :, r0:r1, :kk.shape[2]].float()
        out[:, r0:r1] = ref.flash_attention(q[:, :, r0:r1].float(), kk.float(), vv.float(), causal=causal, bias=b,
                                            window=window, sinks=sinks)[0]
    return out


def matrix_check(got, want_fn, exact, rtol, block=(2048, 4096), shape=None):
    """Compare an (M, N) result with the reference over every block of rows x columns.

    want_fn(rows, cols) -> the reference block (exact: same integers; else any float dtype).
    exact: every element equal. Otherwise each row's relative error ||got - want|| / ||want||
    (double, accumulated across column blocks) must be <= rtol: a row-wise bound, so a few wrong
    rows in a large matrix are not averaged away. shape: the (M, N) expected (a shorter output
    would otherwise pass on the part it has). Returns (ok, why)."""
    if shape is not None and tuple(got.shape) != tuple(shape):
        return False, f"shape {tuple(got.shape)}, expected {tuple(shape)}"
    M, N = got.shape
    br, bc = block
    for r0 in range(0, M, br):
        rs = slice(r0, min(M, r0 + br))
        num = torch.zeros(rs.stop - rs.start, dtype=torch.float64, device=got.device)
        den = torch.zeros_like(num)
        for c0 in range(0, N, bc):
            cs = slice(c0, min(N, c0 + bc))
            want = want_fn(rs, cs)
            g = got[rs, cs]
            if exact:
                if not torch.equal(g, want.to(device=g.device, dtype=g.dtype)):
                    return False, f"int32 mismatch in rows {rs.start}..{rs.stop - 1}, cols {cs.start}..{cs.stop - 1}"
                continue
            w = want.to(device=g.device, dtype=torch.float64)
            num += (g.double() - w).pow(2).sum(1)
            den += w.pow(2).sum(1)
        if not exact:
            err = (num.sqrt() / den.sqrt().clamp_min(1e-30)).max().item()
            if not (err <= rtol):          # NaN fails too
                return False, f"row rel err {err:.3g} > {rtol}"
    return True, ""


def error_line(e: BaseException, width: int = 120) -> str:
    """An exception as one short line for a report's missing list (its type if it has no message:
    an empty str(e) must not raise inside the handler that records it)."""
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0]}"[:width] if lines else type(e).__name__
