// Triangular solves from the right on f64_gemm.h's kernel: the Cholesky's L21 = A21·L11⁻ᵀ and
// the solve's Z·(G + μI)⁻¹ = Z·M⁻ᵀ·M⁻¹, where f64_gemm_enabled().
#pragma once

#include <cstdint>

namespace pmsolve {

// X := X·L⁻ᵀ (transpose) or X·L⁻¹ for X rows × n and L n × n lower triangular, both row-major
// with leading dimensions ldx and ldl. Recursive halving puts all but the leaves' flops into
// f64_gemm_sub on `threads` threads; leaves (n ≤ leaf) are OpenBLAS's dtrsm on row slices, one
// per thread, so call it inside a SerialBlas scope (csrc/blas.h).
void trsm_right_lower(const double* L, int64_t ldl, int64_t n, double* X, int64_t ldx, int64_t rows, bool transpose,
                      int64_t leaf, int threads);

}  // namespace pmsolve
