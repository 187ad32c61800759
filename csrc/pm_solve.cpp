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

PMResult pm_whitened(Mat Z, bool transposed, const double* mus, int n_mus, double max_cond, Mat G, Mat M) {
  // Z is d × n, or its transpose (n × d) when `transposed`: the layout torch's triangular
  // solves return, taken as it is.
  const blas_int d = transposed ? Z.cols : Z.rows, n = transposed ? Z.rows : Z.cols;
  // SYRK guarantees an exactly symmetric, positive semi-definite G (up to rounding in its entries).
  scipy_cblas_dsyrk(CblasRowMajor, CblasLower, transposed ? CblasNoTrans : CblasTrans, n, d, 1.0, Z.data, Z.ld, 0.0,
                    G.data, G.ld);
  mirror_lower(G);
  const double anorm_g = one_norm(G);

  PMResult res{-1, std::numeric_limits<double>::infinity()};
  for (int k = 0; k < n_mus; ++k) {
    load_ridged(G, M, mus[k]);
    if (cholesky_lower(M.data, n, M.ld) != 0) continue;
    const double cond = cond_estimate({M.data, n, M.ld, false}, anorm_g + std::abs(mus[k]));
    if (cond <= max_cond) {
      res = {k, cond};
      break;
    }
  }
  if (res.mu_index < 0) return res;
  // Z (G + μI)⁻¹ = Z M⁻ᵀ M⁻¹ (from the right), or (G + μI)⁻¹ Zᵀ = M⁻ᵀ M⁻¹ Zᵀ (from the left).
  const CBLAS_SIDE side = transposed ? CblasLeft : CblasRight;
  const CBLAS_TRANSPOSE first = transposed ? CblasNoTrans : CblasTrans;
  const CBLAS_TRANSPOSE second = transposed ? CblasTrans : CblasNoTrans;
  scipy_cblas_dtrsm(CblasRowMajor, side, CblasLower, first, CblasNonUnit, Z.rows, Z.cols, 1.0, M.data, M.ld, Z.data,
                    Z.ld);
  scipy_cblas_dtrsm(CblasRowMajor, side, CblasLower, second, CblasNonUnit, Z.rows, Z.cols, 1.0, M.data, M.ld, Z.data,
                    Z.ld);
  return res;
}

PMResult pm_solve(LowerFactor L, Mat K, const double* mus, int n_mus, double max_cond, PMOutputs out) {
  Mat Z = out.B;
  copy_rows(K, Z);
  solve_left(L, false, Z);
  const PMResult res = pm_whitened(Z, false, mus, n_mus, max_cond, out.G, out.M);
  if (res.mu_index >= 0) solve_left(L, true, Z);  // B = L⁻ᵀ Z (G + μI)⁻¹
  return res;
}

}  // namespace pmsolve
