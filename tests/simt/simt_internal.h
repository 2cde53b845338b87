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

// Fragment layouts of mma.sync m16n8 per warp (wgmma repeats them in each warp of a warpgroup):
// 16-bit A register j of `lane` holds (row, col) and (row, col + 1) of the 16 x 16 A tile;
// accumulator r (0..3) of `lane` is (row, col) of the 16 x 8 D tile.
inline void frag_a16(int lane, int j, int& row, int& col) {
  row = lane / 4 + 8 * (j & 1);
  col = 2 * (lane % 4) + 8 * (j >> 1);
}
inline void frag_d(int lane, int r, int& row, int& col) {
  row = lane / 4 + 8 * (r / 2);
  col = 2 * (lane % 4) + (r & 1);
}
// mma.sp::ordered_metadata (m16n8k32 16-bit: thread pair `sel` of each quad; m16n8k64 s8: all
// four threads, sel 0): the lane whose metadata register holds row r16 (0..15), 4-wide chunk q,
// and the nibble index in it.
inline void meta_slot(bool s8, int sel, int r16, int q, int& lane, int& nib) {
  const int g = r16 % 8, half = r16 / 8;
  if (s8) {
    lane = 4 * g + half + 2 * (q / 8);
    nib = q % 8;
  } else {
    lane = 4 * g + 2 * sel + q / 4;
    nib = q % 4 + 4 * half;
  }
}
// The two ordered indices (i0 < i1, else the launch fails) of nibble `nib` of `word`.
void nibble(uint32_t word, int nib, int& i0, int& i1);
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
