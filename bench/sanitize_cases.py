"""Small cases of every CUDA op, run under compute-sanitizer by bench/gpu_suite.sh.

    compute-sanitizer --tool memcheck python bench/sanitize_cases.py [op ...]

Each case runs the cuda backend once on odd shapes (so tails and masks are exercised) and
checks the result against the reference, so a race that changes values fails here too.
"""
import sys

import torch

import fastllm
from fastllm import ref

CASES = {}
# Where the cases allocate: "cuda" under compute-sanitizer; tests/test_simt_sanitize_cases.py sets
# "cpu" and runs them on the SIMT emulator, so a broken case fails in CI, not in the GPU run.
DEVICE = "cuda"


def case(name):
    def deco(fn):
        CASES[name] = fn
        return fn
    return deco


@case("quantize_per_token")
def _quantize():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for M, K in ((3, 17), (5, 1032)):
            x = torch.randn(M, K, device=DEVICE, dtype=dtype)
            q, s = fastllm.ops.quantize_per_token(x, backend="cuda")
            rq, rs = ref.quantize_per_token(x)
            assert torch.equal(q, rq) and torch.equal(s, rs), (dtype, M, K)


@case("flash_attention")
def _flash_attention():
    # Odd lengths (tails of the 128-row / 64-key tiles), GQA, a padding mask with an empty
    # batch row, causal with Sq > Skv, window + softcap, a per-row mask narrowing the key range;
    # every dtype and head dim once (on an sm_90 GPU with a 90a build, D 64 / 128 / 256 run the
    # wgmma kernel).
    from fastllm.ops._attention_cuda import HEAD_DIMS, flash_attention_cuda
    cases = [dict(B=2, Hq=4, Hkv=2, Sq=37, Skv=70, causal=True),
             dict(B=2, Hq=4, Hkv=1, Sq=70, Skv=37, causal=True),
             dict(B=2, Hq=2, Hkv=2, Sq=19, Skv=133, causal=False, window=40, softcap=20.0, mask=True)]
    for i, D in enumerate(HEAD_DIMS):
        for dtype in (torch.float16, torch.bfloat16):
            c = dict(cases[i % len(cases)])
            B, Hq, Hkv, Sq, Skv = (c.pop(n) for n in ("B", "Hq", "Hkv", "Sq", "Skv"))
            q = torch.randn(B, Sq, Hq, D, device=DEVICE, dtype=dtype).transpose(1, 2)
            k = torch.randn(B, Skv, Hkv, D, device=DEVICE, dtype=dtype).transpose(1, 2)
            v = torch.randn(B, Skv, Hkv, D, device=DEVICE, dtype=dtype).transpose(1, 2)
            mask = None
            if c.pop("mask", False):
                mask = torch.rand(B, 1, 1, Skv, device=DEVICE) > 0.3
                mask[1] = False
            if D == 128:   # per-row mask, rows of 70 bytes (the range scan's byte path), a narrow range
                mask = torch.zeros(B, 1, Sq, Skv, dtype=torch.bool, device=DEVICE)
                mask[..., Skv // 3: Skv - 5] = True
            scale = D ** -0.5
            out, lse = flash_attention_cuda(q, k, v, mask, c["causal"], scale, c.get("window", 0),
                                            c.get("softcap", 0.0))
            rout, rlse = ref.flash_attention(q.float(), k.float(), v.float(), scale=scale, mask=mask, **c)
            assert not out.isnan().any() and not lse.isnan().any(), (D, dtype)
            err = (out.float() - rout).abs().max().item()
            assert err < 2e-2, (D, dtype, err)
            empty = torch.isinf(rlse)
            assert torch.equal(torch.isinf(lse), empty), (D, dtype)
            assert (lse[~empty] - rlse[~empty]).abs().max().item() < 1e-2, (D, dtype)


@case("flash_attention_bias_sinks")
def _flash_attention_bias_sinks():
    # The bias kernels (every head dim that has one; fp16 / bf16 / fp32 biases, full, per-head
    # broadcast and a transposed view, with -inf and dtype-minimum rows) with attention sinks,
    # causal Sq > Skv (rows without keys: lse = the sink).
    from fastllm.ops._attention_cuda import BIAS_HEAD_DIMS, flash_attention_cuda
    B, Hq, Hkv, Sq, Skv = 2, 4, 2, 70, 37
    for i, D in enumerate(BIAS_HEAD_DIMS):
        dtype = (torch.float16, torch.bfloat16)[i % 2]
        q = torch.randn(B, Sq, Hq, D, device=DEVICE, dtype=dtype).transpose(1, 2)
        k = torch.randn(B, Skv, Hkv, D, device=DEVICE, dtype=dtype).transpose(1, 2)
        v = torch.randn(B, Skv, Hkv, D, device=DEVICE, dtype=dtype).transpose(1, 2)
        bias = [torch.randn(B, Hq, Sq, Skv, device=DEVICE), torch.randn(1, Hq, Sq, Skv, device=DEVICE).half(),
                torch.randn(1, Hq, Skv, Sq, device=DEVICE).bfloat16().transpose(2, 3),
                torch.randn(B, 1, 1, Skv, device=DEVICE)][i]
        if bias.shape[2] > 1:
            bias[..., 3, :] = float("-inf")
            bias[..., 5, :] = torch.finfo(bias.dtype).min
        sinks = torch.tensor([0.5, -1.0, 3.0, float("-inf")], device=DEVICE)
        out, lse = flash_attention_cuda(q, k, v, None, True, D ** -0.5, 0, 0.0, sinks, bias)
        rout, rlse = ref.flash_attention(q.float(), k.float(), v.float(), causal=True, sinks=sinks, bias=bias.float())
        assert not out.isnan().any() and not lse.isnan().any(), D
        assert (out.float() - rout).abs().max().item() < 2e-2, D
        assert torch.equal(torch.isinf(lse), torch.isinf(rlse)), D


@case("flash_attention_varlen")
def _flash_attention_varlen():
    # Packed sequences with an empty query run, an empty key run and q longer than k.
    from fastllm.ops._attention_cuda import flash_attention_varlen_cuda
    lens_q, lens_k = [3, 0, 70, 19], [40, 5, 37, 0]
    cu_q = torch.tensor([0] + lens_q, device=DEVICE).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k, device=DEVICE).cumsum(0).to(torch.int32)
    for D, dtype in ((64, torch.float16), (256, torch.bfloat16)):
        q = torch.randn(int(cu_q[-1]), 4, D, device=DEVICE, dtype=dtype)
        k = torch.randn(int(cu_k[-1]), 2, D, device=DEVICE, dtype=dtype)
        v = torch.randn(int(cu_k[-1]), 2, D, device=DEVICE, dtype=dtype)
        out, lse = flash_attention_varlen_cuda(q, k, v, cu_q, cu_k, 70, 40, True, D ** -0.5, 0, 0.0)
        rout, rlse = ref.flash_attention_varlen(q.float(), k.float(), v.float(), cu_q, cu_k, causal=True)
        assert (out.float() - rout).abs().max().item() < 2e-2, (D, dtype)
        assert torch.equal(torch.isinf(lse), torch.isinf(rlse)), (D, dtype)

@case("int8_matmul")
def _int8_matmul():
    # W8A8 with tails on every tile config (M 1 / 17 / 37 / 129, K and N multiples of 16 but
    # not of the tiles), split-K (M 3, K 4112 over 2 N tiles; M 100: the 128 x 128 config over 2
    # tiles, 4 slices with a short last one), per-token and per-tensor scales,
    # a bias; on an H100 (90a build) M 129 and 1537 run the wgmma kernel's two configs (128- and
    # 256-wide tiles) and M 200 its split-K (4 slices of 5 / 5 / 5 / 2 K steps); W8A16 at M 3
    # and 11 with a K tail block and per-group scales.
    for M, K, N in ((1, 272, 48), (3, 4112, 64), (17, 80, 112), (37, 208, 80), (100, 1040, 256),
                    (129, 144, 272), (200, 2064, 528), (1537, 144, 5648)):
        a = torch.randint(-128, 128, (M, K), dtype=torch.int8, device=DEVICE)
        b = torch.randint(-128, 128, (N, K), dtype=torch.int8, device=DEVICE)
        acc = fastllm.ops.int8_matmul_int32(a, b, backend="cuda")
        assert torch.equal(acc.cpu(), ref.int8_matmul_int32(a.cpu(), b.cpu())), (M, K, N)
        a_s = torch.rand(M, device=DEVICE) if M % 2 else torch.rand(1, device=DEVICE)
        w_s, bias = torch.rand(N, device=DEVICE), torch.randn(N, device=DEVICE, dtype=torch.float16)
        out = fastllm.ops.int8_matmul(a, b, a_s, w_s, bias, out_dtype=torch.float32, backend="cuda")
        want = ref.int8_matmul(a.cpu(), b.cpu(), a_s.cpu(), w_s.cpu(), bias.cpu(), torch.float32)
        assert torch.allclose(out.cpu(), want, rtol=1e-5, atol=1e-3), (M, K, N)
    for M, K, N, g in ((3, 208, 48, None), (11, 256, 32, 64)):
        x = torch.randn(M, K, device=DEVICE, dtype=torch.bfloat16)
        w = torch.randint(-128, 128, (N, K), dtype=torch.int8, device=DEVICE)
        s = torch.rand((N,) if g is None else (N, K // g), device=DEVICE) * 0.01
        out = fastllm.ops.w8a16_matmul(x, w, s, group_size=g, backend="cuda")
        want = ref.w8a16_matmul(x.cpu().float(), w.cpu(), s.cpu(), None, g)
        assert torch.allclose(out.float().cpu(), want, rtol=2e-2, atol=2e-2), (M, K, N, g)
    # Static W8A8: M 5 runs the fused-quantization decode kernel (aligned fp16 rows), M 19 the
    # quantize kernel's scalar path (odd row stride) + GEMM; per-channel smoothing and per-tensor.
    for M, K, N, pad in ((5, 96, 32, 0), (19, 80, 48, 3)):
        x = torch.randn(M, K + pad, device=DEVICE, dtype=torch.float16)[:, :K]
        b = torch.randint(-128, 128, (N, K), dtype=torch.int8, device=DEVICE)
        w_s = torch.rand(N, device=DEVICE) * 0.01
        smooth = torch.rand(K, device=DEVICE) + 0.5 if pad else None
        out = fastllm.ops.int8_matmul_static(x, b, 0.03, w_s, smooth=smooth, backend="cuda")
        want = fastllm.ops.int8_matmul_static(x.cpu(), b.cpu(), 0.03, w_s.cpu(),
                                              smooth=smooth.cpu() if pad else None, backend="torch")
        assert torch.allclose(out.float().cpu(), want.float(), rtol=1e-2, atol=1e-2), (M, K, N)
    # Dynamic W8A8 on the fused decode kernel: both token-tile variants, a K tail block, padded
    # x rows, SmoothQuant factors, bf16 and fp32 activations.
    for M, K, N, dtype in ((3, 208, 48, torch.bfloat16), (13, 1040, 32, torch.float32)):
        x = torch.randn(M, K + 8, device=DEVICE, dtype=dtype)[:, 8:]
        b = torch.randint(-128, 128, (N, K), dtype=torch.int8, device=DEVICE)
        w_s, smooth = torch.rand(N, device=DEVICE) * 0.01, torch.rand(K, device=DEVICE) + 0.5
        out = fastllm.ops.int8_matmul_dynamic(x, b, w_s, smooth=smooth, backend="cuda")
        want = fastllm.ops.int8_matmul_dynamic(x.cpu(), b.cpu(), w_s.cpu(), smooth=smooth.cpu(), backend="torch")
        assert torch.allclose(out.float().cpu(), want.float(), rtol=1e-2, atol=1e-2), (M, K, N)


@case("sparse24")
def _sparse24():
    # 2:4 GEMM on both tile configs (M 3 / 77) with W-row tails (N 48 / 144 vs 64 / 128-row tiles),
    # K tails (192 / 320 vs 128 / 256-column stages), a strided x; fp16, bf16 + bias, int8 raw and
    # with the epilogue. On an H100 (90a build) M 130 with whole-stage K runs the wgmma.sp kernel.
    from fastllm.sparse import compress, prune_24
    for M, K, N in ((3, 192, 48), (77, 320, 144), (130, 512, 144)):
        for dtype in (torch.float16, torch.bfloat16):
            w, _ = prune_24(torch.randn(N, K, device=DEVICE).to(dtype))
            values, meta = compress(w)
            x = torch.randn(M, K + 8, device=DEVICE).to(dtype)[:, :K]
            bias = torch.randn(N, device=DEVICE).to(dtype) if dtype == torch.bfloat16 else None
            out = fastllm.ops.sparse24_matmul(x, values, meta, bias, backend="cuda")
            want = ref.sparse24_matmul(x.float(), values.float(), meta, bias)
            assert (out.float() - want).abs().max().item() < 5e-2 * max(1.0, want.abs().max().item()), (M, K, dtype)
        w, _ = prune_24(torch.randint(-128, 128, (N, K), dtype=torch.int8, device=DEVICE))
        values, meta = compress(w)
        a = torch.randint(-128, 128, (M, K), dtype=torch.int8, device=DEVICE)
        acc = fastllm.ops.sparse24_int8_matmul_int32(a, values, meta, backend="cuda")
        assert torch.equal(acc.cpu(), ref.int8_matmul_int32(a.cpu(), w.cpu())), (M, K, N)
        a_s, w_s = torch.rand(M, device=DEVICE), torch.rand(N, device=DEVICE)
        out = fastllm.ops.sparse24_int8_matmul(a, values, meta, a_s, w_s, out_dtype=torch.float32, backend="cuda")
        want = ref.sparse24_int8_matmul(a.cpu(), values.cpu(), meta.cpu(), a_s.cpu(), w_s.cpu(), None, torch.float32)
        assert torch.allclose(out.cpu(), want, rtol=1e-5, atol=1e-3), (M, K, N)
    # Split-K (decode-sized M on 64 W rows: 2 CTAs, K split over grid z; workspace + reduce).
    for dtype in (torch.float16, torch.int8):
        M, K, N = 3, 4096, 64
        w, _ = prune_24(torch.randint(-128, 128, (N, K), device=DEVICE).to(dtype))
        values, meta = compress(w)
        if dtype == torch.int8:
            a = torch.randint(-128, 128, (M, K), dtype=torch.int8, device=DEVICE)
            acc = fastllm.ops.sparse24_int8_matmul_int32(a, values, meta, backend="cuda")
            assert torch.equal(acc.cpu(), ref.int8_matmul_int32(a.cpu(), w.cpu())), "split-K int8"
        else:
            x = torch.randn(M, K, device=DEVICE, dtype=dtype)
            out = fastllm.ops.sparse24_matmul(x, values, meta, backend="cuda")
            want = ref.sparse24_matmul(x.float(), values.float(), meta, None)
            assert (out.float() - want).abs().max().item() < 5e-2 * max(1.0, want.abs().max().item()), "split-K"


@case("int8_matmul_dynamic")
def _int8_matmul_dynamic():
    # Per-token dynamic W8A8 through the CUDA backend (quantize kernel + GEMM), with smoothing.
    x = torch.randn(5, 96, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randint(-128, 128, (48, 96), dtype=torch.int8, device=DEVICE)
    w_s, smooth = torch.rand(48, device=DEVICE) * 0.01, torch.rand(96, device=DEVICE) + 0.5
    out = fastllm.ops.int8_matmul_dynamic(x, b, w_s, smooth=smooth, backend="cuda")
    want = ref.int8_matmul_dynamic(x.cpu(), b.cpu(), w_s.cpu(), None, smooth.cpu())
    assert torch.allclose(out.float().cpu(), want.float(), rtol=1e-2, atol=1e-2)


@case("decode_attention")
def _decode_attention():
    # Odd lengths (tile tails), a length past the capacity (clamped), GQA packing over two
    # 16-row blocks (group 8 x Sq 3 = 24 rows), pages of 7 with an out-of-range id (clamped),
    # window + softcap, several splits and one; every head dim once.
    from fastllm.ops._decode_cuda import HEAD_DIMS, decode_attention_cuda
    for i, D in enumerate(HEAD_DIMS):
        dtype = (torch.float16, torch.bfloat16)[i % 2]
        B, Hq, Hkv, Sq, S = 3, 16, 2, 3, 203
        q = torch.randn(B, Sq, Hq, D, device=DEVICE, dtype=dtype).transpose(1, 2)
        k = torch.randn(B, Hkv, S, D, device=DEVICE, dtype=dtype)
        v = torch.randn(B, Hkv, S, D, device=DEVICE, dtype=dtype)
        lens = torch.tensor([1, 150, 10 ** 6], dtype=torch.int32, device=DEVICE)
        kw = dict(window=40 * (i % 2), softcap=20.0 * (i % 2), splits=1 + 4 * (i % 3))
        args = (q, k, v, lens, None)
        if i % 2:
            pages = k.transpose(1, 2).reshape(B * 29, 7, Hkv, D), v.transpose(1, 2).reshape(B * 29, 7, Hkv, D)
            table = torch.arange(B * 29, dtype=torch.int32, device=DEVICE).reshape(B, 29)
            table[1, 3] = 10 ** 6
            args = (q, pages[0], pages[1], lens, table)
        sinks = torch.linspace(-2.0, 4.0, Hq, device=DEVICE) if i < 3 else None   # splits 1 and 5: both paths
        out, lse = decode_attention_cuda(*args, None, D ** -0.5, kw["window"], kw["softcap"], kw["splits"], sinks)
        rout, rlse = ref.decode_attention(*(t.float() for t in args[:3]), cache_seqlens=lens, block_table=args[4],
                                          scale=D ** -0.5, window=kw["window"] or None, softcap=kw["softcap"] or None,
                                          sinks=sinks)
        assert not out.isnan().any() and not lse.isnan().any(), (D, dtype)
        assert (out.float() - rout).abs().max().item() < 2e-2, (D, dtype)
        assert torch.equal(torch.isinf(lse), torch.isinf(rlse)), (D, dtype)
    # A StaticCache-like bool mask (left padding, unfilled tail, a row with nothing): the kernel
    # scans it for the attended key range first, 16 bytes at a time (208 slots) or byte by byte
    # (203 slots: rows not 16-byte aligned).
    for S in (208, 203):
        B, Hq, Hkv, Sq, D = 3, 8, 2, 2, 128
        q = torch.randn(B, Sq, Hq, D, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2)
        k = torch.randn(B, Hkv, S, D, device=DEVICE, dtype=torch.bfloat16)
        v = torch.randn(B, Hkv, S, D, device=DEVICE, dtype=torch.bfloat16)
        mask = torch.zeros(B, 1, Sq, S, dtype=torch.bool, device=DEVICE)
        mask[0, ..., 5:60] = True
        mask[1, ..., 100:S - 3] = True
        mask[1, 0, 0] = False
        out, lse = decode_attention_cuda(q, k, v, None, None, mask, D ** -0.5, 0, 0.0, 3)
        rout, rlse = ref.decode_attention(q.float(), k.float(), v.float(), mask=mask, scale=D ** -0.5)
        assert (out.float() - rout).abs().max().item() < 2e-2, S
        assert torch.equal(torch.isinf(lse), torch.isinf(rlse)), S


def main(names):
    for name in names or CASES:
        CASES[name]()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        print(f"sanitize case {name}: ok")


if __name__ == "__main__":
    main(sys.argv[1:])
