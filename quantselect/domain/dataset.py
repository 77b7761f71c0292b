"""Task datasets: the canonical item shapes, loading JSONL/CSV, field mapping, validation.

Canonical JSONL, one item a line:
- multiple choice: {"prompt": str, "choices": [str, ...], "answer": int, "category"?: str}
- generation:      {"prompt": str, "reference": str, "category"?: str}

Every error names the file, the line and the field, so the user knows what to fix.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from quantselect.errors import InputError

MULTIPLE_CHOICE = "multiple_choice"
GENERATION = "generation"
MULTIPLE_CHOICE_METRICS = ("accuracy", "accuracy_norm")  # accuracy_norm: lm-eval's acc_norm
GENERATION_METRICS = ("exact_match", "final_number")


@dataclass(frozen=True)
class Item:
    prompt: str
    choices: tuple[str, ...] | None = None
    answer: int | None = None
    reference: str | None = None
    category: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if v is not None}
        if self.choices is not None:
            d["choices"] = list(self.choices)
        return d


@dataclass(frozen=True)
class TaskDataset:
    kind: str  # MULTIPLE_CHOICE or GENERATION
    metric: str  # one of MULTIPLE_CHOICE_METRICS or GENERATION_METRICS, as ``kind`` says
    items: tuple[Item, ...]
    source: str = "items"

    def __len__(self) -> int:
        return len(self.items)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "metric": self.metric,
            "source": self.source,
            "items": [i.to_dict() for i in self.items],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TaskDataset":
        return parse_records(d["items"], source=d.get("source", "items"), metric=d.get("metric"))


@dataclass(frozen=True)
class FieldMapping:
    """How to read a dataset in another shape.

    ``prompt`` is a template (``"Question: {goal}\\nAnswer:"``) or a bare field name; ``choices`` is a
    list of field names (one field per choice) or a single field holding a list; ``labels_file``
    holds one answer index per line, aligned with the dataset (PIQA's ``valid-labels.lst``).
    """

    prompt: str | None = None
    choices: tuple[str, ...] | None = None
    answer: str | None = None
    reference: str | None = None
    category: str | None = None
    labels_file: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    KEYS = ("prompt", "choices", "answer", "reference", "category")

    @classmethod
    def parse(cls, pairs: Iterable[str], labels_file: str | None = None) -> "FieldMapping":
        """Parse ``key=value`` strings as given to ``--map``."""
        values: dict[str, Any] = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            key = key.strip()
            if not sep or key not in cls.KEYS or not value:
                raise InputError(
                    f"--map {pair!r}: expected KEY=VALUE with KEY one of {', '.join(cls.KEYS)}"
                )
            if key == "choices":
                values[key] = tuple(v.strip() for v in value.split(",") if v.strip())
            else:
                values[key] = value.encode().decode("unicode_escape") if key == "prompt" else value
        return cls(labels_file=labels_file, **values)

    @property
    def is_identity(self) -> bool:
        return not any((self.prompt, self.choices, self.answer, self.reference, self.category))

    def apply(self, record: dict[str, Any], where: str) -> dict[str, Any]:
        if self.is_identity:
            return dict(record)
        out: dict[str, Any] = {}
        prompt = self.prompt or "prompt"
        if "{" in prompt:
            try:
                out["prompt"] = prompt.format(**record)
            except KeyError as e:
                raise InputError(f"{where}: field {e.args[0]!r} used in the prompt template is missing") from None
        else:
            out["prompt"] = _field(record, prompt, where)
        if self.choices:
            if len(self.choices) == 1:
                out["choices"] = _field(record, self.choices[0], where)
            else:
                out["choices"] = [_field(record, c, where) for c in self.choices]
        elif "choices" in record:
            out["choices"] = record["choices"]
        for key in ("answer", "reference", "category"):
            name = getattr(self, key) or key
            if name in record:
                out[key] = record[name]
            elif getattr(self, key):
                raise InputError(f"{where}: missing field {name!r} (mapped to {key})")
        return out


def _field(record: dict[str, Any], name: str, where: str) -> Any:
    if name not in record:
        raise InputError(f"{where}: missing field {name!r}")
    return record[name]


def load_dataset(
    path: str | Path,
    mapping: FieldMapping | None = None,
    *,
    metric: str | None = None,
    limit: int | None = None,
) -> TaskDataset:
    """Load a JSONL (or CSV) task dataset, validating every item."""
    path = Path(path)
    mapping = mapping or FieldMapping()
    if not path.is_file():
        raise InputError(f"{path}: dataset file not found")
    raw = _read_records(path, limit)
    if mapping.labels_file:
        labels = _read_labels(Path(mapping.labels_file), len(raw))
        for (where, rec), label in zip(raw, labels):
            rec["answer"] = label
    records = [(where, mapping.apply(rec, where)) for where, rec in raw]
    return _validate(records, source=str(path), metric=metric)


def parse_records(
    records: list[dict[str, Any]], *, source: str = "items", metric: str | None = None
) -> TaskDataset:
    """Validate items given inline (REST body, stored job)."""
    if not isinstance(records, list):
        raise InputError(f"{source}: expected a list of items")
    return _validate([(f"{source}[{i}]", r) for i, r in enumerate(records)], source=source, metric=metric)


def _read_records(path: Path, limit: int | None) -> list[tuple[str, dict[str, Any]]]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not valid UTF-8 text") from None
    out: list[tuple[str, dict[str, Any]]] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        for n, row in enumerate(reader, start=2):
            rec: dict[str, Any] = dict(row)
            if isinstance(rec.get("choices"), str) and rec["choices"].startswith("["):
                try:
                    rec["choices"] = json.loads(rec["choices"])
                except json.JSONDecodeError:
                    raise InputError(f"{path}:{n}: field 'choices' is not a JSON list") from None
            out.append((f"{path}:{n}", rec))
            if limit and len(out) >= limit:
                break
        return out
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise InputError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
        out.append((f"{path}:{n}", rec))
        if limit and len(out) >= limit:
            break
    return out


def _read_labels(path: Path, n: int) -> list[int]:
    if not path.is_file():
        raise InputError(f"{path}: labels file not found")
    labels = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            labels.append(int(line))
        except ValueError:
            raise InputError(f"{path}:{i}: label {line.strip()!r} is not an integer") from None
    if len(labels) < n:
        raise InputError(f"{path}: has {len(labels)} labels for {n} items")
    return labels[:n]


def _validate(
    records: list[tuple[str, dict[str, Any]]], *, source: str, metric: str | None
) -> TaskDataset:
    if not records:
        raise InputError(f"{source}: the dataset is empty")
    items: list[Item] = []
    kind = None
    for where, rec in records:
        item_kind, item = _item(rec, where)
        if kind is None:
            kind = item_kind
        elif item_kind != kind:
            raise InputError(f"{where}: a {item_kind} item in a {kind} dataset; do not mix the two")
        items.append(item)
    assert kind is not None
    if kind == MULTIPLE_CHOICE:
        if metric not in (None, *MULTIPLE_CHOICE_METRICS):
            raise InputError(
                f"metric {metric!r} does not fit a multiple-choice dataset (use one of {', '.join(MULTIPLE_CHOICE_METRICS)})"
            )
        metric = metric or "accuracy"
    else:
        if metric is None:
            metric = "final_number" if all("####" in (i.reference or "") for i in items) else "exact_match"
        if metric not in GENERATION_METRICS:
            raise InputError(
                f"metric {metric!r} does not fit a generation dataset (use one of {', '.join(GENERATION_METRICS)})"
            )
    return TaskDataset(kind=kind, metric=metric, items=tuple(items), source=source)


def _item(rec: dict[str, Any], where: str) -> tuple[str, Item]:
    prompt = rec.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"{where}: field 'prompt' must be a non-empty string")
    category = rec.get("category")
    if category is not None and not isinstance(category, str):
        category = str(category)
    if "choices" in rec:
        choices = rec["choices"]
        if not isinstance(choices, list) or len(choices) < 2:
            raise InputError(f"{where}: field 'choices' must be a list of at least 2 strings")
        for c in choices:
            if not isinstance(c, str) or not c.strip():
                raise InputError(f"{where}: field 'choices' has an empty or non-string choice")
        answer = rec.get("answer")
        if isinstance(answer, str) and answer.strip().lstrip("-").isdigit():
            answer = int(answer)
        if not isinstance(answer, int) or isinstance(answer, bool):
            raise InputError(f"{where}: field 'answer' must be the integer index of the right choice")
        if not 0 <= answer < len(choices):
            raise InputError(
                f"{where}: field 'answer' is {answer}, out of range for {len(choices)} choices (0..{len(choices) - 1})"
            )
        return MULTIPLE_CHOICE, Item(prompt=prompt, choices=tuple(choices), answer=answer, category=category)
    if "reference" in rec:
        ref = rec["reference"]
        if isinstance(ref, (int, float)) and not isinstance(ref, bool):
            ref = str(ref)
        if not isinstance(ref, str) or not ref.strip():
            raise InputError(f"{where}: field 'reference' must be a non-empty string")
        return GENERATION, Item(prompt=prompt, reference=ref, category=category)
    raise InputError(
        f"{where}: an item needs 'choices' and 'answer' (multiple choice) or 'reference' (generation)"
    )
