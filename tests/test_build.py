"""The CUDA extension was built for every requested arch, every unit compiled, no spills;
setup.py validates FASTLLM_CUDA_ARCHS and names wheels after CUDA and archs.

CI sets FASTLLM_REQUIRE_CUDA_BUILD=1 so a missing build fails instead of skipping."""
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from fastllm import _ext

ROOT = pathlib.Path(__file__).resolve().parents[1]
REQUIRE = os.environ.get("FASTLLM_REQUIRE_CUDA_BUILD") == "1"


@pytest.fixture(scope="module")
def build():
    bi = _ext.build_info()
    if not bi:
        if REQUIRE:
            pytest.fail("FASTLLM_REQUIRE_CUDA_BUILD=1 but fastllm._C was not built")
        pytest.skip("no CUDA build in this install")
    return bi


def test_extension_loads_and_agrees(build):
    assert _ext.unavailable_reason() is None, _ext.unavailable_reason()
    assert _ext.lib().built_archs.split(",") == build["archs"]
    assert build["archs"] and all(int(a.rstrip("a")) >= 80 for a in build["archs"])


def test_every_unit_compiled_for_every_arch(build):
    archs = ["sm_" + a for a in build["archs"]]
    for cu in sorted((ROOT / "csrc").rglob("*.cu")):
        rel = cu.relative_to(ROOT).as_posix()
        if cu.name.endswith("_sm90a.cu"):
            want = ["sm_90a"] if "90a" in build["archs"] else None
        else:
            want = archs
        if want is None:
            assert rel not in build["units"]
            continue
        assert rel in build["units"], f"{rel} was not compiled"
        assert sorted(build["units"][rel]) == sorted(want), rel


def test_no_register_spills(build):
    # Every kernel in csrc is on a hot path; a spill is a performance bug to fix, not to allow.
    # So is a stack frame (a register array indexed at run time lives in local memory).
    assert build["kernels"], "no ptxas report collected"
    spills = [k for k in build["kernels"] if k["spill_stores"] or k["spill_loads"] or k["stack"]]
    assert not spills, "\n".join(f"{k['arch']} {k['kernel']}: {k['spill_stores']}B st / "
                                 f"{k['spill_loads']}B ld, {k['stack']}B stack" for k in spills)


def test_no_ptxas_advisories(build):
    # ptxas serializes a wgmma pipeline it cannot keep async (C7511 / C7515: accumulators
    # defined by other instructions between issue and wait, too few registers) or fences it
    # itself (C7519): correct, but the overlap the sm_90a kernels are written for is gone.
    assert all("advisories" in k for k in build["kernels"]), "built before advisories were collected: rebuild"
    adv = [f"{k['arch']} {k['kernel']}: {a}" for k in build["kernels"] for a in k["advisories"]]
    assert not adv, "\n".join(adv)


def _setup_version(**env):
    e = dict(os.environ, **env)
    return subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=e,
                          capture_output=True, text=True)


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"), reason="no nvcc")
def test_wheel_version_names_cuda_and_archs():
    r = _setup_version(FASTLLM_CUDA_ARCHS="90a;80")
    assert r.returncode == 0, r.stderr
    assert re.search(r"^\d+\.\d+\.\d+\+cu\d+\.sm80\.sm90a$", r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("spec,msg", [("75", "too old"), ("sm_70;80", "too old"), ("foo", "not an arch"),
                                      ("91", "unknown arch"), (";", "names no arch"), (" , ", "names no arch"),
                                      ("8.0;9.0a", "write 80, not PyTorch's 8.0"),
                                      ("native", "unset FASTLLM_CUDA_ARCHS")])
@pytest.mark.skipif(shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"), reason="no nvcc")
def test_bad_archs_rejected(spec, msg):
    r = _setup_version(FASTLLM_CUDA_ARCHS=spec)
    assert r.returncode != 0 and msg in (r.stderr + r.stdout)


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"), reason="no nvcc")
def test_arch_90_without_90a_warns():
    # "80;90" is the natural spelling for an H100 and builds none of its wgmma kernels.
    r = _setup_version(FASTLLM_CUDA_ARCHS="80;90")
    assert r.returncode == 0 and "arch 90 without 90a builds none of the Hopper kernels" in r.stdout
    assert "without 90a" not in _setup_version(FASTLLM_CUDA_ARCHS="80;90a").stdout


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"), reason="no nvcc")
def test_cuda_flags_that_change_rounding_are_refused():
    # CMake reads CUDAFLAGS, nvcc NVCC_*_FLAGS: a build host's fast math changed the kernels'
    # rounding while _build_info.json listed the clean flags. Refused; other flags are recorded
    # there ("extra_flags").
    for var, flags in (("CUDAFLAGS", "--use_fast_math"), ("NVCC_APPEND_FLAGS", "-ftz=true"),
                       ("NVCC_PREPEND_FLAGS", "-prec-div=false")):
        r = _setup_version(FASTLLM_CUDA_ARCHS="80", **{var: flags})
        assert r.returncode != 0 and "change fp32 rounding" in r.stdout + r.stderr, (var, r.stdout, r.stderr)
    assert _setup_version(FASTLLM_CUDA_ARCHS="80", NVCC_APPEND_FLAGS="-Xptxas=-O3").returncode == 0


@pytest.mark.parametrize("value, ok", [("no", True), ("off", True), ("maybe", False)])
def test_build_cuda_switch_values(value, ok):
    # Regression: only "0" disabled the build; "false" / "no" silently built CUDA.
    r = _setup_version(FASTLLM_BUILD_CUDA=value)
    assert (r.returncode == 0) == ok, r.stderr
    if ok:
        assert re.fullmatch(r"\d+\.\d+\.\d+", r.stdout.strip().splitlines()[-1])
    else:
        assert "FASTLLM_BUILD_CUDA must be 0" in r.stdout + r.stderr


def test_pure_python_build_has_plain_version():
    r = _setup_version(FASTLLM_BUILD_CUDA="0")
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"\d+\.\d+\.\d+", r.stdout.strip().splitlines()[-1])


def _fake_smi(tmp_path, caps):
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\n" + "".join(f"echo {c}\n" for c in caps))
    smi.chmod(0o755)
    return str(smi.parent)


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"), reason="no nvcc")
def test_old_gpus_on_the_build_host_are_not_targets(tmp_path):
    # Regression: a T4 (7.5) beside an A100 made the default build exit with "arch 75 is too
    # old ... Got FASTLLM_CUDA_ARCHS='75;80'" (a variable the user never set).
    env = {k: v for k, v in os.environ.items() if k != "FASTLLM_CUDA_ARCHS"}
    env["PATH"] = _fake_smi(tmp_path, ["7.5", "8.0"]) + os.pathsep + env["PATH"]
    r = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1].endswith(".sm80") and "older than sm_80" in r.stdout


def _load_build_info():
    import importlib.util
    spec = importlib.util.spec_from_file_location("bi", ROOT / "csrc" / "cmake" / "build_info.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_build_info_reports_only_this_builds_objects(tmp_path):
    # Regression: every *.o.ptxas in the build folder was reported: after a 90a build then an
    # 80 build in the same tree, _build_info.json listed sm90a units _C did not contain.
    bi = _load_build_info()
    obj = tmp_path / "CMakeFiles" / "_C.dir" / "csrc"
    (obj / "attention").mkdir(parents=True)
    block = ("ptxas info    : Compiling entry function '_Z1kv' for '{a}'\n"
             "ptxas info    : Used 64 registers, 0 bytes smem\n"
             "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n")
    (obj / "attention" / "flash_fwd_launcher.cu.o.ptxas").write_text("# targets: sm_80\n" + block.format(a="sm_80"))
    (obj / "attention" / "flash_fwd_hdim64_fp16_sm90a.cu.o.ptxas").write_text(
        "# targets: sm_90a\n" + block.format(a="sm_90a"))
    (obj / "attention" / "removed_by_git_pull.cu.o.ptxas").write_text("# targets: sm_80\n" + block.format(a="sm_80"))
    kernels, units = bi.collect(str(tmp_path), ["80"], str(ROOT))
    assert units == {"csrc/attention/flash_fwd_launcher.cu": ["sm_80"]}
    assert [k["arch"] for k in kernels] == ["sm_80"]
    assert bi.build_dir_key("/usr/bin/nvcc", ["80"]) != bi.build_dir_key("/usr/bin/nvcc", ["80", "90a"])


# A wgmma pipeline ptxas must serialize: an accumulator rewritten between issue and wait.
_SERIALIZED_WGMMA = r"""
#include <cstdint>
#define MMA asm volatile("wgmma.mma_async.sync.aligned.m64n8k16.f32.f16.f16 {%0,%1,%2,%3}, %4, %5, 1, 1, 1, 0, 0;" \
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "l"(da), "l"(db) : "memory")
__global__ void clean(float* out) { out[threadIdx.x] = 1.f; }
__global__ void serialized(float* out, uint64_t da, uint64_t db) {
  float d[4] = {0, 0, 0, 0};
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
  MMA;
  d[0] = out[threadIdx.x];
  MMA;
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
  asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
  out[threadIdx.x] = d[0] + d[1] + d[2] + d[3];
}
"""


def test_ptxas_advisories_attach_to_their_kernel():
    # ptxas prints a run's advisories before all of its resource blocks.
    bi = _load_build_info()
    text = ("ptxas info    : (C7519) warpgroup.arrive is injected in around line 47 by compiler to allow use of "
            "registers in GMMA in function '_Z1kv'\n"
            "ptxas info    : (C7511) Potential Performance Loss: wgmma.mma_async instructions are serialized due "
            "to insufficient register resources for the wgmma pipeline in the function '_Z1kv'\n"
            "ptxas info    : (C7510) something in function '_Z6helperv'\n")
    for name in ("_Z5cleanv", "_Z1kv"):
        text += (f"ptxas info    : Compiling entry function '{name}' for 'sm_90a'\n"
                 "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
                 "ptxas info    : Used 34 registers, used 0 barriers\n")
    clean, k = bi.parse_ptxas(text, "u.cu")
    assert clean["advisories"] == [] and clean["registers"] == 34
    assert [a.split()[0] for a in k["advisories"]] == ["C7519", "C7511", "C7510"]
    assert "serialized" in k["advisories"][1] and k["advisories"][2].endswith("(function _Z6helperv)")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc")
def test_real_ptxas_advisory_reaches_the_report(tmp_path):
    # The format above is this nvcc's: the build's launcher keeps the advisory on the console and
    # in the report that _build_info.json (and test_no_ptxas_advisories) reads.
    src = tmp_path / "k.cu"
    src.write_text(_SERIALIZED_WGMMA)
    obj = tmp_path / "k.cu.o"
    r = subprocess.run([sys.executable, str(ROOT / "csrc" / "cmake" / "capture_ptxas.py"), "nvcc", "-c", "-O3",
                        "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas=-v", str(src), "-o", str(obj)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "Potential Performance Loss" in r.stderr and "Used" not in r.stderr
    rows = {k["kernel"].split("(")[0]: k for k in _load_build_info().parse_ptxas(obj.with_suffix(".o.ptxas")
                                                                                 .read_text(), "k.cu")}
    assert rows["clean"]["advisories"] == []
    assert any("serialized" in a for a in rows["serialized"]["advisories"]), rows["serialized"]


def _copy_source(dst):
    skip = shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", "*.so",
                                  "_build_info.json", ".pytest_cache")
    shutil.copytree(ROOT, dst, ignore=skip)
    return dst


def test_sdist_and_wheel_ship_everything(tmp_path):
    # Regressions: the sdist had no csrc / CMakeLists.txt (a wheel built from it failed at
    # configure), carried the build host's +cuXYZ.smNN label (pip refused it elsewhere), and no
    # wheel shipped fastllm.bench.suites (python -m fastllm.demo failed once installed).
    import tarfile
    import zipfile
    src = _copy_source(tmp_path / "src")
    env = dict(os.environ, FASTLLM_BUILD_CUDA="1")
    r = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=src,
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    (sdist,) = (tmp_path / "dist").glob("*.tar.gz")
    assert "+" not in sdist.name
    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    for need in ("CMakeLists.txt", "csrc/attention/flash_fwd_kernel.cuh", "csrc/cmake/capture_ptxas.py",
                 "csrc/cmake/build_info.py", "csrc/int8/generate_instantiations.py", "PKG-INFO",
                 "python/fastllm/bench/suites/__init__.py", "triton_kernels/flash_attention.py"):
        assert need in names, need
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path / "whl"), str(src)], env=dict(os.environ, FASTLLM_BUILD_CUDA="0"),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = (tmp_path / "whl").glob("*.whl")
    files = set(zipfile.ZipFile(whl).namelist())
    pkgs = {p.relative_to(ROOT / "python").as_posix() for p in (ROOT / "python" / "fastllm").rglob("__init__.py")}
    assert pkgs <= files and "fastllm/triton_kernels/__init__.py" in files, sorted(pkgs - files)
