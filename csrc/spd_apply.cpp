// X := (L Lᵀ)⁻¹ X for a few vectors: the solves of the condition estimate (DPOCON's iteration).
//
// Why by hand: each solve reads the whole factor once for a handful of flops per element, so
// it is bound by memory bandwidth, and neither BLAS streams it at that rate here. At d = 6400
// (Zen 5, 2 threads) a 328 MB read runs at ~42 GB/s, but MKL's dtrsv (through
// torch) took 6.3-6.6 ms per 164 MB triangle (~25 GB/s) and OpenBLAS's 5-7 ms; the estimate
// does ten of them. Here each pass streams the factor's rows in panels, the rectangle under
// each panel split over the threads, and serves several vectors per read of the factor.
// Leading zeros of X (the estimate's unit vectors e_j) skip the rows and columns they zero.
#include <algorithm>
#include <cstdint>

#include "parallel.h"
#include "solver.h"

namespace pmsolve {
namespace {

constexpr int64_t kPanel = 256;              // rows per panel: the serial triangle is kPanel/d of the work
constexpr int64_t kParallelMin = 64 * 1024;  // rectangle elements below which one thread does it
constexpr int kMaxVectors = 4;               // vectors per read of the factor

// s[c] = Σ_{j∈[j0,j1)} a[j]·X[c][j] for K vectors, reading `a` once for all K. `omp simd`
// lets the sums be reassociated into vector lanes (built with -fopenmp-simd, CMakeLists.txt).
template <int K>
__attribute__((always_inline)) inline void dots(const double* __restrict a, const double* __restrict X, int64_t ldx, int64_t j0, int64_t j1,
                 double* s) {
  const double* __restrict x0 = X;
  const double* __restrict x1 = X + (K > 1 ? ldx : 0);
  const double* __restrict x2 = X + (K > 2 ? 2 * ldx : 0);
  const double* __restrict x3 = X + (K > 3 ? 3 * ldx : 0);
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t j = j0; j < j1; ++j) {
    const double aj = a[j];
    s0 += aj * x0[j];
    if constexpr (K > 1) s1 += aj * x1[j];
    if constexpr (K > 2) s2 += aj * x2[j];
    if constexpr (K > 3) s3 += aj * x3[j];
  }
  const double all[4] = {s0, s1, s2, s3};
  for (int c = 0; c < K; ++c) s[c] = all[c];
}

// X[c][j0:j1] -= z[c]·a[j0:j1] for K vectors (restrict: X never overlaps the factor, which
// lets the compiler vectorise).
template <int K>
__attribute__((always_inline)) inline void axpys(const double* __restrict a, const double* z, double* __restrict X, int64_t ldx, int64_t j0,
                  int64_t j1) {
  for (int c = 0; c < K; ++c) {
    const double zc = z[c];
    double* __restrict x = X + c * ldx;
    for (int64_t j = j0; j < j1; ++j) x[j] -= zc * a[j];
  }
}

template <int K>
__attribute__((always_inline)) inline void rows_dots(const double* L, int64_t ld, int64_t i0, int64_t i1, int64_t j0, int64_t j1, double* X,
                      int64_t ldx) {
  for (int64_t i = i0; i < i1; ++i) {
    double s[K];
    dots<K>(L + i * ld, X, ldx, j0, j1, s);
    for (int c = 0; c < K; ++c) X[c * ldx + i] -= s[c];
  }
}

template <int K>
__attribute__((always_inline)) inline void rows_axpys(const double* L, int64_t ld, int64_t i0, int64_t i1, int64_t j0, int64_t j1,
                       const double* Z, double* X, int64_t ldx) {
  for (int64_t i = i0; i < i1; ++i) axpys<K>(L + i * ld, Z + (i - i0) * K, X, ldx, j0, j1);
}

// The two loops that read the factor, compiled for AVX-512, AVX2 and the baseline (dispatched
// at load time; the package is built for any x86-64): X[c][i] -= L[i, j0:j1]·X[c][j0:j1] for
// i ∈ [i0, i1), and X[c][j0:j1] -= Σ_{i∈[i0,i1)} Z[i - i0][c]·L[i, j0:j1].
__attribute__((target_clones("avx512f", "avx2", "default")))
void rect_dots(int k, const double* L, int64_t ld, int64_t i0, int64_t i1, int64_t j0, int64_t j1, double* X,
               int64_t ldx) {
  switch (k) {
    case 1: return rows_dots<1>(L, ld, i0, i1, j0, j1, X, ldx);
    case 2: return rows_dots<2>(L, ld, i0, i1, j0, j1, X, ldx);
    case 3: return rows_dots<3>(L, ld, i0, i1, j0, j1, X, ldx);
    default: return rows_dots<4>(L, ld, i0, i1, j0, j1, X, ldx);
  }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void rect_axpys(int k, const double* L, int64_t ld, int64_t i0, int64_t i1, int64_t j0, int64_t j1,
                const double* Z, double* X, int64_t ldx) {
  switch (k) {
    case 1: return rows_axpys<1>(L, ld, i0, i1, j0, j1, Z, X, ldx);
    case 2: return rows_axpys<2>(L, ld, i0, i1, j0, j1, Z, X, ldx);
    case 3: return rows_axpys<3>(L, ld, i0, i1, j0, j1, Z, X, ldx);
    default: return rows_axpys<4>(L, ld, i0, i1, j0, j1, Z, X, ldx);
  }
}

// Split [lo, hi) into contiguous parts, one per thread, and run f(part_lo, part_hi) on each
// (all on the caller's thread when the work, `elements`, is small).
template <class F>
void split_range(int64_t lo, int64_t hi, int64_t elements, F f) {
  const int nt = elements < kParallelMin ? 1 : worker_threads();
  if (nt == 1) {
    f(lo, hi);
    return;
  }
  run_on_threads(nt, [&](int t) { f(lo + (hi - lo) * t / nt, lo + (hi - lo) * (t + 1) / nt); });
}

// L y = x, L row-major lower, y over x in place; rows above `first` are zero in X and stay so.
void forward(int k, const double* L, int64_t n, int64_t ld, double* X, int64_t ldx, int64_t first) {
  for (int64_t r0 = first; r0 < n; r0 += kPanel) {
    const int64_t r1 = std::min(n, r0 + kPanel);
    if (r0 > first)  // the rectangle L[r0:r1, first:r0], its rows split over the threads
      split_range(r0, r1, (r1 - r0) * (r0 - first),
                  [&](int64_t i0, int64_t i1) { rect_dots(k, L, ld, i0, i1, first, r0, X, ldx); });
    for (int64_t i = r0; i < r1; ++i) {  // the panel's triangle, row by row
      rect_dots(k, L, ld, i, i + 1, r0, i, X, ldx);
      for (int c = 0; c < k; ++c) X[c * ldx + i] /= L[i * ld + i];
    }
  }
}

// Lᵀ z = y, L row-major lower, z over y in place: bottom-up, each row of L an axpy.
void backward(int k, const double* L, int64_t n, int64_t ld, double* X, int64_t ldx) {
  double z[kPanel * kMaxVectors];  // the panel's solution, row by row: z[(i - r0)·k + c]
  for (int64_t r1 = n; r1 > 0;) {
    const int64_t r0 = std::max<int64_t>(0, r1 - kPanel);
    for (int64_t i = r1 - 1; i >= r0; --i) {  // the panel's triangle, row by row
      double* zi = z + (i - r0) * k;
      for (int c = 0; c < k; ++c) zi[c] = X[c * ldx + i] /= L[i * ld + i];
      rect_axpys(k, L, ld, i, i + 1, r0, i, zi, X, ldx);
    }
    // X[:, 0:r0] -= L[r0:r1, 0:r0]ᵀ z, its columns split over the threads (each owns its part of X)
    split_range(0, r0, (r1 - r0) * r0,
                [&](int64_t j0, int64_t j1) { rect_axpys(k, L, ld, r0, r1, j0, j1, z, X, ldx); });
    r1 = r0;
  }
}

}  // namespace

void spd_apply_inverse(LowerFactor L, Mat X) {
  for (blas_int r = 0; r < X.rows; r += kMaxVectors) {  // vectors in groups of up to kMaxVectors
    const int k = static_cast<int>(std::min<blas_int>(kMaxVectors, X.rows - r));
    double* x = X.data + static_cast<int64_t>(r) * X.ld;
    int64_t first = L.n;  // the first row where some vector is nonzero
    for (int c = 0; c < k; ++c) {
      int64_t j = 0;
      while (j < first && x[c * X.ld + j] == 0.0) ++j;
      first = std::min(first, j);
    }
    if (first == L.n) continue;  // all zero: so is the solution
    forward(k, L.data, L.n, L.ld, x, X.ld, first);
    backward(k, L.data, L.n, L.ld, x, X.ld);
  }
}

}  // namespace pmsolve
