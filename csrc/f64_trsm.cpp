#include "f64_trsm.h"

#include <algorithm>

#include "blas.h"
#include "f64_gemm.h"
#include "parallel.h"
#include "solver.h"

namespace pmsolve {
namespace {

void leaf_solve(const double* L, int64_t ldl, int64_t n, double* X, int64_t ldx, int64_t rows, bool transpose,
                int threads) {
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, rows / 64)));
  run_on_threads(nt, [&](int t) {
    const int64_t r0 = rows * t / nt, r1 = rows * (t + 1) / nt;
    if (r1 > r0)
      scipy_cblas_dtrsm(CblasRowMajor, CblasRight, CblasLower, transpose ? CblasTrans : CblasNoTrans, CblasNonUnit,
                        static_cast<blas_int>(r1 - r0), static_cast<blas_int>(n), 1.0, L, static_cast<blas_int>(ldl),
                        X + r0 * ldx, static_cast<blas_int>(ldx));
  });
}

}  // namespace

void trsm_right_lower(const double* L, int64_t ldl, int64_t n, double* X, int64_t ldx, int64_t rows, bool transpose,
                      int64_t leaf, int threads) {
  if (n <= leaf) return leaf_solve(L, ldl, n, X, ldx, rows, transpose, threads);
  const int64_t n1 = half_split(static_cast<blas_int>(n)), n2 = n - n1;
  const double* l21 = L + n1 * ldl;  // n2 × n1
  const double* l22 = l21 + n1;
  if (transpose) {  // [X1 X2]·[L11ᵀ L21ᵀ; 0 L22ᵀ] = [X1·L11ᵀ, X1·L21ᵀ + X2·L22ᵀ]
    trsm_right_lower(L, ldl, n1, X, ldx, rows, true, leaf, threads);
    f64_gemm_sub(rows, n2, n1, Operand{X, ldx}, Operand{l21, ldl}, X + n1, ldx, false, threads);
    trsm_right_lower(l22, ldl, n2, X + n1, ldx, rows, true, leaf, threads);
  } else {  // [X1 X2]·[L11 0; L21 L22] = [X1·L11 + X2·L21, X2·L22]; X2·L21 = A·Bᵀ with B = L21ᵀ
    trsm_right_lower(l22, ldl, n2, X + n1, ldx, rows, false, leaf, threads);
    f64_gemm_sub(rows, n1, n2, Operand{X + n1, ldx}, Operand{l21, ldl, true}, X, ldx, false, threads);
    trsm_right_lower(L, ldl, n1, X, ldx, rows, false, leaf, threads);
  }
}

}  // namespace pmsolve
