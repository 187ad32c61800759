#include "dpbf16_gram.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "parallel.h"

namespace pmsolve {
namespace {

// Packed layout: features in panels of 16; a bf16 pair (x[2p][f], x[2p+1][f]) of two
// consecutive tokens is one dword, panel q holding dword (p, c) = pair(2p, 16q + c) at
// packed[(q·np + p)·16 + c]. One copy serves both operands: a panel row is the 16-lane B
// vector VDPBF16PS wants, and any single dword of it is an A value to broadcast.
constexpr int64_t kPanel = 16;
constexpr int64_t kRowsPerTile = 8;   // micro-tile: 8 features × up to 3 panels (24 zmm accumulators)
constexpr int kMaxPanels = 3;
constexpr int64_t kTileCols = kMaxPanels * kPanel;
// Token pairs summed in fp32 (kInnerPairs at a time in registers, then in an L1 tile) before
// the tile is added into the fp64 master: 512 tokens, as in the AMX kernel (amx_gram.cpp).
constexpr int64_t kFoldPairs = 256;
// Rows of the triangle one thread owns at a time: its A slice (128 features × 256 pairs =
// 128 KiB) stays in L2 while the B panels stream past it.
constexpr int64_t kStrip = 128;

#define PMSOLVE_DPBF16_TARGET "avx512f,avx512bw,avx512vl,avx512bf16"

// out[r][c] = Σ_{p < pairs} of rows a (8 consecutive features, their dwords 16 apart per pair)
// against NP panels at b, b + panel_stride, ...: exact bf16 products summed in fp32, in two
// levels: kInnerPairs pairs in registers, then into `out`. VDPBF16PS rounds after each product
// (measured: it matches a sequential fp32 sum), so one register run over 512 tokens erred 8-9e-7
// relative per chunk, three times torch's fp32 GEMM of the same rows; runs of 64 tokens
// bring it to 2-5e-8, under that GEMM's error, at no measurable cost (bench/RESULTS.md).
constexpr int64_t kInnerPairs = 32;

template <int NP>
__attribute__((target(PMSOLVE_DPBF16_TARGET))) void micro_tile(const uint32_t* a, const uint32_t* b,
                                                            int64_t panel_stride, int64_t pairs, float* out) {
  for (int r = 0; r < kRowsPerTile; ++r)
    for (int k = 0; k < NP; ++k) _mm512_storeu_ps(out + r * kTileCols + k * kPanel, _mm512_setzero_ps());
  for (int64_t p0 = 0; p0 < pairs; p0 += kInnerPairs) {
    const int64_t p1 = std::min(pairs, p0 + kInnerPairs);
    __m512 acc[kRowsPerTile][NP];
    for (int r = 0; r < kRowsPerTile; ++r)
      for (int k = 0; k < NP; ++k) acc[r][k] = _mm512_setzero_ps();
    for (int64_t p = p0; p < p1; ++p) {
      __m512bh bv[NP];
      for (int k = 0; k < NP; ++k) bv[k] = (__m512bh)_mm512_loadu_si512(b + k * panel_stride + p * kPanel);
      const uint32_t* ap = a + p * kPanel;
      for (int r = 0; r < kRowsPerTile; ++r) {
        const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(ap[r]));
        for (int k = 0; k < NP; ++k) acc[r][k] = _mm512_dpbf16_ps(acc[r][k], av, bv[k]);
      }
    }
    for (int r = 0; r < kRowsPerTile; ++r)
      for (int k = 0; k < NP; ++k) {
        float* o = out + r * kTileCols + k * kPanel;
        _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), acc[r][k]));
      }
  }
}

using MicroTile = void (*)(const uint32_t*, const uint32_t*, int64_t, int64_t, float*);
constexpr MicroTile kMicroTiles[kMaxPanels + 1] = {nullptr, micro_tile<1>, micro_tile<2>, micro_tile<3>};

// Pairs [p0, p1) of the chunk into the panel layout; features past d and a missing last
// token are zeros (they add nothing). O(rows · d) against the O(rows · d²) product.
__attribute__((target(PMSOLVE_DPBF16_TARGET))) void pack(const uint16_t* x, int64_t rows, int64_t d, int64_t np,
                                                      int64_t p0, int64_t p1, uint32_t* packed) {
  const int64_t nq = (d + kPanel - 1) / kPanel, full = d / kPanel;
  for (int64_t p = p0; p < p1; ++p) {
    const uint16_t* r0 = x + 2 * p * d;
    const uint16_t* r1 = 2 * p + 1 < rows ? r0 + d : nullptr;
    for (int64_t q = 0; q < full; ++q) {
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + q * kPanel)));
      const __m512i hi = r1 ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1 + q * kPanel)))
                            : _mm512_setzero_si512();
      _mm512_storeu_si512(packed + (q * np + p) * kPanel, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
    for (int64_t q = full; q < nq; ++q) {  // the ragged last panel
      uint32_t* dst = packed + (q * np + p) * kPanel;
      for (int64_t c = 0; c < kPanel; ++c) {
        const int64_t f = q * kPanel + c;
        dst[c] = f < d ? uint32_t{r0[f]} | (r1 ? uint32_t{r1[f]} << 16 : 0u) : 0u;
      }
    }
  }
}

// master[i][j] += tile for the rows i0.. and columns j0.. the tile covers, j ≤ i, i, j < d.
__attribute__((target(PMSOLVE_DPBF16_TARGET))) void fold(const float* tile, int64_t i0, int64_t j0, int64_t cols, int64_t d, double* master) {
  for (int64_t r = 0; r < kRowsPerTile && i0 + r < d; ++r) {
    const int64_t i = i0 + r, j_end = std::min({j0 + cols, i + 1, d});
    const float* t = tile + r * kTileCols - j0;
    double* m = master + i * d;
    for (int64_t j = j0; j < j_end; ++j) m[j] += static_cast<double>(t[j]);
  }
}

// Rows [s0, s1) of the lower triangle, all pairs of the chunk.
void strip_product(const uint32_t* packed, int64_t np, int64_t d, int64_t s0, int64_t s1, double* master) {
  alignas(64) float tile[kRowsPerTile * kTileCols];
  const int64_t panel_stride = np * kPanel;
  for (int64_t p0 = 0; p0 < np; p0 += kFoldPairs) {
    const int64_t pairs = std::min(kFoldPairs, np - p0);
    for (int64_t j0 = 0; j0 < s1; j0 += kTileCols) {
      for (int64_t i0 = std::max(s0, j0 / kRowsPerTile * kRowsPerTile); i0 < s1; i0 += kRowsPerTile) {
        // Panels this tile needs: up to the last column on or below its last row's diagonal.
        const int64_t last = std::min({i0 + kRowsPerTile, j0 + kTileCols, d}) - 1;
        if (last < j0) continue;
        const int np_used = static_cast<int>((last - j0) / kPanel + 1);
        const uint32_t* a = packed + ((i0 / kPanel) * np + p0) * kPanel + i0 % kPanel;
        const uint32_t* b = packed + ((j0 / kPanel) * np + p0) * kPanel;
        kMicroTiles[np_used](a, b, panel_stride, pairs, tile);
        fold(tile, i0, j0, np_used * kPanel, d, master);
      }
    }
  }
}

bool g_enabled = [] {
  const char* env = std::getenv("PMSOLVE_DPBF16");
  return env == nullptr || std::strcmp(env, "0") != 0;
}();

}  // namespace

bool dpbf16_available() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return ok;
}

bool dpbf16_enabled() { return g_enabled && dpbf16_available(); }

void set_dpbf16_enabled(bool on) { g_enabled = on; }

void dpbf16_gram_add(const uint16_t* x, int64_t rows, int64_t d, double* master, int threads,
                     std::vector<uint16_t>& scratch) {
  if (rows <= 0) return;
  const int64_t np = (rows + 1) / 2, nq = (d + kPanel - 1) / kPanel;
  scratch.resize(static_cast<size_t>(2 * nq * np * kPanel + 32));
  const uintptr_t base = reinterpret_cast<uintptr_t>(scratch.data());
  uint32_t* packed = reinterpret_cast<uint32_t*>((base + 63) & ~uintptr_t{63});  // cache-line aligned panels
  const int npk = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, np / 64)));
  run_on_threads(npk, [&](int t) { pack(x, rows, d, np, np * t / npk, np * (t + 1) / npk, packed); });

  const int64_t strips = (d + kStrip - 1) / kStrip;
  std::atomic<int64_t> next{0};
  const int nw = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, strips)));
  run_on_threads(nw, [&](int) {
    // Longest strips (the bottom of the triangle) first, so that threads finish together.
    for (int64_t k; (k = next.fetch_add(1)) < strips;) {
      const int64_t s = strips - 1 - k;
      strip_product(packed, np, d, s * kStrip, std::min(d, (s + 1) * kStrip), master);
    }
  });
}

}  // namespace pmsolve
