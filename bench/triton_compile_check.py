"""Compile every Triton kernel for real GPU targets on a machine without a GPU, and report what
ptxas says: registers, spills, shared memory against the arch's limit.

Triton's interpreter (the CPU tests) never runs the GPU code path: the configs in the
autotune tables, num_warps / num_stages, libdevice calls and the non-INTERPRET branches are
only compiled on a GPU. This script runs each op's real Python wrapper on small CPU tensors
with a stand-in Triton driver whose target is the chosen GPU: the wrapper picks its tile
config for that arch (torch.cuda.get_device_capability answers for it) and calls the kernel;
the compile function JITFunction.run calls is replaced by a recorder of the exact source
(signature, constexprs, attributes) and options of that launch, which then is not run. Each
capture is then compiled through Triton's NVIDIA backend to PTX and the PTX through the ptxas
Triton runs for that arch (-v). Works with Triton 3.2 to 3.9 (bench/triton_versions_check.sh).

    python bench/triton_compile_check.py [--arch 80 86 90] [--case NAME ...] [--json]

Exit status 1 if a kernel needs more shared memory than the arch has, or spills (float32
kernels excepted: their IEEE FMA dots are correctness paths; their spills are reported). Run in a
process WITHOUT TRITON_INTERPRET (the test suite runs it in a subprocess). Cases: CASES below;
each calls wrappers the way the ops do on a GPU, at shapes that reach every config.
"""
import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))
if os.environ.get("TRITON_INTERPRET"):
    sys.exit("run without TRITON_INTERPRET: the interpreter never compiles for a GPU")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

# Largest dynamic shared memory per block (opt-in), bytes.
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _ptxas_for(arch):
    """The ptxas Triton itself runs for `arch`: Triton 3.9 writes PTX 9.4 for sm_90 and assembles
    it with its newer bundled ptxas (ptxas-blackwell), which the plain one (12.9) refuses."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError:
        return PTXAS
    try:
        return get_ptxas(arch).path
    except TypeError:            # Triton 3.4 / 3.5: one ptxas for every arch
        return get_ptxas().path
    except AttributeError:
        return PTXAS


class _TargetDriver:
    """The few members of Triton's active driver that JITFunction.run touches before compiling."""

    def __init__(self, arch):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


class _NoLaunch:
    """Stands in for the compiled kernel JITFunction.run would launch: every attribute it reads
    (function, packed_metadata, launch_metadata(), run(), result(), ...) is a no-op."""

    def __getattr__(self, name):
        return self

    def __call__(self, *args, **kwargs):
        return self


_DRIVER_SLOT = "_active" if hasattr(driver, "_active") else "active"   # ("active" up to Triton 3.2)


@contextlib.contextmanager
def capturing(arch):
    """Inside: Triton kernel launches are recorded (not compiled, not run) as if on a GPU of
    this arch: JITFunction.run binds and specializes the arguments for that target and calls
    the compile function it took from triton.compiler, here a recorder of (function, ASTSource,
    options) that returns a kernel whose launch does nothing. Only public names are replaced
    (triton.compiler.compile, the active driver), so this works from Triton 3.2 to 3.9."""
    captured = []

    def record(src, target=None, options=None, **kwargs):
        captured.append((src.fn, dict(src=src, options=dict(options or {}))))
        return _NoLaunch()

    old_compile, old_cap = triton.compiler.compile, torch.cuda.get_device_capability
    old_driver = getattr(driver, _DRIVER_SLOT)
    driver.set_active(_TargetDriver(arch))
    triton.compiler.compile = record    # JITFunction.create_binder imports it from here
    torch.cuda.get_device_capability = lambda device=None: (arch // 10, arch % 10)
    try:
        yield captured
    finally:
        triton.compiler.compile = old_compile
        torch.cuda.get_device_capability = old_cap
        setattr(driver, _DRIVER_SLOT, old_driver)   # (reset_active() would look for a real GPU driver)


def _ptxas(ptx, arch):
    sm = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        res = subprocess.run([_ptxas_for(arch), f"-arch={sm}", "-v", "-o", os.devnull, f.name],
                             capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed for {sm}: {res.stderr[-2000:]}")
    out = res.stderr + res.stdout
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, out)) else 0   # noqa: E731
    return {"registers": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads"), "stack": num(r"(\d+) bytes stack frame")}


def _arg_name(fn, key):
    """A constexpr's parameter name: constants are keyed by name (Triton 3.2), by index or by
    an index path (tuple, 3.3+)."""
    if isinstance(key, str):
        return key
    return str(fn.arg_names[key[0] if isinstance(key, tuple) else key])


def compile_captured(fn, captured, arch):
    """Compile one captured launch for `arch` (through the real triton.compile); returns its
    resource report."""
    src, options = captured["src"], captured["options"]
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    report = _ptxas(ck.asm["ptx"], arch)
    report.update(kernel=fn.__name__, shared=ck.metadata.shared, num_warps=options["num_warps"],
                  num_stages=options["num_stages"],
                  constexprs={_arg_name(fn, k): v for k, v in src.constants.items()
                              if isinstance(v, (int, bool, str))})
    return report


# ----------------------------------------------------------------------------------------------
# Cases: each runs wrappers at shapes that reach every tile config of its kernels.

CASES = {}


def case(name):
    def deco(f):
        CASES[name] = f
        return f
    return deco


def _t(*shape, dtype=torch.float16):
    return torch.zeros(*shape, dtype=dtype)


@case("flash_attention")
def _flash_attention():
    # Per dtype family and head-dim config, the register-heaviest variant (every feature on).
    from fastllm.triton_kernels.flash_attention import flash_attention, flash_attention_varlen
    for dtype in (torch.float16, torch.float32):
        for D in (64, 128, 256):
            q, k = _t(1, 4, 256, D, dtype=dtype), _t(1, 2, 256, D, dtype=dtype)
            flash_attention(q, k, k, torch.ones(1, 1, 256, 256, dtype=torch.bool), True, 0.1, 64, 30.0,
                            torch.zeros(4), _t(1, 4, 256, 256, dtype=dtype))
    q = _t(300, 4, 128, dtype=torch.bfloat16)
    cu = torch.tensor([0, 100, 300], dtype=torch.int32)
    flash_attention_varlen(q, q[:, :2], q[:, :2], cu, cu, 200, 200, True, 0.1, 0, 0.0)


@case("int8_matmul")
def _int8_matmul():
    # Every M bucket of pick_config: raw int32, the fused epilogue, static W8A8 (activation
    # quantization fused) and dynamic W8A8 at the M it is fused for; W8A16 per channel and per group, fp16 and bf16 activations.
    from fastllm.ops.int8_dynamic import FUSE_MAX_M
    from fastllm.triton_kernels.int8_matmul import int8_matmul, w8a16_matmul
    N = K = 4096
    w = _t(N, K, dtype=torch.int8)
    ws, bias = torch.ones(N), _t(N, dtype=torch.bfloat16)
    for M in (1, 32, 64, 128, 1024):
        a = _t(M, K, dtype=torch.int8)
        int8_matmul(a, w)
        int8_matmul(a, w, torch.ones(M), ws, bias, out_dtype=torch.bfloat16)
        # Static W8A8: bf16 activations quantized in the kernel (per-channel multiplier).
        int8_matmul(_t(M, K, dtype=torch.bfloat16), w, torch.ones(1), ws, bias, out_dtype=torch.bfloat16,
                    in_mul=torch.ones(K))
        if M <= FUSE_MAX_M:   # dynamic W8A8, fused at these M, with SmoothQuant factors
            int8_matmul(_t(M, K, dtype=torch.bfloat16), w, None, ws, bias, out_dtype=torch.bfloat16,
                        in_mul=torch.ones(K), dynamic=True)
    for M in (1, 16, 64, 128, 1024):
        for dtype in (torch.float16, torch.bfloat16):
            w8a16_matmul(_t(M, K, dtype=dtype), w, ws, bias.to(dtype))
        w8a16_matmul(_t(M, K, dtype=torch.bfloat16), w, torch.ones(N, K // 128), None, group_size=128)


@case("decode_attention")
def _decode_attention():
    # Contiguous cache with every feature on and the most rows a program takes (GQA 8 x Sq 8 =
    # BLOCK_M 64), split + combine; paged cache at plain decode (GQA 8 x Sq 1 = BLOCK_M 16), one
    # split. Both with sinks (they join in the combine kernel, which then runs after one split too).
    from fastllm.triton_kernels.decode_attention import decode_attention
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for D in (64, 128, 256):
            q = _t(2, 16, 8, D, dtype=dtype)
            kc = _t(2, 2, 4096, D, dtype=dtype)
            lens = torch.full((2,), 4096, dtype=torch.int32)
            mask = torch.ones(2, 1, 8, 4096, dtype=torch.bool)
            decode_attention(q, kc, kc, lens, None, mask, 0.1, 512, 30.0, 8, torch.zeros(16))
            pages = _t(64, 16, 2, D, dtype=dtype)
            table = torch.zeros(2, 32, dtype=torch.int32)
            decode_attention(q[:, :, :1], pages, pages, lens.clamp(max=512), table, None, 0.1, 0, 0.0, 1,
                             torch.zeros(16))


@case("sparse24_matmul")
def _sparse24_matmul():
    # Every M bucket of pick_config: 16-bit activations, int8 raw int32 and the fused epilogue.
    from fastllm.triton_kernels.sparse24_gemm import sparse24_matmul
    N = K = 4096
    for M in (1, 32, 64, 128, 1024):
        for dtype in (torch.float16, torch.bfloat16, torch.int8):
            vals, meta = _t(N, K // 2, dtype=dtype), _t(N // 16, K // 2, dtype=torch.int32)
            x = _t(M, K, dtype=dtype)
            if dtype == torch.int8:
                sparse24_matmul(x, vals, meta)
                sparse24_matmul(x, vals, meta, _t(N, dtype=torch.bfloat16), torch.ones(M), torch.ones(N),
                                out_dtype=torch.bfloat16)
            else:
                sparse24_matmul(x, vals, meta, _t(N, dtype=dtype))


@case("quantize_per_token")
def _quantize():
    from fastllm.triton_kernels.quantize_per_token import quantize_per_token
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        quantize_per_token(_t(64, 4096, dtype=dtype))


def _data_dtype(signature):
    """The element type of the first pointer argument, the kernel's input ("fp16", "i8", ...).
    (Not the first float pointer: an int8 GEMM's fp32 scale vector would make it an "fp32"
    kernel whose spills are tolerated.)"""
    return next((t[1:] for t in signature.values() if isinstance(t, str) and t.startswith("*")), "?")


def run(archs, names):
    results, seen = [], set()
    for arch in archs:
        for name in names:
            with capturing(arch) as captured:
                CASES[name]()
            for fn, kw in captured:
                src, options = kw["src"], kw["options"]
                key = (arch, fn.__name__, repr(sorted(src.constants.items(), key=repr)), options["num_warps"],
                       options["num_stages"], str(src.signature))
                if key in seen:
                    continue
                seen.add(key)
                r = compile_captured(fn, kw, arch)
                r.update(case=name, arch=arch, smem_limit=SMEM_LIMIT[arch], dtype=_data_dtype(src.signature))
                # float32 kernels (IEEE FMA dots) are correctness paths: spills are reported,
                # not failed on; every kernel must fit the arch's shared memory.
                spills = r["spill_stores"] + r["spill_loads"]
                r["ok"] = r["shared"] <= SMEM_LIMIT[arch] and (spills == 0 or r["dtype"] == "fp32")
                results.append(r)
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 86, 90], choices=sorted(SMEM_LIMIT))
    ap.add_argument("--case", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--json", action="store_true", help="print the reports as JSON")
    args = ap.parse_args()
    if len(args.arch) == 1:
        results = run(args.arch, args.case)
    else:
        # One process per arch: compiling the same kernel for a second target in one process
        # returned the first target's binary (Triton 3.6 caches per function, not per target).
        results = []
        for arch in args.arch:
            res = subprocess.run([sys.executable, __file__, "--arch", str(arch), "--json", "--case", *args.case],
                                 capture_output=True, text=True)
            if not res.stdout.strip():
                sys.exit(f"sm{arch}: {res.stderr[-3000:]}")
            results += json.loads(res.stdout.strip().splitlines()[-1])
    if args.json:
        print(json.dumps(results))
    else:
        print(f"{'arch':>4} {'dtype':>5} {'regs':>4} {'spill':>5} {'smem':>7} {'warps':>5} {'stg':>3}  kernel  constexprs")
        for r in results:
            flags = ",".join(f"{k}={v}" for k, v in r["constexprs"].items() if k.isupper())
            print(f"sm{r['arch']:<2} {r['dtype']:>5} {r['registers']:>4} {r['spill_stores'] + r['spill_loads']:>5} "
                  f"{r['shared']:>7} {r['num_warps']:>5} {r['num_stages']:>3}  {r['kernel']}  {flags}"
                  + ("" if r["ok"] else "   <-- SPILLS / SMEM OVER LIMIT")
                  + ("   (fp32: spills tolerated)" if r["ok"] and r["dtype"] == "fp32"
                     and r["spill_stores"] + r["spill_loads"] else ""))
    sys.exit(0 if all(r["ok"] for r in results) else 1)


if __name__ == "__main__":
    main()
