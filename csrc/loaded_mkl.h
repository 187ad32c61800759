// LAPACK's dpotrf from an MKL that is already loaded in the process, found by symbol.
//
// torch's x86-64 wheels link MKL statically into libtorch_cpu.so and export its Fortran
// LAPACK symbols (dpotrf_, dgemm_, ...). On an Intel Xeon that dpotrf factored d = 6400 about
// 25 % faster than our recursion on OpenBLAS, at ~92 % of MKL's dgemm rate
// (torch.linalg.cholesky calls the same routine but then spends about as long again in a tril).
// Nothing is linked: the core builds and runs without MKL, and this is off until switched on
// (pmsolve/switches.py's PMSOLVE_MKL_POTRF, by default on on Intel CPUs, where MKL is tuned).
#pragma once

#include <string>

#include "blas.h"

namespace pmsolve {

// Path of the first loaded object that exports both dpotrf_ and mkl_get_max_threads (so the
// symbol is MKL's and not another LAPACK's), whose LAPACK takes 32-bit integers (LP64; checked
// by factoring a 2 × 2 matrix), or "" when there is none.
std::string loaded_mkl_path();

// Whether cholesky_jittered(_inplace) (solver.h) hand whole factorisations to that dpotrf.
// Switching on without a usable MKL leaves it off.
bool mkl_potrf_enabled();
void set_mkl_potrf_enabled(bool on);

// MKL's dpotrf on a row-major lower triangle (column-major upper, uplo = 'U'), in MKL's own
// threads, as many as blas_get_num_threads(). Only valid while mkl_potrf_enabled(); returns
// LAPACK's info.
blas_int mkl_potrf_lower(double* a, blas_int n, blas_int lda);

}  // namespace pmsolve
