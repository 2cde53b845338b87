#!/usr/bin/env bash
# Rehearse the GPU machine's software stack on a CPU machine, before spending GPU minutes:
# a venv with the GPU image's versions (device tool, KINDS.md: Python 3.12, torch 2.11 CUDA 13,
# Triton 3.6, transformers 5.17), gpu_suite.sh's build command against that torch's headers, and
# the CPU test suite. It found that a CUDA build of torch (which loads libcudart globally) broke
# the SIMT emulator's own CUDA runtime (fixed with -Bsymbolic). Not run by CI: it downloads the
# CUDA torch wheels (~4.6 GB installed).
#
#   bash bench/gpu_stack_rehearsal.sh [VENV]     (default VENV: ../venv-gpu-stack)
#
# (On the dev machine: PY=/root/.pyenv/versions/3.12.1/bin/python.) 9 minutes there with the
# venv already made: build 200 s, tests 340 s (1565 passed, 2395 skipped, at fa82ca8).
#
# Works in a throw-away git worktree of HEAD (under /tmp), so the checkout's own build
# (python/fastllm/_C*, _build_info.json) is left alone. Environment: PY (a Python 3.12; default
# python3.12), TORCH / TRITON / TRANSFORMERS / NUMPY pins, ARCHS (default "80;90a"), WORKERS
# (pytest-xdist workers, default 2). The image's numpy is 2.5, which breaks Triton 3.6's
# interpreter (CPU-only, never used on a GPU machine): NUMPY="numpy==2.5.2" shows the rest passes.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${1:-$ROOT/../venv-gpu-stack}
PY=${PY:-python3.12}
T0=$SECONDS
phase() { echo "=== [$((SECONDS - T0))s] $*"; }

phase "venv $VENV"
[ -x "$VENV/bin/python" ] || $PY -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q "torch==${TORCH:-2.11.0}" "triton==${TRITON:-3.6.0}" \
  "transformers==${TRANSFORMERS:-5.17.0}" "${NUMPY:-numpy<2.4}" safetensors pytest pytest-xdist \
  pytest-timeout filelock setuptools wheel pybind11 ninja "cmake>=3.24" 2>&1 | grep -v "^WARNING: Location" || true
python -c "import sys, torch, triton, transformers, numpy; print(sys.version.split()[0], torch.__version__, \
'CUDA', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__, 'numpy', numpy.__version__)"

WT=$(mktemp -d /tmp/fastllm-gpu-stack.XXXXXX)
trap 'git -C "$ROOT" worktree remove --force "$WT" >/dev/null 2>&1 || true' EXIT
git worktree add -q --detach "$WT" HEAD
cd "$WT"

phase "build (gpu_suite.sh's command, archs ${ARCHS:-80;90a})"
if ! FASTLLM_CUDA_ARCHS="${ARCHS:-80;90a}" MAX_JOBS=${MAX_JOBS:-2} FASTLLM_BUILD_CUDA=1 \
     python -m pip install -v --no-build-isolation --no-deps -e . > build.log 2>&1; then
  tail -50 build.log; echo "BUILD FAILED"; exit 1
fi
grep -E "^ *fastllm:" build.log
python -m fastllm.info | head -5

phase "tests (CPU: the SIMT-emulated and interpreter tests included)"
status=0
python -m pytest -q -p no:cacheprovider tests -n "${WORKERS:-2}" -rfEs > tests.log 2>&1 || status=$?
grep -E "^(FAILED|ERROR) " tests.log || true
grep -v "needs a CUDA GPU" tests.log | tail -40
phase "done (pytest status $status)"
exit $status
