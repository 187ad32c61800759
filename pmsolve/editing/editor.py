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
from pathlib import Path
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch

from .._io import content_hash
from ..errors import CacheError, CapacityError, InputError, NumericalError
from ..models.adapters import Adapter, Templates, adapter_for
from ..models.document_start import with_document_start
from ..solver import METHODS, Update
from . import checkpoint as resume
from .distribution import Distribution, get_distribution
from .keys import cache_dir, context_templates
from .preservation import RETENTION, NullSpaceSettings, cached_null_space, dense_C, initial_states
from .presets import DEFAULT_PRESERVE_EDITS, MethodSettings, Preset, load_preset, preset_for
from .requests import EditRequest, load_requests
from .state import STATE_FILE, open_state, save_state, save_state_batch
from .steps import KEY_SOURCES, KeyColumns, KeyOptions, LayerEdit, StageClock, WeightSnapshot, factor_stats
from .steps import edit_batch as _edit_batch  # a module global: tests interrupt an edit between batches
from .steps import restore_weights, weight_fingerprint
from .values import ValueConfig

EDIT_METHODS = (*METHODS, "alphaedit")

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
    retention: str = "soft"
    _restore: Callable[[], None] | None = field(default=None, repr=False)  # an Editor's undo of these batches

    def restore(self) -> None:
        """Put back the weights as they were before this edit, bit for bit (for an
        :class:`Editor`'s call: its undo of these batches, while they are its last)."""
        if self._restore is not None:
            self._restore()
        else:
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
            "retention": self.retention,
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


def _method_settings(preset: Any, method: str) -> MethodSettings | None:
    """The preset's settings for ``method`` (None: no preset, or none for this method)."""
    if not isinstance(preset, Preset):
        return None
    try:
        return preset.for_method(method)
    except InputError:
        return None


def resolve_settings(model, method: str, layers: Sequence[int] | None, distribution, mu, preset, value_config,
             adapter: Adapter, model_id: str | None, start_key: bool | None = None, key_source: str | None = None,
             preserve_prompts: float | None = None, preserve_edits: float | None = None,
             retention: str = "soft"):
    """Layers, distribution, μ, v* settings and key options from the arguments, filling gaps
    from the preset."""
    if method not in EDIT_METHODS:
        raise InputError(f"method must be one of {EDIT_METHODS}, got {method!r}")
    if retention not in RETENTION:
        raise InputError(f"retention must be one of {RETENTION}, got {retention!r}")
    if retention == "hard" and method == "alphaedit":
        raise InputError("alphaedit keeps earlier edits through its own preservation term: retention='hard' "
                         "applies to emmet, memit and rome")
    if retention == "hard" and preserve_prompts:
        raise InputError("retention='hard' does not combine with preserve_prompts (the retained keys' basis "
                         "belongs to C itself)")
    if preset == "auto":
        preset = preset_for(model, model_id)
    elif isinstance(preset, str):
        preset = load_preset(preset)
    settings = _method_settings(preset, method)
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
    if preserve_edits is None and method == "alphaedit" and settings is None:
        preserve_edits = 1.0  # the paper's weight of earlier keys
    opts = resolve_key_options(settings, key_source, start_key, preserve_prompts, preserve_edits)
    if retention == "hard":  # the retained keys are held exactly: nothing to weigh, nothing on top
        opts = replace(opts, preserve_edits=0.0, preserve_prompts=0.0)
    return layers, dist, mu, vc, opts


def _batches(reqs: list[EditRequest], size: int | None) -> list[list[EditRequest]]:
    if size is None:
        return [reqs]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InputError(f"batch_size must be a positive int or None, got {size!r}")
    return [reqs[i : i + size] for i in range(0, len(reqs), size)]


def _null_space_settings(spec: NullSpaceSettings | Mapping[str, Any] | None) -> NullSpaceSettings:
    if spec is None:
        return NullSpaceSettings()
    if isinstance(spec, NullSpaceSettings):
        return spec
    if isinstance(spec, Mapping):
        known = [f.name for f in fields(NullSpaceSettings)]
        unknown = sorted(set(spec) - set(known))
        if unknown:
            raise InputError(f"null_space has unknown settings {unknown}; known: {known}")
        return NullSpaceSettings(**spec)
    raise InputError(f"null_space must be a NullSpaceSettings or a mapping of its fields, got {type(spec).__name__}")


@dataclass
class EditedBatch:
    """One batch an Editor applied: its requests, LayerEdits (with keys), v* records and the
    fingerprint of every edited weight after it (what undo and reopening check against)."""

    requests: list[EditRequest]
    edits: list[LayerEdit]
    values: list[dict[str, Any]]
    after: dict[str, str]


class Editor:
    """A model edited batch after batch, across calls and (with ``state=``) across processes.

    It holds what every later batch needs: per edited layer the factor of the preservation
    statistics, and how earlier edits are kept (``retention`` "soft": β·Σ k kᵀ added to C,
    ``preserve_edits``; "hard": their outputs kept exactly, up to the layer's capacity;
    ``method="alphaedit"``: AlphaEdit's null-space projector with earlier keys accumulated),
    the unedited weights and a log of the batches. ``edit`` appends batches; ``undo(k)`` takes
    the last k back exactly (the unedited weights with the remaining batches re-applied, checked
    against the fingerprints recorded after each batch); ``save(folder)`` / :meth:`open` carry
    it to another process. With ``state=folder`` every finished batch is saved as it ends: a
    killed run reopens with every finished batch, and calling ``edit`` again with the same
    requests goes on from the next batch.

    Arguments are those of :func:`pmsolve.edit` (settings fixed for the editor's life), plus:
        retention: "soft" (default) or "hard".
        null_space: AlphaEdit's projector and ridge, a NullSpaceSettings or a mapping of its
            fields (threshold, relative_to, alpha, c_weight); the eigendecomposition of each layer's C is
            cached under the pmsolve cache folder (and in the state folder).
        state: a folder the editor is saved to after every batch (created; must not already
            hold an editor: reopen one with :meth:`open`).

    Everything that can fail on bad input (settings, statistics, capacity of the first call)
    fails in the constructor or before ``edit`` changes a weight.
    """

    def __init__(self, model, tokenizer, method: str = "emmet", layers: Sequence[int] | None = None,
                 distribution: str | Distribution | None = None, stats: Any = "auto", mu: float | None = None,
                 seed: int = 0, *, retention: str = "soft",
                 null_space: NullSpaceSettings | Mapping[str, Any] | None = None,
                 preset: str | Preset | None = "auto", value_config: ValueConfig | Mapping[str, Any] | None = None,
                 templates: Templates | dict[str, str] | None = None, model_id: str | None = None,
                 start_key: bool | None = None, key_source: str | None = None,
                 preserve_prompts: float | None = None, preserve_edits: float | None = None,
                 document_start: str | None = "auto", state: str | os.PathLike[str] | None = None,
                 _context_templates: Sequence[str] | None = None, _null_spaces: Mapping[int, Any] | None = None):
        self.clock = StageClock()  # the constructor's stats and templates; each edit() call adds its own
        self.model = model
        self.adapter = adapter_for(model, templates)
        self.tokenizer, self.document_start = with_document_start(tokenizer, document_start)
        self.model_id = model_id or getattr(getattr(model, "config", None), "_name_or_path", None)
        self.method, self.retention, self.seed = method, retention, seed
        self.layers, self.dist, self.mu, self.value_config, self.key_options = resolve_settings(
            model, method, layers, distribution, mu, preset, value_config, self.adapter, self.model_id, start_key,
            key_source, preserve_prompts, preserve_edits, retention)
        self.null_space_settings = _null_space_settings(null_space)
        self.state_dir = Path(state) if state is not None else None
        if self.state_dir is not None and (self.state_dir / STATE_FILE).exists():
            raise InputError(f"{self.state_dir} already holds an editor: reopen it with pmsolve.Editor.open")
        with self.clock("stats"):
            if isinstance(stats, str) and stats == "auto":
                stats = auto_stats(model, self.tokenizer, self.layers, self.model_id)
            elif isinstance(stats, (str, os.PathLike)):  # files of `pmsolve stats` or the reference's .npz
                from ..stats import load_stats

                stats = load_stats(stats, model, self.layers)
            self.null_spaces = dict(_null_spaces or {})
            want_ns = method == "alphaedit" and not self.null_spaces

            def null_space_of(layer: int, C: Any) -> None:
                if want_ns:
                    self.null_spaces[layer] = cached_null_space(dense_C(C), self.null_space_settings, layer,
                                                                cache_dir() / "nullspace")

            self.factors = factor_stats(stats, self.layers, self.adapter, self.model_id, on_matrix=null_space_of)
            self._initial = initial_states(method, retention, self.factors, beta=self.key_options.preserve_edits,
                                           null_spaces=self.null_spaces, alpha=self.null_space_settings.alpha,
                                           c_weight=self.null_space_settings.c_weight)
        self.states = dict(self._initial)
        self._folded = 0  # batches whose keys are in self.states
        # later batches depend on earlier keys unless retention is soft with β = 0 (the plain PM family)
        self._needs_keys = method == "alphaedit" or retention == "hard" or self.key_options.preserve_edits > 0
        with self.clock("keys"):
            self.context_templates = (list(_context_templates) if _context_templates is not None
                                      else context_templates(model, self.tokenizer, seed=seed))
        self.originals = WeightSnapshot.of_layers(model, self.adapter, self.layers)
        self.base = {name: weight_fingerprint(w) for name, w in self.originals.items()}
        self.batches: list[EditedBatch] = []
        self._call: dict[str, Any] | None = None  # the edit() call in progress, for resuming it
        if self.state_dir is not None:
            self.save(self.state_dir)

    # -- what it holds -------------------------------------------------------------------

    @property
    def batches_done(self) -> int:
        return len(self.batches)

    @property
    def requests(self) -> list[EditRequest]:
        """Every request edited so far, in order."""
        return [r for bt in self.batches for r in bt.requests]

    @property
    def edits(self) -> list[LayerEdit]:
        return [e for bt in self.batches for e in bt.edits]

    def summary(self) -> dict[str, Any]:
        """Settings, batches and requests so far, and each layer's preservation state (capacity
        left under hard retention, null-space dimension and cut for alphaedit)."""
        self._fold()
        return {"method": self.method, "retention": self.retention, "layers": self.layers,
                "distribution": self.dist.name, "mu": self.mu, "batches": self.batches_done,
                "requests": sum(len(bt.requests) for bt in self.batches), "document_start": self.document_start,
                "key_options": asdict(self.key_options),
                "layer_states": {str(layer): st.summary() for layer, st in self.states.items()}}

    def _settings(self) -> dict[str, Any]:
        """Everything that decides how a batch is edited (the state file's "settings")."""
        return {"method": self.method, "retention": self.retention, "layers": self.layers,
                "distribution": self.dist.name, "mu": self.mu, "seed": self.seed,
                "value_config": asdict(self.value_config), "key_options": asdict(self.key_options),
                "null_space": asdict(self.null_space_settings), "document_start": self.document_start,
                "model_id": self.model_id}

    def _fold(self) -> None:
        """Bring the per-layer states up to date with the batches applied (deferred to when a
        batch or a summary needs them: an edit's last batch, or one undone, costs nothing)."""
        for bt in self.batches[self._folded:]:
            for e in bt.edits:
                if e.keys is None:
                    if self._needs_keys:
                        raise CacheError(f"batch {e.batch} at layer {e.layer} kept no keys: cannot continue from it")
                    continue
                self.states[e.layer] = self.states[e.layer].after(e.keys)
        self._folded = len(self.batches)

    def _check_capacity(self, batches: Sequence[Sequence[EditRequest]]) -> None:
        """Under hard retention, refuse before any weight changes a call whose batches cannot all
        find a layer with room, counting each batch's columns against every layer it could use
        (an upper bound on the rank it adds: dependent keys add less)."""
        if self.retention != "hard":
            return
        self._fold()
        room = {layer: st.capacity() for layer, st in self.states.items()}
        for i, batch in enumerate(batches):
            cols = KeyColumns.choose(self.key_options.source, self.key_options.start_key, batch).count(len(batch))
            fit = [layer for layer in self.layers if room[layer] >= cols]
            if not fit:
                raise CapacityError(
                    f"hard retention past capacity: batch {self.batches_done + i} ({len(batch)} requests, {cols} key "
                    f"columns) would find no edited layer with room; capacity left per layer before it: {room} "
                    f"(d_in = {self.adapter.d_in}). Edit more layers, use smaller batches, or soft retention / "
                    "alphaedit", required=cols, available=max(room.values()))
            for layer in fit:
                room[layer] -= cols

    # -- editing -------------------------------------------------------------------------

    def edit(self, requests: Iterable[Any] | str | os.PathLike[str], batch_size: int | None = None, *,
             progress: Callable[[str, int, int], None] | None = None,
             value_cache: MutableMapping[Any, Any] | None = None,
             checkpoint: str | os.PathLike[str] | None = None) -> EditResult:
        """Edit ``requests`` into the model after the batches already there, ``batch_size`` per
        solve (None: one batch), each on the model as the earlier ones left it (v* included).

        On an exception, the batch in progress is undone and the finished ones stay (also in
        the state folder); with ``state=``, the same call again goes on from the next batch.
        The result's ``restore()`` undoes this call's batches (while they are the last ones)."""
        reqs = load_requests(requests)
        batches = _batches(reqs, batch_size)
        if self.method == "rome" and any(len(b) != 1 for b in batches):
            raise InputError("ROME edits one fact per solve: use batch_size=1 or method='emmet'")
        call = {"requests": content_hash([r.as_dict() for r in reqs], 32), "batch_size": batch_size}
        skip = 0
        if self._call is not None and {k: self._call[k] for k in call} == call:
            skip = self.batches_done - self._call["start"]  # an interrupted call, asked again: go on
        elif self._call is not None:
            warnings.warn(f"an interrupted edit left {self.batches_done - self._call['start']} of its batches in this "
                          "editor; these requests are different, so they are added after them", stacklevel=2)
        self._check_capacity(batches[skip:])
        self._call = {**call, "start": self.batches_done - skip}
        return self._run(reqs, batches, skip, progress, value_cache, checkpoint, batch_size, keep_finished=True)

    def _checkpoint_extra(self) -> dict[str, Any]:
        """Settings beyond the plain edit's that decide a checkpoint's batches (absent when at
        their defaults, so that checkpoints written before they existed still match)."""
        extra: dict[str, Any] = {}
        if self.retention != "soft":
            extra["retention"] = self.retention
        if self.method == "alphaedit":
            extra["null_space"] = asdict(self.null_space_settings)
        if self.batches:
            extra["after"] = self.batches[-1].after  # an Editor's later call: the model it starts from
        return extra

    def _run(self, reqs: list[EditRequest], batches: list[list[EditRequest]], skip: int, progress, value_cache,
             checkpoint, batch_size: int | None, *, keep_finished: bool) -> EditResult:
        clock = StageClock()
        if not self.batches and skip == 0:
            clock.t.update({k: v for k, v in self.clock.t.items() if v})  # the first call pays for stats
        prior, key, start = None, None, self.batches_done - skip
        if checkpoint is not None:
            key = resume.config_key(self.model, reqs, resume.settings_of(
                self.method, self.layers, self.dist.name, self.mu, batch_size, self.seed, self.value_config,
                self.key_options) | self._checkpoint_extra(), self.factors)
            prior = resume.load(checkpoint, key, self.adapter.weight(self.layers[0]).device)
        before = WeightSnapshot(self.model)
        was_training = self.model.training
        self.model.eval()
        try:
            if prior and prior.batches_done > skip:
                self._reapply_checkpoint(prior, batches, start, skip, before)
                skip = prior.batches_done
            if progress and skip:
                progress("resumed", skip, len(batches))
            for b in range(skip, len(batches)):
                if progress:
                    progress("batch", b, len(batches))
                self._edit_one(batches[b], clock, progress, value_cache, before)
                if checkpoint is not None:
                    bt = self.batches[-1]
                    resume.save_batch(checkpoint, key, b, bt.edits, bt.values, self.context_templates)
        except BaseException:
            if not keep_finished:
                del self.batches[start:]
                self._folded = min(self._folded, start)
                before.restore()
            raise
        finally:
            self.model.train(was_training)
        self._call = None
        if self.state_dir is not None:
            self.save(self.state_dir)
        mine = self.batches[start:]
        names = sorted({e.module for bt in mine for e in bt.edits})
        fingerprints = {n: {"before": weight_fingerprint(before[n]) if n in before else mine[-1].after[n],
                            "after": mine[-1].after[n]} for n in names} if mine else {}
        n_batches = len(mine)
        return EditResult(self.model, reqs, self.method, self.layers, self.dist.name, self.mu,
                          [e for bt in mine for e in bt.edits], [v for bt in mine for v in bt.values], clock.t,
                          self.context_templates, before,
                          {"key_source": self.key_options.source, "start_key": self.key_options.start_key,
                           "preserve_prompts": self.key_options.preserve_prompts,
                           "preserve_edits": self.key_options.preserve_edits},
                          asdict(self.value_config), fingerprints, sum(len(b) for b in batches[:skip]),
                          document_start=self.document_start, retention=self.retention,
                          _restore=(lambda: self._undo_call(start, n_batches)) if keep_finished else None)

    def _edit_one(self, batch: list[EditRequest], clock: StageClock, progress, value_cache,
                  before: WeightSnapshot) -> None:
        """One batch: solved against the up-to-date states, applied, logged (and saved). On an
        exception the batch's own weight changes are undone."""
        with clock("solve"):
            self._fold()
        snap = WeightSnapshot(self.model)
        values: list[dict[str, Any]] = []
        try:
            done = _edit_batch(self.model, self.tokenizer, self.adapter, batch, self.batches_done, self.layers,
                               self.dist, self.states, self.method, self.mu, self.value_config,
                               self.context_templates, self.seed, snap, clock, values, progress, value_cache,
                               self.key_options, keep_keys=self._needs_keys)
        except BaseException:
            snap.restore()
            raise
        for name, w in snap.items():
            before.setdefault(name, w)  # its weight as this call found it
        after = {name: weight_fingerprint(self.model.get_submodule(name).weight) for name in self.originals}
        self.batches.append(EditedBatch(list(batch), done, values, after))
        if self.state_dir is not None:
            save_state_batch(self.state_dir, self, self.batches_done - 1)
            self.save(self.state_dir)

    def _reapply_checkpoint(self, prior, batches, start: int, skip: int, before: WeightSnapshot) -> None:
        """Put back the batches an interrupted edit(checkpoint=...) saved (those not already here)."""
        by_batch: dict[int, list[LayerEdit]] = {}
        for e in prior.edits:
            by_batch.setdefault(e.batch, []).append(e)
        for b, edits in sorted(by_batch.items())[skip:prior.batches_done]:
            resume.reapply(self.model, edits, before)
            values = [v for v in prior.values if v["batch"] == b]
            after = {name: weight_fingerprint(self.model.get_submodule(name).weight) for name in self.originals}
            self.batches.append(EditedBatch(list(batches[len(self.batches) - start]), edits, values, after))

    # -- undo ----------------------------------------------------------------------------

    def undo(self, k: int = 1) -> None:
        """Take the last ``k`` batches back exactly: the unedited weights with the remaining
        batches re-applied in order (the same arithmetic as when they were made), checked bit
        for bit against the fingerprints recorded after the batch that is now the last; the
        per-layer states are rebuilt from the remaining batches' keys."""
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= self.batches_done:
            raise InputError(f"undo takes 0 to {self.batches_done} batches (the batches done), got {k!r}")
        if k == 0:
            return
        self._rebuild(self.batches[: self.batches_done - k])

    def _rebuild(self, keep: list[EditedBatch]) -> None:
        """The unedited weights with ``keep`` applied in order, checked against the fingerprints
        recorded after the last of them; states rebuilt lazily from their keys."""
        self.originals.restore()
        with torch.no_grad():
            for bt in keep:
                for e in bt.edits:
                    e.update.apply_(self.model.get_submodule(e.module).weight.data, layout=e.layout)
        expected = keep[-1].after if keep else self.base
        now = {name: weight_fingerprint(self.model.get_submodule(name).weight) for name in expected}
        bad = sorted(n for n in expected if now[n] != expected[n])
        if bad:  # cannot happen with deterministic kernels; never leave a silently different model
            self.originals.restore()
            self.batches, self.states, self._folded = [], dict(self._initial), 0
            raise NumericalError(f"re-applying {len(keep)} batches gave other weights at {bad} than those recorded "
                                 "after them (non-deterministic kernels?): the model is back to its unedited "
                                 "weights and the editor is empty")
        self.batches = list(keep)
        self.states, self._folded = dict(self._initial), 0
        self._call = None
        if self.state_dir is not None:
            self.save(self.state_dir)

    def restore(self) -> None:
        """Every batch taken back: the unedited weights, bit for bit."""
        self.undo(self.batches_done)

    def _undo_call(self, start: int, n: int) -> None:
        if self.batches_done != start + n:
            raise InputError(f"these {n} batches are no longer the editor's last ones (it holds {self.batches_done}, "
                             f"they are {start}..{start + n - 1}): use Editor.undo")
        self.undo(n)

    # -- persistence ---------------------------------------------------------------------

    def save(self, folder: str | os.PathLike[str]) -> None:
        """Write the editor to ``folder``: the unedited weights, one file per batch (updates, keys,
        requests, v* records), AlphaEdit's null spaces, and ``editor.json`` (settings, log,
        fingerprints) written last, atomically; batch files it no longer lists are removed."""
        save_state(Path(folder), self)

    @classmethod
    def open(cls, folder: str | os.PathLike[str], model, tokenizer, stats: Any = "auto", *,
             templates: Templates | dict[str, str] | None = None, keep_saving: bool = True) -> Editor:
        """The editor saved in ``folder``, on ``model``: either the unedited model it was made on
        (its batches are re-applied) or the model as the editor left it. The statistics must be
        the ones it was made with (checked per layer). ``keep_saving``: go on saving every batch
        to ``folder``.

        Raises CacheError for a folder of another model, layer set or statistics, a model whose
        edited weights are neither of those two, or damaged files; nothing is changed then."""
        return open_state(cls, Path(folder), model, tokenizer, stats, templates=templates, keep_saving=keep_saving)


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
    retention: str = "soft",
    null_space: NullSpaceSettings | Mapping[str, Any] | None = None,
) -> EditResult:
    """Edit ``requests`` into ``model`` in place and return what was done.

    Args:
        requests: dicts / :class:`EditRequest` objects, or a JSON / JSONL file.
        method: "emmet", "memit", "rome" or "alphaedit" (the solver); any combines with any
            distribution. "alphaedit" (AlphaEdit's null-space projected update, pmsolve.lifelong)
            takes the preset's MEMIT layers, keys and spread unless the preset has its own; its
            μ weighs preservation against memorisation (default 1, the paper's closed form) and
            ``preserve_edits`` is the weight of earlier batches' keys (default 1, the paper's).
        layers: layers to edit (default: the model's preset for ``method``).
        distribution: "single", "memit", "balanced" or a :class:`Distribution`.
        batch_size: requests per solve; batches are edited one after another (later
            batches see the earlier edits). None: all at once.
        stats: per layer, the preservation statistics: ``{layer: C}`` with C a tensor,
            a CovarianceAccumulator or a pmsolve.Factor, a callable ``layer -> C``, a
            ``pmsolve.stats.collect_stats`` result, a path (a folder or file of `pmsolve stats`
            output or the reference's ``layer_stats`` .npz files, read by
            :func:`pmsolve.stats.load_stats`), or "auto" (the default: :func:`auto_stats`,
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
            (docs/design.md §7). The caller's tokenizer is not changed (the edit uses a copy
            that carries the start). The token used is ``EditResult.document_start``. The edited
            model answers best when it is prompted the same way: prepend the token yourself
            or call ``pmsolve.models.set_document_start(tokenizer)``.

        retention: how later batches treat the keys earlier batches edited: "soft" (the
            default: ``preserve_edits``) or "hard" (their outputs kept exactly; a layer holds at
            most d_in independent keys and sits out batches it has no room for; see
            :class:`Editor`). Not with alphaedit, which has its own preservation of earlier keys.
        null_space: AlphaEdit's settings (NullSpaceSettings or a mapping: threshold,
            relative_to, alpha, c_weight); the eigendecomposition of C is cached per layer.

    To edit a model again and again across calls or processes, with undo, use
    :class:`Editor` (this function is one Editor's single call, undone as a whole on error).

    Raises:
        InputError, CacheError: bad requests, layers, statistics (before any weight changes).
        CapacityError: hard retention past the layers' capacity (before any weight changes).
    """
    reqs = load_requests(requests)
    batches = _batches(reqs, batch_size)
    if method == "rome" and any(len(b) != 1 for b in batches):
        raise InputError("ROME edits one fact per solve: use batch_size=1 or method='emmet'")
    ed = Editor(model, tokenizer, method, layers, distribution, stats, mu, seed, retention=retention,
                null_space=null_space, preset=preset, value_config=value_config, templates=templates,
                model_id=model_id, start_key=start_key, key_source=key_source, preserve_prompts=preserve_prompts,
                preserve_edits=preserve_edits, document_start=document_start)
    ed._check_capacity(batches)
    return ed._run(reqs, batches, 0, progress, value_cache, checkpoint, batch_size, keep_finished=False)


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
