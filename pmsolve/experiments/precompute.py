"""Per-fact keys and values on the unedited model, computed once (and cached on disk) and
reused by every single-layer solve of the experiments.

For a single-layer edit of layer L applied to the *unedited* model, everything the solver
needs about fact f is independent of the solver and of the other facts in its batch:

    k_f   the rewrite module's input at the subject's last token (averaged over templates),
    h_f   the output of layer L at that token (bare prompt), and the rewrite input there,
          k_bare_f (an edit ΔW of layer L moves h_f by exactly ΔW k_bare_f),
    z_f   v*, the output layer L should produce (optimised per fact; the batched optimiser
          in pmsolve.editing.values is per-fact by construction).

So an experiment that compares ROME, EMMET and MEMIT across batch sizes and ridges
computes (k, h, z) once per fact and then only solves: Δ = solve(C, K, Z − H). Keys, values,
the solve and the update are pmsolve.editing.steps, the functions pmsolve.edit runs; this
module only caches their per-fact results. It does *not* cover MEMIT's spread over several
layers (keys are re-measured after each layer) or sequential editing with fresh v* (the model
has changed): those go through :func:`pmsolve.edit`.

The tensors are cached on disk, keyed by model fingerprint, layer, seed, value settings and
the fact itself, and saved after every chunk: an interrupted run keeps what it computed.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .._io import atomic_write, content_hash
from ..editing import steps
from ..editing.keys import context_templates
from ..editing.requests import EditRequest
from ..editing.values import ValueConfig
from ..models.adapters import adapter_for
from ..models.document_start import document_start_tag
from ..solver import Factor, Update

_FORMAT = 3  # in the cache file name: bump when the stored fields change


def fact_key(req: EditRequest) -> str:
    return json.dumps([req.prompt, req.subject, req.target_new])


@dataclass
class FactTensors:
    """k and k_bare (n × d_in), h and z (n × d_out), fp32 on CPU, in the order of ``requests``; plus
    how the v* optimisation went per fact and the seconds spent computing what was not cached."""

    requests: list[EditRequest]
    layer: int
    k: torch.Tensor
    k_bare: torch.Tensor
    h: torch.Tensor
    z: torch.Tensor
    steps: list[int]
    converged: list[bool]
    seconds_keys: float              # spent in this call (0 when everything was cached)
    seconds_values: float
    seconds_per_fact: float          # keys + values per fact when they were computed (cached or not)

    def select(self, idx: Sequence[int], key_source: str = "average") -> tuple[torch.Tensor, torch.Tensor]:
        """K (d_in × columns) and R = Z − H (d_out × columns) in fp64 for the facts ``idx``, with
        the key columns of pmsolve.edit's ``key_source`` (template averages, the bare prompts'
        own keys, or both)."""
        i = torch.as_tensor(list(idx), dtype=torch.long)
        cols = steps.KeyColumns.choose(key_source, False, [self.requests[j] for j in i.tolist()])
        return cols.keys(self.k[i], self.k_bare[i]), cols.residuals(self.z[i] - self.h[i])


def _cache_file(cache_dir: Path, fingerprint: str, layer: int, seed: int, vcfg: ValueConfig, start: str) -> Path:
    settings = {k: v for k, v in asdict(vcfg).items() if k != "max_batch"}  # grouping changes memory, not v*
    tag = content_hash(settings, 10)
    return cache_dir / f"facts{_FORMAT}-{fingerprint}{'-' + start if start else ''}-L{layer}-s{seed}-v{tag}.pt"


def _load(path: Path) -> dict[str, dict]:
    try:
        return torch.load(path, weights_only=True)
    except Exception:  # absent, truncated or foreign (the unpickler raises many types): recompute
        return {}


def _save(path: Path, entries: dict[str, dict]) -> None:
    """Atomic write: a crash mid-save leaves the previous file intact."""
    atomic_write(path, lambda fh: torch.save(entries, fh))


def fact_tensors(
    model,
    tokenizer,
    requests: Sequence[EditRequest],
    layer: int,
    *,
    fingerprint: str,
    value_config: ValueConfig = ValueConfig(),
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    chunk: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> FactTensors:
    """(k, h, z) for every request at ``layer`` of the unedited ``model`` (see module docs).

    ``fingerprint`` identifies the weights (pmsolve.stats.weights_fingerprint); facts found
    in the cache are not recomputed; new ones are saved after every ``chunk`` facts.
    """
    adapter = adapter_for(model)
    start = document_start_tag(tokenizer)
    path = _cache_file(Path(cache_dir), fingerprint, layer, seed, value_config, start) if cache_dir else None
    entries = _load(path) if path else {}
    todo = list({fact_key(r): r for r in requests if fact_key(r) not in entries}.values())
    ctx = context_templates(model, tokenizer, seed=seed)
    t_keys = t_values = 0.0
    for start in range(0, len(todo), chunk):
        part = todo[start : start + chunk]
        t0 = time.perf_counter()
        keys = steps.measure_keys(model, adapter, tokenizer, part, ctx, [layer])
        k, k_bare = keys.average[layer], keys.bare[layer]
        t1 = time.perf_counter()
        vr = steps.compute_values(model, adapter, tokenizer, part, ctx, layer, value_config, seed)
        t2 = time.perf_counter()
        t_keys, t_values = t_keys + t1 - t0, t_values + t2 - t1
        for i, r in enumerate(part):
            entries[fact_key(r)] = {"k": k[i].cpu(), "k_bare": k_bare[i].cpu(), "h": vr.h[i].cpu(), "z": vr.z[i].cpu(),
                                    "steps": vr.steps[i], "converged": vr.converged[i],
                                    "seconds": (t2 - t0) / len(part)}
        if path:
            _save(path, entries)
        if progress:
            progress(min(start + chunk, len(todo)), len(todo))
    rows = [entries[fact_key(r)] for r in requests]
    return FactTensors(
        requests=list(requests),
        layer=layer,
        k=torch.stack([e["k"] for e in rows]),
        k_bare=torch.stack([e["k_bare"] for e in rows]),
        h=torch.stack([e["h"] for e in rows]),
        z=torch.stack([e["z"] for e in rows]),
        steps=[int(e["steps"]) for e in rows],
        converged=[bool(e["converged"]) for e in rows],
        seconds_keys=t_keys,
        seconds_values=t_values,
        seconds_per_fact=sum(float(e["seconds"]) for e in rows) / max(len(rows), 1),
    )


def apply_solve(snapshot: steps.WeightSnapshot, layer: int, factor: Factor, K: torch.Tensor, R: torch.Tensor,
                method: str, mu: float | None, *, prompt_keys: torch.Tensor | None = None,
                preserve_prompts: float = 0.0) -> Update:
    """Solve and add the update to ``layer``'s rewrite weight of ``snapshot.model`` in place
    (the original kept in ``snapshot``, which the caller restores)."""
    upd = steps.solve_layer(factor, K, R, method, mu, prompt_keys=prompt_keys, preserve_prompts=preserve_prompts)
    steps.apply_update(adapter_for(snapshot.model), layer, upd, K, R, snapshot)
    return upd


def solve_and_apply(snapshot: steps.WeightSnapshot, factor: Factor, facts: FactTensors, idx: Sequence[int],
                    method: str, mu: float | None, *, key_source: str = "average", preserve_prompts: float = 0.0,
                    tokenizer=None, seed: int = 0) -> Update:
    """Edit the facts ``idx`` in one batch into ``snapshot.model``; the caller restores it.

    ``key_source`` and ``preserve_prompts`` as in :func:`pmsolve.edit` (the latter needs the
    tokenizer: the batch's prompt-token keys are measured on the model as it is, unedited)."""
    K, R = facts.select(idx, key_source)
    P = None
    if preserve_prompts > 0:
        model = snapshot.model
        reqs = [facts.requests[i] for i in idx]
        P = steps.measure_keys(model, adapter_for(model), tokenizer, reqs, context_templates(model, tokenizer, seed=seed),
                               [facts.layer], prompt_tokens=True).prompt_tokens[facts.layer]
    return apply_solve(snapshot, facts.layer, factor, K, R, method, mu, prompt_keys=P,
                       preserve_prompts=preserve_prompts)
