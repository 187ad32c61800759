#include "f64_gemm.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "blas.h"
#include "parallel.h"

namespace pmsolve {
namespace {

// Goto's blocking with the roles named for row-major C: a micro-tile is kRows rows of C
// (A's values, broadcast) by kCols columns (B's, three zmm of 8 doubles), 24 accumulators.
// Per step of k: 3 vector loads + 8 broadcasts for 24 FMAs. B's packed block (up to kColBlock
// columns, kDepth steps) sits in L3/L2; a thread packs a row block of A (kRowBlock × kDepth, in
// L2) and runs it past every B micro-panel. Depth and row block were tuned on the Cholesky at
// d = 1536, 4096, 6400 on a Zen 5: deep steps (448-1024 alike)
// beat 192-256 by 5-15 %: they cut the passes over C, whose rows lie far apart (ld = d), more
// than they cost in L1 misses on B.
constexpr int64_t kRows = 8;
constexpr int64_t kCols = 24;
constexpr int64_t kDepth = 512;      // a B micro-panel: 96 KiB (L2)
constexpr int64_t kRowBlock = 96;    // 384 KiB of packed A per thread (L2)
constexpr int64_t kColBlock = 3072;  // 12 MiB of packed B at most

#define PMSOLVE_F64_GEMM_TARGET "avx512f"

// acc = Σ_p a[p·8 + r]·b[p·24 + c]; out −= acc (direct, row stride ldc) or tmp = acc.
__attribute__((target(PMSOLVE_F64_GEMM_TARGET))) void micro_tile(int64_t depth, const double* __restrict a,
                                                              const double* __restrict b, double* c, int64_t ldc,
                                                              double* tmp) {
  if (c != nullptr)  // the tile's lines of C, read at the end: −6 to −9 % time at d = 6400
    for (int r = 0; r < kRows; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc + 8), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc + 16), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc + 23), _MM_HINT_T0);
    }
  __m512d acc[kRows][3];
  for (int r = 0; r < kRows; ++r)
    for (int q = 0; q < 3; ++q) acc[r][q] = _mm512_setzero_pd();
  for (int64_t p = 0; p < depth; ++p) {
    const __m512d b0 = _mm512_load_pd(b + p * kCols), b1 = _mm512_load_pd(b + p * kCols + 8),
                  b2 = _mm512_load_pd(b + p * kCols + 16);
    const double* ap = a + p * kRows;
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const __m512d av = _mm512_set1_pd(ap[r]);
      acc[r][0] = _mm512_fmadd_pd(av, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_pd(av, b1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_pd(av, b2, acc[r][2]);
    }
  }
  if (c != nullptr) {
    for (int r = 0; r < kRows; ++r)
      for (int q = 0; q < 3; ++q) {
        double* o = c + r * ldc + q * 8;
        _mm512_storeu_pd(o, _mm512_sub_pd(_mm512_loadu_pd(o), acc[r][q]));
      }
  } else {
    for (int r = 0; r < kRows; ++r)
      for (int q = 0; q < 3; ++q) _mm512_store_pd(tmp + r * kCols + q * 8, acc[r][q]);
  }
}

// Rows [r0, r0 + rows) of an operand, steps [p0, p0 + depth), into panels of W rows:
// out[(panel·depth + p)·W + r]; rows past the end are zeros. The operand's element (r, p) is
// X[r·ld + p], or X[p·ld + r] when stored transposed (a k × rows matrix).
// Untransposed, row by row: each source row is read once, in order (reading W rows in lockstep
// thrashed L1 sets when ld is a multiple of a large power of two, as a Cholesky of d = 6400
// has), and the writes stay in the panel (W·depth doubles, in L1). Transposed, a panel row is
// W contiguous source elements.
template <int64_t W>
void pack_panels(const Operand& X, int64_t r0, int64_t rows, int64_t p0, int64_t depth, double* out) {
  for (int64_t q0 = 0; q0 < rows; q0 += W) {
    const int64_t live = std::min(W, rows - q0);
    double* dst = out + q0 * depth;
    if (X.transposed) {
      for (int64_t p = 0; p < depth; ++p) {
        const double* src = X.data + (p0 + p) * X.ld + r0 + q0;
        double* o = dst + p * W;
        for (int64_t r = 0; r < live; ++r) o[r] = src[r];
        for (int64_t r = live; r < W; ++r) o[r] = 0.0;
      }
      continue;
    }
    for (int64_t r = 0; r < live; ++r) {
      const double* src = X.data + (r0 + q0 + r) * X.ld + p0;
      for (int64_t p = 0; p < depth; ++p) dst[p * W + r] = src[p];
    }
    for (int64_t r = live; r < W; ++r)
      for (int64_t p = 0; p < depth; ++p) dst[p * W + r] = 0.0;
  }
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// 64-byte aligned scratch of n doubles.
struct Scratch {
  std::vector<double> buf;
  double* get(int64_t n) {
    buf.resize(static_cast<size_t>(n + 8));
    const uintptr_t base = reinterpret_cast<uintptr_t>(buf.data());
    return reinterpret_cast<double*>((base + 63) & ~uintptr_t{63});
  }
};

struct Problem {
  int64_t m, n, k;
  Operand A, B;
  double* C;
  int64_t ldc;
  bool lower;
};

// C[i0.., j0..] −= the tile in tmp, only where i < m, j < n (and j ≤ i for the lower triangle).
void subtract_edge(const Problem& P, int64_t i0, int64_t j0, const double* tmp) {
  for (int64_t r = 0; r < kRows && i0 + r < P.m; ++r) {
    const int64_t i = i0 + r;
    int64_t j_end = std::min(j0 + kCols, P.n);
    if (P.lower) j_end = std::min(j_end, i + 1);
    double* c = P.C + i * P.ldc;
    for (int64_t j = j0; j < j_end; ++j) c[j] -= tmp[r * kCols + (j - j0)];
  }
}

// One row block [i0, i1) of C against B's packed columns [j0, j1), steps of `depth`.
__attribute__((target(PMSOLVE_F64_GEMM_TARGET))) void row_block(const Problem& P, int64_t i0, int64_t i1,
                                                             int64_t j0, int64_t j1, const double* ap,
                                                             const double* bp, int64_t depth) {
  alignas(64) double tmp[kRows * kCols];
  // For the lower triangle, columns up to the block's last row.
  const int64_t j_stop = P.lower ? std::min(j1, i1) : j1;
  for (int64_t jt = j0; jt < j_stop; jt += kCols) {
    const double* b = bp + (jt - j0) * depth;
    for (int64_t it = i0; it < i1; it += kRows) {
      if (P.lower && jt > it + kRows - 1) continue;  // wholly above the diagonal
      const double* a = ap + (it - i0) * depth;
      const bool inside = it + kRows <= P.m && jt + kCols <= P.n && (!P.lower || jt + kCols - 1 <= it);
      if (inside) {
        micro_tile(depth, a, b, P.C + it * P.ldc + jt, P.ldc, nullptr);
      } else {
        micro_tile(depth, a, b, nullptr, 0, tmp);
        subtract_edge(P, it, jt, tmp);
      }
    }
  }
}

Avx512KernelSwitch g_switch;

}  // namespace

bool f64_gemm_available() { return Avx512KernelSwitch::available(); }

bool f64_gemm_enabled() { return g_switch.enabled(); }

void set_f64_gemm_enabled(bool on) { g_switch.set(on); }

void f64_gemm_sub(int64_t m, int64_t n, int64_t k, Operand A, Operand B, double* C, int64_t ldc, bool lower_only,
                  int threads) {
  if (m <= 0 || n <= 0 || k <= 0) return;
  const Problem P{m, n, k, A, B, C, ldc, lower_only};
  if (lower_only) n = std::min(n, m);
  const int64_t row_blocks = (m + kRowBlock - 1) / kRowBlock;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, row_blocks)));
  static thread_local Scratch b_scratch;
  for (int64_t j0 = 0; j0 < n; j0 += kColBlock) {
    const int64_t j1 = std::min(n, j0 + kColBlock);
    // Rows of C that meet columns [j0, j1): in the lower triangle, from row j0 down.
    const int64_t first_block = lower_only ? j0 / kRowBlock : 0;
    for (int64_t p0 = 0; p0 < k; p0 += kDepth) {
      const int64_t depth = std::min(kDepth, k - p0);
      const int64_t cols = round_up(j1 - j0, kCols);
      double* bp = b_scratch.get(cols * depth);
      const int64_t col_panels = cols / kCols;
      run_on_threads(nt, [&](int t) {
        const int64_t q0 = col_panels * t / nt, q1 = col_panels * (t + 1) / nt;
        const int64_t c0 = j0 + q0 * kCols, c1 = std::min(j1, j0 + q1 * kCols);
        if (c1 > c0) pack_panels<kCols>(B, c0, c1 - c0, p0, depth, bp + q0 * kCols * depth);
      });
      // Row blocks dealt dynamically, the bottom (widest in a triangle) first.
      std::atomic<int64_t> next{0};
      const int64_t blocks = row_blocks - first_block;
      run_on_threads(nt, [&](int t) {
        static thread_local Scratch a_scratch;  // pool threads keep theirs between calls
        double* ap = a_scratch.get(round_up(kRowBlock, kRows) * depth);
        for (int64_t b; (b = next.fetch_add(1)) < blocks;) {
          const int64_t i0 = (row_blocks - 1 - b) * kRowBlock, i1 = std::min(m, i0 + kRowBlock);
          pack_panels<kRows>(A, i0, i1 - i0, p0, depth, ap);
          row_block(P, i0, i1, j0, j1, ap, bp, depth);
        }
      });
    }
  }
}

}  // namespace pmsolve
