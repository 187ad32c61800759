"""collect_stats: preservation statistics of real models, in one pass for many layers.

For every requested layer, the input of the rewrite module (the MLP output
projection) is captured by a forward pre-hook, padding is dropped with the
attention mask, and the rows go into a :class:`CovarianceAccumulator`. The
forward pass is cut short after the deepest requested layer. Progress is
checkpointed (accumulator states and corpus position in one atomic file), so a
killed run resumes with no token lost or counted twice; finished statistics are
cached with metadata that is verified on load.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CacheError, InputError, NumericalError
from ..models.adapters import KNOWN as _ARCHITECTURES
from ..models.document_start import document_start_tag
from ..models.precision import AUTOCAST_DTYPES, resolve_autocast
from .accumulator import CovarianceAccumulator
from .corpus import Corpus, open_corpus, shard
from .io import atomic_write, check_metadata, decode_states, encode_states

_CACHE_FORMAT_FIELDS = ("model_id", "weights_fingerprint", "corpus_id", "dtype", "centered", "max_tokens", "seq_len")


class _StopForward(Exception):
    """Raised by the deepest layer's hook: nothing after it is needed."""


@dataclass
class CollectResult:
    """What :func:`collect_stats` computed and how long it took.

    stats: layer -> accumulator (C = stats[l].mean()); modules: layer -> module name;
    paths: layer -> cache file (when cache_dir was given); tokens: rows per layer;
    seconds: the whole pass; seconds_forward: in the model, hooks excluded; seconds_accumulate: in the
    hooks (masking, finiteness check, accumulation); the rest is tokenisation, batching, checkpoints;
    convergence: per checkpoint interval, the relative Frobenius change of each layer's C
    (and its condition estimate with report_condition=True).
    """

    stats: dict[int, CovarianceAccumulator]
    modules: dict[int, str]
    paths: dict[int, Path] = field(default_factory=dict)
    tokens: int = 0
    from_cache: bool = False
    stopped_early: bool = False
    seconds: float = 0.0
    seconds_forward: float = 0.0
    seconds_accumulate: float = 0.0
    convergence: list[dict[str, Any]] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")


# ---------------------------------------------------------------------------
# identity: module names, fingerprint, cache paths
# ---------------------------------------------------------------------------


def rewrite_template(model: torch.nn.Module, module_template: str | None = None) -> str:
    if module_template is not None:
        if "{}" not in module_template:
            raise InputError(f"module_template must contain '{{}}' for the layer index, got {module_template!r}")
        return module_template
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _ARCHITECTURES:
        raise InputError(
            f"no known rewrite module for model_type {model_type!r}; pass module_template, "
            f"e.g. 'model.layers.{{}}.mlp.down_proj' (known: {sorted(_ARCHITECTURES)})"
        )
    return _ARCHITECTURES[model_type].rewrite


def rewrite_modules(model: torch.nn.Module, layers: list[int], module_template: str | None = None) -> dict[int, str]:
    """layer -> rewrite module name, each checked to exist in ``model`` (InputError naming the layer)."""
    template = rewrite_template(model, module_template)
    modules = {layer: template.format(layer) for layer in layers}
    for layer, name in modules.items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise InputError(f"layer {layer}: the model has no module {name!r}") from None
    return modules


def weights_fingerprint(model: torch.nn.Module, samples: int = 4096) -> str:
    """Hash of every parameter's name, shape, dtype and ``samples`` evenly strided values.

    Any dense change of a weight (an edit, other weights, another dtype) changes it; reading
    a strided sample keeps it cheap for large models.
    """
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        sub = flat[:: max(1, flat.numel() // samples)][:samples].to("cpu").contiguous()
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(sub.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


def _slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")
    return s if len(s) <= 80 else s[:60] + "_" + hashlib.sha256(text.encode()).hexdigest()[:12]


def _model_id(model: torch.nn.Module, model_id: str | None) -> str:
    return model_id or getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__


# ---------------------------------------------------------------------------
# batching
# ---------------------------------------------------------------------------


def _token_lists(tokenizer: Any, texts: Iterator[str], seq_len: int) -> Iterator[list[int]]:
    for text in texts:
        yield list(tokenizer(text, truncation=True, max_length=seq_len)["input_ids"])


# Documents are sorted by length within pools of this many batches' tokens (fewer when
# checkpoints are more frequent, never less than one batch): long enough for well-filled
# batches, short enough that a checkpoint, which waits for the end of a pool, comes about
# when it is due.
_POOL_BATCHES = 16


def _batches(docs: Iterator[list[int]], batch_tokens: int, pool_tokens: int) -> Iterator[tuple[list[list[int]], int]]:
    """(documents, texts consumed). Documents are read in pools of about ``pool_tokens`` tokens;
    each pool is sorted by length and cut into batches of at most ``batch_tokens`` tokens once
    padded, so batches carry little padding (in order, the offline corpus at seq_len 512 ran
    2.3 padded tokens per real one through the model; docs/history.md §3). A pool's texts count
    as consumed on its last batch (0 before): the resume position, and so every checkpoint,
    falls on a pool boundary, and a resumed run forms the same pools as an uninterrupted one.
    Texts that tokenise to nothing are consumed but not batched."""
    pool: list[list[int]] = []
    size = consumed = 0
    for ids in docs:
        consumed += 1
        if ids:
            pool.append(ids)
            size += len(ids)
        if size >= pool_tokens:
            yield from _pool_batches(pool, consumed, batch_tokens)
            pool, size, consumed = [], 0, 0
    yield from _pool_batches(pool, consumed, batch_tokens)


def _pool_batches(pool: list[list[int]], consumed: int, batch_tokens: int) -> Iterator[tuple[list[list[int]], int]]:
    batches: list[list[list[int]]] = []
    for ids in sorted(pool, key=len, reverse=True):  # stable: ties keep corpus order
        if batches and (len(batches[-1]) + 1) * len(batches[-1][0]) <= batch_tokens:
            batches[-1].append(ids)  # the batch's first document is its longest
        else:
            batches.append([ids])
    for i, batch in enumerate(batches):
        yield batch, consumed if i == len(batches) - 1 else 0


def _enough(batch: list[list[int]], need: int) -> list[list[int]]:
    """The batch's first documents holding >= need tokens: the run's last forward pass
    computes only what it keeps."""
    total = 0
    for i, ids in enumerate(batch):
        total += len(ids)
        if total >= need:
            return batch[: i + 1]
    return batch


def _pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ids in enumerate(batch):  # right padding: real tokens never attend to pads
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
    return input_ids, mask


def _select_first(mask: torch.Tensor, n: int) -> torch.Tensor:
    """The mask restricted to its first n real tokens (row-major), to stop at exactly max_tokens."""
    flat = mask.reshape(-1).bool()
    keep = flat & (torch.cumsum(flat.long(), 0) <= n)
    return keep.reshape(mask.shape)


# ---------------------------------------------------------------------------
# hooks
# ---------------------------------------------------------------------------


class _Capture:
    """Forward pre-hooks feeding each rewrite module's input (real tokens only) to its accumulator."""

    def __init__(self, model: torch.nn.Module, modules: dict[int, str], accs: dict[int, CovarianceAccumulator]):
        self.modules, self.accs = modules, accs
        self.deepest = max(modules)
        self.select: torch.Tensor | None = None
        self.batch_index = 0
        self.seconds = 0.0
        self.handles = [
            model.get_submodule(name).register_forward_pre_hook(self._hook_for(layer)) for layer, name in modules.items()
        ]

    def _hook_for(self, layer: int):  # type: ignore[no-untyped-def]
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            t0 = time.perf_counter()
            x = args[0]
            if x.shape[:-1] != self.select.shape:
                raise InputError(
                    f"{self.modules[layer]} received input of shape {tuple(x.shape)}; expected "
                    f"[batch, seq, d] matching the attention mask {tuple(self.select.shape)}"
                )
            try:  # the accumulator checks finiteness before adding anything
                self.accs[layer].update(x[self.select.to(x.device)])
            except InputError as exc:
                where = f"at layer {layer} ({self.modules[layer]}) in batch {self.batch_index}: {exc}"
                if "NaN or Inf" in str(exc):
                    raise NumericalError(f"non-finite activation (NaN/Inf) {where}; the model overflows on this "
                                         "text (try a wider dtype)") from None
                if "too large for fp32" in str(exc):
                    raise NumericalError(f"activations too large for fp32 products {where}") from None
                raise
            self.seconds += time.perf_counter() - t0
            if layer == self.deepest:
                raise _StopForward

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------------------
# checkpoints and cache
# ---------------------------------------------------------------------------


@dataclass
class _Run:
    """Everything one rank needs to collect, checkpoint and resume."""

    identity: dict[str, Any]
    modules: dict[int, str]
    accs: dict[int, CovarianceAccumulator]
    checkpoint: Path | None
    position: int = 0  # documents of this rank's shard already consumed
    tokens: int = 0
    batches: int = 0

    def save_checkpoint(self) -> None:
        if self.checkpoint is None:
            return
        meta = {**self.identity, "layers": sorted(self.modules), "position": self.position, "tokens": self.tokens,
                "batches": self.batches}
        states = {f"{layer}.": acc.state_dict() for layer, acc in self.accs.items()}
        atomic_write(self.checkpoint, encode_states(states, meta))

    def try_resume(self) -> bool:
        if self.checkpoint is None or not self.checkpoint.exists():
            return False
        states, meta = decode_states(self.checkpoint)
        check_metadata(self.checkpoint, meta, {**self.identity, "layers": sorted(self.modules)})
        for layer, acc in self.accs.items():
            acc.load_state_dict(states[f"{layer}."])
        self.position, self.tokens, self.batches = int(meta["position"]), int(meta["tokens"]), int(meta["batches"])
        if any(acc.count != self.tokens for acc in self.accs.values()):
            raise CacheError(f"checkpoint {self.checkpoint} is inconsistent: layer counts differ from its token count")
        return True


def _cache_identity(common: dict[str, Any], layer: int, module: str) -> dict[str, Any]:
    return {**common, "layer": layer, "module": module}


def _load_cached(path: Path, identity: dict[str, Any], backend: str) -> CovarianceAccumulator:
    acc, meta = CovarianceAccumulator.load_with_metadata(path, expect=identity, backend=backend)
    # "autocast" is in the identity only when set (older files lack it): check its absence too.
    if meta.get("autocast") != identity.get("autocast"):
        raise CacheError(f"statistics file {path} does not match this request: autocast is {meta.get('autocast')!r} "
                         f"in the file, expected {identity.get('autocast')!r}; delete the file or point cache_dir "
                         "elsewhere to recompute")
    return acc


# ---------------------------------------------------------------------------
# distributed
# ---------------------------------------------------------------------------


def _dist() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _reduce_across_ranks(accs: dict[int, CovarianceAccumulator], device: torch.device) -> None:
    """Every rank ends with the sum of all ranks' statistics (fp64 all_reduce; all_gather + Chan when centred)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    for acc in accs.values():
        st = acc.state_dict()
        count = torch.tensor([float(st["count"])], dtype=torch.float64, device=device)
        if not acc.centered:
            total = st["sum"].to(device)
            dist.all_reduce(total)
            dist.all_reduce(count)
            acc.load_state_dict({**st, "count": int(count.item()), "sum": total.cpu()})
            continue
        parts = {k: [torch.empty_like(st[k].to(device)) for _ in range(world)] for k in ("mean", "m2")}
        counts = [torch.empty_like(count) for _ in range(world)]
        for k in parts:
            dist.all_gather(parts[k], st[k].to(device))
        dist.all_gather(counts, count)
        merged = CovarianceAccumulator(acc.d, dtype_products=acc.dtype_products, centered=True, backend="torch")
        for r in range(world):  # the same order on every rank: identical results everywhere
            part = CovarianceAccumulator(acc.d, dtype_products=acc.dtype_products, centered=True, backend="torch")
            part.load_state_dict({**st, "count": int(counts[r].item()), "mean": parts["mean"][r].cpu(),
                                  "m2": parts["m2"][r].cpu()})
            merged.merge(part)
        acc.load_state_dict(merged.state_dict())


# ---------------------------------------------------------------------------
# the pass
# ---------------------------------------------------------------------------


def _relative_changes(accs: dict[int, CovarianceAccumulator], previous: dict[int, torch.Tensor]) -> dict[int, float]:
    changes = {}
    for layer, acc in accs.items():
        C = acc.mean()
        if layer in previous:
            changes[layer] = float(torch.linalg.matrix_norm(C - previous[layer]) / torch.linalg.matrix_norm(C))
        previous[layer] = C
    return changes


def _condition_estimates(previous: dict[int, torch.Tensor]) -> dict[int, float]:
    """1-norm condition estimate of each C's Cholesky factor (as the solver would factor it; O(d³))."""
    from ..errors import NotPositiveDefiniteError, NumericalWarning
    from ..solver import factorize

    conds = {}
    for layer, C in previous.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NumericalWarning)  # early C is often singular: δ is expected
            try:
                conds[layer] = factorize(C).cond
            except NotPositiveDefiniteError:
                conds[layer] = float("inf")
    return conds


def _run_pass(model, tokenizer, corpus: Corpus, run: _Run, cap: int, rank: int, world: int, *, seq_len: int,
              batch_tokens: int, checkpoint_every: int, stop_tol: float | None, report_condition: bool,
              progress: bool, result: CollectResult) -> None:
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    texts = shard(corpus.texts(), rank, world)
    for _ in range(run.position):  # resume: skip what the checkpoint already holds
        next(texts, None)
    capture = _Capture(model, run.modules, run.accs)
    previous: dict[int, torch.Tensor] = {}
    since_checkpoint = 0
    in_model = 0.0  # forward pass including the hooks
    bar = tqdm(total=cap, initial=run.tokens, unit="tok", desc="covariance", disable=not progress or rank != 0)
    t_start = time.perf_counter()
    try:
        pool_tokens = max(batch_tokens, min(checkpoint_every, _POOL_BATCHES * batch_tokens))
        for batch, consumed in _batches(_token_lists(tokenizer, texts, seq_len), batch_tokens, pool_tokens):
            input_ids, mask = _pad(_enough(batch, cap - run.tokens), pad_id)
            select = _select_first(mask, cap - run.tokens)
            capture.select, capture.batch_index = select, run.batches
            t0 = time.perf_counter()
            try:
                model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False)
            except _StopForward:
                pass
            in_model += time.perf_counter() - t0
            n = int(select.sum())
            run.tokens += n
            run.position += consumed
            run.batches += 1
            since_checkpoint += n
            bar.update(n)
            if run.tokens >= cap:
                break
            if consumed and since_checkpoint >= checkpoint_every:  # only on a pool boundary
                since_checkpoint = 0
                run.save_checkpoint()
                changes = _relative_changes(run.accs, previous)
                if changes:
                    report: dict[str, Any] = {"tokens": run.tokens, "rel_change": changes}
                    if report_condition:
                        report["cond"] = _condition_estimates(previous)
                    result.convergence.append(report)
                    bar.set_postfix(dC=f"{max(changes.values()):.1e}")
                    if stop_tol is not None and max(changes.values()) < stop_tol:
                        result.stopped_early = True
                        break
    finally:
        capture.remove()
        bar.close()
    result.seconds = time.perf_counter() - t_start
    result.seconds_accumulate = capture.seconds
    result.seconds_forward = in_model - capture.seconds


def collect_stats(
    model: torch.nn.Module,
    tokenizer: Any,
    layers: int | list[int],
    corpus: str | Corpus | None = None,
    *,
    max_tokens: int = 100_000,
    batch_tokens: int = 4096,
    seq_len: int = 512,
    dtype: str = "fp32",
    cache_dir: str | Path | None = None,
    resume: bool = True,
    checkpoint_every: int = 200_000,
    progress: bool = True,
    module_template: str | None = None,
    model_id: str | None = None,
    fingerprint: str | None = None,
    centered: bool = False,
    stop_tol: float | None = None,
    report_condition: bool = False,
    backend: str = "auto",
    autocast: str | None = None,
) -> CollectResult:
    """Second moments C = E[k kᵀ] of the rewrite-module inputs of ``layers``, in one pass.

    Args:
        model, tokenizer: a Hugging Face causal LM and its tokenizer.
        layers: layer indices (one pass for all; the forward stops after the deepest).
        corpus: see :func:`pmsolve.stats.corpus.open_corpus` (None: the offline default).
        max_tokens: real (unpadded) tokens per layer, split over data-parallel ranks.
        batch_tokens: padded tokens per forward batch; seq_len: truncation length per document.
            Documents are sorted by length within pools of up to 16 batches' tokens (down to
            one batch when ``checkpoint_every`` is smaller), so that little of a batch is padding.
        dtype: product precision, "fp32" or "fp64" (the master sum is always fp64).
        cache_dir: where finished statistics and checkpoints live (None: no caching).
        resume: continue from a checkpoint in cache_dir when there is one.
        checkpoint_every: tokens (per rank) between checkpoints and convergence reports.
        module_template: rewrite module name with "{}" for the layer; default by model_type.
        model_id: name recorded in the cache (default: config._name_or_path).
        fingerprint: weights fingerprint to record/verify instead of hashing the weights (e.g. the
            unedited model's, when statistics are requested after some layers were edited).
        centered: also collect the mean and centred M2.
        stop_tol: stop once every layer's C changed by less than this (relative, Frobenius)
            over one checkpoint interval.
        report_condition: also record each layer's condition estimate of C (a Cholesky
            factorisation per layer and checkpoint: O(d³), cheap at d ≈ 1.5k, seconds at 10k+).
        autocast: None (the model's own precision), "bf16" or "fp16": the forward runs under
            torch.autocast in that dtype, so the captured keys are bf16/fp16 and their products
            take a bf16 kernel (AMX or AVX512-BF16) where the CPU has one. Several times faster on CPUs with fast
            bf16 (measured: docs/benchmarks.md) at a small change of C; recorded in
            the cache's identity and file name, so the two kinds of statistics never mix.
            "auto": "bf16" where bf16 matmuls are fast (CPUs with AMX or AVX512-BF16, CUDA with
            bf16), else None.

    Returns:
        A :class:`CollectResult`. Under torch.distributed every rank returns the summed
        statistics; rank 0 writes the cache.

    Raises:
        CacheError: a cache or checkpoint file is unreadable or belongs to another request.
        NumericalError: a captured activation is NaN/Inf (names the layer and batch).
    """
    layer_list = sorted({layers} if isinstance(layers, int) else set(layers))
    if not layer_list or any(not isinstance(l, int) or l < 0 for l in layer_list):
        raise InputError(f"layers must be non-negative ints, got {layers!r}")
    for name, v in (("max_tokens", max_tokens), ("batch_tokens", batch_tokens), ("seq_len", seq_len),
                    ("checkpoint_every", checkpoint_every)):
        if not isinstance(v, int) or v <= 0:
            raise InputError(f"{name} must be a positive int, got {v!r}")
    if dtype not in ("fp32", "fp64"):
        raise InputError(f"dtype must be 'fp32' or 'fp64', got {dtype!r}")
    first_param = next(model.parameters())  # its device and dtype stand for the model's
    autocast = resolve_autocast(autocast, first_param.device)
    modules = rewrite_modules(model, layer_list, module_template)
    corpus = open_corpus(corpus)
    rank, world = _dist()
    common = {
        "model_id": _model_id(model, model_id),
        "weights_fingerprint": fingerprint or weights_fingerprint(model),
        "corpus_id": corpus.id,
        "dtype": dtype,
        "centered": centered,
        "max_tokens": max_tokens,
        "seq_len": seq_len,
    }
    folder = Path(cache_dir) / _slug(common["model_id"]) / _slug(corpus.id) if cache_dir is not None else None
    start = document_start_tag(tokenizer)  # statistics of texts that start with a token differ
    if start:
        common["document_start"] = start
    if autocast is not None:  # absent otherwise: caches written before this option still match
        common["autocast"] = autocast
    # The weights' fingerprint is in the name: the same model in another dtype, or another
    # checkpoint under the same id, gets files of its own instead of a mismatch error.
    tag = (f"{dtype}{'.centered' if centered else ''}{'.' + autocast + '-forward' if autocast else ''}"
           f".{max_tokens}tok{'.' + start if start else ''}.w{common['weights_fingerprint'][:10]}")
    paths = {l: folder / f"{m}.{tag}.safetensors" for l, m in modules.items()} if folder else {}

    result = CollectResult(stats={}, modules=modules, paths=paths)
    for layer in layer_list:  # cached layers are loaded (and verified), not recomputed
        if layer in paths and paths[layer].exists():
            result.stats[layer] = _load_cached(paths[layer], _cache_identity(common, layer, modules[layer]), backend)
    todo = {l: m for l, m in modules.items() if l not in result.stats}
    if not todo:
        result.from_cache = True
        result.tokens = min(acc.count for acc in result.stats.values())
        return result

    d_of = {l: _rewrite_input_width(model.get_submodule(m)) for l, m in todo.items()}
    accs = {l: CovarianceAccumulator(d_of[l], dtype_products=dtype, centered=centered, backend=backend) for l in todo}
    ckpt = None
    if folder is not None:
        ckpt = folder / f"checkpoint.{tag}.layers-{'-'.join(map(str, todo))}.rank{rank}of{world}.safetensors"
    run = _Run(identity=common, modules=todo, accs=accs, checkpoint=ckpt)
    if resume:
        run.try_resume()
    elif ckpt is not None:
        ckpt.unlink(missing_ok=True)
    cap = max_tokens // world + (1 if rank < max_tokens % world else 0)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _autocast(first_param.device, autocast):
            _run_pass(model, tokenizer, corpus, run, cap, rank, world, seq_len=seq_len, batch_tokens=batch_tokens,
                      checkpoint_every=checkpoint_every, stop_tol=stop_tol, report_condition=report_condition,
                      progress=progress, result=result)
    finally:
        model.train(was_training)
    if world > 1:
        _reduce_across_ranks(accs, _collective_device())
    result.stats.update(accs)
    result.tokens = min(acc.count for acc in accs.values())
    if folder is not None:
        act = AUTOCAST_DTYPES[autocast] if autocast else first_param.dtype
        extra = {"activation_dtype": str(act).removeprefix("torch.")}
        _write_cache(run, paths, common, extra, result, rank, world)
    return result


def _autocast(device: torch.device, kind: str | None):
    if kind is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[kind])


def _rewrite_input_width(module: torch.nn.Module) -> int:
    if hasattr(module, "in_features"):
        return int(module.in_features)
    weight = getattr(module, "weight", None)
    if weight is not None and weight.ndim == 2:  # GPT-2 Conv1D stores (d_in, d_out)
        return int(weight.shape[0] if type(module).__name__ == "Conv1D" else weight.shape[1])
    raise InputError(f"cannot tell the input width of rewrite module {type(module).__name__}")


def _collective_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _write_cache(run: _Run, paths: dict[int, Path], common: dict[str, Any], extra: dict[str, Any],
                 result: CollectResult, rank: int, world: int) -> None:
    from .. import __version__

    if rank == 0:
        for layer, acc in run.accs.items():
            meta = {**_cache_identity(common, layer, run.modules[layer]), "tokens": acc.count,
                    "stopped_early": result.stopped_early, "world_size": world, "pmsolve_version": __version__,
                    **extra}
            acc.save(paths[layer], metadata=meta)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # the cache exists before any rank drops its checkpoint
    if run.checkpoint is not None:
        run.checkpoint.unlink(missing_ok=True)


# ---------------------------------------------------------------------------
# precomputed statistics from elsewhere
# ---------------------------------------------------------------------------


def load_stats(
    path: str | Path,
    model: torch.nn.Module,
    layers: int | list[int],
    *,
    module_template: str | None = None,
    backend: str = "auto",
) -> CollectResult:
    """Precomputed statistics for ``layers`` of ``model``, from ``path``: a folder searched
    recursively for `pmsolve stats` files (``{module}.*.safetensors``) or the ROME/MEMIT/EMMET
    reference's ``layer_stats`` files (``{module}_*.npz``), a glob pattern (``**`` recursive)
    that narrows such files down, e.g. to one token count, or one such file for one layer.

    Each file's integrity is verified on load. A `pmsolve stats` file must be for the layer's
    module (else CacheError); if its weights fingerprint differs from the model's, a warning
    says so (statistics of another checkpoint of the same architecture: usable, not the same).
    Reference files carry no metadata and are matched by name alone.

    Raises:
        InputError: no file, or several, for a layer (the message lists what was found).
        CacheError: an unreadable, corrupt or mismatched file.
    """
    layer_list = sorted({layers} if isinstance(layers, int) else set(layers))
    modules = rewrite_modules(model, layer_list, module_template)
    root = Path(path).expanduser()
    if glob.has_magic(str(root)):  # a pattern picks among files of several token counts or corpora
        files = sorted(Path(p) for p in glob.glob(str(root), recursive=True) if Path(p).is_file())
    elif root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.suffix in (".safetensors", ".npz"))
    else:
        raise InputError(f"statistics path {root} does not exist")
    result = CollectResult(stats={}, modules=modules, from_cache=True)
    fingerprint = None
    for layer, module in modules.items():
        found = [p for p in files if not p.name.startswith("checkpoint.")
                 and (p.name.startswith(module + ".") and p.suffix == ".safetensors"
                      or p.name.startswith(module + "_") and p.suffix == ".npz")]
        if root.is_file() and len(layer_list) == 1:
            found = [root]
        if not found:
            raise InputError(f"statistics for layer {layer} under {root}: expected one file named {module}.*.safetensors "
                             f"(pmsolve stats) or {module}_*.npz (reference layer_stats), found none")
        if len(found) > 1:
            raise InputError(f"statistics for layer {layer} under {root}: several files ({', '.join(map(str, found))}); "
                             f"pass a narrower folder or a glob pattern, e.g. '{root}/**/*.100000tok*'")
        file = found[0]
        if file.suffix == ".npz":
            acc = CovarianceAccumulator.from_npz(file, backend=backend)
        else:
            acc, meta = CovarianceAccumulator.load_with_metadata(file, backend=backend)
            if meta.get("module") not in (None, module):
                raise CacheError(f"{file} holds statistics of {meta['module']!r}, not of {module!r} (layer {layer})")
            theirs = meta.get("weights_fingerprint")
            fingerprint = fingerprint or weights_fingerprint(model)
            if theirs and theirs != fingerprint:
                warnings.warn(f"{file} was collected on other weights (fingerprint {theirs}, this model {fingerprint}): "
                              "statistics of another checkpoint", stacklevel=2)
        width = _rewrite_input_width(model.get_submodule(module))
        if acc.d != width:
            raise CacheError(f"{file} is {acc.d}-dimensional; {module} takes {width}-dimensional inputs")
        result.stats[layer], result.paths[layer] = acc, file
    result.tokens = min(acc.count for acc in result.stats.values())
    return result


# ---------------------------------------------------------------------------
# merging statistics computed apart
# ---------------------------------------------------------------------------

# Fields that must agree for two files' statistics to add up to one model's statistics.
_MERGE_SAME = ("module", "layer", "weights_fingerprint", "dtype", "centered", "document_start")
# Fields that tell two shards apart: equal in two files means the same rows counted twice.
_SHARD_ID = ("corpus_id", "max_tokens", "seq_len")


def merge_stats(inputs: list[str | Path], out_dir: str | Path) -> dict[str, Path]:
    """Add up `pmsolve stats` files computed apart (other corpora or corpus parts, other
    machines) into one file per module in ``out_dir``; returns module -> file.

    Inputs are files or folders (searched recursively). For each module every part must be
    of the same layer, weights, product dtype, centring and document start; two parts of the
    same corpus, token budget and length are the same rows twice and are refused. Sums add
    exactly (centred states by Chan/Pébay); the metadata lists the parts.

    Raises:
        InputError: nothing to merge, parts that do not fit together, or duplicates.
        CacheError: an unreadable or corrupt file.
    """
    import json

    files: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            files += sorted(f for f in p.rglob("*.safetensors") if not f.name.startswith("checkpoint."))
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"{p} does not exist")
    groups: dict[str, list[tuple[Path, CovarianceAccumulator, dict[str, str]]]] = {}
    for f in files:
        acc, meta = CovarianceAccumulator.load_with_metadata(f)
        if "module" not in meta:
            raise InputError(f"{f} has no module in its metadata: not written by `pmsolve stats`")
        groups.setdefault(meta["module"], []).append((f, acc, meta))
    if not groups:
        raise InputError(f"no statistics files in {', '.join(map(str, inputs))}")
    out = {}
    for module, parts in groups.items():
        if len(parts) < 2:
            raise InputError(f"only one file for {module} ({parts[0][0]}): nothing to merge it with")
        first_file, merged, first = parts[0]
        seen = {tuple(first.get(k) for k in _SHARD_ID): first_file}
        for f, acc, meta in parts[1:]:
            for k in _MERGE_SAME:
                if meta.get(k) != first.get(k):
                    raise InputError(f"cannot merge {f} with {first_file}: {k} is {meta.get(k)!r} against "
                                     f"{first.get(k)!r}")
            shard = tuple(meta.get(k) for k in _SHARD_ID)
            if shard in seen:
                raise InputError(f"{f} and {seen[shard]} hold the same rows (same corpus, token budget and "
                                 "sequence length): merging them would count them twice")
            seen[shard] = f
            merged.merge(acc)
        sources = [{"file": str(f), "corpus_id": m.get("corpus_id"), "tokens": int(a.count)} for f, a, m in parts]
        meta = {k: first[k] for k in ("model_id", *_MERGE_SAME) if first.get(k) is not None}
        meta.update(corpus_id="merged:" + hashlib.sha256(json.dumps(sorted(str(s[0]) for s in seen)).encode())
                    .hexdigest()[:12], tokens=merged.count, sources=json.dumps(sources))
        fp = str(first.get("weights_fingerprint", ""))[:10]
        path = Path(out_dir) / f"{module}.{first.get('dtype', 'fp32')}.merged{merged.count}tok.w{fp}.safetensors"
        merged.save(path, metadata=meta)
        out[module] = path
    return out
