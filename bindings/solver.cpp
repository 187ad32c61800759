// Placeholder until the solver bindings land (issue #2).
#include <pybind11/pybind11.h>
namespace py = pybind11;
void register_solver(py::module_& m) {}
