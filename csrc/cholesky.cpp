// Recursive Cholesky on level-3 BLAS, adaptive jitter, condition estimate.
//
// Why recursive: LAPACK's blocked dpotrf spends most of its time in narrow
// panel updates; splitting the matrix in halves instead puts almost all the
// flops (n³/3) into two large calls per level, a triangular solve and a
// lower-triangle-only GEMM, which run close to the GEMM rate on two threads.
// The measurements behind the cutoff are in docs/history.md §2.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "f64_gemm.h"
#include "f64_trsm.h"
#include "loaded_mkl.h"
#include "parallel.h"
#include "solver.h"

namespace pmsolve {
namespace {

blas_int lapack_potrf_lower(double* a, blas_int n, blas_int lda) {
  blas_int info = 0;
  // Row-major lower is column-major upper (see solver.h).
  scipy_dpotrf_("U", &n, a, &lda, &info, 1);
  return info;
}

// Source element (i, j) of a strided input, converted to fp64.
template <class T>
struct Strided {
  const T* p;
  int64_t rs, cs;
  double operator()(int64_t i, int64_t j) const { return static_cast<double>(p[i * rs + j * cs]); }
};

// out.lower = C.lower + shift·I, in tiles so that a column-major (transposed) C
// is read with cache-friendly strides too; out's strict upper triangle is zeroed on the way
// (the factor's, which the kernels never write): whole rows are written once, in parallel,
// where a separate one-thread memset afterwards cost 57 ms at d = 6400 (Intel Xeon).
template <class T>
void copy_lower_shifted(const SymInput& C, Mat out, double shift, bool zero_upper) {
  constexpr int64_t tile = 64;
  const Strided<T> src{static_cast<const T*>(C.data), C.row_stride, C.col_stride};
  const int64_t n = C.n;
  // Memory bound (0.05-0.08 s at d = 6400 on one thread): split over the BLAS's threads, tiles
  // of rows dealt round-robin, which balances the triangle's reads and the full rows' writes.
  parallel_row_tiles(n, tile, [&](int64_t ib, int64_t ie) {
    for (int64_t jb = 0; jb < ie; jb += tile) {
      for (int64_t i = ib; i < ie; ++i) {
        double* dst = out.data + i * out.ld;
        const int64_t je = std::min(jb + tile, i + 1);
        for (int64_t j = jb; j < je; ++j) dst[j] = src(i, j);
      }
    }
    for (int64_t i = ib; i < ie; ++i) {
      out.data[i * out.ld + i] += shift;
      if (zero_upper) std::memset(out.data + i * out.ld + i + 1, 0, sizeof(double) * (n - i - 1));
    }
  });
}

void load_shifted(const SymInput& C, Mat out, double shift, bool zero_upper) {
  if (C.dtype == DType::f32)
    copy_lower_shifted<float>(C, out, shift, zero_upper);
  else
    copy_lower_shifted<double>(C, out, shift, zero_upper);
}

// Strict lower triangle copied onto the strict upper one (to_upper) or back, in tiles so that
// the transposed side is read or written in cache-sized blocks. Threads own disjoint rows i of
// the lower triangle and so disjoint columns i of the upper one.
void mirror_triangle(Mat a, bool to_upper) {
  constexpr int64_t tile = 64;
  const int64_t ld = a.ld;
  double* p = a.data;
  parallel_triangle_rows(a.rows, [&](int, int64_t r0, int64_t r1) {
    for (int64_t ib = r0; ib < r1; ib += tile) {
      const int64_t ie = std::min(ib + tile, r1);
      for (int64_t jb = 0; jb < ie; jb += tile) {
        for (int64_t i = ib; i < ie; ++i) {
          const int64_t je = std::min(jb + tile, i);
          for (int64_t j = jb; j < je; ++j) {
            if (to_upper)
              p[j * ld + i] = p[i * ld + j];
            else
              p[i * ld + j] = p[j * ld + i];
          }
        }
      }
    }
  });
}

void set_diagonal(Mat a, const std::vector<double>& diag, double shift) {
  for (blas_int i = 0; i < a.rows; ++i) a.data[static_cast<int64_t>(i) * a.ld + i] = diag[i] + shift;
}

// The whole factorisation: MKL's dpotrf when switched on (loaded_mkl.h), else the recursion.
blas_int factor_lower(Mat a, blas_int cutoff) {
  return mkl_potrf_enabled() ? mkl_potrf_lower(a.data, a.rows, a.ld) : cholesky_lower(a.data, a.rows, a.ld, cutoff);
}

// Memory bound (57 ms at d = 6400 on one thread, Intel Xeon): split over the threads in tiles
// of rows dealt round-robin (the upper triangle's rows shrink).
void zero_strict_upper(Mat a) {
  parallel_row_tiles(a.rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i)
      std::memset(a.data + i * a.ld + i + 1, 0, sizeof(double) * (a.cols - i - 1));
  });
}

// The recursion of cholesky_lower with all level-3 work in f64_gemm_nt_sub on our threads
// (see f64_gemm.h for when); leaves (≤ leaf) are OpenBLAS's dpotrf, serial.
blas_int cholesky_lower_own(double* a, blas_int n, blas_int lda, blas_int leaf, int threads) {
  if (n <= leaf) return lapack_potrf_lower(a, n, lda);
  const blas_int n1 = half_split(n), n2 = n - n1;
  if (blas_int info = cholesky_lower_own(a, n1, lda, leaf, threads)) return info;
  double* a21 = a + static_cast<int64_t>(n1) * lda;
  double* a22 = a21 + n1;
  trsm_right_lower(a, lda, n1, a21, lda, n2, /*transpose=*/true, leaf, threads);
  f64_gemm_nt_sub(n2, n2, n1, a21, lda, a21, lda, a22, lda, /*lower_only=*/true, threads);
  const blas_int info = cholesky_lower_own(a22, n2, lda, leaf, threads);
  return info ? info + n1 : 0;
}

}  // namespace

blas_int cholesky_lower(double* a, blas_int n, blas_int lda, blas_int cutoff) {
  if (n > std::max<blas_int>(cutoff, 1) && f64_gemm_enabled()) {
    const int threads = worker_threads();  // before SerialBlas: it follows the BLAS setting
    SerialBlas serial;
    return cholesky_lower_own(a, n, lda, std::min(std::max<blas_int>(cutoff, 1), kOwnLeaf), threads);
  }
  return cholesky_lower_blas(a, n, lda, cutoff);
}

blas_int cholesky_lower_blas(double* a, blas_int n, blas_int lda, blas_int cutoff) {
  if (n <= std::max<blas_int>(cutoff, 1)) return lapack_potrf_lower(a, n, lda);
  const blas_int n1 = half_split(n), n2 = n - n1;
  // [A11 .; A21 A22]: L11 = chol(A11), L21 = A21 L11⁻ᵀ, L22 = chol(A22 - L21 L21ᵀ).
  if (blas_int info = cholesky_lower_blas(a, n1, lda, cutoff)) return info;
  double* a21 = a + static_cast<int64_t>(n1) * lda;
  double* a22 = a21 + n1;
  scipy_cblas_dtrsm(CblasRowMajor, CblasRight, CblasLower, CblasTrans, CblasNonUnit, n2, n1, 1.0, a, lda, a21,
                    lda);
  // GEMMT (lower triangle of a GEMM) rather than SYRK: same flops, and OpenBLAS 0.3.34
  // ran the whole factorisation 4–9 % faster with it at d = 6400 and ~30 % at d = 4096
  // on two threads here (bench/cholesky_variants.cpp measures it).
  scipy_cblas_dgemmt(CblasRowMajor, CblasLower, CblasNoTrans, CblasTrans, n2, n1, -1.0, a21, lda, a21, lda, 1.0, a22,
                     lda);
  const blas_int info = cholesky_lower_blas(a22, n2, lda, cutoff);
  return info ? info + n1 : 0;
}

int cholesky_jittered(const SymInput& C, Mat out, const double* shifts, int n_shifts, blas_int cutoff,
                      bool out_zeroed) {
  for (int k = 0; k < n_shifts; ++k) {
    // A failed attempt leaves a partial factor in the lower triangle: reload from
    // C (read-only) instead of keeping a second d × d copy. The upper triangle, once zero,
    // stays so (neither kernel writes it).
    load_shifted(C, out, shifts[k], /*zero_upper=*/!out_zeroed && k == 0);
    if (factor_lower(out, cutoff) == 0) return k;
  }
  return -1;
}

int cholesky_jittered_inplace(Mat a, const double* shifts, int n_shifts, blas_int cutoff, bool upper_is_mirror) {
  std::vector<double> diag(a.rows);
  for (blas_int i = 0; i < a.rows; ++i) diag[i] = a.data[static_cast<int64_t>(i) * a.ld + i];
  if (!upper_is_mirror) mirror_triangle(a, /*to_upper=*/true);  // the backup a failed attempt reloads from
  for (int k = 0; k < n_shifts; ++k) {
    if (k > 0) mirror_triangle(a, /*to_upper=*/false);
    set_diagonal(a, diag, shifts[k]);
    // Neither kernel reads or writes the strict upper triangle (LAPACK's uplo contract for
    // dpotrf): the backup survives.
    if (factor_lower(a, cutoff) == 0) {
      zero_strict_upper(a);
      return k;
    }
  }
  mirror_triangle(a, /*to_upper=*/false);
  set_diagonal(a, diag, 0.0);
  return -1;
}

double cond_estimate(LowerFactor L, double anorm) {
  const blas_int n = L.n;
  if (n == 0) return 1.0;
  // LAPACK is column-major: a row-major lower factor is its upper one.
  const char* uplo = L.col_major ? "L" : "U";
  std::vector<double> work(3 * static_cast<size_t>(n));
  std::vector<blas_int> iwork(n);
  double rcond = 0.0;
  blas_int info = 0;
  scipy_dpocon_(uplo, &n, L.data, &L.ld, &anorm, &rcond, work.data(), iwork.data(), &info, 1);
  return rcond > 0.0 ? 1.0 / rcond : std::numeric_limits<double>::infinity();
}

}  // namespace pmsolve
