// BLAS/LAPACK from the scipy-openblas32 wheel: every symbol carries a
// `scipy_` prefix and integers are 32-bit. The wheel's cblas.h is prefixed
// correctly; its lapack.h mangles names without the prefix, so the few LAPACK
// routines we call are declared here by hand (Fortran ABI, hidden string
// lengths at the end). Everything in csrc/ reaches BLAS through this file.
#pragma once
#include <cblas.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace pmsolve {
using blas_int = int32_t;

std::string blas_config();
void blas_set_num_threads(int n);
int blas_get_num_threads();
// OpenBLAS's kernel sets with AVX-512 (DYNAMIC_ARCH x86_64 builds, 0.3.34), lower case.
inline constexpr const char* kOpenblasAvx512Cores[] = {"skylakex", "cooperlake", "sapphirerapids"};
// Whether OpenBLAS runs one of them (the core it selected, or OPENBLAS_CORETYPE forced): the
// kernels in f32_gram.h and f64_gemm.h run by default only where it does not.
bool openblas_core_has_avx512();

// The on/off state those kernels share: available where the CPU (and the OS, for the zmm state)
// has AVX512-F; enabled when available and switched on. The core reads no environment: the
// decision (PMSOLVE_F32_GRAM / PMSOLVE_F64_GEMM, or their automatic rule) is made in
// pmsolve/switches.py and set through the bindings when pmsolve._native loads the module, so
// the off state here is only what a module used before that sees.
class Avx512KernelSwitch {
 public:
  static bool available();
  bool enabled() const { return on_ && available(); }
  void set(bool on) { on_ = on; }

 private:
  bool on_ = false;
};

// OpenBLAS serial for a scope, for kernels that run their own threads and call OpenBLAS on each
// (the recursions on f64_gemm.h). Its pthreads workers spin for a while after each threaded
// call and then held a core that our threads needed: a 3000 × 256 × 256 update took 31 ms
// right after a threaded OpenBLAS call against 2 ms without one (standalone, OpenBLAS's
// default spin time). The setting is process-wide: nested or concurrent scopes share it, the
// first saves the thread count and the last restores it; take worker_threads() before.
class SerialBlas {
 public:
  SerialBlas();
  ~SerialBlas();
  SerialBlas(const SerialBlas&) = delete;
  SerialBlas& operator=(const SerialBlas&) = delete;
};
}  // namespace pmsolve

extern "C" {
void scipy_dpotrf_(const char* uplo, const int32_t* n, double* a, const int32_t* lda, int32_t* info, size_t);
void scipy_dpotrf2_(const char* uplo, const int32_t* n, double* a, const int32_t* lda, int32_t* info, size_t);
void scipy_dpocon_(const char* uplo, const int32_t* n, const double* a, const int32_t* lda, const double* anorm,
                   double* rcond, double* work, int32_t* iwork, int32_t* info, size_t);
}
