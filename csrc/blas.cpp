#include "blas.h"

namespace pmsolve {

std::string blas_config() {
  return std::string(scipy_openblas_get_config()) + " core=" + scipy_openblas_get_corename();
}

void blas_set_num_threads(int n) { scipy_openblas_set_num_threads(n); }

int blas_get_num_threads() { return scipy_openblas_get_num_threads(); }

}  // namespace pmsolve
