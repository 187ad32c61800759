// Placeholder until the covariance accumulator bindings land (issue #3).
#include <pybind11/pybind11.h>
namespace py = pybind11;
void register_stats(py::module_& m) {}
