// CUDA solver core on cuBLAS/cuSOLVER; see pm_cuda.h for the layout conventions.
//
// Column-major names used below: U = Lᵀ is the d × d upper factor of C + δI
// (A = Uᵀ U), Zc = Zᵀ (n × d), Mc = Mᵀ the n × n upper factor of G + μI, and
// Bc = Bᵀ. Each is the very memory of the corresponding row-major tensor.
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>

#include "pm_cuda.h"

namespace pmsolve::cuda {
namespace {

// ---------------------------------------------------------------------------
// error checking: every status becomes an exception naming the call
// ---------------------------------------------------------------------------

[[noreturn]] void fail(const char* call, const std::string& what) {
  throw std::runtime_error(std::string("pmsolve CUDA backend: ") + call + " failed: " + what);
}

void check(cudaError_t s, const char* call) {
  if (s != cudaSuccess) fail(call, std::string(cudaGetErrorName(s)) + " (" + cudaGetErrorString(s) + ")");
}

void check(cublasStatus_t s, const char* call) {
  if (s != CUBLAS_STATUS_SUCCESS) fail(call, cublasGetStatusString(s));
}

// cuSOLVER has no status-to-string function.
const char* cusolver_status_name(cusolverStatus_t s) {
  switch (s) {
    case CUSOLVER_STATUS_NOT_INITIALIZED: return "CUSOLVER_STATUS_NOT_INITIALIZED";
    case CUSOLVER_STATUS_ALLOC_FAILED: return "CUSOLVER_STATUS_ALLOC_FAILED";
    case CUSOLVER_STATUS_INVALID_VALUE: return "CUSOLVER_STATUS_INVALID_VALUE";
    case CUSOLVER_STATUS_ARCH_MISMATCH: return "CUSOLVER_STATUS_ARCH_MISMATCH";
    case CUSOLVER_STATUS_EXECUTION_FAILED: return "CUSOLVER_STATUS_EXECUTION_FAILED";
    case CUSOLVER_STATUS_INTERNAL_ERROR: return "CUSOLVER_STATUS_INTERNAL_ERROR";
    case CUSOLVER_STATUS_NOT_SUPPORTED: return "CUSOLVER_STATUS_NOT_SUPPORTED";
    default: return "unknown cusolverStatus_t";
  }
}

void check(cusolverStatus_t s, const char* call) {
  if (s != CUSOLVER_STATUS_SUCCESS) fail(call, std::string(cusolver_status_name(s)) + " (" + std::to_string(s) + ")");
}

// ---------------------------------------------------------------------------
// device, stream and library handles
// ---------------------------------------------------------------------------

class DeviceGuard {
 public:
  explicit DeviceGuard(int device) : device_(device) {
    check(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != device_) check(cudaSetDevice(device_), "cudaSetDevice");
  }
  ~DeviceGuard() {
    if (prev_ != device_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int device_;
  int prev_ = 0;
};

struct Handles {
  cublasHandle_t blas = nullptr;
  cusolverDnHandle_t solver = nullptr;
  cusolverDnParams_t params = nullptr;
};

// One set per (device, stream) and host thread: creating handles costs
// milliseconds, and a handle bound to a stream must not be used by two threads
// at once (the bindings release the GIL). They live until the process exits:
// destroying them from a static destructor would run after the driver unloads.
Handles& handles_for(const Context& ctx) {
  thread_local std::map<std::pair<int, void*>, Handles> cache;
  const auto key = std::make_pair(ctx.device, ctx.stream);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  const auto stream = static_cast<cudaStream_t>(ctx.stream);
  Handles h;
  check(cublasCreate(&h.blas), "cublasCreate");
  check(cublasSetStream(h.blas, stream), "cublasSetStream");
  check(cublasSetPointerMode(h.blas, CUBLAS_POINTER_MODE_HOST), "cublasSetPointerMode");
  check(cusolverDnCreate(&h.solver), "cusolverDnCreate");
  check(cusolverDnSetStream(h.solver, stream), "cusolverDnSetStream");
  check(cusolverDnCreateParams(&h.params), "cusolverDnCreateParams");
  return cache.emplace(key, h).first->second;
}

struct CallScope {
  explicit CallScope(const Context& ctx)
      : guard(ctx.device), h(handles_for(ctx)), stream(static_cast<cudaStream_t>(ctx.stream)) {}
  DeviceGuard guard;
  Handles& h;
  cudaStream_t stream;

  void sync() { check(cudaStreamSynchronize(stream), "cudaStreamSynchronize"); }
};

// ---------------------------------------------------------------------------
// workspace: [potrf device buffer | potrf info, sign flag | v (n doubles) | w (n doubles)]
// ---------------------------------------------------------------------------

constexpr size_t kAlign = 256;

size_t align_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

size_t layout_bytes(size_t potrf_bytes, int64_t n) {
  return align_up(potrf_bytes) + kAlign + 2 * align_up(static_cast<size_t>(n) * sizeof(double));
}

struct Workspace {
  void* potrf;
  size_t potrf_bytes;
  int* info;
  int* flag;
  double* v;
  double* w;
};

Workspace carve(void* work, size_t potrf_bytes, int64_t n) {
  auto* base = static_cast<char*>(work);
  Workspace ws;
  ws.potrf = base;
  ws.potrf_bytes = potrf_bytes;
  base += align_up(potrf_bytes);
  ws.info = reinterpret_cast<int*>(base);
  ws.flag = ws.info + 1;
  base += kAlign;
  ws.v = reinterpret_cast<double*>(base);
  ws.w = reinterpret_cast<double*>(base + align_up(static_cast<size_t>(n) * sizeof(double)));
  return ws;
}

struct PotrfSizes {
  size_t device_bytes = 0;
  size_t host_bytes = 0;
};

PotrfSizes potrf_sizes(Handles& h, int64_t n, cublasFillMode_t uplo) {
  PotrfSizes s;
  check(cusolverDnXpotrf_bufferSize(h.solver, h.params, uplo, n, CUDA_R_64F, nullptr, n,
                                    CUDA_R_64F, &s.device_bytes, &s.host_bytes),
        "cusolverDnXpotrf_bufferSize");
  return s;
}

// ---------------------------------------------------------------------------
// kernels: elementwise, memory-bound, grid-stride over 64-bit indices
// ---------------------------------------------------------------------------

constexpr int kThreads = 256;

unsigned grid_for(int64_t count) {
  return static_cast<unsigned>(std::clamp<int64_t>((count + kThreads - 1) / kThreads, 1, 1 << 16));
}

// n × n column-major matrices: threads along a column (coalesced), blocks in y over
// columns, so no thread divides a 64-bit index (slow on GPUs) to find its row and column.
dim3 matrix_grid(int64_t n) { return dim3(grid_for(n), static_cast<unsigned>(std::clamp<int64_t>(n, 1, 65535))); }

void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

#define PM_GRID_STRIDE(i, count) \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (count); i += int64_t(gridDim.x) * blockDim.x)
#define PM_MATRIX_STRIDE(r, c, n)                       \
  for (int64_t c = blockIdx.y; c < (n); c += gridDim.y) \
  PM_GRID_STRIDE(r, n)

// A = upper triangle of S + shift I, strict lower triangle zeroed (n × n,
// column-major). S's upper triangle sits at the same offsets as the caller's
// row-major lower triangle, so this reads exactly what the torch backend reads.
template <typename T>
__global__ void load_upper(const T* S, double* A, int64_t n, double shift) {
  PM_MATRIX_STRIDE(r, c, n) {
    const int64_t idx = r + c * n;
    A[idx] = r < c ? double(S[idx]) : r == c ? double(S[idx]) + shift : 0.0;
  }
}

// Square tiles moved through shared memory, so that a transposing copy reads and
// writes whole rows of 32 consecutive doubles (plain per-element kernels would
// coalesce only one side). The +1 column avoids shared-memory bank conflicts.
constexpr int kTile = 32;
constexpr int kTileRows = 8;

// Column-major lower triangle of A (n × n) = the caller's row-major lower triangle
// of S, plus shift on the diagonal: A(r, c) = S[r n + c] for r ≥ c. The strict
// upper triangle of A is left as it is (potrf(LOWER) never reads it, and
// lower_to_row_major overwrites all of it).
template <typename T>
__global__ void load_lower_transposed(const T* S, double* A, int64_t n, double shift) {
  __shared__ double tile[kTile][kTile + 1];
  const int64_t r0 = int64_t(blockIdx.x) * kTile, c0 = int64_t(blockIdx.y) * kTile;
  if (r0 + kTile <= c0) return;  // a tile strictly above the diagonal
  for (int k = threadIdx.y; k < kTile; k += blockDim.y) {  // row r0 + k of S, contiguous in c
    const int64_t r = r0 + k, c = c0 + threadIdx.x;
    if (r < n && c < n) tile[k][threadIdx.x] = double(S[r * n + c]);
  }
  __syncthreads();
  for (int k = threadIdx.y; k < kTile; k += blockDim.y) {  // column c0 + k of A, contiguous in r
    const int64_t r = r0 + threadIdx.x, c = c0 + k;
    if (r < n && c < n && r >= c) A[r + c * n] = tile[threadIdx.x][k] + (r == c ? shift : 0.0);
  }
}

// The column-major lower factor in A → the row-major lower factor in the same
// memory (the column-major strict upper triangle), strict lower triangle zeroed.
// Each block owns one tile on or below the diagonal and its mirror image above.
__global__ void lower_to_row_major(double* A, int64_t n) {
  __shared__ double tile[kTile][kTile + 1];
  const int64_t r0 = int64_t(blockIdx.x) * kTile, c0 = int64_t(blockIdx.y) * kTile;
  if (r0 < c0) return;  // mirror tiles are written by their lower twin
  for (int k = threadIdx.y; k < kTile; k += blockDim.y) {  // column c0 + k, contiguous in r
    const int64_t r = r0 + threadIdx.x, c = c0 + k;
    if (r < n && c < n) tile[threadIdx.x][k] = A[r + c * n];
  }
  __syncthreads();  // the diagonal tiles read and write the same tile
  for (int k = threadIdx.y; k < kTile; k += blockDim.y) {
    const int64_t r = r0 + k, c = c0 + threadIdx.x;  // A(c, r) ← A(r, c): column r, contiguous in c
    if (r < n && c < n && r > c) A[c + r * n] = tile[k][threadIdx.x];
  }
  for (int k = threadIdx.y; k < kTile; k += blockDim.y) {
    const int64_t r = r0 + threadIdx.x, c = c0 + k;
    if (r < n && c < n && r > c) A[r + c * n] = 0.0;
  }
}

// Copies the upper triangle of A onto its lower triangle (syrk fills one).
__global__ void mirror_upper(double* A, int64_t n) {
  PM_MATRIX_STRIDE(r, c, n) {
    if (r > c) A[r + c * n] = A[c + r * n];
  }
}

// Row sums of |A|; for symmetric A they are the column sums, read coalesced.
__global__ void abs_row_sums(const double* A, int64_t n, double* out) {
  PM_GRID_STRIDE(i, n) {
    double s = 0.0;
    for (int64_t j = 0; j < n; ++j) s += fabs(A[i + j * n]);
    out[i] = s;
  }
}

enum HagerVector : int { kUniform, kUnit, kAlternating };

__global__ void hager_vector(double* v, int64_t n, int kind, int64_t j) {
  PM_GRID_STRIDE(i, n) {
    if (kind == kUniform)
      v[i] = 1.0 / double(n);
    else if (kind == kUnit)
      v[i] = i == j ? 1.0 : 0.0;
    else
      v[i] = (1.0 + double(i) / double(n > 1 ? n - 1 : 1)) * (i % 2 == 0 ? 1.0 : -1.0);
  }
}

// sgn ← Fortran SIGN(1, x) as DLACN2 takes it (zero counts as +1); *changed = 1 where
// that differs from the old sgn.
__global__ void update_signs(const double* x, double* sgn, int64_t n, int* changed) {
  PM_GRID_STRIDE(i, n) {
    const double s = x[i] >= 0.0 ? 1.0 : -1.0;
    if (s != sgn[i]) {
      sgn[i] = s;
      *changed = 1;
    }
  }
}

// ---------------------------------------------------------------------------
// building blocks
// ---------------------------------------------------------------------------

// In-place Cholesky of the uplo triangle of A (n × n, column-major). True on
// success; false when a leading minor is not positive definite.
bool potrf(CallScope& s, double* A, int64_t n, cublasFillMode_t uplo, const Workspace& ws, std::vector<char>& host) {
  check(cusolverDnXpotrf(s.h.solver, s.h.params, uplo, n, CUDA_R_64F, A, n, CUDA_R_64F, ws.potrf,
                         ws.potrf_bytes, host.data(), host.size(), ws.info),
        "cusolverDnXpotrf");
  int info = 0;
  check(cudaMemcpyAsync(&info, ws.info, sizeof(int), cudaMemcpyDeviceToHost, s.stream), "cudaMemcpyAsync(info)");
  s.sync();
  if (info < 0) fail("cusolverDnXpotrf", "rejected argument " + std::to_string(-info));
  return info == 0;
}

// Xc ← Xc op(U)⁻¹ for the n × d column-major Xc (ld n) and the d × d upper U.
// A single row is a vector: x op(U)⁻¹ = (op(U)⁻ᵀ xᵀ)ᵀ, one trsv with the other op.
// cuBLAS's right-sided trsm with one row took ~3 ms at d = 6400 on an H200, its
// trsv ~0.5 ms (docs/benchmarks.md, GPU); both are latency-bound there.
void solve_right(CallScope& s, const double* U, int64_t d, double* Xc, int64_t n, cublasOperation_t op,
                 const char* what) {
  if (n == 1) {
    check(cublasDtrsv_64(s.h.blas, CUBLAS_FILL_MODE_UPPER, op == CUBLAS_OP_N ? CUBLAS_OP_T : CUBLAS_OP_N,
                         CUBLAS_DIAG_NON_UNIT, d, U, d, Xc, 1),
          (std::string("cublasDtrsv_64(") + what + ")").c_str());
    return;
  }
  const double one = 1.0;
  check(cublasDtrsm_64(s.h.blas, CUBLAS_SIDE_RIGHT, CUBLAS_FILL_MODE_UPPER, op, CUBLAS_DIAG_NON_UNIT, n, d, &one, U,
                       d, Xc, n),
        (std::string("cublasDtrsm_64(") + what + ")").c_str());
}

// 1 / DPOCON's rcond = (1/‖A⁻¹‖₁)/‖A‖₁, with its convention that rcond = 0 means inf.
double reciprocal_cond(double ainv_norm, double anorm) {
  if (ainv_norm == 0.0) return std::numeric_limits<double>::infinity();
  const double rcond = (1.0 / ainv_norm) / anorm;
  return rcond > 0.0 ? 1.0 / rcond : std::numeric_limits<double>::infinity();
}

// 1-norm condition estimate of A = Uᵀ U from ‖A‖₁: LAPACK's DPOCON/DLACN2 iteration
// (Hager's method with Higham's refinements), step for step the torch backend's
// hager_cond_1norm, so that every backend accepts and rejects the same ridges.
// cuSOLVER has no pocon; this costs at most 11 pairs of O(n²) triangular
// solves (trsv) on the device and a few scalars read back per step.
double hager_cond(CallScope& s, const double* U, int64_t n, double anorm, const Workspace& ws) {
  constexpr int kMaxIter = 5;
  if (anorm == 0.0) return std::numeric_limits<double>::infinity();
  double* x = ws.v;
  double* sgn = ws.w;
  auto apply_inv = [&]() {  // x ← A⁻¹ x = U⁻¹ U⁻ᵀ x
    check(cublasDtrsv_64(s.h.blas, CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_T, CUBLAS_DIAG_NON_UNIT, n, U, n, x, 1),
          "cublasDtrsv_64");
    check(cublasDtrsv_64(s.h.blas, CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_N, CUBLAS_DIAG_NON_UNIT, n, U, n, x, 1),
          "cublasDtrsv_64");
  };
  auto fill = [&](int kind, int64_t j) {
    hager_vector<<<grid_for(n), kThreads, 0, s.stream>>>(x, n, kind, j);
    check_launch("hager_vector");
  };
  auto asum = [&]() {  // host pointer mode: blocks until the sum is on the host
    double r = 0.0;
    check(cublasDasum_64(s.h.blas, n, x, 1, &r), "cublasDasum_64");
    return r;
  };
  auto argmax_abs = [&]() {
    int64_t j = 0;
    check(cublasIdamax_64(s.h.blas, n, x, 1, &j), "cublasIdamax_64");
    return j - 1;  // cuBLAS counts from 1; ties go to the first index, as torch.argmax
  };
  auto at = [&](int64_t i) {
    double r = 0.0;
    check(cudaMemcpyAsync(&r, x + i, sizeof(double), cudaMemcpyDeviceToHost, s.stream), "cudaMemcpyAsync(x[i])");
    s.sync();
    return r;
  };
  auto signs_changed = [&]() {  // sgn ← signs of x
    check(cudaMemsetAsync(ws.flag, 0, sizeof(int), s.stream), "cudaMemsetAsync(flag)");
    update_signs<<<grid_for(n), kThreads, 0, s.stream>>>(x, sgn, n, ws.flag);
    check_launch("update_signs");
    int changed = 0;
    check(cudaMemcpyAsync(&changed, ws.flag, sizeof(int), cudaMemcpyDeviceToHost, s.stream), "cudaMemcpyAsync(flag)");
    s.sync();
    return changed != 0;
  };
  auto solve_signs = [&]() {  // x ← A⁻¹ sgn
    check(cudaMemcpyAsync(x, sgn, static_cast<size_t>(n) * sizeof(double), cudaMemcpyDeviceToDevice, s.stream),
          "cudaMemcpyAsync(x <- sgn)");
    apply_inv();
  };

  fill(kUniform, 0);
  apply_inv();
  double est = asum();
  if (n == 1) return reciprocal_cond(est, anorm);
  signs_changed();  // the first sign vector: nothing to compare it with
  solve_signs();
  int64_t j = argmax_abs();
  for (int iter = 2; iter <= kMaxIter; ++iter) {
    fill(kUnit, j);
    apply_inv();
    const double est_old = est;
    est = asum();
    if (!signs_changed() || est <= est_old) break;  // repeated sign vector (converged), or cycling
    solve_signs();
    const int64_t j_last = j;
    j = argmax_abs();
    if (at(j_last) == std::fabs(at(j)) || iter == kMaxIter) break;
  }
  // Higham's alternating-sign test vector guards against the method's bad cases.
  fill(kAlternating, 0);
  apply_inv();
  est = std::max(est, 2.0 * asum() / (3.0 * double(n)));
  return reciprocal_cond(est, anorm);
}

}  // namespace

// ---------------------------------------------------------------------------
// public entry points
// ---------------------------------------------------------------------------

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: clear the (non-sticky) error, report none
    return 0;
  }
  return n;
}

void check_device_pointer(const void* ptr, int device, size_t align, const char* name) {
  const std::string what = std::string("pmsolve CUDA backend: ") + name;
  if (ptr == nullptr) throw std::invalid_argument(what + " is a null pointer");
  if (reinterpret_cast<uintptr_t>(ptr) % align != 0)
    throw std::invalid_argument(what + " is not aligned to " + std::to_string(align) + " bytes");
  DeviceGuard guard(device);
  cudaPointerAttributes attr{};
  const cudaError_t e = cudaPointerGetAttributes(&attr, ptr);
  if (e != cudaSuccess) {
    cudaGetLastError();
    throw std::invalid_argument(what + " is not a CUDA pointer (" + cudaGetErrorString(e) + ")");
  }
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
    throw std::invalid_argument(what + " is not CUDA device memory");
  if (attr.device != device)
    throw std::invalid_argument(what + " lives on device " + std::to_string(attr.device) + ", expected device " +
                                std::to_string(device));
}

size_t cholesky_workspace_bytes(const Context& ctx, int64_t d) {
  CallScope s(ctx);
  return layout_bytes(potrf_sizes(s.h, d, CUBLAS_FILL_MODE_LOWER).device_bytes, 0);
}

size_t cond_workspace_bytes(int64_t n) { return layout_bytes(0, n); }

size_t pm_workspace_bytes(const Context& ctx, int64_t d, int64_t n) {
  CallScope s(ctx);
  return layout_bytes(potrf_sizes(s.h, n, CUBLAS_FILL_MODE_UPPER).device_bytes, n);
}

int64_t cholesky_jittered(const CholeskyParams& p) {
  CallScope s(p.ctx);
  const PotrfSizes sz = potrf_sizes(s.h, p.d, CUBLAS_FILL_MODE_LOWER);
  const Workspace ws = carve(p.work, sz.device_bytes, 0);
  std::vector<char> host(sz.host_bytes);
  const dim3 tiles(static_cast<unsigned>((p.d + kTile - 1) / kTile), static_cast<unsigned>((p.d + kTile - 1) / kTile));
  const dim3 threads(kTile, kTileRows);
  for (size_t i = 0; i < p.shifts.size(); ++i) {
    // potrf overwrites its triangle, so each try starts again from C itself:
    // C is never written, so it is the restore copy and no d × d scratch is needed.
    // cuSOLVER factors the column-major lower triangle 1.7x faster than the upper one
    // (H200, d = 6400: 5.5 vs 9.5 ms; docs/history.md §7), hence two tiled transposes.
    if (p.c_dtype == Dtype::f32)
      load_lower_transposed<<<tiles, threads, 0, s.stream>>>(static_cast<const float*>(p.C), p.L, p.d, p.shifts[i]);
    else
      load_lower_transposed<<<tiles, threads, 0, s.stream>>>(static_cast<const double*>(p.C), p.L, p.d, p.shifts[i]);
    check_launch("load_lower_transposed");
    if (potrf(s, p.L, p.d, CUBLAS_FILL_MODE_LOWER, ws, host)) {
      lower_to_row_major<<<tiles, threads, 0, s.stream>>>(p.L, p.d);
      check_launch("lower_to_row_major");
      return static_cast<int64_t>(i);
    }
  }
  return -1;
}

double cond_estimate(const CondParams& p) {
  CallScope s(p.ctx);
  const Workspace ws = carve(p.work, 0, p.n);
  return hager_cond(s, p.L, p.n, p.anorm, ws);
}

PMResult pm_solve(const PMParams& p) {
  CallScope s(p.ctx);
  const int64_t d = p.d, n = p.n;
  const PotrfSizes sz = potrf_sizes(s.h, n, CUBLAS_FILL_MODE_UPPER);
  const Workspace ws = carve(p.work, sz.device_bytes, n);
  std::vector<char> host(sz.host_bytes);
  const double one = 1.0, zero = 0.0;
  const size_t dn_bytes = static_cast<size_t>(d) * static_cast<size_t>(n) * sizeof(double);

  // Zc = Kc U⁻¹ (that is Z = L⁻¹K): one right-sided triangular solve on a copy of K.
  check(cudaMemcpyAsync(p.Z, p.K, dn_bytes, cudaMemcpyDeviceToDevice, s.stream), "cudaMemcpyAsync(Z <- K)");
  solve_right(s, p.L, d, p.Z, n, CUBLAS_OP_N, "Z = L^-1 K");
  // G = Zc Zcᵀ = ZᵀZ: a symmetric rank-d product (PSD by construction), mirrored so both triangles hold it.
  check(cublasDsyrk_64(s.h.blas, CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_N, n, d, &one, p.Z, n, &zero, p.G, n),
        "cublasDsyrk_64(G = Z^T Z)");
  mirror_upper<<<matrix_grid(n), kThreads, 0, s.stream>>>(p.G, n);
  check_launch("mirror_upper");

  // ‖G‖₁, the base of every ridge's ‖G + μI‖₁.
  abs_row_sums<<<grid_for(n), kThreads, 0, s.stream>>>(p.G, n, ws.v);
  check_launch("abs_row_sums");
  int64_t jmax = 0;
  check(cublasIdamax_64(s.h.blas, n, ws.v, 1, &jmax), "cublasIdamax_64");
  double anorm_g = 0.0;
  check(cudaMemcpyAsync(&anorm_g, ws.v + (jmax - 1), sizeof(double), cudaMemcpyDeviceToHost, s.stream),
        "cudaMemcpyAsync(norm)");
  s.sync();

  for (size_t i = 0; i < p.mus.size(); ++i) {
    const double mu = p.mus[i];
    load_upper<<<matrix_grid(n), kThreads, 0, s.stream>>>(static_cast<const double*>(p.G), p.M, n, mu);
    check_launch("load_upper");
    if (!potrf(s, p.M, n, CUBLAS_FILL_MODE_UPPER, ws, host)) continue;
    const double cond = hager_cond(s, p.M, n, anorm_g + std::fabs(mu), ws);
    if (cond > p.max_cond) continue;  // the torch backend's test, NaN handling included
    // Bc = (G + μI)⁻¹ Zc U⁻ᵀ with G + μI = Mcᵀ Mc (that is B = L⁻ᵀ Z M⁻ᵀ M⁻¹): three in-place solves.
    check(cudaMemcpyAsync(p.B, p.Z, dn_bytes, cudaMemcpyDeviceToDevice, s.stream), "cudaMemcpyAsync(B <- Z)");
    check(cublasDtrsm_64(s.h.blas, CUBLAS_SIDE_LEFT, CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_T, CUBLAS_DIAG_NON_UNIT, n, d,
                         &one, p.M, n, p.B, n),
          "cublasDtrsm_64(M^-1 Z^T)");
    check(cublasDtrsm_64(s.h.blas, CUBLAS_SIDE_LEFT, CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_N, CUBLAS_DIAG_NON_UNIT, n, d,
                         &one, p.M, n, p.B, n),
          "cublasDtrsm_64(M^-T M^-1 Z^T)");
    solve_right(s, p.L, d, p.B, n, CUBLAS_OP_T, "B = L^-T ...");
    return {static_cast<int64_t>(i), cond};
  }
  return {-1, std::numeric_limits<double>::infinity()};
}

}  // namespace pmsolve::cuda
