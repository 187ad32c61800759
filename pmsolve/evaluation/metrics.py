"""Teacher-forced target scores, CounterFact-style edit metrics and generation entropy.

Every score is about the tokens of " " + target following a prompt. The prompt is tokenised
with the tokenizer's special tokens (a BOS where the model expects one), the target without
them, and the two id lists are concatenated: the target tokens are then the same whatever the
prompt, which the comparison of two targets relies on.

    report = evaluate_records(model, tokenizer, records)   # records: list[EditRecord]
    report.aggregate["score"], report.to_dict()            # JSON-serialisable
"""

from __future__ import annotations

import json
import math
import re
import statistics
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import mean

import torch
from tqdm.auto import tqdm

from ..errors import InputError
from .records import EditRecord


@dataclass(frozen=True)
class TargetScore:
    nll: float   # mean per-token negative log-likelihood of the target
    top1: float  # share of target tokens that are the argmax (teacher forced)

    @property
    def prob(self) -> float:
        """exp(-mean NLL): the per-token geometric-mean probability."""
        return math.exp(-self.nll)


def encode_pair(tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of the target as it continues the prompt (one leading space)."""
    prompt_ids = tokenizer(prompt.rstrip(), add_special_tokens=True).input_ids
    target_ids = tokenizer(" " + target.strip(), add_special_tokens=False).input_ids
    return prompt_ids, target_ids


def _input_device(model) -> torch.device:
    # With a device_map the inputs go where the embeddings are.
    return model.get_input_embeddings().weight.device


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def score_targets(model, tokenizer, prompts: Sequence[str], targets: Sequence[str],
                  batch_size: int = 32, progress: bool = False) -> list[TargetScore]:
    """Score each target after its prompt, one right-padded batch at a time.

    The model reads prompt + target minus its last token; pairs with the same such sequence
    (typically one prompt with several one-token targets) share a single forward pass.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    pairs = [encode_pair(tokenizer, p, t) for p, t in zip(prompts, targets)]
    users: dict[tuple[int, ...], list[int]] = {}  # input sequence -> indices of its pairs
    for i, (prompt_ids, target_ids) in enumerate(pairs):
        if not target_ids:
            raise ValueError(f"target {targets[i]!r} encodes to no tokens")
        users.setdefault(tuple(prompt_ids + target_ids[:-1]), []).append(i)
    # Longest first: similar lengths share a batch, so little padding is computed.
    seqs = sorted(users, key=len, reverse=True)
    out: list[TargetScore | None] = [None] * len(pairs)
    starts = range(0, len(seqs), batch_size)
    for start in tqdm(starts, desc="scoring", unit="batch", disable=not progress):
        chunk = seqs[start:start + batch_size]
        logits = _forward_padded(model, tokenizer, chunk)
        for row, seq in enumerate(chunk):
            for i in users[seq]:
                target_ids = torch.tensor(pairs[i][1])
                # The last len(target) positions predict the target's tokens.
                rows = logits[row, len(seq) - len(target_ids):len(seq)].float()
                logp = torch.log_softmax(rows, dim=-1).cpu()
                out[i] = TargetScore(
                    nll=-logp.gather(1, target_ids[:, None]).mean().item(),
                    top1=(logp.argmax(dim=-1) == target_ids).float().mean().item())
    return out


def _forward_padded(model, tokenizer, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), _pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):  # right padding: token positions stay unshifted
        ids[row, :len(seq)] = torch.tensor(list(seq))
        mask[row, :len(seq)] = 1
    device = _input_device(model)
    with torch.no_grad():
        return model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits


def target_nll(model, tokenizer, prompts: Sequence[str], targets: Sequence[str],
               batch_size: int = 32) -> list[float]:
    """Mean per-token negative log-likelihood of each target after its prompt."""
    return [s.nll for s in score_targets(model, tokenizer, prompts, targets, batch_size)]


def target_top1_accuracy(model, tokenizer, prompts: Sequence[str], targets: Sequence[str],
                         batch_size: int = 32) -> list[float]:
    """Share of target tokens that are the argmax under teacher forcing (zsRE's metric)."""
    return [s.top1 for s in score_targets(model, tokenizer, prompts, targets, batch_size)]


# --- CounterFact-style evaluation of edit records -----------------------------------------

@dataclass
class EvalReport:
    """Per-record scores and their aggregate; `to_dict()` is JSON-serialisable.

    Aggregates (None where no record provides the data):
      es, ps, ns        efficacy, paraphrase and neighbourhood success (0..1)
      score             harmonic mean of es, ps, ns, x100
      es_magnitude ...  mean probability differences (new - true; for ns: own target - new)
      rewrite_acc ...   zsRE-style top-1 token accuracy of target_new on the rewrite prompt and
                        paraphrases, and of each neighbour's own target on its prompt
    """

    records: list[dict] = field(default_factory=list)
    aggregate: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"aggregate": self.aggregate, "records": self.records}

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def summary(self) -> str:
        a = self.aggregate

        def pct(key):
            return "n/a" if a.get(key) is None else f"{100 * a[key]:.1f}%"
        score = "n/a" if a.get("score") is None else f"{a['score']:.1f}"
        return (f"{a['n_records']} records: ES {pct('es')}  PS {pct('ps')}  NS {pct('ns')}  "
                f"Score {score}")


def _needed_pairs(rec: EditRecord) -> list[tuple[str, str]]:
    prompts = [rec.rewrite_prompt, *rec.paraphrase_prompts]
    targets = [rec.target_new] + ([rec.target_true] if rec.target_true is not None else [])
    pairs = [(p, t) for p in prompts for t in targets]
    for n in rec.neighborhood_prompts:
        pairs += [(n.prompt, n.target), (n.prompt, rec.target_new)]
    return pairs


def mean_or_none(values: Sequence[float | None]) -> float | None:
    """The mean of the values that are not None; None when there are none."""
    values = [v for v in values if v is not None]
    return float(mean(values)) if values else None


def _score_record(rec: EditRecord, s: dict) -> dict:
    """Metrics of one record from its pair scores `s[(prompt, target)]`."""
    new, true = rec.target_new, rec.target_true

    def wins(prompt):  # does target_new beat target_true here?
        return float(s[(prompt, new)].nll < s[(prompt, true)].nll)

    def gap(prompt):
        return s[(prompt, new)].prob - s[(prompt, true)].prob

    paraphrases, neighbours = rec.paraphrase_prompts, rec.neighborhood_prompts
    has_true = true is not None
    return {
        "case_id": rec.case_id, "subject": rec.subject,
        "target_new": new, "target_true": true,
        "efficacy": wins(rec.rewrite_prompt) if has_true else None,
        "efficacy_magnitude": gap(rec.rewrite_prompt) if has_true else None,
        "paraphrase_success": mean_or_none([wins(p) for p in paraphrases]) if has_true else None,
        "paraphrase_magnitude": mean_or_none([gap(p) for p in paraphrases]) if has_true else None,
        "neighborhood_success": mean_or_none(
            [float(s[(n.prompt, n.target)].nll < s[(n.prompt, new)].nll) for n in neighbours]),
        "neighborhood_magnitude": mean_or_none(
            [s[(n.prompt, n.target)].prob - s[(n.prompt, new)].prob for n in neighbours]),
        "rewrite_acc": s[(rec.rewrite_prompt, new)].top1,
        "paraphrase_acc": mean_or_none([s[(p, new)].top1 for p in paraphrases]),
        "neighborhood_acc": mean_or_none([s[(n.prompt, n.target)].top1 for n in neighbours]),
    }


def harmonic_score(es: float | None, ps: float | None, ns: float | None) -> float | None:
    """Harmonic mean of the three success rates, x100 (0 if any is 0)."""
    if es is None or ps is None or ns is None:
        return None
    if min(es, ps, ns) <= 0:
        return 0.0
    return 100 * 3 / (1 / es + 1 / ps + 1 / ns)


def aggregate(per_record: list[dict]) -> dict:
    def avg(key):
        return mean_or_none([r[key] for r in per_record])

    agg = {"n_records": len(per_record),
           "es": avg("efficacy"), "ps": avg("paraphrase_success"),
           "ns": avg("neighborhood_success"),
           "es_magnitude": avg("efficacy_magnitude"), "ps_magnitude": avg("paraphrase_magnitude"),
           "ns_magnitude": avg("neighborhood_magnitude"),
           "rewrite_acc": avg("rewrite_acc"), "paraphrase_acc": avg("paraphrase_acc"),
           "neighborhood_acc": avg("neighborhood_acc")}
    agg["score"] = harmonic_score(agg["es"], agg["ps"], agg["ns"])
    return agg


def evaluate_records(model, tokenizer, records: Sequence[EditRecord], batch_size: int = 32,
                     progress: bool = False) -> EvalReport:
    """Score every record's prompts in shared batches and compute ES/PS/NS, magnitudes, accuracy."""
    pairs = sorted({pair for rec in records for pair in _needed_pairs(rec)})
    scores = score_targets(model, tokenizer, [p for p, _ in pairs], [t for _, t in pairs],
                           batch_size=batch_size, progress=progress)
    by_pair = dict(zip(pairs, scores))
    per_record = [_score_record(rec, by_pair) for rec in records]
    return EvalReport(records=per_record, aggregate=aggregate(per_record))


# --- fluency: n-gram entropy of greedy generations -----------------------------------------

_WORD = re.compile(r"\w+|[^\w\s]")
NGRAM_WEIGHTS = {2: 2 / 3, 3: 4 / 3}


def ngram_entropy(text: str) -> float:
    """Weighted mean of the bigram (2/3) and trigram (4/3) entropies (bits) of a text's words.

    Words and punctuation marks are the tokens (a regex stand-in for nltk's word_tokenize,
    which the reference metric uses). A text too short for an n-gram contributes 0 for it.
    """
    words = _WORD.findall(text)
    parts = []
    for n, weight in NGRAM_WEIGHTS.items():
        counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        entropy = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        parts.append(weight * entropy)
    return float(mean(parts))


def generate_greedy(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 100,
                    batch_size: int = 16) -> list[str]:
    """Prompt + greedy continuation for each prompt, generated in left-padded batches."""
    return _generate(model, tokenizer, prompts, max_new_tokens, batch_size, top_k=None, seed=0)


def generate_sampled(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 100, top_k: int = 5,
                     seed: int = 0, batch_size: int = 16) -> list[str]:
    """Prompt + a continuation sampled from the top_k most likely tokens at each step (as the
    reference fluency metric does, with k = 5), reproducible and paired.

    Each prompt draws its own random numbers, fixed by (seed, prompt text, step) and not by the
    batch it lands in: an edited and an unedited model given the same prompt see the same
    numbers (common random numbers), so before/after comparisons stay paired whatever the
    batching. torch's global random state is not used.
    """
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise InputError(f"top_k must be a positive int, got {top_k!r}")
    return _generate(model, tokenizer, prompts, max_new_tokens, batch_size, top_k=top_k, seed=seed)


class _SeededTopK:
    """A logits processor that turns greedy decoding into top-k sampling: the Gumbel-max trick
    (argmax of logit + Gumbel noise samples from the softmax) over the k best tokens, with the
    noise of row r at step t drawn from a generator seeded by (row_seeds[r], t).

    Written here because transformers' sampling draws from torch's global generator, shared by
    the whole batch, which would tie each prompt's sample to its batch."""

    def __init__(self, top_k: int, row_seeds: Sequence[int]) -> None:
        self.top_k, self.row_seeds, self.step = top_k, list(row_seeds), 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        k = min(self.top_k, scores.shape[-1])
        values, index = torch.topk(scores.float(), k, dim=-1)
        u = torch.stack([torch.rand(k, generator=torch.Generator().manual_seed(_mix(s, self.step)),
                                    dtype=torch.float64) for s in self.row_seeds])
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-300))).to(values.device, values.dtype)
        choice = index.gather(-1, (values + gumbel).argmax(-1, keepdim=True))
        self.step += 1
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, choice, 0.0)


def _mix(seed: int, step: int) -> int:
    """A generator seed from a row seed and a step: SplitMix64's finaliser, so that every input
    bit reaches the low 32 bits, the only ones torch's CPU generator (mt19937) keeps."""
    mask = (1 << 64) - 1
    x = (seed * 0x9E3779B97F4A7C15 + step + 0x632BE59BD9B4E019) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return (x ^ (x >> 31)) >> 1


def _generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
              top_k: int | None, seed: int) -> list[str]:
    from transformers import LogitsProcessorList

    out = []
    device = _input_device(model)
    for start in range(0, len(prompts), batch_size):
        texts = prompts[start:start + batch_size]
        chunk = [tokenizer(p, add_special_tokens=True).input_ids for p in texts]
        width = max(map(len, chunk))
        # Left padding so every row's last real token sits at the end, where generation continues.
        ids = torch.tensor([[_pad_id(tokenizer)] * (width - len(c)) + c for c in chunk])
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk])
        extra = {}
        if top_k is not None:
            row_seeds = [zlib.crc32(p.encode()) ^ (seed << 32) for p in texts]
            extra["logits_processor"] = LogitsProcessorList([_SeededTopK(top_k, row_seeds)])
        with torch.no_grad():
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=_pad_id(tokenizer), **extra)
        for prompt, row in zip(texts, gen[:, width:]):
            out.append(prompt + tokenizer.decode(row, skip_special_tokens=True))
    return out


def generate_texts(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 100, batch_size: int = 16,
                   top_k: int | None = None, seed: int = 0) -> list[str]:
    """Greedy continuations (top_k None) or :func:`generate_sampled` ones (top_k, seed)."""
    if top_k is None:
        return generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size)
    return generate_sampled(model, tokenizer, prompts, max_new_tokens, top_k, seed, batch_size)


def generation_entropies(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 100,
                         batch_size: int = 16, top_k: int | None = None, seed: int = 0) -> list[float]:
    """The n-gram entropy of each prompt's generation (prompt included, as in the reference
    metric): greedy with top_k=None, else sampled from the top_k tokens (the reference samples,
    k = 5) with per-prompt random numbers, so that one prompt before and after an edit is a
    paired comparison."""
    if not prompts:
        return []
    texts = generate_texts(model, tokenizer, list(prompts), max_new_tokens, batch_size, top_k, seed)
    return [ngram_entropy(t) for t in texts]


def generation_entropy(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 100,
                       batch_size: int = 16, top_k: int | None = None, seed: int = 0) -> float:
    """Mean of :func:`generation_entropies` (0 for no prompts)."""
    ents = generation_entropies(model, tokenizer, prompts, max_new_tokens, batch_size, top_k, seed)
    return float(mean(ents)) if ents else 0.0


def record_fluency(model, tokenizer, records: Sequence[EditRecord], *, generations: int = 1,
                   max_new_tokens: int = 100, top_k: int | None = None, seed: int = 0) -> list[float | None]:
    """Per record: the mean generation entropy of its first ``generations`` generation prompts
    (None for a record without any), all records' prompts generated in shared batches."""
    owners = [i for i, r in enumerate(records) for _ in r.generation_prompts[:generations]]
    ents = generation_entropies(model, tokenizer, [p for r in records for p in r.generation_prompts[:generations]],
                                max_new_tokens, top_k=top_k, seed=seed)
    per: list[list[float]] = [[] for _ in records]
    for owner, e in zip(owners, ents):
        per[owner].append(e)
    return [mean_or_none(x) for x in per]


def relative_change(pre: float | None, post: float | None) -> float | None:
    """(post − pre) / pre; None when either is missing or pre is 0."""
    return None if not pre or post is None else (post - pre) / pre


def paired_relative_se(pre: Sequence[float], post: Sequence[float]) -> float | None:
    """Standard error of (mean post − mean pre) / mean pre over paired measurements (the
    same generation prompt before and after an edit). Per-generation entropy changes are
    large (one repetition loop more or less), so a change of a few % over tens of
    generations can be within one standard error: report it next to the change."""
    if len(pre) < 2 or len(pre) != len(post):
        return None
    diffs = [b - a for a, b in zip(pre, post)]
    return statistics.stdev(diffs) / math.sqrt(len(diffs)) / statistics.fmean(pre)
