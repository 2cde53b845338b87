"""python -m fastllm.bench {attention,decode,int8,sparse24,quantize,model,all} [options]

Each row: time (median, L2 flushed, after warm-up), TFLOP/s, TOPS or GB/s, and the fraction of
this device's ceiling measured at the start of the run (dense matmul, torch._int_mm, copy
bandwidth), for fastllm's backends and every peer available in the same run. Every row is
checked against a reference over its whole output first; a wrong one is reported WRONG, not
timed. fastllm backends that cannot serve a call and peers that are absent are listed as
missing with the reason (on CUDA also fastllm's torch backend, the pure-PyTorch reference: not
timed unless --backend torch). Arguments (dtypes, shape presets per suite, output paths,
matplotlib for --plot) are checked before anything runs; the JSON also records the commit,
versions and the command line. On CPU the numbers are labelled CPU and come from small shapes:
that mode only smoke-tests the harness.
"""
import argparse
import importlib
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import check, parse_device, report
from .timing import Timer, measure_peaks

SUITES = ["attention", "decode", "quantize", "model", "sparse24", "int8"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BACKENDS = ("cuda", "triton", "torch")


class Context:
    """What a suite needs: device, dtypes, timer, peaks, backend filter, progress, missing peers
    and notes (what a suite fixed or ignored, said in the report)."""

    def __init__(self, args):
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)   # peers and streams that take the current device
        self.quick = args.quick
        # dtype_given: suites with a fixed default (int8, model) follow --dtype only when given.
        self.dtype_given = bool(args.dtype)
        self.dtypes = [DTYPES[d] for d in args.dtype.split(",")] if args.dtype else (
            [torch.bfloat16, torch.float16] if self.device.type == "cuda" else [torch.float32])
        self.requested = args.backend.split(",") if args.backend else None
        self.shapes = list(dict.fromkeys(args.shapes.split(","))) if args.shapes else None
        self.missing = []
        self.errors = []     # fastllm implementations that raised: the run fails
        self.notes = []
        self.partial = []    # the running suite's rows (rows())
        self.verbose = not args.no_progress
        self.timer = Timer(self.device, warmup=3 if args.quick else 10, reps=10 if args.quick else 30)
        self.peaks = measure_peaks(self.device, quick=args.quick)

    def presets(self, table):
        names = self.shapes or list(table)
        unknown = [n for n in names if n not in table]
        if unknown:
            raise SystemExit(f"unknown --shapes {unknown}; known: {', '.join(table)}")
        return names

    def impl_raised(self, name, where, e):
        """An implementation raised when called: a peer (torch._int_mm, flash-attn, cuSPARSELt:
        shapes it does not take) is listed missing; one of fastllm's own is an error that
        fails the run (exit 1), not a row quietly left out."""
        entry = (f"{name} {where}", check.error_line(e))
        (self.errors if name.startswith("fastllm") else self.missing).append(entry)

    def rows(self):
        """The list a suite collects its rows in: kept by the context, so a run interrupted in
        the middle of a suite (a timeout's SIGINT) still saves the rows measured so far."""
        self.partial = []
        return self.partial

    def note(self, text):
        if text not in self.notes:
            self.notes.append(text)

    def matmul_peak(self, dtype):
        """Measured dense-matmul ceiling for rows computing in `dtype`: the bf16 one for both
        16-bit types (same tensor-core rate), the fp32 one for fp32; None where not measured
        (then no fraction is shown rather than one of another dtype's peak)."""
        if dtype in (torch.bfloat16, torch.float16):
            return self.peaks.get("matmul_bf16_tflops")
        if dtype == torch.float32:
            return self.peaks.get("matmul_fp32_tflops")
        return None

    def backends(self, op, device, *args):
        """fastllm backends to time: those requested (default: all) that can serve the call.
        Every other one is listed missing with its reason. Unless asked for with --backend: on
        CPU the Triton interpreter is left out (a test tool, not a contender), and on CUDA the
        torch backend (the pure-PyTorch reference)."""
        out = []
        auto = self.requested is None
        for b in self.requested or op.order:
            why = op.reason(b, device, *args, auto=auto)
            if why is None and auto and b == "torch" and device.type == "cuda":
                why = "fastllm's pure-PyTorch reference, not a contender on CUDA: not timed unless --backend torch"
            if why is None:
                out.append(b)
            else:
                self.missing.append((f"fastllm-{b} ({op.name})", why))
        return out

    def progress(self, items, desc):
        items = list(items)
        for i, it in enumerate(items):
            if self.verbose:
                print(f"\r[{desc}] {i + 1}/{len(items)} {it}   ", end="", file=sys.stderr, flush=True)
            yield it
        if self.verbose:
            print(file=sys.stderr)


def _dtype_list(text):
    names = text.split(",")
    bad = [n for n in names if n not in DTYPES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown dtype(s) {', '.join(map(repr, bad))}; known: {', '.join(DTYPES)}")
    return text


def _backend_list(text):
    bad = [n for n in text.split(",") if n not in BACKENDS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown backend(s) {', '.join(map(repr, bad))}; known: "
                                         f"{', '.join(BACKENDS)}")
    return text


def _check_writable(ap, option, path):
    """Fail now, not after an hour of timing, if the report cannot be written there."""
    p = Path(path)
    if p.is_dir():
        ap.error(f"{option} {path}: is a directory")
    existed = p.exists()
    try:
        with open(p, "a"):
            pass
    except OSError as e:
        ap.error(f"{option} {path}: cannot write there ({e.strerror or e})")
    if not existed:
        p.unlink()


def _validate(ap, args, suites):
    """Everything that can be wrong with the arguments, checked before anything runs."""
    if args.device:
        parse_device(ap, args.device, "cpu, cuda or cuda:N")
    if args.shapes:
        names = args.shapes.split(",")
        for name in suites:
            table = importlib.import_module(f"fastllm.bench.suites.{name}").PRESETS
            unknown = [n for n in names if n not in table]
            if unknown:
                ap.error(f"--shapes {','.join(unknown)}: unknown to the {name} suite; its presets: "
                         f"{', '.join(table)}")
    for option, path in (("--json", args.json), ("--markdown", args.markdown)):
        if path:
            _check_writable(ap, option, path)
    if args.plot:
        why = report.matplotlib_reason()
        if why:
            ap.error(why)
        for name in suites:
            _check_writable(ap, "--plot", report.plot_path(args.plot, name) if args.suite == "all" else args.plot)


def _git_commit():
    """HEAD of the git checkout holding this package, "-dirty" when tracked files differ from it
    (None when it is not tracked by one)."""
    pkg = Path(__file__).resolve().parent.parent
    try:
        tracked = subprocess.run(["git", "-C", str(pkg), "ls-files", "--error-unmatch", "__init__.py"],
                                 capture_output=True, text=True, timeout=20)
        if tracked.returncode != 0:
            return None
        head = subprocess.run(["git", "-C", str(pkg), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=20)
        dirty = subprocess.run(["git", "-C", str(pkg), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    sha = head.stdout.strip() if head.returncode == 0 else ""
    return (sha + ("-dirty" if dirty.stdout.strip() else "")) or None


def commit_of_run():
    """(commit, where it came from): $FASTLLM_COMMIT (set by whoever copied the tree to a
    machine without .git), else git, else the commit the extension was built from."""
    from fastllm import _ext
    if os.environ.get("FASTLLM_COMMIT"):
        return os.environ["FASTLLM_COMMIT"], "FASTLLM_COMMIT"
    commit = _git_commit()
    if commit:
        return commit, "git"
    built = _ext.build_info().get("commit")
    return (built, "build_info") if built and built != "unknown" else (None, None)


def _driver_version():
    if not torch.cuda.is_available():
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def environment(args, argv):
    """What produced the numbers: commit, versions, CUDA, the command line."""
    import fastllm
    from fastllm import _ext

    def version(mod):
        try:
            return importlib.import_module(mod).__version__
        except ImportError:
            return None
    commit, source = commit_of_run()
    built = _ext.build_info().get("commit")
    return {"commit": commit, "commit_source": source, "fastllm": fastllm.__version__,
            "fastllm_build_commit": built if built != "unknown" else None,
            "python": platform.python_version(), "torch": torch.__version__, "triton": version("triton"),
            "transformers": version("transformers"), "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "flash_attn": version("flash_attn"), "driver": _driver_version(),
            "fastllm_build_cuda": _ext.build_info().get("cuda_version"),
            "argv": list(sys.argv[1:] if argv is None else argv), "args": vars(args)}


def parser():
    ap = argparse.ArgumentParser(prog="python -m fastllm.bench", description=__doc__.splitlines()[0])
    ap.add_argument("suite", choices=SUITES + ["all"])
    ap.add_argument("--backend", type=_backend_list,
                    help="comma list of fastllm backends to time (default: all that can serve)")
    ap.add_argument("--dtype", type=_dtype_list,
                    help="comma list of bf16,fp16,fp32 (default: bf16,fp16 on GPU, fp32 on CPU; int8 and model "
                         "default to bf16 on GPU)")
    ap.add_argument("--shapes", help="comma list of shape presets (suite-specific, checked up front; default: "
                                     "each suite's own)")
    ap.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and reps")
    ap.add_argument("--json", metavar="PATH", help="write rows, peaks, missing peers and environment")
    ap.add_argument("--markdown", metavar="PATH", help="also write the report as a markdown file")
    ap.add_argument("--plot", metavar="FILE", help="plot (needs matplotlib; with `all`, one file per suite: "
                                                   "STEM-suite.SUFFIX)")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    suites = SUITES if args.suite == "all" else [args.suite]
    _validate(ap, args, suites)
    env = environment(args, argv)

    ctx = None
    results = {}
    failed = []
    md = []
    label = dev_name = ""

    def save(interrupted=None):
        """JSON / markdown of the suites finished so far: rewritten after each suite, so a run
        cut short (timeout: SIGINT) keeps what it measured."""
        missing = list(dict.fromkeys(ctx.missing)) if ctx else []
        notes = list(ctx.notes) if ctx else []
        if args.markdown:
            tail = ["", "missing / skipped peers:", ""] + [f"- {w}: {y}" for w, y in missing]
            tail += (["", "notes:", ""] + [f"- {n}" for n in notes]) if notes else []
            tail += ["", f"INTERRUPTED during {interrupted}"] if interrupted else []
            with open(args.markdown, "w") as f:
                f.write("\n".join(md + tail) + "\n")
        if args.json:
            report.write_json(args.json, {"device": dev_name or None, **env, "peaks": ctx.peaks if ctx else None,
                                          "missing": missing, "notes": notes, "results": results,
                                          "interrupted": interrupted})

    name = "peaks"
    try:
        ctx = Context(args)
        dev_name = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "CPU"
        label = "" if ctx.device.type == "cuda" else " [CPU: harness smoke test, not kernel speed]"
        peaks = ", ".join(f"{k}={report.fmt(v)}" for k, v in ctx.peaks.items())
        print(f"# fastllm.bench on {dev_name}{label}")
        print(f"commit {env['commit']}; torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, "
              f"transformers {env['transformers']}")
        print("peaks measured now: " + peaks)
        md += [f"# fastllm.bench on {dev_name}{label}", "",
               f"commit {env['commit']}; torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, "
               f"transformers {env['transformers']}; args: {' '.join(env['argv'])}", "", "peaks: " + peaks]
        for name in suites:
            suite = importlib.import_module(f"fastllm.bench.suites.{name}")
            t0 = time.time()
            ctx.partial = []
            try:
                rows = suite.run(ctx)
            except Exception as e:   # noqa: BLE001 - one broken suite must not cost the others
                # (e.g. a Triton CompilationError, not a RuntimeError). A kernel that corrupted
                # the CUDA context will still fail the suites after it: their errors say so.
                failed.append(name)
                print(f"\n## {name}: FAILED ({type(e).__name__}: {e})", file=sys.stderr)
                ctx.note(f"suite {name} FAILED after {time.time() - t0:.0f}s: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''}")
                md += ["", f"## {name}", "", f"FAILED: {type(e).__name__}: {e}"]
                save()
                continue
            results[name] = rows
            print(f"\n## {name} ({time.time() - t0:.0f}s){label}\n")
            print(report.markdown(rows, suite.COLUMNS))
            md += ["", f"## {name}", "", report.markdown(rows, suite.COLUMNS)]
            save()
            if args.plot and rows:
                path = report.plot_path(args.plot, name) if args.suite == "all" else args.plot
                try:
                    report.plot(path, rows, title=f"{name} on {dev_name}", **suite.PLOT)
                except (ValueError, OSError) as e:    # the numbers are saved; say so loudly, go on
                    print(f"\nplot for {name} NOT written: {e}", file=sys.stderr)
                    ctx.note(f"plot for {name} not written: {e}")
                    save()
    except KeyboardInterrupt:
        print(f"\ninterrupted during {name}: results of the finished suites and {name}'s rows so far are kept",
              file=sys.stderr)
        if ctx is not None and ctx.partial and name not in results:
            results[name] = list(ctx.partial)
            ctx.note(f"suite {name} INTERRUPTED: its rows are those measured before the interrupt")
            md += ["", f"## {name} (interrupted: partial)", "", report.markdown(results[name], suite.COLUMNS)]
        save(interrupted=name)
        return 130
    if ctx.errors:
        print("\nERRORS (fastllm implementations that raised):")
        for what, why in dict.fromkeys(ctx.errors):
            print(f"  {what}: {why}")
        ctx.note("fastllm implementations raised: " + "; ".join(f"{w}: {y}" for w, y in dict.fromkeys(ctx.errors)))
    if ctx.missing:
        print("\nmissing / skipped peers:")
        for what, why in dict.fromkeys(ctx.missing):
            print(f"  {what}: {why}")
    if ctx.notes:
        print("\nnotes:")
        for n in ctx.notes:
            print(f"  {n}")
    save()
    return 1 if failed or ctx.errors else 0


if __name__ == "__main__":
    sys.exit(main())
