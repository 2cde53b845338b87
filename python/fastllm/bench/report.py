"""Benchmark rows -> markdown table, JSON, and optional matplotlib plot."""
import json
import math
from pathlib import Path


def fmt(v, sig=3):
    """A cell: `sig` significant digits (a microsecond kernel's ms must not print as 0.00);
    integers of 100 and more in full, tiny / huge values in scientific notation."""
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v) or v == 0:
            return str(v) if not math.isfinite(v) else "0"
        a = abs(v)
        if 1e-3 <= a < 100:
            return f"{v:.{sig}g}"
        if 100 <= a < 1e7:
            return f"{v:.0f}"
        return f"{v:.{max(sig - 1, 0)}e}"
    return str(v)


def markdown(rows, columns):
    head = "| " + " | ".join(columns) + " |"
    sep = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join([head, sep] + body)


def _finite(obj):
    """NaN / inf -> None (JSON has neither); tuples -> lists; anything else not JSON -> str."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


def write_json(path, payload):
    """Valid JSON (allow_nan=False): non-finite numbers become null first."""
    with open(path, "w") as f:
        json.dump(_finite(payload), f, indent=1, allow_nan=False)


def matplotlib_reason():
    """None if --plot can work here, else why not (checked before any suite runs)."""
    try:
        import matplotlib  # noqa: F401
        import matplotlib.pyplot  # noqa: F401
    except ImportError as e:
        return f"--plot needs matplotlib ({e}); pip install matplotlib, or drop --plot"
    return None


def plot_path(path, suite):
    """Per-suite file name: STEM-suite.SUFFIX next to PATH (any suffix or case; none is fine)."""
    p = Path(path)
    return str(p.with_name(f"{p.stem}-{suite}{p.suffix}"))


def plot(path, rows, x, y, series, title):
    """One line per distinct value of the `series` keys (a tuple of row keys: every key that
    separates incompatible points, e.g. dtype, head dim, layout, shape): y against x. A line
    that would hold two points at one x means `series` misses a key: that raises."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lines = {}
    for r in rows:
        if r.get(y) is not None:
            lines.setdefault(tuple(r.get(k) for k in series), []).append((r[x], r[y]))
    fig, ax = plt.subplots(figsize=(8, 5))
    for key in sorted(lines, key=lambda k: tuple(str(v) for v in k)):
        pts = sorted(lines[key])
        xs = [p[0] for p in pts]
        if len(set(xs)) != len(xs):
            raise ValueError(f"plot {title!r}: line {key} (keys {series}) has several points at one {x}: "
                             "a series key is missing")
        ax.plot(xs, [p[1] for p in pts], marker="o", label=" ".join(str(v) for v in key))
    ax.set_xscale("log", base=2)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
