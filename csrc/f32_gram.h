// Gram matrix XᵀX of fp32 rows with AVX-512 FMAs, added into an fp64 master: the fp32
// statistics kernel where the BLAS runs narrower kernels than the CPU has.
//
// Why by hand: OpenBLAS's ssyrk is the right tool when it runs its AVX-512 kernels, but an
// environment may hold it to AVX2 ones (OPENBLAS_CORETYPE=Haswell, as some environments set it on
// AMD machines), and an OpenBLAS older than the CPU picks a narrower
// core by itself. On a Zen 5 that halved ssyrk's rate (fp32 statistics at d = 1536:
// 3.8× the reference with OpenBLAS's own kernels, 1.9-2.1× with Haswell's). This kernel runs
// only then (f32_gram_enabled); elsewhere ssyrk stays (it was 1.1-1.2× faster than a kernel
// like this on an Intel Xeon).
#pragma once

#include <cstdint>
#include <vector>

namespace pmsolve {

// True when the CPU (and the OS, for the zmm state) supports AVX512-F.
bool f32_gram_available();
// Whether fp32 statistics use this kernel: available and switched on (set_f32_gram_enabled;
// pmsolve/switches.py's PMSOLVE_F32_GRAM decides, by default on where OpenBLAS's selected
// kernels lack AVX-512).
bool f32_gram_enabled();
void set_f32_gram_enabled(bool on);

// master[i*d + j] += Σ_t x[t][i]·x[t][j] for i ≥ j (lower triangle), x: rows × d fp32,
// row-major. Products rounded to fp32 and summed in fp32 over 64 rows in registers and 512 rows
// in a tile, then in fp64 (ssyrk's own sums run over a few hundred rows). Uses `threads`
// threads; `scratch` holds the packed copy (rows · d floats, as 16-bit words) between calls.
void f32_gram_add(const float* x, int64_t rows, int64_t d, double* master, int threads,
                  std::vector<uint16_t>& scratch);

}  // namespace pmsolve
