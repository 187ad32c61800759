"""Evaluation of edits: CounterFact-style scores, zsRE accuracy, fluency; record loaders;
and the batch pipeline behind `pmsolve eval` (:mod:`.pipeline`).

    from pmsolve.evaluation import load_builtin_facts, evaluate_records
    records = load_builtin_facts(limit=20)
    report = evaluate_records(model, tokenizer, records)
    print(report.summary())
"""

from .metrics import (
    EvalReport,
    TargetScore,
    evaluate_records,
    generate_greedy,
    generate_sampled,
    generate_texts,
    generation_entropies,
    generation_entropy,
    harmonic_score,
    mean_or_none,
    ngram_entropy,
    paired_relative_se,
    record_fluency,
    relative_change,
    score_targets,
    target_nll,
    target_top1_accuracy,
)
from .records import (
    EditRecord,
    Neighbor,
    RecordError,
    detect_format,
    load_builtin_facts,
    load_records,
    parse_records,
)

__all__ = [
    "EditRecord",
    "EvalReport",
    "Neighbor",
    "RecordError",
    "TargetScore",
    "detect_format",
    "evaluate_records",
    "generate_greedy",
    "generate_sampled",
    "generate_texts",
    "generation_entropies",
    "generation_entropy",
    "harmonic_score",
    "load_builtin_facts",
    "load_records",
    "mean_or_none",
    "ngram_entropy",
    "paired_relative_se",
    "parse_records",
    "record_fluency",
    "relative_change",
    "score_targets",
    "target_nll",
    "target_top1_accuracy",
]
