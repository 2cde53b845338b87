"""fastllm build: the Python package, plus the CUDA extension fastllm._C through CMake.

Environment:
  FASTLLM_BUILD_CUDA   "0": pure-Python package (Triton + reference); "1": the CUDA build is
                       required (fail if nvcc is missing); unset: build it when nvcc is found.
  FASTLLM_CUDA_ARCHS   e.g. "80;86;89;90a". Default: the GPUs present at build time
                       (nvidia-smi), else DEFAULT_ARCHS. Native code per arch + PTX of newest.
  CUDA_HOME            where nvcc lives (else nvcc on PATH).
  MAX_JOBS             parallel nvcc jobs (default: CPU count).
The wheel's local version names the CUDA version and archs: 0.1.0+cu130.sm80.sm90a (not the
sdist's, nor a wheel built from an sdist: pip requires those to keep the sdist's plain version;
fastllm/_build_info.json records the archs either way).
"""
import datetime
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
#: Making an sdist (no compiler needed), or building from an unpacked one (PKG-INFO at its root).
SDIST = "sdist" in sys.argv[1:]
FROM_SDIST = os.path.exists(os.path.join(ROOT, "PKG-INFO"))


def _build_info_module():
    spec = importlib.util.spec_from_file_location("fastllm_build_info",
                                                  os.path.join(ROOT, "csrc", "cmake", "build_info.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
# A100 (80), A10/RTX 30 (86), L4/L40/RTX 40 (89), H100/H200 (90a: wgmma/TMA units).
DEFAULT_ARCHS = "80;86;89;90a"
# Archs nvcc 12.x/13.x can target that this project has code for. < 80 lacks the
# cp.async / bf16 mma.sync / mma.sp the kernels are written with.
KNOWN_ARCHS = {"80", "86", "87", "89", "90", "90a", "100", "100a", "103", "103a", "110", "110a",
               "120", "120a", "121", "121a"}


def read_version():
    with open(os.path.join(ROOT, "python", "fastllm", "_version.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def find_nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    if home:
        print(f"fastllm: CUDA_HOME / CUDA_PATH is {home!r}, which has no bin/nvcc: looking on PATH")
    return shutil.which("nvcc")


def nvcc_version(nvcc):
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    major, minor = re.search(r"release (\d+)\.(\d+)", out).groups()
    return int(major), int(minor), out.strip().splitlines()[-1]


def detect_gpu_archs():
    """Archs of the GPUs on this machine ("90a" for Hopper, to get its wgmma units)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    archs = []
    for line in out.split():
        if re.fullmatch(r"\d+\.\d+", line):
            a = line.replace(".", "")
            if int(a) < 80:   # a T4 / V100 build host: fastllm has no code for it, build the rest
                print(f"fastllm: nvidia-smi lists an sm_{a} GPU, older than sm_80: not a build target")
                continue
            a = a + "a" if a == "90" else a   # only sm_90a has kernels of its own (wgmma / TMA)
            if a not in archs:
                archs.append(a)
    return ";".join(sorted(archs, key=lambda a: int(a.rstrip("a")))) or None


def resolve_archs(nvcc):
    spec = os.environ.get("FASTLLM_CUDA_ARCHS", "").strip()
    source = "FASTLLM_CUDA_ARCHS"
    if not spec:
        spec, source = detect_gpu_archs(), "GPUs found at build time"
        if not spec:
            spec, source = DEFAULT_ARCHS, "default list (no GPU found at build time)"
    archs = [a.strip().lower().replace("sm_", "").replace("compute_", "")
             for a in re.split(r"[;, ]+", spec) if a.strip()]
    supported = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True).stdout
    for a in archs:
        if not re.fullmatch(r"\d+a?", a):
            hint = (f" (write {a.replace('.', '')}, not PyTorch's {a})" if re.fullmatch(r"\d+\.\da?", a) else
                    " (unset FASTLLM_CUDA_ARCHS to build for the GPUs found here)" if a in ("native", "all") else "")
            sys.exit(f"fastllm: FASTLLM_CUDA_ARCHS entry {a!r} is not an arch like 80, 89 or 90a{hint}")
        if int(a.rstrip("a")) < 80:
            sys.exit(f"fastllm: arch {a} is too old: fastllm needs sm_80 or newer "
                     f"(cp.async, bf16 mma.sync, mma.sp). Got {spec!r} from {source}")
        if a not in KNOWN_ARCHS:
            sys.exit(f"fastllm: unknown arch {a!r}; known: {' '.join(sorted(KNOWN_ARCHS))}")
        if supported and f"compute_{a.rstrip('a')}" not in supported:
            sys.exit(f"fastllm: this nvcc ({nvcc}) cannot target {a}; it lists: {supported.split()}")
    if not archs:
        sys.exit(f"fastllm: FASTLLM_CUDA_ARCHS={spec!r} names no arch (like 80;90a); unset it to build for "
                 "the GPUs found here")
    archs = sorted(set(archs), key=lambda a: (int(a.rstrip("a")), a))
    if "90" in archs and "90a" not in archs:
        print("fastllm: WARNING: arch 90 without 90a builds none of the Hopper kernels (wgmma attention, "
              "int8 and 2:4 GEMMs): H100 / H200 would run the sm_80 code. List 90a for them.")
    return archs, source


#: Flags that change fp32 rounding: the kernels' numerics (the quantization's exact div_rn /
#: mul_rn, the tests' bit-exactness) assume IEEE division, square root and no flush to zero.
UNSAFE_FLAGS = re.compile(r"use_fast_math|ftz=true|prec-div=false|prec-sqrt=false|prec_div=false|prec_sqrt=false")


def extra_cuda_flags():
    """The flags the environment adds behind the build's back (CMake reads CUDAFLAGS, nvcc
    NVCC_PREPEND_FLAGS / NVCC_APPEND_FLAGS), for _build_info.json; ones that change fp32 rounding
    are refused."""
    extra = {k: os.environ[k] for k in ("CUDAFLAGS", "NVCC_PREPEND_FLAGS", "NVCC_APPEND_FLAGS")
             if os.environ.get(k, "").strip()}
    bad = {k: v for k, v in extra.items() if UNSAFE_FLAGS.search(v)}
    if bad:
        sys.exit(f"fastllm: {bad} change fp32 rounding (fast math / flush to zero), which the kernels' exact "
                 "numerics do not allow; unset them")
    return extra


def git_commit():
    # A copy without .git (a GPU machine handed the working tree): the caller names the commit.
    if os.environ.get("FASTLLM_COMMIT"):
        return os.environ["FASTLLM_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt with Ninja; writes _build_info.json beside _C."""

    cuda = None  # set from cuda_config() below

    def _build_info_paths(self):
        """(built, in-source) paths of _build_info.json, for editable / --inplace builds."""
        inplace_so, regular_so = self._get_inplace_equivalent(
            self.get_finalized_command("build_py"), self.extensions[0])
        return (os.path.join(os.path.dirname(regular_so), "_build_info.json"),
                os.path.join(os.path.dirname(inplace_so), "_build_info.json"))

    def copy_extensions_to_source(self):
        super().copy_extensions_to_source()
        self.copy_file(*self._build_info_paths(), level=self.verbose)

    def _get_output_mapping(self):
        yield from super()._get_output_mapping()
        if self.inplace:
            yield self._build_info_paths()

    def build_extension(self, ext):
        cfg = self.cuda
        import pybind11

        out_path = os.path.abspath(self.get_ext_fullpath(ext.name))
        out_dir = os.path.dirname(out_path)
        helpers = _build_info_module()
        build_dir = os.path.abspath(os.path.join(self.build_temp, helpers.build_dir_key(cfg["nvcc"], cfg["archs"])))
        os.makedirs(build_dir, exist_ok=True)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        cmake = find_tool("cmake")
        configure = [
            cmake, "-S", ROOT, "-B", build_dir, "-G", "Ninja",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_CUDA_COMPILER={cfg['nvcc']}",
            f"-DFASTLLM_CUDA_ARCHS={';'.join(cfg['archs'])}",
            f"-DFASTLLM_PTXAS_CAPTURE={os.path.join(ROOT, 'csrc', 'cmake', 'capture_ptxas.py')}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            # Always named: a cached path from an earlier isolated build (pip's deleted
            # /tmp/pip-build-env-*) would fail the next configure.
            f"-DCMAKE_MAKE_PROGRAM={find_tool('ninja')}",
        ]
        t0 = datetime.datetime.now()
        subprocess.run(configure, check=True)
        subprocess.run([cmake, "--build", build_dir, "-j", jobs], check=True)
        seconds = (datetime.datetime.now() - t0).total_seconds()

        kernels, units = helpers.collect(build_dir, cfg["archs"], ROOT)
        info = {
            "version": self.distribution.get_version(),
            "cuda": True,
            "archs": cfg["archs"],
            "archs_source": cfg["archs_source"],
            "ptx": "compute_" + str(max(int(a.rstrip("a")) for a in cfg["archs"])),
            "cuda_version": f"{cfg['cuda'][0]}.{cfg['cuda'][1]}",
            "nvcc": cfg["cuda"][2],
            "flags": "-O3 -lineinfo --expt-relaxed-constexpr -Xptxas=-v,--warn-on-spills",
            "extra_flags": cfg["extra_flags"],   # CUDAFLAGS / NVCC_PREPEND_FLAGS / NVCC_APPEND_FLAGS
            "commit": git_commit(),
            "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "build_seconds": round(seconds, 1),
            "max_jobs": int(jobs),
            "python": sys.version.split()[0],
            "units": units,
            "kernels": kernels,
        }
        with open(os.path.join(out_dir, "_build_info.json"), "w") as f:
            json.dump(info, f, indent=1)
        print(f"fastllm: built fastllm._C for {' '.join(cfg['archs'])} in {seconds:.0f}s "
              f"({len(kernels)} kernel/arch pairs)")


def find_tool(name):
    """cmake / ninja: on PATH, else from their PyPI packages (a venv used without activating it)."""
    path = shutil.which(name)
    if path:
        return path
    try:
        mod = __import__(name)
    except ImportError:
        sys.exit(f"fastllm: {name} not found: pip install {name} (or put it on PATH)")
    return os.path.join(mod.BIN_DIR if name == "ninja" else mod.CMAKE_BIN_DIR, name)


def cuda_config():
    if SDIST:
        return None        # an sdist ships sources only
    want = os.environ.get("FASTLLM_BUILD_CUDA", "").strip().lower()
    want = {"false": "0", "no": "0", "off": "0", "true": "1", "yes": "1", "on": "1"}.get(want, want)
    if want not in ("", "0", "1"):
        sys.exit(f"fastllm: FASTLLM_BUILD_CUDA must be 0 (no CUDA build), 1 (required) or unset (when nvcc is "
                 f"found), got {os.environ['FASTLLM_BUILD_CUDA']!r}")
    if want == "0":
        print("fastllm: FASTLLM_BUILD_CUDA=0: installing the pure-Python package (Triton + reference)")
        return None
    nvcc = find_nvcc()
    if nvcc is None:
        if want == "1":
            sys.exit("fastllm: FASTLLM_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
        print("fastllm: nvcc not found: installing the pure-Python package (Triton + reference); "
              "set CUDA_HOME to build the CUDA kernels")
        return None
    cuda = nvcc_version(nvcc)
    archs, source = resolve_archs(nvcc)
    extra = extra_cuda_flags()    # rounding-changing flags refused before anything is built
    print(f"fastllm: building the CUDA extension with {nvcc} (CUDA {cuda[0]}.{cuda[1]}) "
          f"for {';'.join(archs)} ({source})")
    return {"nvcc": nvcc, "cuda": cuda, "archs": archs, "archs_source": source, "extra_flags": extra}


cfg = cuda_config()
version = read_version()
if cfg and not FROM_SDIST:
    version += f"+cu{cfg['cuda'][0]}{cfg['cuda'][1]}." + ".".join("sm" + a for a in cfg["archs"])
elif cfg:
    print("fastllm: building from an sdist: the version stays plain (pip checks it against the sdist's "
          "name); fastllm/_build_info.json records CUDA and archs")

CMakeBuild.cuda = cfg
setup(
    name="fastllm",
    version=version,
    description="Hand-written CUDA and Triton kernels for Hugging Face LLMs: flash attention, "
                "int8 and 2:4 sparse GEMM, swapped in with fastllm.patch(model)",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages("python", include=["fastllm", "fastllm.*"]) + ["fastllm.triton_kernels"],
    package_dir={"fastllm": "python/fastllm", "fastllm.triton_kernels": "triton_kernels"},
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton>=3.2"], "hf": ["transformers>=5.0", "safetensors"],
                    "test": ["pytest", "transformers>=5.0", "safetensors"]},
    ext_modules=[CMakeExtension("fastllm._C")] if cfg else [],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
