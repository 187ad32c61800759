#include "amx_gram.h"

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "parallel.h"

namespace pmsolve {
namespace {

constexpr int kArchReqXcompPerm = 0x1023;  // arch_prctl: ask for an extended state component
constexpr int kXfeatureXtiledata = 18;     // ... the AMX tile data
constexpr int64_t kBlock = 32;             // C block edge: 2 × 2 tiles of 16 × 16 fp32
constexpr int64_t kTileK = 32;             // bf16 values per tile row (64 bytes)
// Block rows that share each B panel while it is in L2 (2 × 32 features × 4096 tokens of A
// = 512 KiB, plus one 256 KiB B panel, in the 2 MiB L2 of the AMX Xeons, which the fp64
// master's block updates also pass through). Measured with 4096 rows, alternating processes:
// groups of 2 took 155-166 ms at d = 6400 against 173-175 with 4 (1 MiB of A), the same at 1536.
constexpr int64_t kGroup = 2;

// GCC's tile intrinsics are asm statements without a memory clobber: the compiler does not
// know that ldtilecfg/tileloadd read memory or that tilestored writes it, and at -O3 it
// dropped the tile configuration's stores (measured: a segfault in ldtilecfg). A compiler
// barrier around them keeps every store and load where the source has it.
inline void compiler_barrier() { asm volatile("" ::: "memory"); }

bool cpu_has_amx_bf16() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  return (d & (1u << 22)) != 0 && (d & (1u << 24)) != 0;  // AMX-BF16, AMX-TILE
}

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Every tile is 16 rows × 64 bytes: tiles 0-3 hold the 2 × 2 fp32 C block, 4-5 two A
// tiles (16 features × 32 tokens), 6-7 two B tiles (16 token pairs × 16 features × 2).
__attribute__((target("amx-tile"))) void configure_tiles() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof cfg);
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  compiler_barrier();
  _tile_loadconfig(&cfg);
}

__attribute__((target("amx-tile"))) void release_tiles() { _tile_release(); }

// Tile-ready packing. A bf16 pair (x[t][f], x[t+1][f]) of two consecutive tokens is one
// dword. A B tile (16 token pairs × 16 features) holds B32[k][c] = pair(t0 + 2k, f0 + c): the
// VNNI layout TDPBF16PS wants. The A tile of the same features and tokens holds the same
// dwords transposed, A32[m][k] = pair(t0 + 2k, f0 + m). Both are stored as contiguous 1 KiB
// tiles, tile (fb, ks) at offset (fb · nk + ks) · 256 dwords, so every tile load reads one
// contiguous KiB (strided loads of rows 8 KiB apart thrashed L1 sets: measured 3x slower).
constexpr int64_t kTileDwords = 256;

// Token steps summed in fp32 tiles before they are added into an fp64 block: 512 tokens.
// Summing a whole 4096-row chunk in fp32 measured 1.1e-7 relative error at d = 6400 after
// 32k tokens (target 1e-7); the fold costs 4 tile stores and 1024 adds in L1 per 512 tokens.
constexpr int64_t kFoldSteps = 16;

__attribute__((target("amx-tile,amx-bf16"))) void store_tiles(float* out) {
  _tile_stored(0, out, kBlock * 4);
  _tile_stored(1, out + 16, kBlock * 4);
  _tile_stored(2, out + 16 * kBlock, kBlock * 4);
  _tile_stored(3, out + 16 * kBlock + 16, kBlock * 4);
  compiler_barrier();  // `out` was written behind the compiler's back
}

// Only AMX CPUs run this file's kernels, and they all have AVX-512: the fold below and the
// packing vectorise with it (the build's baseline is generic x86-64). Measured on an AMX Xeon:
// 4096 × 1536 bf16 rows 11–13 → 9–10.7 ms per update, d = 6400 4–9 % faster.
#define PMSOLVE_AMX_VECTOR "avx512f,avx512bw,avx512vl"

// acc (32 × 32 fp64, row-major) = Σ over all nk token steps of the features (i0.., j0..).
__attribute__((target("amx-tile,amx-bf16," PMSOLVE_AMX_VECTOR))) void block_product(const uint32_t* a_tiles, const uint32_t* b_tiles,
                                                               int64_t nk, int64_t ib, int64_t jb, double* acc) {
  alignas(64) float part[kBlock * kBlock];
  std::fill(acc, acc + kBlock * kBlock, 0.0);
  const uint32_t* a0 = a_tiles + (2 * ib) * nk * kTileDwords;
  const uint32_t* a1 = a0 + nk * kTileDwords;
  const uint32_t* b0 = b_tiles + (2 * jb) * nk * kTileDwords;
  const uint32_t* b1 = b0 + nk * kTileDwords;
  compiler_barrier();  // the packed tiles are complete in memory
  for (int64_t k0 = 0; k0 < nk; k0 += kFoldSteps) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t ks = k0; ks < std::min(nk, k0 + kFoldSteps); ++ks) {
      const int64_t off = ks * kTileDwords;
      _tile_loadd(4, a0 + off, 64);
      _tile_loadd(5, a1 + off, 64);
      _tile_loadd(6, b0 + off, 64);
      _tile_loadd(7, b1 + off, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    store_tiles(part);
    for (int64_t e = 0; e < kBlock * kBlock; ++e) acc[e] += static_cast<double>(part[e]);
  }
}

// Token steps [ks0, ks1): B tiles from the rows, then A tiles as their dword transposes.
// `x` has whole tiles (rows a multiple of 32, d of 32; the caller pads otherwise), so the
// loops carry no bounds tests and vectorise. O(rows · d) against the O(rows · d²) product.
__attribute__((target(PMSOLVE_AMX_VECTOR))) void pack(const uint16_t* x, int64_t d, int64_t nk, int64_t ks0, int64_t ks1, uint32_t* a_tiles,
          uint32_t* b_tiles) {
  const int64_t nf = d / 16;
  for (int64_t ks = ks0; ks < ks1; ++ks) {
    for (int64_t k = 0; k < 16; ++k) {
      const uint16_t* r0 = x + (ks * kTileK + 2 * k) * d;
      const uint16_t* r1 = r0 + d;
      for (int64_t fb = 0; fb < nf; ++fb) {
        uint32_t* dst = b_tiles + (fb * nk + ks) * kTileDwords + k * 16;
        const uint16_t* s0 = r0 + fb * 16;
        const uint16_t* s1 = r1 + fb * 16;
        for (int64_t c = 0; c < 16; ++c) dst[c] = uint32_t{s0[c]} | (uint32_t{s1[c]} << 16);
      }
    }
    for (int64_t fb = 0; fb < nf; ++fb) {
      const uint32_t* b = b_tiles + (fb * nk + ks) * kTileDwords;
      uint32_t* a = a_tiles + (fb * nk + ks) * kTileDwords;
      for (int64_t m = 0; m < 16; ++m)
        for (int64_t k = 0; k < 16; ++k) a[m * 16 + k] = b[k * 16 + m];
    }
  }
}

// Set from pmsolve/switches.py (PMSOLVE_AMX) when pmsolve._native loads the module.
bool g_enabled = true;

}  // namespace

bool amx_bf16_available() {
  // The permission request is per process and idempotent; ask once.
  static const bool ok = cpu_has_amx_bf16() && syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return ok;
}

bool amx_enabled() { return g_enabled && amx_bf16_available(); }

void set_amx_enabled(bool on) { g_enabled = on; }

void amx_gram_bf16_add(const uint16_t* x, int64_t rows, int64_t d, double* master, int threads,
                       std::vector<uint16_t>& scratch) {
  if (rows <= 0) return;
  const int64_t nk = (rows + kTileK - 1) / kTileK;      // token steps of 32
  const int64_t nb = (d + kBlock - 1) / kBlock;         // C blocks of 32 features
  const int64_t dp = nb * kBlock, nf = dp / 16;         // padded width, feature tiles of 16
  const size_t tile_words = static_cast<size_t>(nf * nk * kTileDwords);
  const size_t pad_words = (rows % kTileK || d % kBlock) ? static_cast<size_t>(nk * kTileK * dp) : 0;
  scratch.resize(4 * tile_words + pad_words + 32);      // A and B tiles (2 words per dword), padded rows
  const uintptr_t base = reinterpret_cast<uintptr_t>(scratch.data());
  uint32_t* a_tiles = reinterpret_cast<uint32_t*>((base + 63) & ~uintptr_t{63});  // cache-line aligned tiles
  uint32_t* b_tiles = a_tiles + tile_words;
  if (pad_words) {  // a ragged last chunk or an odd width: copy into whole tiles, zeros around
    uint16_t* padded = reinterpret_cast<uint16_t*>(b_tiles + tile_words);
    std::fill(padded, padded + pad_words, uint16_t{0});
    for (int64_t t = 0; t < rows; ++t) std::copy(x + t * d, x + (t + 1) * d, padded + t * dp);
    x = padded;
  }
  const int np = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, nk)));
  run_on_threads(np, [&](int part) { pack(x, dp, nk, nk * part / np, nk * (part + 1) / np, a_tiles, b_tiles); });

  const int64_t groups = (nb + kGroup - 1) / kGroup;
  std::atomic<int64_t> next{0};
  auto work = [&]() {
    configure_tiles();
    alignas(64) double out[kBlock * kBlock];
    // Largest groups (the bottom of the triangle) first, so threads finish together.
    for (int64_t k; (k = next.fetch_add(1)) < groups;) {
      const int64_t g = groups - 1 - k;
      const int64_t ib0 = g * kGroup, ib1 = std::min(nb, ib0 + kGroup);
      for (int64_t jb = 0; jb < ib1; ++jb) {
        for (int64_t ib = std::max(ib0, jb); ib < ib1; ++ib) {
          block_product(a_tiles, b_tiles, nk, ib, jb, out);
          const int64_t i_end = std::min(d, (ib + 1) * kBlock);
          for (int64_t i = ib * kBlock; i < i_end; ++i) {
            const int64_t j_end = std::min({d, (jb + 1) * kBlock, i + 1});
            const double* o = out + (i - ib * kBlock) * kBlock - jb * kBlock;
            double* m = master + i * d;
            for (int64_t j = jb * kBlock; j < j_end; ++j) m[j] += o[j];
          }
        }
      }
    }
    release_tiles();
  };
  const int nw = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, groups)));
  run_on_threads(nw, [&](int) { work(); });
}

}  // namespace pmsolve
