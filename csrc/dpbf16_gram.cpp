#include "dpbf16_gram.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "gram_tiles.h"

namespace pmsolve {
namespace {

using namespace gram_tiles;

// Steps are token pairs (gram_tiles.h): a bf16 pair (x[2p][f], x[2p+1][f]) of two consecutive
// tokens is one dword, panel q holding dword (p, c) = pair(2p, 16q + c) at
// packed[(q·np + p)·16 + c]. One copy serves both operands: a panel row is the 16-lane B
// vector VDPBF16PS wants, and any single dword of it is an A value to broadcast.

// Token pairs summed in fp32 (kInnerPairs at a time in registers, then in an L1 tile) before
// the tile is added into the fp64 master: 512 tokens, as in the AMX kernel (amx_gram.cpp).
constexpr int64_t kFoldPairs = 256;

#define PMSOLVE_DPBF16_TARGET "avx512f,avx512bw,avx512vl,avx512bf16"

// out[r][c] = Σ_{p < pairs} of rows a (8 consecutive features, their dwords 16 apart per pair)
// against NP panels at b, b + panel_stride, ...: exact bf16 products summed in fp32, in two
// levels: kInnerPairs pairs in registers, then into `out`. VDPBF16PS rounds after each product
// (measured: it matches a sequential fp32 sum), so one register run over 512 tokens erred 8-9e-7
// relative per chunk, three times torch's fp32 GEMM of the same rows; runs of 64 tokens
// bring it to 2-5e-8, under that GEMM's error, at no measurable cost (docs/history.md §3).
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

constexpr MicroTile<uint32_t> kMicroTiles[kMaxPanels + 1] = {nullptr, micro_tile<1>, micro_tile<2>, micro_tile<3>};

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

// Set from pmsolve/switches.py (PMSOLVE_DPBF16) when pmsolve._native loads the module.
bool g_enabled = true;

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
  const int64_t np = (rows + 1) / 2;
  gram_add<uint32_t>(
      np, d, master, threads, scratch,
      [&](int64_t p0, int64_t p1, uint32_t* packed) { pack(x, rows, d, np, p0, p1, packed); }, kMicroTiles,
      kFoldPairs, 64);
}

}  // namespace pmsolve
