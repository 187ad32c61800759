// Streaming second-moment accumulator for preservation statistics.
//
// Rows arrive in chunks (T × d, row-major, fp32 / bf16 / fp16). Each chunk's
// Gram matrix XᵀX is formed by a symmetric rank-k product of one triangle
// (ssyrk, or dsyrk in fp64-product mode) and added into an fp64 master. The
// fp32 rounding error stays that of one chunk (measured 1–2e-7 relative) and
// does not grow with the number of tokens, unlike the reference's fp32 running
// sum. bf16 chunks on AMX or AVX512-BF16 CPUs take a bf16 kernel instead (amx_gram.h,
// dpbf16_gram.h: exact products summed in fp32 over 512 rows, several times faster). Centred mode keeps (count, mean, M2) and merges chunks with Chan/Pébay.
//
// Storage: `mat_` is d × d row-major; only the lower triangle (i ≥ j) is kept
// up to date. It holds Σ xxᵀ (uncentred) or M2 = Σ (x−μ)(x−μ)ᵀ (centred).
#pragma once

#include <cstdint>
#include <vector>

namespace pmsolve {

enum class RowFormat { f32, bf16, f16 };

// Which kernel forms the products of bf16 chunks (fp32 products, uncentred): the AMX tiles
// (amx_gram.h), AVX512-BF16 dot products (dpbf16_gram.h), or widening to fp32 for ssyrk.
// The first one available and switched on, in that order.
enum class Bf16Gram { amx, avx512_bf16, fp32 };
Bf16Gram bf16_gram_kernel();

// Per-chunk work buffers (up to two d × d fp32 products, row copies, packed bf16 panels). One
// set serves every accumulator in the process, one update at a time: collecting statistics for
// several layers keeps one scratch in all, not one per layer (fp32 products at d = 11008 on two
// threads: 0.97 GB each). Freed when the last accumulator goes.
struct ChunkScratch {
  std::vector<float> rows32, prod32;  // prod32: one d × d product per thread
  std::vector<double> rows64, prod64;
  std::vector<uint16_t> packed;  // bf16 kernels: packed copies of a chunk
};

class CovAccumulator {
 public:
  // chunk_rows = 0 picks kDefaultChunkRows.
  CovAccumulator(int64_t d, bool fp64_products, bool centered, int64_t chunk_rows);
  CovAccumulator(const CovAccumulator&) = delete;
  CovAccumulator& operator=(const CovAccumulator&) = delete;

  // rows × d, row-major, in the given format (bf16/fp16 as raw 16-bit words).
  // Throws std::domain_error, adding nothing, if any value is NaN or Inf ("non-finite
  // value ... in row R"), or if fp32 products overflow ("overflow: ...").
  void update(const void* data, int64_t rows, RowFormat fmt);
  // Exact merge: sums add (uncentred) or Chan/Pébay (centred).
  void merge(const CovAccumulator& other);
  // Replace the state; `mat` is d × d row-major (lower triangle read), mean may be null when uncentred.
  void set_state(int64_t count, const double* mat, const double* mean);

  // Full symmetric Σ xxᵀ (derived as M2 + n μμᵀ when centred).
  void second_moment_sum(double* out) const;
  // Full symmetric M2 (centred mode only).
  void centered_m2(double* out) const;

  int64_t d() const { return d_; }
  int64_t count() const { return count_; }
  int64_t chunk_rows() const { return chunk_; }
  bool fp64_products() const { return fp64_; }
  bool centered() const { return centered_; }
  const std::vector<double>& mean() const { return mean_; }

  static constexpr int64_t kDefaultChunkRows = 4096;

 private:
  // checked_after: the rows were not checked for NaN/Inf; check the product before adding it.
  void process_chunk(const void* data, int64_t rows, RowFormat fmt, bool checked_after);
  void check_products_f32(const void* data, int64_t rows, RowFormat fmt, int parts) const;
  void check_squares_fit_f32(const void* data, int64_t rows, RowFormat fmt) const;
  void load_rows_f32(const void* data, int64_t rows, RowFormat fmt);
  void center_rows(int64_t rows, std::vector<double>& chunk_mean);
  void gram_parts_f32(const float* x, int64_t rows, int parts);
  // Adds parts32 fp32 products (or one fp64 product) of n_b rows with mean mean_b into the master.
  void fold_in(const float* prod32, int parts32, const double* prod64, int64_t n_b, const double* mean_b);
  void symmetrize_into(const std::vector<double>& m, double* out) const;

  int64_t d_;
  bool fp64_;
  bool centered_;
  int64_t chunk_;
  int64_t count_ = 0;
  std::vector<double> mat_;   // master (lower triangle)
  std::vector<double> mean_;  // centred mode only
  // Holds the process's ChunkScratch while this accumulator exists; the last holder frees it.
  class ScratchLease {
   public:
    ScratchLease();
    ~ScratchLease();
    ScratchLease(const ScratchLease&) = delete;
    ScratchLease& operator=(const ScratchLease&) = delete;
    ChunkScratch& scratch() const;
  };
  ScratchLease lease_;
  // Its buffers (allocated lazily, used only inside update(), which holds the scratch's lock).
  ChunkScratch& scratch_;
};

}  // namespace pmsolve
