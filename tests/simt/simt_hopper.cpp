// SIMT emulator, Hopper instructions (see simt.h): warpgroup MMA (wgmma.mma_async, dense and
// sparse, shared-memory descriptors with the 128-byte swizzle), its fence / commit / wait,
// fence.proxy.async, mbarrier, the 2-D TMA tile load, and the driver's cuTensorMapEncodeTiled
// (reached through cudaGetDriverEntryPointByVersion, as the launchers do).
//
// The asynchrony is modelled so that a missing wait shows:
//   * a wgmma does nothing when issued: each thread records its operands (the accumulator
//     registers' addresses, its A registers, descriptors, metadata). wgmma.wait_group is a
//     warpgroup rendezvous; the last thread to arrive executes the groups it retires, reading
//     shared memory then (an operand overwritten before the wait shows) and writing the
//     accumulators back only once no unretired op still owns them (a read before the wait sees
//     the old values; a write between issue and wait is lost).
//   * a TMA copy poisons its destination (0xFF) when issued and lands only when a thread waits
//     on its mbarrier (try_wait), so a consumer that reads without waiting reads NaN / -1.
// Checks beyond values: wgmma without a wgmma.fence since the thread's last wait_group (or
// first use); shared memory a cp.async wrote, read by wgmma without the writer's
// fence.proxy.async before the publishing barrier; descriptors that are not the canonical
// 128-byte-swizzled layouts modelled here, or that differ across the warpgroup; threads of a
// warpgroup issuing different sequences; a block ending with wgmma groups not waited for or TMA
// copies in flight; mbarrier use before init, arrivals beyond the expected count; tensor maps
// the driver would refuse.
//
// Layouts (PTX ISA, "asynchronous warpgroup level matrix shared memory layout"; 128-byte
// swizzle: byte address bits 4-6 ^= bits 7-9, so tiles start 1024-byte aligned):
//   K-major (A, or B with imm-trans-b 0): row r (M or N index) at (r % 8) * 128 + (r / 8) * SBO,
//     the operand's K bytes inside that 128-byte row from the start address;
//   MN-major (16-bit B with imm-trans-b 1): element (k, n) at (n % 64) * 2 + (n / 64) * LBO +
//     (k % 8) * 128 + (k / 8) * SBO.
// Register fragments: accumulators of warp w (of the warpgroup) hold rows 16w..16w+15 in the
// mma.sync m16n8 D layout, repeated over N / 8 column tiles; the rs form's A registers are the
// mma.sync m16n8k16 A fragment of those rows; wgmma.sp's metadata follows mma.sp's per warp
// (ordered_metadata: m16n8k32 for 16-bit types, m16n8k64 for s8).
#include <cuda.h>
#include <cudaTypedefs.h>

#include <cstdio>
#include <map>
#include <set>
#include <vector>

#include "simt_internal.h"

namespace simt {
using ptx::kWgBF16;
using ptx::kWgF16;
using ptx::kWgS8;
using ptx::WgType;
namespace {

struct WgOp {
  int n, k;
  WgType type;
  bool sparse, a_regs, trans_b, scale_d;
  uint64_t da, db;
  uint32_t a[4], meta;
  int sel;
  std::vector<void*> d;
};

struct WgThread {
  bool fenced = false;
  int wait_n = 0;
  std::vector<WgOp> open;
  std::vector<std::vector<WgOp>> groups;  // committed, oldest first
  std::map<void*, uint32_t> inflight;     // accumulators owned by unretired ops: their value so far
};

struct Rendezvous {
  uint64_t gen = 0;
  int arrived = 0;
};

struct TmaCopy {
  uint32_t dst;
  const unsigned char* base;
  uint64_t dims[2], stride;
  uint32_t box[2], esize;
  bool swizzle128;
  int c0, c1;
};

struct Mbar {
  uint32_t count = 0;
  int pending = 0;
  int64_t tx = 0;
  uint64_t phase = 0;  // completed phases
  std::vector<TmaCopy> copies;
};

// What cuTensorMapEncodeTiled writes into the opaque CUtensorMap here.
struct MapDesc {
  uint64_t magic;
  const unsigned char* base;
  uint64_t dims[2], stride;
  uint32_t box[2], esize, swizzle128;
};
constexpr uint64_t kMapMagic = 0x73696d74544d4150ull;  // "simtTMAP"
static_assert(sizeof(MapDesc) <= sizeof(CUtensorMap), "fits the opaque map");

std::vector<WgThread> g_wg;
std::vector<Rendezvous> g_rdv;  // per warpgroup
std::map<uint32_t, Mbar> g_mbars;
int g_threads = 0;
// Executed since load, for the tests to see that the Hopper path ran (simt_hopper_counts).
long long g_wgmma_executed = 0, g_tma_landed = 0;

// ---- wgmma ---------------------------------------------------------------------------------

struct Desc {
  uint32_t start, lbo, sbo;
};

uint32_t swz128(uint32_t a) { return a ^ (((a >> 7) & 7u) << 4); }

Desc decode(uint64_t d, bool mn_major, int kbytes, const char* which) {
  const Desc r{static_cast<uint32_t>(d & 0x3FFF) << 4, static_cast<uint32_t>((d >> 16) & 0x3FFF) << 4,
               static_cast<uint32_t>((d >> 32) & 0x3FFF) << 4};
  const int base_offset = static_cast<int>((d >> 49) & 7), layout = static_cast<int>(d >> 62);
  if (layout != 1) fail("wgmma %s descriptor: layout type %d (only 1 = 128-byte swizzle is modelled)", which, layout);
  if (base_offset != 0) fail("wgmma %s descriptor: base offset %d not modelled", which, base_offset);
  if (r.sbo % 1024) fail("wgmma %s descriptor: stride byte offset %u not a multiple of the 1024-byte atom", which, r.sbo);
  if (mn_major) {
    if (r.start % 1024 || r.lbo % 1024)
      fail("wgmma %s descriptor (MN-major): start %u / leading byte offset %u not 1024-byte aligned", which, r.start,
           r.lbo);
  } else if (r.start % 1024 + kbytes > 128) {
    fail("wgmma %s descriptor (K-major): start %u: the operand's %d K bytes leave the first 128-byte row of the atom",
         which, r.start, kbytes);
  }
  return r;
}

uint32_t kmajor_addr(const Desc& d, int row, int kbyte) { return swz128(d.start + (row % 8) * 128 + (row / 8) * d.sbo + kbyte); }
uint32_t mnmajor_addr(const Desc& d, int k, int n) {
  return swz128(d.start + (n % 64) * 2 + (n / 64) * d.lbo + (k % 8) * 128 + (k / 8) * d.sbo);
}

int esize(WgType t) { return t == kWgS8 ? 1 : 2; }

double value_bits(uint32_t bits, WgType t) {
  if (t == kWgS8) return static_cast<int8_t>(static_cast<uint8_t>(bits));
  return half_bits(bits, t == kWgBF16);
}

double smem_value(uint32_t addr, WgType t, const char* which) {
  const int n = esize(t);
  const unsigned char* p = smem_at<const unsigned char>(addr, n, n, which);
  if (generic_dirty(addr, n))
    fail("wgmma reads shared address %u (%s), written by cp.async and published without the writer's "
         "fence.proxy.async before the barrier",
         addr, which);
  uint32_t bits = 0;
  std::memcpy(&bits, p, n);
  return value_bits(bits, t);
}

// Metadata indices of row `r` (0..63) and 4-wide chunk `q` of one wgmma.sp: mma.sp's per-warp
// layout, from the metadata registers of warp r / 16's lanes.
void sparse_indices(const std::vector<const WgOp*>& ops, WgType t, int r, int q, int& i0, int& i1) {
  int lane, nib;
  meta_slot(t == kWgS8, ops[0]->sel, r % 16, q, lane, nib);
  nibble(ops[32 * (r / 16) + lane]->meta, nib, i0, i1);
}

// Executes op `oi` of the oldest committed group of warpgroup `wg` for its 128 threads.
void execute(int wg, size_t oi) {
  std::vector<const WgOp*> ops(128);
  for (int t = 0; t < 128; ++t) ops[t] = &g_wg[128 * wg + t].groups.front()[oi];
  const WgOp& o = *ops[0];
  for (int t = 1; t < 128; ++t) {
    const WgOp& x = *ops[t];
    if (x.n != o.n || x.k != o.k || x.type != o.type || x.sparse != o.sparse || x.a_regs != o.a_regs ||
        x.trans_b != o.trans_b || x.scale_d != o.scale_d || x.db != o.db || (!o.a_regs && x.da != o.da) ||
        x.sel != o.sel)
      fail("threads 0 and %d of warpgroup %d issued different wgmma (op %zu of the group): non-uniform "
           "descriptors or shapes",
           t, wg, oi);
  }
  const int M = 64, N = o.n, K = o.k, es = esize(o.type);
  ++g_wgmma_executed;
  std::vector<double> A(M * K, 0.0), B(K * N);
  if (o.a_regs) {  // mma.sync m16n8k16 A fragment per warp
    for (int t = 0; t < 128; ++t) {
      for (int j = 0; j < 4; ++j) {
        int row, col;
        frag_a16(t % 32, j, row, col);
        row += 16 * (t / 32);
        A[row * K + col] = value_bits(ops[t]->a[j] & 0xFFFF, o.type);
        A[row * K + col + 1] = value_bits(ops[t]->a[j] >> 16, o.type);
      }
    }
  } else if (!o.sparse) {
    const Desc da = decode(o.da, false, K * es, "A");
    for (int m = 0; m < M; ++m)
      for (int k = 0; k < K; ++k) A[m * K + k] = smem_value(kmajor_addr(da, m, k * es), o.type, "wgmma A");
  } else {  // compressed A: a dense K-major matrix of K / 2 columns, two values per 4-wide chunk
    const Desc da = decode(o.da, false, K / 2 * es, "A (sparse)");
    for (int m = 0; m < M; ++m)
      for (int q = 0; q < K / 4; ++q) {
        int i0, i1;
        sparse_indices(ops, o.type, m, q, i0, i1);
        A[m * K + 4 * q + i0] = smem_value(kmajor_addr(da, m, 2 * q * es), o.type, "wgmma.sp A");
        A[m * K + 4 * q + i1] = smem_value(kmajor_addr(da, m, (2 * q + 1) * es), o.type, "wgmma.sp A");
      }
  }
  const Desc db = decode(o.db, o.trans_b, K * es, "B");
  for (int k = 0; k < K; ++k)
    for (int n = 0; n < N; ++n)
      B[k * N + n] = smem_value(o.trans_b ? mnmajor_addr(db, k, n) : kmajor_addr(db, n, k * es), o.type, "wgmma B");
  // Products summed exactly (double holds every s8 and 16-bit product sum here), rounded once.
  for (int t = 0; t < 128; ++t) {
    WgThread& th = g_wg[128 * wg + t];
    for (int j = 0; j < N / 8; ++j)
      for (int r = 0; r < 4; ++r) {
        int row, col;
        frag_d(t % 32, r, row, col);
        row += 16 * (t / 32), col += 8 * j;
        double s = 0;
        for (int k = 0; k < K; ++k) s += A[row * K + k] * B[k * N + col];
        uint32_t& reg = th.inflight.at(ops[t]->d[4 * j + r]);
        if (o.type == kWgS8) {
          uint32_t v = static_cast<uint32_t>(static_cast<int64_t>(s));
          if (o.scale_d) v += reg;
          reg = v;
        } else {
          float v = static_cast<float>(s), old;
          std::memcpy(&old, &reg, 4);
          if (o.scale_d) v = v + old;
          std::memcpy(&reg, &v, 4);
        }
      }
  }
}

// The warpgroup's wait_group: retire groups oldest first until at most n are left, then hand
// back the accumulators no unretired op owns any more.
void retire(int wg) {
  WgThread& t0 = g_wg[128 * wg];
  for (int t = 1; t < 128; ++t) {
    const WgThread& x = g_wg[128 * wg + t];
    if (x.wait_n != t0.wait_n || x.groups.size() != t0.groups.size())
      fail("threads 0 and %d of warpgroup %d differ at wgmma.wait_group (%d vs %d, %zu vs %zu groups committed)", t,
           wg, t0.wait_n, x.wait_n, t0.groups.size(), x.groups.size());
    for (size_t gi = 0; gi < x.groups.size(); ++gi)
      if (x.groups[gi].size() != t0.groups[gi].size())
        fail("threads 0 and %d of warpgroup %d committed groups of different sizes", t, wg);
  }
  while (t0.groups.size() > static_cast<size_t>(t0.wait_n)) {
    for (size_t oi = 0; oi < t0.groups.front().size(); ++oi) execute(wg, oi);
    for (int t = 0; t < 128; ++t) g_wg[128 * wg + t].groups.erase(g_wg[128 * wg + t].groups.begin());
  }
  for (int t = 0; t < 128; ++t) {
    WgThread& th = g_wg[128 * wg + t];
    std::set<void*> owned;
    for (const auto& grp : th.groups)
      for (const WgOp& op : grp) owned.insert(op.d.begin(), op.d.end());
    for (const WgOp& op : th.open) owned.insert(op.d.begin(), op.d.end());
    for (auto it = th.inflight.begin(); it != th.inflight.end();) {
      if (owned.count(it->first)) {
        ++it;
        continue;
      }
      std::memcpy(it->first, &it->second, 4);
      it = th.inflight.erase(it);
    }
  }
}

WgThread& wg_self(const char* what) {
  const int t = thread_index();
  if (t / 128 * 128 + 128 > g_threads) fail("%s: thread %d's warpgroup is not complete (%d threads)", what, t, g_threads);
  return g_wg[t];
}

// ---- mbarrier and TMA ----------------------------------------------------------------------

Mbar& mbar(uint32_t bar, const char* what) {
  smem_at<unsigned char>(bar, 8, 8, what);
  auto it = g_mbars.find(bar);
  if (it == g_mbars.end()) fail("%s: no mbarrier initialised at shared address %u", what, bar);
  return it->second;
}

void maybe_complete(Mbar& m) {
  if (m.pending == 0 && m.tx == 0) {
    ++m.phase;
    m.pending = static_cast<int>(m.count);
  }
}

void arrive(Mbar& m, const char* what) {
  if (m.pending <= 0) fail("%s: more arrivals than the barrier's count %u in one phase", what, m.count);
  --m.pending;
  maybe_complete(m);
}

void land(Mbar& m) {
  for (const TmaCopy& c : m.copies) {
    const uint32_t row_bytes = c.box[0] * c.esize;
    for (uint32_t r = 0; r < c.box[1]; ++r) {
      const int64_t y = static_cast<int64_t>(c.c1) + r;
      for (uint32_t b = 0; b < row_bytes; ++b) {
        const int64_t x = static_cast<int64_t>(c.c0) + b / c.esize;
        const bool in = x >= 0 && y >= 0 && static_cast<uint64_t>(x) < c.dims[0] && static_cast<uint64_t>(y) < c.dims[1];
        const uint32_t off = c.dst + r * row_bytes + b;
        smem_base()[c.swizzle128 ? swz128(off) : off] =
            in ? c.base[y * c.stride + static_cast<int64_t>(c.c0) * c.esize + b] : 0;
      }
    }
    async_written(c.dst, static_cast<size_t>(row_bytes) * c.box[1]);
    ++g_tma_landed;
    m.tx -= static_cast<int64_t>(row_bytes) * c.box[1];
  }
  m.copies.clear();
  maybe_complete(m);
}

}  // namespace

void hopper_block_begin(int nthreads) {
  g_threads = nthreads;
  g_wg.assign(nthreads, WgThread{});
  g_rdv.assign((nthreads + 127) / 128, Rendezvous{});
  g_mbars.clear();
}

std::string hopper_block_end() {
  for (size_t t = 0; t < g_wg.size(); ++t)
    if (!g_wg[t].open.empty() || !g_wg[t].groups.empty())
      return "thread " + std::to_string(t) + " exited with wgmma ops not retired by a wgmma.wait_group";
  for (const auto& kv : g_mbars)
    if (!kv.second.copies.empty())
      return "block exited with TMA copies in flight on the mbarrier at " + std::to_string(kv.first);
  return "";
}

void ptx::wgmma_issue(int n, int k, WgType type, bool sparse, void* const* regs, const uint64_t* rest, int nrest) {
  WgThread& me = wg_self("wgmma.mma_async");
  if (!me.fenced) fail("wgmma.mma_async without a wgmma.fence since this thread's last wgmma.wait_group");
  WgOp op{};
  op.n = n, op.k = k, op.type = type, op.sparse = sparse, op.sel = 0;
  auto imm = [&](int i, uint64_t want, const char* what) {
    if (rest[i] != want) fail("wgmma: %s = %lld not modelled", what, static_cast<long long>(rest[i]));
  };
  // Operand lists after the accumulators (PTX ISA, wgmma.mma_async[.sp]):
  if (type == kWgS8 && !sparse) {  // a-desc, b-desc, scale-d
    if (nrest != 3) fail("wgmma s8: %d operands", nrest);
    op.da = rest[0], op.db = rest[1], op.scale_d = rest[2] != 0;
  } else if (type == kWgS8) {  // a-desc, b-desc, sp-meta, sp-sel, scale-d
    if (nrest != 5) fail("wgmma.sp s8: %d operands", nrest);
    op.da = rest[0], op.db = rest[1], op.meta = static_cast<uint32_t>(rest[2]), op.sel = static_cast<int>(rest[3]);
    op.scale_d = rest[4] != 0;
    if (op.sel != 0) fail("wgmma.sp s8: sparsity selector %d (must be 0)", op.sel);
  } else if (sparse) {  // a-desc, b-desc, sp-meta, sp-sel, scale-d, imm-scale-a, imm-scale-b, imm-trans-a, -b
    if (nrest != 9) fail("wgmma.sp 16-bit: %d operands", nrest);
    op.da = rest[0], op.db = rest[1], op.meta = static_cast<uint32_t>(rest[2]), op.sel = static_cast<int>(rest[3]);
    op.scale_d = rest[4] != 0;
    imm(5, 1, "imm-scale-a"), imm(6, 1, "imm-scale-b"), imm(7, 0, "imm-trans-a"), imm(8, 0, "imm-trans-b");
    if (op.sel != 0 && op.sel != 1) fail("wgmma.sp 16-bit: sparsity selector %d", op.sel);
  } else if (nrest == 7) {  // ss: a-desc, b-desc, scale-d, imm-scale-a, imm-scale-b, imm-trans-a, imm-trans-b
    op.da = rest[0], op.db = rest[1], op.scale_d = rest[2] != 0;
    imm(3, 1, "imm-scale-a"), imm(4, 1, "imm-scale-b"), imm(5, 0, "imm-trans-a");
    op.trans_b = rest[6] != 0;
  } else if (nrest == 9) {  // rs: a0..a3, b-desc, scale-d, imm-scale-a, imm-scale-b, imm-trans-b
    op.a_regs = true;
    for (int i = 0; i < 4; ++i) op.a[i] = static_cast<uint32_t>(rest[i]);
    op.db = rest[4], op.scale_d = rest[5] != 0;
    imm(6, 1, "imm-scale-a"), imm(7, 1, "imm-scale-b");
    op.trans_b = rest[8] != 0;
  } else {
    fail("wgmma 16-bit: %d operands", nrest);
  }
  op.d.assign(regs, regs + n / 2);
  for (void* r : op.d) {
    uint32_t v;
    std::memcpy(&v, r, 4);
    me.inflight.emplace(r, v);  // keeps the value an earlier unretired op left
  }
  me.open.push_back(std::move(op));
}

namespace ptx {

void wgmma_fence_sync_aligned() { wg_self("wgmma.fence").fenced = true; }

void wgmma_commit_group_sync_aligned() {
  WgThread& me = wg_self("wgmma.commit_group");
  me.groups.push_back(std::move(me.open));
  me.open.clear();
}

void wgmma_wait_group_sync_aligned(int n) {
  WgThread& me = wg_self("wgmma.wait_group");
  me.wait_n = n;
  const int wg = thread_index() / 128;
  Rendezvous& rv = g_rdv[wg];
  const uint64_t gen = rv.gen;
  if (++rv.arrived == 128) {
    retire(wg);
    rv.arrived = 0;
    ++rv.gen;
  } else {
    wait_until("wgmma.wait_group", [wg, gen] { return g_rdv[wg].gen != gen; });
  }
  me.fenced = false;  // the thread reads the accumulators next: the next wgmma needs a fence
}

void fence_proxy_async_shared_cta() { fence_proxy_async(); }

void mbarrier_init_shared_cta_b64(uint32_t bar, uint32_t count) {
  smem_at<unsigned char>(bar, 8, 8, "mbarrier.init");
  if (count < 1 || count > (1u << 20) - 1) fail("mbarrier.init: count %u out of range", count);
  Mbar m;
  m.count = count;
  m.pending = static_cast<int>(count);
  g_mbars[bar] = m;
}

void fence_mbarrier_init_release_cluster() {}

void mbarrier_arrive_expect_tx_shared_cta_b64(uint32_t bar, uint32_t bytes) {
  Mbar& m = mbar(bar, "mbarrier.arrive.expect_tx");
  m.tx += bytes;
  arrive(m, "mbarrier.arrive.expect_tx");
}

void mbarrier_arrive_shared_cta_b64(uint32_t bar) { arrive(mbar(bar, "mbarrier.arrive"), "mbarrier.arrive"); }

void mbarrier_try_wait_parity_shared_cta_b64(uint32_t& done, uint32_t bar, uint32_t parity) {
  Mbar& m = mbar(bar, "mbarrier.try_wait");
  // The phase of parity `parity` has completed iff the current phase has the other parity.
  auto complete = [&m, parity] { return (m.phase & 1) != (parity & 1); };
  if (!m.copies.empty()) land(m);
  if (!complete()) {
    const uint64_t phase = m.phase;
    wait_until("mbarrier.try_wait", [&m, phase] { return m.phase != phase || !m.copies.empty(); });
    if (!m.copies.empty()) land(m);
  }
  done = complete();
}

void cp_async_bulk_tensor_2d_shared_cluster_global_mbarrier_complete_tx_bytes(uint32_t dst, uint64_t map, int c0,
                                                                            int c1, uint32_t bar) {
  MapDesc md;
  std::memcpy(&md, reinterpret_cast<const void*>(map), sizeof md);
  if (md.magic != kMapMagic) fail("cp.async.bulk.tensor: the tensor map was not made by cuTensorMapEncodeTiled");
  Mbar& m = mbar(bar, "cp.async.bulk.tensor");
  const size_t bytes = static_cast<size_t>(md.box[0]) * md.esize * md.box[1];
  if (dst % (md.swizzle128 ? 1024 : 128))
    fail("cp.async.bulk.tensor: shared destination %u not %d-byte aligned", dst, md.swizzle128 ? 1024 : 128);
  unsigned char* d = smem_at<unsigned char>(dst, bytes, 16, "cp.async.bulk.tensor");
  for (const auto& kv : g_mbars)
    if (kv.first + 8 > dst && kv.first < dst + bytes)
      fail("cp.async.bulk.tensor: destination [%u, %zu) overlaps the mbarrier at %u", dst, dst + bytes, kv.first);
  std::memset(d, 0xFF, bytes);  // undefined until the barrier's phase completes
  m.copies.push_back({dst, md.base, {md.dims[0], md.dims[1]}, md.stride, {md.box[0], md.box[1]}, md.esize,
                      md.swizzle128 != 0, c0, c1});
}

}  // namespace ptx

namespace {

CUresult CUDAAPI encode_tiled(CUtensorMap* map, CUtensorMapDataType type, cuuint32_t rank, void* addr,
                              const cuuint64_t* dims, const cuuint64_t* strides, const cuuint32_t* box,
                              const cuuint32_t* elem_strides, CUtensorMapInterleave interleave,
                              CUtensorMapSwizzle swizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill fill) {
  // The driver's documented constraints (cuTensorMapEncodeTiled), for what is modelled.
  uint32_t es;
  switch (type) {
    case CU_TENSOR_MAP_DATA_TYPE_UINT8: es = 1; break;
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT16:
    case CU_TENSOR_MAP_DATA_TYPE_BFLOAT16: es = 2; break;
    default: return CUDA_ERROR_INVALID_VALUE;
  }
  if (map == nullptr || rank != 2 || reinterpret_cast<uintptr_t>(addr) % 16 || reinterpret_cast<uintptr_t>(map) % 64)
    return CUDA_ERROR_INVALID_VALUE;
  if (interleave != CU_TENSOR_MAP_INTERLEAVE_NONE || fill != CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE)
    return CUDA_ERROR_INVALID_VALUE;
  if (swizzle != CU_TENSOR_MAP_SWIZZLE_NONE && swizzle != CU_TENSOR_MAP_SWIZZLE_128B) return CUDA_ERROR_INVALID_VALUE;
  for (int i = 0; i < 2; ++i) {
    if (dims[i] < 1 || dims[i] > (1ull << 32)) return CUDA_ERROR_INVALID_VALUE;
    if (box[i] < 1 || box[i] > 256) return CUDA_ERROR_INVALID_VALUE;
    if (elem_strides[i] != 1) return CUDA_ERROR_INVALID_VALUE;  // strided boxes: not modelled
  }
  if (strides[0] % 16 || strides[0] >= (1ull << 40)) return CUDA_ERROR_INVALID_VALUE;
  if (box[0] * es % 16) return CUDA_ERROR_INVALID_VALUE;
  // 128-byte swizzle: the inner box dimension at most the swizzle span (modelled: exactly it).
  if (swizzle == CU_TENSOR_MAP_SWIZZLE_128B && box[0] * es != 128) return CUDA_ERROR_INVALID_VALUE;
  MapDesc md{kMapMagic, static_cast<const unsigned char*>(addr), {dims[0], dims[1]}, strides[0], {box[0], box[1]},
             es, swizzle == CU_TENSOR_MAP_SWIZZLE_128B};
  std::memset(map, 0, sizeof *map);
  std::memcpy(map, &md, sizeof md);
  return CUDA_SUCCESS;
}

}  // namespace
}  // namespace simt

// Warpgroup MMAs executed and TMA copies landed since the library was loaded.
extern "C" void simt_hopper_counts(long long* wgmma, long long* tma) {
  *wgmma = simt::g_wgmma_executed;
  *tma = simt::g_tma_landed;
}

extern "C" cudaError_t cudaGetDriverEntryPointByVersion(const char* symbol, void** fn, unsigned int, unsigned long long,
                                                        cudaDriverEntryPointQueryResult* status) {
  if (std::strcmp(symbol, "cuTensorMapEncodeTiled") == 0) {
    *fn = reinterpret_cast<void*>(&simt::encode_tiled);
    if (status) *status = cudaDriverEntryPointSuccess;
    return cudaSuccess;
  }
  *fn = nullptr;
  if (status) *status = cudaDriverEntryPointSymbolNotFound;
  return cudaSuccess;
}
