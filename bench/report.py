"""Turn a pytest-benchmark JSON of bench/test_bench_solver.py into the tables of bench/RESULTS.md.

    python bench/report.py bench/results/solver.json [bench/RESULTS.md [TAG]]

Only the text between the GENERATED markers (of TAG, when given: one file can hold
several runs) is replaced; the prose around it is kept. Missing markers are appended.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MiB = 1 << 20


def _markers(tag: str) -> tuple[str, str]:
    label = f" {tag}" if tag else ""
    return f"<!-- BEGIN GENERATED{label} (bench/report.py) -->", f"<!-- END GENERATED{label} -->"


def _by_test(benchmarks: list[dict], prefix: str) -> list[dict]:
    return [b for b in benchmarks if b["name"].startswith(prefix)]


def _mib(x: float) -> str:
    return f"{x / MiB:.1f}"


def environment(data: dict) -> list[str]:
    m = data["machine_info"]
    p = m.get("pmsolve", {})
    pools = ", ".join(
        f"{t.get('internal_api')} {t.get('version')} ({t.get('architecture', '?')}, {t['num_threads']} threads, "
        f"{Path(t['filepath']).parent.parent.name})"
        for t in p.get("threadpools", [])
    )
    return [
        "#### Machine and run",
        "",
        f"- run: {data['datetime']} (commit {data.get('commit_info', {}).get('id', '?')[:10]}"
        f"{', dirty tree' if data.get('commit_info', {}).get('dirty') else ''})",
        f"- CPU: {p.get('cpu_model')}, {p.get('nproc')} cores seen by the process",
        f"- load average (1/5/15 min) at start {tuple(round(x, 1) for x in p.get('loadavg_start', ()))}, "
        f"at end {tuple(round(x, 1) for x in p.get('loadavg_end', ()))}: the machine was shared",
        f"- torch {p.get('torch')} ({p.get('torch_blas')}), {p.get('torch_threads')} threads; "
        f"pmsolve._C BLAS: `{p.get('blas_config')}`, {p.get('blas_threads')} threads",
        f"- BLAS thread pools (threadpoolctl): {pools}",
        f"- environment: {p.get('env')}",
        "",
    ]


def solve_tables(benchmarks: list[dict]) -> list[str]:
    inv = {b["extra_info"]["d"]: b for b in _by_test(benchmarks, "test_emmet_reference_inverse")}
    rows = sorted(_by_test(benchmarks, "test_solve_vs_references"), key=lambda b: (b["extra_info"]["d"], b["extra_info"]["n"]))
    if not rows:
        return []
    out = [
        "#### (a) solve vs the reference formulas (fp64, medians, seconds)",
        "",
        "MEMIT: `pmsolve.solve(method='memit', mu=15000)` vs `torch.linalg.solve(λC + KKᵀ, K)`.",
        "",
        "| d | n | pmsolve | factorize | reference | speed-up (factor excluded) | speed-up (included) | rel. diff Δ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b in rows:
        e = b["extra_info"]
        out.append(
            f"| {e['d']} | {e['n']} | {e['t_memit']:.4f} | {e['t_factorize']:.3f} | {e['t_memit_ref']:.3f} | "
            f"{e['t_memit_ref'] / e['t_memit']:.1f}× | {e['t_memit_ref'] / (e['t_memit'] + e['t_factorize']):.2f}× | "
            f"{e['rel_delta_memit']:.1e} |"
        )
    out += [
        "",
        "EMMET: `pmsolve.solve(method='emmet', mu=0.1)` vs `torch.inverse(C)` then `torch.inverse(KᵀC⁻¹K + εI)` "
        "(ε = 0.1). The reference time is the median of `torch.inverse(C)` (timed once per d) plus the median of "
        "the rest (timed per n).",
        "",
        "| d | n | pmsolve | reference (inverse + rest) | speed-up (factor excluded) | speed-up (included) | rel. diff Δ |",
        "|---|---|---|---|---|---|---|",
    ]
    for b in rows:
        e = b["extra_info"]
        t_inv = inv[e["d"]]["stats"]["median"] if e["d"] in inv else float("nan")
        ref = t_inv + e["t_emmet_ref_after_inverse"]
        out.append(
            f"| {e['d']} | {e['n']} | {e['t_emmet']:.4f} | {ref:.3f} ({t_inv:.3f} + {e['t_emmet_ref_after_inverse']:.3f}) | "
            f"{ref / e['t_emmet']:.1f}× | {ref / (e['t_emmet'] + e['t_factorize']):.2f}× | {e['rel_delta_emmet']:.1e} |"
        )
    out += [
        "",
        "Peak memory: increase of the process's peak RSS during one call, result included (MiB). "
        "`workspace` is what the cpu backend reports in `SolveDiagnostics.peak_bytes`.",
        "",
        "| d | n | pmsolve memit | workspace | MEMIT reference | EMMET reference (after inverse) | torch.inverse(C) | d×d fp64 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b in rows:
        e = b["extra_info"]
        t_inv = inv[e["d"]]["extra_info"]["peak_bytes"] if e["d"] in inv else float("nan")
        out.append(
            f"| {e['d']} | {e['n']} | {_mib(e['peak_bytes_memit'])} | {_mib(e['workspace_bytes_memit'])} | "
            f"{_mib(e['peak_bytes_memit_ref'])} | {_mib(e['peak_bytes_emmet_ref_after_inverse'])} | {_mib(t_inv)} | "
            f"{_mib(8 * e['d'] ** 2)} |"
        )
    out.append("")
    return out


def factorize_tables(benchmarks: list[dict]) -> list[str]:
    rows = sorted(_by_test(benchmarks, "test_factorize_vs_libraries"), key=lambda b: b["extra_info"]["d"])
    if not rows:
        return []
    out = [
        "#### (b) factorize vs the libraries (GFLOP/s = (d³/3) / median time)",
        "",
        "`recursive` and `MKL dpotrf` are `_C.cholesky_jittered` (copy of the lower triangle, then our recursive "
        "Cholesky on OpenBLAS, or the dpotrf of the MKL torch loaded; pmsolve uses the latter on Intel CPUs); "
        "`pmsolve.factorize` adds validation (finite, symmetric, 1-norm), the jitter schedule and the "
        "condition estimate. dgemm at d × d × d/2: OpenBLAS 0.3.34 (the library pmsolve._C links) and torch "
        "(MKL on x86); ratios are to the faster of the two.",
        "",
        "| d | recursive | MKL dpotrf | pmsolve.factorize | torch.linalg.cholesky | scipy.linalg.cholesky "
        "| OpenBLAS 0.3.34 dpotrf | OpenBLAS dgemm | torch matmul | factorize / dgemm | factorize / torch |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b in rows:
        e, g = b["extra_info"], b["extra_info"]["gflops"]
        mkl = f"{g['native_mkl_potrf']:.1f}" if "native_mkl_potrf" in g else "—"
        out.append(
            f"| {e['d']} | {g['native_recursive']:.1f} | {mkl} | {g['factorize']:.1f} | {g['torch_cholesky']:.1f} | "
            f"{g['scipy_cholesky']:.1f} | {g['openblas_dpotrf']:.1f} | {g['openblas_dgemm']:.1f} | {g['torch_matmul']:.1f} | "
            f"{g['factorize'] / _dgemm(g):.0%} | {g['factorize'] / g['torch_cholesky']:.2f}× |"
        )
    out += ["", "Peak RSS increase (MiB): pmsolve.factorize vs torch.linalg.cholesky (the d×d factor is included).", ""]
    out += ["| d | pmsolve.factorize | torch.linalg.cholesky | d×d fp64 |", "|---|---|---|---|"]
    for b in rows:
        e = b["extra_info"]
        out.append(
            f"| {e['d']} | {_mib(e['peak_bytes_factorize'])} | {_mib(e['peak_bytes_torch_cholesky'])} | {_mib(8 * e['d'] ** 2)} |"
        )
    out.append("")
    sweep = _by_test(benchmarks, "test_cholesky_cutoff_sweep")
    if sweep:
        g = sweep[0]["extra_info"]["gflops"]
        out += [
            "Recursion cutoff of the native kernel at d = 4096 (GFLOP/s, medians of 3):",
            "",
            "| " + " | ".join(k.replace("cutoff_", "") for k in g) + " |",
            "|" + "---|" * len(g),
            "| " + " | ".join(f"{v:.1f}" for v in g.values()) + " |",
            "",
        ]
    return out


def _dgemm(gflops: dict) -> float:
    """The machine's dgemm rate in the run: the faster of OpenBLAS's and torch's."""
    return max(gflops["openblas_dgemm"], gflops["torch_matmul"])


def targets(benchmarks: list[dict]) -> list[str]:
    out = ["#### Targets (computed from this run)", ""]
    solve = [b["extra_info"] for b in _by_test(benchmarks, "test_solve_vs_references")]
    big = [e for e in solve if e["d"] == 6400 and e["n"] <= 256]
    if big:
        worst = min(e["t_memit_ref"] / e["t_memit"] for e in big)
        diff = max(e["rel_delta_memit"] for e in big)
        out.append(
            f"- solve ≥ 10× the MEMIT reference at d = 6400, n ≤ 256 (factorisation excluded): smallest speed-up "
            f"{worst:.1f}× → {'met' if worst >= 10 else 'MISSED'}; agreement ≤ 1e-9: largest rel. diff "
            f"{diff:.1e} → {'met' if diff <= 1e-9 else 'MISSED'}"
        )
    fac = {b["extra_info"]["d"]: b["extra_info"]["gflops"] for b in _by_test(benchmarks, "test_factorize_vs_libraries")}
    if 6400 in fac:
        g = fac[6400]
        names = {"native_recursive": "recursive kernel", "native_mkl_potrf": "MKL dpotrf kernel", "factorize": "pmsolve.factorize"}
        for key, name in names.items():
            if key not in g:
                continue
            r, f = g[key] / g["torch_cholesky"], g[key] / _dgemm(g)
            out.append(
                f"- {name} at d = 6400: {r:.2f}× torch.linalg.cholesky (target 1.5×: {'met' if r >= 1.5 else 'MISSED'}), "
                f"{f:.0%} of dgemm (target 70 %: {'met' if f >= 0.7 else 'MISSED'})"
            )
    if len(out) == 2:
        out.append("- this run did not include d = 6400 (quick mode?): no target can be judged")
    out.append("")
    return out


def main() -> None:
    src = Path(sys.argv[1])
    dst = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).with_name("RESULTS.md")
    begin, end = _markers(sys.argv[3] if len(sys.argv) > 3 else "")
    data = json.loads(src.read_text())
    b = data["benchmarks"]
    body = "\n".join([begin, "", *environment(data), *targets(b), *solve_tables(b), *factorize_tables(b), end])
    text = dst.read_text() if dst.exists() else "# Benchmark results\n"
    if begin not in text:
        text = f"{text.rstrip()}\n\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    dst.write_text(head + body + tail)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
