#include "accumulate.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>

#include "amx_gram.h"
#include "blas.h"
#include "dpbf16_gram.h"
#include "f32_gram.h"
#include "parallel.h"

namespace pmsolve {
namespace {

float bf16_to_f32(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// IEEE half → single, subnormals and inf/NaN included (no F16C dependency).
float f16_to_f32(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal half: normalise
    int shift = 0;
    while ((man & 0x400u) == 0) {
      man <<= 1;
      ++shift;
    }
    bits = sign | (static_cast<uint32_t>(113 - shift) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Largest |x| of n values, as the raw bits with the sign cleared: for IEEE formats that order
// is the order of the magnitudes, and NaN/Inf (all-ones exponent) sort above every finite
// value. An integer max reduction vectorises, so this pass costs a few ms where
// torch.isfinite costs 100s.
uint32_t max_magnitude_bits(const void* data, size_t n, RowFormat fmt) {
  if (fmt == RowFormat::f32) {
    const uint32_t* u = static_cast<const uint32_t*>(data);
    uint32_t m = 0;
    for (size_t i = 0; i < n; ++i) m = std::max(m, u[i] & 0x7fffffffu);
    return m;
  }
  const uint16_t* h = static_cast<const uint16_t*>(data);
  uint16_t m = 0;
  for (size_t i = 0; i < n; ++i) m = std::max<uint16_t>(m, h[i] & 0x7fffu);
  return m;
}

// Bits from which a value (sign cleared) is NaN/Inf, and the magnitude those bits stand for.
uint32_t nonfinite_bits(RowFormat fmt) {
  return fmt == RowFormat::f32 ? 0x7f800000u : fmt == RowFormat::bf16 ? 0x7f80u : 0x7c00u;
}

float magnitude(uint32_t bits, RowFormat fmt) {
  if (fmt == RowFormat::bf16) return bf16_to_f32(static_cast<uint16_t>(bits));
  if (fmt == RowFormat::f16) return f16_to_f32(static_cast<uint16_t>(bits));
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Index of the first NaN/Inf among n values, or -1 (the slow path, after max_magnitude_bits
// or a product's diagonal said there is one).
int64_t first_nonfinite(const void* data, size_t n, RowFormat fmt) {
  const uint32_t bad = nonfinite_bits(fmt);
  for (size_t i = 0; i < n; ++i) {
    const uint32_t bits = fmt == RowFormat::f32 ? static_cast<const uint32_t*>(data)[i] & 0x7fffffffu
                                                : static_cast<const uint16_t*>(data)[i] & 0x7fffu;
    if (bits >= bad) return static_cast<int64_t>(i);
  }
  return -1;
}

[[noreturn]] void throw_overflow() {
  throw std::domain_error("overflow: a column's sum of squares exceeds the fp32 range (values above ~1e19); "
                          "use fp64 products");
}

}  // namespace

namespace {

// The shared ChunkScratch, the lock its users hold, and how many accumulators exist.
std::mutex g_scratch_lock;
ChunkScratch g_scratch;
int64_t g_live = 0;

int64_t checked_d(int64_t d) {
  if (d <= 0) throw std::invalid_argument("d must be positive");
  return d;
}

}  // namespace

CovAccumulator::ScratchLease::ScratchLease() {
  std::lock_guard<std::mutex> hold(g_scratch_lock);
  ++g_live;
}

CovAccumulator::ScratchLease::~ScratchLease() {
  std::lock_guard<std::mutex> hold(g_scratch_lock);
  if (--g_live == 0) g_scratch = ChunkScratch{};  // the last one frees the buffers
}

ChunkScratch& CovAccumulator::ScratchLease::scratch() const { return g_scratch; }

CovAccumulator::CovAccumulator(int64_t d, bool fp64_products, bool centered, int64_t chunk_rows)
    : d_(checked_d(d)),
      fp64_(fp64_products),
      centered_(centered),
      chunk_(chunk_rows > 0 ? chunk_rows : kDefaultChunkRows),
      scratch_(lease_.scratch()) {
  mat_.assign(static_cast<size_t>(d) * d, 0.0);
  if (centered_) mean_.assign(d, 0.0);
}

void CovAccumulator::update(const void* data, int64_t rows, RowFormat fmt) {
  std::lock_guard<std::mutex> hold(g_scratch_lock);  // the scratch is shared: one update at a time
  // Nothing may be added from a batch with a NaN/Inf in it. A batch of one chunk whose fp32
  // product goes to a scratch buffer is checked on that product instead of on the rows: a
  // NaN/Inf in column i makes the diagonal entry Σₜ xₜᵢ² NaN/Inf (its terms are ≥ 0, nothing
  // cancels), and the check happens before the fold. That saves a pass over the rows: 4-7 ms
  // of ~70 for 4096 × 1536 fp32 rows on a 2-core Zen 3 (docs/history.md). Everything
  // else (several chunks, fp64 or centred products, the bf16 and AVX-512 fp32 kernels, which
  // add into the master directly) is checked up front, so a rejected update leaves the state untouched.
  const bool bf16_kernel = fmt == RowFormat::bf16 && bf16_gram_kernel() != Bf16Gram::fp32;
  const bool f32_kernel = fmt == RowFormat::f32 && f32_gram_enabled();
  const bool check_after = rows <= chunk_ && !fp64_ && !centered_ && !bf16_kernel && !f32_kernel;
  if (!check_after) {
    const size_t n = static_cast<size_t>(rows) * d_;
    const uint32_t top = max_magnitude_bits(data, n, fmt);
    if (top >= nonfinite_bits(fmt))
      throw std::domain_error("non-finite value (NaN/Inf) in row " + std::to_string(first_nonfinite(data, n, fmt) / d_));
    const double amax = magnitude(top, fmt);
    if (!fp64_ && !centered_ && amax * amax * static_cast<double>(std::min(rows, chunk_)) > FLT_MAX)
      check_squares_fit_f32(data, rows, fmt);
  }
  size_t elem = fmt == RowFormat::f32 ? 4 : 2;
  const char* p = static_cast<const char*>(data);
  for (int64_t r = 0; r < rows; r += chunk_) {
    int64_t n = std::min(chunk_, rows - r);
    process_chunk(p + static_cast<size_t>(r) * d_ * elem, n, fmt, check_after);
  }
}

// Throws if a diagonal entry of the chunk's fp32 products is NaN/Inf: names the first row with
// a NaN/Inf, or (all rows finite) reports that squares overflowed fp32.
void CovAccumulator::check_products_f32(const void* data, int64_t rows, RowFormat fmt, int parts) const {
  const size_t dd = mat_.size();
  bool ok = true;
  for (int p = 0; p < parts; ++p)
    for (int64_t i = 0; i < d_; ++i) ok &= std::isfinite(scratch_.prod32[p * dd + static_cast<size_t>(i) * d_ + i]);
  if (ok) return;
  const int64_t bad = first_nonfinite(data, static_cast<size_t>(rows) * d_, fmt);
  if (bad >= 0) throw std::domain_error("non-finite value (NaN/Inf) in row " + std::to_string(bad / d_));
  throw_overflow();
}

// Exact test, per chunk, of what amax² · rows only bounds: does a column's Σ x² exceed FLT_MAX?
void CovAccumulator::check_squares_fit_f32(const void* data, int64_t rows, RowFormat fmt) const {
  const size_t elem = fmt == RowFormat::f32 ? 4 : 2;
  std::vector<double> sq(d_);
  for (int64_t r = 0; r < rows; r += chunk_) {
    std::fill(sq.begin(), sq.end(), 0.0);
    for (int64_t t = r; t < std::min(rows, r + chunk_); ++t)
      for (int64_t j = 0; j < d_; ++j) {
        const size_t at = static_cast<size_t>(t * d_ + j);
        uint32_t bits = 0;
        std::memcpy(&bits, static_cast<const char*>(data) + at * elem, elem);  // little-endian
        const double x = magnitude(bits & (fmt == RowFormat::f32 ? 0x7fffffffu : 0x7fffu), fmt);
        sq[j] += x * x;
      }
    if (*std::max_element(sq.begin(), sq.end()) > FLT_MAX) throw_overflow();
  }
}

void CovAccumulator::load_rows_f32(const void* data, int64_t rows, RowFormat fmt) {
  size_t n = static_cast<size_t>(rows) * d_;
  scratch_.rows32.resize(n);
  if (fmt == RowFormat::f32) {
    std::memcpy(scratch_.rows32.data(), data, n * sizeof(float));
    return;
  }
  const uint16_t* h = static_cast<const uint16_t*>(data);
  if (fmt == RowFormat::bf16) {
    for (size_t i = 0; i < n; ++i) scratch_.rows32[i] = bf16_to_f32(h[i]);
  } else {
    for (size_t i = 0; i < n; ++i) scratch_.rows32[i] = f16_to_f32(h[i]);
  }
}

// Subtract the chunk's own mean (computed in fp64) and round the centred values to the
// working precision once: the product then sees no catastrophic cancellation.
void CovAccumulator::center_rows(int64_t rows, std::vector<double>& chunk_mean) {
  chunk_mean.assign(d_, 0.0);
  for (int64_t t = 0; t < rows; ++t) {
    const float* x = scratch_.rows32.data() + static_cast<size_t>(t) * d_;
    for (int64_t j = 0; j < d_; ++j) chunk_mean[j] += x[j];
  }
  for (auto& m : chunk_mean) m /= static_cast<double>(rows);
  for (int64_t t = 0; t < rows; ++t) {
    size_t off = static_cast<size_t>(t) * d_;
    if (fp64_) {
      for (int64_t j = 0; j < d_; ++j)
        scratch_.rows64[off + j] = static_cast<double>(scratch_.rows32[off + j]) - chunk_mean[j];
    } else {
      for (int64_t j = 0; j < d_; ++j)
        scratch_.rows32[off + j] = static_cast<float>(static_cast<double>(scratch_.rows32[off + j]) - chunk_mean[j]);
    }
  }
}

// Threads for one chunk's product. Small products run on one thread: waking (and leaving
// spinning) a second BLAS thread costs more than it saves and slows the model's forward
// pass running between updates on the same cores. Large ones split the chunk's rows
// across threads, each running a single-threaded ssyrk into its own scratch: no
// fine-grained BLAS synchronisation, which degrades badly when the cores are shared.
int product_threads(int64_t d, int64_t rows) {
  const double flops = static_cast<double>(d) * static_cast<double>(d) * static_cast<double>(rows);
  if (flops < 2e8) return 1;
  return std::max(1, std::min(worker_threads(), static_cast<int>(rows / 64)));
}

// Sets the BLAS thread count for one scope and restores it.
class BlasThreads {
 public:
  explicit BlasThreads(int n) : saved_(blas_get_num_threads()) {
    if (n != saved_) blas_set_num_threads(n);
  }
  ~BlasThreads() {
    if (blas_get_num_threads() != saved_) blas_set_num_threads(saved_);
  }

 private:
  int saved_;
};

Bf16Gram bf16_gram_kernel() {
  if (amx_enabled()) return Bf16Gram::amx;
  if (dpbf16_enabled()) return Bf16Gram::avx512_bf16;
  return Bf16Gram::fp32;
}

void CovAccumulator::process_chunk(const void* data, int64_t rows, RowFormat fmt, bool checked_after) {
  if (rows <= 0) return;
  const Bf16Gram kernel = fmt == RowFormat::bf16 && !fp64_ && !centered_ ? bf16_gram_kernel() : Bf16Gram::fp32;
  if (kernel != Bf16Gram::fp32) {
    const uint16_t* x = static_cast<const uint16_t*>(data);
    if (kernel == Bf16Gram::amx)
      amx_gram_bf16_add(x, rows, d_, mat_.data(), product_threads(d_, rows), scratch_.packed);
    else
      dpbf16_gram_add(x, rows, d_, mat_.data(), product_threads(d_, rows), scratch_.packed);
    count_ += rows;
    return;
  }
  // fp32 rows for fp32 products, uncentred: the caller's buffer as it is, no copy.
  const bool direct = fmt == RowFormat::f32 && !fp64_ && !centered_;
  if (direct && f32_gram_enabled()) {  // checked up front (update): the kernel adds into the master
    f32_gram_add(static_cast<const float*>(data), rows, d_, mat_.data(), product_threads(d_, rows), scratch_.packed);
    count_ += rows;
    return;
  }
  const blas_int n = static_cast<blas_int>(d_), k = static_cast<blas_int>(rows);
  if (!direct) load_rows_f32(data, rows, fmt);
  std::vector<double> chunk_mean;
  if (fp64_) scratch_.rows64.assign(scratch_.rows32.begin(), scratch_.rows32.end());
  if (centered_) center_rows(rows, chunk_mean);

  BlasThreads threads(product_threads(d_, rows) > 1 ? blas_get_num_threads() : 1);  // fp64: BLAS's own threads
  if (fp64_ && !centered_) {  // products already fp64: accumulate straight into the master
    scipy_cblas_dsyrk(CblasRowMajor, CblasLower, CblasTrans, n, k, 1.0, scratch_.rows64.data(), n, 1.0, mat_.data(), n);
    count_ += rows;
    return;
  }
  if (fp64_) {
    scratch_.prod64.resize(mat_.size());
    scipy_cblas_dsyrk(CblasRowMajor, CblasLower, CblasTrans, n, k, 1.0, scratch_.rows64.data(), n, 0.0,
                      scratch_.prod64.data(), n);
    fold_in(nullptr, 0, scratch_.prod64.data(), rows, chunk_mean.data());
    return;
  }
  const int parts = product_threads(d_, rows);
  scratch_.prod32.resize(mat_.size() * parts);
  gram_parts_f32(direct ? static_cast<const float*>(data) : scratch_.rows32.data(), rows, parts);
  if (checked_after) check_products_f32(data, rows, fmt, parts);
  fold_in(scratch_.prod32.data(), parts, nullptr, rows, chunk_mean.data());
}

// scratch_.prod32[p] = lower triangle of X_pᵀX_p for `parts` consecutive row ranges X_p of the chunk x.
void CovAccumulator::gram_parts_f32(const float* x, int64_t rows, int parts) {
  const blas_int n = static_cast<blas_int>(d_);
  const size_t dd = mat_.size();
  BlasThreads single(1);
  auto part = [&](int p) {
    const int64_t r0 = rows * p / parts, r1 = rows * (p + 1) / parts;
    scipy_cblas_ssyrk(CblasRowMajor, CblasLower, CblasTrans, n, static_cast<blas_int>(r1 - r0), 1.0f,
                      x + static_cast<size_t>(r0) * d_, n, 0.0f, scratch_.prod32.data() + p * dd, n);
  };
  run_on_threads(parts, part);
}

// mat += P (lower triangle), and in centred mode the Chan/Pébay cross term
// n_a·n_b/n · δδᵀ with δ = mean_b − mean_a, then mean_a += δ·n_b/n.
void CovAccumulator::fold_in(const float* prod32, int parts32, const double* prod64, int64_t n_b,
                             const double* mean_b) {
  if (n_b == 0) return;
  std::vector<double> delta;
  double c = 0.0;
  if (centered_) {
    delta.resize(d_);
    for (int64_t j = 0; j < d_; ++j) delta[j] = mean_b[j] - mean_[j];
    c = static_cast<double>(count_) * static_cast<double>(n_b) / static_cast<double>(count_ + n_b);
  }
  double* m = mat_.data();
  const int64_t d = d_;
  const double* dl = delta.data();
  // The fold is memory bound (d²/2 fp64 read-modify-writes per chunk): as many threads as BLAS.
  parallel_triangle_rows(d, [=](int, int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      double* mi = m + i * d;
      size_t off = static_cast<size_t>(i) * d;
      if (prod32) {
        for (int p = 0; p < parts32; ++p) {
          const float* pi = prod32 + p * static_cast<size_t>(d) * d + off;
          for (int64_t j = 0; j <= i; ++j) mi[j] += static_cast<double>(pi[j]);
        }
      } else {
        const double* pi = prod64 + off;
        for (int64_t j = 0; j <= i; ++j) mi[j] += pi[j];
      }
      if (c != 0.0) {
        double ci = c * dl[i];
        for (int64_t j = 0; j <= i; ++j) mi[j] += ci * dl[j];
      }
    }
  });
  if (centered_) {
    double w = static_cast<double>(n_b) / static_cast<double>(count_ + n_b);
    for (int64_t j = 0; j < d_; ++j) mean_[j] += delta[j] * w;
  }
  count_ += n_b;
}

void CovAccumulator::merge(const CovAccumulator& other) {
  if (other.d_ != d_) throw std::invalid_argument("cannot merge accumulators of different d");
  if (other.centered_ != centered_) throw std::invalid_argument("cannot merge centred with uncentred statistics");
  fold_in(nullptr, 0, other.mat_.data(), other.count_, centered_ ? other.mean_.data() : nullptr);
}

void CovAccumulator::set_state(int64_t count, const double* mat, const double* mean) {
  count_ = count;
  std::copy(mat, mat + mat_.size(), mat_.begin());
  if (centered_) std::copy(mean, mean + d_, mean_.begin());
}

void CovAccumulator::symmetrize_into(const std::vector<double>& m, double* out) const {
  for (int64_t i = 0; i < d_; ++i)
    for (int64_t j = 0; j <= i; ++j) out[i * d_ + j] = out[j * d_ + i] = m[i * d_ + j];
}

void CovAccumulator::second_moment_sum(double* out) const {
  symmetrize_into(mat_, out);
  if (!centered_) return;
  const double n = static_cast<double>(count_);
  for (int64_t i = 0; i < d_; ++i)
    for (int64_t j = 0; j < d_; ++j) out[i * d_ + j] += n * mean_[i] * mean_[j];
}

void CovAccumulator::centered_m2(double* out) const {
  if (!centered_) throw std::logic_error("centred statistics were not collected");
  symmetrize_into(mat_, out);
}

}  // namespace pmsolve
