#include "blas.h"

#include <cctype>

namespace pmsolve {

std::string blas_config() {
  return std::string(scipy_openblas_get_config()) + " core=" + scipy_openblas_get_corename();
}

void blas_set_num_threads(int n) { scipy_openblas_set_num_threads(n); }

int blas_get_num_threads() { return scipy_openblas_get_num_threads(); }

bool openblas_core_has_avx512() {
  std::string core = scipy_openblas_get_corename();
  for (char& ch : core) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  for (const char* name : kOpenblasAvx512Cores)
    if (core == name) return true;
  return false;
}

}  // namespace pmsolve
