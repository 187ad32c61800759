"""Time, peak memory and conditioning of each stage of an edit, to plan large runs.

Two modes:

* :func:`profile_model`: a real model (statistics, factorisation, keys, values, solve,
  apply), measured.
* :func:`profile_dims`: synthetic keys of given dimensions (statistics, factorisation,
  solve, apply), measured at a size that fits here and extrapolated analytically (flop
  and byte counts) to the requested size. Keys and values need a model's forward pass and
  are not part of this mode.

Peak memory, and how it is measured (``memory_method`` in every result):

* CPU, Linux: the kernel's peak resident set (VmHWM) is reset before each stage by
  writing 5 to /proc/self/clear_refs and read after it; the stage's peak is
  VmHWM − RSS at the start, i.e. what the stage added on top of what was already resident
  (everything the process allocated: Python, torch, BLAS workspaces).
* CPU elsewhere: RSS sampled every millisecond by a thread (can miss short spikes).
* CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus the
  allocation at the start (torch's caching allocator only; cuBLAS/cuSOLVER handles and
  workspaces outside it are not counted).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


# ---------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------


def _status_kib(key: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _pin_glibc_mmap_threshold() -> None:
    """Make large blocks come from fresh mmap pages again.

    glibc raises its mmap threshold after a large block is freed, and later large blocks
    are then carved from heap pages that are already resident: they never raise VmHWM and
    a stage would show a peak of 0. Pinning the threshold (128 KiB, glibc's initial value)
    turns that dynamic behaviour off for the process.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the measurement falls back to what RSS shows
        pass


def _can_reset_hwm() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        _status_kib("VmHWM")
        return True
    except (OSError, KeyError):
        return False


def _rss_bytes() -> int:
    import psutil  # a dependency of accelerate, which pmsolve requires

    return psutil.Process().memory_info().rss


@dataclass
class Peak:
    bytes: int = 0


@contextlib.contextmanager
def peak_memory(device: torch.device | str = "cpu") -> Iterator[Peak]:
    """Measure the peak memory a block adds (see the module docs for the method)."""
    device = torch.device(device)
    peak = Peak()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield peak
        torch.cuda.synchronize(device)
        peak.bytes = torch.cuda.max_memory_allocated(device) - start
        return
    if _can_reset_hwm():
        _pin_glibc_mmap_threshold()
        _CLEAR_REFS.write_text("5")
        start = _status_kib("VmRSS")
        yield peak
        peak.bytes = max(0, _status_kib("VmHWM") - start) * 1024
        return
    start, top, stop = _rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not stop.wait(0.001):
            top[0] = max(top[0], _rss_bytes())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()
        peak.bytes = max(0, max(top[0], _rss_bytes()) - start)


def memory_method(device: torch.device | str = "cpu") -> str:
    if torch.device(device).type == "cuda":
        return "torch.cuda.max_memory_allocated (caching allocator only)"
    if _can_reset_hwm():
        return "VmHWM reset via /proc/self/clear_refs, minus RSS at stage start"
    return "RSS sampled every 1 ms by a thread"


# ---------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------


@dataclass
class Stage:
    """One stage: measured seconds and peak bytes, and (dimension mode) its flop and byte
    counts and the extrapolation to the requested size."""

    name: str
    seconds: float | None
    peak_bytes: int | None
    flops: float | None = None
    model_bytes: float | None = None  # analytic working-set estimate at the measured size
    extrapolated_seconds: float | None = None
    extrapolated_bytes: float | None = None
    note: str = ""

    @property
    def gflops(self) -> float | None:
        if self.flops is None or not self.seconds:
            return None
        return self.flops / self.seconds / 1e9


@dataclass
class Profile:
    mode: str
    device: str
    memory_method: str
    dims: dict[str, Any]
    stages: list[Stage]
    conditioning: dict[str, Any] = field(default_factory=dict)
    measured_dims: dict[str, Any] | None = None
    rates: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for s, d in zip(self.stages, out["stages"]):
            d["gflops"] = s.gflops
        return out

    def table(self) -> str:
        extrap = any(s.extrapolated_seconds is not None for s in self.stages)
        head = f"{'stage':<14}{'seconds':>10}{'peak MiB':>11}{'GFLOP/s':>9}"
        if extrap:
            head += f"{'extrap. s':>12}{'extrap. MiB':>13}"
        lines = [head, "-" * len(head)]
        for s in self.stages:
            row = f"{s.name:<14}{_fmt(s.seconds, '.3f'):>10}{_fmt(_mib(s.peak_bytes), '.1f'):>11}"
            row += f"{_fmt(s.gflops, '.1f'):>9}"
            if extrap:
                row += f"{_fmt(s.extrapolated_seconds, '.1f'):>12}{_fmt(_mib(s.extrapolated_bytes), '.0f'):>13}"
            lines.append(row + (f"  {s.note}" if s.note else ""))
        return "\n".join(lines)


def _mib(x: float | None) -> float | None:
    return None if x is None else x / 2**20


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


@contextlib.contextmanager
def _measure(device: torch.device) -> Iterator[dict[str, float]]:
    out: dict[str, float] = {}
    with peak_memory(device) as peak:
        t0 = time.perf_counter()
        yield out
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out["seconds"] = time.perf_counter() - t0
    out["peak_bytes"] = peak.bytes


# ---------------------------------------------------------------------------
# dimension mode
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Dims:
    """Sizes of one edit job: key width d_in, value width d_out, edits per batch n, edited
    layers, preservation tokens per layer, weight bytes per element."""

    d_in: int
    d_out: int
    n: int
    layers: int = 1
    tokens: int = 100_000
    weight_bytes: int = 2

    def scaled(self, max_d: int, max_tokens: int) -> Dims:
        """The same shape of problem, shrunk so that d_in ≤ max_d (n keeps its ratio to d_in)."""
        f = min(1.0, max_d / self.d_in)
        d_in = max(8, int(self.d_in * f))
        d_out = max(8, int(self.d_out * f))
        n = max(1, min(int(round(self.n * f)), d_in // 2))
        return Dims(d_in, d_out, n, 1, min(self.tokens, max_tokens), self.weight_bytes)


def stage_counts(d: Dims) -> dict[str, tuple[float, float]]:
    """(flops, bytes) per layer of each stage, from the algorithms in pmsolve.solver.

    statistics: symmetric rank-k update, N d_in (d_in + 1) flops; C in fp64 and one fp32 chunk.
    factorisation: Cholesky d_in³/3; C and its factor L in fp64.
    solve: two triangular solves with n right-hand sides (2 d_in² n), G = ZᵀZ and
        B = Z M⁻ᵀ M⁻¹ (≈ 3 d_in n²), the n × n Cholesky (n³/3); L, K, Z, B (fp64), R, G, M.
    apply: Δ = R Bᵀ formed in row blocks of 1024 (2 d_out d_in n); the weight and one fp64 block.
    """
    di, do, n = d.d_in, d.d_out, d.n
    f8 = 8.0
    return {
        "statistics": (d.tokens * di * (di + 1.0), f8 * di * di + 4.0 * 4096 * di),
        "factorisation": (di**3 / 3.0, 2 * f8 * di * di),
        "solve": (2.0 * di * di * n + 3.0 * di * n * n + n**3 / 3.0,
                  f8 * (di * di + 3 * di * n + do * n + 2 * n * n)),
        "apply": (2.0 * do * di * n, d.weight_bytes * do * di + f8 * min(do, 1024) * di),
    }


def _synthetic_keys(rows: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """Keys with a power-law spectrum (eigenvalues ∝ i^-1), like real MLP activations:
    C is full rank but ill-conditioned (condition number about d)."""
    scale = torch.arange(1, d + 1, dtype=torch.float32).pow(-0.5)
    return torch.randn(rows, d, generator=gen) * scale


def _run_synthetic(m: Dims, method: str, mu: float | None, dev: torch.device, seed: int):
    """Run the four solver-side stages once at size ``m``; return measurements, factor, update."""
    from . import factorize, solve
    from .stats import CovarianceAccumulator

    gen = torch.Generator().manual_seed(seed)
    keys = _synthetic_keys(m.tokens, m.d_in, gen)
    K = _synthetic_keys(m.n, m.d_in, gen).T.to(dev, torch.float64)
    R = torch.randn(m.d_out, m.n, generator=gen, dtype=torch.float64).to(dev)
    W = torch.randn(m.d_out, m.d_in, generator=gen).to(dev, torch.bfloat16 if m.weight_bytes == 2 else torch.float32)
    measured: dict[str, dict[str, float]] = {}
    with _measure(dev) as measured["statistics"]:
        acc = CovarianceAccumulator(m.d_in)
        for i in range(0, keys.shape[0], 4096):
            acc.update(keys[i : i + 4096].to(dev))
        C = acc.mean().to(dev)
    del keys
    with _measure(dev) as measured["factorisation"]:
        factor = factorize(C)
    with _measure(dev) as measured["solve"]:
        upd = solve(factor, K, R, method=method, mu=mu)
    with _measure(dev) as measured["apply"]:
        upd.apply_(W)
    return measured, factor, upd


def _fit(f1: float, t1: float, f2: float, t2: float) -> tuple[float, float]:
    """Overhead a and flop rate r with t = a + f / r through two measurements; when the
    two points do not give a positive overhead and rate, a pure rate from the larger one."""
    if f2 > f1 and t2 > t1:
        r = (f2 - f1) / (t2 - t1)
        a = t1 - f1 / r
        if a >= 0:
            return a, r
    return 0.0, f2 / max(t2, 1e-9)


def profile_dims(target: Dims, *, method: str = "emmet", mu: float | None = None, max_d: int = 2048,
                 max_tokens: int = 50_000, seed: int = 0, device: str = "cpu") -> Profile:
    """Measure statistics, factorisation, solve and apply on synthetic keys at two sizes
    that fit (d_in ≤ max_d / 2 and ≤ max_d), fit time = overhead + flops / rate per stage,
    and extrapolate to ``target`` with the flop and byte counts of :func:`stage_counts`."""
    dev = torch.device(device)
    small, big = target.scaled(max(8, max_d // 2), max_tokens // 2), target.scaled(max_d, max_tokens)
    run_small, _, _ = _run_synthetic(small, method, mu, dev, seed)
    run_big, factor, upd = _run_synthetic(big, method, mu, dev, seed)
    at_s, at_b, at_t = stage_counts(small), stage_counts(big), stage_counts(target)
    stages, rates = [], {}
    for name in ("statistics", "factorisation", "solve", "apply"):
        sec, peak = run_big[name]["seconds"], int(run_big[name]["peak_bytes"])
        a, r = _fit(at_s[name][0], run_small[name]["seconds"], at_b[name][0], sec)
        rates[name] = {"overhead_s": a, "gflops": r / 1e9}
        stages.append(Stage(name, sec, peak, at_b[name][0], at_b[name][1],
                            extrapolated_seconds=target.layers * (a + at_t[name][0] / r),
                            extrapolated_bytes=at_t[name][1], note="per layer" if name != "apply" else ""))
    for name in ("keys", "values"):
        stages.append(Stage(name, None, None, note="needs a model: use --model"))
    d = upd.diagnostics
    notes = [
        f"measured at d_in={big.d_in}, d_out={big.d_out}, n={big.n}, tokens={big.tokens} (and at half that) on "
        f"{dev}; the 'extrap.' columns are an EXTRAPOLATION to d_in={target.d_in}, d_out={target.d_out}, "
        f"n={target.n}, tokens={target.tokens}, layers={target.layers}: time = overhead + flop count / flop rate, "
        "both fitted per stage to the two measured sizes (see 'rates'); memory = the analytic working set "
        "per stage (fp64 statistics and factors; the model itself not included)",
        "extrapolated seconds are totals over all layers; extrapolated bytes are per layer "
        "(stages run one layer at a time); the statistics stage excludes the model's forward passes",
    ]
    return Profile(
        mode="dims", device=str(dev), memory_method=memory_method(dev), dims=asdict(target), stages=stages,
        conditioning={"cond_C": factor.cond, "jitter_relative": factor.jitter_relative, "cond_G": d.cond_G,
                      "mu": d.mu, "mu_relative": d.mu_relative, "ridge_fallback": d.ridge_fallback,
                      "residual": d.residual, "synthetic": "keys with eigenvalues of C proportional to 1/i"},
        measured_dims=asdict(big), rates=rates, notes=notes,
    )


# ---------------------------------------------------------------------------
# model mode
# ---------------------------------------------------------------------------


class _StageMeter:
    """A clock for pmsolve.editing.steps.edit_batch that also measures memory: per stage,
    seconds added up over its calls and the largest peak of any call."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.measured: dict[str, dict[str, float]] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        with _measure(self.device) as m:
            yield
        acc = self.measured.setdefault(stage, {"seconds": 0.0, "peak_bytes": 0})
        acc["seconds"] += m["seconds"]
        acc["peak_bytes"] = max(acc["peak_bytes"], m["peak_bytes"])


def profile_model(model, tokenizer, requests: Sequence[Any], layers: Sequence[int], *, method: str = "emmet",
                  mu: float | None = None, tokens: int = 20_000, corpus: str | None = None, seed: int = 0,
                  value_config=None) -> Profile:
    """Edit ``requests`` (one batch) into ``layers`` as :func:`pmsolve.edit` does (the same
    steps; MEMIT's spread over several layers), measuring each stage, then restore the model.

    Statistics and their factorisation are measured apart; keys, solve and apply add up over
    the layers (their peak is the largest of any layer)."""
    from .editing.distribution import get_distribution
    from .editing.keys import context_templates
    from .editing.requests import load_requests
    from .editing.steps import KeyOptions, WeightSnapshot, edit_batch, factor_stats
    from .editing.values import ValueConfig
    from .models.adapters import adapter_for
    from .stats import collect_stats

    adapter = adapter_for(model)
    reqs = load_requests(requests)
    layers = sorted(adapter.check_layer(layer) for layer in layers)
    dist = get_distribution("memit" if len(layers) > 1 else "single", layers)
    dev = adapter.weight(layers[-1]).device
    meter = _StageMeter(dev)
    with meter("statistics"):
        stats = collect_stats(model, tokenizer, list(layers), corpus, max_tokens=tokens, progress=False)
    with meter("factorisation"):
        factors = factor_stats(stats, layers, adapter)
    ctx = context_templates(model, tokenizer, seed=seed)
    snapshot = WeightSnapshot(model)
    values: list[dict[str, Any]] = []
    try:
        edits = edit_batch(model, tokenizer, adapter, reqs, 0, layers, dist, factors, method, mu,
                           value_config or ValueConfig(), ctx, seed, snapshot, meter, values,
                           key_opts=KeyOptions(preserve_edits=0.0))
    finally:
        snapshot.restore()
    measured = meter.measured
    stages = [Stage(name, measured[name]["seconds"], int(measured[name]["peak_bytes"]))
              for name in ("statistics", "factorisation", "keys", "values", "solve", "apply")]
    stages[0].note = f"{stats.tokens} tokens, {len(layers)} layer(s) in one pass"
    stages[3].note = f"steps per fact max {max(v['steps'] for v in values)}"
    cond = {str(e.layer): {"cond_C": factors[e.layer].cond, "jitter_relative": factors[e.layer].jitter_relative,
                           "cond_G": e.update.diagnostics.cond_G, "mu": e.update.diagnostics.mu,
                           "mu_relative": e.update.diagnostics.mu_relative,
                           "ridge_fallback": e.update.diagnostics.ridge_fallback,
                           "residual": e.update.diagnostics.residual} for e in edits}
    params = sum(p.numel() for p in model.parameters())
    return Profile(
        mode="model", device=str(dev), memory_method=memory_method(dev),
        dims={"d_in": adapter.d_in, "d_out": adapter.d_out, "n": len(reqs), "layers": layers, "tokens": stats.tokens,
              "parameters": params, "method": method, "torch_threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count()},
        stages=stages, conditioning=cond,
        notes=["peak memory is what each stage added on top of the loaded model"],
    )
