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

#include "f64_gemm.h"
#include "f64_trsm.h"
#include "parallel.h"
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

// Threads for a solve's level-3 work with `cols` right-hand sides (or keys) on f64_gemm.h's
// kernel, or 0 for OpenBLAS's routes. Taken before any SerialBlas scope: worker_threads()
// follows the BLAS setting, which that scope lowers to 1.
int own_solve_threads(blas_int cols) {
  return cols >= kOwnSolveMinCols && f64_gemm_enabled() ? worker_threads() : 0;
}

// The lower triangle of G = ZᵀZ (Z d × n). `threads` > 0: on f64_gemm.h's kernel (G's lower
// triangle −= ZᵀZ from zero, then negated: both exact), else OpenBLAS's dsyrk.
void gram_lower(Mat Z, Mat G, int threads) {
  const blas_int n = Z.cols;
  if (threads <= 0) {
    scipy_cblas_dsyrk(CblasRowMajor, CblasLower, CblasTrans, n, Z.rows, 1.0, Z.data, Z.ld, 0.0, G.data, G.ld);
    return;
  }
  for (blas_int i = 0; i < n; ++i) std::fill_n(G.data + static_cast<int64_t>(i) * G.ld, i + 1, 0.0);
  const Operand Zt{Z.data, Z.ld, /*transposed=*/true};
  f64_gemm_sub(n, n, Z.rows, Zt, Zt, G.data, G.ld, /*lower_only=*/true, threads);
  for (blas_int i = 0; i < n; ++i)
    for (blas_int j = 0; j <= i; ++j) G.data[static_cast<int64_t>(i) * G.ld + j] *= -1.0;
}

// ‖A‖₁ of a symmetric matrix, as its max row sum (= max column sum), read along the rows.
double one_norm_symmetric(Mat a) {
  double best = 0.0;
  for (blas_int i = 0; i < a.rows; ++i) {
    const double* row = a.data + static_cast<int64_t>(i) * a.ld;
    double s = 0.0;
    for (blas_int j = 0; j < a.cols; ++j) s += std::abs(row[j]);
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

// Z[off, off + m) := L₍ₒₒ₎⁻¹ Z (forward) or L₍ₒₒ₎⁻ᵀ Z (backward) for the diagonal block of L
// that starts at (off, off), by recursive halving: the off-diagonal block becomes one GEMM,
// so ~(1 - cutoff/d) of the 2·d²·n flops run at the GEMM rate. Why by hand: MKL's dtrsm
// (through torch) ran at ~78 % of its dgemm rate at d = 6400, n = 256, less for fewer
// columns, and OpenBLAS's dtrsm slower still (measured on a Zen 3; docs/history.md).
// Column-major L is the row-major U = Lᵀ, so its block L21 is U12 read transposed.
// `threads` > 0: the GEMMs on f64_gemm.h's kernel with that many threads and the leaves'
// dtrsm serial on column slices in parallel (inside a SerialBlas scope); 0: OpenBLAS's own.
void solve_block(LowerFactor L, bool transpose, Mat Z, blas_int off, blas_int m, blas_int cutoff, int threads) {
  const blas_int n = Z.cols;
  double* z0 = Z.data + static_cast<int64_t>(off) * Z.ld;
  if (m <= cutoff) {
    const CBLAS_UPLO uplo = L.col_major ? CblasUpper : CblasLower;
    const bool trans = transpose != L.col_major;
    const double* l = L.data + static_cast<int64_t>(off) * L.ld + off;
    const int nt = std::max(1, std::min(threads, static_cast<int>(n / 16)));
    run_on_threads(nt, [&](int t) {
      const blas_int c0 = n * t / nt, c1 = n * (t + 1) / nt;
      if (c1 > c0)
        scipy_cblas_dtrsm(CblasRowMajor, CblasLeft, uplo, trans ? CblasTrans : CblasNoTrans, CblasNonUnit, m,
                          c1 - c0, 1.0, l, L.ld, z0 + c0, Z.ld);
    });
    return;
  }
  const blas_int m1 = half_split(m), m2 = m - m1;
  double* z1 = z0;
  double* z2 = z0 + static_cast<int64_t>(m1) * Z.ld;
  // L21 (m2 × m1): row-major at (off + m1, off); column-major as U12 (m1 × m2) at (off, off + m1).
  const double* l21 = L.col_major ? L.data + static_cast<int64_t>(off) * L.ld + off + m1
                                  : L.data + static_cast<int64_t>(off + m1) * L.ld + off;
  // For the kernel (C −= A·Bᵀ): Z's blocks are Bᵀ, so B reads them transposed.
  if (!transpose) {  // [L11 0; L21 L22] [X1; X2] = [Z1; Z2]
    solve_block(L, false, Z, off, m1, cutoff, threads);
    if (threads > 0)
      f64_gemm_sub(m2, n, m1, Operand{l21, L.ld, L.col_major}, Operand{z1, Z.ld, true}, z2, Z.ld, false, threads);
    else
      scipy_cblas_dgemm(CblasRowMajor, L.col_major ? CblasTrans : CblasNoTrans, CblasNoTrans, m2, n, m1, -1.0, l21,
                        L.ld, z1, Z.ld, 1.0, z2, Z.ld);
    solve_block(L, false, Z, off + m1, m2, cutoff, threads);
  } else {  // [L11ᵀ L21ᵀ; 0 L22ᵀ] [X1; X2] = [Z1; Z2]
    solve_block(L, true, Z, off + m1, m2, cutoff, threads);
    if (threads > 0)
      f64_gemm_sub(m1, n, m2, Operand{l21, L.ld, !L.col_major}, Operand{z2, Z.ld, true}, z1, Z.ld, false, threads);
    else
      scipy_cblas_dgemm(CblasRowMajor, L.col_major ? CblasNoTrans : CblasTrans, CblasNoTrans, m1, n, m2, -1.0, l21,
                        L.ld, z2, Z.ld, 1.0, z1, Z.ld);
    solve_block(L, true, Z, off, m1, cutoff, threads);
  }
}

}  // namespace

void triangular_solve(LowerFactor L, bool transpose, Mat Z, blas_int cutoff) {
  cutoff = std::max<blas_int>(cutoff, 1);
  const int threads = L.n > cutoff ? own_solve_threads(Z.cols) : 0;
  if (threads > 0) {
    SerialBlas serial;
    solve_block(L, transpose, Z, 0, L.n, cutoff, threads);
    return;
  }
  solve_block(L, transpose, Z, 0, L.n, cutoff, 0);
}

PMResult pm_whitened(Mat Z, const double* mus, int n_mus, double max_cond, Mat G, Mat M) {
  const blas_int n = Z.cols;
  const int own_threads = own_solve_threads(n);
  gram_lower(Z, G, own_threads);
  mirror_lower(G);  // an exactly symmetric G, positive semi-definite up to rounding in its entries
  const double anorm_g = one_norm_symmetric(G);

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
  // Z (G + μI)⁻¹ = Z M⁻ᵀ M⁻¹, from the right.
  if (own_threads > 0) {
    SerialBlas serial;
    for (bool transpose : {true, false})
      trsm_right_lower(M.data, M.ld, n, Z.data, Z.ld, Z.rows, transpose, kOwnLeaf, own_threads);
    return res;
  }
  scipy_cblas_dtrsm(CblasRowMajor, CblasRight, CblasLower, CblasTrans, CblasNonUnit, Z.rows, Z.cols, 1.0, M.data,
                    M.ld, Z.data, Z.ld);
  scipy_cblas_dtrsm(CblasRowMajor, CblasRight, CblasLower, CblasNoTrans, CblasNonUnit, Z.rows, Z.cols, 1.0, M.data,
                    M.ld, Z.data, Z.ld);
  return res;
}

PMResult pm_solve(LowerFactor L, Mat K, const double* mus, int n_mus, double max_cond, PMOutputs out) {
  Mat Z = out.B;
  copy_rows(K, Z);
  triangular_solve(L, false, Z);
  const PMResult res = pm_whitened(Z, mus, n_mus, max_cond, out.G, out.M);
  if (res.mu_index >= 0) triangular_solve(L, true, Z);  // B = L⁻ᵀ Z (G + μI)⁻¹
  return res;
}

}  // namespace pmsolve
