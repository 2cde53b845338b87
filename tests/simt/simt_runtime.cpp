// SIMT emulator runtime (see simt.h): the fiber scheduler, barriers, warp-wide exchange,
// cp.async groups, the PTX instruction models, and the CUDA runtime calls the launchers make,
// answered for one emulated GPU (configurable through simt_configure). Also counts the
// shared-memory wavefronts of the modelled warp-wide accesses (bank conflicts: simt_bank_stat).
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <map>
#include <set>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "simt_internal.h"

namespace simt {
namespace {

constexpr size_t kStackBytes = 512 * 1024;
enum Wait { kNone = 0, kBlockBar = 1, kWarpBar = 2, kCond = 3 };

struct Copy {
  uint32_t dst;
  const void* src;
  bool valid;
  bool fenced;  // fence.proxy.async by the issuing thread after the wait, before the barrier
};

struct Fiber {
  ucontext_t ctx;
  void* stack = nullptr;
  ThreadState st{};
  bool done = false;
  Wait wait = kNone;
  uint64_t gen = 0;
  std::function<bool()> ready;  // kCond: runnable again once this holds
  const char* what = nullptr;   // kCond: the instruction waited in (deadlock report)
  std::vector<std::vector<Copy>> groups;  // committed cp.async groups, oldest first
  std::vector<Copy> open;                 // issued, not yet committed
  std::vector<Copy> landed;               // waited for, not yet published by a barrier
  // cp.async issued since the warp's last rendezvous, for the bank-conflict and sector counts of
  // each warp-level instruction (flush_cp_log).
  struct CpLog {
    const void* site;
    uint32_t dst;
    uintptr_t src;  // 0: zero-fill (src-size 0), nothing read
  };
  std::vector<CpLog> cp_log;
};

struct WarpSync {
  uint64_t gen = 0;
  int arrived = 0, live = 32;
  const char* tag[2] = {nullptr, nullptr};
  WarpCompute compute = nullptr;
  const void* ctx = nullptr;
  unsigned char in[2][32][64];
  unsigned char out[2][32][64];
};

struct Device {
  int major = 8, minor = 0, sms = 108, smem_optin = 166912;
};

Device g_dev;
std::mutex g_launch_mutex;
std::vector<Fiber> g_fibers;
std::vector<WarpSync> g_warps;
std::vector<unsigned char> g_smem;
size_t g_smem_bytes = 0;
ucontext_t g_sched;
Fiber* g_cur = nullptr;
const std::function<void()>* g_body = nullptr;
uint3 g_bid;
dim3 g_bdim, g_gdim;
int g_live = 0, g_bar_arrived = 0, g_or_acc = 0, g_or_res[2] = {0, 0};
uint64_t g_bar_gen = 0;
bool g_failed = false;
std::string g_error;
cudaError_t g_last = cudaSuccess;
int g_current_device = 0;
std::set<void*> g_poisoned;   // static __shared__ arrays poisoned in this block
size_t g_static_smem = 0;
std::map<const void*, int> g_smem_optin;  // kernel -> cudaFuncAttributeMaxDynamicSharedMemorySize
// Per 16-byte chunk of shared memory: last written through the generic proxy (a cp.async) without
// the writer's fence.proxy.async before the barrier that published it; wgmma must not read it.
std::vector<unsigned char> g_generic_dirty;

// ---- shared-memory bank conflicts ----------------------------------------------------------------
// The hardware serves a shared access in wavefronts: 32 banks of 4 bytes, one word per bank per
// wavefront, identical words broadcast. A 16-byte-per-lane access (ldmatrix row, cp.async) goes
// in phases of 8 lanes; a phase needs as many wavefronts as the most distinct words any one bank
// holds (1 = conflict-free, the ideal). Totals per instruction, since load or simt_bank_reset.
struct BankStat {
  const char* tag;
  long long phases = 0, wavefronts = 0, ideal = 0;
  std::string example;  // the first conflicting phase, for the report
};
std::vector<BankStat> g_bank;

BankStat& bank_stat(const char* tag) {
  for (BankStat& b : g_bank)
    if (std::strcmp(b.tag, tag) == 0) return b;
  g_bank.push_back(BankStat{tag});
  return g_bank.back();
}

// Adds one measurement (units used, ideal) to `tag`'s totals. Returns the stat when this is the
// first one over its ideal (the caller then writes the example: formatting only then), else null.
BankStat* record(const char* tag, long long used, long long ideal) {
  BankStat& b = bank_stat(tag);
  ++b.phases;
  b.wavefronts += used;
  b.ideal += ideal;
  return used > ideal && b.example.empty() ? &b : nullptr;
}
// "<head> block (x, y, z) warp w<tail>:" then the n addresses less `base`.
template <typename Addr>
std::string example(const std::string& head, int warp, const std::string& tail, const Addr* addr, int n, Addr base) {
  std::string e = head + ", block (" + std::to_string(g_bid.x) + ", " + std::to_string(g_bid.y) + ", " +
                  std::to_string(g_bid.z) + ") warp " + std::to_string(warp) + tail + ":";
  for (int i = 0; i < n; ++i) e += " " + std::to_string(addr[i] - base);
  return e;
}

// One phase: the 16-byte shared rows of up to 8 lanes (n of them), from warp `warp`.
void bank_phase(const char* tag, const uint32_t* addr, int n, int warp, int phase) {
  if (n == 0) return;
  uint32_t words[32];
  int nw = 0;
  for (int i = 0; i < n; ++i)
    for (uint32_t w = addr[i] / 4; w < addr[i] / 4 + 4; ++w) words[nw++] = w;
  std::sort(words, words + nw);
  nw = static_cast<int>(std::unique(words, words + nw) - words);
  int per_bank[32] = {}, waves = 0;
  for (int i = 0; i < nw; ++i) waves = std::max(waves, ++per_bank[words[i] % 32]);
  if (BankStat* b = record(tag, waves, 1))
    b->example = example(std::to_string(waves) + " wavefronts", warp,
                         " phase " + std::to_string(phase) + ", byte addresses", addr, n, 0u);
}

// Global side of one warp cp.async (coalescing): the 32-byte sectors its reading lanes touch,
// against the fewest the same bytes need: each maximal contiguous run of them, ceil(bytes / 32).
// More means runs that start or end inside a sector (e.g. rows whose stride is not a multiple of
// 32 bytes, or chunk pairs that straddle sectors). Isolated 16-byte reads are not flagged.
void sector_count(const uintptr_t* src, int n, int warp) {
  if (n == 0) return;
  uintptr_t s[32];
  std::copy(src, src + n, s);
  std::sort(s, s + n);
  int used = 0, ideal = 0;
  uintptr_t run_lo = s[0], run_hi = s[0] + 16, last = ~uintptr_t{0};  // run [lo, hi); last sector counted
  for (int i = 1; i <= n; ++i) {
    if (i < n && s[i] <= run_hi) {
      run_hi = std::max(run_hi, s[i] + 16);
      continue;
    }
    ideal += static_cast<int>((run_hi - run_lo + 31) / 32);
    const uintptr_t first = run_lo / 32 == last ? last + 1 : run_lo / 32;  // runs ascend: only the
    last = (run_hi - 1) / 32;                                                 // previous one can share
    used += static_cast<int>(last + 1 - first);
    if (i < n) run_lo = s[i], run_hi = s[i] + 16;
  }
  if (BankStat* b = record("cp.async.cg global sectors", used, ideal))
    b->example = example(std::to_string(used) + " sectors for " + std::to_string(n) + " reads", warp,
                         ", byte offsets", src, n, s[0]);
}

// cp.async is issued per thread, but the fibers of a warp run one after another between
// rendezvous, so each lane's log holds its copies since the last one. The k-th copy a lane issued
// from a call site (the kernel's inlined cp_async_16) belongs to the same warp instruction as the
// k-th of the other lanes from that site: that is how the kernels here issue them (uniform loops;
// invalid rows zero-filled, not skipped). Counted in phases of lanes 0-7, 8-15, ...
void flush_cp_log(int warp) {
  struct Inst {
    uint32_t addr[32], lanes = 0;
    uintptr_t src[32];
  };
  std::map<std::pair<const void*, int>, Inst> insts;
  for (int lane = 0; lane < 32; ++lane) {
    auto& log = g_fibers[32 * warp + lane].cp_log;
    if (log.empty()) continue;
    std::map<const void*, int> seen;
    for (const auto& e : log) {
      auto& in = insts[{e.site, seen[e.site]++}];
      in.addr[lane] = e.dst;
      in.src[lane] = e.src;
      in.lanes |= 1u << lane;
    }
    log.clear();
  }
  for (const auto& kv : insts) {
    for (int p = 0; p < 4; ++p) {
      uint32_t addr[8];
      int n = 0;
      for (int l = 8 * p; l < 8 * p + 8; ++l)
        if (kv.second.lanes >> l & 1) addr[n++] = kv.second.addr[l];
      bank_phase("cp.async.cg", addr, n, warp, p);
    }
    uintptr_t src[32];
    int n = 0;
    for (int l = 0; l < 32; ++l)
      if ((kv.second.lanes >> l & 1) && kv.second.src[l] != 0) src[n++] = kv.second.src[l];
    sector_count(src, n, warp);
  }
}
void flush_cp_logs() {
  for (size_t w = 0; w < g_warps.size(); ++w) flush_cp_log(static_cast<int>(w));
}

bool env_is_reverse() {
  const char* e = std::getenv("FASTLLM_SIMT_ORDER");
  return e != nullptr && std::strcmp(e, "reverse") == 0;
}

void yield() { swapcontext(&g_cur->ctx, &g_sched); }

void complete(const Copy& c) {
  unsigned char* d = g_smem.data() + c.dst;
  if (c.valid)
    std::memcpy(d, c.src, 16);
  else
    std::memset(d, 0, 16);
  g_generic_dirty[c.dst / 16] = !c.fenced;
}

// cp.async.wait_group makes the copies visible to the waiting thread; other threads see them
// after a barrier (bar.sync / bar.warp.sync) that follows the wait. Modelled by publishing the
// landed copies when their thread reaches a barrier: a reader that relies on the wait alone
// reads the poison.
void publish_landed() {
  for (const Copy& c : g_cur->landed) complete(c);
  g_cur->landed.clear();
}

// The last live thread reached __syncthreads (or the last one it waited for exited): the warps'
// cp.async since the previous barrier are counted, the OR result published, the waiters freed.
void release_block_barrier() {
  flush_cp_logs();
  g_or_res[g_bar_gen & 1] = g_or_acc;
  g_or_acc = 0;
  g_bar_arrived = 0;
  ++g_bar_gen;
}

void thread_exit() {
  Fiber& f = *g_cur;
  f.done = true;
  --g_live;
  // Exited threads count as arrived at __syncthreads (PTX bar.sync: "all non-exited threads").
  if (g_bar_arrived > 0 && g_bar_arrived == g_live) release_block_barrier();
  WarpSync& w = g_warps[f.st.warp];
  --w.live;
  if (w.arrived > 0) fail("lane %d of warp %d exited while its warp waits in %s", f.st.lane, f.st.warp, w.tag[w.gen & 1]);
}

void fiber_main() {
  (*g_body)();
  thread_exit();
  // returning resumes uc_link (the scheduler)
}

void run_block(int nthreads) {
  g_live = nthreads;
  g_bar_arrived = 0;
  g_or_acc = 0;
  g_warps.assign(nthreads / 32, WarpSync{});
  if (static_cast<int>(g_fibers.size()) < nthreads) g_fibers.resize(nthreads);
  for (int t = 0; t < nthreads; ++t) {
    Fiber& f = g_fibers[t];
    if (!f.stack) {
      f.stack = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (f.stack == MAP_FAILED) throw std::runtime_error("simt: no memory for fiber stacks");
    }
    f.done = false;
    f.wait = kNone;
    f.ready = nullptr;
    f.groups.clear();
    f.open.clear();
    f.landed.clear();
    f.cp_log.clear();
    f.st.tid = make_uint3(t % g_bdim.x, (t / g_bdim.x) % g_bdim.y, t / (g_bdim.x * g_bdim.y));
    f.st.lane = t % 32;
    f.st.warp = t / 32;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &g_sched;
    makecontext(&f.ctx, fiber_main, 0);
  }
  // Warp-greedy schedule: the warps in turn (ascending, or descending with
  // FASTLLM_SIMT_ORDER=reverse), each run until every lane of it waits at __syncthreads or has
  // exited, before the next one starts. A warp thus runs as far ahead of the others as the
  // barriers allow: shared memory another warp still reads, overwritten (or cp.async-poisoned)
  // without a barrier in between, shows as wrong results.
  const int nwarps = nthreads / 32;
  const bool reverse = env_is_reverse();
  for (;;) {
    bool progress = false, all_done = true;
    for (int wi = 0; wi < nwarps && !g_failed; ++wi) {
      const int w = reverse ? nwarps - 1 - wi : wi;
      for (bool ran = true; ran && !g_failed;) {
        ran = false;
        for (int t = 32 * w; t < 32 * w + 32 && !g_failed; ++t) {
          Fiber& f = g_fibers[t];
          if (f.done) continue;
          if (f.wait == kBlockBar && g_bar_gen == f.gen) continue;
          if (f.wait == kWarpBar && g_warps[f.st.warp].gen == f.gen) continue;
          if (f.wait == kCond && !f.ready()) continue;
          f.wait = kNone;
          f.ready = nullptr;
          g_cur = &f;
          swapcontext(&g_sched, &f.ctx);
          g_cur = nullptr;
          ran = progress = true;
        }
      }
    }
    for (int t = 0; t < nthreads; ++t) all_done = all_done && g_fibers[t].done;
    if (g_failed || all_done) return;
    if (!progress) {
      int at_bar = 0, at_warp = 0, at_cond = 0;
      const char* cond = "";
      for (int t = 0; t < nthreads; ++t) {
        const Fiber& f = g_fibers[t];
        at_bar += !f.done && f.wait == kBlockBar;
        at_warp += !f.done && f.wait == kWarpBar;
        if (!f.done && f.wait == kCond) ++at_cond, cond = f.what;
      }
      char buf[320];
      std::snprintf(buf, sizeof buf,
                    "deadlock in block (%u, %u, %u): %d threads at __syncthreads, %d in warp-wide instructions, "
                    "%d waiting in %s, %d exited",
                    g_bid.x, g_bid.y, g_bid.z, at_bar, at_warp, at_cond, at_cond ? cond : "-", nthreads - g_live);
      g_failed = true;
      g_error = buf;
      return;
    }
  }
}

}  // namespace

ThreadState& self() { return g_cur->st; }
int thread_index() { return g_cur->st.warp * 32 + g_cur->st.lane; }

void wait_until(const char* what, std::function<bool()> ready) {
  if (ready()) return;
  g_cur->wait = kCond;
  g_cur->what = what;
  g_cur->ready = std::move(ready);
  yield();
}

void fence_proxy_async() {
  for (Copy& c : g_cur->landed) c.fenced = true;
}
bool generic_dirty(uint32_t addr, size_t bytes) {
  for (uint32_t c = addr / 16; c <= (addr + bytes - 1) / 16; ++c)
    if (g_generic_dirty[c]) return true;
  return false;
}
void async_written(uint32_t addr, size_t bytes) {
  for (uint32_t c = addr / 16; c <= (addr + bytes - 1) / 16; ++c) g_generic_dirty[c] = 0;
}
const uint3& block_idx() { return g_bid; }
const dim3& block_dim() { return g_bdim; }
const dim3& grid_dim() { return g_gdim; }
unsigned char* smem_base() { return g_smem.data(); }
size_t smem_size() { return g_smem_bytes; }

void fail(const char* fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  if (!g_failed) {
    g_failed = true;
    g_error = buf;
    if (g_cur) {
      char where[96];
      std::snprintf(where, sizeof where, " [block (%u, %u, %u), thread %u]", g_bid.x, g_bid.y, g_bid.z,
                    thread_index());
      g_error += where;
    }
  }
  if (!g_cur) throw std::runtime_error(buf);
  setcontext(&g_sched);  // abandon this fiber; the scheduler sees g_failed
  std::abort();
}

void poison_once(void* p, size_t bytes) {
  if (!g_poisoned.insert(p).second) return;
  std::memset(p, 0xFF, bytes);
  g_static_smem += bytes;
  if (g_static_smem > 48 * 1024) fail("static shared memory above 48 KB (%zu bytes)", g_static_smem);
  if (g_static_smem + g_smem_bytes > static_cast<size_t>(g_dev.smem_optin))
    fail("static + dynamic shared memory (%zu + %zu bytes) above the device's limit", g_static_smem, g_smem_bytes);
}

int syncthreads_or(int pred) {
  publish_landed();
  const uint64_t g = g_bar_gen;
  g_or_acc |= pred != 0;
  if (++g_bar_arrived == g_live) {
    release_block_barrier();
  } else {
    g_cur->wait = kBlockBar;
    g_cur->gen = g;
    yield();
  }
  return g_or_res[g & 1];
}

void syncthreads() { syncthreads_or(0); }

void warp_exchange(const char* tag, const void* in, size_t in_bytes, void* out, size_t out_bytes,
                   WarpCompute compute, const void* ctx) {
  Fiber& f = *g_cur;
  WarpSync& w = g_warps[f.st.warp];
  if (w.live != 32) fail("warp-wide %s with %d of 32 lanes live (the others exited)", tag, w.live);
  const int par = w.gen & 1;
  if (w.arrived == 0) {
    w.tag[par] = tag;
    w.compute = compute;
    w.ctx = ctx;
  } else if (std::strcmp(w.tag[par], tag) != 0) {
    fail("lanes of warp %d are in different warp-wide instructions: %s and %s", f.st.warp, w.tag[par], tag);
  }
  std::memcpy(w.in[par][f.st.lane], in, in_bytes);
  if (++w.arrived == 32) {
    flush_cp_log(f.st.warp);
    w.compute(w.in[par], w.out[par], w.ctx);
    w.arrived = 0;
    ++w.gen;
  } else {
    f.wait = kWarpBar;
    f.gen = w.gen;
    yield();
  }
  std::memcpy(out, w.out[par][f.st.lane], out_bytes);
}

void syncwarp() {
  publish_landed();
  int dummy = 0;
  warp_exchange("bar.warp.sync", &dummy, sizeof(dummy), &dummy, sizeof(dummy),
                [](const unsigned char (*)[64], unsigned char (*)[64], const void*) {});
}

void cp_async_issue(uint32_t dst, const void* src, bool valid) {
  unsigned char* d = smem_at<unsigned char>(dst, 16, 16, "cp.async");
  if (valid && reinterpret_cast<uintptr_t>(src) % 16) fail("cp.async: global source %p not 16-byte aligned", src);
  std::memset(d, 0xFF, 16);  // undefined until the wait: reads as NaN / -1
  g_cur->open.push_back({dst, src, valid, false});
}
void cp_async_commit() {
  g_cur->groups.push_back(std::move(g_cur->open));
  g_cur->open.clear();
}
void cp_async_wait(int n) {
  auto& gs = g_cur->groups;
  const size_t keep = static_cast<size_t>(n);
  size_t drop = gs.size() > keep ? gs.size() - keep : 0;
  for (size_t i = 0; i < drop; ++i)
    for (const Copy& c : gs[i]) g_cur->landed.push_back(c);
  gs.erase(gs.begin(), gs.begin() + drop);
}

// A fault inside a kernel (tests put buffers against PROT_NONE pages: backend.guarded) fails the
// launch with its address instead of killing the process.
void on_segv(int, siginfo_t* info, void*) {
  if (g_cur == nullptr || g_failed) {
    signal(SIGSEGV, SIG_DFL);
    return;  // re-executes the faulting access under the default action
  }
  char buf[160];
  std::snprintf(buf, sizeof buf, "invalid memory access at %p (past a guarded buffer?)", info->si_addr);
  g_failed = true;
  g_error = buf;
  char where[96];
  std::snprintf(where, sizeof where, " [block (%u, %u, %u), thread %u]", g_bid.x, g_bid.y, g_bid.z,
                thread_index());
  g_error += where;
  setcontext(&g_sched);
}

void launch_grid(const void* kernel, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  struct sigaction sa {}, old {};
  sa.sa_sigaction = on_segv;
  sa.sa_flags = SA_SIGINFO | SA_NODEFER;
  sigaction(SIGSEGV, &sa, &old);
  struct Restore {
    struct sigaction* old;
    ~Restore() { sigaction(SIGSEGV, old, nullptr); }
  } restore{&old};
  const long long threads = 1LL * block.x * block.y * block.z;
  auto bad = [&](cudaError_t code, const std::string& why) {
    g_last = code;
    g_error = "launch: " + why;
  };
  if (threads < 1 || threads > 1024 || block.z > 64) return bad(cudaErrorInvalidConfiguration, "bad block shape");
  if (threads % 32) return bad(cudaErrorInvalidConfiguration, "block not a multiple of 32 threads (not modelled)");
  if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.y > 65535 || grid.z > 65535 || grid.x > 2147483647u)
    return bad(cudaErrorInvalidConfiguration, "bad grid shape");
  if (smem > 48 * 1024) {
    auto it = g_smem_optin.find(kernel);
    if (it == g_smem_optin.end() || static_cast<size_t>(it->second) < smem)
      return bad(cudaErrorInvalidValue, std::to_string(smem) + " bytes of dynamic shared memory without the opt-in");
  }
  if (smem > static_cast<size_t>(g_dev.smem_optin))
    return bad(cudaErrorInvalidValue, "dynamic shared memory above the device's limit");
  g_gdim = grid;
  g_bdim = block;
  g_body = &body;
  g_failed = false;
  g_error.clear();
  g_smem_bytes = smem;
  g_smem.assign(smem + 16, 0xFF);  // uninitialised shared memory reads as NaN / -1
  for (unsigned z = 0; z < grid.z && !g_failed; ++z)
    for (unsigned y = 0; y < grid.y && !g_failed; ++y)
      for (unsigned x = 0; x < grid.x && !g_failed; ++x) {
        g_bid = make_uint3(x, y, z);
        std::fill(g_smem.begin(), g_smem.end(), 0xFF);
        g_poisoned.clear();
        g_static_smem = 0;
        g_generic_dirty.assign(g_smem.size() / 16 + 1, 0);
        hopper_block_begin(static_cast<int>(threads));
        run_block(static_cast<int>(threads));
        flush_cp_logs();
        if (!g_failed) {
          const std::string left = hopper_block_end();
          if (!left.empty()) {
            g_failed = true;
            char where[64];
            std::snprintf(where, sizeof where, " [block (%u, %u, %u)]", x, y, z);
            g_error = left + where;
          }
        }
      }
  if (g_failed) g_last = cudaErrorLaunchFailure;
}

float half_bits(uint32_t bits, bool bf16) {
  const uint16_t h = static_cast<uint16_t>(bits);
  if (bf16) {
    const uint32_t f = static_cast<uint32_t>(h) << 16;
    float r;
    std::memcpy(&r, &f, 4);
    return r;
  }
  __half x;
  std::memcpy(&x, &h, 2);
  return __half2float(x);
}

// mma.sp::ordered_metadata nibble: two ordered indices i0 < i1 in a 4-wide chunk.
void nibble(uint32_t word, int nib, int& i0, int& i1) {
  const int v = (word >> (4 * nib)) & 0xF;
  i0 = v & 3;
  i1 = v >> 2;
  if (!(i0 < i1)) fail("mma.sp: metadata nibble %#x is undefined with ordered_metadata", v);
}

// ---- PTX instruction models --------------------------------------------------------------------
namespace ptx {
namespace {

using Regs = uint32_t[4];
float lo16(uint32_t r, bool bf16) { return half_bits(r & 0xFFFF, bf16); }
float hi16(uint32_t r, bool bf16) { return half_bits(r >> 16, bf16); }
int s8(uint32_t r, int i) { return static_cast<int8_t>(static_cast<uint8_t>(r >> (8 * i))); }

// Dense A (16 x K) / B (K x 8) of one warp, float or int, and the D fragment store.
template <typename Acc>
void store_d(unsigned char (*outs)[64], const Acc (&D)[16][8], const unsigned char (*ins)[64]) {
  for (int lane = 0; lane < 32; ++lane) {
    Acc d[4];
    std::memcpy(d, ins[lane], sizeof d);  // C operand (accumulated in place)
    for (int r = 0; r < 4; ++r) {
      int row, col;
      frag_d(lane, r, row, col);
      d[r] = D[row][col] + d[r];
    }
    std::memcpy(outs[lane], d, sizeof d);
  }
}

// D = A (16 x K) * B (K x 8) of one warp: the products summed exactly (double for 16-bit
// floats, int64 for s8) and rounded once to fp32, or wrapped to s32 (uint32_t bits).
template <int K, typename In, typename Out>
void matmul_16x8(const In (&A)[16][K], const In (&B)[K][8], Out (&D)[16][8]) {
  using Wide = std::conditional_t<std::is_floating_point<In>::value, double, int64_t>;
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 8; ++n) {
      Wide s = 0;
      for (int k = 0; k < K; ++k) s += static_cast<Wide>(A[m][k]) * B[k][n];
      D[m][n] = static_cast<Out>(s);
    }
}

// Per-lane operand record of a dense or sparse mma: c (4 x 32 bits), a (4), b (up to 4), e.
struct MmaIn {
  uint32_t c[4], a[4], b[4], e;
  int sel;
};

template <bool BF16>
void mma_f16_compute(const unsigned char (*ins)[64], unsigned char (*outs)[64], const void*) {
  float A[16][16], B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    MmaIn in;
    std::memcpy(&in, ins[lane], sizeof in);
    const int g = lane >> 2, c = lane & 3;
    for (int j = 0; j < 4; ++j) {   // a[j]: row g + 8 (j & 1), columns 2c + 8 (j >> 1) + {0, 1}
      int row, col;
      frag_a16(lane, j, row, col);
      A[row][col] = lo16(in.a[j], BF16);
      A[row][col + 1] = hi16(in.a[j], BF16);
    }
    for (int i = 0; i < 2; ++i) {   // b[i]: k = 2c + 8i + {0, 1}, n = g
      B[2 * c + 8 * i][g] = lo16(in.b[i], BF16);
      B[2 * c + 8 * i + 1][g] = hi16(in.b[i], BF16);
    }
  }
  float D[16][8];
  matmul_16x8(A, B, D);
  store_d(outs, D, ins);
}

void mma_s8_compute(const unsigned char (*ins)[64], unsigned char (*outs)[64], const void*) {
  int A[16][32], B[32][8];
  for (int lane = 0; lane < 32; ++lane) {
    MmaIn in;
    std::memcpy(&in, ins[lane], sizeof in);
    const int g = lane >> 2, c = lane & 3;
    for (int j = 0; j < 4; ++j)   // a[j]: row g + 8 (j & 1), k = 4c + 16 (j >> 1) + 0..3
      for (int i = 0; i < 4; ++i) A[g + 8 * (j & 1)][4 * c + 16 * (j >> 1) + i] = s8(in.a[j], i);
    for (int r = 0; r < 2; ++r)   // b[r]: k = 4c + 16 r + 0..3, n = g
      for (int i = 0; i < 4; ++i) B[4 * c + 16 * r + i][g] = s8(in.b[r], i);
  }
  uint32_t D[16][8];
  matmul_16x8(A, B, D);
  store_d(outs, D, ins);
}

template <bool BF16>
void mma_sp_f16_compute(const unsigned char (*ins)[64], unsigned char (*outs)[64], const void*) {
  float A[16][32] = {}, B[32][8];
  MmaIn in[32];
  for (int lane = 0; lane < 32; ++lane) std::memcpy(&in[lane], ins[lane], sizeof(MmaIn));
  const int sel = in[0].sel;
  if (sel != 0 && sel != 1) fail("mma.sp m16n8k32: sparsity selector %d", sel);
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int j = 0; j < 4; ++j) {   // 2 non-zeros of row g + 8 (j & 1), chunk t + 4 (j >> 1)
      const int row = g + 8 * (j & 1), chunk = t + 4 * (j >> 1);
      int i0, i1, src, nib;
      meta_slot(false, sel, row, chunk, src, nib);
      nibble(in[src].e, nib, i0, i1);
      A[row][4 * chunk + i0] = lo16(in[lane].a[j], BF16);
      A[row][4 * chunk + i1] = hi16(in[lane].a[j], BF16);
    }
    for (int i = 0; i < 4; ++i) {   // b[i]: k = 2t + 8i + {0, 1}, n = g
      B[2 * t + 8 * i][g] = lo16(in[lane].b[i], BF16);
      B[2 * t + 8 * i + 1][g] = hi16(in[lane].b[i], BF16);
    }
  }
  float D[16][8];
  matmul_16x8(A, B, D);
  store_d(outs, D, ins);
}

void mma_sp_s8_compute(const unsigned char (*ins)[64], unsigned char (*outs)[64], const void*) {
  int A[16][64] = {}, B[64][8];
  MmaIn in[32];
  for (int lane = 0; lane < 32; ++lane) std::memcpy(&in[lane], ins[lane], sizeof(MmaIn));
  if (in[0].sel != 0) fail("mma.sp m16n8k64 s8: sparsity selector %d (must be 0)", in[0].sel);
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int j = 0; j < 4; ++j) {   // 4 non-zeros (2 chunks) of row g + 8 (j & 1), cols 8t + 32 (j >> 1)..
      const int row = g + 8 * (j & 1), col0 = 8 * t + 32 * (j >> 1);
      for (int h = 0; h < 2; ++h) {
        int i0, i1, src, nib;
        meta_slot(true, 0, row, col0 / 4 + h, src, nib);
        nibble(in[src].e, nib, i0, i1);
        A[row][col0 + 4 * h + i0] = s8(in[lane].a[j], 2 * h);
        A[row][col0 + 4 * h + i1] = s8(in[lane].a[j], 2 * h + 1);
      }
    }
    for (int i = 0; i < 4; ++i)   // b[i]: k = 4t + 16i + 0..3, n = g
      for (int k = 0; k < 4; ++k) B[4 * t + 16 * i + k][g] = s8(in[lane].b[i], k);
  }
  uint32_t D[16][8];
  matmul_16x8(A, B, D);
  store_d(outs, D, ins);
}

template <typename Acc>
void run_mma(const char* tag, Acc& d0, Acc& d1, Acc& d2, Acc& d3, const uint32_t (&a)[4], const uint32_t* b,
             int nb, uint32_t e, int sel, WarpCompute compute) {
  MmaIn in{};
  const Acc c[4] = {d0, d1, d2, d3};
  std::memcpy(in.c, c, sizeof c);
  std::memcpy(in.a, a, sizeof in.a);
  std::memcpy(in.b, b, nb * sizeof(uint32_t));
  in.e = e;
  in.sel = sel;
  Acc d[4];
  static_assert(sizeof(MmaIn) <= 64, "operand record fits the exchange slot");
  // The C operand rides at the front of the record: store_d reads it from there.
  warp_exchange(tag, &in, sizeof in, d, sizeof d, compute);
  d0 = d[0], d1 = d[1], d2 = d[2], d3 = d[3];
}

void ldmatrix_compute(const unsigned char (*ins)[64], unsigned char (*outs)[64], bool trans) {
  uint32_t addr[32];
  for (int l = 0; l < 32; ++l) std::memcpy(&addr[l], ins[l], 4);
  uint32_t r[32][4];
  for (int j = 0; j < 4; ++j) {
    bank_phase(trans ? "ldmatrix.x4.trans" : "ldmatrix.x4", addr + 8 * j, 8, self().warp, j);
    const uint16_t* rows[8];
    for (int i = 0; i < 8; ++i) rows[i] = smem_at<const uint16_t>(addr[8 * j + i], 16, 16, "ldmatrix");
    for (int lane = 0; lane < 32; ++lane) {
      const int row = lane >> 2, c = lane & 3;
      const uint16_t lo = trans ? rows[2 * c][row] : rows[row][2 * c];
      const uint16_t hi = trans ? rows[2 * c + 1][row] : rows[row][2 * c + 1];
      r[lane][j] = lo | static_cast<uint32_t>(hi) << 16;
    }
  }
  for (int l = 0; l < 32; ++l) std::memcpy(outs[l], r[l], sizeof r[l]);
}

void ldmatrix(const char* tag, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, uint32_t addr, bool trans) {
  uint32_t r[4];
  warp_exchange(tag, &addr, 4, r, sizeof r,
                trans ? WarpCompute([](const unsigned char (*i)[64], unsigned char (*o)[64], const void*) {
                  ldmatrix_compute(i, o, true);
                })
                      : WarpCompute([](const unsigned char (*i)[64], unsigned char (*o)[64], const void*) {
                          ldmatrix_compute(i, o, false);
                        }));
  r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
}

}  // namespace

void cp_async_cg_shared_global(uint32_t dst, const void* src, int cp_size, int src_size) {
  if (cp_size != 16 || (src_size != 0 && src_size != 16)) fail("cp.async.cg: sizes %d / %d not modelled", cp_size, src_size);
  cp_async_issue(dst, src, src_size == 16);
  // The call site names the instruction (the kernels' cp_async_16 is force-inlined).
  g_cur->cp_log.push_back({__builtin_return_address(0), dst, src_size ? reinterpret_cast<uintptr_t>(src) : 0});
}
void cp_async_commit_group() { cp_async_commit(); }
void cp_async_wait_group(int n) { cp_async_wait(n); }

void ldmatrix_sync_aligned_m8n8_x4_shared_b16(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, uint32_t addr) {
  ldmatrix("ldmatrix.x4", r0, r1, r2, r3, addr, false);
}
void ldmatrix_sync_aligned_m8n8_x4_trans_shared_b16(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3,
                                                     uint32_t addr) {
  ldmatrix("ldmatrix.x4.trans", r0, r1, r2, r3, addr, true);
}

void mma_sync_aligned_m16n8k16_row_col_f32_f16_f16_f32(float& d0, float& d1, float& d2, float& d3, uint32_t a0,
                                                      uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                                      uint32_t b1) {
  const uint32_t a[4] = {a0, a1, a2, a3}, b[2] = {b0, b1};
  run_mma("mma.m16n8k16.f16", d0, d1, d2, d3, a, b, 2, 0, 0, mma_f16_compute<false>);
}
void mma_sync_aligned_m16n8k16_row_col_f32_bf16_bf16_f32(float& d0, float& d1, float& d2, float& d3, uint32_t a0,
                                                        uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                                        uint32_t b1) {
  const uint32_t a[4] = {a0, a1, a2, a3}, b[2] = {b0, b1};
  run_mma("mma.m16n8k16.bf16", d0, d1, d2, d3, a, b, 2, 0, 0, mma_f16_compute<true>);
}
void mma_sync_aligned_m16n8k32_row_col_s32_s8_s8_s32(int& d0, int& d1, int& d2, int& d3,
                                                    uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                                    uint32_t b1) {
  const uint32_t a[4] = {a0, a1, a2, a3}, b[2] = {b0, b1};
  run_mma("mma.m16n8k32.s8", d0, d1, d2, d3, a, b, 2, 0, 0, mma_s8_compute);
}
void mma_sp_ordered_metadata_sync_aligned_m16n8k32_row_col_f32_f16_f16_f32(
    float& d0, float& d1, float& d2, float& d3, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
    uint32_t b1, uint32_t b2, uint32_t b3, uint32_t e, int sel) {
  const uint32_t a[4] = {a0, a1, a2, a3}, b[4] = {b0, b1, b2, b3};
  run_mma("mma.sp.m16n8k32.f16", d0, d1, d2, d3, a, b, 4, e, sel, mma_sp_f16_compute<false>);
}
void mma_sp_ordered_metadata_sync_aligned_m16n8k32_row_col_f32_bf16_bf16_f32(
    float& d0, float& d1, float& d2, float& d3, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
    uint32_t b1, uint32_t b2, uint32_t b3, uint32_t e, int sel) {
  const uint32_t a[4] = {a0, a1, a2, a3}, b[4] = {b0, b1, b2, b3};
  run_mma("mma.sp.m16n8k32.bf16", d0, d1, d2, d3, a, b, 4, e, sel, mma_sp_f16_compute<true>);
}
void mma_sp_ordered_metadata_sync_aligned_m16n8k64_row_col_s32_s8_s8_s32(
    int& d0, int& d1, int& d2, int& d3, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
    uint32_t b0, uint32_t b1, uint32_t b2, uint32_t b3, uint32_t e, int sel) {
  const uint32_t a[4] = {a0, a1, a2, a3}, b[4] = {b0, b1, b2, b3};
  run_mma("mma.sp.m16n8k64.s8", d0, d1, d2, d3, a, b, 4, e, sel, mma_sp_s8_compute);
}

}  // namespace ptx
}  // namespace simt

// ---- the CUDA runtime calls of the launchers and bindings, for the emulated device -------------
extern "C" {

// Bank-conflict totals of instruction i (0, 1, ... while it returns 1): counts = phases,
// wavefronts, ideal wavefronts; example = the first conflicting phase, or "".
int simt_bank_stat(int i, const char** tag, long long* counts, const char** example) {
  if (i < 0 || i >= static_cast<int>(simt::g_bank.size())) return 0;
  const simt::BankStat& b = simt::g_bank[i];
  *tag = b.tag;
  counts[0] = b.phases, counts[1] = b.wavefronts, counts[2] = b.ideal;
  *example = b.example.c_str();
  return 1;
}
void simt_bank_reset() { simt::g_bank.clear(); }

void simt_configure(int major, int minor, int sms, int smem_optin) {
  simt::g_dev = simt::Device{major, minor, sms, smem_optin};
}

cudaError_t cudaGetDevice(int* d) {
  *d = simt::g_current_device;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int d) {
  if (d != 0) return cudaErrorInvalidDevice;
  simt::g_current_device = d;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
cudaError_t cudaGetLastError() {
  const cudaError_t e = simt::g_last;
  simt::g_last = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return simt::g_last; }
const char* cudaGetErrorString(cudaError_t e) {
  static thread_local std::string s;
  if (e == cudaSuccess) return "no error";
  s = "simt emulator: " + (simt::g_error.empty() ? std::string("error ") + std::to_string(e) : simt::g_error);
  return s.c_str();
}
cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = CUDART_VERSION;
  return cudaSuccess;
}
cudaError_t cudaDriverGetVersion(int* v) {
  *v = CUDART_VERSION;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  switch (a) {
    case cudaDevAttrComputeCapabilityMajor: *v = simt::g_dev.major; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *v = simt::g_dev.minor; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *v = simt::g_dev.sms; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = simt::g_dev.smem_optin; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  *p = cudaDeviceProp{};
  std::snprintf(p->name, sizeof p->name, "simt emulator (sm_%d%d)", simt::g_dev.major, simt::g_dev.minor);
  p->major = simt::g_dev.major;
  p->minor = simt::g_dev.minor;
  p->multiProcessorCount = simt::g_dev.sms;
  p->sharedMemPerBlockOptin = simt::g_dev.smem_optin;
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value > simt::g_dev.smem_optin) return cudaErrorInvalidValue;
  simt::g_smem_optin[func] = value;
  return cudaSuccess;
}
}
