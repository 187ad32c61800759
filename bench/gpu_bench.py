"""Times the CUDA backend against torch.linalg and the reference formulas on one GPU.

    PMSOLVE_NATIVE_LIB=build/cuda-gpu/lib/_C....so python bench/gpu_bench.py --out result.json

Solver (fp64, issue 2's grid by default: d in {1536, 4096, 6400}, n in {1, 16, 256, 1024}):
factorize (cuda backend vs torch.linalg.cholesky), pm solve (cuda vs torch backend), and the
MEMIT reference formula solve(λC + KKᵀ, K), which gives the same B as the PM solve with μ = λ
(push-through identity), so its relative difference is reported too.

Statistics (--stats-d, --stats-tokens): CovarianceAccumulator on the GPU (fp32 chunk products
into an fp64 master) against the reference code's `mom2 += aᵀa` in fp32, tokens/s and the
relative error of each against an fp64 accumulation of the same rows (fp32 and bf16 rows);
and an experiment: bf16 rows multiplied as they are on the tensor cores.

Each time is the median of --reps runs after one warm-up, the device synchronised around each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Callable

import torch

import pmsolve
from pmsolve._native import require_native
from pmsolve.backends.cuda import CudaBackend
from pmsolve.backends.torch_backend import TorchBackend
from pmsolve.stats import CovarianceAccumulator


def timed(fn: Callable[[], Any], reps: int) -> tuple[float, int, Any]:
    """Median seconds, peak bytes allocated above the baseline, and the last result."""
    fn()  # warm-up: handles, cuBLAS/cuSOLVER kernels, allocator pools
    times = []
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = None
    for _ in range(reps):
        out = None  # so that the peak counts one result, not two
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), torch.cuda.max_memory_allocated() - base, out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


def gemm_rate(d: int, reps: int) -> float:
    """fp64 GFLOP/s of a d × d × d product on this GPU, the yardstick for factorize."""
    a = torch.randn(d, d, dtype=torch.float64, device="cuda")
    sec, _, _ = timed(lambda: a @ a, reps)
    return 2 * d**3 / sec / 1e9


def potrf_fill_modes(C: torch.Tensor, reps: int) -> dict[str, Any]:
    """cuSOLVER's dpotrf on the lower vs the upper triangle (column-major), through CuPy's
    bindings (in the GPU image, not a pmsolve dependency): our backend factors the upper
    one, torch.linalg.cholesky the lower one. Each time includes a d × d copy (~0.15 ms)."""
    try:
        from cupy.cuda import device
        from cupy_backends.cuda.libs import cusolver

        handle, d, out = device.get_cusolver_handle(), C.shape[0], {}
        for name, uplo in (("lower", 0), ("upper", 1)):  # cublasFillMode_t
            A = C.clone()
            lwork = cusolver.dpotrf_bufferSize(handle, uplo, d, A.data_ptr(), d)
            work = torch.empty(max(1, lwork), dtype=torch.float64, device=C.device)
            info = torch.zeros(1, dtype=torch.int32, device=C.device)

            def run(A=A, uplo=uplo, lwork=lwork, work=work, info=info) -> None:
                A.copy_(C)
                cusolver.dpotrf(handle, uplo, d, A.data_ptr(), d, work.data_ptr(), lwork, info.data_ptr())

            out[f"dpotrf {name} seconds"] = timed(run, reps)[0]
            out[f"dpotrf {name} info"] = int(info.item())
        return out
    except Exception as exc:  # an experiment: report, never fail the benchmark
        return {"error": f"{type(exc).__name__}: {exc}"}


def bench_solver(d: int, ns: list[int], lam: float, reps: int) -> dict[str, Any]:
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    X = torch.randn(d, 2 * d, generator=gen, dtype=torch.float64, device=dev)
    C = X @ X.mT / X.shape[1]
    del X
    cuda, ref = CudaBackend(require_native()), TorchBackend()
    rows: dict[str, dict[str, float]] = {}

    def record(into: dict[str, dict[str, float]], name: str, fn: Callable[[], Any]) -> Any:
        sec, peak, out = timed(fn, reps)
        into[name] = {"seconds": sec, "peak_bytes": peak}
        return out

    flops = d**3 / 3
    chol = record(rows, "factor: cuda backend (fill + cusolverDnXpotrf)", lambda: cuda.cholesky_jittered(C, [0.0]))
    L_t = record(rows, "factor: torch.linalg.cholesky", lambda: torch.linalg.cholesky(C))
    record(rows, "factor: pmsolve.factorize(backend='cuda') (+ cond estimate)", lambda: pmsolve.factorize(C, backend="cuda"))
    for name in rows:
        rows[name]["gflops"] = flops / rows[name]["seconds"] / 1e9
    factor = pmsolve.factorize(C, backend="cuda")
    result: dict[str, Any] = {"d": d, "gemm_gflops": gemm_rate(d, reps), "timings": rows,
                              "potrf_fill_modes": potrf_fill_modes(C, reps),
                              "rel_diff": {"L cuda vs torch.linalg.cholesky": rel(chol.L, L_t)}, "solve": {}}
    for n in ns:
        K = torch.randn(d, n, generator=gen, dtype=torch.float64, device=dev)
        R = torch.randn(d, n, generator=gen, dtype=torch.float64, device=dev)
        srows: dict[str, dict[str, float]] = {}
        sol = record(srows, "cuda backend pm_solve", lambda: cuda.pm_solve(chol.L, K, [lam], 1e12))
        sol_t = record(srows, "torch backend pm_solve", lambda: ref.pm_solve(chol.L, K, [lam], 1e12))
        B_ref = record(srows, "MEMIT reference solve(lam C + K K^T, K)", lambda: torch.linalg.solve(lam * C + K @ K.mT, K))
        record(srows, "pmsolve.solve(memit, backend='cuda')",
               lambda: pmsolve.solve(factor, K, R, method="memit", mu=lam, backend="cuda"))
        result["solve"][str(n)] = {
            "timings": srows,
            "speedup_vs_memit_reference": srows["MEMIT reference solve(lam C + K K^T, K)"]["seconds"]
            / srows["pmsolve.solve(memit, backend='cuda')"]["seconds"],
            "rel_diff": {"B cuda vs torch backend": rel(sol.B, sol_t.B), "B cuda vs MEMIT reference": rel(sol.B, B_ref)},
            "cond_G": sol.cond,
        }
    return result


def bench_stats(d: int, tokens: int, chunk: int, reps: int, dtype: torch.dtype) -> dict[str, Any]:
    """GPU statistics: pmsolve's accumulator vs the reference fp32 `mom2 += aᵀa`, against fp64.

    Rows in ``dtype`` (as a model running in that dtype hands them over); the reference
    upcasts them to fp32 first, as the reference code does."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    # Activations with a mean and a spread of scales, like an MLP input, so fp32 sums lose digits.
    mean = torch.randn(d, generator=gen, device="cuda")
    scale = torch.rand(d, generator=gen, device="cuda") * 2 + 0.1
    chunks = [(torch.randn(chunk, d, generator=gen, device="cuda") * scale + mean).to(dtype) for _ in range(8)]
    steps = tokens // chunk

    def ours() -> torch.Tensor:
        acc = CovarianceAccumulator(d)
        for i in range(steps):
            acc.update(chunks[i % len(chunks)])
        return acc.sum()

    def reference() -> torch.Tensor:
        mom2 = torch.zeros(d, d, device="cuda")
        for i in range(steps):
            a = chunks[i % len(chunks)].float()
            mom2 += a.T @ a
        return mom2

    def exact() -> torch.Tensor:
        s = torch.zeros(d, d, dtype=torch.float64, device="cuda")
        for i in range(steps):
            a = chunks[i % len(chunks)].double()
            s += a.T @ a
        return s

    t_ours, peak_ours, S = timed(ours, reps)
    t_ref, peak_ref, S_ref = timed(reference, reps)
    truth = exact()
    return {
        "d": d, "rows_dtype": str(dtype).removeprefix("torch."), "tokens": steps * chunk, "chunk_rows": chunk,
        "tokens_per_s": {"pmsolve CovarianceAccumulator (cuda)": steps * chunk / t_ours,
                         "reference mom2 += a^T a (fp32)": steps * chunk / t_ref},
        "peak_bytes": {"pmsolve": peak_ours, "reference": peak_ref},
        "rel_err_vs_fp64": {"pmsolve": rel(S.double(), truth), "reference": rel(S_ref.double(), truth)},
    }


def bf16_gram_experiment(d: int, tokens: int, reps: int) -> dict[str, Any]:
    """bf16 rows multiplied as they are, torch.mm(aᵀ, a, out_dtype=float32) on the tensor
    cores, each product added into an fp64 sum: error against fp64 and tokens/s by rows per
    product. Not a pmsolve path (the accumulator upcasts): the measurement behind that choice."""
    gen = torch.Generator(device="cuda").manual_seed(2)
    mean = torch.randn(d, generator=gen, device="cuda")
    scale = torch.rand(d, generator=gen, device="cuda") * 2 + 0.1
    rows = 8192
    chunks = [(torch.randn(rows, d, generator=gen, device="cuda") * scale + mean).bfloat16() for _ in range(4)]
    steps = max(1, tokens // rows)
    truth = torch.zeros(d, d, dtype=torch.float64, device="cuda")
    for i in range(steps):
        a = chunks[i % len(chunks)].double()
        truth += a.T @ a
    out: dict[str, Any] = {"d": d, "tokens": steps * rows}
    for k in (256, 2048, 8192):
        def run(k: int = k) -> torch.Tensor:
            acc = torch.zeros(d, d, dtype=torch.float64, device="cuda")
            for i in range(steps):
                a = chunks[i % len(chunks)]
                for j in range(0, rows, k):
                    acc += torch.mm(a[j : j + k].mT, a[j : j + k], torch.float32)
            return acc
        try:
            sec, _, S = timed(run, reps)
            out[f"rows per product {k}"] = {"tokens_per_s": steps * rows / sec, "rel_err_vs_fp64": rel(S, truth)}
        except Exception as exc:  # an experiment: report, never fail the benchmark
            out[f"rows per product {k}"] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, nargs="+", default=[1536, 4096, 6400])
    ap.add_argument("--n", type=int, nargs="+", default=[1, 16, 256, 1024])
    ap.add_argument("--lam", type=float, default=15000.0)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--stats-d", type=int, nargs="*", default=[1536, 6400])
    ap.add_argument("--stats-tokens", type=int, default=4_000_000)
    ap.add_argument("--stats-chunk", type=int, default=8192)
    ap.add_argument("--stats-dtypes", nargs="*", default=["float32", "bfloat16"], help="dtypes of the rows")
    ap.add_argument("--no-experiment", action="store_true", help="skip the bf16 tensor-core product experiment")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "torch_cuda": torch.version.cuda, "lambda": args.lam, "reps": args.reps,
                              "solver": [], "stats": []}
    print(f"{result['device']}, torch {result['torch']} (CUDA {result['torch_cuda']}), median of {args.reps}")
    for d in args.d:
        r = bench_solver(d, [n for n in args.n if n <= d], args.lam, args.reps)
        result["solver"].append(r)
        print(f"\nfp64 d = {d}: dgemm {r['gemm_gflops']:.0f} GFLOP/s")
        for name, t in r["timings"].items():
            print(f"  {name:<62} {t['seconds'] * 1e3:9.2f} ms  {t['gflops']:8.1f} GFLOP/s "
                  f"({t['gflops'] / r['gemm_gflops']:.0%} of dgemm)  peak {t['peak_bytes'] / 2**20:8.1f} MiB")
        print(f"  rel diff L vs torch: {r['rel_diff']['L cuda vs torch.linalg.cholesky']:.1e}")
        print(f"  cuSOLVER dpotrf by fill mode (CuPy): {r['potrf_fill_modes']}")
        for n, s in r["solve"].items():
            print(f"  n = {n}: {s['speedup_vs_memit_reference']:.1f}x the MEMIT reference; cond(G+mu I) {s['cond_G']:.1e}; "
                  + "; ".join(f"{k} {v:.1e}" for k, v in s["rel_diff"].items()))
            for name, t in s["timings"].items():
                print(f"    {name:<48} {t['seconds'] * 1e3:9.3f} ms  peak {t['peak_bytes'] / 2**20:8.1f} MiB")
        if args.out:  # partial results survive a time-out
            with open(args.out, "w") as fh:
                json.dump(result, fh, indent=2)
    for d in args.stats_d:
        for dtype in (getattr(torch, name) for name in args.stats_dtypes):
            s = bench_stats(d, args.stats_tokens, args.stats_chunk, max(1, args.reps // 2), dtype)
            result["stats"].append(s)
            print(f"\nstatistics d = {d}, {s['tokens']} tokens ({s['rows_dtype']} rows):")
            for name, v in s["tokens_per_s"].items():
                print(f"  {name:<40} {v / 1e6:8.2f} M tokens/s")
            print("  rel err vs fp64: " + ", ".join(f"{k} {v:.1e}" for k, v in s["rel_err_vs_fp64"].items()))
        if args.no_experiment:
            continue
        x = bf16_gram_experiment(d, args.stats_tokens // 4, max(1, args.reps // 2))
        result.setdefault("bf16_gram_experiment", []).append(x)
        print(f"\nexperiment, d = {d}: bf16 rows on the tensor cores, fp32 products folded into fp64: {x}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
