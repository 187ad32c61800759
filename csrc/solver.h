// The dense kernels of the preservation–memorization solve (docs/design.md §3).
//
// Layout convention: every matrix is ROW-MAJOR (torch's default), and a
// "lower" factor L is lower triangular in row-major terms, exactly as
// torch.linalg.cholesky returns it. BLAS is called through its row-major
// CBLAS interface; LAPACK (column-major only) sees the same buffer as the
// transpose, so a row-major lower triangle is passed to LAPACK as uplo='U'.
// Kernels never allocate d × d memory: the caller owns every d × d buffer.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "blas.h"

namespace pmsolve {

// Diagonal block size below which the recursive Cholesky calls LAPACK dpotrf.
// On an idle Intel Xeon, OpenBLAS's own threaded dpotrf ran at 119 GFLOP/s at d = 6400
// against 84 for the recursion cut at 128; cut at 1024 the two tie at every d measured
// (1536, 4096, 6400). A smaller cutoff only looked better on a machine loaded by other
// jobs, which is not the users' situation (docs/history.md §2).
constexpr blas_int kCholeskyCutoff = 1024;
// Leaves of the recursion on f64_gemm.h's kernel (the smaller of this and the cutoff): serial
// OpenBLAS dpotrf below this size, and its dtrsm (on row slices in parallel) below as many
// columns. At d = 6400 on a 2-core Zen 5, 128 and 512 were 2-7 % slower than 256.
constexpr blas_int kOwnLeaf = 256;

enum class DType { f32, f64 };

// A read-only square matrix of any float dtype with arbitrary element strides
// (row_stride, col_stride in elements), so transposed or sliced views need no copy.
struct SymInput {
  const void* data;
  DType dtype;
  int64_t n;
  int64_t row_stride;
  int64_t col_stride;
};

// A row-major fp64 matrix: element (i, j) at data[i * ld + j].
struct Mat {
  double* data;
  blas_int rows;
  blas_int cols;
  blas_int ld;
};

// A lower-triangular factor L, read-only, stored row-major (as the kernels here
// write it) or column-major (as torch.linalg.cholesky returns it; that buffer is
// the row-major upper triangle Lᵀ). Both are used in place, without a transpose.
struct LowerFactor {
  const double* data;
  blas_int n;
  blas_int ld;
  bool col_major;
};

// A = L Lᵀ in place on the lower triangle of the n × n row-major `a`
// (the strict upper triangle is neither read nor written).
// Returns 0, or the 1-based index of the first non-positive pivot (LAPACK's info).
// Above `cutoff`, where f64_gemm_enabled(), the recursion runs on the AVX-512 kernel of
// f64_gemm.h down to min(cutoff, kOwnLeaf) (cholesky_lower_blas: always on OpenBLAS's kernels).
blas_int cholesky_lower(double* a, blas_int n, blas_int lda, blas_int cutoff = kCholeskyCutoff);
blas_int cholesky_lower_blas(double* a, blas_int n, blas_int lda, blas_int cutoff = kCholeskyCutoff);

// What factorize checks in C before trusting it, from one pass over both triangles.
// Non-finite entries make amax/norm1/asym meaningless; bad_i/bad_j locate the first
// one in row-major order (-1 when all are finite). asym = max |C_ij - C_ji| at (asym_i, asym_j).
struct SymStats {
  double norm1 = 0.0;  // max column sum of |C| (the 1-norm), both triangles read
  double amax = 0.0;
  double asym = 0.0;
  int64_t asym_i = 0, asym_j = 0;
  int64_t bad_i = -1, bad_j = -1;
  double diag_min = 0.0;
  int64_t diag_min_i = -1;
};
SymStats symmetric_stats(const SymInput& C);

// Cholesky of C + shifts[k] I for the first k that succeeds, written into `out`
// (d × d, upper triangle zeroed) by MKL's dpotrf when mkl_potrf_enabled() (loaded_mkl.h),
// else by cholesky_lower with `cutoff`. Reads only the lower triangle of C. On failure
// the lower triangle is restored from C itself, so no second d × d buffer exists.
// Returns k, or -1 when every shift failed. out_zeroed: `out` is known to hold zeros (fresh
// anonymous pages): its upper triangle is then not written, and pages wholly inside it are
// never touched (no page faults, no memory committed for them).
int cholesky_jittered(const SymInput& C, Mat out, const double* shifts, int n_shifts,
                      blas_int cutoff = kCholeskyCutoff, bool out_zeroed = false);

// The same in place: `a` (d × d row-major fp64) holds C on entry and L (upper triangle
// zeroed) on success. Its strict upper triangle first becomes a mirror of the lower one,
// from which a failed attempt reloads the lower triangle (the diagonal is kept aside), so
// no d × d buffer is allocated at all. When every shift fails, `a` is left holding the
// symmetric matrix whose lower triangle is C's (C itself when C was exactly symmetric).
// upper_is_mirror: the caller knows C is exactly symmetric, so its upper triangle already is
// that backup and the mirroring pass (53 ms at d = 6400) is skipped.
int cholesky_jittered_inplace(Mat a, const double* shifts, int n_shifts, blas_int cutoff = kCholeskyCutoff,
                              bool upper_is_mirror = false);

// 1-norm condition estimate of A = L Lᵀ given ‖A‖₁ (LAPACK dpocon, O(n²)).
// Returns +inf when A is numerically singular (rcond = 0).
double cond_estimate(LowerFactor L, double anorm);

// X := (L Lᵀ)⁻¹ X for the vectors stored as the rows of X (k × n), L row-major: streamed at
// memory bandwidth, several vectors per read of L (csrc/spd_apply.cpp).
void spd_apply_inverse(LowerFactor L, Mat X);

// Split point of the recursive kernels: half, rounded down to a multiple of 8 so that
// sub-blocks start on 64-byte boundaries when the buffer does.
inline blas_int half_split(blas_int n) { return std::max<blas_int>(1, (n / 2) & ~blas_int{7}); }

// Diagonal block size below which triangular_solve calls dtrsm (docs/design.md §5).
constexpr blas_int kTrsmCutoff = 256;

// Z := L⁻¹ Z (transpose = false) or L⁻ᵀ Z (transpose = true) in place; Z is d × n row-major.
// Recursive on GEMM; L in either storage (LowerFactor). The GEMMs run on f64_gemm.h's kernel
// where f64_gemm_enabled() and Z has at least kOwnSolveMinCols columns (its tiles are 24 wide).
constexpr blas_int kOwnSolveMinCols = 16;
void triangular_solve(LowerFactor L, bool transpose, Mat Z, blas_int cutoff = kTrsmCutoff);

// Outputs of pm_solve; every buffer is owned by the caller.
struct PMOutputs {
  Mat B;  // d × n: on return L⁻ᵀ Z (G + μI)⁻¹ (used as Z = L⁻¹K on the way)
  Mat G;  // n × n: Zᵀ Z, both triangles
  Mat M;  // n × n: lower Cholesky factor of G + μI for the accepted μ
};

struct PMResult {
  int mu_index;  // index of the accepted μ, -1 when none was accepted
  double cond;   // condition estimate of G + μI for it (inf when none)
};

// The n × n half of the solve on whitened keys Z = L⁻¹K (d × n): G = ZᵀZ, the first μ with
// chol(G + μI) succeeding and cond ≤ max_cond (M its factor), then Z := Z (G + μI)⁻¹ in place.
// Z is untouched when no μ is accepted.
PMResult pm_whitened(Mat Z, const double* mus, int n_mus, double max_cond, Mat G, Mat M);

// Z = L⁻¹K, G = ZᵀZ, the first μ with chol(G + μI) succeeding and cond ≤ max_cond,
// then B = L⁻ᵀ Z M⁻ᵀ M⁻¹. K is d × n (row-major), L the d × d lower factor.
PMResult pm_solve(LowerFactor L, Mat K, const double* mus, int n_mus, double max_cond, PMOutputs out);

}  // namespace pmsolve
