// CUDA twin of the CPU solver core: thin over cuBLAS/cuSOLVER.
//
// Every matrix is a contiguous row-major torch tensor, passed as a raw device
// pointer. Read column-major (as cuBLAS does), a row-major lower triangle is
// an upper triangle of the same memory, so "lower factor L with A = L Lᵀ" in
// torch terms is cuSOLVER's uplo=UPPER factor U = Lᵀ with A = Uᵀ U, and no
// transpose is ever materialised.
//
// Workspaces are allocated by the caller (torch's caching allocator on the
// Python side) with the sizes the *_workspace_bytes functions return. Work is
// enqueued on the caller's stream; the functions synchronise that stream only
// to read factorisation status and the condition estimate's reductions.
// This header is free of CUDA headers so that the host-compiled bindings need none.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace pmsolve::cuda {

struct Context {
  int device;    // CUDA device index the pointers live on
  void* stream;  // cudaStream_t, e.g. torch.cuda.current_stream().cuda_stream
};

enum class Dtype { f32, f64 };

struct CholeskyParams {
  Context ctx;
  const void* C;  // d × d, row-major; only the lower triangle is read, never written
  Dtype c_dtype;
  int64_t d;
  double* L;                   // d × d out: lower factor of C + shift I, strict upper triangle zero
  std::vector<double> shifts;  // tried in order
  void* work;                  // cholesky_workspace_bytes(ctx, d) bytes
  size_t work_bytes;
};

struct CondParams {
  Context ctx;
  const double* L;  // n × n lower factor of A = L Lᵀ
  int64_t n;
  double anorm;  // ‖A‖₁
  void* work;    // cond_workspace_bytes(n) bytes
  size_t work_bytes;
};

struct PMParams {
  Context ctx;
  const double* L;  // d × d lower factor of C + δI
  const double* K;  // d × n keys
  int64_t d, n;
  std::vector<double> mus;  // ridges tried in order
  double max_cond;
  double* Z;  // d × n out: L⁻¹ K
  double* G;  // n × n out: Zᵀ Z, both triangles
  double* M;  // n × n out: lower factor of G + mu I for the accepted mu
  double* B;  // d × n out: L⁻ᵀ Z (G + mu I)⁻¹
  void* work;  // pm_workspace_bytes(ctx, d, n) bytes
  size_t work_bytes;
};

struct PMResult {
  int64_t mu_index;  // -1 when no mu gave a factor with cond <= max_cond
  double cond;       // 1-norm condition estimate of G + mu I (inf on failure)
};

// Index of the shift that factored, or -1 when every one failed.
int64_t cholesky_jittered(const CholeskyParams& p);
// Hager/Higham 1-norm condition estimate, the same iteration as the torch backend's.
double cond_estimate(const CondParams& p);
PMResult pm_solve(const PMParams& p);

size_t cholesky_workspace_bytes(const Context& ctx, int64_t d);
size_t cond_workspace_bytes(int64_t n);
size_t pm_workspace_bytes(const Context& ctx, int64_t d, int64_t n);

// Number of devices the driver reports; 0 (not an error) without a driver or device.
int device_count();
// Throws std::invalid_argument unless ptr is device memory on `device`, aligned to `align` bytes.
void check_device_pointer(const void* ptr, int device, size_t align, const char* name);

}  // namespace pmsolve::cuda
