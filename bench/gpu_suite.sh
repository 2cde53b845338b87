#!/usr/bin/env bash
# GPU suite: build, every test (gpu-marked ones included), compute-sanitizer on a small case
# of each CUDA op, every benchmark; logs + JSON under OUT_DIR. For a GPU machine with no
# network whose Python already has torch, triton, transformers, pybind11, cmake, ninja.
#
#   bash bench/gpu_suite.sh [OUT_DIR]        (default: $OUT, else bench/results/run-<time>)
#   PHASES="env build tests" bash bench/gpu_suite.sh     then, right after (the machine stays warm
#   PHASES="env sanitizer bench" bash bench/gpu_suite.sh  only ~30 s idle; two calls: the tests get
#                                                         ~8 minutes). A phase that needs fastllm._C
#                                                         and finds it missing (a fresh machine)
#                                                         builds it first.
#   PHASES="env presets" bash bench/gpu_suite.sh          a third call if device time is left: the
#                                                         attention / decode presets `all` leaves
#                                                         out (score bias, gpt-oss sinks + window).
#   The device tool copies the working tree without .git: prefix each call with
#   FASTLLM_COMMIT=<git rev-parse HEAD, run here> so env.json, the build and bench.json name it.
#
# Budget: within 9 minutes on an H100 (each phase has its own timeout). Files written (flat,
# few, so they come back from the device tool): suite.log env.json build_info.json tests.xml
# sanitizer.log bench.json bench.md (presets: bench-presets*.json / .md). A phase that runs out
# of time is interrupted (SIGINT: pytest still writes its summary and tests.xml for what ran) and
# the suite goes on to the next phase.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-bench/results/run-$(date -u +%Y%m%dT%H%M%S)}}
mkdir -p "$OUT_DIR"
exec > >(tee "$OUT_DIR/suite.log") 2>&1
TEE_PID=$!
# On exit, close our end of the pipe and let tee write suite.log to the end before $OUT is read.
trap 'exec >&- 2>&-; wait $TEE_PID 2>/dev/null' EXIT
T0=$SECONDS
phase() { echo "=== [$((SECONDS - T0))s] $*"; }
PHASES=${PHASES:-env build tests sanitizer bench}
want() { [[ " $PHASES " == *" $1 "* ]]; }
# The whole suite must fit one 10-minute device call: each phase gets its own cap, cut to what
# is left of BUDGET (default 560 s) less what the later phases of this call keep for
# themselves, so a slow build or test phase cannot starve the sanitizer or the benchmarks.
BUDGET=${BUDGET:-560}
SAN_EACH=80      # per compute-sanitizer tool (memcheck, racecheck)
BENCH_MIN=200
kept_for() { local r=0 p; for p in "$@"; do
  if want "$p"; then case $p in sanitizer) r=$((r + 2 * SAN_EACH));; bench) r=$((r + BENCH_MIN));; esac; fi
done; echo $r; }
cap() { local left=$((BUDGET - (SECONDS - T0) - ${2:-0})); echo $(( left < $1 ? (left > 10 ? left : 10) : $1 )); }
status=0
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

if want env; then
phase "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || status=1
$PY - > "$OUT_DIR/env.json" <<'PYEOF'
import json, subprocess, platform, torch
def v(m):
    try: return __import__(m).__version__
    except Exception: return None
import os
# The device machine gets a copy of the working tree without .git: the run command passes
# FASTLLM_COMMIT=<sha>; git is the fallback, else the commit stays unknown (the rest is recorded).
sha = os.environ.get("FASTLLM_COMMIT")
if not sha:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        sha = None
p = torch.cuda.get_device_properties(0)
print(json.dumps({"gpu": p.name, "sm": f"{p.major}{p.minor}", "sms": p.multi_processor_count,
  "driver": subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True).stdout.strip(),
  "torch": torch.__version__, "torch_cuda": torch.version.cuda, "triton": v("triton"),
  "transformers": v("transformers"), "python": platform.python_version(), "commit": sha or None,
  "cudnn": torch.backends.cudnn.version(), "flash_attn": v("flash_attn")}, indent=1))
PYEOF
cat "$OUT_DIR/env.json"
fi

build() {
phase "build (native arch of this GPU unless FASTLLM_CUDA_ARCHS is set)"
if ! MAX_JOBS=${MAX_JOBS:-16} FASTLLM_BUILD_CUDA=1 timeout $(cap 240) $PY -m pip install -v --no-build-isolation \
     --no-deps -e . > "$OUT_DIR/build.tmp" 2>&1; then
  tail -50 "$OUT_DIR/build.tmp"; echo "BUILD FAILED"; exit 1
fi
grep -E "^ *fastllm:" "$OUT_DIR/build.tmp"; rm -f "$OUT_DIR/build.tmp"
cp python/fastllm/_build_info.json "$OUT_DIR/build_info.json"
$PY -m fastllm.info --kernels | head -40
}
# A later call may land on a fresh machine (released after ~30 s idle): without this, the
# sanitizer and the benchmarks would fail to import fastllm (not installed there).
ensure_built() {
  $PY -c "import fastllm._C" 2>/dev/null && return 0
  echo "fastllm._C is not importable here (a fresh machine?): building it first"
  build
}
if want build; then build; fi

if want tests; then
# Alone with the build, the tests may take what is left; sharing the call with the benchmarks,
# 240 s (Triton compiles each kernel variant once: the first GPU run is the slowest).
phase "tests (all, gpu-marked included)"
if want bench || want sanitizer; then TCAP=240; else TCAP=540; fi
# pytest-xdist (in the GPU image): workers compile Triton kernels in parallel, and a kernel
# that corrupts its CUDA context (illegal address) or hangs (pytest-timeout kills the worker)
# takes down one worker, not the run; the failures name where it happened.
XD=""
if $PY -c "import xdist, pytest_timeout" 2>/dev/null; then
  XD="-n ${TEST_WORKERS:-8} --max-worker-restart 16 --timeout 240 --timeout-method thread"
fi
# The Triton offline compile check (~4 min cold, one thread) and the SIMT-emulated CUDA kernels
# (CPU only, minutes of g++ and emulation) are the CPU CI's job: not here.
ensure_built
FASTLLM_REQUIRE_CUDA_BUILD=1 timeout -s INT -k 30 $(cap $TCAP "$(kept_for sanitizer bench)") $PY -m pytest -q -p no:cacheprovider $XD tests \
  --deselect tests/test_triton_compile.py --ignore-glob='tests/test_simt_*.py' \
  --junitxml="$OUT_DIR/tests.xml" -rfEs 2>&1 | tail -80
[ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

if want sanitizer; then
phase "compute-sanitizer (memcheck, racecheck) on small cases"
: > "$OUT_DIR/sanitizer.log"
SAN=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
[ -x "$SAN" ] || { echo "compute-sanitizer not found (PATH, \$CUDA_HOME/bin): sanitizer phase not run"; status=1; }
[ -x "$SAN" ] && ensure_built
for tool in memcheck racecheck; do
  [ -x "$SAN" ] || break
  # No caching allocator: with it an overrun lands in memory PyTorch owns and memcheck sees nothing.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout $(cap $SAN_EACH "$(kept_for bench)") "$SAN" --tool $tool \
    --error-exitcode 9 $PY bench/sanitize_cases.py >> "$OUT_DIR/sanitizer.log" 2>&1
  rc=$?
  case $rc in
    0) echo "compute-sanitizer $tool: clean";;
    9) echo "compute-sanitizer $tool: ERRORS reported"; status=1;;
    124) echo "compute-sanitizer $tool: timed out (rc 124): incomplete, not clean"; status=1;;
    *) echo "compute-sanitizer $tool: FAILED (rc $rc)"; status=1;;
  esac
done
# Every kernel is instrumented, PyTorch's and cuBLAS's too: name the kernels errors were reported in.
if grep -qE "^========= +(Invalid|Error|Race|.*[Hh]azard)" "$OUT_DIR/sanitizer.log"; then
  echo "kernels with reports (count, location):"
  # memcheck puts the location on the next lines ("=========     at kernel+0x..."), racecheck on
  # the report line itself ("Race reported between Write access at kernel+0x... in file:line").
  { grep -E "^========= +(Invalid|Error|Race|.*[Hh]azard)" -A3 "$OUT_DIR/sanitizer.log" | grep -E "^=========  +at " \
      | sed -E 's/^=+ +at +//'
    grep -oE "[A-Za-z]+ access at [^ ]+" "$OUT_DIR/sanitizer.log" | sed -E 's/^[A-Za-z]+ access at //'
  } | cut -c1-160 | sort | uniq -c | sort -rn | head -20
fi
tail -5 "$OUT_DIR/sanitizer.log"
fi

if want bench; then
phase "benchmarks"
ensure_built
if $PY -c "import fastllm.bench" 2>/dev/null; then
  if want tests; then BCAP=$BENCH_MIN; else BCAP=480; fi
  timeout -s INT -k 20 $(cap $BCAP) $PY -m fastllm.bench all --quick --json "$OUT_DIR/bench.json" \
    --markdown "$OUT_DIR/bench.md" || status=1
else
  echo "fastllm.bench does not import: no benchmarks run"; status=1
fi
fi

if want presets; then
phase "benchmark presets (bias, gpt-oss)"
ensure_built
timeout -s INT -k 20 $(cap 300) $PY -m fastllm.bench attention --quick --shapes bias-d64,bias-d128,gpt-oss \
  --json "$OUT_DIR/bench-presets.json" --markdown "$OUT_DIR/bench-presets.md" || status=1
timeout -s INT -k 20 $(cap 200) $PY -m fastllm.bench decode --quick --shapes gpt-oss \
  --json "$OUT_DIR/bench-presets-decode.json" --markdown "$OUT_DIR/bench-presets-decode.md" || status=1
fi

phase "done (status $status)"
exit $status
