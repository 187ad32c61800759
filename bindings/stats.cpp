// pmsolve._C.CovAccumulator: streaming second moments (csrc/accumulate.h).
// All argument checks live here; the core trusts what it is given. Updates
// release the GIL (data loading and the forward pass keep running).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <mutex>
#include <optional>
#include <string>

#include "accumulate.h"
#include "amx_gram.h"
#include "dpbf16_gram.h"
#include "f32_gram.h"
#include "switch.h"

namespace py = pybind11;
using pmsolve::CovAccumulator;
using pmsolve::RowFormat;

namespace {

// One lock per accumulator: two Python threads must not fold into the same master.
struct PyCovAccumulator {
  CovAccumulator acc;
  std::mutex mu;
  PyCovAccumulator(int64_t d, bool fp64, bool centered, int64_t chunk) : acc(d, fp64, centered, chunk) {}
};

RowFormat parse_format(const std::string& fmt, const py::array& x) {
  const auto kind = x.dtype().kind();
  const auto size = x.dtype().itemsize();
  if (fmt == "f32") {
    if (kind != 'f' || size != 4) throw py::type_error("format 'f32' needs a float32 array, got dtype " + std::string(py::str(x.dtype())));
    return RowFormat::f32;
  }
  if (fmt == "bf16" || fmt == "f16") {
    if ((kind != 'u' && kind != 'i') || size != 2)
      throw py::type_error("format '" + fmt + "' needs the raw 16-bit words as a uint16/int16 array, got dtype " +
                           std::string(py::str(x.dtype())));
    return fmt == "bf16" ? RowFormat::bf16 : RowFormat::f16;
  }
  throw py::value_error("format must be 'f32', 'bf16' or 'f16', got '" + fmt + "'");
}

void update(PyCovAccumulator& self, const py::array& x, const std::string& fmt) {
  RowFormat f = parse_format(fmt, x);
  if (x.ndim() != 2) throw py::value_error("rows must be a 2-D (T × d) array, got " + std::to_string(x.ndim()) + "-D");
  if (x.shape(1) != self.acc.d())
    throw py::value_error("rows have " + std::to_string(x.shape(1)) + " columns, the accumulator has d = " +
                          std::to_string(self.acc.d()));
  if (!(x.flags() & py::array::c_style)) throw py::value_error("rows must be C-contiguous");
  const void* data = x.data();
  const int64_t rows = x.shape(0);
  py::gil_scoped_release nogil;
  std::lock_guard<std::mutex> lock(self.mu);
  self.acc.update(data, rows, f);
}

void merge(PyCovAccumulator& self, PyCovAccumulator& other) {
  if (&self == &other) throw py::value_error("cannot merge an accumulator with itself");
  if (other.acc.d() != self.acc.d())
    throw py::value_error("cannot merge d = " + std::to_string(other.acc.d()) + " into d = " + std::to_string(self.acc.d()));
  if (other.acc.centered() != self.acc.centered()) throw py::value_error("cannot merge centred with uncentred statistics");
  py::gil_scoped_release nogil;
  std::scoped_lock lock(self.mu, other.mu);
  self.acc.merge(other.acc);
}

// A d × d fp64 result: `out` when given (C-contiguous, writeable; e.g. a torch tensor's memory,
// which torch backs with huge pages), else a new array.
py::array_t<double> square_result(int64_t d, const py::object& out) {
  if (out.is_none()) return py::array_t<double>({d, d});
  auto a = py::reinterpret_borrow<py::array>(out);
  if (!a.dtype().is(py::dtype::of<double>())) throw py::type_error("out must be float64");
  if (a.ndim() != 2 || a.shape(0) != d || a.shape(1) != d || !(a.flags() & py::array::c_style) || !a.writeable())
    throw py::value_error("out must be a writeable C-contiguous d x d array, d = " + std::to_string(d));
  return py::reinterpret_borrow<py::array_t<double>>(out);
}

py::array_t<double> second_moment_sum(PyCovAccumulator& self, const py::object& out_arg) {
  auto out = square_result(self.acc.d(), out_arg);
  double* p = out.mutable_data();
  py::gil_scoped_release nogil;
  std::lock_guard<std::mutex> lock(self.mu);
  self.acc.second_moment_sum(p);
  return out;
}

py::array_t<double> centered_m2(PyCovAccumulator& self, const py::object& out_arg) {
  if (!self.acc.centered()) throw py::value_error("this accumulator does not collect centred statistics");
  auto out = square_result(self.acc.d(), out_arg);
  double* p = out.mutable_data();
  py::gil_scoped_release nogil;
  std::lock_guard<std::mutex> lock(self.mu);
  self.acc.centered_m2(p);
  return out;
}

py::object mean_vector(PyCovAccumulator& self) {
  if (!self.acc.centered()) return py::none();
  std::lock_guard<std::mutex> lock(self.mu);
  const auto& m = self.acc.mean();
  py::array_t<double> out(static_cast<py::ssize_t>(m.size()));
  std::copy(m.begin(), m.end(), out.mutable_data());
  return out;
}

void set_state(PyCovAccumulator& self, int64_t count, py::array_t<double, py::array::c_style | py::array::forcecast> mat,
               std::optional<py::array_t<double, py::array::c_style | py::array::forcecast>> mean) {
  const int64_t d = self.acc.d();
  if (count < 0) throw py::value_error("count must be non-negative");
  if (mat.ndim() != 2 || mat.shape(0) != d || mat.shape(1) != d)
    throw py::value_error("matrix must be " + std::to_string(d) + " × " + std::to_string(d));
  if (self.acc.centered() != mean.has_value())
    throw py::value_error(self.acc.centered() ? "a centred state needs its mean vector" : "an uncentred state takes no mean");
  if (mean && (mean->ndim() != 1 || mean->shape(0) != d)) throw py::value_error("mean must have length " + std::to_string(d));
  std::lock_guard<std::mutex> lock(self.mu);
  self.acc.set_state(count, mat.data(), mean ? mean->data() : nullptr);
}

}  // namespace

void register_stats(py::module_& m) {
  py::class_<PyCovAccumulator>(m, "CovAccumulator",
                               "Streaming Σxxᵀ: per-chunk symmetric rank-k products (fp32 or fp64) added into an fp64 master")
      .def(py::init([](int64_t d, bool fp64_products, bool centered, int64_t chunk_rows) {
             if (d <= 0) throw py::value_error("d must be positive, got " + std::to_string(d));
             if (chunk_rows < 0) throw py::value_error("chunk_rows must be >= 0 (0 = default)");
             return new PyCovAccumulator(d, fp64_products, centered, chunk_rows);
           }),
           py::arg("d"), py::arg("fp64_products") = false, py::arg("centered") = false, py::arg("chunk_rows") = 0)
      .def("update", &update, py::arg("rows"), py::arg("format") = "f32",
           "Add T × d rows (float32, or raw bf16/f16 words as uint16 with format='bf16'/'f16')")
      .def("merge", &merge, py::arg("other"))
      .def("second_moment_sum", &second_moment_sum, py::arg("out") = py::none(),
           "Σ xxᵀ, full symmetric d × d fp64 (into `out` when given)")
      .def("centered_m2", &centered_m2, py::arg("out") = py::none(),
           "Σ (x−μ)(x−μ)ᵀ, full symmetric d × d fp64 (centred mode; into `out` when given)")
      .def("mean_vector", &mean_vector, "running mean (centred mode), else None")
      .def("set_state", &set_state, py::arg("count"), py::arg("matrix"), py::arg("mean") = py::none(),
           "matrix: Σxxᵀ (uncentred) or M2 (centred); lower triangle read")
      .def_property_readonly("d", [](PyCovAccumulator& s) { return s.acc.d(); })
      .def_property_readonly("count", [](PyCovAccumulator& s) { return s.acc.count(); })
      .def_property_readonly("chunk_rows", [](PyCovAccumulator& s) { return s.acc.chunk_rows(); })
      .def_property_readonly("fp64_products", [](PyCovAccumulator& s) { return s.acc.fp64_products(); })
      .def_property_readonly("centered", [](PyCovAccumulator& s) { return s.acc.centered(); });
  m.attr("COV_DEFAULT_CHUNK_ROWS") = CovAccumulator::kDefaultChunkRows;
  m.def("amx_bf16_available", &pmsolve::amx_bf16_available, "the CPU has AMX-BF16 and the OS granted the tile state");
  pmsolve_bindings::def_switch(
      m, "amx_bf16", &pmsolve::amx_enabled, &pmsolve::set_amx_enabled,
      "whether bf16 chunks take the AMX Gram kernel (switch it with enable; pmsolve._native sets it from "
      "PMSOLVE_AMX, pmsolve/switches.py)");
  m.def("dpbf16_available", &pmsolve::dpbf16_available, "the CPU has AVX512-F/BW/VL and AVX512-BF16");
  pmsolve_bindings::def_switch(
      m, "dpbf16_bf16", &pmsolve::dpbf16_enabled, &pmsolve::set_dpbf16_enabled,
      "whether bf16 chunks may take the AVX512-BF16 Gram kernel when AMX is off or absent (switch it with "
      "enable; pmsolve._native sets it from PMSOLVE_DPBF16, pmsolve/switches.py)");
  m.def("f32_gram_available", &pmsolve::f32_gram_available, "the CPU has AVX512-F");
  pmsolve_bindings::def_switch(
      m, "f32_gram", &pmsolve::f32_gram_enabled, &pmsolve::set_f32_gram_enabled,
      "whether fp32 chunks take the AVX-512 Gram kernel instead of OpenBLAS's ssyrk (switch it with enable; "
      "pmsolve._native sets it from PMSOLVE_F32_GRAM, pmsolve/switches.py: by default on only where OpenBLAS's "
      "selected kernels lack AVX-512)");
  m.def(
      "bf16_gram_kernel",
      [] {
        switch (pmsolve::bf16_gram_kernel()) {
          case pmsolve::Bf16Gram::amx: return "amx";
          case pmsolve::Bf16Gram::avx512_bf16: return "avx512_bf16";
          default: return "fp32";
        }
      },
      "the kernel bf16 chunks take now: 'amx', 'avx512_bf16' or 'fp32' (widened, ssyrk)");
}
