// Small thread helpers for the kernels' own parallel work (products, folds, checks).
//
// Threads come from torch's OpenMP pool when the process has exactly one OpenMP runtime,
// i.e. the extension's libgomp is torch's (same soname, loaded once): right after torch's
// parallel work that pool's idle threads keep spinning for milliseconds on the cores, and
// fresh threads of ours had to share a core with them (a d = 1536 statistics update ran about
// 15 % slower on fresh threads right after torch's GEMM than in the pool). With a
// second runtime (torch with its own renamed libgomp, or Intel's) the pool would be one more
// set of spinning threads beside torch's and OpenBLAS's, so then, or with PMSOLVE_OPENMP=off,
// plain std::threads run the work. Thread counts follow the BLAS setting, which pmsolve keeps
// equal to torch.get_num_threads().
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

#include "blas.h"

namespace pmsolve {

// Whether run_on_threads uses the OpenMP pool: built with OpenMP, one OpenMP runtime in the
// process (checked on first use), and not switched off (set_openmp_enabled; pmsolve/switches.py's
// PMSOLVE_OPENMP decides).
bool openmp_enabled();
void set_openmp_enabled(bool on);
// OpenMP runtimes loaded in the process (libgomp, libiomp5, libomp), by path.
std::vector<std::string> openmp_runtimes();

// As many threads as BLAS is allowed, capped by the cores.
inline int worker_threads() {
  const int hw = static_cast<int>(std::thread::hardware_concurrency());
  return std::max(1, std::min(blas_get_num_threads(), hw > 0 ? hw : 1));
}

// Runs f(t) for t in [0, n), one thread each (t = 0 on the caller's). f must not throw.
template <class F>
void run_on_threads(int n, F f) {
#ifdef _OPENMP
  if (n > 1 && openmp_enabled()) {
    // A parallel loop rather than a bare region: every t runs even if the team is smaller.
#pragma omp parallel for schedule(static, 1) num_threads(n)
    for (int t = 0; t < n; ++t) f(t);
    return;
  }
#endif
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

// Run f(r0, r1) over tiles of `tile` rows of [0, d), dealt round-robin to up to worker_threads()
// threads (one below min_d): balances work that shrinks or grows along the rows (a triangle's
// reads, a full row's writes) without knowing its shape.
template <class F>
void parallel_row_tiles(int64_t d, int64_t tile, F f, int64_t min_d = 256) {
  const int nt = d < min_d ? 1 : worker_threads();
  run_on_threads(nt, [&](int t) {
    for (int64_t r0 = t * tile; r0 < d; r0 += nt * tile) f(r0, std::min(r0 + tile, d));
  });
}

}  // namespace pmsolve
