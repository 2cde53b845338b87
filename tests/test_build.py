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
    assert build["kernels"], "no ptxas report collected"
    spills = [k for k in build["kernels"] if k["spill_stores"] or k["spill_loads"]]
    assert not spills, "\n".join(f"{k['arch']} {k['kernel']}: {k['spill_stores']}B st / "
                                 f"{k['spill_loads']}B ld" for k in spills)


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
                                      ("91", "unknown arch")])
@pytest.mark.skipif(shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"), reason="no nvcc")
def test_bad_archs_rejected(spec, msg):
    r = _setup_version(FASTLLM_CUDA_ARCHS=spec)
    assert r.returncode != 0 and msg in (r.stderr + r.stdout)


def test_pure_python_build_has_plain_version():
    r = _setup_version(FASTLLM_BUILD_CUDA="0")
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"\d+\.\d+\.\d+", r.stdout.strip().splitlines()[-1])
