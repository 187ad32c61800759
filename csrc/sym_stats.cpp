// One pass over a preservation matrix C for everything factorize must know before it
// trusts C: finiteness, its 1-norm (for the condition estimate), max|C|, the worst
// asymmetry and the smallest diagonal entry. torch needed three passes with
// temporaries for this (0.13–0.17 s at d = 6400); here each element pair (C_ij, C_ji)
// is read once, in tiles, on the BLAS's threads.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "parallel.h"
#include "solver.h"

namespace pmsolve {
namespace {

struct Partial {
  std::vector<double> colsum;
  double amax = 0.0;
  double asym = 0.0;
  int64_t asym_i = 0, asym_j = 0;
  int64_t bad_i = -1, bad_j = -1;
  double diag_min = std::numeric_limits<double>::infinity();
  int64_t diag_min_i = -1;

  void note_bad(int64_t i, int64_t j) {  // keep the first in row-major order
    if (bad_i < 0 || i < bad_i || (i == bad_i && j < bad_j)) bad_i = i, bad_j = j;
  }
};

template <class T>
void scan_rows(const SymInput& C, int64_t r0, int64_t r1, Partial& p) {
  constexpr int64_t tile = 64;
  const T* c = static_cast<const T*>(C.data);
  const int64_t rs = C.row_stride, cs = C.col_stride;
  for (int64_t ib = r0; ib < r1; ib += tile) {
    const int64_t ie = std::min(ib + tile, r1);
    for (int64_t jb = 0; jb < ie; jb += tile) {
      for (int64_t i = ib; i < ie; ++i) {
        const int64_t je = std::min(jb + tile, i + 1);
        for (int64_t j = jb; j < je; ++j) {
          const double lo = static_cast<double>(c[i * rs + j * cs]);  // C_ij, i >= j
          const double up = static_cast<double>(c[j * rs + i * cs]);  // C_ji
          if (!std::isfinite(lo)) p.note_bad(i, j);
          if (!std::isfinite(up)) p.note_bad(j, i);
          const double alo = std::fabs(lo), aup = std::fabs(up);
          p.colsum[j] += alo;
          if (i != j) p.colsum[i] += aup;
          p.amax = std::max(p.amax, std::max(alo, aup));
          const double diff = std::fabs(lo - up);
          if (diff > p.asym) p.asym = diff, p.asym_i = i, p.asym_j = j;
        }
      }
    }
    for (int64_t i = ib; i < ie; ++i) {
      const double v = static_cast<double>(c[i * rs + i * cs]);
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
    if (p.asym > all.asym) all.asym = p.asym, all.asym_i = p.asym_i, all.asym_j = p.asym_j;
    if (p.bad_i >= 0) all.note_bad(p.bad_i, p.bad_j);
    if (p.diag_min < all.diag_min) all.diag_min = p.diag_min, all.diag_min_i = p.diag_min_i;
  }
  s.norm1 = C.n ? *std::max_element(all.colsum.begin(), all.colsum.end()) : 0.0;
  s.amax = all.amax;
  s.asym = all.asym;
  s.asym_i = all.asym_i;
  s.asym_j = all.asym_j;
  s.bad_i = all.bad_i;
  s.bad_j = all.bad_j;
  s.diag_min = all.diag_min;
  s.diag_min_i = all.diag_min_i;
  return s;
}

}  // namespace pmsolve
