"""Builds fastllm._C's sm80 kernels for the CPU SIMT emulator (simt.h) and loads the module.

    python tests/simt/build.py            # build (cached) and print the module path
    from simt.build import load; lib = load()   # (tests/ on sys.path) the emulated _C module

The sources are csrc/ as they are, the sm_90a units (wgmma / TMA / mbarrier) included,
rewritten mechanically before a host C++ compiler sees them:
  * each `asm` statement -> simt::ptx::<mnemonic>(operands in the template's order), the
    mnemonic's dots and '::' turned into '_'; an instruction simt.h has no model for fails to
    compile, so nothing runs unmodelled. Two predicate idioms are folded into the one
    instruction they guard (`setp.ne.b32 p, %N, 0` before it: p is operand N, nonzero = true;
    `selp.u32 %N, 1, 0, p` after it: p is written to operand N as 0 / 1); an empty template
    (a compiler-only register fence) becomes nothing. A header whose asm statements sit inside
    macro definitions (common/wgmma.cuh) has its own macros expanded first (cpp, includes
    kept aside) so that the templates and operand lists are literal;
  * `kernel<<<grid, block, smem, stream>>>(args)` -> simt::launch(kernel, grid, block, smem,
    stream, args);
  * `extern __shared__ ... T name[];` -> `T* name = simt::dynamic_smem<T>();`;
  * `__shared__ T a[n], b[m];` -> static arrays (one per block: blocks run one at a time),
    filled with 0xFF bytes when the block's first thread reaches them, as dynamic shared memory
    is, so a read before any write shows.
Everything else (the launchers, the kernels, bindings.cpp) compiles unchanged. The result is
cached under build/simt-<hash of inputs>/.
"""
import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
# FASTLLM_SIMT_CSRC: build another copy of csrc/ (mutation experiments: do the tests notice?).
CSRC = os.environ.get("FASTLLM_SIMT_CSRC") or os.path.join(ROOT, "csrc")
FLAGS = ["-std=c++17", "-O2", "-fPIC", "-ffp-contract=off", "-w", "-DFASTLLM_HAS_SM90A=1",
         '-DFASTLLM_BUILT_ARCHS="simt80,90a"']


def cuda_include():
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda", *sorted(
            (os.path.join("/usr/local", d) for d in os.listdir("/usr/local") if d.startswith("cuda")), reverse=True)):
        if root and os.path.exists(os.path.join(root, "include", "cuda_fp16.h")):
            return os.path.join(root, "include")
    raise RuntimeError("no CUDA headers found (set CUDA_HOME)")


def sources():
    """csrc files the emulated module is built from (relative paths)."""
    out = []
    for d, _, files in os.walk(CSRC):
        for f in files:
            rel = os.path.relpath(os.path.join(d, f), CSRC)
            if rel.startswith("cmake") or not f.endswith((".cu", ".cuh", ".h", ".cpp")):
                continue
            out.append(rel)
    return sorted(out)


# ---- the rewrite ---------------------------------------------------------------------------------

def _match(text, i, open_ch, close_ch):
    """Index just past the bracket matching text[i] == open_ch (strings and chars skipped)."""
    depth = 0
    while i < len(text):
        ch = text[i]
        if ch in "\"'":
            j = i + 1
            while text[j] != ch:
                j += 2 if text[j] == "\\" else 1
            i = j + 1
            continue
        if ch == open_ch:
            depth += 1
        elif ch == close_ch:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise ValueError(f"unbalanced {open_ch}")


def _split_top(s, sep):
    """Split s at `sep` outside (), [], {} and string literals."""
    parts, depth, cur, i = [], 0, [], 0
    while i < len(s):
        ch = s[i]
        if ch == '"':
            j = s.index('"', i + 1)
            cur.append(s[i:j + 1])
            i = j + 1
            continue
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def _fold_predicate(template, where):
    """The one instruction of a `{ .reg .pred p; ... }` block, with p replaced by the operand
    that sets it (setp.ne.b32 p, %N, 0) or receives it (selp.u32 %N, 1, 0, p)."""
    insts = [s.strip() for s in template.strip().strip("{}").split(";") if s.strip()]
    if not insts or insts[0] != ".reg .pred p":
        raise ValueError(f"{where}: asm block not modelled: {template!r}")
    pred, main = None, []
    for s in insts[1:]:
        m = re.fullmatch(r"setp\.ne\.b32 p, (%\d+), 0", s) or re.fullmatch(r"selp\.u32 (%\d+), 1, 0, p", s)
        if m:
            pred = m.group(1)
        else:
            main.append(s)
    if pred is None or len(main) != 1:
        raise ValueError(f"{where}: asm block not modelled: {template!r}")
    mnemonic, _, rest = main[0].partition(" ")
    return mnemonic + " " + re.sub(r"\bp\b", pred, rest)


def _asm_call(body, where):
    """`"template" : outs : ins [: clobbers]` -> `::simt::ptx::name(args)`."""
    sections = _split_top(body, ":")
    template = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', sections[0])).replace("\\n", " ").strip().rstrip(";")
    if not template:   # asm volatile("" : "+r"(x)): a compiler-only fence, nothing to run
        return "((void)0)"
    if template.startswith("{"):
        template = _fold_predicate(template, where)
    ops = []
    for sec in sections[1:3]:
        for op in filter(None, _split_top(sec, ",")):
            m = re.fullmatch(r'"([^"]*)"\s*\((.*)\)', op, re.S)
            if not m:
                raise ValueError(f"{where}: cannot read asm operand {op!r}")
            ops.append(m.group(2).strip())
    mnemonic, _, rest = template.partition(" ")
    name = mnemonic.replace("::", "_").replace(".", "_")
    args, seen = [], set()
    for item in filter(None, _split_top(rest, ",")):
        if item == "_":   # the sink operand (mbarrier.arrive's discarded state)
            continue
        refs = re.findall(r"%(\d+)", item)
        if not refs:   # an immediate written into the template
            args.append(item)
            continue
        for r in map(int, refs):
            if r not in seen:   # a repeated operand (mma's C = D) is passed once
                seen.add(r)
                args.append(ops[r])
    if len(seen) != len(ops):
        raise ValueError(f"{where}: asm operands {sorted(set(range(len(ops))) - seen)} unused in {template!r}")
    if ";" in template:
        raise ValueError(f"{where}: multi-instruction asm not modelled: {template!r}")
    return f"::simt::ptx::{name}({', '.join(args)})"


def _expand_own_macros(text):
    """`text` with its own macros expanded (cpp), for headers that wrap asm in #define bodies;
    #include / #pragma once lines are kept aside and put back on top."""
    keep = [ln for ln in text.splitlines() if ln.startswith(("#include", "#pragma once"))]
    body = "\n".join(ln for ln in text.splitlines() if not ln.startswith(("#include", "#pragma once")))
    r = subprocess.run([os.environ.get("CXX", "g++"), "-E", "-P", "-x", "c++", "-undef", "-nostdinc", "-"],
                       input=body, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"simt: cpp failed:\n{r.stderr[-2000:]}")
    return "\n".join(keep) + "\n" + r.stdout


def rewrite(text, where):
    """The mechanical rewrites of the module docstring."""
    if re.search(r"#define[^\n]*\\\n(?:[^\n]*\\\n)*[^\n]*\basm\b", text):
        text = _expand_own_macros(text)
    out, i = [], 0
    for m in re.finditer(r"\basm\s*(?:volatile\s*)?\(", text):
        if m.start() < i:
            continue
        end = _match(text, m.end() - 1, "(", ")")
        out.append(text[i:m.start()])
        out.append(_asm_call(text[m.end():end - 1], where))
        i = end
    text = "".join(out) + text[i:]

    while "<<<" in text:
        s = text.index("<<<")
        j = s
        while text[j - 1].isspace():
            j -= 1
        if text[j - 1] == ">":   # template arguments of the kernel
            depth = 0
            while True:
                j -= 1
                depth += {">": 1, "<": -1}.get(text[j], 0)
                if depth == 0:
                    break
        while text[j - 1].isalnum() or text[j - 1] in "_:":
            j -= 1
        kernel = text[j:s].strip()
        e = text.index(">>>", s)
        cfg = text[s + 3:e].strip()
        a0 = text.index("(", e)
        a1 = _match(text, a0, "(", ")")
        args = text[a0 + 1:a1 - 1].strip()
        text = text[:j] + f"::simt::launch({kernel}, {cfg}{', ' + args if args else ''})" + text[a1:]

    text = re.sub(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:]+(?:\s+[\w:]+)*?)\s+(\w+)\[\];",
                  r"\1* \2 = ::simt::dynamic_smem<\1>();", text)

    def static_shared(m):   # `__shared__ T a[..], b[..];`: block-wide statics, poisoned per block
        names = [re.match(r"\s*(\w+)", d).group(1) for d in _split_top(m.group(2), ",")]
        decls = " ".join(f"static {m.group(1)} {d};" for d in _split_top(m.group(2), ","))
        return decls + "".join(f" ::simt::poison_once(&{n}, sizeof({n}));" for n in names)
    text = re.sub(r"__shared__\s+([\w:]+)\s+([^;]+);", static_shared, text)
    if re.search(r"\basm\b|__shared__", text):
        raise ValueError(f"{where}: unrewritten asm / extern shared left")
    return text


# ---- build and load --------------------------------------------------------------------------------

def _inputs_hash(src_root, files):
    h = hashlib.sha256()
    for rel in files:
        h.update(rel.encode())
        with open(os.path.join(src_root, rel), "rb") as f:
            h.update(f.read())
    for f in ("simt.h", "simt_internal.h", "simt_runtime.cpp", "simt_hopper.cpp", "build.py"):
        with open(os.path.join(HERE, f), "rb") as fh:
            h.update(fh.read())
    h.update(" ".join(FLAGS).encode())
    return h.hexdigest()[:16]


def _library(name, so_name, src_root, files, jobs=None):
    """Build (or reuse) one emulated library from `files` under `src_root`; returns its path."""
    out = os.path.join(ROOT, "build", f"simt-{name}-{_inputs_hash(src_root, files)}")
    so = os.path.join(out, so_name)
    if os.path.exists(so):
        return so
    from filelock import FileLock
    os.makedirs(out, exist_ok=True)
    with FileLock(out + ".lock"):   # pytest-xdist workers: one builds, the others wait
        if not os.path.exists(so):
            _build(src_root, files, out, so, jobs)
    return so


def module_path(jobs=None):
    """The emulated fastllm._C built from csrc/ (cached); returns the path of its shared library."""
    return _library("C", "_C" + sysconfig.get_config_var("EXT_SUFFIX"), CSRC, sources(), jobs)


def selftest_path():
    """The emulator's own test kernels (selftest.cu), for ctypes."""
    return _library("selftest", "selftest.so", HERE, ["selftest.cu"])


def unavailable_reason():
    """Why the emulated module cannot be built here (no C++ compiler / CUDA headers), or None."""
    import shutil
    if not shutil.which(os.environ.get("CXX", "g++")):
        return "no host C++ compiler (g++; or set CXX)"
    try:
        cuda_include()
    except RuntimeError as e:
        return str(e)
    return None


def _build(src_root, files, out, so, jobs):
    src = os.path.join(out, "src")
    for rel in files:
        with open(os.path.join(src_root, rel)) as f:
            try:
                text = rewrite(f.read(), rel)
            except ValueError as e:   # a Hopper-only header: fine unless something includes it
                if rel.endswith((".cu", ".cpp")):
                    raise
                text = f'#error "simt: not modelled: {e}"\n'
        os.makedirs(os.path.dirname(os.path.join(src, rel)), exist_ok=True)
        with open(os.path.join(src, rel), "w") as f:
            f.write(text)
    import pybind11
    cxx = os.environ.get("CXX", "g++")
    inc = ["-I" + src, "-I" + HERE, "-I" + cuda_include(), "-I" + pybind11.get_include(),
           "-I" + sysconfig.get_paths()["include"]]
    units = [os.path.join(src, r) for r in files if r.endswith((".cu", ".cpp"))]
    units += [os.path.join(HERE, "simt_runtime.cpp"), os.path.join(HERE, "simt_hopper.cpp")]

    def compile_one(path):
        obj = os.path.join(out, "obj", os.path.relpath(path, ROOT if path.startswith(HERE) else src) + ".o")
        os.makedirs(os.path.dirname(obj), exist_ok=True)
        cmd = [cxx, "-x", "c++", *FLAGS, *inc, "-include", os.path.join(HERE, "simt.h"), "-c", path, "-o", obj]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"simt build failed for {path}:\n{r.stderr[-6000:]}")
        return obj

    with ThreadPoolExecutor(jobs or os.cpu_count() or 2) as ex:
        objs = list(ex.map(compile_one, units))
    tmp = so + ".tmp"
    # -Bsymbolic: the module's own CUDA runtime (simt_runtime.cpp) must answer its calls even
    # where a CUDA build of PyTorch has loaded the real libcudart globally (a GPU machine);
    # without it cudaGetDeviceCount & co. bound to the real runtime there.
    r = subprocess.run([cxx, "-shared", "-Wl,-Bsymbolic", "-o", tmp, *objs], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"simt link failed:\n{r.stderr[-4000:]}")
    # Undefined symbols left: Python's (resolved at import) and versioned libc / libstdc++ ones;
    # anything else is a CUDA runtime call simt_runtime.cpp does not answer yet.
    nm = subprocess.run(["nm", "-D", "--undefined-only", tmp], capture_output=True, text=True, check=True)
    missing = [ln.split()[1] for ln in nm.stdout.splitlines()
               if ln.split()[0] == "U" and "@" not in ln and not ln.split()[1].startswith(("Py", "_Py"))]
    if missing:
        raise RuntimeError("simt link: undefined symbols: " + ", ".join(missing[:30]))
    os.replace(tmp, so)


_MODULE = None


def load():
    """The emulated fastllm._C (built on first use; later calls reuse it)."""
    global _MODULE
    if _MODULE is None:
        path = module_path()
        spec = importlib.util.spec_from_file_location("fastllm_simt._C", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        import ctypes
        mod._cdll = ctypes.CDLL(path)
        _MODULE = mod
    return _MODULE


if __name__ == "__main__":
    print(module_path(int(sys.argv[1]) if len(sys.argv) > 1 else None))
