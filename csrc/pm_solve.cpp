// The unified PM solve B = C⁻¹K (KᵀC⁻¹K + μI)⁻¹ from a cached factor C + δI = LLᵀ.
//
// Memory: one d × n buffer (Z, overwritten by B) and two n × n ones (G, M);
// L is only read. Flops: two d × d × n triangular solves dominate (2 d² n).
// The acceptance rule is the one of pmsolve/backends/torch_backend.py: the
// first μ whose Cholesky succeeds and whose condition estimate is ≤ max_cond.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "solver.h"

namespace pmsolve {
namespace {

void copy_rows(Mat src, Mat dst) {
  for (blas_int i = 0; i < src.rows; ++i)
    std::memcpy(dst.data + static_cast<int64_t>(i) * dst.ld, src.data + static_cast<int64_t>(i) * src.ld,
                sizeof(double) * src.cols);
}

// Upper triangle := transpose of the lower one.
void mirror_lower(Mat a) {
  for (blas_int i = 0; i < a.rows; ++i)
    for (blas_int j = 0; j < i; ++j) a.data[static_cast<int64_t>(j) * a.ld + i] = a.data[static_cast<int64_t>(i) * a.ld + j];
}

// ‖A‖₁ (max column sum of |a_ij|) of a full square matrix.
double one_norm(Mat a) {
  double best = 0.0;
  for (blas_int j = 0; j < a.cols; ++j) {
    double s = 0.0;
    for (blas_int i = 0; i < a.rows; ++i) s += std::abs(a.data[static_cast<int64_t>(i) * a.ld + j]);
    best = std::max(best, s);
  }
  return best;
}

// M := lower(G) + μI with a zero strict upper triangle, as torch.linalg.cholesky leaves it.
void load_ridged(Mat G, Mat M, double mu) {
  for (blas_int i = 0; i < G.rows; ++i) {
    double* dst = M.data + static_cast<int64_t>(i) * M.ld;
    std::memcpy(dst, G.data + static_cast<int64_t>(i) * G.ld, sizeof(double) * (i + 1));
    std::memset(dst + i + 1, 0, sizeof(double) * (M.cols - i - 1));
    dst[i] += mu;
  }
}

// Z := L⁻¹ Z (transpose = false) or L⁻ᵀ Z (transpose = true), for either storage of L.
void solve_left(LowerFactor L, bool transpose, Mat Z) {
  // Column-major L is the row-major upper triangle U = Lᵀ: L⁻¹ = U⁻ᵀ and L⁻ᵀ = U⁻¹.
  const CBLAS_UPLO uplo = L.col_major ? CblasUpper : CblasLower;
  const bool trans = transpose != L.col_major;
  scipy_cblas_dtrsm(CblasRowMajor, CblasLeft, uplo, trans ? CblasTrans : CblasNoTrans, CblasNonUnit, Z.rows, Z.cols,
                    1.0, L.data, L.ld, Z.data, Z.ld);
}

}  // namespace

PMResult pm_solve(LowerFactor L, Mat K, const double* mus, int n_mus, double max_cond, PMOutputs out) {
  const blas_int d = K.rows, n = K.cols;
  Mat Z = out.B;
  copy_rows(K, Z);
  solve_left(L, false, Z);
  // SYRK guarantees an exactly symmetric, positive semi-definite G (up to rounding in its entries).
  scipy_cblas_dsyrk(CblasRowMajor, CblasLower, CblasTrans, n, d, 1.0, Z.data, Z.ld, 0.0, out.G.data, out.G.ld);
  mirror_lower(out.G);
  const double anorm_g = one_norm(out.G);

  PMResult res{-1, std::numeric_limits<double>::infinity()};
  for (int k = 0; k < n_mus; ++k) {
    load_ridged(out.G, out.M, mus[k]);
    if (cholesky_lower(out.M.data, n, out.M.ld) != 0) continue;
    const double cond = cond_estimate({out.M.data, n, out.M.ld, false}, anorm_g + std::abs(mus[k]));
    if (cond <= max_cond) {
      res = {k, cond};
      break;
    }
  }
  if (res.mu_index < 0) return res;
  // B = L⁻ᵀ Z M⁻ᵀ M⁻¹, in place: (G + μI)⁻¹ = M⁻ᵀ M⁻¹ applied from the right, then L⁻ᵀ from the left.
  scipy_cblas_dtrsm(CblasRowMajor, CblasRight, CblasLower, CblasTrans, CblasNonUnit, d, n, 1.0, out.M.data, out.M.ld,
                    Z.data, Z.ld);
  scipy_cblas_dtrsm(CblasRowMajor, CblasRight, CblasLower, CblasNoTrans, CblasNonUnit, d, n, 1.0, out.M.data,
                    out.M.ld, Z.data, Z.ld);
  solve_left(L, true, Z);
  return res;
}

}  // namespace pmsolve
