// Row threading shared by cpu_kernel.cc and power_kernel.cc.
//
// x is [rows, C] with the leading axes flattened; rows are split into
// contiguous ranges over std::threads when the array is large enough to pay
// for spawning them (measured: below 2^18 elements one thread is faster on
// the project's 2-core CPU).

#ifndef NORMJAX_SRC_KERNEL_ROWS_H_
#define NORMJAX_SRC_KERNEL_ROWS_H_

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace normjax {

constexpr int64_t kMinElementsPerThread = 1 << 18;

// The size of the last axis (1 for a scalar).
template <typename Dims>
int64_t LastDim(const Dims& dims) {
  return dims.size() == 0 ? 1 : dims[dims.size() - 1];
}

inline int NumThreads(int64_t elements) {
  const int64_t hw = std::max(1u, std::thread::hardware_concurrency());
  return static_cast<int>(
      std::max<int64_t>(1, std::min(hw, elements / kMinElementsPerThread)));
}

// Calls body(thread, first_row, end_row) on `threads` contiguous row ranges.
template <typename Body>
void ParallelRows(int64_t rows, int threads, Body body) {
  if (threads == 1) {
    body(0, 0, rows);
    return;
  }
  std::vector<std::thread> pool;
  const int64_t chunk = (rows + threads - 1) / threads;
  for (int t = 1; t < threads; ++t) {
    const int64_t lo = std::min(rows, t * chunk);
    const int64_t hi = std::min(rows, lo + chunk);
    pool.emplace_back(body, t, lo, hi);
  }
  body(0, 0, std::min(rows, chunk));
  for (auto& th : pool) th.join();
}

}  // namespace normjax

#endif  // NORMJAX_SRC_KERNEL_ROWS_H_
