// Gram matrix XᵀX of bf16 rows on Intel AMX, added into an fp64 master.
//
// Why by hand: products of bf16 values are exact in fp32, so for bf16 activations an
// fp32-accumulating bf16 GEMM gives the same accuracy as the fp32 path at several times
// its speed on AMX CPUs. No BLAS available to this project offers one: torch's CPU mm
// has no fp32-output bf16 GEMM and scipy-openblas32 exports no sbgemm. This kernel is the one piece of that GEMM we need.
#pragma once

#include <cstdint>
#include <vector>

namespace pmsolve {

// True when the CPU has AMX-BF16 and the OS granted this process the tile state.
bool amx_bf16_available();
// Available and not switched off (set_amx_enabled; pmsolve/switches.py's PMSOLVE_AMX decides).
bool amx_enabled();
void set_amx_enabled(bool on);

// master[i*d + j] += Σ_t x[t][i]·x[t][j] for i ≥ j (lower triangle), x: rows × d bf16
// (raw 16-bit words, row-major). Products exact, summed in fp32 over 512 rows at a time,
// then in fp64. Uses `threads` threads;
// `scratch` holds the packed copies (2 · rows · d words, rounded up) between calls.
void amx_gram_bf16_add(const uint16_t* x, int64_t rows, int64_t d, double* master, int threads,
                       std::vector<uint16_t>& scratch);

}  // namespace pmsolve
