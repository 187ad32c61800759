#include "f32_gram.h"

#include <immintrin.h>

#include <algorithm>

#include "blas.h"
#include "gram_tiles.h"

namespace pmsolve {
namespace {

using namespace gram_tiles;

// Steps are single tokens (gram_tiles.h): token t of panel q at packed[(q·nt + t)·16 + c] =
// x[t][16q + c]; a panel row is a 16-lane B vector, any single float of it an A value.
constexpr int64_t kInner = 64;  // tokens summed in registers before the tile
constexpr int64_t kFold = 512;  // tokens summed in the tile before the fp64 master

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

constexpr MicroTile<float> kMicroTiles[kMaxPanels + 1] = {nullptr, micro_tile<1>, micro_tile<2>, micro_tile<3>};

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

Avx512KernelSwitch g_switch;

}  // namespace

bool f32_gram_available() { return Avx512KernelSwitch::available(); }

bool f32_gram_enabled() { return g_switch.enabled(); }

void set_f32_gram_enabled(bool on) { g_switch.set(on); }

void f32_gram_add(const float* x, int64_t rows, int64_t d, double* master, int threads,
                  std::vector<uint16_t>& scratch) {
  if (rows <= 0) return;
  gram_add<float>(
      rows, d, master, threads, scratch,
      [&](int64_t t0, int64_t t1, float* packed) { pack(x, d, rows, t0, t1, packed); }, kMicroTiles, kFold, 128);
}

}  // namespace pmsolve
