#include "loaded_mkl.h"

#include <dlfcn.h>
#include <link.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>

namespace pmsolve {
namespace {

using potrf_fn = void (*)(const char* uplo, const int32_t* n, double* a, const int32_t* lda, int32_t* info);
// Fortran binding (torch's export takes the count by reference): sets this thread's MKL thread
// count (0 = back to the global one) and returns the previous local setting.
using set_threads_fn = int32_t (*)(const int32_t* n);

struct Found {
  std::string path;
  potrf_fn potrf = nullptr;
  set_threads_fn set_threads = nullptr;
};

// Looks each loaded object up by its own path with RTLD_NOLOAD: it takes no new reference
// to anything that is not loaded, and finds symbols in objects torch loaded RTLD_LOCAL.
int find_mkl(dl_phdr_info* info, size_t, void* out) {
  auto* found = static_cast<Found*>(out);
  const char* path = info->dlpi_name;
  if (found->potrf != nullptr || path == nullptr || *path == '\0') return 0;
  void* h = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
  if (h == nullptr) return 0;
  // dlsym on a handle also searches the object's dependencies: dladdr says which object
  // defines each symbol, and both must come from the same one.
  void* potrf = dlsym(h, "dpotrf_");
  void* mkl = dlsym(h, "mkl_get_max_threads");
  Dl_info at_potrf{}, at_mkl{};
  if (potrf != nullptr && mkl != nullptr && dladdr(potrf, &at_potrf) != 0 && dladdr(mkl, &at_mkl) != 0 &&
      at_potrf.dli_fbase == at_mkl.dli_fbase && at_potrf.dli_fname != nullptr) {
    found->path = at_potrf.dli_fname;
    found->potrf = reinterpret_cast<potrf_fn>(potrf);
    found->set_threads = reinterpret_cast<set_threads_fn>(dlsym(h, "mkl_set_num_threads_local_"));
  }
  dlclose(h);  // the object stays loaded: it was loaded before (RTLD_NOLOAD) by its owner
  return 0;
}

// An ILP64 MKL would read our 32-bit integers wrongly. Passing n = lda = 2 in 64-bit slots
// reads as 2 either way; the 64-bit info slot tells the two apart: LP64 writes its low half
// only. Then the factor of [[4, 2], [2, 5]] must be [[2, 0], [1, 2]].
bool is_lp64_and_correct(potrf_fn potrf) {
  const int64_t two[2] = {2, 2};
  int64_t info = int64_t{0x5a5a5a5a} << 32;
  double a[4] = {4.0, 2.0, 2.0, 5.0};
  potrf("U", reinterpret_cast<const int32_t*>(&two[0]), a, reinterpret_cast<const int32_t*>(&two[1]),
        reinterpret_cast<int32_t*>(&info));
  const bool lp64 = (info >> 32) == 0x5a5a5a5a && static_cast<int32_t>(info & 0xffffffff) == 0;
  return lp64 && std::fabs(a[0] - 2.0) < 1e-15 && std::fabs(a[2] - 1.0) < 1e-15 && std::fabs(a[3] - 2.0) < 1e-15;
}

std::once_flag g_search;
Found g_found;
bool g_enabled = false;

const Found& found() {
  std::call_once(g_search, [] {
    Found f;
    dl_iterate_phdr(find_mkl, &f);
    if (f.potrf != nullptr && is_lp64_and_correct(f.potrf)) g_found = f;
  });
  return g_found;
}

}  // namespace

std::string loaded_mkl_path() { return found().path; }

bool mkl_potrf_enabled() { return g_enabled; }

void set_mkl_potrf_enabled(bool on) { g_enabled = on && found().potrf != nullptr; }

blas_int mkl_potrf_lower(double* a, blas_int n, blas_int lda) {
  const Found& mkl = found();
  // As many threads as the OpenBLAS kernels get (pmsolve keeps that equal to torch's count or
  // PMSOLVE_NUM_THREADS), for this call only.
  const int32_t threads = blas_get_num_threads();
  const int32_t before = mkl.set_threads ? mkl.set_threads(&threads) : 0;
  blas_int info = 0;
  mkl.potrf("U", &n, a, &lda, &info);
  if (mkl.set_threads) mkl.set_threads(&before);
  return info;
}

}  // namespace pmsolve
