#!/usr/bin/env bash
# Compile every Triton kernel of this working tree for sm_80/86/89/90 under several Triton
# releases (bench/triton_compile_check.py: registers, spills, shared memory) -- no GPU needed.
#
#   bash bench/triton_versions_check.sh [VERSION ...]   (default: 3.5.1 3.6.0 3.7.1 3.8.0 3.9.0)
#   CHECK_ARGS="--arch 86 --case int8_matmul" bash bench/triton_versions_check.sh 3.9.0
#
# Why: CI and the GPU image pin one Triton (3.6), but users get whatever their torch pulls
# (torch 2.15 requires triton 3.9), and each release's codegen spills differently: 3.8 spilled
# 1.2 to 15.8 KB in int8 tiles that 3.6 compiled clean. The check runs on Triton 3.2 and newer;
# the default list is the releases the tile tables are kept spill-free for (README, Support).
# One venv per version, kept under $FASTLLM_TRITON_VENVS (default ~/.cache/fastllm-triton-venvs);
# the working tree is copied into it and installed pure-Python. Exit status 1 if any version
# has a failing kernel.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENVS=${FASTLLM_TRITON_VENVS:-$HOME/.cache/fastllm-triton-venvs}
PY=${PY:-python3}
VERSIONS=("$@")
[ ${#VERSIONS[@]} -gt 0 ] || VERSIONS=(3.5.1 3.6.0 3.7.1 3.8.0 3.9.0)
CHECK_ARGS=${CHECK_ARGS:---arch 80 86 89 90}
mkdir -p "$VENVS"
status=0
for v in "${VERSIONS[@]}"; do
  venv=$VENVS/triton-$v
  if [ ! -x "$venv/bin/python" ]; then
    "$PY" -m venv "$venv"
    # torch pinned: a bare torch would pull the CUDA build (see .ci/requirements.txt).
    "$venv/bin/pip" install -q torch==2.13.0 "triton==$v" "numpy<2.4" setuptools wheel pybind11
  fi
  tree=$venv/src
  rm -rf "$tree" && mkdir -p "$tree"
  (cd "$ROOT" && git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$tree")
  (cd "$tree" && FASTLLM_BUILD_CUDA=0 "$venv/bin/pip" install -q --no-build-isolation --no-deps -e .)
  echo "== triton $v"
  # 3.9 warns once per process that its FP-fusion default changes in 3.10; the check runs
  # with the current default, as users' processes do.
  # shellcheck disable=SC2086  # CHECK_ARGS is a list of arguments
  if ! (cd "$tree" && TRITON_DEFAULT_FP_FUSION=1 "$venv/bin/python" bench/triton_compile_check.py \
          $CHECK_ARGS > "$venv/check.txt" 2>&1); then
    status=1
  fi
  grep -E "<--|Error|error" "$venv/check.txt" || echo "   all kernels: no spills, shared memory within each arch's limit"
done
exit $status
