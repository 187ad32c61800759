// LAPACK's dpotrf from an MKL that is already loaded in the process, found by symbol.
//
// torch's x86-64 wheels link MKL statically into libtorch_cpu.so and export its Fortran
// LAPACK symbols (dpotrf_, dgemm_, ...). On the Intel Xeon of session 15 that dpotrf factored
// d = 6400 in 0.47 s on two threads (175 GFLOP/s, 92 % of MKL's dgemm rate), against 0.62 s
// for our recursion on OpenBLAS. (torch.linalg.cholesky calls the same routine but then spends
// another 0.4 s in a tril; bench/RESULTS.md, session 15.) Nothing is linked: the core builds
// and runs without MKL, and this is off until switched on (pmsolve's CPU backend does so on
// Intel CPUs, where MKL is tuned; PMSOLVE_MKL_POTRF=0 keeps it off).
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
