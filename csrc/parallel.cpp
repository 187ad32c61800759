#include "parallel.h"

#include <link.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace pmsolve {
namespace {

int add_openmp_runtime(dl_phdr_info* info, size_t, void* out) {
  const char* path = info->dlpi_name;
  if (path == nullptr || *path == '\0') return 0;
  const char* base = std::strrchr(path, '/');
  base = base ? base + 1 : path;
  if (std::strncmp(base, "libgomp", 7) == 0 || std::strncmp(base, "libiomp", 7) == 0 ||
      std::strncmp(base, "libomp", 6) == 0)
    static_cast<std::vector<std::string>*>(out)->emplace_back(path);
  return 0;
}

// -1: not decided yet; decided on first use, when torch (imported before the extension by
// pmsolve/__init__.py) has loaded its runtime.
std::atomic<int> g_openmp{-1};
std::once_flag g_decide;

// The pool is torch's only when one OpenMP runtime is loaded (ours resolved to torch's).
bool pool_is_torchs() {
#ifdef _OPENMP
  return openmp_runtimes().size() == 1;
#else
  return false;
#endif
}

// On where possible until set_openmp_enabled says otherwise (pmsolve._native sets it from
// pmsolve/switches.py's PMSOLVE_OPENMP when it loads the module).
void decide() { g_openmp = pool_is_torchs() ? 1 : 0; }

}  // namespace

std::vector<std::string> openmp_runtimes() {
  std::vector<std::string> found;
  dl_iterate_phdr(add_openmp_runtime, &found);
  return found;
}

bool openmp_enabled() {
  std::call_once(g_decide, decide);
  return g_openmp == 1;
}

void set_openmp_enabled(bool on) {
  std::call_once(g_decide, decide);
  g_openmp = on && pool_is_torchs() ? 1 : 0;
}

}  // namespace pmsolve
