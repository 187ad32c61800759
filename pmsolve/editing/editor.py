"""pmsolve.edit: requests → keys, values → distributed PM solves → edited weights.

Order of work, chosen so that every check that can fail on bad input runs before the
first weight changes: parse requests, resolve layers and distribution, check and
factor the statistics; only then optimise values and apply updates. Any exception
after the first weight change restores all touched weights bit-exactly.

The steps themselves (keys, values, solve, apply, one batch over the layers) are in
:mod:`.steps`, shared with the experiments and the profiler; this module resolves the
settings, runs the batches (with checkpoints) and saves, loads and re-applies updates.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch

from ..errors import CacheError, InputError
from ..models.adapters import Adapter, Templates, adapter_for
from ..models.document_start import with_document_start
from ..solver import METHODS, Update
from . import checkpoint as resume
from .distribution import Distribution, get_distribution
from .keys import cache_dir, context_templates
from .presets import DEFAULT_PRESERVE_EDITS, Preset, load_preset, preset_for
from .requests import EditRequest, load_requests
from .steps import KEY_SOURCES, KeyOptions, LayerEdit, StageClock, WeightSnapshot, factor_stats
from .steps import edit_batch as _edit_batch  # a module global: tests interrupt an edit between batches
from .steps import preserve_edited_keys, restore_weights, weight_fingerprint
from .values import ValueConfig

# /2 adds the fingerprints of each touched weight before and after the edit ("weights").
_UPDATES_FORMAT = "pmsolve.updates/2"
_UPDATES_FORMATS_READ = ("pmsolve.updates/1", _UPDATES_FORMAT)


@dataclass
class EditResult:
    model: Any
    requests: list[EditRequest]
    method: str
    layers: list[int]
    distribution: str
    mu: float | None
    edits: list[LayerEdit]
    values: list[dict[str, Any]]
    timings: dict[str, float]
    context_templates: list[str]
    _originals: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)
    key_options: dict[str, Any] = field(default_factory=dict)  # key_source, start_key, preserve_prompts
    value_config: dict[str, Any] = field(default_factory=dict)  # the v* settings used
    # module -> {"before": ..., "after": ...}: weight_fingerprint of each touched weight
    fingerprints: dict[str, dict[str, str]] = field(default_factory=dict)
    # requests whose batches came from a checkpoint (timings cover the others only)
    resumed_requests: int = 0
    document_start: str | None = None  # the token the edit's prompts started with (edit(document_start=))

    def restore(self) -> None:
        """Put back the original weights, bit for bit."""
        restore_weights(self.model, self._originals)

    def save_updates(self, path: str | os.PathLike[str]) -> None:
        """Write the updates alone (factored U, B per layer and batch): re-apply with
        :func:`apply_updates` to the unedited model."""
        dtypes = {str(w.dtype).removeprefix("torch.") for w in self._originals.values()}
        save_updates(self.edits, path, meta={"method": self.method, "layers": self.layers,
                                             "requests": [r.as_dict() for r in self.requests],
                                             "weights": self.fingerprints,
                                             "weight_dtype": dtypes.pop() if len(dtypes) == 1 else None})

    def report(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "layers": self.layers,
            "distribution": self.distribution,
            "mu": self.mu,
            **self.key_options,
            "n_requests": len(self.requests),
            "timings": self.timings,
            "facts_per_second": (len(self.requests) - self.resumed_requests) / max(sum(self.timings.values()), 1e-9),
            "resumed_requests": self.resumed_requests,
            "document_start": self.document_start,
            "edits": [e.as_dict() for e in self.edits],
            "values": self.values,
            "value_config": self.value_config,
            "context_templates": self.context_templates,
        }


# ---------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------


def auto_stats(model, tokenizer, layers: Sequence[int], model_id: str | None, *, max_tokens: int = 100_000,
               corpus: Any = None, progress: bool = False):
    """Statistics from pmsolve.stats.collect_stats on ``corpus`` (None: the offline default),
    cached under the pmsolve cache folder. Must run on the unedited model. The forward runs in
    bf16 where bf16 is fast (autocast="auto"): about twice as fast on CPUs with AMX or
    AVX512-BF16, with C close to the fp32 one and the same edit scores (docs/benchmarks.md)."""
    from ..stats import collect_stats

    return collect_stats(model, tokenizer, list(layers), corpus, max_tokens=max_tokens,
                         cache_dir=cache_dir() / "stats", model_id=model_id, progress=progress, autocast="auto")


# ---------------------------------------------------------------------------
# edit
# ---------------------------------------------------------------------------


def _weight(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
        raise InputError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def resolve_key_options(settings, key_source: str | None, start_key: bool | None,
                        preserve_prompts: float | None, preserve_edits: float | None = None) -> KeyOptions:
    """The caller's choices, else the preset method ``settings``' (may be None), else the defaults."""
    def pick(given, name, default):
        return given if given is not None else getattr(settings, name, default) if settings is not None else default

    source = pick(key_source, "key_source", "average")
    if source not in KEY_SOURCES:
        raise InputError(f"key_source must be one of {KEY_SOURCES}, got {source!r}")
    alpha = _weight(pick(preserve_prompts, "preserve_prompts", 0.0), "preserve_prompts")
    beta = _weight(pick(preserve_edits, "preserve_edits", DEFAULT_PRESERVE_EDITS), "preserve_edits")
    return KeyOptions(source, bool(pick(start_key, "start_key", False)), alpha, beta)


def resolve_settings(model, method: str, layers: Sequence[int] | None, distribution, mu, preset, value_config,
             adapter: Adapter, model_id: str | None, start_key: bool | None = None, key_source: str | None = None,
             preserve_prompts: float | None = None, preserve_edits: float | None = None):
    """Layers, distribution, μ, v* settings and key options from the arguments, filling gaps
    from the preset."""
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
    if preset == "auto":
        preset = preset_for(model, model_id)
    elif isinstance(preset, str):
        preset = load_preset(preset)
    settings = preset.for_method(method) if isinstance(preset, Preset) and method in preset.methods else None
    if layers is None:
        if settings is None:
            raise InputError("no preset matches this model: pass layers=[...]")
        layers = settings.layers
    layers = [adapter.check_layer(layer) for layer in layers]
    if distribution is None and settings is not None and len(layers) == len(settings.layers):
        distribution = settings.distribution
    dist = get_distribution(distribution, layers)
    layers = dist.check(layers)
    if mu is None and settings is not None:
        mu = settings.mu
    base = preset.values if isinstance(preset, Preset) else ValueConfig()
    vc = value_config if value_config is not None else base
    if isinstance(vc, Mapping):  # overrides of the preset's settings
        known = [f.name for f in fields(ValueConfig)]
        unknown = sorted(set(vc) - set(known))
        if unknown:
            raise InputError(f"value_config has unknown settings {unknown}; known: {known}")
        vc = replace(base, **vc)
    elif not isinstance(vc, ValueConfig):
        raise InputError(f"value_config must be a ValueConfig or a mapping of its fields, got {type(vc).__name__}")
    return layers, dist, mu, vc, resolve_key_options(settings, key_source, start_key, preserve_prompts,
                                                        preserve_edits)


def _batches(reqs: list[EditRequest], size: int | None) -> list[list[EditRequest]]:
    if size is None:
        return [reqs]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InputError(f"batch_size must be a positive int or None, got {size!r}")
    return [reqs[i : i + size] for i in range(0, len(reqs), size)]


def edit(
    model,
    tokenizer,
    requests: Iterable[Any] | str | os.PathLike[str],
    method: str = "emmet",
    layers: Sequence[int] | None = None,
    distribution: str | Distribution | None = None,
    batch_size: int | None = None,
    stats: Any = "auto",
    mu: float | None = None,
    seed: int = 0,
    *,
    preset: str | Preset | None = "auto",  # "auto": match the model; None: no preset
    value_config: ValueConfig | Mapping[str, Any] | None = None,
    templates: Templates | dict[str, str] | None = None,
    model_id: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    value_cache: MutableMapping[Any, Any] | None = None,
    start_key: bool | None = None,
    key_source: str | None = None,
    preserve_prompts: float | None = None,
    preserve_edits: float | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    document_start: str | None = "auto",
) -> EditResult:
    """Edit ``requests`` into ``model`` in place and return what was done.

    Args:
        requests: dicts / :class:`EditRequest` objects, or a JSON / JSONL file.
        method: "emmet", "memit" or "rome" (the solver); any combines with any distribution.
        layers: layers to edit (default: the model's preset for ``method``).
        distribution: "single", "memit", "balanced" or a :class:`Distribution`.
        batch_size: requests per solve; batches are edited one after another (later
            batches see the earlier edits). None: all at once.
        stats: per layer, the preservation statistics: ``{layer: C}`` with C a tensor,
            a CovarianceAccumulator or a pmsolve.Factor, a callable ``layer -> C``, a
            ``pmsolve.stats.collect_stats`` result, or "auto" (the default: :func:`auto_stats`,
            computed on the offline corpus once per model and layer and cached under the
            pmsolve cache folder; the first edit of a model pays for it).
            The solve runs on the device of these statistics.
        mu: ridge / MEMIT λ (default from the preset, else the solver's default).
        seed: makes the context templates and the v* optimisation reproducible.
        model_id: checked against metadata carried by the statistics.
        progress: called as ``progress(stage, done, total)``.
        value_config: the v* settings: a ValueConfig, or a mapping of some of its fields
            that override the preset's (e.g. ``{"clamp": 0.2}``). None: the preset's.
        value_cache: a dict the caller keeps: v* of facts found in it is not optimised
            again, new ones are added. v* depends only on the fact, the model, the seed and
            the value settings (the batched optimiser is per fact), so one cache serves any
            number of edits of the *same unedited model* (comparing solvers, batch sizes);
            do not carry it across edits that change the model.
        start_key: for requests whose prompt starts with the subject, constrain the bare
            prompt's own key as well as the template average (two columns for that fact,
            same residual). None: the preset's choice for the method, else False (the
            reference implementations' single averaged key). It helps MEMIT; with equality
            solves over several layers it can wreck neighbours, because start-of-sequence
            keys of different subjects are nearly dependent there (docs/benchmarks.md).
        key_source: which keys constrain each fact: "average" (the rewrite-module input at
            the subject's last token averaged over the context templates, as the reference
            implementations do), "prompt" (the rewrite prompt's own key) or "both" (two
            columns, same residual). ``start_key`` applies to "average" only. None: the
            preset's choice, else "average".
        preserve_prompts: α ≥ 0. Adds the batch's own prompts to the preservation term: C
            becomes C + α·mean(k kᵀ) over the rewrite-module inputs at every token after the
            subject in every key prompt of the batch (the relation words), factored per batch
            and layer. An update that satisfies many facts also moves those tokens' outputs,
            which the v* optimisation never saw; with prompt keys, α = 1 keeps large batches
            effective (docs/RESULTS.md, series emmet-pp). None: the preset's choice, else 0 (off).
        preserve_edits: β ≥ 0. With several batches, later batches preserve the keys earlier
            batches constrained: each layer's C becomes C + β·Σ k kᵀ over the keys already
            edited there (β = 1: moving one edited key's output costs as much as the mean
            change over the statistics' tokens). Earlier edits are then less overwritten by
            later ones, with no consistent fluency cost (docs/benchmarks.md, sequential
            edits). The factor is extended (Factor.extend), not recomputed; a
            single batch is unaffected. None: the preset's choice, else
            ``DEFAULT_PRESERVE_EDITS`` (0.1); 0 turns it off.
        checkpoint: a folder where each batch's work is saved when it is done (one file per
            batch, atomically). If it holds batches of this same edit (same unedited weights,
            requests, settings and statistics), they are re-applied and the edit goes on from
            the next one; the result equals an uninterrupted run's bit for bit (timings cover
            this call only). Batches of another edit found there are deleted. The folder is
            left in place: ``pmsolve.editing.checkpoint.clear(folder)`` once the result is saved.

        document_start: the token every prompt starts with while keys, values and statistics
            are computed (pmsolve.models.document_start): "auto" (default) keeps the start the
            tokenizer already prepends (Llama's BOS), else uses <|endoftext|> or the BOS, as
            ``load_model`` and the command line do; None: the tokenizer as given; or a token.
            Tokenizers of GPT-2, Qwen2 and SmolLM2 prepend nothing, so a subject that starts the
            prompt sits at the attention-sink position and its key there is unlike its key
            anywhere else; on SmolLM2 this took EMMET's efficacy from 87.5 % to 100 %
            (bench/RESULTS.md). The caller's tokenizer is not changed (the edit uses a copy
            that carries the start). The token used is ``EditResult.document_start``. The edited
            model answers best when it is prompted the same way: prepend the token yourself
            or call ``pmsolve.models.set_document_start(tokenizer)``.

    Raises:
        InputError, CacheError: bad requests, layers, statistics (before any weight changes).
    """
    clock = StageClock()
    adapter = adapter_for(model, templates)
    reqs = load_requests(requests)
    tokenizer, start = with_document_start(tokenizer, document_start)  # a copy when it must change
    model_id = model_id or getattr(getattr(model, "config", None), "_name_or_path", None)
    layers, dist, mu, vcfg, key_opts = resolve_settings(model, method, layers, distribution, mu, preset,
                                                        value_config, adapter, model_id, start_key, key_source,
                                                        preserve_prompts, preserve_edits)
    batches = _batches(reqs, batch_size)
    if method == "rome" and any(len(b) != 1 for b in batches):
        raise InputError("ROME edits one fact per solve: use batch_size=1 or method='emmet'")
    with clock("stats"):
        if isinstance(stats, str) and stats == "auto":
            stats = auto_stats(model, tokenizer, layers, model_id)
        factors = factor_stats(stats, layers, adapter, model_id)
    prior, key = None, None
    if checkpoint is not None:
        key = resume.config_key(model, reqs, resume.settings_of(method, layers, dist.name, mu, batch_size, seed,
                                                                vcfg, key_opts), factors)
        prior = resume.load(checkpoint, key, adapter.weight(layers[0]).device)
    with clock("keys"):
        ctx = prior.context_templates if prior else context_templates(model, tokenizer, seed=seed)
    originals = WeightSnapshot(model)
    edits: list[LayerEdit] = []
    values: list[dict[str, Any]] = []
    was_training = model.training
    model.eval()
    try:
        preserved = dict(factors)  # per layer: C extended by the keys edited so far (preserve_edits)
        if prior:
            resume.reapply(model, prior.edits, originals)
            edits, values = list(prior.edits), list(prior.values)
            for b in range(prior.batches_done):  # batch by batch, as the run that saved them did
                preserve_edited_keys(preserved, [e for e in edits if e.batch == b], key_opts.preserve_edits)
            if progress:
                progress("resumed", prior.batches_done, len(batches))
        for b, batch in enumerate(batches):
            if prior and b < prior.batches_done:
                continue
            if progress:
                progress("batch", b, len(batches))
            n_values = len(values)
            done = _edit_batch(model, tokenizer, adapter, batch, b, layers, dist, preserved, method, mu, vcfg,
                               ctx, seed, originals, clock, values, progress, value_cache, key_opts)
            edits += done
            if b + 1 < len(batches):
                with clock("solve"):
                    preserve_edited_keys(preserved, done, key_opts.preserve_edits)
            if checkpoint is not None:
                resume.save_batch(checkpoint, key, b, done, values[n_values:], ctx)
    except BaseException:
        originals.restore()
        raise
    finally:
        model.train(was_training)
    fingerprints = {name: {"before": weight_fingerprint(w0),
                           "after": weight_fingerprint(model.get_submodule(name).weight)}
                    for name, w0 in originals.items()}
    return EditResult(model, reqs, method, layers, dist.name, mu, edits, values, clock.t, ctx, originals,
                      {"key_source": key_opts.source, "start_key": key_opts.start_key,
                       "preserve_prompts": key_opts.preserve_prompts, "preserve_edits": key_opts.preserve_edits},
                      asdict(vcfg), fingerprints,
                      sum(len(batch) for batch in batches[: prior.batches_done]) if prior else 0,
                      document_start=start)


# ---------------------------------------------------------------------------
# updates on disk
# ---------------------------------------------------------------------------


def encode_edits(edits: Sequence[LayerEdit], header: dict[str, Any], *, full: bool = False) -> bytes:
    """safetensors bytes: each edit's U and B as "i.U", "i.B"; under header["edits"] its batch,
    layer, module and layout (``full``: also share, residual and diagnostics)."""
    from safetensors.torch import save

    tensors, entries = {}, []
    for i, e in enumerate(edits):
        tensors[f"{i}.U"] = e.update.U.detach().cpu().contiguous()
        tensors[f"{i}.B"] = e.update.B.detach().cpu().contiguous()
        if full and e.keys is not None:
            tensors[f"{i}.K"] = e.keys.detach().cpu().contiguous()
        entry = {"batch": e.batch, "layer": e.layer, "module": e.module, "layout": e.layout}
        if full:
            entry.update(share=e.share, residual_rounded=e.residual_rounded,
                         diagnostics=e.update.diagnostics.as_dict())
        entries.append(entry)
    return save(tensors, metadata={"pmsolve": json.dumps({**header, "edits": entries})})


def save_updates(edits: Sequence[LayerEdit], path: str | os.PathLike[str], meta: dict[str, Any] | None = None) -> None:
    """Write the factored updates (safetensors, atomically: a crash leaves the old file or none)."""
    from .._io import atomic_write

    atomic_write(path, encode_edits(edits, {"format": _UPDATES_FORMAT, **(meta or {})}))


def load_updates(path: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The saved updates in application order: dicts with module, layout, U, B; and the header.

    Raises CacheError for a file that is missing, truncated, not ours, or holds non-finite values.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            header = json.loads((fh.metadata() or {}).get("pmsolve", "{}"))
            if header.get("format") not in _UPDATES_FORMATS_READ:
                raise CacheError(f"{path} is not a pmsolve updates file (format {header.get('format')!r})")
            entries = [{**e, "U": fh.get_tensor(f"{i}.U"), "B": fh.get_tensor(f"{i}.B")}
                       for i, e in enumerate(header["edits"])]
    except CacheError:
        raise
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise CacheError(f"cannot read updates file {path}: {exc}") from None
    for i, e in enumerate(entries):
        for part in ("U", "B"):
            if not bool(torch.isfinite(e[part]).all()):
                raise CacheError(f"updates file {path}: entry {i} ({e['module']}) has NaN/Inf in {part}")
    return entries, header


def apply_updates(model, path: str | os.PathLike[str], *, check: bool = True) -> dict[str, torch.Tensor]:
    """Re-apply saved updates to ``model`` in place (in the order they were made).

    Returns the original weights of the touched modules (to restore them). Before changing
    anything it checks every shape and, with ``check`` (files written since format /2), that
    each touched weight is bit for bit the one the updates were computed on: applying them to
    another checkpoint or dtype, or a second time, raises InputError naming the module.
    ``check=False`` applies them anyway. A failure half-way restores every weight.
    """
    entries, header = load_updates(path)
    targets = []
    for e in entries:
        try:
            w = model.get_submodule(e["module"]).weight
        except AttributeError:
            raise InputError(f"the model has no module {e['module']!r} (updates are for another model)") from None
        shape = (e["U"].shape[0], e["B"].shape[0]) if e["layout"] == "out_in" else (e["B"].shape[0], e["U"].shape[0])
        if tuple(w.shape) != shape:
            raise InputError(f"{e['module']} has shape {tuple(w.shape)}, the saved update is {shape}")
        targets.append((w, e))
    if check:
        _check_base_weights(model, header, path)
    originals = WeightSnapshot(model)
    try:
        for w, e in targets:
            originals.keep(e["module"])
            upd = Update(e["U"], e["B"], diagnostics=None)  # type: ignore[arg-type]
            upd.apply_(w.data, layout=e["layout"])
    except BaseException:
        originals.restore()
        raise
    return originals


def _check_base_weights(model, header: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    weights = header.get("weights")
    if not weights:
        warnings.warn(f"{path} records no weight fingerprints (format {header.get('format')}): "
                      "cannot check that the model is the one the updates were made on", stacklevel=3)
        return
    for module, fp in weights.items():
        now = weight_fingerprint(model.get_submodule(module).weight)
        if now == fp["before"]:
            continue
        if now == fp["after"]:
            raise InputError(f"{module} already carries these updates (its weights equal the edited ones): "
                             "apply them to the unedited model")
        raise InputError(f"{module}'s weights are not the ones these updates were computed on (another "
                         "checkpoint, dtype or device precision, or other edits): pass check=False "
                         "(`pmsolve apply --force`) to apply them anyway")
