// The lower-triangle tiling shared by the AVX-512 Gram kernels (dpbf16_gram.cpp: bf16 token
// pairs, f32_gram.cpp: fp32 tokens). Both pack a chunk into panels of 16 features, step by step
// (a step is a token or a token pair): step s of panel q at packed[(q·steps + s)·16 + c]. A
// micro-tile multiplies 8 features (A, broadcast) by up to 3 panels (B) into an fp32 tile,
// summed over at most `fold_steps` steps, then added into the fp64 master. Threads own strips
// of 128 rows of the triangle (their A slice stays in L2 while the B panels stream past).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "parallel.h"

namespace pmsolve::gram_tiles {

constexpr int64_t kPanel = 16;
constexpr int64_t kRowsPerTile = 8;  // micro-tile: 8 features × up to 3 panels (24 zmm accumulators)
constexpr int kMaxPanels = 3;
constexpr int64_t kTileCols = kMaxPanels * kPanel;
constexpr int64_t kStrip = 128;

// out[r][c] (r < 8, c < 16·NP, row stride kTileCols) = Σ over `steps` steps of a's 8 features
// against the NP panels at b, b + panel_stride, ...
template <class T>
using MicroTile = void (*)(const T* a, const T* b, int64_t panel_stride, int64_t steps, float* out);

// master[i][j] += tile for the rows i0.. and columns j0.. the tile covers, j ≤ i, i, j < d.
__attribute__((target("avx512f"))) inline void fold(const float* tile, int64_t i0, int64_t j0, int64_t cols,
                                                    int64_t d, double* master) {
  for (int64_t r = 0; r < kRowsPerTile && i0 + r < d; ++r) {
    const int64_t i = i0 + r, j_end = std::min({j0 + cols, i + 1, d});
    const float* t = tile + r * kTileCols - j0;
    double* m = master + i * d;
    for (int64_t j = j0; j < j_end; ++j) m[j] += static_cast<double>(t[j]);
  }
}

// Rows [s0, s1) of the lower triangle, all steps of the chunk; tiles[np] handles np panels.
template <class T>
void strip_product(const T* packed, int64_t steps, int64_t d, int64_t s0, int64_t s1, double* master,
                   const MicroTile<T>* tiles, int64_t fold_steps) {
  alignas(64) float tile[kRowsPerTile * kTileCols];
  const int64_t panel_stride = steps * kPanel;
  for (int64_t p0 = 0; p0 < steps; p0 += fold_steps) {
    const int64_t n = std::min(fold_steps, steps - p0);
    for (int64_t j0 = 0; j0 < s1; j0 += kTileCols) {
      for (int64_t i0 = std::max(s0, j0 / kRowsPerTile * kRowsPerTile); i0 < s1; i0 += kRowsPerTile) {
        // Panels this tile needs: up to the last column on or below its last row's diagonal.
        const int64_t last = std::min({i0 + kRowsPerTile, j0 + kTileCols, d}) - 1;
        if (last < j0) continue;
        const int np_used = static_cast<int>((last - j0) / kPanel + 1);
        const T* a = packed + ((i0 / kPanel) * steps + p0) * kPanel + i0 % kPanel;
        const T* b = packed + ((j0 / kPanel) * steps + p0) * kPanel;
        tiles[np_used](a, b, panel_stride, n, tile);
        fold(tile, i0, j0, np_used * kPanel, d, master);
      }
    }
  }
}

// The whole chunk: pack(s0, s1, packed) fills steps [s0, s1) (threads split the steps), then
// threads take strips, the longest (the bottom of the triangle) first so that they finish
// together. `scratch` (16-bit words) holds the packed copy; T is 4 bytes wide.
template <class T, class Pack>
void gram_add(int64_t steps, int64_t d, double* master, int threads, std::vector<uint16_t>& scratch, Pack pack,
              const MicroTile<T>* tiles, int64_t fold_steps, int64_t steps_per_pack_thread) {
  static_assert(sizeof(T) == 4, "packed elements are 32-bit");
  const int64_t nq = (d + kPanel - 1) / kPanel;
  scratch.resize(static_cast<size_t>(2 * nq * steps * kPanel + 32));
  const uintptr_t base = reinterpret_cast<uintptr_t>(scratch.data());
  T* packed = reinterpret_cast<T*>((base + 63) & ~uintptr_t{63});  // cache-line aligned panels
  const int npk = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, steps / steps_per_pack_thread)));
  run_on_threads(npk, [&](int t) { pack(steps * t / npk, steps * (t + 1) / npk, packed); });

  const int64_t strips = (d + kStrip - 1) / kStrip;
  std::atomic<int64_t> next{0};
  const int nw = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, strips)));
  run_on_threads(nw, [&](int) {
    for (int64_t k; (k = next.fetch_add(1)) < strips;) {
      const int64_t s = strips - 1 - k;
      strip_product<T>(packed, steps, d, s * kStrip, std::min(d, (s + 1) * kStrip), master, tiles, fold_steps);
    }
  });
}

}  // namespace pmsolve::gram_tiles
