"""PatchReport: what fastllm.patch did to a model, printable as a table (str(report))."""
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple


@dataclass
class ModuleEntry:
    """One module (or a group of alike modules) and what patch did with it."""

    name: str            # qualified module name, or a summary like "28 x nn.Linear"
    type: str            # class name
    action: str          # "replaced" | "skipped" | "left"
    detail: str          # what it became, or why it was left / skipped
    bytes_saved: int = 0


def grouped_entries(items: Iterable[Tuple[str, str, str]], action: str) -> List["ModuleEntry"]:
    """ModuleEntries for (name, class, detail) items, one per alike group: names that differ only
    in their last index are one entry, layers.0.attn and layers.2.attn -> layers.{0,2}.attn."""
    groups = defaultdict(list)
    for name, cls, detail in items:
        idx = list(re.finditer(r"\.(\d+)(?=\.|$)", name))
        pattern = name[:idx[-1].start() + 1] + "{}" + name[idx[-1].end():] if idx else name
        groups[(pattern, cls, detail)].append(idx[-1].group(1) if idx else None)
    return [ModuleEntry(pattern.replace("{}", "{" + ",".join(ids) + "}") if ids[0] is not None else pattern,
                        cls, action, detail) for (pattern, cls, detail), ids in groups.items()]


@dataclass
class OpEntry:
    """Which backend serves an op on this model's device, and why not the others."""

    op: str
    requested: str                   # backend= as passed ("auto", "triton", ...)
    selected: Optional[str]          # what serves a typical call, None if nothing can
    reasons: Dict[str, Optional[str]]  # backend -> None (can serve) or why not
    note: str = ""


@dataclass
class PatchReport:
    model: str
    device: str
    dtype: str
    options: Dict[str, object]
    versions: Dict[str, str]
    ops: List[OpEntry] = field(default_factory=list)
    modules: List[ModuleEntry] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def replaced(self) -> List[ModuleEntry]:
        return [m for m in self.modules if m.action == "replaced"]

    @property
    def skipped(self) -> List[ModuleEntry]:
        return [m for m in self.modules if m.action == "skipped"]

    @property
    def bytes_saved(self) -> int:
        return sum(m.bytes_saved for m in self.modules)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        opts = " ".join(f"{k}={v!r}" for k, v in self.options.items())
        vers = ", ".join(f"{k} {v}" for k, v in self.versions.items())
        lines = [f"fastllm patch report: {self.model} on {self.device} ({self.dtype}); {vers}",
                 f"options: {opts}", ""]
        op_rows = [(o.op, o.requested, o.selected or "NONE") for o in self.ops]
        lines += _table(("op", "requested", "backend on this device"), op_rows)
        for o in self.ops:
            lines += [f"  {o.op}: {o.note}"] if o.note else []
            lines += [f"  {o.op}: not {b}: {r}" for b, r in o.reasons.items() if r]
        lines.append("")
        mod_rows = [(m.name, m.type, m.action, m.detail, _bytes(m.bytes_saved)) for m in self.modules]
        lines += _table(("module", "type", "action", "detail", "saved"), mod_rows)
        lines.append("")
        lines.append(f"replaced {len(self.replaced)}, skipped {len(self.skipped)}, "
                     f"bytes saved {_bytes(self.bytes_saved)}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    __repr__ = __str__


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(header, rows, max_width=70):
    rows = [tuple(str(c) if len(str(c)) <= max_width else str(c)[:max_width - 3] + "..." for c in r)
            for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    out = [fmt.format(*header).rstrip(), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*r).rstrip() for r in rows]
    return out
