// C −= A·Bᵀ in fp64 with AVX-512 FMAs: the Cholesky recursion's level-3 work (its trailing
// update and, by recursion, its triangular solve) where the BLAS runs narrower kernels than
// the CPU has.
//
// Why by hand: OpenBLAS's dgemm is the right tool when it runs its AVX-512 kernels, but an
// environment may hold it to AVX2 ones (OPENBLAS_CORETYPE=Haswell, as some environments set it on
// AMD machines): on a Zen 5 its dgemm ran at 116 GFLOP/s
// with Haswell's kernels against 194–208 with its own (SkylakeX), and the factorisation at
// d = 6400 took 0.90 s against 0.58 s. Same policy as f32_gram.h: this kernel runs only then
// (f64_gemm_enabled); elsewhere OpenBLAS (or MKL) stays.
#pragma once

#include <cstdint>

namespace pmsolve {

// True when the CPU (and the OS, for the zmm state) supports AVX512-F.
bool f64_gemm_available();
// Whether the Cholesky recursion uses this kernel: available and switched on
// (set_f64_gemm_enabled; pmsolve/switches.py's PMSOLVE_F64_GEMM decides, by default on where
// OpenBLAS's selected kernels lack AVX-512).
bool f64_gemm_enabled();
void set_f64_gemm_enabled(bool on);

// A row-major operand: element (i, p) at data[i·ld + p], or at data[p·ld + i] when transposed.
struct Operand {
  const double* data;
  int64_t ld;
  bool transposed = false;
};

// C[i][j] −= Σ_p A(i, p)·B(j, p) for i < m, j < n, and only j ≤ i when lower_only (the lower
// triangle of a square C; the strict upper one is neither read nor written): C −= A·Bᵀ for A
// m × k and B n × k as Operand reads them, C row-major with leading dimension ldc. Runs on
// `threads` threads.
void f64_gemm_sub(int64_t m, int64_t n, int64_t k, Operand A, Operand B, double* C, int64_t ldc, bool lower_only,
                  int threads);

// The Cholesky's case: A and B untransposed.
inline void f64_gemm_nt_sub(int64_t m, int64_t n, int64_t k, const double* A, int64_t lda, const double* B,
                            int64_t ldb, double* C, int64_t ldc, bool lower_only, int threads) {
  f64_gemm_sub(m, n, k, Operand{A, lda}, Operand{B, ldb}, C, ldc, lower_only, threads);
}

}  // namespace pmsolve
