// pybind11 bindings of the CUDA backend (compiled only with -DPMSOLVE_CUDA=ON).
//
// Tensors arrive as raw device addresses (torch's data_ptr()), the stream as
// torch.cuda.current_stream().cuda_stream. All argument checking happens here;
// csrc/cuda trusts what it is given. Compute calls release the GIL.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "pm_cuda.h"

namespace py = pybind11;
namespace pc = pmsolve::cuda;

namespace {

[[noreturn]] void bad(const std::string& msg) { throw std::invalid_argument("pmsolve CUDA backend: " + msg); }

void* ptr(uintptr_t address) { return reinterpret_cast<void*>(address); }

pc::Context context(int device, uintptr_t stream) {
  const int count = pc::device_count();
  if (device < 0 || device >= count)
    bad("device " + std::to_string(device) + " does not exist (" + std::to_string(count) + " CUDA devices visible)");
  return {device, ptr(stream)};
}

void positive(int64_t v, const char* name) {
  if (v <= 0) bad(std::string(name) + " must be positive, got " + std::to_string(v));
}

void on_device(uintptr_t address, const pc::Context& ctx, size_t align, const char* name) {
  pc::check_device_pointer(ptr(address), ctx.device, align, name);
}

void workspace(uintptr_t address, size_t have, size_t need, const pc::Context& ctx) {
  if (have < need) bad("workspace of " + std::to_string(have) + " bytes is too small: " + std::to_string(need) + " needed");
  on_device(address, ctx, 256, "workspace");
}

void schedule(const std::vector<double>& values, const char* name) {
  if (values.empty()) bad(std::string(name) + " is empty: nothing to try");
  for (double v : values)
    if (!std::isfinite(v) || v < 0) bad(std::string(name) + " must hold finite non-negative numbers, got " + std::to_string(v));
}

pc::Dtype dtype_of(const std::string& name) {
  if (name == "float32") return pc::Dtype::f32;
  if (name == "float64") return pc::Dtype::f64;
  bad("C must be float32 or float64, got " + name);
}

}  // namespace

void register_cuda(py::module_& m) {
  m.def("cuda_device_count", &pc::device_count, "CUDA devices the driver reports (0 without driver or device)");

  m.def(
      "cuda_cholesky_workspace_bytes",
      [](int device, uintptr_t stream, int64_t d) {
        positive(d, "d");
        return pc::cholesky_workspace_bytes(context(device, stream), d);
      },
      py::arg("device"), py::arg("stream"), py::arg("d"));

  m.def(
      "cuda_cholesky_jittered",
      [](int device, uintptr_t stream, uintptr_t C, const std::string& dtype, int64_t d, uintptr_t L,
         std::vector<double> shifts, uintptr_t work, size_t work_bytes) {
        const pc::Context ctx = context(device, stream);
        positive(d, "d");
        const pc::Dtype dt = dtype_of(dtype);
        on_device(C, ctx, dt == pc::Dtype::f32 ? sizeof(float) : sizeof(double), "C");
        on_device(L, ctx, sizeof(double), "L");
        schedule(shifts, "shifts");
        workspace(work, work_bytes, pc::cholesky_workspace_bytes(ctx, d), ctx);
        py::gil_scoped_release nogil;
        return pc::cholesky_jittered({ctx, ptr(C), dt, d, static_cast<double*>(ptr(L)), std::move(shifts), ptr(work),
                                      work_bytes});
      },
      py::arg("device"), py::arg("stream"), py::arg("C"), py::arg("dtype"), py::arg("d"), py::arg("L"),
      py::arg("shifts"), py::arg("work"), py::arg("work_bytes"),
      "Cholesky of C + s I (lower triangle of row-major C read) into L for the first s that works; its index or -1");

  m.def("cuda_cond_workspace_bytes", [](int64_t n) {
    positive(n, "n");
    return pc::cond_workspace_bytes(n);
  }, py::arg("n"));

  m.def(
      "cuda_cond_estimate",
      [](int device, uintptr_t stream, uintptr_t L, int64_t n, double anorm, uintptr_t work, size_t work_bytes) {
        const pc::Context ctx = context(device, stream);
        positive(n, "n");
        if (!std::isfinite(anorm) || anorm < 0) bad("anorm must be finite and non-negative, got " + std::to_string(anorm));
        on_device(L, ctx, sizeof(double), "L");
        workspace(work, work_bytes, pc::cond_workspace_bytes(n), ctx);
        py::gil_scoped_release nogil;
        return pc::cond_estimate({ctx, static_cast<const double*>(ptr(L)), n, anorm, ptr(work), work_bytes});
      },
      py::arg("device"), py::arg("stream"), py::arg("L"), py::arg("n"), py::arg("anorm"), py::arg("work"),
      py::arg("work_bytes"), "Hager/Higham 1-norm condition estimate of L Lᵀ given ‖L Lᵀ‖₁");

  m.def(
      "cuda_pm_workspace_bytes",
      [](int device, uintptr_t stream, int64_t d, int64_t n) {
        positive(d, "d");
        positive(n, "n");
        return pc::pm_workspace_bytes(context(device, stream), d, n);
      },
      py::arg("device"), py::arg("stream"), py::arg("d"), py::arg("n"));

  m.def(
      "cuda_pm_solve",
      [](int device, uintptr_t stream, uintptr_t L, uintptr_t K, int64_t d, int64_t n, std::vector<double> mus,
         double max_cond, uintptr_t Z, uintptr_t G, uintptr_t M, uintptr_t B, uintptr_t work, size_t work_bytes) {
        const pc::Context ctx = context(device, stream);
        positive(d, "d");
        positive(n, "n");
        schedule(mus, "mus");
        if (!(max_cond > 0)) bad("max_cond must be positive, got " + std::to_string(max_cond));
        const std::pair<uintptr_t, const char*> buffers[] = {{L, "L"}, {K, "K"}, {Z, "Z"}, {G, "G"}, {M, "M"}, {B, "B"}};
        for (const auto& [address, name] : buffers) on_device(address, ctx, sizeof(double), name);
        workspace(work, work_bytes, pc::pm_workspace_bytes(ctx, d, n), ctx);
        pc::PMResult r;
        {
          py::gil_scoped_release nogil;
          r = pc::pm_solve({ctx, static_cast<const double*>(ptr(L)), static_cast<const double*>(ptr(K)), d, n,
                            std::move(mus), max_cond, static_cast<double*>(ptr(Z)), static_cast<double*>(ptr(G)),
                            static_cast<double*>(ptr(M)), static_cast<double*>(ptr(B)), ptr(work), work_bytes});
        }
        return py::make_tuple(r.mu_index, r.cond);
      },
      py::arg("device"), py::arg("stream"), py::arg("L"), py::arg("K"), py::arg("d"), py::arg("n"), py::arg("mus"),
      py::arg("max_cond"), py::arg("Z"), py::arg("G"), py::arg("M"), py::arg("B"), py::arg("work"),
      py::arg("work_bytes"),
      "Z = L⁻¹K, G = ZᵀZ, the first mu with chol(G + mu I) = M Mᵀ and cond <= max_cond, B = L⁻ᵀ Z M⁻ᵀ M⁻¹; "
      "returns (mu_index, cond)");
}
