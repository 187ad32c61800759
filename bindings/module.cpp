// pmsolve._C: the native core. Each binding file registers one area; the
// binding layer does all argument checking and hands plain structs to csrc/.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "blas.h"
#include "loaded_mkl.h"
#include "parallel.h"
#include "switch.h"

namespace py = pybind11;

void register_solver(py::module_& m);  // bindings/solver.cpp
void register_stats(py::module_& m);   // bindings/stats.cpp
#ifdef PMSOLVE_WITH_CUDA
void register_cuda(py::module_& m);  // csrc/cuda/bindings_cuda.cpp (built with -DPMSOLVE_CUDA=ON)
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "pmsolve native core (C++17 on OpenBLAS)";
  m.attr("__version__") = PMSOLVE_VERSION_INFO;
  m.def("blas_config", &pmsolve::blas_config, "OpenBLAS build configuration and the core it selected");
  {
    py::list cores;
    for (const char* name : pmsolve::kOpenblasAvx512Cores) cores.append(name);
    m.attr("OPENBLAS_AVX512_CORES") = py::tuple(cores);  // lower case, as openblas_core_has_avx512 compares
  }
  m.def("openblas_core_has_avx512", &pmsolve::openblas_core_has_avx512,
        "whether OpenBLAS runs AVX-512 kernels (the pmsolve AVX-512 kernels default to on where it does not)");
  m.def("blas_set_num_threads", &pmsolve::blas_set_num_threads, py::arg("n"));
  m.def("blas_get_num_threads", &pmsolve::blas_get_num_threads);
  pmsolve_bindings::def_switch(
      m, "openmp", &pmsolve::openmp_enabled, &pmsolve::set_openmp_enabled,
      "whether the kernels' parallel work runs in the process's OpenMP pool (torch's) rather than on "
      "threads of their own; only possible when exactly one OpenMP runtime is loaded (pmsolve._native sets it "
      "from PMSOLVE_OPENMP, pmsolve/switches.py)");
  m.def("openmp_runtimes", &pmsolve::openmp_runtimes, "paths of the OpenMP runtimes loaded in this process");
  pmsolve_bindings::def_switch(
      m, "mkl_potrf", &pmsolve::mkl_potrf_enabled, &pmsolve::set_mkl_potrf_enabled,
      "whether factorisations (cholesky_jittered*) run MKL's dpotrf from an MKL already loaded in the "
      "process (torch's) instead of the recursion on OpenBLAS; stays off when there is none (pmsolve._native "
      "sets it from PMSOLVE_MKL_POTRF, pmsolve/switches.py)");
  m.def("loaded_mkl_path", &pmsolve::loaded_mkl_path,
        "path of the loaded object whose MKL dpotrf mkl_potrf would use, or '' when there is none");
  register_solver(m);
  register_stats(m);
#ifdef PMSOLVE_WITH_CUDA
  register_cuda(m);
#endif
}
