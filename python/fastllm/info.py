"""`python -m fastllm.info [--json] [--kernels]`: what this install can do on this machine.

Version, build (archs, CUDA, flags, commit), devices seen, and for each op which backend
would serve a typical call here and why each other backend would not.
"""
import argparse
import importlib
import json
import platform

import torch

from . import _ext
from ._version import __version__
from .ops.registry import OPS


def _version(mod):
    try:
        return importlib.import_module(mod).__version__
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        return None


def _devices():
    """[(index, name, "sm_XY", SMs, native code or reason)], or a reason string."""
    if not torch.cuda.is_available():
        # PyTorch's own view first (it decides where tensors can go); the extension's runtime
        # error is extra detail (a CPU-only torch can sit beside a built fastllm._C).
        why = "this PyTorch is a CPU-only build" if torch.version.cuda is None else \
            f"torch.cuda.is_available() is False with PyTorch's CUDA {torch.version.cuda}"
        mod, _ = _ext._load()
        if mod is not None:
            n = mod.device_count()
            if n < 0 and not _ext.driver_present():
                why += "; no NVIDIA driver (libcuda.so.1 not found)"
            elif n < 0:
                why += f"; fastllm._C's CUDA runtime: {mod.error_string(-n)}"
            elif n == 0:
                why += "; fastllm._C's CUDA runtime sees no GPU"
        return f"none ({why})"
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        native = "native code: yes" if _ext.unavailable_reason() is None and _ext.arch_reason(i) is None \
            else "native code: no"
        out.append((i, p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, native))
    return out


def _op_rows(device):
    rows = []
    for name, op in sorted(OPS.items()):
        if op.example is None:
            continue
        desc, args, kw = op.example()
        reasons = op.reasons(device, *args, **kw)
        chosen = next((b for b, r in reasons.items() if r is None), None)
        rows.append({"op": name, "call": desc, "device": str(device), "backend": chosen, "reasons": reasons})
    return rows


def collect():
    bi = _ext.build_info()
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    devices = _devices()
    from .ops.registry import _triton_state
    tk, treason = _triton_state()
    return {
        "fastllm": _ext.build_info().get("version", __version__),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "triton_interpreter": bool(tk and tk.interpreting()),
        "transformers": _version("transformers"),
        "extension": "loaded" if _ext.unavailable_reason() is None else _ext.unavailable_reason(),
        "build": {k: v for k, v in bi.items() if k not in ("kernels", "units")},
        "devices": devices,
        "ops": _op_rows(dev),
        "kernels": bi.get("kernels", []),
    }


def render(info, kernels=False):
    b = info["build"]
    lines = [f"fastllm {info['fastllm']}  (python {info['python']}, torch {info['torch']}, "
             f"triton {info['triton'] or 'not installed'}"
             f"{' [interpreter]' if info['triton_interpreter'] else ''}, "
             f"transformers {info['transformers'] or 'not installed'})"]
    if b:
        lines.append(f"build:     CUDA {b['cuda_version']}, archs {' '.join('sm_' + a for a in b['archs'])} "
                     f"+ PTX {b['ptx']} ({b['archs_source']}); commit {b['commit']}, built {b['built_at']}")
    else:
        lines.append("build:     pure-Python (no CUDA extension built)")
    lines.append(f"extension: {info['extension']}")
    devs = info["devices"]
    if isinstance(devs, str):
        lines.append(f"GPUs:      {devs}")
    else:
        for i, name, arch, sms, native in devs:
            lines.append(f"GPU {i}:     {name} ({arch}, {sms} SMs), {native}")
    lines.append("")
    lines.append("ops (a typical call on this machine's default device):")
    for row in info["ops"]:
        lines.append(f"  {row['op']}  [{row['call']} on {row['device']}] -> {row['backend'] or 'NONE'}")
        for be, why in row["reasons"].items():
            lines.append(f"      {be:<7} {'ok' if why is None else why}")
    if kernels:
        lines.append("")
        lines.append(f"{'arch':<7} {'regs':>4} {'smem':>6} {'spill':>6}  kernel")
        for k in info["kernels"]:
            lines.append(f"{k['arch']:<7} {k.get('registers', '?'):>4} {k.get('smem', 0):>6} "
                         f"{k.get('spill_stores', 0) + k.get('spill_loads', 0):>6}  {k['kernel']}")
            # ptxas' advisories (a wgmma pipeline it serialized): the build's tests allow none.
            lines += [f"{'':<28}ptxas: {a}" for a in k.get("advisories", [])]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastllm.info", description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    ap.add_argument("--kernels", action="store_true",
                    help="per-kernel registers/smem/spills (and advisories) from ptxas")
    args = ap.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=1, default=str) if args.json else render(info, args.kernels))


if __name__ == "__main__":
    main()
