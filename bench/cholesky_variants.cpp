// Variants of the recursive Cholesky of csrc/cholesky.cpp, timed against dgemm and
// LAPACK dpotrf of the same OpenBLAS, to choose the trailing update and the cutoff.
// Not part of the package; build and run (each config is
// cutoff,update,trsm,base: update 0 = dsyrk, 1 = dsyrk split recursively into dgemm
// below 1024, 2 = dgemmt; trsm 0 = dtrsm, 1 = dtrsm split recursively into dgemm below 1024;
// base 0 = dpotrf, 1 = dpotrf2):
//
//   S=$(python -c 'import scipy_openblas32 as s; print(s.get_lib_dir()[:-4])')
//   g++ -O2 -std=c++17 bench/cholesky_variants.cpp -I$S/include -L$S/lib -lscipy_openblas -Wl,-rpath,$S/lib -o build/cholesky_variants
//   build/cholesky_variants 6400 5 128,0,0,0 128,2,0,0 128,2,1,0 64,2,0,0 256,2,0,0 128,2,0,1
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

extern "C" void scipy_dpotrf_(const char*, const int*, double*, const int*, int*, size_t);
extern "C" void scipy_dpotrf2_(const char*, const int*, double*, const int*, int*, size_t);

namespace {
using clk = std::chrono::steady_clock;
double since(clk::time_point t0) { return std::chrono::duration<double>(clk::now() - t0).count(); }

struct Config {
  int cutoff = 128, update = 2, trsm = 0, base = 0;
};
constexpr int kSplitBelow = 1024;
int split(int n) { return std::max(1, (n / 2) & ~7); }

// C (n × n, lower) -= A Aᵀ, A n × k, row-major.
void update(const Config& c, int n, int k, const double* A, int lda, double* C, int ldc) {
  if (c.update == 2) {
    scipy_cblas_dgemmt(CblasRowMajor, CblasLower, CblasNoTrans, CblasTrans, n, k, -1.0, A, lda, A, lda, 1.0, C, ldc);
  } else if (c.update == 0 || n <= kSplitBelow) {
    scipy_cblas_dsyrk(CblasRowMajor, CblasLower, CblasNoTrans, n, k, -1.0, A, lda, 1.0, C, ldc);
  } else {
    const int n1 = split(n), n2 = n - n1;
    update(c, n1, k, A, lda, C, ldc);
    scipy_cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n2, n1, k, -1.0, A + (size_t)n1 * lda, lda, A, lda,
                      1.0, C + (size_t)n1 * ldc, ldc);
    update(c, n2, k, A + (size_t)n1 * lda, lda, C + (size_t)n1 * ldc + n1, ldc);
  }
}

// X (m × n) := X L⁻ᵀ, L n × n lower, row-major.
void trsm(const Config& c, int m, int n, const double* L, int ldl, double* X, int ldx) {
  if (c.trsm == 0 || n <= kSplitBelow) {
    scipy_cblas_dtrsm(CblasRowMajor, CblasRight, CblasLower, CblasTrans, CblasNonUnit, m, n, 1.0, L, ldl, X, ldx);
    return;
  }
  const int n1 = split(n), n2 = n - n1;
  trsm(c, m, n1, L, ldl, X, ldx);
  scipy_cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n2, n1, -1.0, X, ldx, L + (size_t)n1 * ldl, ldl, 1.0,
                    X + n1, ldx);
  trsm(c, m, n2, L + (size_t)n1 * ldl + n1, ldl, X + n1, ldx);
}

int cholesky(const Config& c, double* a, int n, int lda) {
  if (n <= c.cutoff) {
    int info = 0;
    (c.base ? scipy_dpotrf2_ : scipy_dpotrf_)("U", &n, a, &lda, &info, 1);
    return info;
  }
  const int n1 = split(n), n2 = n - n1;
  if (int info = cholesky(c, a, n1, lda)) return info;
  double* a21 = a + (size_t)n1 * lda;
  trsm(c, n2, n1, a, lda, a21, lda);
  update(c, n2, n1, a21, lda, a21 + n1, lda);
  const int info = cholesky(c, a21 + n1, n2, lda);
  return info ? info + n1 : 0;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s d rounds cutoff,update,trsm,base ...\n", argv[0]);
    return 2;
  }
  const int d = std::atoi(argv[1]), rounds = std::atoi(argv[2]);
  std::vector<Config> cfgs;
  for (int i = 3; i < argc; ++i) {
    Config c;
    std::sscanf(argv[i], "%d,%d,%d,%d", &c.cutoff, &c.update, &c.trsm, &c.base);
    cfgs.push_back(c);
  }
  std::printf("%s core=%s threads=%d\n", scipy_openblas_get_config(), scipy_openblas_get_corename(),
              scipy_openblas_get_num_threads());
  std::vector<double> A((size_t)d * d), S((size_t)d * d), W((size_t)d * d), G((size_t)d * d);
  std::mt19937_64 rng(1);
  std::normal_distribution<double> nd;
  for (auto& x : A) x = nd(rng);
  scipy_cblas_dsyrk(CblasRowMajor, CblasLower, CblasNoTrans, d, d, 1.0 / d, A.data(), d, 0.0, S.data(), d);
  for (int i = 0; i < d; ++i) S[(size_t)i * d + i] += 1e-3;
  const double flops = (double)d * d * d / 3;
  std::vector<std::vector<double>> rate(cfgs.size() + 2);
  for (int r = 0; r < rounds; ++r) {  // interleaved rounds: load on a shared machine drifts
    auto t0 = clk::now();
    const int h = d / 2;
    scipy_cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, d, d, h, 1.0, A.data(), d, A.data() + h, d, 0.0,
                      G.data(), d);
    rate[0].push_back(2.0 * d * d * h / since(t0) / 1e9);
    std::copy(S.begin(), S.end(), W.begin());
    int info = 0;
    t0 = clk::now();
    scipy_dpotrf_("U", &d, W.data(), &d, &info, 1);
    rate[1].push_back(flops / since(t0) / 1e9);
    for (size_t c = 0; c < cfgs.size(); ++c) {
      std::copy(S.begin(), S.end(), W.begin());
      t0 = clk::now();
      if (cholesky(cfgs[c], W.data(), d, d) != 0) std::printf("config %zu failed\n", c);
      rate[c + 2].push_back(flops / since(t0) / 1e9);
    }
  }
  std::printf("d=%d medians of %d rounds, GFLOP/s: dgemm %.1f  dpotrf %.1f\n", d, rounds, median(rate[0]),
              median(rate[1]));
  for (size_t c = 0; c < cfgs.size(); ++c)
    std::printf("  cutoff %4d update %d trsm %d base %d: %6.1f  (%3.0f%% of dgemm)\n", cfgs[c].cutoff, cfgs[c].update,
                cfgs[c].trsm, cfgs[c].base, median(rate[c + 2]), 100 * median(rate[c + 2]) / median(rate[0]));
}
