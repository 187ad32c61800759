// Gram matrix XᵀX of bf16 rows with AVX512-BF16 dot products (VDPBF16PS), added into an
// fp64 master: the bf16 kernel for CPUs without AMX (AMD Zen 4 and later, Intel Cooper Lake).
//
// Why by hand: as for amx_gram.h, no BLAS available to this project has an fp32-output bf16
// GEMM. VDPBF16PS does two bf16 multiply-adds per fp32 lane: measured on a Zen 4,
// 115 G multiply-adds/s per core against 58 for fp32 FMAs, so bf16 activations need not be
// widened to fp32 and multiplied at half the rate. Products of bf16 values are exact in fp32.
#pragma once

#include <cstdint>
#include <vector>

namespace pmsolve {

// True when the CPU (and the OS, for the zmm state) supports AVX512-F and AVX512-BF16.
bool dpbf16_available();
// Available and not switched off (set_dpbf16_enabled; pmsolve/switches.py's PMSOLVE_DPBF16 decides).
bool dpbf16_enabled();
void set_dpbf16_enabled(bool on);

// master[i*d + j] += Σ_t x[t][i]·x[t][j] for i ≥ j (lower triangle), x: rows × d bf16 (raw
// 16-bit words, row-major). Products exact, summed in fp32 over 512 rows at a time, then in
// fp64. Uses `threads` threads; `scratch` holds the packed copy (about rows · d words) between calls.
void dpbf16_gram_add(const uint16_t* x, int64_t rows, int64_t d, double* master, int threads,
                     std::vector<uint16_t>& scratch);

}  // namespace pmsolve
