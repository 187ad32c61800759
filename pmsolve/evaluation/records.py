"""Edit/evaluation records and loaders for the built-in set, CounterFact-style and zsRE-style data.

Every format is read into one `EditRecord`:

    prompt            rewrite prompt with "{}" where the subject goes
    subject, target_new, target_true (None when the data has no true answer)
    paraphrase_prompts    full prompts that should give target_new after the edit
    neighborhood_prompts  Neighbor(prompt, target): other subjects whose answer must survive
    generation_prompts    prompts for fluency (generation entropy)

Malformed records are reported with their index: `on_error="raise"` raises a
`RecordError` at the first one, `on_error="skip"` leaves them out and warns once.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import InputError

FORMATS = ("builtin", "counterfact", "flat", "zsre")
BUILTIN_FACTS = Path(__file__).resolve().parent.parent / "data" / "facts.jsonl"


@dataclass(frozen=True)
class Neighbor:
    prompt: str
    target: str


@dataclass
class EditRecord:
    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrase_prompts: list[str] = field(default_factory=list)
    neighborhood_prompts: list[Neighbor] = field(default_factory=list)
    generation_prompts: list[str] = field(default_factory=list)
    case_id: int | str | None = None
    relation: str | None = None

    @property
    def rewrite_prompt(self) -> str:
        return self.prompt.replace("{}", self.subject, 1)  # as the editor fills it in

    def as_request(self) -> dict:
        """The fields an editor needs: prompt (with "{}"), subject, target_new, target_true."""
        return {"prompt": self.prompt, "subject": self.subject,
                "target_new": self.target_new, "target_true": self.target_true}

    def to_dict(self) -> dict:
        return asdict(self)


class RecordError(InputError):
    """A record is malformed; `index` is its position in the input (0-based)."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(f"record {index}: {message}")
        self.index = index


# --- field helpers: each raises ValueError with a short reason -------------------------------

def _text(raw: dict, key: str, *, optional: bool = False) -> str | None:
    value = raw.get(key)
    if isinstance(value, dict) and "str" in value:  # CounterFact's {"str": ..., "id": ...}
        value = value["str"]
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"field {key!r} is missing or empty")
    return value.strip()


def _texts(raw: dict, key: str) -> list[str]:
    """A list of prompts; a single string counts as a list of one; absent means none."""
    value = raw.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError(f"field {key!r} must be a string or a list of non-empty strings")
    return [v.strip() for v in value]


def _template(prompt: str, subject: str) -> str:
    """The prompt with "{}" for the subject: the editor's own rule (one validator for edit,
    eval and the commands), so a record is accepted here exactly when it would be as a request."""
    from ..editing.requests import subject_template

    return subject_template(prompt, subject)


def _record(prompt, subject, target_new, target_true=None, **rest) -> EditRecord:
    if target_true is not None and target_true == target_new:
        raise ValueError(f"target_new equals target_true ({target_new!r})")
    return EditRecord(prompt=_template(prompt, subject), subject=subject,
                      target_new=target_new, target_true=target_true, **rest)


# --- one parser per format -----------------------------------------------------------------

def _from_builtin(raw: dict) -> EditRecord:
    neighbours = raw.get("neighborhood_prompts") or []
    if not all(isinstance(n, dict) for n in neighbours):
        raise ValueError("neighborhood_prompts must be objects {prompt, target}")
    return _record(
        _text(raw, "prompt"), _text(raw, "subject"), _text(raw, "target_new"),
        _text(raw, "target_true", optional=True),
        paraphrase_prompts=_texts(raw, "paraphrase_prompts"),
        neighborhood_prompts=[Neighbor(_text(n, "prompt"), _text(n, "target")) for n in neighbours],
        generation_prompts=_texts(raw, "generation_prompts"),
        case_id=raw.get("id", raw.get("case_id")), relation=raw.get("relation"))


def _from_counterfact(raw: dict) -> EditRecord:
    rw = raw.get("requested_rewrite")
    if not isinstance(rw, dict):
        raise ValueError("field 'requested_rewrite' is missing or not an object")
    target_true = _text(rw, "target_true")
    # CounterFact's neighbourhood prompts are other subjects sharing the true object.
    neighbours = [Neighbor(p, target_true) for p in _texts(raw, "neighborhood_prompts")]
    return _record(
        _text(rw, "prompt"), _text(rw, "subject"), _text(rw, "target_new"), target_true,
        paraphrase_prompts=_texts(raw, "paraphrase_prompts"), neighborhood_prompts=neighbours,
        generation_prompts=_texts(raw, "generation_prompts"),
        case_id=raw.get("case_id"), relation=rw.get("relation_id"))


def _from_flat(raw: dict) -> EditRecord:
    prompts, answers = _texts(raw, "locality_prompt"), _texts(raw, "locality_ground_truth")
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} locality prompts but {len(answers)} ground truths")
    return _record(
        _text(raw, "prompt"), _text(raw, "subject"), _text(raw, "target_new"),
        _text(raw, "ground_truth", optional=True),
        paraphrase_prompts=_texts(raw, "rephrase_prompt"),
        neighborhood_prompts=[Neighbor(p, a) for p, a in zip(prompts, answers)],
        case_id=raw.get("case_id"))


def _from_zsre(raw: dict) -> EditRecord:
    answers = raw.get("answers") or []
    if not isinstance(answers, list):
        answers = [answers]
    if "subject" not in raw:
        raise ValueError("field 'subject' is missing (editing needs to know where the subject is)")
    neighbours = [Neighbor(_text(raw, "loc"), _text(raw, "loc_ans"))] if raw.get("loc") else []
    return _record(
        _text(raw, "src"), _text(raw, "subject"), _text(raw, "alt"),
        answers[0].strip() if answers and isinstance(answers[0], str) and answers[0].strip()
        else None,
        paraphrase_prompts=_texts(raw, "rephrase"), neighborhood_prompts=neighbours,
        case_id=raw.get("case_id"))


_PARSERS = {"builtin": _from_builtin, "counterfact": _from_counterfact,
            "flat": _from_flat, "zsre": _from_zsre}


def detect_format(raw: dict) -> str:
    """Guess the format of one record from its keys."""
    if "requested_rewrite" in raw:
        return "counterfact"
    if "src" in raw and "alt" in raw:
        return "zsre"
    if "ground_truth" in raw or "rephrase_prompt" in raw or "locality_prompt" in raw:
        return "flat"
    return "builtin"


@dataclass(frozen=True)
class _BadLine:
    reason: str


# --- public loaders -----------------------------------------------------------------------

def parse_records(raw_records: Sequence,
                  fmt: str = "auto") -> tuple[list[EditRecord], list[RecordError]]:
    """Parse raw dicts; return the good records and an error (with index) per bad one."""
    if fmt != "auto" and fmt not in FORMATS:
        raise InputError(f"unknown record format {fmt!r}; choose one of auto, {', '.join(FORMATS)}")
    records, errors = [], []
    for i, raw in enumerate(raw_records):
        try:
            if isinstance(raw, _BadLine):
                raise ValueError(raw.reason)
            if not isinstance(raw, dict):
                raise ValueError(f"expected a JSON object, got {type(raw).__name__}")
            records.append(_PARSERS[detect_format(raw) if fmt == "auto" else fmt](raw))
        except (ValueError, TypeError) as exc:
            errors.append(RecordError(i, str(exc)))
    return records, errors


def read_json_records(path: str | Path) -> list:
    """The raw records of a JSON file (a list) or a JSONL file (one object per line)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read records from {path}: {exc}") from exc
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not valid JSON: {exc}") from exc
    raw = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                raw.append(json.loads(line))
            except json.JSONDecodeError as exc:
                # Kept as a bad record so that on_error decides, and indices stay aligned.
                raw.append(_BadLine(f"line {line_no} is not valid JSON: {exc}"))
    return raw


def load_records(source: str | Path | Iterable, fmt: str = "auto",
                 on_error: str = "raise") -> list[EditRecord]:
    """Load records from a JSON/JSONL file or a list of dicts.

    on_error="raise": the first malformed record raises RecordError (with its index).
    on_error="skip": malformed records are left out with one warning listing them.
    """
    if on_error not in ("raise", "skip"):
        raise InputError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    raw = read_json_records(source) if isinstance(source, (str, Path)) else list(source)
    records, errors = parse_records(raw, fmt)
    if errors and on_error == "raise":
        raise errors[0]
    if errors:
        warnings.warn(f"skipped {len(errors)} malformed record(s): "
                      + "; ".join(str(e) for e in errors[:10])
                      + (" ..." if len(errors) > 10 else ""), stacklevel=2)
    return records


def load_builtin_facts(limit: int | None = None,
                       relations: Iterable[str] | None = None) -> list[EditRecord]:
    """pmsolve's own facts, all known to the unedited SmolLM2-135M-Instruct (see FACTS.md).

    Ordered round-robin over relations, so `limit=n` gives a mix of relations.
    """
    records = load_records(BUILTIN_FACTS, fmt="builtin")
    if relations is not None:
        wanted = set(relations)
        records = [r for r in records if r.relation in wanted]
    return records[:limit] if limit is not None else records
