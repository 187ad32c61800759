#include "blas.h"

#include <cctype>
#include <mutex>

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

bool Avx512KernelSwitch::available() {
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
}

namespace {
std::mutex g_serial_mutex;
int g_serial_depth = 0;
int g_serial_saved = 1;
}  // namespace

SerialBlas::SerialBlas() {
  std::lock_guard<std::mutex> lock(g_serial_mutex);
  if (g_serial_depth++ == 0) {
    g_serial_saved = blas_get_num_threads();
    blas_set_num_threads(1);
  }
}

SerialBlas::~SerialBlas() {
  std::lock_guard<std::mutex> lock(g_serial_mutex);
  if (--g_serial_depth == 0) blas_set_num_threads(g_serial_saved);
}

}  // namespace pmsolve
