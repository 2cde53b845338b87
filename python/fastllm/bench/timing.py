"""How fastllm's benchmarks take a time.

CUDA: CUDA events around each call, L2 flushed before each (a 2x-L2-sized buffer is
zeroed; its cost is outside the events), warm-up first, the median of the timed reps
reported. A kernel timing (the default) also queues a ~100 us GPU sleep before the start event:
the GPU is still busy while Python runs the op's checks and issues the launch, so the events
see the kernels, not the host's dispatch (tens of us, which would dominate a decode-sized
kernel). End-to-end timings (host=True: the model suite) count the host as it is.
CPU: perf_counter, median. Inputs are fresh random data made by the suite; the
suite checks every implementation against the reference before timing it.
"""
import statistics
import time

import torch


#: ~100 us at H100 / A100 clocks: longer than one op's Python dispatch on a GPU host.
SLEEP_CYCLES = 200_000
_sleep = getattr(torch.cuda, "_sleep", None)


class Timer:
    def __init__(self, device, warmup=5, reps=20, min_seconds=0.0):
        self.device = torch.device(device)
        self.warmup, self.reps = warmup, reps
        self._flush = None
        if self.device.type == "cuda":
            l2 = torch.cuda.get_device_properties(self.device).L2_cache_size
            self._flush = torch.empty(max(2 * l2, 1 << 20), dtype=torch.uint8, device=self.device)

    def __call__(self, fn, host=False):
        """Median seconds per call of fn(); host=True: the host's time between launches counts
        from the first (no sleep queued ahead of it)."""
        for _ in range(self.warmup):
            fn()
        if self.device.type != "cuda":
            times = []
            for _ in range(self.reps):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return statistics.median(times)
        # The events and the sleep go to the current device's stream: make that the timed one
        # (--device cuda:1 timed an idle cuda:0 stream), as the ops' launches are.
        with torch.cuda.device(self.device):
            torch.cuda.synchronize()
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
            for s, e in zip(starts, ends):
                self._flush.zero_()
                if not host and _sleep is not None:
                    _sleep(SLEEP_CYCLES)
                s.record()
                fn()
                e.record()
            torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / 1e3


def measure_peaks(device, quick=False):
    """Measured ceilings of this device, once per run: dense bf16 matmul TFLOP/s (GPU; fp32 on
    CPU), int8 `torch._int_mm` TOPS (GPU and CPU, where it runs), and device-to-device copy GB/s
    (bytes read + written)."""
    device = torch.device(device)
    t = Timer(device, warmup=2, reps=5 if quick else 10)
    if device.type == "cuda":
        n = 8192
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        out = {"matmul_bf16_tflops": 2 * n ** 3 / t(lambda: a @ b) / 1e12}
        out["int_mm_tops"] = _int_mm_tops(t, n, device)
        x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
        y = torch.empty_like(x)
        out["copy_gbs"] = 2 * x.numel() / t(lambda: y.copy_(x)) / 1e9
        del a, b, x, y
    else:
        n = 512
        a = torch.randn(n, n)
        out = {"matmul_bf16_tflops": None, "matmul_fp32_tflops": 2 * n ** 3 / t(lambda: a @ a) / 1e12,
               "int_mm_tops": _int_mm_tops(t, n, device)}
        x = torch.empty(1 << 26, dtype=torch.uint8)
        y = torch.empty_like(x)
        out["copy_gbs"] = 2 * x.numel() / t(lambda: y.copy_(x)) / 1e9
    return out


def _int_mm_tops(t, n, device):
    """torch._int_mm TOPS on an n^3 product, or None where this PyTorch / device has none (the
    int8 rows then show no fraction of peak rather than one of a float peak)."""
    if not hasattr(torch, "_int_mm"):
        return None
    ai = torch.randint(-127, 128, (n, n), device=device, dtype=torch.int8)
    bi = torch.randint(-127, 128, (n, n), device=device, dtype=torch.int8)
    try:
        return 2 * n ** 3 / t(lambda: torch._int_mm(ai, bi)) / 1e12
    except (RuntimeError, NotImplementedError):
        return None
