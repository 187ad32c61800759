"""Edit requests: parsing (dicts, JSON, JSONL) and validation before any weight changes."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: ``prompt.format(subject)`` should be completed by ``target_new``."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None

    @property
    def text(self) -> str:
        return self.prompt.format(self.subject)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _target(value: Any) -> Any:
    # CounterFact stores targets as {"str": "English", "id": ...}.
    if isinstance(value, Mapping) and "str" in value:
        return value["str"]
    return value


def _from_mapping(i: int, rec: Any) -> EditRequest:
    if isinstance(rec, EditRequest):
        return rec
    if callable(getattr(rec, "as_request", None)):  # pmsolve.evaluation.EditRecord
        rec = rec.as_request()
    if not isinstance(rec, Mapping):
        raise InputError(f"request {i}: expected an object with prompt/subject/target_new, got {type(rec).__name__}")
    rec = rec.get("requested_rewrite", rec)  # CounterFact nests the request
    fields = {k: _target(rec.get(k)) for k in ("prompt", "subject", "target_new", "target_true")}
    for key in ("prompt", "subject", "target_new"):
        if not isinstance(fields[key], str):
            raise InputError(f"request {i}: {key!r} is missing or not a string (got {fields[key]!r})")
    if fields["target_true"] is not None and not isinstance(fields["target_true"], str):
        raise InputError(f"request {i}: 'target_true' must be a string, got {fields['target_true']!r}")
    return EditRequest(**fields)


def _validate_one(i: int, r: EditRequest) -> None:
    if not r.subject.strip():
        raise InputError(f"request {i}: the subject is empty")
    if r.prompt.count("{}") != 1:
        raise InputError(
            f"request {i}: the prompt must contain '{{}}' exactly once where the subject goes, got {r.prompt!r}"
        )
    if not r.target_new.strip():
        raise InputError(f"request {i}: target_new is empty")
    if r.target_true is not None and not r.target_true.strip():
        raise InputError(f"request {i}: target_true is empty (omit it instead)")
    if r.target_true is not None and r.target_true.strip() == r.target_new.strip():
        raise InputError(f"request {i}: target_new equals target_true ({r.target_new!r}): nothing to edit")


def _check_conflicts(reqs: list[EditRequest]) -> None:
    seen: dict[tuple[str, str], int] = {}
    for i, r in enumerate(reqs):
        key = (r.subject.strip(), r.prompt.strip())
        j = seen.setdefault(key, i)
        if j != i and reqs[j].target_new.strip() != r.target_new.strip():
            raise InputError(
                f"requests {j} and {i} conflict: same subject {r.subject!r} and prompt {r.prompt!r} but "
                f"different targets {reqs[j].target_new!r} and {r.target_new!r}"
            )


def validate(requests: Iterable[Any]) -> list[EditRequest]:
    """Parse and check a batch of requests; raise InputError naming the first bad index."""
    reqs = [_from_mapping(i, r) for i, r in enumerate(requests)]
    if not reqs:
        raise InputError("no edit requests given")
    for i, r in enumerate(reqs):
        _validate_one(i, r)
    _check_conflicts(reqs)
    return reqs


def load_requests(source: str | os.PathLike[str] | Iterable[Any]) -> list[EditRequest]:
    """Requests from a JSON file (a list or one object), a JSONL file, or an iterable of dicts."""
    if not isinstance(source, (str, os.PathLike)):
        return validate(source)
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read requests file {path}: {exc}") from None
    return validate(_parse_text(text, path))


def _parse_text(text: str, path: Path) -> list[Any]:
    try:
        data = json.loads(text)
        return data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        pass
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{lineno}: neither a JSON document nor valid JSONL ({exc.msg})") from None
    return records
