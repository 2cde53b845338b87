// SIMT emulator: what the scheduler (simt_runtime.cpp) offers the instruction models kept in
// other files (simt_hopper.cpp), and the per-block hooks those files provide.
#pragma once

#include <functional>
#include <string>

#include "simt.h"

namespace simt {

int thread_index();  // of the running thread, within its block
// The fp16 (or bf16) value in the low 16 bits of `bits`.
float half_bits(uint32_t bits, bool bf16);
// Suspends the running thread until ready() holds (the scheduler polls it); `what` names the
// wait in a deadlock report.
void wait_until(const char* what, std::function<bool()> ready);
// Generic-proxy writes to shared memory (cp.async) the running thread has waited for: marked as
// fenced (fence.proxy.async), so the barrier that publishes them leaves them readable by wgmma.
void fence_proxy_async();
// Whether [addr, addr + bytes) holds generic-proxy writes published without that fence.
bool generic_dirty(uint32_t addr, size_t bytes);
// [addr, addr + bytes) written through the async proxy (a TMA copy).
void async_written(uint32_t addr, size_t bytes);

// simt_hopper.cpp: reset per block; at the block's end, what is still in flight (wgmma groups
// not waited for, TMA copies not landed) as an error message, or "".
void hopper_block_begin(int nthreads);
std::string hopper_block_end();

}  // namespace simt
