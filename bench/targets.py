"""Issues #2 and #3's CPU targets, measured on this machine in one run (~10 min on 2 cores).

    python bench/targets.py [--quick] [--json FILE] [--openblas-env both|keep|unset]

Prints one markdown table, target by target: what was measured, how, and met / missed, with
the machine (CPU model, family, the AVX-512 / AMX features the kernels dispatch on) on top.
The targets were stated for "2 threads, this machine", and the project has run on several kinds
of machine (an AMX Xeon, a Zen 3, a Zen 4, a Zen 5): this is the per-machine table of
docs/benchmarks.md, produced the same way each time. The measurements are the benches' own (bench/test_bench_solver.py,
bench/test_bench_stats.py), with their inputs; ratios are medians of interleaved rounds, so
they come from the same minutes. --quick skips the 4M-token error runs (~5 min of the 10).

Where the environment sets OPENBLAS_CORETYPE or OPENBLAS_L2_SIZE (docs/design.md §10: the
AMD development machines set OPENBLAS_CORETYPE=Haswell, AVX2 kernels), everything is measured
twice: as set, and in a child process without them, where OpenBLAS picks its kernels itself
(SkylakeX, AVX-512; on a Zen 5 that doubles OpenBLAS's dgemm, docs/benchmarks.md). Each table names
the kernel set that ran (OpenBLAS's "core=...").

`solve` is timed twice at d = 6400: alone (a loop of its own calls) and interleaved with the
MEMIT reference (each call right after a reference call). The two placements have differed by
up to 20 % (docs/history.md): right after torch's parallel work its idle OpenMP threads keep
spinning for a few milliseconds on the cores ours want. A user's pipeline sits somewhere between the two.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pmsolve  # noqa: E402
from pmsolve._native import require_native  # noqa: E402
from solve_standalone import median_time  # noqa: E402

D = 6400
SOLVE_NS = (1, 16, 256)
# Read by OpenBLAS once, when it loads: they pick its kernels and blocking (docs/design.md §10).
OPENBLAS_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    try:
        with open("/proc/cpuinfo") as fh:
            text = fh.read()
        first = text.split("\n\n")[0]
        fields = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        flags = set(fields.get("flags", "").split())
        info.update(model=fields.get("model name"), family=fields.get("cpu family"), model_id=fields.get("model"),
                    features=sorted(f for f in flags if f in {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}))
    except OSError:
        pass
    info["openblas"] = require_native().blas_config()  # names the kernel set ("core=...") that ran
    info["openblas_env"] = {k: os.environ.get(k) for k in OPENBLAS_ENV}
    try:  # which code was measured: the commit, and whether the tree had changes
        here = os.path.dirname(os.path.abspath(__file__))
        head = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=here, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True,
                               text=True)  # fmt: skip
        if head.returncode == 0:
            info["commit"] = head.stdout.strip() + (" (dirty tree)" if dirty.stdout.strip() else "")
    except OSError:
        pass
    return info


def factorize_targets(rounds: int) -> dict:
    """pmsolve.factorize vs torch.linalg.cholesky, and against the machine's dgemm rate (the faster
    of OpenBLAS's and torch's, which is MKL's on x86: factorize may run MKL's dpotrf), interleaved."""
    from test_bench_solver import (cholesky_kernels, default_cholesky_kernel, openblas_dgemm, pmsolve_dgemm, prefault,
                                   problem)  # fmt: skip

    C = problem(D)[0]
    Cn = C.numpy()
    A, B, out = Cn[:, : D // 2].copy(), Cn[:, D // 2 :].copy(), np.empty_like(Cn)
    fns = {"factorize": lambda: pmsolve.factorize(C, backend="cpu"), "torch_cholesky": lambda: torch.linalg.cholesky(C),
           "dgemm_openblas": lambda: openblas_dgemm(A, B, out),
           "dgemm_torch": lambda: torch.mm(torch.from_numpy(A), torch.from_numpy(B).mT, out=torch.from_numpy(out))}  # fmt: skip
    # pmsolve's own AVX-512 fp64 GEMM (the Cholesky's, where it runs) counts as a dgemm of this
    # machine too: the rate the target is taken against is the fastest of the three.
    if pmsolve_dgemm(A, B, out) is not None:
        fns["dgemm_pmsolve"] = pmsolve_dgemm(A, B, out)
    # The factorisation kernels alone (copy of C + Cholesky), whichever factorize uses by default:
    # which is faster is machine-specific (csrc/loaded_mkl.h, PMSOLVE_MKL_POTRF; csrc/f64_gemm.h,
    # PMSOLVE_F64_GEMM).
    default = default_cholesky_kernel()
    fns.update({f"kernel_{name}": fn for name, fn in cholesky_kernels(Cn).items()})
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            prefault(2 * D * D * 8)  # fresh memory for the factor and any copy, as the bench does
            times[name].append(median_time(fn, 1))
    med = {k: statistics.median(v) for k, v in times.items()}
    flops = D**3 / 3
    dgemm_by = min((k.removeprefix("dgemm_") for k in med if k.startswith("dgemm_")), key=lambda lib: med[f"dgemm_{lib}"])
    dgemm_rate = 2 * D * D * (D // 2) / med[f"dgemm_{dgemm_by}"]
    return {"d": D, "rounds": rounds, "seconds": med, "speedup_vs_torch": med["torch_cholesky"] / med["factorize"],
            "gflops_factorize": flops / med["factorize"] / 1e9, "gflops_dgemm": dgemm_rate / 1e9, "dgemm_by": dgemm_by,
            "fraction_of_dgemm": flops / med["factorize"] / dgemm_rate,
            "gflops_dgemm_by": {k.removeprefix("dgemm_"): 2 * D * D * (D // 2) / v / 1e9 for k, v in med.items()
                                if k.startswith("dgemm_")},
            "default_kernel": f"kernel_{default}"}  # fmt: skip


def solve_targets(rounds: int) -> list[dict]:
    """MEMIT solve vs the MEMIT reference formula at d = 6400: alone and interleaved."""
    from test_bench_solver import LAMBDA, memit_reference, prefault, problem, rel_delta

    C, Ks, Rs, factor, _ = problem(D)
    rows = []
    for n in SOLVE_NS:
        K, R = Ks[n], Rs[n]

        def ours():
            return pmsolve.solve(factor, K, R, method="memit", mu=LAMBDA, backend="cpu")

        alone = median_time(ours, 5)
        t_ref, t_ours = [], []
        for _ in range(rounds):
            prefault(3 * D * D * 8)  # the reference's λC + KKᵀ, its sum and LU's copy
            t_ref.append(median_time(lambda: memit_reference(C, K), 1))
            t_ours.append(median_time(ours, 1))
        ref = statistics.median(t_ref)
        rows.append({"n": n, "seconds_alone": alone, "seconds_interleaved": statistics.median(t_ours),
                     "seconds_reference": ref, "speedup_alone": ref / alone,
                     "speedup_interleaved": ref / statistics.median(t_ours),
                     "rel_delta_vs_reference": rel_delta(R, ours().B, memit_reference(C, K))})  # fmt: skip
    return rows


def stats_targets(quick: bool) -> dict:
    """Accumulator throughput (interleaved with the reference) and, unless quick, error after 4.19M tokens."""
    from test_bench_stats import errors, throughput

    out = {"throughput": [throughput(1536, rounds=7), throughput(6400, rounds=3),
                          throughput(1536, rounds=7, dtype=torch.bfloat16),
                          throughput(6400, rounds=3, dtype=torch.bfloat16)]}  # fmt: skip
    if not quick:
        out["errors"] = [errors(1536, pool_blocks=16, reps=64),
                         errors(1536, pool_blocks=16, reps=64, dtype=torch.bfloat16)]  # fmt: skip
    return out


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _kernels(f: dict) -> str:
    """The kernels' own times, the default marked."""
    names = {"kernel_recursive": "recursive on OpenBLAS", "kernel_recursive_avx512": "recursive on pmsolve's AVX-512",
             "kernel_mkl_potrf": "MKL dpotrf"}  # fmt: skip
    parts = [f"{label}{' (used)' if key == f.get('default_kernel') else ''} {f['seconds'][key]:.3f} s"
             for key, label in names.items() if key in f["seconds"]]
    return "kernels: " + ", ".join(parts) if parts else "kernels not timed"


def _rates(f: dict) -> str:
    return ", ".join(f"{lib} {rate:.0f}" for lib, rate in f.get("gflops_dgemm_by", {}).items()) or "those timed"


def table(res: dict) -> str:
    m = res["machine"]
    env = ", ".join(f"{k}={v}" for k, v in m.get("openblas_env", {}).items() if v is not None) or "none set"
    lines = [f"Machine: {m.get('model')} (family {m.get('family')} model {m.get('model_id')}; "
             f"{', '.join(m.get('features', []))}), torch {m['torch']}, {m['threads']} threads; "
             f"commit {m.get('commit', 'unknown')}.",
             f"OpenBLAS: {m.get('openblas')} (environment: {env}).", "",
             "| target (2 threads) | measured | verdict |", "|---|---|---|"]  # fmt: skip
    f = res["factorize"]
    lines.append(f"| #2 `factorize` ≥ 1.5× torch.linalg.cholesky, d = {f['d']} | {f['speedup_vs_torch']:.2f}× "
                 f"({f['seconds']['factorize']:.3f} s vs {f['seconds']['torch_cholesky']:.3f} s, medians of "
                 f"{f['rounds']}; {_kernels(f)}) | {_verdict(f['speedup_vs_torch'] >= 1.5)} |")
    lines.append(f"| #2 `factorize` ≥ 70 % of the dgemm rate | {100 * f['fraction_of_dgemm']:.1f} % "
                 f"({f['gflops_factorize']:.1f} of {f['gflops_dgemm']:.1f} GFLOP/s, {f['dgemm_by']}'s dgemm, the "
                 f"fastest of {_rates(f)}) | "
                 f"{_verdict(f['fraction_of_dgemm'] >= 0.7)} |")
    for s in res["solve"]:
        ok = s["speedup_alone"] >= 10 and s["rel_delta_vs_reference"] <= 1e-9
        lines.append(f"| #2 `solve` ≥ 10× the MEMIT reference, ≤ 1e-9 apart, d = {D}, n = {s['n']} | "
                     f"{s['speedup_alone']:.1f}× alone, {s['speedup_interleaved']:.1f}× interleaved "
                     f"({1e3 * s['seconds_alone']:.0f} ms vs {s['seconds_reference']:.2f} s); "
                     f"{s['rel_delta_vs_reference']:.1e} apart | {_verdict(ok)} (alone) |")
    for t in res["stats"]["throughput"]:
        lines.append(f"| #3 accumulator ≥ 2× the reference, {t['input']}, d = {t['d']} ({t['kernel']}) | "
                     f"{t['speedup']:.2f}× ({t['tokens_per_s_native']:.0f} vs {t['tokens_per_s_reference']:.0f} "
                     f"tokens/s; rounds {min(t['speedups_per_round']):.2f}–{max(t['speedups_per_round']):.2f}) | "
                     f"{_verdict(t['speedup'] >= 2)} |")
    for e in res["stats"].get("errors", []):
        lines.append(f"| #3 error ≤ 1e-7 vs fp64 after ≥ 4M tokens, {e['input']}, d = {e['d']} | "
                     f"{e['native']:.1e} after {e['tokens']} tokens (reference {e['reference']:.1e}) | "
                     f"{_verdict(e['native'] <= 1e-7 and e['tokens'] >= 4_000_000)} |")
    return "\n".join(lines)


def measure(quick: bool) -> dict:
    require_native()
    return {"machine": machine(), "factorize": factorize_targets(rounds=5), "solve": solve_targets(rounds=3),
            "stats": stats_targets(quick)}  # fmt: skip


def measure_without_openblas_env(quick: bool) -> dict:
    """The same measurements in a child process whose environment lacks OPENBLAS_CORETYPE and
    OPENBLAS_L2_SIZE, so that OpenBLAS picks its kernels itself (they are read when it loads)."""
    env = {k: v for k, v in os.environ.items() if k not in OPENBLAS_ENV}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "targets.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--openblas-env", "keep", "--json", out]
        subprocess.run(cmd + (["--quick"] if quick else []), env=env, check=True, stdout=sys.stderr)  # its progress; its table comes back as JSON
        with open(out) as fh:
            return json.load(fh)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="skip the 4M-token error runs")
    p.add_argument("--json", default=None, help="also write the measurements here")
    p.add_argument("--openblas-env", choices=("both", "keep", "unset"), default="both",
                   help="with OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE as the environment sets them (keep), without "
                        "them (unset: OpenBLAS's own kernel choice, in a child process), or both (the default; "
                        "one run when neither is set)")  # fmt: skip
    args = p.parse_args()
    forced = any(os.environ.get(k) is not None for k in OPENBLAS_ENV)
    runs = []
    if args.openblas_env in ("both", "keep") or not forced:
        runs.append(measure(args.quick))
    if forced and args.openblas_env in ("both", "unset"):
        runs.append(measure_without_openblas_env(args.quick))
    print("\n\n".join(table(res) for res in runs), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(runs[0] if len(runs) == 1 else runs, fh, indent=1)


if __name__ == "__main__":
    main()
