"""python -m fastllm.bench {attention,decode,int8,sparse24,quantize,model,all} [options]

Each row: time (median, L2 flushed, after warm-up), TFLOP/s or GB/s, and the fraction of
this device's ceiling measured at the start of the run (dense bf16 matmul, copy bandwidth),
for fastllm's backends and every peer available in the same run. Peers that are missing are
listed as missing. On CPU the numbers are labelled CPU and come from small shapes: that mode
only smoke-tests the harness.
"""
import argparse
import importlib
import sys
import time

import torch

from . import report
from .timing import Timer, measure_peaks

SUITES = ["attention", "decode", "quantize", "model", "sparse24", "int8"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Context:
    """What a suite needs: device, dtypes, timer, peaks, backend filter, progress, missing."""

    def __init__(self, args):
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.quick = args.quick
        self.dtypes = [DTYPES[d] for d in args.dtype.split(",")] if args.dtype else (
            [torch.bfloat16, torch.float16] if self.device.type == "cuda" else [torch.float32])
        self.requested = args.backend.split(",") if args.backend else None
        self.shapes = args.shapes.split(",") if args.shapes else None
        self.timer = Timer(self.device, warmup=3 if args.quick else 10, reps=10 if args.quick else 30)
        self.peaks = measure_peaks(self.device, quick=args.quick)
        self.missing = []
        self.verbose = not args.no_progress

    def presets(self, table):
        names = self.shapes or list(table)
        unknown = [n for n in names if n not in table]
        if unknown:
            raise SystemExit(f"unknown --shapes {unknown}; known: {', '.join(table)}")
        return names

    def backends(self, op, device, *args):
        """fastllm backends to time: those requested (default: all) that can serve the call.
        On CPU the Triton interpreter is left out (it is a test tool, not a contender)."""
        out = []
        for b in self.requested or op.order:
            why = op.reason(b, device, *args, auto=self.requested is None)
            if why is None:
                out.append(b)
            elif self.requested is not None:
                self.missing.append((f"fastllm-{b}", why))
        return out

    def progress(self, items, desc):
        items = list(items)
        for i, it in enumerate(items):
            if self.verbose:
                print(f"\r[{desc}] {i + 1}/{len(items)} {it}   ", end="", file=sys.stderr, flush=True)
            yield it
        if self.verbose:
            print(file=sys.stderr)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastllm.bench", description=__doc__.splitlines()[0])
    ap.add_argument("suite", choices=SUITES + ["all"])
    ap.add_argument("--backend", help="comma list of fastllm backends to time (default: all that can serve)")
    ap.add_argument("--dtype", help="comma list of bf16,fp16,fp32 (default: bf16,fp16 on GPU, fp32 on CPU)")
    ap.add_argument("--shapes", help="comma list of shape presets (suite-specific; default: all)")
    ap.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and reps")
    ap.add_argument("--json", metavar="PATH", help="write rows, peaks, missing peers and environment")
    ap.add_argument("--markdown", metavar="PATH", help="also write the report as a markdown file")
    ap.add_argument("--plot", metavar="PNG", help="plot (one file per suite: PNG gets the suite name)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    ctx = Context(args)
    dev_name = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "CPU"
    label = "" if ctx.device.type == "cuda" else " [CPU: harness smoke test, not kernel speed]"
    print(f"# fastllm.bench on {dev_name}{label}")
    print("peaks measured now: " + ", ".join(f"{k}={report.fmt(v, 1)}" for k, v in ctx.peaks.items()))
    results = {}
    md = [f"# fastllm.bench on {dev_name}{label}", "",
          "peaks: " + ", ".join(f"{k}={report.fmt(v, 1)}" for k, v in ctx.peaks.items())]

    def save(interrupted=None):
        """JSON / markdown of the suites finished so far: rewritten after each suite, so a run
        cut short (timeout: SIGINT) keeps what it measured."""
        missing = ["", "missing / skipped peers:", ""] + [f"- {w}: {y}" for w, y in dict(ctx.missing).items()]
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write("\n".join(md + missing + ([f"", f"INTERRUPTED during {interrupted}"] if interrupted else []))
                        + "\n")
        if args.json:
            import fastllm
            report.write_json(args.json, {"device": dev_name, "torch": torch.__version__,
                                          "fastllm": fastllm.__version__, "peaks": ctx.peaks,
                                          "missing": ctx.missing, "results": results,
                                          "interrupted": interrupted})

    name = None
    try:
        for name in SUITES if args.suite == "all" else [args.suite]:
            suite = importlib.import_module(f"fastllm.bench.suites.{name}")
            t0 = time.time()
            rows = suite.run(ctx)
            results[name] = rows
            print(f"\n## {name} ({time.time() - t0:.0f}s){label}\n")
            print(report.markdown(rows, suite.COLUMNS))
            md += ["", f"## {name}", "", report.markdown(rows, suite.COLUMNS)]
            if args.plot and rows:
                path = args.plot.replace(".png", f"-{name}.png") if args.suite == "all" else args.plot
                report.plot(path, rows, title=f"{name} on {dev_name}", **suite.PLOT)
            save()
    except KeyboardInterrupt:
        print(f"\ninterrupted during {name}: results of the finished suites are kept", file=sys.stderr)
        save(interrupted=name)
        return 130
    if ctx.missing:
        print("\nmissing / skipped peers:")
        for what, why in dict(ctx.missing).items():
            print(f"  {what}: {why}")
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
