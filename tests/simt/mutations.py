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
TD, DK, DMR = "tests/test_simt_decode.py", "decode/decode_kernel.cuh", "common/mask_range.cuh"
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
    ("decode: pipeline wait one group short", DK, "cp_async_wait<kStages - 2>();  // tile `it` landed",
     "cp_async_wait<kStages - 1>();  // tile `it` landed", TD, ""),
    ("decode: causal tiles skip the mask", DK, "t0 + kBN > end || t0 + kBN - 1 > L - Sq ||", "t0 + kBN > end ||", TD, ""),
    ("decode: window starts one key late", DK, "lo = max(L - Sq - p.window + 1, 0);",
     "lo = max(L - Sq - p.window + 2, 0);", TD, ""),
    ("decode: one key past the piece is loaded", DK, "const bool valid = j < end;", "const bool valid = j <= end;", TD, ""),
    ("decode: combine ignores splits >= 32 in the sum", DK,
     "for (int s = lane; s < S; s += 32) sum += expf(lp[s] - m_safe);",
     "for (int s = lane; s < S && s < 32; s += 32) sum += expf(lp[s] - m_safe);", TD, ""),
    ("decode: mask scan's last key one short", DMR, "(31 - __clz(word[i])) / 8 + 1);", "(31 - __clz(word[i])) / 8);", TD, ""),
    ("decode: D256 Q re-read from the wrong k-step", DK, "ldmatrix_x4(a, QTile::addr(q_lane, q_x, 0, kk * 2));",
     "ldmatrix_x4(a, QTile::addr(q_lane, q_x, 0, (kk ^ 1) * 2));", TD, ""),
    ("decode: no -inf guard on the running max", DK, "const float m_scaled = mx == -INFINITY ? 0.f : mx * mult;",
     "const float m_scaled = mx * mult;", TD, ""),
    ("decode: page ids not clamped", DK, "page = min(max(page, 0), p.num_pages - 1);", "", TD, ""),
    ("decode: warp merge sees warp 0 only", DK,
     "for (int w = 0; w < kNWarps; ++w) M = fmaxf(M, red_ml[(w * 16 + lr) * 2]);",
     "for (int w = 0; w < 1; ++w) M = fmaxf(M, red_ml[(w * 16 + lr) * 2]);", TD, ""),
    ("decode: paged slot offset wrong", DK, "slot = j % p.page_size;",
     "slot = j % p.page_size; slot = (slot + (p.page_size > 1 ? 1 : 0)) % p.page_size;", TD, ""),
    ("decode: combine has no row bound", DK, "  if (row >= total_rows) return;\n", "  if (row >= total_rows + 64) return;\n", TD, ""),
    ("decode: split kernel writes rows past group * Sq", DK, "    if (R >= p.rows) continue;\n", "", TD, ""),
    ("decode: no barrier before a stage is refilled", DK,
     "    __syncthreads();               // ... for every thread; and stage (it - 1) is free again", "    // removed",
     TD, ""),
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
