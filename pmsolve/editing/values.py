"""v*: the residual-stream output the last edited layer should produce, for a whole batch at once.

For every fact f a vector δ_f is added to the output of decoder layer L at the subject's
last token. All facts of a batch share one padded forward/backward per step; each fact
owns its rows (one per context template, plus one KL row) and its own δ row, and the
loss is a sum of per-fact terms, so the gradient of δ_f depends on fact f alone. Adam
is implemented here per fact (own moment estimates and step counter), which makes the
batched optimisation the same computation as optimising each fact alone, and lets a
fact stop early (target top-1 in every prompt) while the others continue.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import InputError
from ..models import attention
from ..models.adapters import Adapter
from ..models.precision import AUTOCAST_DTYPES, resolve_autocast
from .keys import _StopForward, hooks, layer_hidden, pad_id, pad_right, subject_prompt_ids, target_ids
from .requests import EditRequest


@dataclass(frozen=True)
class ValueConfig:
    """Hyperparameters of the v* optimisation (defaults: the public MEMIT settings)."""

    steps: int = 25
    lr: float = 0.5
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp: float = 0.75  # ‖δ‖ ≤ clamp · ‖h‖, h the layer output at the subject's last token
    # Prompt(s) whose next-token distribution δ should leave alone (the "essence" term);
    # with several, the KL term is their mean, so kl_factor keeps its meaning.
    kl_prompt: str | tuple[str, ...] = "{} is a"
    # Where the KL term is measured: "subject" (the subject's last token, as the reference
    # code does) or "all" (every token from there to the end of each essence prompt, so what
    # the model says *after* the subject is held too); the mean over those positions.
    kl_positions: str = "subject"
    early_stop: bool = True  # a fact stops once its target is top-1 in every prompt ...
    stop_nll: float = float("inf")  # ... and its mean target NLL is at most this
    prefix_cache: bool = True  # False: every step runs the whole prompts (the reference's way)
    # "bf16"/"fp16": run the optimisation's forward/backward under torch.autocast (h, and so
    # z = h + δ, stay in the model's dtype). "auto": bf16 where bf16 matmuls are fast (CUDA
    # with bf16 support, CPUs with AMX or AVX512-BF16), else None. Same edit quality on SmolLM2,
    # measured on an AMX Xeon and an AVX512-BF16 Zen 4 (docs/benchmarks.md).
    autocast: str | None = "auto"
    # Attention implementation during the optimisation. "auto": eager on CPU, where for these
    # short rows it beat SDPA (whose bf16 backward is slow there), in its grouped form for
    # grouped-query models (pmsolve.models.attention); the model's own elsewhere; None:
    # always the model's own. Restored afterwards.
    attention: str | None = "auto"
    # Facts optimised together; larger requests run in consecutive groups of this size (the
    # facts are independent, so only memory and time change). The backward pass keeps every
    # row's activations: measured on SmolLM2 (layer 4, preset settings), peak RSS +3.9 GB for
    # 32 facts, +7.3 GB for 64 at once, +4.0 GB for 64 in groups of 32 at the same speed
    # (47 vs 48 s); 256 at once was killed by the OOM killer at 24 GB.
    max_batch: int = 32
    # Facts are grouped by the width of their rows (see _width_groups), so short rows are not
    # padded to the longest; False: consecutive groups of max_batch in request order.
    width_groups: bool = True
    # Layers below the v* layer run once, not every step (their output does not depend on δ).
    # False: every step runs them (the reference's way; same results up to rounding).
    skip_lower_layers: bool = True

    def __post_init__(self) -> None:
        prompts = self.kl_prompts
        if not prompts or not all(isinstance(p, str) and "{}" in p for p in prompts):
            raise InputError(f"ValueConfig.kl_prompt must be a prompt with '{{}}' for the subject, or a "
                             f"non-empty list of them, got {self.kl_prompt!r}")
        if not isinstance(self.kl_prompt, str):
            object.__setattr__(self, "kl_prompt", tuple(prompts))  # a list (JSON) becomes hashable
        if self.kl_positions not in ("subject", "all"):
            raise InputError(f"ValueConfig.kl_positions must be 'subject' or 'all', got {self.kl_positions!r}")

    @property
    def kl_prompts(self) -> tuple[str, ...]:
        return (self.kl_prompt,) if isinstance(self.kl_prompt, str) else tuple(self.kl_prompt)


@dataclass
class ValueResult:
    """z = h + δ per fact (n × d, fp32, on layer L's device) and how the optimisation went.

    forward_passes and history (the summed loss per step) are those of all groups together:
    passes add up, histories follow one another."""

    z: torch.Tensor
    delta: torch.Tensor
    h: torch.Tensor
    steps: list[int]
    converged: list[bool]
    nll: list[float]
    forward_passes: int = 0
    history: list[float] = field(default_factory=list)


@dataclass
class _Rows:
    ids: list[list[int]]
    lookup: list[int]
    owner: list[int]
    # for rewrite rows: (first logit position, target ids); None for KL rows
    target: list[tuple[int, list[int]] | None]


def _build_rows(tokenizer, requests: Sequence[EditRequest], templates: Sequence[str],
                kl_prompts: str | Sequence[str]) -> _Rows:
    kl_prompts = (kl_prompts,) if isinstance(kl_prompts, str) else kl_prompts
    rows = _Rows([], [], [], [])
    for f, req in enumerate(requests):
        tgt = target_ids(tokenizer, req.target_new)
        for tmpl in templates:
            ids, idx = subject_prompt_ids(tokenizer, tmpl.replace("{}", req.prompt, 1), req.subject)
            rows.ids.append(ids + tgt[:-1])
            rows.lookup.append(idx)
            rows.owner.append(f)
            rows.target.append((len(ids) - 1, tgt))
        for kl_prompt in kl_prompts:
            ids, idx = subject_prompt_ids(tokenizer, kl_prompt, req.subject)
            rows.ids.append(ids)
            rows.lookup.append(idx)
            rows.owner.append(f)
            rows.target.append(None)
    return rows


@contextlib.contextmanager
def _matmul_weights_in(model, dtype: torch.dtype | None):
    """Every nn.Linear / Conv1D weight replaced by a ``dtype`` copy for the duration.

    Under autocast each linear call casts its fp32 weight to bf16 anyway, but autocast caches
    that cast only for leaves that require grad, and ours are frozen: every step re-cast all
    weights (profiled on SmolLM2, 32 facts: copies took 8.5 s of 36 s). The copies hold the
    same rounded values, so the results do not change. Embeddings keep their weights (a tied
    LM head gets its own copy; the original Parameters, and the tie, come back on exit).
    """
    swapped: list[tuple[nn.Module, nn.Parameter]] = []
    try:
        for mod in model.modules() if dtype is not None else ():
            w = getattr(mod, "weight", None)
            if not (isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D"):
                continue
            if isinstance(w, nn.Parameter) and w.dtype == torch.float32 and w.device.type != "meta":
                mod.weight = nn.Parameter(w.detach().to(dtype), requires_grad=False)
                swapped.append((mod, w))
        yield
    finally:
        for mod, w in reversed(swapped):
            mod.weight = w


@contextlib.contextmanager
def _frozen(model):
    """No parameter gradients while δ is optimised (saves the memory and time of weight grads)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _cache_kwarg(model) -> str:
    # transformers renamed past_key_values to cache (5.2x); older versions only know the former.
    import inspect

    params = inspect.signature(model.base_model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class _PrefixCache:
    """Keys/values of every row's tokens before the subject's last token, computed once.

    δ enters the residual stream at the subject's last token, so in a causal model nothing
    before that position depends on δ. Each optimisation step then runs only the suffix
    (subject's last token, the rest of the prompt, the target) on top of this cache: a few
    tokens per row instead of the whole context-prefixed prompt.
    """

    def __init__(self, model, rows: _Rows, pad: int, device: torch.device) -> None:
        from transformers import DynamicCache

        self.config = model.config
        self.lens = torch.tensor(rows.lookup)
        width = int(self.lens.max())
        ids = torch.full((len(rows.ids), width), pad, dtype=torch.long)
        self.mask = torch.zeros((len(rows.ids), width), dtype=torch.long)
        for i, (r, n) in enumerate(zip(rows.ids, rows.lookup)):  # left padding: suffixes follow directly
            if n:
                ids[i, width - n :] = torch.tensor(r[:n])
                self.mask[i, width - n :] = 1
        pos = (self.mask.cumsum(1) - 1).clamp_min(0)
        with torch.no_grad():
            self.kwarg = _cache_kwarg(model)
            cache = DynamicCache(config=model.config)
            model.base_model(input_ids=ids.to(device), attention_mask=self.mask.to(device),
                             position_ids=pos.to(device), use_cache=True, **{self.kwarg: cache})
        self.kv = [(layer.keys, layer.values) for layer in cache.layers]
        self._cache_cls = DynamicCache

    def select(self, sel: torch.Tensor):
        data = [(k[sel.to(k.device)], v[sel.to(v.device)]) for k, v in self.kv]
        return self._cache_cls(ddp_cache_data=data, config=self.config)


class _Batch:
    """Index tensors for the rows of the currently active facts; tokens before ``start[r]``
    of each row come from the prefix cache (start = 0 without one)."""

    def __init__(self, rows: _Rows, active: list[int], start: list[int], pad: int, device: torch.device,
                 kl_all_positions: bool = False) -> None:
        keep = set(active)
        sel = [r for r, f in enumerate(rows.owner) if f in keep]
        local = {f: i for i, f in enumerate(active)}
        self.sel = torch.tensor(sel)
        self.ids, self.mask = pad_right([rows.ids[r][start[r] :] for r in sel], pad, device)
        self.start = torch.tensor([start[r] for r in sel])
        self.row_owner = torch.tensor([local[rows.owner[r]] for r in sel])
        self.delta_pos = torch.tensor([rows.lookup[r] - start[r] for r in sel])
        pos_r, pos_t, tok, tok_row, tok_owner = [], [], [], [], []
        kl_r, kl_t, kl_owner, kl_keys = [], [], [], []  # kl_keys: (row in _Rows, position) per KL term
        for i, r in enumerate(sel):
            spec = rows.target[r]
            if spec is None:
                for pos in range(rows.lookup[r], len(rows.ids[r]) if kl_all_positions else rows.lookup[r] + 1):
                    kl_r.append(i)
                    kl_t.append(pos - start[r])
                    kl_owner.append(local[rows.owner[r]])
                    kl_keys.append((r, pos))  # each KL position keeps its own initial distribution
                continue
            first, tgt = spec
            for j, t in enumerate(tgt):
                pos_r.append(i)
                pos_t.append(first - start[r] + j)
                tok.append(t)
                tok_row.append(i)
                tok_owner.append(local[rows.owner[r]])
        self.pos = (torch.tensor(pos_r), torch.tensor(pos_t))
        self.tok = torch.tensor(tok)
        self.tok_row = torch.tensor(tok_row)
        self.tok_owner = torch.tensor(tok_owner)
        self.kl = (torch.tensor(kl_r), torch.tensor(kl_t))
        self.kl_owner = torch.tensor(kl_owner)
        self.kl_keys = kl_keys
        self.n = len(active)


def _suffix_kwargs(b: _Batch, cache: _PrefixCache | None) -> dict:
    """Base-model keyword arguments that run the batch's suffixes on top of the prefix cache."""
    if cache is None:
        return {"attention_mask": b.mask}
    dev = b.ids.device
    width = b.ids.shape[1]
    return {
        cache.kwarg: cache.select(b.sel),
        "attention_mask": torch.cat([cache.mask[b.sel].to(dev), b.mask], 1),
        "position_ids": (cache.lens[b.sel][:, None] + torch.arange(width)).to(dev),
        "use_cache": True,
    }


class _LowerLayers:
    """The output of layers 0..L-1 at every suffix token, computed once; while
    :meth:`skipped` is active those layers return it instead of recomputing it.

    δ enters at layer L's output, so nothing below layer L depends on it: rerunning layers
    0..L-1 every step repeats the same work (SmolLM2, L = 4: 4 of 30 layers' forward).
    Works for any architecture whose decoder layers take the hidden states first and return
    them (alone or first in a tuple whose other items are None); otherwise ``usable`` is False.
    """

    def __init__(self, model, adapter: Adapter, rows: _Rows, start: list[int], layer: int, pad: int,
                 device: torch.device, cache: _PrefixCache | None) -> None:
        self.adapter, self.layer = adapter, layer
        self.usable = layer > 0
        self.current: torch.Tensor | None = None
        if not self.usable:
            return
        b = _Batch(rows, sorted(set(rows.owner)), start, pad, device)
        got: list = []

        def grab(module, inputs, output):
            got.append(output)
            raise _StopForward

        with torch.no_grad(), hooks(lambda: [adapter.layer(layer - 1).register_forward_hook(grab)]), \
                contextlib.suppress(_StopForward):
            model.base_model(input_ids=b.ids, **_suffix_kwargs(b, cache))
        out = got[0]
        self.tuple_len = len(out) if isinstance(out, tuple) else 0
        self.usable = self.tuple_len == 0 or all(x is None for x in out[1:])
        self.hidden = layer_hidden(out)  # rows in row order (all facts active), right-padded

    def select(self, b: _Batch) -> None:
        """Serve the rows of batch ``b`` from the next forward on."""
        self.current = self.hidden[b.sel.to(self.hidden.device), : b.ids.shape[1]]

    @contextlib.contextmanager
    def skipped(self):
        """Layers 0..L-1 replaced by a lookup of their (δ-independent) output."""
        if not self.usable:
            yield
            return
        saved = []

        def lookup(*args, **kwargs):
            h = self.current
            return (h,) + (None,) * (self.tuple_len - 1) if self.tuple_len else h

        try:
            for i in range(self.layer):
                mod = self.adapter.layer(i)
                saved.append((mod, mod.__dict__.get("forward")))
                mod.forward = lookup  # an instance attribute wins over the class's forward
            yield
        finally:
            for mod, fwd in saved:
                if fwd is None:
                    del mod.forward
                else:
                    mod.forward = fwd


def _forward_logits(model, adapter: Adapter, b: _Batch, layer: int, delta: torch.Tensor,
                    cache: _PrefixCache | None):
    """Logits at the target positions and the KL positions, with δ added at ``layer``."""
    def add_delta(module, inputs, output):
        h = layer_hidden(output)
        rows = torch.arange(h.shape[0], device=h.device)
        upd = delta.to(h.device)[b.row_owner.to(h.device)].to(h.dtype)
        h = h.index_put((rows, b.delta_pos.to(h.device)), upd, accumulate=True)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    with hooks(lambda: [adapter.layer(layer).register_forward_hook(add_delta)]):
        # The base model stops before the LM head, so the vocabulary projection runs only
        # at the few positions the loss needs, not at every token of every row.
        hidden = model.base_model(input_ids=b.ids, **_suffix_kwargs(b, cache)).last_hidden_state
    head = adapter.lm_head()
    dev = hidden.device
    tgt_h = hidden[b.pos[0].to(dev), b.pos[1].to(dev)]
    kl_h = hidden[b.kl[0].to(dev), b.kl[1].to(dev)]
    return head(tgt_h).float(), head(kl_h).float()


def optimize_values(
    model,
    adapter: Adapter,
    tokenizer,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    layer: int,
    config: ValueConfig = ValueConfig(),
    *,
    seed: int = 0,
) -> ValueResult:
    """Optimise δ for the requests, ``config.max_batch`` at a time; z = h + δ at ``layer`` (n × d)."""
    if not isinstance(config.max_batch, int) or config.max_batch < 1:
        raise InputError(f"ValueConfig.max_batch must be a positive int, got {config.max_batch!r}")
    groups = _width_groups(tokenizer, requests, templates, config)
    parts = [_optimize_group(model, adapter, tokenizer, [requests[i] for i in g], templates, layer, config, seed)
             for g in groups]
    if len(parts) == 1 and groups[0] == list(range(len(requests))):
        return parts[0]
    order = torch.tensor([i for g in groups for i in g])
    back = torch.empty_like(order)
    back[order] = torch.arange(len(order))  # position of request i among the groups' results

    def cat(xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(xs)[back.to(xs[0].device)]

    def flat(xs: list[list]) -> list:
        joined = [x for part in xs for x in part]
        return [joined[int(j)] for j in back]

    return ValueResult(
        z=cat([p.z for p in parts]), delta=cat([p.delta for p in parts]), h=cat([p.h for p in parts]),
        steps=flat([p.steps for p in parts]), converged=flat([p.converged for p in parts]),
        nll=flat([p.nll for p in parts]),
        forward_passes=sum(p.forward_passes for p in parts), history=[x for p in parts for x in p.history],
    )


# Per group and step, a forward/backward costs about as much as this many extra padded tokens
# (Python and dispatch overhead, the prefix cache's selection).
_GROUP_OVERHEAD_TOKENS = 16


def _width_groups(tokenizer, requests: Sequence[EditRequest], templates: Sequence[str],
                  config: ValueConfig) -> list[list[int]]:
    """Request indices split into groups of at most ``config.max_batch`` facts with similar row
    widths. Each step pads every row of a group to its widest, and what pays is the padded
    tokens through all layers above the v* layer: with the 8 demo facts (rows of 2-8 tokens
    after the prefix cache) one group computes 448 token positions per step for 264 real ones,
    two groups 308. Facts are independent (per-fact Adam), so grouping changes rounding only.
    The split minimises padded tokens plus a per-group overhead, over facts sorted by width."""
    n = len(requests)
    if n <= 1 or not config.width_groups:
        return [list(range(s, min(s + config.max_batch, n))) for s in range(0, n, config.max_batch)]
    rows, width = [], []
    for req in requests:
        r = _build_rows(tokenizer, [req], templates, config.kl_prompts)
        lens = [len(ids) - (lookup if config.prefix_cache else 0) for ids, lookup in zip(r.ids, r.lookup)]
        rows.append(len(lens))
        width.append(max(lens))
    order = sorted(range(n), key=lambda i: width[i])  # stable: equal widths keep request order
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j facts in sorted order
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        n_rows = 0
        for i in range(j - 1, max(-1, j - 1 - config.max_batch), -1):  # group = sorted facts i..j-1
            n_rows += rows[order[i]]
            cost = best[i] + n_rows * width[order[j - 1]] + _GROUP_OVERHEAD_TOKENS
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def _optimize_group(model, adapter: Adapter, tokenizer, requests: Sequence[EditRequest], templates: Sequence[str],
                    layer: int, config: ValueConfig, seed: int) -> ValueResult:
    """One forward/backward per step for all of ``requests``."""
    torch.manual_seed(seed)  # δ starts at zero; the seed pins any nondeterministic kernels' choices
    rows = _build_rows(tokenizer, requests, templates, config.kl_prompts)
    n = len(requests)
    dev = adapter.weight(layer).device
    d = adapter.d_out
    delta = torch.zeros((n, d), device=dev, dtype=torch.float32)
    m1, m2 = torch.zeros_like(delta), torch.zeros_like(delta)
    t = torch.zeros(n, dtype=torch.long)
    active = list(range(n))
    kl_init: dict[int, torch.Tensor] = {}
    steps, converged, last_nll = [0] * n, [False] * n, [float("nan")] * n
    pad, in_dev = pad_id(tokenizer), adapter.input_device()
    result_history: list[float] = []
    passes = 0
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    with _frozen(model), contextlib.ExitStack() as stack:
        h0 = _initial_outputs(model, adapter, rows, layer, n, pad)  # as the edit will see it
        max_norm = config.clamp * h0.norm(dim=1)
        stack.enter_context(_attention(model, config.attention, in_dev))
        amp, low = _autocast(config.autocast, in_dev)
        stack.enter_context(_matmul_weights_in(model, low))
        with amp():
            cache = _PrefixCache(model, rows, pad, in_dev) if config.prefix_cache and max(rows.lookup) > 0 else None
            start = rows.lookup if cache is not None else [0] * len(rows.ids)
            lower = _LowerLayers(model, adapter, rows, start, layer, pad, in_dev, cache) \
                if config.skip_lower_layers else None
        for _ in range(config.steps + 1):
            if not active:
                break
            b = _Batch(rows, active, start, pad, in_dev, config.kl_positions == "all")
            idx = torch.tensor(active, device=dev)
            d_act = delta[idx].clone().requires_grad_(True)
            skip = contextlib.nullcontext() if lower is None else lower.skipped()
            if lower is not None:
                lower.select(b)
            with amp(), skip:
                tgt_logits, kl_logits = _forward_logits(model, adapter, b, layer, d_act, cache)
            passes += 1
            logp = torch.log_softmax(tgt_logits, -1)
            tok = b.tok.to(logp.device)
            tok_lp = logp.gather(1, tok[:, None])[:, 0]
            hit = logp.argmax(-1) == tok
            own = b.tok_owner.to(logp.device)
            # NLL per row = mean over its target tokens; per fact = mean over its rows.
            nll_fact = _per_fact_mean_of_row_means(-tok_lp, b.tok_row.to(logp.device), own, b.n)
            all_hit = _all_by_owner(hit, own, b.n)
            kl_lp = torch.log_softmax(kl_logits, -1)
            for i, key in enumerate(b.kl_keys):
                kl_init.setdefault(key, kl_lp[i].detach())
            init = torch.stack([kl_init[key] for key in b.kl_keys])
            kl = (init.exp() * (init - kl_lp)).sum(-1)  # KL(p_init ‖ p_now) per KL term
            owner_kl = b.kl_owner.to(kl.device)
            kl_fact = torch.zeros(b.n, device=kl.device).index_add(0, owner_kl, kl) \
                / torch.zeros(b.n, device=kl.device).index_add(0, owner_kl, torch.ones_like(kl))  # mean per fact
            wd = config.weight_decay * d_act.norm(dim=1) / h0[idx].norm(dim=1) ** 2
            loss_fact = nll_fact.to(dev) + config.kl_factor * kl_fact.to(dev) + wd
            for i, f in enumerate(active):
                last_nll[f] = float(nll_fact[i].detach())
            result_history.append(float(loss_fact.detach().sum()))
            done = (all_hit & (nll_fact <= config.stop_nll)).cpu() if config.early_stop \
                else torch.zeros(b.n, dtype=torch.bool)
            for i, f in enumerate(active):
                if bool(done[i]):
                    converged[f] = True
            stepping = [i for i, f in enumerate(active) if not bool(done[i]) and steps[f] < config.steps]
            if not stepping:
                break
            (grad,) = torch.autograd.grad(loss_fact.sum(), d_act)
            sel = torch.tensor(stepping, device=dev)
            rows_f = idx[sel]
            g = grad[sel]
            t[rows_f.cpu()] += 1
            tt = t[rows_f.cpu()].to(dev, torch.float32)[:, None]
            m1[rows_f] = beta1 * m1[rows_f] + (1 - beta1) * g
            m2[rows_f] = beta2 * m2[rows_f] + (1 - beta2) * g * g
            mhat = m1[rows_f] / (1 - beta1**tt)
            vhat = m2[rows_f] / (1 - beta2**tt)
            new = delta[rows_f] - config.lr * mhat / (vhat.sqrt() + eps)
            norm = new.norm(dim=1, keepdim=True)
            cap = max_norm[rows_f][:, None]
            delta[rows_f] = torch.where(norm > cap, new * cap / norm, new)
            for i in stepping:
                steps[active[i]] += 1
            active = [active[i] for i in stepping]
    return ValueResult(
        z=h0 + delta, delta=delta, h=h0, steps=steps, converged=converged, nll=last_nll,
        forward_passes=passes, history=result_history,
    )


def _autocast(kind: str | None, device: torch.device):
    """(a context-manager factory: torch.autocast for ``kind`` on ``device`` or a no-op,
    the autocast dtype or None)."""
    kind = resolve_autocast(kind, device, "ValueConfig.autocast")
    if kind is None:
        return contextlib.nullcontext, None
    dtype = AUTOCAST_DTYPES[kind]
    return (lambda: torch.autocast(device.type, dtype=dtype)), dtype


@contextlib.contextmanager
def _attention(model, impl: str | None, device: torch.device):
    """The model's attention implementation set to ``impl`` for the duration; models that
    cannot switch keep theirs. "auto" on CPU: eager, as grouped eager attention
    (:mod:`pmsolve.models.attention`) where the architecture allows; elsewhere the model's own."""
    config = getattr(model, "config", None)
    if impl == "auto":
        impl = None
        if device.type == "cpu":
            impl = "eager"
            if getattr(config, "model_type", None) in attention.GROUPED_EAGER_TYPES:
                impl = attention.register()
    before = getattr(config, "_attn_implementation", None)
    switch = getattr(model, "set_attn_implementation", None)
    if impl is None or before is None or before == impl or switch is None:
        yield
        return
    try:
        switch(impl)
    except (ValueError, ImportError, AttributeError):  # not supported by this architecture
        yield
        return
    try:
        yield
    finally:
        switch(before)


def _per_fact_mean_of_row_means(x: torch.Tensor, row: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    n_rows = int(row.max()) + 1
    row_sum = torch.zeros(n_rows, device=x.device).index_add(0, row, x)
    row_cnt = torch.zeros(n_rows, device=x.device).index_add(0, row, torch.ones_like(x))
    row_owner = torch.zeros(n_rows, dtype=torch.long, device=x.device).index_put((row,), owner)
    has = row_cnt > 0
    per_row = row_sum[has] / row_cnt[has]
    fact_sum = torch.zeros(n, device=x.device).index_add(0, row_owner[has], per_row)
    fact_cnt = torch.zeros(n, device=x.device).index_add(0, row_owner[has], torch.ones_like(per_row))
    return fact_sum / fact_cnt


def _all_by_owner(hit: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    misses = torch.zeros(n, device=hit.device).index_add(0, owner, (~hit).float())
    return misses == 0


@torch.no_grad()
def _initial_outputs(model, adapter: Adapter, rows: _Rows, layer: int, n: int, pad: int) -> torch.Tensor:
    """h: layer output at the subject's last token of each fact's bare prompt (first row)."""
    from .keys import capture

    first = {}
    for r, f in enumerate(rows.owner):
        first.setdefault(f, r)
    sel = [first[f] for f in range(n)]
    # The target tokens after the prompt do not influence the subject position (causal model),
    # so the bare prompt alone gives the same h.
    ids = [rows.ids[r][: rows.lookup[r] + 1] for r in sel]
    cap = capture(model, adapter, ids, [rows.lookup[r] for r in sel], pad, output_layers=[layer])
    return cap.outputs[layer]
