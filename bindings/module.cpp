// pmsolve._C: the native core. Each binding file registers one area; the
// binding layer does all argument checking and hands plain structs to csrc/.
#include <pybind11/pybind11.h>

#include "blas.h"

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
  m.def("blas_set_num_threads", &pmsolve::blas_set_num_threads, py::arg("n"));
  m.def("blas_get_num_threads", &pmsolve::blas_get_num_threads);
  register_solver(m);
  register_stats(m);
#ifdef PMSOLVE_WITH_CUDA
  register_cuda(m);
#endif
}
