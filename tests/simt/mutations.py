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
TI, TS, TH = "tests/test_simt_int8.py", "tests/test_simt_sparse24.py", "tests/test_simt_hopper.py"
IW, IT, FW, SW = ("int8/int8_wgmma_kernel.cuh", "int8/int8_wgmma_tma_kernel.cuh", "attention/flash_fwd_wgmma.cuh",
                  "sparse24/sparse24_wgmma_kernel.cuh")
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
    ("attention: bias floor dropped (dtype-minimum rows overflow to -inf)", "attention/flash_fwd_kernel.cuh",
     "(x == -INFINITY ? x : fmaxf(x, kScoreFloor)) * kLog2eF", "x * kLog2eF", "tests/test_simt_attention.py", "bias"),
    ("attention: bias read through the row stride twice", "attention/flash_fwd_kernel.cuh",
     "x += static_cast<float>(brow[col * p.bias_col_stride]);",
     "x += static_cast<float>(brow[col * p.bias_col_stride + (p.bias_row_stride > 0 ? p.bias_col_stride : 0)]);",
     "tests/test_simt_attention.py", "bias"),
    ("attention: bias ignores the head stride", "attention/flash_fwd_kernel.cuh",
     "batch * p.bias_batch_stride + head * p.bias_head_stride +", "batch * p.bias_batch_stride +",
     "tests/test_simt_attention.py", "bias"),
    ("attention: sink leaves O unrescaled when it is the new max", "attention/flash_fwd_kernel.cuh",
     "inv[r] = any_key ? alpha / l : 0.f;", "inv[r] = any_key ? 1.f / l : 0.f;", "tests/test_simt_attention.py",
     "sinks"),
    ("attention: early exit forgets the sink", "attention/flash_fwd_kernel.cuh",
     "if (m0 + r < Sq) lse_base[m0 + r] = lse_empty;", "if (m0 + r < Sq) lse_base[m0 + r] = -INFINITY;",
     "tests/test_simt_attention.py", "sinks"),
    ("decode: combine forgets the sink", DK, "  sum += expf(z - m_safe);  // 0 without a sink", "", TD, "sinks"),
    ("decode: one-piece epilogue uses the sink of head 0", DK,
     "p.num_splits == 1 && p.sinks != nullptr ? p.sinks[h] : -INFINITY;",
     "p.num_splits == 1 && p.sinks != nullptr ? p.sinks[0] : -INFINITY;", TD, "sinks"),
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
    ('int8: splitk reduce drops last', 'int8/int8_gemm_kernel.cuh',
     'for (int k = 0; k < splits; ++k)', 'for (int k = 0; k < splits - 1; ++k)', TI, ""),
    ('int8: gemm wait too short', 'int8/int8_gemm_kernel.cuh',
     'cp_async_wait<kStages - 2>();', 'cp_async_wait<kStages - 1>();', TI, ""),
    ('int8: gemm no k tail zero', 'int8/int8_gemm_kernel.cuh',
     'const bool valid = row < rows_valid && k < K;', 'const bool valid = row < rows_valid;', TI, ""),
    ('int8: fused never tiny', 'int8/w8a8_decode_kernel.cuh',
     'return __syncthreads_or(isinf(inv)) != 0;', 'return __syncthreads_or(0) != 0;', TI, ""),
    ('int8: fused inv tile0', 'int8/w8a8_decode_kernel.cuh',
     'inv[t] = kDynamic ? s_inv[g + 8 * t] : 0.f;', 'inv[t] = kDynamic ? s_inv[g] : 0.f;', TI, ""),
    ('int8: w8a16 group row8 scale', 'int8/w8a16_gemm_kernel.cuh',
     'sc0 = s_g[gi], sc8 = s_g8[gi];', 'sc0 = s_g[gi], sc8 = s_g[gi];', TI, ""),
    ('int8: qpt reciprocal', 'int8/quantize_per_token.cu',
     '127.f / amax', '127.f * (1.f / amax)', TI, ""),
    ('int8: fused reciprocal', 'int8/w8a8_decode_kernel.cuh',
     '127.f / a', '127.f * (1.f / a)', TI, ""),
    ('int8: w8a16 no barrier', 'int8/w8a16_gemm_kernel.cuh',
     'stash_d_fragments(red[warp], acc, g, c);\n  __syncthreads();', 'stash_d_fragments(red[warp], acc, g, c);', TI, ""),
    ('int8: gemm no stage barrier', 'int8/int8_gemm_kernel.cuh',
     'cp_async_wait<kStages - 2>();\n    __syncthreads();', 'cp_async_wait<kStages - 2>();', TI, ""),
    ('int8: qstatic no nan', 'int8/quantize_static.cu',
     'y = (y != y) ? 0.f : fminf', 'y = fminf', TI, ""),
    ('int8: epilogue bias swap', 'int8/int8_epilogue.cuh',
     'col.ws1, col.b1)', 'col.ws1, col.b0)', TI, ""),
    ('int8: fused clamp m128', 'int8/w8a8_decode_kernel.cuh',
     'fminf(fmaxf(v, -127.f), 127.f)', 'fminf(fmaxf(v, -128.f), 127.f)', TI, ""),
    ('int8: w8a16 bf16 perm', 'int8/w8a16_gemm_kernel.cuh',
     '__byte_perm(u, 0x4B000000u, 0x7441)', '__byte_perm(u, 0x4B000000u, 0x7442)', TI, ""),
    ('int8: swizzle no xor store', 'int8/int8_gemm_kernel.cuh',
     'const int phys = (chunk % kGroup) ^ ((row / kRowsPerLine) % kGroup);', 'const int phys = (chunk % kGroup);', TI, ""),
    ('sparse24: read stage no wrap', 'sparse24/sparse24_gemm_kernel.cuh',
     'const uint8_t* st = smem + (it % Tr::kStages) * Tr::kStageBytes;', 'const uint8_t* st = smem + min(it, (int64_t)Tr::kStages - 1) * Tr::kStageBytes;', TS, ""),
    ('sparse24: load stage no wrap', 'sparse24/sparse24_gemm_kernel.cuh',
     'load_stage<Tr>(p, smem + (next % Tr::kStages) * Tr::kStageBytes', 'load_stage<Tr>(p, smem + min(next, (int64_t)Tr::kStages - 1) * Tr::kStageBytes', TS, ""),
    ('sparse24: K-tail skip', 'sparse24/sparse24_gemm_kernel.cuh',
     'if (kt * Tr::kSteps + step >= k_slices) break;', '', TS, ""),
    ('sparse24: wait one stage late', 'sparse24/sparse24_gemm_kernel.cuh',
     'cp_async_wait<Tr::kStages - 2>();', 'cp_async_wait<Tr::kStages - 1>();', TS, ""),
    ('sparse24: no syncthreads', 'sparse24/sparse24_gemm_kernel.cuh',
     "    __syncthreads();                    // ... and everyone's", "    // ... and everyone's", TS, ""),
    ('sparse24: a_scale always per row', 'sparse24/sparse24_gemm_kernel.cuh',
     'p.a_scale[p.a_scale_per_row ? m : 0]', 'p.a_scale[m]', TS, ""),
    ('sparse24: bias index', 'sparse24/sparse24_gemm_kernel.cuh',
     'load_bias(p.bias, p.bias_dtype, n)', 'load_bias(p.bias, p.bias_dtype, n % 16)', TS, ""),
    ('sparse24: selector always 0', 'sparse24/sparse24_gemm_kernel.cuh',
     'MmaSp<T, Tr::kS8 ? 0 : 1>::run', 'MmaSp<T, 0>::run', TS, ""),
    ('sparse24: no partials flag', 'sparse24/sparse24_gemm_kernel.cuh',
     '    pass1.partials = true;\n', '\n', TS, ""),
    ('sparse24: x swizzle load', 'sparse24/sparse24_gemm_kernel.cuh',
     'ldmatrix_x4(b[ni], smem_u32(xs + x_off(r, step * 4 + (lane >> 3))));', 'ldmatrix_x4(b[ni], smem_u32(xs + r * 256 + (step * 4 + (lane >> 3)) * 16));', TS, ""),
    ('sparse24: raw path ignores slice', 'sparse24/sparse24_gemm_kernel.cuh',
     'Acc* out = static_cast<Acc*>(p.out) + static_cast<int64_t>(blockIdx.z) * p.M * p.N;', 'Acc* out = static_cast<Acc*>(p.out);', TS, ""),
    ('sparse24: x row stride ignored', 'sparse24/sparse24_gemm_kernel.cuh',
     'p.x + (ok ? (t0 + r) * p.x_row_bytes + col : 0)', 'p.x + (ok ? (t0 + r) * p.K * kElt + col : 0)', TS, ""),
    ('sparse24: last K slice count', 'sparse24/sparse24_gemm_kernel.cuh',
     'const int64_t k_slices = p.K / Tr::kColsPerStep;', 'const int64_t k_slices = (p.K - 1) / Tr::kColsPerStep;', TS, ""),
    # The sm_90a kernels (wgmma / TMA / mbarrier models of tests/simt/simt_hopper.cpp).
    ("hopper int8: wait_group leaves two groups running", IW, "    wgmma::wait_group<1>();\n  }\n  wgmma::wait_group<0>();",
     "    wgmma::wait_group<2>();\n  }\n  wgmma::wait_group<0>();", TH, "int8 and cp"),
    ("hopper int8: no proxy fence before the MMAs read cp.async data", IW,
     "    cp_async_wait<kStages - 3>();\n    wgmma::fence_proxy_async_smem();", "    cp_async_wait<kStages - 3>();", TH,
     "int8 and cp"),
    ("hopper int8: k32 step of 16 bytes", IW, "wgmma_s8<kBN>(acc, da + 2 * ks, db + 2 * ks);  // +32 B",
     "wgmma_s8<kBN>(acc, da + ks, db + ks);  // +32 B", TH, "int8 and cp"),
    ("hopper int8: second warpgroup reads the first one's rows", IW,
     "wgmma::desc_sw128(sA + stage * kABytes + wg * 64 * kBK);", "wgmma::desc_sw128(sA + stage * kABytes);", TH,
     "int8 and cp"),
    ("hopper int8: refill overwrites the slot still in use", IW, "const int next = kt + kStages - 2;",
     "const int next = kt + kStages - 1;", TH, "int8 and cp"),
    ("hopper int8: no wgmma.fence", IW, "    wgmma::fence();\n    wgmma::fence_operands(acc);\n#pragma unroll\n    for (int ks",
     "    wgmma::fence_operands(acc);\n#pragma unroll\n    for (int ks", TH, "int8 and cp"),
    ("hopper int8 tma: consumers wait for the wrong parity", IT,
     "tma::mbar_wait(full + 8 * s, static_cast<uint32_t>(kt / kStages) & 1);",
     "tma::mbar_wait(full + 8 * s, (static_cast<uint32_t>(kt / kStages) & 1) ^ 1);", TH, "int8 and tma"),
    ("hopper int8 tma: slots never handed back", IT,
     "if (kt > 0 && wwarp == 0 && lane == 0) tma::mbar_arrive(", "if (kt > 0 && wwarp == 9 && lane == 0) tma::mbar_arrive(",
     TH, "int8 and tma"),
    ("hopper int8 tma: expect_tx counts a only", IT, "tma::mbar_arrive_expect_tx(full + 8 * s, kABytes + kBBytes);",
     "tma::mbar_arrive_expect_tx(full + 8 * s, kABytes);", TH, "int8 and tma"),
    ("hopper int8 tma: b's box as tall as a's", IT, "make_operand_map(&map_b, p.b, p.N, p.K, p.ldb, Cfg::kBN)",
     "make_operand_map(&map_b, p.b, p.N, p.K, p.ldb, Cfg::kBM)", TH, "int8 and tma"),
    ("hopper attention: V descriptor's D-block offset", FW, "v_desc = wgmma::desc_sw128_mn(sV, kKVBlockBytes);",
     "v_desc = wgmma::desc_sw128_mn(sV, kQBlockBytes);", TH, "attention_matches"),
    ("hopper attention: V key step of 8 rows", FW, "at(v_desc, stage + ks * 16 * kRowBytes)",
     "at(v_desc, stage + ks * 8 * kRowBytes)", TH, "attention_matches"),
    ("hopper attention: S accumulates onto the previous tile", FW, "at(k_desc, stage + block * kKVBlockBytes + in_row), kk > 0);",
     "at(k_desc, stage + block * kKVBlockBytes + in_row), 1);", TH, "attention_matches"),
    ("hopper attention: S read before its wait", FW,
     "    wgmma::commit_group();\n    wgmma::wait_group<0>();\n    wgmma::fence_operands(d);\n  }\n\n  __device__ __forceinline__ void pv(",
     "    wgmma::commit_group();\n    wgmma::fence_operands(d);\n  }\n\n  __device__ __forceinline__ void pv(", TH,
     "attention_matches"),
    ("hopper attention: no proxy fence for the cp.async tiles", FW,
     "__device__ static __forceinline__ void copies_landed() { wgmma::fence_proxy_async_smem(); }",
     "__device__ static __forceinline__ void copies_landed() {}", TH, "attention_matches"),
    ("hopper sparse24: odd 16-bit slice reads the even slice's metadata", SW,
     "((lane & ~3) | (2 * (step & 1)) | (lane & 1))", "((lane & ~3) | (lane & 1))", TH, "sparse24_float"),
    ("hopper sparse24: odd slice's x 32 bytes off", SW, "(step % 2) * 64);", "(step % 2) * 32);", TH, "sparse24"),
    ("hopper sparse24: warpgroup 1 reads warpgroup 0's metadata", SW, "const int rb = wg * 4 + w;",
     "const int rb = w;", TH, "sparse24"),
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
    results = []
    for m in wanted:
        results.append(run(m))
        print(results[-1], flush=True)
    sys.exit(0 if all(r.startswith("caught") for r in results) else 1)
