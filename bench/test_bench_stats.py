"""Covariance statistics benchmark (issue #3).

    python bench/test_bench_stats.py            # everything; prints the RESULTS.md section (~15 min on 2 cores)
    pytest bench/test_bench_stats.py            # the same pieces as pytest-benchmark tests

1. Throughput, per 4096-token batch: the native accumulator (ssyrk of one triangle
   into fp32 scratch, folded into an fp64 master, or the AVX-512 Gram kernel where
   OpenBLAS's kernels lack AVX-512; the table names which) against the reference formula
   `mom2 += a.T @ a` in fp32 with torch, d ∈ {1536, 6400}. Timings alternate the two
   and report medians (the machine is shared: noisy).
2. Relative Frobenius error against an fp64 ground truth after ≥ 4M tokens (d = 1536):
   a pool of 16 distinct 4096-row blocks is cycled 64 times (4.19M rows) so that the
   ground truth is 64 × the fp64 sum over the pool; at d = 6400, after 32768 tokens.
3. End to end: collect_stats on SmolLM2-135M, 5 layers, offline corpus: tokens/s and
   the split between the forward pass and accumulation.

Activations: GELU(z·s + b) with z heavy-tailed (Gaussian / √uniform), s log-normal
per feature, b ~ N(−0.5, 0.5): non-negative-ish with a few large values, as MLP
hiddens are.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import pytest
import torch

from pmsolve._native import native
from pmsolve.stats import CovarianceAccumulator

BATCH = 4096
HAS_NATIVE = native() is not None and hasattr(native(), "CovAccumulator")
pytestmark = pytest.mark.skipif(not HAS_NATIVE, reason="native accumulator not built")


def mlp_like(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(0.7 * torch.randn(d, generator=g))
    shift = -0.5 + 0.5 * torch.randn(d, generator=g)
    z = torch.randn(n, d, generator=g) / torch.rand(n, d, generator=g).clamp_min(0.05).sqrt()
    return torch.nn.functional.gelu(z * scale + shift)


def blas_report() -> dict:
    from threadpoolctl import threadpool_info

    return {
        "native_blas": native().blas_config(),
        "native_threads": native().blas_get_num_threads(),
        "torch_threads": torch.get_num_threads(),
        "threadpools": [{k: p.get(k) for k in ("internal_api", "num_threads", "architecture")} for p in threadpool_info()],
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
    }


def reference_update(mom2: torch.Tensor, x: torch.Tensor) -> None:
    """The reference formula: fp32 running sum of aᵀa (bf16 activations cast to fp32 first)."""
    a = x.float()
    mom2 += a.T @ a


def throughput(d: int, rounds: int = 5, dtype: torch.dtype = torch.float32) -> dict:
    """Median seconds per BATCH-token update, ours vs the reference, alternating."""
    x = mlp_like(BATCH, d, seed=d).to(dtype)
    ours = CovarianceAccumulator(d, backend="native")
    ref = torch.zeros(d, d)
    ours.update(x)  # warm-up: allocations, BLAS threads
    reference_update(ref, x)
    t_ours, t_ref = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        ours.update(x)
        t_ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        reference_update(ref, x)
        t_ref.append(time.perf_counter() - t0)
    so, sr = statistics.median(t_ours), statistics.median(t_ref)
    return {"d": d, "input": str(dtype).removeprefix("torch."), "kernel": _kernel(dtype),
            "tokens_per_s_native": BATCH / so, "tokens_per_s_reference": BATCH / sr, "speedup": sr / so,
            "speedups_per_round": [r / o for r, o in zip(t_ref, t_ours)]}


def _kernel(dtype: torch.dtype) -> str:
    """The product kernel the native accumulator uses for this input: for fp32 "ssyrk" or "avx512"
    (csrc/f32_gram.h, where OpenBLAS's kernels lack AVX-512), for bf16 "amx", "avx512_bf16" or
    "fp32" (widened, then as fp32)."""
    if dtype == torch.bfloat16:
        return native().bf16_gram_kernel()
    return "avx512" if getattr(native(), "f32_gram", lambda: False)() else "ssyrk"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a.double() - b) / torch.linalg.matrix_norm(b))


def errors(d: int, pool_blocks: int, reps: int, dtype: torch.dtype = torch.float32) -> dict:
    """Errors of the native accumulator and the reference fp32 running sum vs fp64, after pool_blocks·reps batches."""
    pool = [mlp_like(BATCH, d, seed=100 + i).to(dtype) for i in range(pool_blocks)]
    truth = torch.zeros(d, d, dtype=torch.float64)
    for x in pool:
        xd = x.double()
        truth += xd.T @ xd
    truth *= reps  # exact in fp64 up to one rounding per entry
    ours = CovarianceAccumulator(d, backend="native")
    ref = torch.zeros(d, d)
    checkpoints = []
    t_ours = t_ref = 0.0
    for r in range(reps):
        for x in pool:
            t0 = time.perf_counter()
            ours.update(x)
            t1 = time.perf_counter()
            reference_update(ref, x)
            t_ours, t_ref = t_ours + t1 - t0, t_ref + time.perf_counter() - t1
        if (r + 1) & r == 0 or r == reps - 1:  # powers of two, and the end
            done = (r + 1) / reps
            checkpoints.append({"tokens": ours.count, "native": _rel(ours.sum(), truth * done),
                                "reference": _rel(ref, truth * done)})
            print(f"d={d}", checkpoints[-1], file=sys.stderr, flush=True)
    return {"d": d, "input": str(dtype).removeprefix("torch."), "kernel": _kernel(dtype), "tokens": ours.count,
            "native": checkpoints[-1]["native"],
            "reference": checkpoints[-1]["reference"], "by_tokens": checkpoints,
            "tokens_per_s_native": ours.count / t_ours, "tokens_per_s_reference": ours.count / t_ref}


def end_to_end(layers=(4, 5, 6, 7, 8), max_tokens: int = 60_000) -> dict:
    from pmsolve.models.loading import load_model
    from pmsolve.stats import collect_stats

    loaded = load_model()
    out = {"model": loaded.model_id, "layers": list(layers), "max_tokens": max_tokens}
    for backend in ("native", "torch"):
        res = collect_stats(loaded.model, loaded.tokenizer, list(layers), None, max_tokens=max_tokens,
                            batch_tokens=4096, seq_len=512, progress=False, backend=backend,
                            checkpoint_every=max_tokens // 4)
        out[backend] = {"tokens": res.tokens, "seconds": res.seconds, "tokens_per_s": res.tokens_per_second,
                        "seconds_forward": res.seconds_forward, "seconds_accumulate": res.seconds_accumulate,
                        "seconds_other": res.seconds - res.seconds_forward - res.seconds_accumulate,
                        "last_rel_change": res.convergence[-1]["rel_change"] if res.convergence else None}
    return out


# -- pytest-benchmark entry points ---------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d", [1536, 6400])
@pytest.mark.parametrize("impl", ["native", "reference"])
def test_bench_accumulate(benchmark, impl, d, dtype):
    x = mlp_like(BATCH, d, seed=d).to(dtype)
    if impl == "native":
        acc = CovarianceAccumulator(d, backend="native")
        benchmark.pedantic(acc.update, args=(x,), rounds=3, warmup_rounds=1)
        benchmark.extra_info["kernel"] = _kernel(dtype)
    else:
        mom2 = torch.zeros(d, d)
        benchmark.pedantic(reference_update, args=(mom2, x), rounds=3, warmup_rounds=1)
    benchmark.extra_info["tokens_per_round"] = BATCH


@pytest.mark.slow
def test_error_after_4m_tokens():
    res = errors(1536, pool_blocks=16, reps=64)
    print(json.dumps(res, indent=1))
    assert res["tokens"] >= 4_000_000
    assert res["native"] <= 1e-7
    assert res["reference"] > res["native"]


# -- script ------------------------------------------------------------------------


def main() -> None:
    report = {"blas": blas_report(), "throughput": [throughput(1536, rounds=7), throughput(6400, rounds=3),
                                                    throughput(1536, rounds=7, dtype=torch.bfloat16),
                                                    throughput(6400, rounds=3, dtype=torch.bfloat16)]}
    print(json.dumps(report, indent=1), flush=True)
    if "--throughput-only" in sys.argv:
        return
    report["errors"] = [errors(1536, pool_blocks=16, reps=64), errors(6400, pool_blocks=8, reps=1),
                        errors(1536, pool_blocks=16, reps=64, dtype=torch.bfloat16),
                        errors(6400, pool_blocks=8, reps=1, dtype=torch.bfloat16)]
    print(json.dumps(report["errors"], indent=1), flush=True)
    if "--no-e2e" not in sys.argv:
        report["end_to_end"] = end_to_end()
        print(json.dumps(report["end_to_end"], indent=1), flush=True)
    with open(os.environ.get("PMSOLVE_BENCH_OUT", "bench/results/stats.json"), "w") as fh:
        json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
