"""Build-time helpers of setup.py (kept here so tests can import them without running setup()).

  parse_ptxas(text, unit)            per-kernel, per-arch rows of a `ptxas -v` report, with its
                                     (Cnnnn) advisories (e.g. wgmma serialized) per kernel
  collect(build_dir, archs, root)    (kernels, units) of THIS build for _build_info.json
  build_dir_key(nvcc, archs)         the CMake build folder's name for a toolkit + arch list

capture_ptxas.py (the compiler launcher) leaves `<object>.ptxas` beside every object, so an
incremental build still reports the units it did not recompile. A build folder can also hold
reports of objects this build no longer makes: a unit deleted by `git pull`, or (were folders
shared) another arch list's sm90a units. collect() keeps a report only when its source exists
and only its rows for the archs being built.
"""
import glob
import hashlib
import os
import re
import shutil
import subprocess


#: ptxas' numbered advisories, printed as "ptxas info" before the resource blocks of their
#: arch, e.g. "(C7511) Potential Performance Loss: wgmma.mma_async instructions are serialized
#: ... in the function '<mangled>'", "(C7519) warpgroup.arrive is injected ...": each one names a
#: kernel whose wgmma pipeline ptxas had to serialize or fence itself.
ADVISORY = re.compile(r"\((C\d{4})\)\s*(.*?)\s+in (?:the )?function '(\S+)'")


def parse_ptxas(text, unit):
    """Per-kernel, per-arch resource rows from a `ptxas -v` report; "advisories" lists the
    kernel's (Cnnnn) lines (code and text) for that arch."""
    rows, cur, pending = [], None, {}
    for line in text.splitlines():
        m = ADVISORY.search(line)
        if m:
            pending.setdefault(m.group(3), []).append(f"{m.group(1)} {m.group(2)}")
            continue
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", line)
        if m:
            cur = {"unit": unit, "kernel": m.group(1), "arch": m.group(2), "advisories": pending.pop(m.group(1), [])}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["smem"] = int(s.group(1)) if s else 0
    # A function that is not an entry (a noinline device function): its advisories go on the
    # unit's last row, naming the function, so no report loses them.
    for name, adv in pending.items():
        if rows:
            rows[-1]["advisories"] += [f"{a} (function {name})" for a in adv]
    names = [r["kernel"] for r in rows]
    if names and shutil.which("c++filt"):
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout
        for r, d in zip(rows, out.splitlines()):
            r["kernel"] = d
    return rows


def collect(build_dir, archs, root):
    """(kernels, units): ptxas rows and {unit: [sm_XX, ...]} of the objects this build made."""
    want = {"sm_" + a for a in archs}
    kernels, units = [], {}
    for rep in sorted(glob.glob(os.path.join(build_dir, "**", "*.o.ptxas"), recursive=True)):
        unit = "csrc/" + os.path.relpath(rep, build_dir).split("csrc/", 1)[-1][: -len(".o.ptxas")]
        if not os.path.exists(os.path.join(root, unit)):
            continue                                  # source gone: a stale object
        with open(rep) as f:
            text = f.read()
        rows = [r for r in parse_ptxas(text, unit) if r["arch"] in want]
        targets = set(" ".join(re.findall(r"^# targets: (.*)$", text, re.M)).split()) & want
        built = sorted({r["arch"] for r in rows} | targets)
        if built:
            kernels += rows
            units[unit] = built
    return kernels, units


def build_dir_key(nvcc, archs):
    """One CMake folder per (toolkit, arch list): switching either reconfigures in a fresh
    folder (CMake wipes its cache on a compiler change and loses the -D values) and never
    mixes another build's objects into this one."""
    h = hashlib.sha1(f"{os.path.realpath(nvcc)}|{';'.join(archs)}".encode()).hexdigest()[:10]
    return f"cmake-{'_'.join(archs)}-{h}"
