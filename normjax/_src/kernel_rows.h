// Row threading shared by the fused CPU kernels (cpu_kernel.cc,
// power_kernel.cc, ...).
//
// x is [rows, C] with the leading axes flattened. A kernel asks
// `NumThreads(elements)` for a thread count and calls
// `ParallelRows(rows, threads, body)`, which calls body(t, lo, hi) once for
// every t in [0, threads) on the contiguous row range
//   chunk = ceil(rows / threads),  lo = min(rows, t * chunk),
//   hi = min(rows, lo + chunk)
// (empty ranges included: a body may zero or use its slot t regardless).
// The split depends only on (rows, threads), and t indexes per-thread
// partial sums that the kernel adds in a fixed order afterwards, so the same
// input gives bit-identical output on every call, whichever OS thread ran
// which chunk and whether it ran in parallel at all.
//
// Threads come from XLA's intra-op pool, the one XLA:CPU runs its own
// thunks on (`ffi::ThreadPool`, handed to every handler, which installs it
// with `UseXlaPool`). The caller schedules threads - 1 tasks there and runs
// chunks itself; chunks are claimed with fetch_add by the caller and the
// tasks alike, so a task that starts late (its thread busy with another
// thunk) costs little: the caller runs the unclaimed chunks, then waits
// (pause loop, then yield) only for claimed ones. Sharing XLA's pool keeps
// the kernels from oversubscribing the cores when XLA runs other thunks
// beside them, and its threads are awake while XLA executes a program.
// Measured on the 2-core VM (benchmarks/norms.py's PowerNorm step, which
// XLA runs on its pool; five runs each, paired ratio to LayerNorm's step):
// 1.18-1.32x with XLA's pool against 1.24-1.40x with our own pool, whose
// worker, woken from sleep, often started after the caller had run both
// chunks (the slow calls took the one-thread time).
//
// Fallbacks, also for measurement: without an XLA pool (num_threads() = 0)
// or with mode `kOwnPool`, a persistent process-wide pool of
// hardware_concurrency - 1 workers (created at the first threaded call,
// never destroyed; the caller bumps a generation counter packed with the
// chunk count and the next unclaimed chunk in one 64-bit atomic, wakes the
// workers through a condition variable, claims chunks with them by
// compare-and-swap; only one ParallelRows uses it at a time (try_lock): a
// concurrent or nested call runs its chunks serially on its own thread,
// with the same split and so the same result). Mode `kSpawn`: std::threads
// spawned per call (35-50 us a call, against ~10 us for a pool).
//
// Threshold: one thread per kMinElementsPerThread = 2^18 elements (1 MiB of
// f32), at most hardware_concurrency, so 2 threads from 2^19 elements on
// the project's 2-core VM. A lower threshold did not pay there
// (benchmarks/sizes.py and the measurements in its commit: with other jobs
// on the 2 cores, 2 threads vs 1 was 1.3-1.45x slower at 2^16 elements,
// 1.1-1.2x at 2^18, ~1.0-1.1x at 2^19-2^20 and 0.9-1.0x from 2^21).
//
// Switches, for measurement: NORMJAX_KERNEL_POOL=2 (the default: XLA's
// pool), 1 (our own pool) or 0 (spawn), read once at the first kernel call;
// NORMJAX_KERNEL_MIN_ELEMENTS=n sets the elements per thread.
// `NormjaxSetRowThreading(mode, min_elements)` (exported by cpu_kernel.cc;
// normjax._src.cpu_kernel.row_threading from Python) changes both at run
// time; a changed threshold changes `threads` for some sizes and with it the
// summation order of the per-thread partial sums (still deterministic).
//
// Outputs (y, dx) of at least kStreamBytes = 8 MiB are written with
// streaming (non-temporal) stores (`WriteRow`): a normal store first reads
// the line it writes (read-for-ownership), so an output costs two arrays of
// memory traffic, and a streaming store one. The output is then not in
// cache for its reader, which at these sizes (with the input read in the
// same pass, 32 MiB of L3 on the project's VM) finds little of it there
// anyway. Measured on the 2-core VM, the L3 evicted before each call,
// streaming / normal stores in the same rounds: y = x a + b alone (C++)
// 0.6x one thread, 0.66-0.94x two; jitted in JAX (benchmarks/stores.py,
// three runs) at [4096, 1024] f32: LayerNorm's forward 0.75-0.82x, then
// y * 2 + 1 0.89-0.97x, then sum(y, axis=0) 0.94-1.03x, then y @ W
// 0.99-1.0x; its forward+backward then dx * 2 0.86-0.87x; BatchNorm's
// forward then y * 2 + 1 0.93-0.98x; a residual block's step 0.98-1.0x.
// At [2048, 1024] (8 MiB) the same cases 0.87-0.89x, 0.98-1.0x, 1.04x,
// 1.0x, 0.92-0.94x, 0.89-0.96x, 0.97-0.99x. The store kind changes no
// bit of the result. The threshold is fixed rather than taken from the
// machine's L3, which a VM may misreport (sysconf gives 320 MiB on the
// project's VM, sysfs 32 MiB). NORMJAX_KERNEL_STREAM_BYTES=n, or
// `NormjaxSetStreamBytes` (Python: normjax._src.cpu_kernel.stream_stores),
// sets it.

#ifndef NORMJAX_SRC_KERNEL_ROWS_H_
#define NORMJAX_SRC_KERNEL_ROWS_H_

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace normjax {

constexpr int64_t kMinElementsPerThread = 1 << 18;
constexpr int64_t kStreamBytes = int64_t{8} << 20;
// Where ParallelRows gets its threads (see the header comment).
enum RowThreading { kSpawn = 0, kOwnPool = 1, kXlaPool = 2 };
constexpr int kSpinMicros = 0;  // a worker's busy wait before it sleeps
constexpr int kCallerSpins = 64;  // pause loops before the caller yields

// The size of the last axis (1 for a scalar).
template <typename Dims>
int64_t LastDim(const Dims& dims) {
  return dims.size() == 0 ? 1 : dims[dims.size() - 1];
}

namespace rows_internal {

// Orders this thread's non-temporal stores before its later stores (the
// chunk's "done"), which x86 does not do for them by itself.
inline void StoreFence() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_sfence();
#endif
}

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

inline int64_t EnvInt(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  const long long n = std::strtoll(v, &end, 10);
  return *end == '\0' ? static_cast<int64_t>(n) : fallback;
}

// Run-time settings: the RowThreading mode, and the elements per thread.
struct Settings {
  std::atomic<int> mode;
  std::atomic<int64_t> min_elements;
  std::atomic<int64_t> stream_bytes;
  int64_t spin_us = EnvInt("NORMJAX_KERNEL_SPIN_US", kSpinMicros);
  int64_t caller_spins = EnvInt("NORMJAX_KERNEL_CALLER_SPINS", kCallerSpins);
  Settings() {
    const int64_t m = EnvInt("NORMJAX_KERNEL_POOL", kXlaPool);
    mode.store(m >= kSpawn && m <= kXlaPool ? static_cast<int>(m) : kXlaPool);
    const int64_t e = EnvInt("NORMJAX_KERNEL_MIN_ELEMENTS", 0);
    min_elements.store(e > 0 ? e : kMinElementsPerThread);
    const int64_t b = EnvInt("NORMJAX_KERNEL_STREAM_BYTES", 0);
    stream_bytes.store(b > 0 ? b : kStreamBytes);
  }
};

inline Settings& GetSettings() {
  static Settings* s = new Settings();  // never destroyed
  return *s;
}

// The caller's wait for the chunks that others claimed: a pause loop, then
// yields.
inline void WaitForChunks(const std::atomic<int>& done, int chunks) {
  for (int spins = 0; done.load(std::memory_order_acquire) < chunks;) {
    if (++spins < GetSettings().caller_spins) {
      CpuRelax();
    } else {
      std::this_thread::yield();
    }
  }
}

// Whether this thread is running pool work (a worker, or a caller inside
// TryRun): a nested ParallelRows then runs serially.
inline bool& InPool() {
  static thread_local bool in_pool = false;
  return in_pool;
}

// The persistent pool. A job is (fn, ctx, chunks); `state_` packs
// generation (32 bits) | chunks (16) | next unclaimed chunk (16).
class Pool {
 public:
  explicit Pool(int workers) {
    for (int i = 0; i < workers; ++i) std::thread([this] { Loop(); }).detach();
  }

  // Runs fn(ctx, t) for t in [0, chunks) over the pool and the calling
  // thread; false (nothing run) if the pool is busy.
  bool TryRun(int chunks, void (*fn)(void*, int), void* ctx) {
    std::unique_lock<std::mutex> run(run_mu_, std::try_to_lock);
    if (!run.owns_lock()) return false;
    fn_ = fn;
    ctx_ = ctx;
    done_.store(0, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(sleep_mu_);  // no lost wake-up
      gen_ = (gen_ + 1) & 0xffffffffu;
      state_.store((gen_ << 32) | (static_cast<uint64_t>(chunks) << 16),
                   std::memory_order_release);
    }
    if (sleepers_.load(std::memory_order_relaxed) > 0) wake_.notify_all();
    Work(gen_);
    WaitForChunks(done_, chunks);
    return true;
  }

 private:
  static uint64_t Gen(uint64_t s) { return s >> 32; }

  // Claims and runs chunks of job `gen` until none is left.
  void Work(uint64_t gen) {
    uint64_t s = state_.load(std::memory_order_acquire);
    for (;;) {
      const uint64_t chunks = (s >> 16) & 0xffff, next = s & 0xffff;
      if (Gen(s) != gen || next >= chunks) return;
      if (!state_.compare_exchange_weak(s, s + 1, std::memory_order_acquire,
                                        std::memory_order_acquire)) {
        continue;  // s reloaded
      }
      fn_(ctx_, static_cast<int>(next));  // job `gen` waits for this chunk
      done_.fetch_add(1, std::memory_order_release);
      s = state_.load(std::memory_order_acquire);
    }
  }

  void Loop() {
    InPool() = true;
    uint64_t seen = 0;  // the generation before the first job
    for (;;) {
      uint64_t gen = Gen(state_.load(std::memory_order_acquire));
      if (gen == seen && GetSettings().spin_us > 0) {
        const auto until = std::chrono::steady_clock::now() +
                           std::chrono::microseconds(GetSettings().spin_us);
        for (int i = 1; gen == seen; ++i) {
          CpuRelax();
          gen = Gen(state_.load(std::memory_order_acquire));
          if (i % 64 == 0 && std::chrono::steady_clock::now() > until) break;
        }
      }
      if (gen == seen) {
        std::unique_lock<std::mutex> lock(sleep_mu_);
        sleepers_.fetch_add(1, std::memory_order_relaxed);
        wake_.wait(lock, [&] {
          return Gen(state_.load(std::memory_order_acquire)) != seen;
        });
        sleepers_.fetch_sub(1, std::memory_order_relaxed);
        gen = Gen(state_.load(std::memory_order_acquire));
      }
      seen = gen;
      Work(gen);
    }
  }

  std::mutex run_mu_;    // held by the ParallelRows using the pool
  uint64_t gen_ = 0;     // written under run_mu_ and sleep_mu_
  void (*fn_)(void*, int) = nullptr;
  void* ctx_ = nullptr;  // fn_, ctx_: written before state_ (release)
  std::atomic<uint64_t> state_{0};
  std::atomic<int> done_{0};
  std::mutex sleep_mu_;
  std::condition_variable wake_;
  std::atomic<int> sleepers_{0};
};

// A job on XLA's intra-op pool: chunks claimed with fetch_add by the caller
// and the scheduled tasks alike; a task that starts after the last chunk was
// claimed returns without touching the caller's (by then gone) body.
struct XlaJob {
  void (*fn)(void*, int);
  void* ctx;
  int chunks;
  std::atomic<int> next{0};
  std::atomic<int> done{0};
  void Work() {
    for (int c; (c = next.fetch_add(1, std::memory_order_acq_rel)) < chunks;) {
      fn(ctx, c);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// The XLA intra-op pool of the handler running on this thread, if any.
inline xla::ffi::ThreadPool*& CurrentXlaPool() {
  static thread_local xla::ffi::ThreadPool* pool = nullptr;
  return pool;
}

inline int HardwareThreads() {
  static const int hw =
      static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return hw;
}

inline Pool& GetPool() {
  static Pool* pool = new Pool(HardwareThreads() - 1);  // never destroyed
  return *pool;
}

}  // namespace rows_internal

// Makes ParallelRows use XLA's intra-op pool for the handler's duration.
class UseXlaPool {
 public:
  explicit UseXlaPool(xla::ffi::ThreadPool& pool) {
    if (pool.num_threads() > 0) rows_internal::CurrentXlaPool() = &pool;
  }
  ~UseXlaPool() { rows_internal::CurrentXlaPool() = nullptr; }
};

// Floats that the threads of a pass write (their partial column sums and row
// buffers), zeroed, in 64-byte cache lines of their own: a line shared with
// a heap neighbour that another thread touches moves between the cores on
// every write. Measured with a C++ harness (own pool, [4096, 1024], the
// L3 evicted before each call): with a plain std::vector as its row buffer
// PowerNorm's backward (GroupScaling 4) took 1.49-1.71x LayerNorm's in 5 of
// 6 processes and 1.31x in the sixth; in whole lines 1.15-1.34x in 14 of 14
// (PN-V's dx pass still ran slow in 1 process of 17: not the only cause).
class LineBuffer {
 public:
  explicit LineBuffer(int64_t floats)
      : lines_(static_cast<size_t>((floats + 15) / 16)) {}
  float* data() { return reinterpret_cast<float*>(lines_.data()); }
  const float* data() const {
    return reinterpret_cast<const float*>(lines_.data());
  }

 private:
  struct alignas(64) Line {
    float v[16];
  };
  std::vector<Line> lines_;
};

// Whether an output of `bytes` is written with streaming stores (WriteRow).
inline bool StreamOutput(int64_t bytes) {
  return bytes >= rows_internal::GetSettings().stream_bytes.load(
                      std::memory_order_relaxed);
}

// out[j] = value(j) for j in [0, n), with non-temporal stores where
// `stream` (whole vectors at aligned addresses; the ends with normal
// stores), else normal ones. value(j) may also update other arrays at j.
// ParallelRows fences each chunk's streaming stores.
template <typename Value>
__attribute__((always_inline)) inline void WriteRow(float* __restrict out,
                                                    int64_t n, bool stream,
                                                    Value value) {
#if defined(__AVX512F__)
  constexpr int kLanes = 16;
#elif defined(__AVX__)
  constexpr int kLanes = 8;
#else
  constexpr int kLanes = 0;
  stream = false;
#endif
  int64_t j = 0;
  if constexpr (kLanes > 0) {
    if (stream) {
      for (; j < n && reinterpret_cast<uintptr_t>(out + j) % (4 * kLanes);
           ++j) {
        out[j] = value(j);
      }
      for (; j + kLanes <= n; j += kLanes) {
        float v[kLanes];
#pragma omp simd
        for (int u = 0; u < kLanes; ++u) v[u] = value(j + u);
#if defined(__AVX512F__)
        _mm512_stream_ps(out + j, _mm512_loadu_ps(v));
#else
        _mm256_stream_ps(out + j, _mm256_loadu_ps(v));
#endif
      }
    }
  }
#pragma omp simd
  for (int64_t k = j; k < n; ++k) out[k] = value(k);
}

inline int NumThreads(int64_t elements) {
  const int64_t hw = std::min(rows_internal::HardwareThreads(), 0xffff);
  const int64_t per = std::max<int64_t>(
      1, rows_internal::GetSettings().min_elements.load(
             std::memory_order_relaxed));
  return static_cast<int>(std::max<int64_t>(1, std::min(hw, elements / per)));
}

// Calls body(thread, first_row, end_row) on `threads` contiguous row ranges
// (see the header comment); returns when all have run.
template <typename Body>
void ParallelRows(int64_t rows, int threads, Body body) {
  if (threads <= 1) {
    body(0, 0, rows);
    rows_internal::StoreFence();
    return;
  }
  const int64_t chunk = (rows + threads - 1) / threads;
  auto range = [&](int t) {
    const int64_t lo = std::min(rows, t * chunk);
    body(t, lo, std::min(rows, lo + chunk));
    rows_internal::StoreFence();  // the body's WriteRow stores, before "done"
  };
  const int mode = rows_internal::GetSettings().mode.load(
      std::memory_order_relaxed);
  if (mode == kSpawn) {
    std::vector<std::thread> spawned;  // the previous implementation
    for (int t = 1; t < threads; ++t) spawned.emplace_back(range, t);
    range(0);
    for (auto& th : spawned) th.join();
    return;
  }
  using Range = decltype(range);
  auto call = [](void* ctx, int t) { (*static_cast<Range*>(ctx))(t); };
  xla::ffi::ThreadPool* xp = rows_internal::CurrentXlaPool();
  if (mode == kXlaPool && xp != nullptr) {
    auto job = std::make_shared<rows_internal::XlaJob>();
    job->fn = call;
    job->ctx = &range;
    job->chunks = threads;
    for (int t = 1; t < threads; ++t) xp->Schedule([job] { job->Work(); });
    job->Work();
    rows_internal::WaitForChunks(job->done, threads);
    return;
  }
  bool& in_pool = rows_internal::InPool();
  bool ran = false;
  if (!in_pool && threads <= 0xffff) {
    in_pool = true;
    ran = rows_internal::GetPool().TryRun(threads, call, &range);
    in_pool = false;
  }
  if (!ran) {
    for (int t = 0; t < threads; ++t) range(t);  // busy: serial, same split
  }
}

}  // namespace normjax

#endif  // NORMJAX_SRC_KERNEL_ROWS_H_
