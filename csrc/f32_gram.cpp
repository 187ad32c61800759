#include "f32_gram.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <string>

#include "blas.h"
#include "parallel.h"

namespace pmsolve {
namespace {

// Packed layout: features in panels of 16, token t of panel q at packed[(q·nt + t)·16 + c] =
// x[t][16q + c]. One copy serves both operands: a panel row is a 16-lane B vector, any single
// float of it an A value to broadcast. The tiling follows dpbf16_gram.cpp.
constexpr int64_t kPanel = 16;
constexpr int64_t kRowsPerTile = 8;  // micro-tile: 8 features × up to 3 panels (24 zmm accumulators)
constexpr int kMaxPanels = 3;
constexpr int64_t kTileCols = kMaxPanels * kPanel;
constexpr int64_t kInner = 64;   // tokens summed in registers before the tile
constexpr int64_t kFold = 512;   // tokens summed in the tile before the fp64 master
constexpr int64_t kStrip = 128;  // rows of the triangle a thread owns at a time (A slice in L2)

#define PMSOLVE_F32_GRAM_TARGET "avx512f"

template <int NP>
__attribute__((target(PMSOLVE_F32_GRAM_TARGET))) void micro_tile(const float* a, const float* b,
                                                              int64_t panel_stride, int64_t tokens, float* out) {
  for (int r = 0; r < kRowsPerTile; ++r)
    for (int k = 0; k < NP; ++k) _mm512_storeu_ps(out + r * kTileCols + k * kPanel, _mm512_setzero_ps());
  for (int64_t t0 = 0; t0 < tokens; t0 += kInner) {
    const int64_t t1 = std::min(tokens, t0 + kInner);
    __m512 acc[kRowsPerTile][NP];
    for (int r = 0; r < kRowsPerTile; ++r)
      for (int k = 0; k < NP; ++k) acc[r][k] = _mm512_setzero_ps();
    for (int64_t t = t0; t < t1; ++t) {
      __m512 bv[NP];
      for (int k = 0; k < NP; ++k) bv[k] = _mm512_loadu_ps(b + k * panel_stride + t * kPanel);
      const float* ap = a + t * kPanel;
      for (int r = 0; r < kRowsPerTile; ++r) {
        const __m512 av = _mm512_set1_ps(ap[r]);
        for (int k = 0; k < NP; ++k) acc[r][k] = _mm512_fmadd_ps(av, bv[k], acc[r][k]);
      }
    }
    for (int r = 0; r < kRowsPerTile; ++r)
      for (int k = 0; k < NP; ++k) {
        float* o = out + r * kTileCols + k * kPanel;
        _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), acc[r][k]));
      }
  }
}

using MicroTile = void (*)(const float*, const float*, int64_t, int64_t, float*);
constexpr MicroTile kMicroTiles[kMaxPanels + 1] = {nullptr, micro_tile<1>, micro_tile<2>, micro_tile<3>};

// Tokens [t0, t1) of the chunk into the panel layout; features past d are zeros.
__attribute__((target(PMSOLVE_F32_GRAM_TARGET))) void pack(const float* x, int64_t d, int64_t nt, int64_t t0,
                                                        int64_t t1, float* packed) {
  const int64_t nq = (d + kPanel - 1) / kPanel, full = d / kPanel;
  for (int64_t t = t0; t < t1; ++t) {
    const float* row = x + t * d;
    for (int64_t q = 0; q < full; ++q) _mm512_storeu_ps(packed + (q * nt + t) * kPanel, _mm512_loadu_ps(row + q * kPanel));
    for (int64_t q = full; q < nq; ++q) {  // the ragged last panel
      float* dst = packed + (q * nt + t) * kPanel;
      for (int64_t c = 0; c < kPanel; ++c) dst[c] = q * kPanel + c < d ? row[q * kPanel + c] : 0.0f;
    }
  }
}

// master[i][j] += tile for the rows i0.. and columns j0.. the tile covers, j ≤ i, i, j < d.
__attribute__((target(PMSOLVE_F32_GRAM_TARGET))) void fold(const float* tile, int64_t i0, int64_t j0, int64_t cols,
                                                        int64_t d, double* master) {
  for (int64_t r = 0; r < kRowsPerTile && i0 + r < d; ++r) {
    const int64_t i = i0 + r, j_end = std::min({j0 + cols, i + 1, d});
    const float* t = tile + r * kTileCols - j0;
    double* m = master + i * d;
    for (int64_t j = j0; j < j_end; ++j) m[j] += static_cast<double>(t[j]);
  }
}

// Rows [s0, s1) of the lower triangle, all tokens of the chunk.
void strip_product(const float* packed, int64_t nt, int64_t d, int64_t s0, int64_t s1, double* master) {
  alignas(64) float tile[kRowsPerTile * kTileCols];
  const int64_t panel_stride = nt * kPanel;
  for (int64_t t0 = 0; t0 < nt; t0 += kFold) {
    const int64_t tokens = std::min(kFold, nt - t0);
    for (int64_t j0 = 0; j0 < s1; j0 += kTileCols) {
      for (int64_t i0 = std::max(s0, j0 / kRowsPerTile * kRowsPerTile); i0 < s1; i0 += kRowsPerTile) {
        // Panels this tile needs: up to the last column on or below its last row's diagonal.
        const int64_t last = std::min({i0 + kRowsPerTile, j0 + kTileCols, d}) - 1;
        if (last < j0) continue;
        const int np_used = static_cast<int>((last - j0) / kPanel + 1);
        const float* a = packed + ((i0 / kPanel) * nt + t0) * kPanel + i0 % kPanel;
        const float* b = packed + ((j0 / kPanel) * nt + t0) * kPanel;
        kMicroTiles[np_used](a, b, panel_stride, tokens, tile);
        fold(tile, i0, j0, np_used * kPanel, d, master);
      }
    }
  }
}

bool openblas_core_has_avx512() {
  std::string core = scipy_openblas_get_corename();
  for (char& ch : core) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return core == "skylakex" || core == "cooperlake" || core == "sapphirerapids";
}

int g_mode = [] {  // 1 on, 0 off, -1 automatic
  const char* env = std::getenv("PMSOLVE_F32_GRAM");
  if (env == nullptr || *env == '\0') return -1;
  return std::strcmp(env, "0") != 0 ? 1 : 0;
}();

}  // namespace

bool f32_gram_available() {
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
}

bool f32_gram_enabled() {
  if (!f32_gram_available() || g_mode == 0) return false;
  if (g_mode == 1) return true;
  static const bool narrower_blas = !openblas_core_has_avx512();
  return narrower_blas;
}

void set_f32_gram_enabled(bool on) { g_mode = on ? 1 : 0; }

void f32_gram_add(const float* x, int64_t rows, int64_t d, double* master, int threads,
                  std::vector<uint16_t>& scratch) {
  if (rows <= 0) return;
  const int64_t nq = (d + kPanel - 1) / kPanel;
  scratch.resize(static_cast<size_t>(2 * nq * rows * kPanel + 32));
  const uintptr_t base = reinterpret_cast<uintptr_t>(scratch.data());
  float* packed = reinterpret_cast<float*>((base + 63) & ~uintptr_t{63});  // cache-line aligned panels
  const int npk = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, rows / 128)));
  run_on_threads(npk, [&](int t) { pack(x, d, rows, rows * t / npk, rows * (t + 1) / npk, packed); });

  const int64_t strips = (d + kStrip - 1) / kStrip;
  std::atomic<int64_t> next{0};
  const int nw = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, strips)));
  run_on_threads(nw, [&](int) {
    // Longest strips (the bottom of the triangle) first, so that threads finish together.
    for (int64_t k; (k = next.fetch_add(1)) < strips;) {
      const int64_t s = strips - 1 - k;
      strip_product(packed, rows, d, s * kStrip, std::min(d, (s + 1) * kStrip), master);
    }
  });
}

}  // namespace pmsolve
