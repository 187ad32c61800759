// One pass over a preservation matrix C for everything factorize must know before it
// trusts C: finiteness, its 1-norm (for the condition estimate), max|C|, the worst
// asymmetry and the smallest diagonal entry. torch needed three passes with
// temporaries for this (0.13–0.17 s at d = 6400); here each element pair (C_ij, C_ji)
// is read once, in tiles, on the BLAS's threads.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "parallel.h"
#include "solver.h"

namespace pmsolve {
namespace {

struct Partial {
  std::vector<double> colsum;
  double amax = 0.0;
  double asym = 0.0;      // running maximum over the tiles scanned
  double located = 0.0;   // the asymmetry at (asym_i, asym_j)
  int64_t asym_i = -1, asym_j = -1;
  int64_t bad_i = -1, bad_j = -1;
  double diag_min = std::numeric_limits<double>::infinity();
  int64_t diag_min_i = -1;

  void note_bad(int64_t i, int64_t j) {  // keep the first in row-major order
    if (bad_i < 0 || i < bad_i || (i == bad_i && j < bad_j)) bad_i = i, bad_j = j;
  }
};

constexpr int64_t kTile = 64;
// Rows ahead whose cache lines the scan requests before it reads them. A tile's rows are short
// (64 elements) and 8·d bytes apart, which the hardware prefetchers do not follow: without
// this the scan waited on memory for ~90 % of its time (perf on a Zen 4; d = 6400: 60-67 ms
// on two threads, 34-38 ms with it; distances 2-8 were alike, 16 worse).
constexpr int64_t kPrefetchRows = 8;
constexpr uint64_t kExp = 0x7ff0000000000000ull;

// Bit test: fast-math flags (below) would fold std::isfinite to true.
inline bool nonfinite(double x) {
  uint64_t u;
  __builtin_memcpy(&u, &x, 8);
  return (u & kExp) == kExp;
}

// One pair of tiles, C[ib:ie, jb:je] (strictly below the diagonal) against its mirror, from
// row-major rows: `lt` holds C[ib:ie, jb:je] transposed (lt[j][i]), read from C once, so
// that the comparison loop below runs over i with both operands contiguous. Compiled for
// AVX-512, AVX2 and the baseline (target_clones dispatches at load time), and with
// reassociation allowed for this file (CMakeLists.txt): max and sum reductions vectorise;
// finiteness is tested on the bits, which fast-math leaves alone.
__attribute__((target_clones("avx512f", "avx2", "default")))
void compare_tile(const double* lt, const double* const* upper_rows, int64_t ni, int64_t nj, double* colsum_i,
                  double* colsum_j, double& amax, double& asym, bool& bad) {
  double mx = amax, as = asym;
  uint64_t flags = 0;
  for (int64_t j = 0; j < nj; ++j) {
    const double* a = lt + j * kTile;  // C[ib + i, jb + j] for i = 0..ni-1
    const double* b = upper_rows[j];   // C[jb + j, ib + i]
    if (j + kPrefetchRows < nj)
      for (int64_t i = 0; i < ni; i += 8) __builtin_prefetch(upper_rows[j + kPrefetchRows] + i);
    double sum_j = 0.0;
    for (int64_t i = 0; i < ni; ++i) {
      const double x = a[i], y = b[i];
      uint64_t ux, uy;
      __builtin_memcpy(&ux, &x, 8);
      __builtin_memcpy(&uy, &y, 8);
      flags |= ((ux & kExp) == kExp) | ((uy & kExp) == kExp);
      const double ax = __builtin_fabs(x), ay = __builtin_fabs(y);
      sum_j += ax;
      colsum_i[i] += ay;
      mx = ax > mx ? ax : mx;
      mx = ay > mx ? ay : mx;
      const double diff = __builtin_fabs(x - y);
      as = diff > as ? diff : as;
    }
    colsum_j[j] += sum_j;
  }
  amax = mx;
  asym = as;
  bad = bad || flags != 0;
}

template <class T>
void load_transposed(const SymInput& C, int64_t ib, int64_t ni, int64_t jb, int64_t nj, double* lt) {
  const T* c = static_cast<const T*>(C.data);
  for (int64_t i = 0; i < ni; ++i) {
    if (C.col_stride == 1 && i + kPrefetchRows < ni)
      for (int64_t j = 0; j < nj; j += 8) __builtin_prefetch(c + (ib + i + kPrefetchRows) * C.row_stride + (jb + j) * C.col_stride);
    for (int64_t j = 0; j < nj; ++j)
      lt[j * kTile + i] = static_cast<double>(c[(ib + i) * C.row_stride + (jb + j) * C.col_stride]);
  }
}

template <class T>
void load_rows(const SymInput& C, int64_t jb, int64_t nj, int64_t ib, int64_t ni, double* buf, const double** rows) {
  const T* c = static_cast<const T*>(C.data);
  for (int64_t j = 0; j < nj; ++j) {
    if (std::is_same<T, double>::value && C.col_stride == 1) {  // read in place
      rows[j] = reinterpret_cast<const double*>(c + (jb + j) * C.row_stride + ib);
      continue;
    }
    double* r = buf + j * kTile;
    for (int64_t i = 0; i < ni; ++i) r[i] = static_cast<double>(c[(jb + j) * C.row_stride + (ib + i) * C.col_stride]);
    rows[j] = r;
  }
}

// Exact location of the worst asymmetry and of the first non-finite entry within one
// tile pair; only called for the few tiles that raise the running maximum or hold a bad entry.
template <class T>
void locate(const SymInput& C, int64_t ib, int64_t ie, int64_t jb, int64_t je, Partial& p, bool find_bad) {
  const T* c = static_cast<const T*>(C.data);
  for (int64_t i = ib; i < ie; ++i)
    for (int64_t j = jb; j < std::min(je, i + 1); ++j) {
      const double lo = static_cast<double>(c[i * C.row_stride + j * C.col_stride]);
      const double up = static_cast<double>(c[j * C.row_stride + i * C.col_stride]);
      if (find_bad && nonfinite(lo)) p.note_bad(i, j);
      if (find_bad && nonfinite(up)) p.note_bad(j, i);
      const double diff = std::fabs(lo - up);
      if (diff >= p.asym && (p.asym_i < 0 || diff > p.located)) p.located = diff, p.asym_i = i, p.asym_j = j;
    }
}

template <class T>
void scan_rows(const SymInput& C, int64_t r0, int64_t r1, Partial& p) {
  std::vector<double> lt(kTile * kTile), buf(kTile * kTile);
  std::vector<const double*> rows(kTile);
  for (int64_t ib = r0; ib < r1; ib += kTile) {
    const int64_t ie = std::min(ib + kTile, r1), ni = ie - ib;
    for (int64_t jb = 0; jb < ie; jb += kTile) {
      const int64_t je = std::min(jb + kTile, ie), nj = je - jb;
      const bool diagonal = je > ib;  // the tile reaches the diagonal
      load_transposed<T>(C, ib, ni, jb, nj, lt.data());
      load_rows<T>(C, jb, nj, ib, ni, buf.data(), rows.data());
      const double worst = p.asym;
      bool bad = false;
      if (!diagonal) {
        compare_tile(lt.data(), rows.data(), ni, nj, p.colsum.data() + ib, p.colsum.data() + jb, p.amax, p.asym, bad);
      } else {
        // A tile crossing the diagonal (rows split between threads need not align with
        // columns): compare the part with j < i element by element, in the locate path's order.
        for (int64_t i = ib; i < ie; ++i)
          for (int64_t j = jb; j < std::min(je, i + 1); ++j) {
            const double lo = lt[(j - jb) * kTile + (i - ib)], up = rows[j - jb][i - ib];
            bad = bad || nonfinite(lo) || nonfinite(up);
            p.colsum[j] += std::fabs(lo);
            if (i != j) p.colsum[i] += std::fabs(up);
            p.amax = std::max(p.amax, std::max(std::fabs(lo), std::fabs(up)));
            p.asym = std::max(p.asym, std::fabs(lo - up));
          }
      }
      if (bad || p.asym > worst) locate<T>(C, ib, ie, jb, je, p, bad);
    }
    for (int64_t i = ib; i < ie; ++i) {
      const double v = static_cast<double>(static_cast<const T*>(C.data)[i * C.row_stride + i * C.col_stride]);
      if (v < p.diag_min) p.diag_min = v, p.diag_min_i = i;
    }
  }
}

}  // namespace

SymStats symmetric_stats(const SymInput& C) {
  const int nt = worker_threads();
  std::vector<Partial> parts(nt);
  for (auto& p : parts) p.colsum.assign(C.n, 0.0);
  parallel_triangle_rows(C.n, [&](int t, int64_t r0, int64_t r1) {
    if (C.dtype == DType::f32)
      scan_rows<float>(C, r0, r1, parts[t]);
    else
      scan_rows<double>(C, r0, r1, parts[t]);
  });
  SymStats s;
  Partial& all = parts[0];
  for (int t = 1; t < nt; ++t) {
    const Partial& p = parts[t];
    for (int64_t j = 0; j < C.n; ++j) all.colsum[j] += p.colsum[j];
    all.amax = std::max(all.amax, p.amax);
    if (p.asym > all.asym) all.asym = p.asym;
    if (p.asym_i >= 0 && (all.asym_i < 0 || p.located > all.located))
      all.located = p.located, all.asym_i = p.asym_i, all.asym_j = p.asym_j;
    if (p.bad_i >= 0) all.note_bad(p.bad_i, p.bad_j);
    if (p.diag_min < all.diag_min) all.diag_min = p.diag_min, all.diag_min_i = p.diag_min_i;
  }
  s.norm1 = C.n ? *std::max_element(all.colsum.begin(), all.colsum.end()) : 0.0;
  s.amax = all.amax;
  s.asym = all.asym;
  s.asym_i = std::max<int64_t>(all.asym_i, 0);
  s.asym_j = std::max<int64_t>(all.asym_j, 0);
  s.bad_i = all.bad_i;
  s.bad_j = all.bad_j;
  s.diag_min = all.diag_min;
  s.diag_min_i = all.diag_min_i;
  return s;
}

}  // namespace pmsolve
