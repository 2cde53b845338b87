"""The SIMT emulator (tests/simt/) itself: its instruction models on a canonical use, and the
faults it must report instead of computing garbage (tests/simt/selftest.cu); and the source
rewrite build.py applies to csrc/."""
import ctypes
import re

import pytest
import torch

from simt.backend import emulated_cuda, unavailable_reason
from simt.build import rewrite, selftest_path

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=f"simt emulator: {unavailable_reason()}")

LAUNCH_FAILURE, INVALID_VALUE = 719, 1


@pytest.fixture(scope="module")
def lib():
    so = ctypes.CDLL(selftest_path())
    so.simt_error.restype = ctypes.c_char_p
    return so


def ptr(t):
    return ctypes.c_void_p(t.data_ptr())


def test_ldmatrix_mma_canonical_use(lib):
    a = torch.randn(16, 16).half()
    bt = torch.randn(8, 16).half()
    d = torch.full((16, 8), float("nan"))
    assert lib.selftest_mma(ptr(a), ptr(bt), ptr(d)) == 0
    torch.testing.assert_close(d, a.float() @ bt.float().t(), rtol=1e-6, atol=1e-5)


def test_cp_async_data_lands_at_the_wait(lib):
    src = torch.randn(64)
    dst = torch.zeros(64)
    assert lib.selftest_cp_async(ptr(src), ptr(dst), 1) == 0
    assert torch.equal(dst, src)
    # Without cp.async.wait_group the copy has not landed when the block reads it: NaN, as the
    # hardware's undefined contents would be garbage.
    assert lib.selftest_cp_async(ptr(src), ptr(dst), 0) == 0
    assert torch.isnan(dst).all()


@pytest.mark.parametrize("which,message", [(0, "different warp-wide instructions"), (2, "outside the")])
def test_faults_fail_the_launch(lib, which, message):
    out = torch.zeros(64)
    code = lib.selftest_fault(which, ptr(out))
    assert code == LAUNCH_FAILURE
    assert re.search(message, lib.simt_error(code).decode())


def test_wgmma_canonical_use(lib):
    # One m64n64k16 wgmma from 128-byte-swizzled shared tiles: D = A B^T, in the accumulator layout.
    a, bt = torch.randn(64, 16).half(), torch.randn(64, 16).half()
    d = torch.full((64, 64), float("nan"))
    assert lib.selftest_wgmma(ptr(a), ptr(bt), ptr(d), 0) == 0
    torch.testing.assert_close(d, a.float() @ bt.float().t(), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("mode,message", [
    (1, "not retired by a wgmma.wait_group"),     # D read before the wait: the old values, then the exit fails
    (2, "without a wgmma.fence"),
    (3, "without the writer's fence.proxy.async"),
    (4, "deadlock .* waiting in mbarrier.try_wait"),
])
def test_wgmma_misuse_fails_the_launch(lib, mode, message):
    a, bt = torch.randn(64, 16).half(), torch.randn(64, 16).half()
    d = torch.full((64, 64), float("nan"))
    code = lib.selftest_wgmma(ptr(a), ptr(bt), ptr(d), mode)
    assert code == LAUNCH_FAILURE
    assert re.search(message, lib.simt_error(code).decode())
    if mode == 1:
        assert (d == -1).all()   # the accumulators' values before the MMA


def test_exited_threads_count_as_arrived_at_syncthreads(lib):
    # PTX bar.sync waits for the non-exited threads: half the block returning first is fine.
    assert lib.selftest_fault(1, ptr(torch.zeros(64))) == 0


def test_dynamic_shared_memory_needs_the_opt_in(lib):
    out = torch.zeros(32)
    code = lib.selftest_big_smem(ptr(out), 0)
    assert code == INVALID_VALUE and "opt-in" in lib.simt_error(code).decode()
    assert lib.selftest_big_smem(ptr(out), 1) == 0


def test_kernel_failure_reaches_python_as_cuda_error(monkeypatch):
    # A launch failure inside the emulated _C surfaces through the glue's status check.
    from fastllm.errors import CudaError
    from fastllm.ops._attention_cuda import flash_attention_cuda
    with emulated_cuda(smem_optin=48 * 1024):   # D=256 tiles need more than 48 KB: the opt-in fails
        q = torch.randn(1, 2, 17, 256, dtype=torch.float16)
        with pytest.raises(CudaError):
            flash_attention_cuda(q, q, q, None, True, 0.0625, 0, 0.0)


def test_rewrite():
    src = '''
  asm volatile("mma.sp::ordered_metadata.sync.aligned.m16n8k64.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, "
               "{%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\\n"
               : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
  asm volatile("cp.async.wait_group %0;\\n" ::"n"(N));
  kern<T, Cfg<2>><<<dim3(x, y), Cfg<2>::kThreads, kSmem,
      stream>>>(p, q);
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __shared__ float s_inv[kTok], s_scale[kTok];
'''
    out = rewrite(src, "test")
    assert ("::simt::ptx::mma_sp_ordered_metadata_sync_aligned_m16n8k64_row_col_s32_s8_s8_s32(d[0], d[1], d[2], "
            "d[3], a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], e, 0x0)") in out
    assert "::simt::ptx::cp_async_wait_group(N)" in out
    assert "::simt::launch(kern<T, Cfg<2>>, dim3(x, y), Cfg<2>::kThreads, kSmem,\n      stream, p, q)" in out
    assert "unsigned char* smem_raw = ::simt::dynamic_smem<unsigned char>();" in out
    assert ("static float s_inv[kTok]; static float s_scale[kTok]; ::simt::poison_once(&s_inv, sizeof(s_inv)); "
            "::simt::poison_once(&s_scale, sizeof(s_scale));") in out
    with pytest.raises(ValueError, match="asm block not modelled"):
        rewrite('asm("{ .reg .pred p; selp.u32 %0, 1, 0, p; }" : "=r"(x));', "test")
    with pytest.raises(ValueError, match="multi-instruction"):
        rewrite('asm("fence.proxy.async; fence.proxy.async;");', "test")
    with pytest.raises(ValueError, match="unused"):
        rewrite('asm("ex2.approx.ftz.f32 %0, %0;" : "=f"(y) : "f"(x));', "test")


def test_rewrite_hopper_idioms():
    # Predicates folded into the instruction they guard or feed, the sink operand dropped, an
    # empty (compiler-only) asm erased, and asm inside a macro definition expanded first.
    src = r'''
#include <cstdint>
#define WAIT(P) asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n" \
                             "selp.u32 %0, 1, 0, p;\n}\n" : "=r"(done) : "r"(bar), "r"(P) : "memory")
#define ARRIVE(INSTR) \
  asm volatile(INSTR " _, [%0];\n" ::"r"(bar) : "memory")
void f() {
  WAIT(parity);
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %2, 0;\nwgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
               "{%0, %1}, %3, %4, p, 1, 1, 0, 0;\n}\n" : "+f"(d[0]), "+f"(d[1]) : "r"(acc), "l"(da), "l"(db));
  ARRIVE("mbarrier.arrive.shared::cta.b64");
  asm volatile("" : "+r"(x)::"memory");
}
'''
    out = rewrite(src, "test")
    assert out.startswith("#include <cstdint>\n")
    assert "::simt::ptx::mbarrier_try_wait_parity_shared_cta_b64(done, bar, parity)" in out
    assert ("::simt::ptx::wgmma_mma_async_sync_aligned_m64n64k16_f32_f16_f16(d[0], d[1], da, db, acc, 1, 1, 0, 0)"
            in out)
    assert "::simt::ptx::mbarrier_arrive_shared_cta_b64(bar)" in out
    assert "((void)0)" in out and "asm" not in out
