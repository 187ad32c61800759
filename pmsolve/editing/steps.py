"""The steps of one edit, each a function of its own.

:func:`pmsolve.edit`, the experiments (which cache keys and values per fact and then only
solve) and the profiler (which times and measures each stage) all run these, so an edit
means the same thing wherever it is made:

    factor_stats      statistics C per layer -> Cholesky factors (once per layer)
    measure_keys      k*: rewrite-module inputs at the subject's last token (template
                      average and bare prompt), the current output of the last edited layer,
                      and the keys of the prompt tokens after the subject
    KeyColumns        which of those keys constrain each fact, and the matching residual columns
    compute_values    v* (z = h + δ), optionally through a cache of facts already optimised
    solve_layer       Δ = R (KᵀC⁻¹K + μI)⁻¹ (C⁻¹K)ᵀ for one layer, factored as U Bᵀ
    apply_update      W += Δ in place, the original kept in a WeightSnapshot; returns the
                      memorisation residual measured on the weights as stored
    edit_batch        one batch over the edited layers (the edit distribution), from the above
    weight_fingerprint  a hash of one weight's bytes (which weights an update was made on)
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CacheError, CapacityError, InputError
from ..models.adapters import Adapter
from ..solver import Factor, Update, factorize
from .distribution import Distribution, remaining_share
from .keys import KeyPrompts, average_by_owner, capture, key_prompts, pad_id
from .presets import DEFAULT_PRESERVE_EDITS
from .preservation import SoftRetention
from .requests import EditRequest
from .values import ValueConfig, ValueResult, optimize_values

STAGES = ("stats", "keys", "values", "solve", "apply")
KEY_SOURCES = ("average", "prompt", "both")


# ---------------------------------------------------------------------------
# statistics -> factors
# ---------------------------------------------------------------------------


def _as_matrix(obj: Any) -> torch.Tensor | Factor:
    if isinstance(obj, (torch.Tensor, Factor)):
        return obj
    mean = getattr(obj, "mean", None)
    if callable(mean):  # a CovarianceAccumulator
        return mean()
    raise InputError(f"statistics must be a tensor C, a pmsolve.Factor or an accumulator with .mean(), "
                     f"got {type(obj).__name__}")


def _check_stats_meta(obj: Any, layer: int, adapter: Adapter, model_id: str | None) -> None:
    """Statistics that carry metadata (accumulators, cached files) must match model and layer."""
    meta = getattr(obj, "meta", None) or getattr(obj, "metadata", None)
    if not isinstance(meta, Mapping):
        return
    their_layer = meta.get("layer")
    if their_layer is not None and int(their_layer) != layer:
        raise CacheError(f"statistics given for layer {layer} were collected at layer {their_layer}")
    module = meta.get("module")
    if module is not None and module != adapter.rewrite_name(layer):
        raise CacheError(f"statistics for layer {layer} are for module {module!r}, "
                         f"not {adapter.rewrite_name(layer)!r}")
    their_model = meta.get("model") or meta.get("model_id")
    if their_model and model_id and str(their_model) != str(model_id):
        raise CacheError(f"statistics for layer {layer} were collected on model {their_model!r}, "
                         f"this is {model_id!r}")


def factor_stats(stats: Any, layers: Sequence[int], adapter: Adapter, model_id: str | None = None, *,
                 on_matrix: Callable[[int, torch.Tensor | Factor], None] | None = None) -> dict[int, Factor]:
    """The Cholesky factor of each layer's statistics: ``stats`` is ``{layer: C}`` (a tensor,
    an accumulator or a Factor), a callable ``layer -> C``, or a collect_stats result.

    Checks dimensions and any metadata the statistics carry against the model (CacheError);
    a C the caller passes is left intact, an accumulator's fresh mean() is factored in place
    (no second d × d matrix). ``on_matrix(layer, C)`` sees each layer's C (or the Factor
    given) before it is factored: what needs C itself (AlphaEdit's null space) reads it there."""
    if stats is None:
        raise InputError("no statistics given: pass stats={layer: C} (or accumulators / factors), "
                         "stats='auto', or a pmsolve.stats.collect_stats result")
    modules = getattr(stats, "modules", None)
    if isinstance(modules, Mapping) and hasattr(stats, "stats"):  # a CollectResult
        for layer in layers:
            if layer in modules and modules[layer] != adapter.rewrite_name(layer):
                raise CacheError(f"statistics for layer {layer} were collected at module {modules[layer]!r}, "
                                 f"the edit needs {adapter.rewrite_name(layer)!r}")
        stats = stats.stats
    out = {}
    for layer in layers:
        if callable(stats) and not isinstance(stats, Mapping):
            obj = stats(layer)
        elif isinstance(stats, Mapping) and layer in stats:
            obj = stats[layer]
        else:
            have = sorted(stats) if isinstance(stats, Mapping) else "?"
            raise InputError(f"no statistics for layer {layer} (have layers {have})")
        _check_stats_meta(obj, layer, adapter, model_id)
        m = _as_matrix(obj)
        d = m.d if isinstance(m, Factor) else m.shape[0]
        if d != adapter.d_in:
            raise CacheError(f"statistics for layer {layer} are {d}-dimensional but the rewrite module "
                             f"{adapter.rewrite_name(layer)} takes {adapter.d_in}-dimensional keys: "
                             "they belong to another model")
        if on_matrix is not None:
            on_matrix(layer, m)
        if isinstance(m, Factor):
            out[layer] = m
        else:  # an accumulator's mean() is a fresh tensor of ours: factor it in place
            ours = m is not obj and m.dtype == torch.float64 and m.is_contiguous()
            out[layer] = factorize(m, overwrite_c=ours)
    return out


def sensitivity(factor: Factor | Any, K: torch.Tensor) -> float:
    """mean_j k_jᵀ C⁻¹ k_j over the columns of K (d_in × n): how cheaply this layer can move
    the edit keys (see distribution.py). ``factor``: a Factor, or a preservation state (its C)."""
    factor = factor if isinstance(factor, Factor) else factor.factor
    K = K.to(factor.device, torch.float64)
    return float((K * factor.solve(K)).sum(0).mean())


# ---------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------


@dataclass
class MeasuredKeys:
    """Per key layer, fp32 on the layer's device: ``average`` (n × d_in) the rewrite-module
    input at the subject's last token averaged over the context templates, ``bare`` (n × d_in)
    the same in the bare prompt, ``prompt_tokens`` (m × d_in, when asked for) the inputs at
    every token after the subject over all key prompts. ``outputs`` (n × d_out): the output
    of the output layer at the bare prompts' subject token, when asked for."""

    average: dict[int, torch.Tensor]
    bare: dict[int, torch.Tensor]
    outputs: torch.Tensor | None
    prompt_tokens: dict[int, torch.Tensor]


def measure_keys(model, adapter: Adapter, tokenizer, requests: Sequence[EditRequest], templates: Sequence[str],
                 layers: Sequence[int], *, output_layer: int | None = None, prompt_tokens: bool = False,
                 prompts: KeyPrompts | None = None) -> MeasuredKeys:
    """One no-grad pass over every (request, template) prompt that records what
    :class:`MeasuredKeys` holds (``prompts``: the key prompts, if already built)."""
    kp = prompts or key_prompts(tokenizer, requests, templates)
    bare = [i for i, t in enumerate(kp.template) if t == 0]  # template 0 is the bare "{}"
    cap = capture(model, adapter, kp.rows, kp.lookup, pad_id(tokenizer), key_layers=list(layers),
                  output_layers=[] if output_layer is None else [output_layer],
                  suffix_layers=list(layers) if prompt_tokens else [])
    return MeasuredKeys(
        average={layer: average_by_owner(cap.keys[layer], kp.owner, len(requests)) for layer in layers},
        bare={layer: cap.keys[layer][bare] for layer in layers},
        outputs=None if output_layer is None else cap.outputs[output_layer][bare],
        prompt_tokens=cap.suffix,
    )


@dataclass(frozen=True)
class KeyColumns:
    """Which key columns constrain the facts of a batch: the template average of every fact
    (if ``average``), then the bare prompt's own key of the facts ``extra``. A fact with two
    columns asks for the same residual at both."""

    average: bool
    extra: tuple[int, ...]

    @classmethod
    def choose(cls, source: str, start_key: bool, requests: Sequence[EditRequest]) -> KeyColumns:
        """``source`` "average", "prompt" or "both" (see pmsolve.edit's key_source); with
        "average" and ``start_key``, the facts whose prompt starts with the subject also get
        their bare prompt's key: there the subject sits at the start of the sequence, where
        early-layer keys differ strongly from the same subject after a context prefix, so
        the template average is far from the very prompt being edited."""
        if source not in KEY_SOURCES:
            raise InputError(f"key_source must be one of {KEY_SOURCES}, got {source!r}")
        if source == "average":
            extra = [i for i, r in enumerate(requests) if start_key and r.prompt.lstrip().startswith("{}")]
        else:
            extra = list(range(len(requests)))
        return cls(source != "prompt", tuple(extra))

    def _columns(self, per_fact: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        idx = torch.tensor(self.extra, dtype=torch.long, device=second.device)
        return torch.cat(([per_fact] if self.average else []) + [second[idx]])

    def count(self, n: int) -> int:
        """Key columns for a batch of n facts."""
        return (n if self.average else 0) + len(self.extra)

    def keys(self, average: torch.Tensor, bare: torch.Tensor) -> torch.Tensor:
        """K (d_in × columns, fp64) from the per-fact average and bare keys (n × d_in)."""
        return self._columns(average, bare).T.to(torch.float64)

    def residuals(self, resid: torch.Tensor, share: float = 1.0) -> torch.Tensor:
        """R (d_out × columns, fp64): ``share`` of each fact's residual (n × d_out) per column."""
        return (share * self._columns(resid, resid)).T.to(torch.float64)


# ---------------------------------------------------------------------------
# values
# ---------------------------------------------------------------------------


def compute_values(model, adapter: Adapter, tokenizer, requests: Sequence[EditRequest], templates: Sequence[str],
                   layer: int, config: ValueConfig, seed: int = 0,
                   cache: MutableMapping[Any, Any] | None = None) -> ValueResult:
    """v* at ``layer`` for the requests, optimising only the facts not already in ``cache``.

    v* of a fact depends only on the fact, the model, the templates, the seed and the value
    settings (the batched optimiser is per fact), so one cache serves any number of edits of
    the same unedited model."""
    if cache is None:
        return optimize_values(model, adapter, tokenizer, requests, templates, layer, config, seed=seed)

    def key(r: EditRequest) -> tuple:
        return (layer, seed, config, tuple(templates), r.prompt, r.subject, r.target_new)

    todo = list({key(r): r for r in requests if key(r) not in cache}.values())
    if todo:
        vr = optimize_values(model, adapter, tokenizer, todo, templates, layer, config, seed=seed)
        for i, r in enumerate(todo):
            cache[key(r)] = (vr.z[i], vr.delta[i], vr.h[i], vr.steps[i], vr.converged[i], vr.nll[i])
    z, delta, h, steps, converged, nll = zip(*(cache[key(r)] for r in requests))
    return ValueResult(z=torch.stack(z), delta=torch.stack(delta), h=torch.stack(h), steps=list(steps),
                       converged=list(converged), nll=list(nll))


# ---------------------------------------------------------------------------
# solve and apply
# ---------------------------------------------------------------------------


def solve_layer(state: Factor | Any, K: torch.Tensor, R: torch.Tensor, method: str, mu: float | None, *,
                prompt_keys: torch.Tensor | None = None, preserve_prompts: float = 0.0) -> Update:
    """The update of one layer: keys K (d_in × n), residuals R (d_out × n), solved on the
    device of ``state``: a Factor of C, or a layer's preservation state
    (:mod:`.preservation`: soft or hard retention of earlier edits, AlphaEdit's null space).
    With ``preserve_prompts`` α > 0 the batch's prompt-token keys (m × d_in) join the
    preservation term first (:func:`.preservation.with_prompt_preservation`)."""
    if isinstance(state, Factor):
        state = SoftRetention(state)
    return state.solve(K, R, method, mu, prompt_keys=prompt_keys, preserve_prompts=preserve_prompts)


class WeightSnapshot(dict):
    """Module name -> a copy of its weight as it was before this snapshot's first change to
    it; :meth:`restore` puts every one back bit for bit."""

    def __init__(self, model, modules: Iterable[str] = ()) -> None:
        super().__init__()
        self.model = model
        for name in modules:
            self.keep(name)

    @classmethod
    def of_layers(cls, model, adapter: Adapter, layers: Iterable[int]) -> WeightSnapshot:
        return cls(model, [adapter.rewrite_name(layer) for layer in layers])

    def keep(self, name: str) -> torch.Tensor:
        """The module's weight (live), its original copied the first time it is asked for."""
        weight = self.model.get_submodule(name).weight
        if name not in self:
            self[name] = weight.detach().clone()
        return weight

    def restore(self) -> None:
        restore_weights(self.model, self)


def restore_weights(model, originals: Mapping[str, torch.Tensor]) -> None:
    """Copy each saved weight (module name -> tensor) back into the model, bit for bit."""
    with torch.no_grad():
        for name, w0 in originals.items():
            model.get_submodule(name).weight.copy_(w0)


def _wk(weight: torch.Tensor, K: torch.Tensor, layout: str) -> torch.Tensor:
    """W K in fp64 for a weight stored out_in (d_out × d_in) or in_out; K is d_in × n."""
    w = weight.detach().to(torch.float64)
    k = K.to(weight.device, torch.float64)
    return w @ k if layout == "out_in" else w.mT @ k


def apply_update(adapter: Adapter, layer: int, update: Update, K: torch.Tensor, R: torch.Tensor,
                 snapshot: WeightSnapshot) -> float:
    """Add the update to ``layer``'s rewrite weight in place (its original kept in
    ``snapshot``); return ‖(W_after − W_before) K − R‖ / ‖R‖ measured on the weights as
    stored: in bf16/fp16 the rounding of W + Δ can erase part of a small update."""
    weight = snapshot.keep(adapter.rewrite_name(layer))
    before = _wk(weight, K, adapter.layout)
    update.apply_(weight.data, layout=adapter.layout)
    after = _wk(weight, K, adapter.layout)
    r = R.to(after.device, torch.float64)
    return float(torch.linalg.matrix_norm(after - before - r) / torch.linalg.matrix_norm(r).clamp_min(1e-300))


def weight_fingerprint(weight: torch.Tensor) -> str:
    """Hash of a weight's dtype, shape and every byte: tells the weights an update file was
    made on from any other (another checkpoint or dtype, or the same weights already edited).
    (pmsolve.stats.weights_fingerprint is the cheap, sampled identity of a whole model, for
    cache keys; this one is exact, for one tensor.)"""
    t = weight.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()[:24]


# ---------------------------------------------------------------------------
# one batch over the edited layers
# ---------------------------------------------------------------------------


@dataclass
class LayerEdit:
    """One solve applied to one layer for one batch of requests."""

    batch: int
    layer: int
    module: str
    layout: str
    share: float
    update: Update
    residual_rounded: float  # ‖(W_after − W_before) K − R‖ / ‖R‖ with the weights as stored
    keys: torch.Tensor | None = None  # the solve's K (d_in × n), kept when later batches need it

    def as_dict(self) -> dict[str, Any]:
        return {
            "batch": self.batch,
            "layer": self.layer,
            "module": self.module,
            "share": self.share,
            "residual_rounded": self.residual_rounded,
            **{f"solve_{k}": v for k, v in self.update.diagnostics.as_dict().items()},
        }


class StageClock:
    """Seconds per stage of an edit (``with clock("keys"): ...``), added up over calls."""

    def __init__(self) -> None:
        self.t = dict.fromkeys(STAGES, 0.0)

    @contextlib.contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.t[stage] += time.perf_counter() - t0


@dataclass(frozen=True)
class KeyOptions:
    """Which key columns constrain each fact, and how much its own prompts and earlier
    edits weigh in C (see pmsolve.edit)."""

    source: str = "average"
    start_key: bool = False
    preserve_prompts: float = 0.0
    preserve_edits: float = DEFAULT_PRESERVE_EDITS


def layers_with_room(states: Mapping[int, Any], layers: Sequence[int], columns: int, batch: int = 0) -> list[int]:
    """The layers whose preservation state can take ``columns`` more equality constraints
    (hard retention fills a layer's d_in directions; the other kinds have no limit).
    CapacityError, naming every layer's room, when none can."""
    room = {layer: (states[layer].capacity() if not isinstance(states[layer], Factor) else None) for layer in layers}
    fit = [layer for layer in layers if room[layer] is None or room[layer] >= columns]
    if not fit:
        raise CapacityError(f"batch {batch} needs {columns} key columns but no edited layer has room for them: "
                            f"capacity left per layer {room} (hard retention keeps at most d_in independent keys "
                            "per layer); edit more layers, smaller batches, or use soft retention / alphaedit",
                            required=columns, available=max(v or 0 for v in room.values()))
    return fit


def edit_batch(model, tokenizer, adapter: Adapter, batch: Sequence[EditRequest], b: int, layers: Sequence[int],
               dist: Distribution, factors: Mapping[int, Any], method: str, mu: float | None,
               vcfg: ValueConfig, ctx: Sequence[str], seed: int, snapshot: WeightSnapshot,
               clock: Callable[[str], Any], values: list[dict[str, Any]],
               progress: Callable[[str, int, int], None] | None = None,
               value_cache: MutableMapping[Any, Any] | None = None,
               key_opts: KeyOptions = KeyOptions(), keep_keys: bool | None = None) -> list[LayerEdit]:
    """Edit one batch (index ``b``) into the model over ``layers``, in place.

    ``factors``: per layer a Factor of C or a preservation state (:mod:`.preservation`).
    v* is optimised once, at the last layer. Then, layer by layer (MEMIT's edit
    distribution; one layer is single-layer editing), the keys at this layer and the current
    output of the last layer are measured in the partially edited model, this layer takes
    its share of what is still missing, and its update is solved and applied. Layers whose
    hard retention has no room left for the batch sit it out (the others share the edit);
    none with room is a CapacityError before anything changes. Appends a v* record per fact
    to ``values``; ``clock(stage)`` times the stages. ``keep_keys``: keep each solve's K in
    its LayerEdit (default: when preserve_edits is on)."""
    last = layers[-1]
    cols = KeyColumns.choose(key_opts.source, key_opts.start_key, batch)
    active = layers_with_room(factors, layers, cols.count(len(batch)), b)
    kp = key_prompts(tokenizer, batch, ctx)
    with clock("values"):
        vr = compute_values(model, adapter, tokenizer, batch, ctx, last, vcfg, seed, value_cache)
    values += [{"batch": b, "subject": r.subject, "steps": s, "converged": c, "nll": nll}
               for r, s, c, nll in zip(batch, vr.steps, vr.converged, vr.nll)]
    if dist.needs_sensitivity:
        with clock("keys"):
            m0 = measure_keys(model, adapter, tokenizer, batch, ctx, active, prompts=kp)
        with clock("solve"):
            weights = dist.weights(active, lambda layer: sensitivity(
                factors[layer], cols.keys(m0.average[layer], m0.bare[layer])))
    else:
        weights = dist.weights(active)
    keep = key_opts.preserve_edits > 0 if keep_keys is None else keep_keys
    out = []
    for i, layer in enumerate(active):
        with clock("keys"):
            m = measure_keys(model, adapter, tokenizer, batch, ctx, [layer], output_layer=last,
                             prompt_tokens=key_opts.preserve_prompts > 0, prompts=kp)
        share = remaining_share(weights, i)
        f = factors[layer]
        K = cols.keys(m.average[layer], m.bare[layer]).to(f.device)
        R = cols.residuals(vr.z.to(m.outputs.device) - m.outputs, share).to(f.device)
        with clock("solve"):
            upd = solve_layer(f, K, R, method, mu, prompt_keys=m.prompt_tokens.get(layer),
                              preserve_prompts=key_opts.preserve_prompts)
        with clock("apply"):
            res = apply_update(adapter, layer, upd, K, R, snapshot)
        out.append(LayerEdit(b, layer, adapter.rewrite_name(layer), adapter.layout, share, upd, res,
                             K if keep else None))
        if progress:
            progress("layer", i + 1, len(active))
    return out
