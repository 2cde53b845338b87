"""Do the emulated CUDA tests notice a broken kernel? Applies one source mutation at a time to a
copy of csrc/, rebuilds the emulated module from it (FASTLLM_SIMT_CSRC) and runs the matching
test file: every mutation must make it fail. A dev tool (each mutation is a ~30 s build plus
the tests), not part of the test suite:

    python tests/simt/mutations.py            # all
    python tests/simt/mutations.py attention  # names containing "attention"
"""
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

# (name, file under csrc/, old text (must occur once), new text, test file, -k expression)
MUTATIONS = [
    ("attention: pipeline wait lets the current tile stay in flight", "attention/flash_fwd_kernel.cuh",
     "cp_async_wait<1>();  // this tile's", "cp_async_wait<2>();  // this tile's",
     "tests/test_simt_attention.py", "matches_reference"),
    ("attention: ldmatrix swizzle differs from the cp.async one", "attention/flash_fwd_kernel.cuh",
     "return cl ^ ((r / kRowsPerPhase) % kGroup); }", "return cl ^ ((r / kRowsPerPhase + 1) % kGroup); }",
     "tests/test_simt_attention.py", "matches_reference"),
    ("attention: no barrier before the prefetch overwrites a stage", "attention/flash_fwd_kernel.cuh",
     "    __syncthreads();  // every warp is done with this stage", "    // (barrier removed)",
     "tests/test_simt_attention.py", "matches_reference"),
    ("sparse24: epilogue stores past N", "sparse24/sparse24_gemm_kernel.cuh",
     "if (n < p.N && m < p.M) finish(", "if (m < p.M) finish(", "tests/test_simt_sparse24.py", "float_grid"),
    ("sparse24: metadata rows not clamped", "sparse24/sparse24_gemm_kernel.cuh",
     "const int64_t rb = min(w0 / 16 + b, p.N / 16 - 1);", "const int64_t rb = w0 / 16 + b;",
     "tests/test_simt_sparse24.py", "float_grid"),
    ("sparse24: split-K reduce drops the last slice", "sparse24/sparse24_gemm_kernel.cuh",
     "for (int z = 1; z < splits; ++z)", "for (int z = 1; z < splits - 1; ++z)",
     "tests/test_simt_sparse24.py", "split_k"),
]


def run(mutation):
    name, path, old, new, test, expr = mutation
    with tempfile.TemporaryDirectory() as tmp:
        csrc = os.path.join(tmp, "csrc")
        shutil.copytree(os.path.join(ROOT, "csrc"), csrc)
        with open(os.path.join(csrc, path)) as f:
            text = f.read()
        if text.count(old) != 1:
            return f"STALE  {name}: the text to mutate is not in {path} exactly once"
        with open(os.path.join(csrc, path), "w") as f:
            f.write(text.replace(old, new))
        env = dict(os.environ, FASTLLM_SIMT_CSRC=csrc)
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test, "-k", expr],
                           cwd=ROOT, env=env, capture_output=True, text=True)
        caught = r.returncode == 1
        return f"{'caught ' if caught else 'MISSED '} {name}" + ("" if caught else f" (pytest rc {r.returncode})")


if __name__ == "__main__":
    wanted = [m for m in MUTATIONS if not sys.argv[1:] or any(a in m[0] for a in sys.argv[1:])]
    results = [run(m) for m in wanted]
    print("\n".join(results))
    sys.exit(0 if all(r.startswith("caught") for r in results) else 1)
