// Small thread helpers for the memory-bound O(d²) passes (folds, checks).
//
// Hand-written on std::thread rather than OpenMP: the extension links no OpenMP
// runtime of its own, and a second one beside torch's (and OpenBLAS's pool) is how
// oversubscription starts. Thread counts follow the BLAS setting, which pmsolve keeps
// equal to torch.get_num_threads().
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

#include "blas.h"

namespace pmsolve {

// As many threads as BLAS is allowed, capped by the cores.
inline int worker_threads() {
  const int hw = static_cast<int>(std::thread::hardware_concurrency());
  return std::max(1, std::min(blas_get_num_threads(), hw > 0 ? hw : 1));
}

// Runs f(t) for t in [0, n), one thread each (t = 0 on the caller's).
template <class F>
void run_on_threads(int n, F f) {
  std::vector<std::thread> pool;
  for (int t = 1; t < n; ++t) pool.emplace_back(f, t);
  f(0);
  for (auto& th : pool) th.join();
}

// Rows [r0, r1) of a lower triangle of size d carry about equal work for r_k = d·√(k/n).
inline std::vector<int64_t> triangle_split(int64_t d, int parts) {
  std::vector<int64_t> b(parts + 1);
  for (int k = 0; k <= parts; ++k) b[k] = static_cast<int64_t>(std::llround(d * std::sqrt(double(k) / parts)));
  b[parts] = d;
  return b;
}

// Run f(thread_index, r0, r1) over a balanced split of a lower triangle's rows, on up to
// worker_threads() threads (one below min_d: starting threads costs more than it saves).
template <class F>
void parallel_triangle_rows(int64_t d, F f, int64_t min_d = 256) {
  const int nt = d < min_d ? 1 : worker_threads();
  if (nt == 1) {
    f(0, int64_t{0}, d);
    return;
  }
  const auto b = triangle_split(d, nt);
  run_on_threads(nt, [&](int k) { f(k, b[k], b[k + 1]); });
}

}  // namespace pmsolve
