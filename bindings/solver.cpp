// Solver bindings: argument checking, zero-copy views of numpy buffers, GIL release.
//
// Every array crosses as a numpy array sharing memory with the caller's torch
// tensor (tensor.numpy()); nothing is converted or copied here. Layout is
// row-major throughout (csrc/solver.h); only C may be strided, because the
// factorisation copies it anyway. Outputs are allocated here, while the GIL is
// held, and filled by the kernels with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "f64_gemm.h"
#include "f64_trsm.h"
#include "parallel.h"
#include "solver.h"
#include "switch.h"

namespace py = pybind11;
using pmsolve::blas_int;
using pmsolve::Mat;

namespace {

constexpr py::ssize_t kMaxDim = std::numeric_limits<blas_int>::max();

void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

void require_2d(const py::array& a, const char* name) {
  require(a.ndim() == 2, std::string(name) + " must be 2-D, got " + std::to_string(a.ndim()) + " dimensions");
  require(a.shape(0) <= kMaxDim && a.shape(1) <= kMaxDim,
          std::string(name) + " is too large for 32-bit BLAS indices");
}

// A C-contiguous fp64 input matrix, viewed without a copy (the kernels only read it).
Mat f64_matrix(const py::array& a, const char* name) {
  if (!a.dtype().is(py::dtype::of<double>()))
    throw py::type_error(std::string(name) + " must be float64, got " + std::string(py::str(a.dtype())));
  require_2d(a, name);
  require(a.flags() & py::array::c_style, std::string(name) + " must be C-contiguous (row-major)");
  const auto rows = static_cast<blas_int>(a.shape(0)), cols = static_cast<blas_int>(a.shape(1));
  // A 0-column matrix still needs ld >= 1 for BLAS.
  return Mat{const_cast<double*>(static_cast<const double*>(a.data())), rows, cols, std::max<blas_int>(cols, 1)};
}

// A square fp64 lower factor, C- or F-contiguous, viewed without a copy.
pmsolve::LowerFactor lower_factor(const py::array& a) {
  if (!a.dtype().is(py::dtype::of<double>()))
    throw py::type_error("L must be float64, got " + std::string(py::str(a.dtype())));
  require_2d(a, "L");
  require(a.shape(0) == a.shape(1), "L must be square");
  const bool c = a.flags() & py::array::c_style, f = a.flags() & py::array::f_style;
  require(c || f, "L must be C- or F-contiguous");
  const auto n = static_cast<blas_int>(a.shape(0));
  return {static_cast<const double*>(a.data()), n, std::max<blas_int>(n, 1), !c};
}

py::array_t<double> new_matrix(py::ssize_t rows, py::ssize_t cols) { return py::array_t<double>({rows, cols}); }

Mat view(py::array_t<double>& a) {
  const auto rows = static_cast<blas_int>(a.shape(0)), cols = static_cast<blas_int>(a.shape(1));
  return Mat{a.mutable_data(), rows, cols, std::max<blas_int>(cols, 1)};
}

pmsolve::SymInput sym_input(const py::array& C) {
  require_2d(C, "C");
  require(C.shape(0) == C.shape(1), "C must be square");
  pmsolve::DType dt;
  if (C.dtype().is(py::dtype::of<float>()))
    dt = pmsolve::DType::f32;
  else if (C.dtype().is(py::dtype::of<double>()))
    dt = pmsolve::DType::f64;
  else
    throw py::type_error("C must be float32 or float64, got " + std::string(py::str(C.dtype())));
  const auto item = static_cast<py::ssize_t>(C.itemsize());
  require(C.strides(0) % item == 0 && C.strides(1) % item == 0, "C has strides that are not whole elements");
  return {C.data(), dt, C.shape(0), C.strides(0) / item, C.strides(1) / item};
}

void require_finite_nonneg(const std::vector<double>& v, const char* name) {
  for (double x : v)
    require(std::isfinite(x) && x >= 0.0, std::string(name) + " must be finite and non-negative");
}

py::tuple cholesky_jittered(const py::array& C, const std::vector<double>& shifts, blas_int cutoff,
                            const py::object& out_arg, bool out_zeroed) {
  const pmsolve::SymInput in = sym_input(C);
  require_finite_nonneg(shifts, "shifts");
  require(cutoff >= 1, "cutoff must be >= 1");
  py::array L;
  require(!out_zeroed || !out_arg.is_none(), "out_zeroed needs out");
  if (out_arg.is_none()) {
    L = new_matrix(in.n, in.n);
  } else {
    L = py::reinterpret_borrow<py::array>(out_arg);
    require(L.writeable(), "out must be writeable");
  }
  const Mat out = f64_matrix(L, "out");
  require(out.rows == in.n && out.cols == in.n, "out must be d x d like C");
  require(L.data() != C.data(), "out must not be C (use cholesky_jittered_inplace)");
  int k;
  {
    py::gil_scoped_release nogil;
    k = pmsolve::cholesky_jittered(in, out, shifts.data(), static_cast<int>(shifts.size()), cutoff, out_zeroed);
  }
  if (k < 0) return py::make_tuple(py::none(), k);
  return py::make_tuple(L, k);
}

int cholesky_jittered_inplace(py::array& C, const std::vector<double>& shifts, blas_int cutoff, bool symmetric) {
  const Mat a = f64_matrix(C, "C");
  require(C.writeable(), "C must be writeable (it is overwritten with its factor)");
  require(a.rows == a.cols, "C must be square");
  require_finite_nonneg(shifts, "shifts");
  require(cutoff >= 1, "cutoff must be >= 1");
  py::gil_scoped_release nogil;
  return pmsolve::cholesky_jittered_inplace(a, shifts.data(), static_cast<int>(shifts.size()), cutoff, symmetric);
}

py::dict symmetric_stats(const py::array& C) {
  const pmsolve::SymInput in = sym_input(C);
  pmsolve::SymStats s;
  {
    py::gil_scoped_release nogil;
    s = pmsolve::symmetric_stats(in);
  }
  py::dict out;
  out["norm1"] = s.norm1;
  out["amax"] = s.amax;
  out["asym"] = s.asym;
  out["asym_at"] = py::make_tuple(s.asym_i, s.asym_j);
  out["nonfinite_at"] = s.bad_i < 0 ? py::object(py::none()) : py::object(py::make_tuple(s.bad_i, s.bad_j));
  out["diag_min"] = s.diag_min;
  out["diag_min_at"] = s.diag_min_i;
  return out;
}

double cond_estimate(const py::array& L, double anorm) {
  const pmsolve::LowerFactor l = lower_factor(L);
  require(std::isfinite(anorm) && anorm >= 0.0, "anorm must be finite and non-negative");
  py::gil_scoped_release nogil;
  return pmsolve::cond_estimate(l, anorm);
}

void spd_apply_inverse(const py::array& L, py::array& X) {
  const pmsolve::LowerFactor l = lower_factor(L);
  require(!l.col_major || l.n <= 1, "L must be C-contiguous (row-major) here");
  const Mat x = f64_matrix(X, "X");
  require(X.writeable(), "X must be writeable (it is overwritten)");
  require(x.cols == l.n, "X must be k x d: one vector per row, d = L's size");
  py::gil_scoped_release nogil;
  pmsolve::spd_apply_inverse(l, x);
}

py::tuple pm_solve(const py::array& L, const py::array& K, const std::vector<double>& mus, double max_cond) {
  const pmsolve::LowerFactor l = lower_factor(L);
  const Mat k = f64_matrix(K, "K");
  require(k.rows == l.n, "K must have as many rows as L (d)");
  require(k.cols >= 1, "K must have at least one column");
  require_finite_nonneg(mus, "mus");
  require(max_cond > 0.0, "max_cond must be positive");
  const py::ssize_t d = k.rows, n = k.cols;
  auto B = new_matrix(d, n), G = new_matrix(n, n), M = new_matrix(n, n);
  pmsolve::PMResult res;
  {
    py::gil_scoped_release nogil;
    res = pmsolve::pm_solve(l, k, mus.data(), static_cast<int>(mus.size()), max_cond, {view(B), view(G), view(M)});
  }
  if (res.mu_index < 0) return py::make_tuple(py::none(), G, py::none(), res.mu_index, res.cond);
  return py::make_tuple(B, G, M, res.mu_index, res.cond);
}

void triangular_solve(const py::array& L, py::array& Z, bool transpose, int cutoff) {
  const pmsolve::LowerFactor l = lower_factor(L);
  const Mat z = f64_matrix(Z, "Z");
  require(Z.writeable(), "Z must be writeable (it is overwritten with the solution)");
  require(z.rows == l.n, "Z must have as many rows as L (d)");
  require(cutoff >= 1, "cutoff must be >= 1");
  py::gil_scoped_release nogil;
  pmsolve::triangular_solve(l, transpose, z, cutoff);
}

py::tuple pm_whitened(py::array& Z, const std::vector<double>& mus, double max_cond) {
  const Mat z = f64_matrix(Z, "Z");
  require(Z.writeable(), "Z must be writeable (it is overwritten with Z (G + mu I)^-1)");
  const py::ssize_t n = z.cols;
  require(n >= 1, "Z must hold at least one key");
  require_finite_nonneg(mus, "mus");
  require(max_cond > 0.0, "max_cond must be positive");
  auto G = new_matrix(n, n), M = new_matrix(n, n);
  pmsolve::PMResult res;
  {
    py::gil_scoped_release nogil;
    res = pmsolve::pm_whitened(z, mus.data(), static_cast<int>(mus.size()), max_cond, view(G), view(M));
  }
  if (res.mu_index < 0) return py::make_tuple(G, py::none(), res.mu_index, res.cond);
  return py::make_tuple(G, M, res.mu_index, res.cond);
}

// C −= A·Bᵀ (only C's lower triangle with lower_only) on the AVX-512 kernel, for tests and
// benchmarks: A m × k, B n × k, C m × n, float64. A and B may be views with contiguous rows or
// contiguous columns (a transposed matrix, a block of a larger one); C needs contiguous rows.
pmsolve::Operand operand(const py::array& a, const char* name, bool& transposed) {
  if (!a.dtype().is(py::dtype::of<double>()))
    throw py::type_error(std::string(name) + " must be float64, got " + std::string(py::str(a.dtype())));
  require(a.ndim() == 2, std::string(name) + " must be 2-D");
  const auto item = static_cast<py::ssize_t>(sizeof(double));
  const py::ssize_t rows = a.shape(0), cols = a.shape(1);
  // Strides of a dimension of length ≤ 1 mean nothing: such a dimension counts as contiguous.
  const bool row_major = cols <= 1 || a.strides(1) == item, col_major = rows <= 1 || a.strides(0) == item;
  require(row_major || col_major, std::string(name) + " must have contiguous rows or contiguous columns");
  transposed = !row_major;
  const py::ssize_t step = transposed ? a.strides(1) : a.strides(0), width = transposed ? rows : cols;
  const py::ssize_t lines = transposed ? cols : rows;
  require(lines <= 1 || (step % item == 0 && step / item >= width),
          std::string(name) + " must not overlap itself, at a whole-element stride");
  const int64_t ld = lines > 1 ? step / item : std::max<int64_t>(width, 1);
  return {static_cast<const double*>(a.data()), ld, transposed};
}

void f64_gemm_sub(const py::array& A, const py::array& B, py::array& C, bool lower_only) {
  require(pmsolve::f64_gemm_available(), "f64_gemm_sub needs a CPU with AVX512-F");
  bool a_t = false, b_t = false, c_t = false;
  const pmsolve::Operand a = operand(A, "A", a_t), b = operand(B, "B", b_t), c = operand(C, "C", c_t);
  require(!c_t, "C must have contiguous rows");
  require(C.writeable(), "C must be writeable");
  require(A.shape(1) == B.shape(1), "A and B must have as many columns (k), got " + std::to_string(A.shape(1)) +
                                        " and " + std::to_string(B.shape(1)));
  require(C.shape(0) == A.shape(0) && C.shape(1) == B.shape(0), "C must be A.rows x B.rows");
  const int64_t m = A.shape(0), n = B.shape(0), k = A.shape(1);
  double* cdata = static_cast<double*>(C.mutable_data());
  py::gil_scoped_release nogil;
  pmsolve::f64_gemm_sub(m, n, k, a, b, cdata, c.ld, lower_only, pmsolve::worker_threads());
}

// X := X·L⁻ᵀ (transpose) or X·L⁻¹ on the kernel, for tests: L row-major lower n × n, X rows × n.
void f64_trsm_right(const py::array& L, py::array& X, bool transpose, int leaf) {
  require(pmsolve::f64_gemm_available(), "f64_trsm_right needs a CPU with AVX512-F");
  const pmsolve::LowerFactor l = lower_factor(L);
  require(!l.col_major || l.n <= 1, "L must be C-contiguous (row-major) here");
  const Mat x = f64_matrix(X, "X");
  require(X.writeable(), "X must be writeable (it is overwritten with the solution)");
  require(x.cols == l.n, "X must be rows x n, n = L's size");
  require(leaf >= 1, "leaf must be >= 1");
  py::gil_scoped_release nogil;
  const int threads = pmsolve::worker_threads();  // before SerialBlas: it follows the BLAS setting
  pmsolve::SerialBlas serial;
  pmsolve::trsm_right_lower(l.data, l.ld, l.n, x.data, x.ld, x.rows, transpose, leaf, threads);
}

}  // namespace

void register_solver(py::module_& m) {
  m.def("f64_gemm_available", &pmsolve::f64_gemm_available, "the CPU has AVX512-F");
  pmsolve_bindings::def_switch(
      m, "f64_gemm", &pmsolve::f64_gemm_enabled, &pmsolve::set_f64_gemm_enabled,
      "whether the Cholesky recursion runs on the AVX-512 fp64 kernel instead of OpenBLAS's dgemmt/dtrsm "
      "(switch it with enable; pmsolve._native sets it from PMSOLVE_F64_GEMM, pmsolve/switches.py: by default "
      "on only where OpenBLAS's selected kernels lack AVX-512)");
  m.def("f64_gemm_sub", &f64_gemm_sub, py::arg("A"), py::arg("B"), py::arg("C"), py::arg("lower_only") = false,
        "C -= A Bᵀ in place on the AVX-512 fp64 kernel (only C's lower triangle with lower_only; its strict "
        "upper triangle is then neither read nor written). float64; A and B with contiguous rows or columns, C "
        "with contiguous rows.");
  m.def("f64_trsm_right", &f64_trsm_right, py::arg("L"), py::arg("X"), py::arg("transpose") = false,
        py::arg("leaf") = pmsolve::kOwnLeaf,
        "X := X L⁻ᵀ (transpose) or X L⁻¹ in place, recursively on the AVX-512 fp64 kernel with OpenBLAS's dtrsm "
        "below `leaf` columns; L n x n lower, X rows x n, both float64 C-contiguous.");
  m.def("pm_whitened", &pm_whitened, py::arg("Z"), py::arg("mus"), py::arg("max_cond"),
        "(G, M, mu_index, cond) for whitened keys Z = L⁻¹K (d × n, float64, C-contiguous), overwritten in "
        "place with Z (G + μI)⁻¹ when a μ is accepted: G = ZᵀZ, the first μ with chol(G + μI) ok and "
        "cond ≤ max_cond, M its factor.");
  m.def("triangular_solve", &triangular_solve, py::arg("L"), py::arg("Z"), py::arg("transpose") = false,
        py::arg("cutoff") = pmsolve::kTrsmCutoff,
        "Z := L⁻¹Z (or L⁻ᵀZ with transpose) in place, recursively on GEMM; L lower (float64, row- or "
        "column-major), Z d × n float64 C-contiguous.");
  m.attr("TRSM_CUTOFF") = pmsolve::kTrsmCutoff;
  m.attr("F64_GEMM_SOLVE_MIN_KEYS") = pmsolve::kOwnSolveMinCols;
  m.attr("CHOLESKY_CUTOFF") = pmsolve::kCholeskyCutoff;
  m.def("cholesky_jittered", &cholesky_jittered, py::arg("C"), py::arg("shifts"),
        py::arg("cutoff") = pmsolve::kCholeskyCutoff, py::arg("out") = py::none(), py::arg("out_zeroed") = false,
        "Lower Cholesky factor (fp64; into `out`, d x d float64 C-contiguous, else a new array) of C + s I for "
        "the first s in shifts that works, and its index; (None, -1) if none. Reads only the lower triangle "
        "of C (float32/float64, any strides). out_zeroed=True promises `out` holds zeros: its upper triangle "
        "is then left unwritten.");
  m.def("cholesky_jittered_inplace", &cholesky_jittered_inplace, py::arg("C"), py::arg("shifts"),
        py::arg("cutoff") = pmsolve::kCholeskyCutoff, py::arg("symmetric") = false,
        "cholesky_jittered in C's own storage (float64, C-contiguous, writeable): returns the index of the "
        "shift used, C then holds L (upper triangle zero); -1 if none, C then holds the symmetric matrix of "
        "its lower triangle. Allocates no d x d buffer. symmetric=True promises C is exactly symmetric "
        "(its upper triangle then serves as the backup as it is, without a mirroring pass).");
  m.def("symmetric_stats", &symmetric_stats, py::arg("C"),
        "One threaded pass over a square float32/float64 C (any strides): dict with norm1 (max column sum "
        "of |C|), amax, asym (max |C_ij - C_ji|) and asym_at, nonfinite_at (first NaN/Inf in row-major "
        "order, or None), diag_min and diag_min_at.");
  m.def("cond_estimate", &cond_estimate, py::arg("L"), py::arg("anorm"),
        "1-norm condition estimate of L Lᵀ from its lower factor and ‖L Lᵀ‖₁ (LAPACK dpocon).");
  m.def("spd_apply_inverse", &spd_apply_inverse, py::arg("L"), py::arg("X"),
        "X := (L Lᵀ)⁻¹ X in place for the vectors in X's rows (k x d, float64, C-contiguous); L lower, "
        "row-major float64. Memory-bandwidth-bound; one read of L per pass serves all k vectors.");
  m.def("pm_solve", &pm_solve, py::arg("L"), py::arg("K"), py::arg("mus"), py::arg("max_cond"),
        "(B, G, M, mu_index, cond): G = KᵀC⁻¹K, first μ with chol(G + μI) ok and cond ≤ max_cond, "
        "B = C⁻¹K(G + μI)⁻¹ (B and M are None when no μ is accepted). L, K: C-contiguous float64.");
}
