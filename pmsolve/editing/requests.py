"""Edit requests: parsing (dicts, JSON, JSONL) and validation before any weight changes.

Two forms are accepted, and this module is the one place that reads either (``pmsolve.edit``,
the evaluation loaders and every command call it):

- pmsolve's template form: ``prompt`` holds ``{}`` where the subject goes
  (``{"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", ...}``);
- the full-prompt form of EasyEdit and flat CounterFact files: ``prompt`` (or ``prompts``)
  is the whole text with the subject written out, ``ground_truth`` is the true target
  (``{"prompts": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
  "ground_truth": "French", "target_new": "English"}``). The subject must occur exactly
  once in the prompt: the edit needs to know which token is the subject's last, so a
  subject that is absent, or present twice, is refused naming the request.

EasyEdit's batched call (parallel lists ``prompts``, ``subject``, ``ground_truth``,
``target_new`` in one mapping) is accepted too, as one request per position.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError

_PLACEHOLDER = "{}"


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: ``prompt`` with its ``{}`` replaced by ``subject`` should be
    completed by ``target_new``."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None

    @property
    def text(self) -> str:
        # replace, not str.format: the keys and values are computed on exactly this text
        # (pmsolve.editing.keys), and a prompt may hold other braces.
        return self.prompt.replace(_PLACEHOLDER, self.subject, 1)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _occurrences(text: str, part: str) -> list[int]:
    """Start offsets of ``part`` in ``text``, overlapping ones included ("aa" in "aaa": 2)."""
    found, at = [], text.find(part)
    while at >= 0:
        found.append(at)
        at = text.find(part, at + 1)
    return found


def subject_template(prompt: str, subject: str) -> str:
    """The prompt in template form: ``prompt`` itself when it holds ``{}`` (exactly once),
    else the full prompt with its one occurrence of ``subject`` replaced by ``{}``.

    Raises ValueError with the reason (callers add which request or record it was): ``{}``
    more than once; the subject absent from a full prompt, or occurring more than once
    (ambiguous: which occurrence is edited decides the keys).
    """
    n = len(_occurrences(prompt, _PLACEHOLDER))
    if n == 1:
        return prompt
    if n > 1:
        raise ValueError(f"the prompt holds '{{}}' {n} times; a template prompt has it exactly once, "
                         f"where the subject goes: {prompt!r}")
    if not subject.strip():
        raise ValueError("the subject is empty")
    at = _occurrences(prompt, subject)
    if not at:
        raise ValueError(f"the subject {subject!r} does not occur in the prompt {prompt!r} "
                         "(write it out in the prompt, or put '{}' where it goes)")
    if len(at) > 1:
        raise ValueError(f"the subject {subject!r} occurs {len(at)} times in the prompt {prompt!r}: "
                         "ambiguous; write the prompt with '{}' where the edited occurrence goes")
    return prompt[: at[0]] + _PLACEHOLDER + prompt[at[0] + len(subject):]


def _target(value: Any) -> Any:
    # CounterFact stores targets as {"str": "English", "id": ...}.
    if isinstance(value, Mapping) and "str" in value:
        return value["str"]
    return value


def _one_prompt(i: int, rec: Mapping) -> Any:
    """``prompt``, else EasyEdit's ``prompts`` (a string, or a list holding one)."""
    if rec.get("prompt") is not None:
        if rec.get("prompts") is not None and rec.get("prompts") not in (rec["prompt"], [rec["prompt"]]):
            raise InputError(f"request {i}: both 'prompt' and 'prompts' are given and differ")
        return rec["prompt"]
    prompts = rec.get("prompts")
    if isinstance(prompts, (list, tuple)):
        if len(prompts) != 1:
            raise InputError(f"request {i}: 'prompts' holds {len(prompts)} prompts; one request edits one "
                             "prompt (pass one request per prompt, or parallel lists in one mapping)")
        return prompts[0]
    return prompts


def _from_mapping(i: int, rec: Any) -> EditRequest:
    if isinstance(rec, EditRequest):
        return rec
    if callable(getattr(rec, "as_request", None)):  # pmsolve.evaluation.EditRecord
        rec = rec.as_request()
    if not isinstance(rec, Mapping):
        raise InputError(f"request {i}: expected an object with prompt/subject/target_new, got {type(rec).__name__}")
    rec = rec.get("requested_rewrite", rec)  # CounterFact nests the request
    true, truth = _target(rec.get("target_true")), _target(rec.get("ground_truth"))
    if true is not None and truth is not None and true != truth:
        raise InputError(f"request {i}: 'target_true' ({true!r}) and 'ground_truth' ({truth!r}) differ")
    fields = {"prompt": _one_prompt(i, rec), "subject": rec.get("subject"),
              "target_new": _target(rec.get("target_new")), "target_true": true if true is not None else truth}
    for key in ("prompt", "subject", "target_new"):
        if not isinstance(fields[key], str):
            name = "'prompt' (or 'prompts')" if key == "prompt" else repr(key)
            raise InputError(f"request {i}: {name} is missing or not a string (got {fields[key]!r})")
    if fields["target_true"] is not None and not isinstance(fields["target_true"], str):
        raise InputError(f"request {i}: 'target_true' must be a string, got {fields['target_true']!r}")
    try:
        fields["prompt"] = subject_template(fields["prompt"], fields["subject"])
    except ValueError as exc:
        raise InputError(f"request {i}: {exc}") from None
    return EditRequest(**fields)


def _parallel_lists(source: Mapping) -> list[dict[str, Any]] | None:
    """EasyEdit's batched form {prompts: [...], subject: [...], target_new: [...], ground_truth: [...]}
    as one dict per position; None when ``source`` is not in that form."""
    if not isinstance(source.get("prompts"), (list, tuple)) or not isinstance(source.get("subject"), (list, tuple)):
        return None
    keys = [k for k in ("prompts", "subject", "target_new", "ground_truth", "target_true") if k in source]
    lengths = {k: len(source[k]) for k in keys if isinstance(source[k], (list, tuple))}
    if set(keys) - set(lengths) or len(set(lengths.values())) != 1:
        raise InputError(f"parallel request lists must all be lists of one length, got lengths {lengths}")
    return [{("prompt" if k == "prompts" else k): source[k][j] for k in keys} for j in range(len(source["prompts"]))]


def _validate_one(i: int, r: EditRequest) -> None:
    if not r.subject.strip():
        raise InputError(f"request {i}: the subject is empty")
    if len(_occurrences(r.prompt, _PLACEHOLDER)) != 1:
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


def validate(requests: Iterable[Any] | Mapping[str, Any]) -> list[EditRequest]:
    """Parse and check a batch of requests (either form, see the module's doc); raise InputError
    naming the first bad index. A single mapping is one request, or EasyEdit's parallel lists."""
    if isinstance(requests, (str, bytes)):
        raise InputError("requests must be objects or a file path (os.PathLike), got a string of text")
    if isinstance(requests, Mapping):
        requests = _parallel_lists(requests) or [requests]
    reqs = [_from_mapping(i, r) for i, r in enumerate(requests)]
    if not reqs:
        raise InputError("no edit requests given")
    for i, r in enumerate(reqs):
        _validate_one(i, r)
    _check_conflicts(reqs)
    return reqs


def load_requests(source: str | os.PathLike[str] | Iterable[Any]) -> list[EditRequest]:
    """Requests from a JSON file (a list or one object), a JSONL file, an iterable of dicts or
    EditRequests, or one mapping (see :func:`validate`); a str is a file path."""
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
        if isinstance(data, Mapping):
            return _parallel_lists(data) or [data]
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
