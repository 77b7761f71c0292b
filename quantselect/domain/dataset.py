r"""Task datasets: the canonical item shapes, loading JSONL, JSON, CSV and Parquet, field mapping,
validation, and the text metrics of generation tasks.

Canonical JSONL, one item a line (the kind follows from the fields; one kind per dataset):
- multiple choice: {"prompt": str, "choices": [str, ...], "answer": int, "category"?: str}
- generation:      {"prompt": str, "reference": str, "category"?: str}
- prompts:         {"prompt": str, "category"?: str}   (no labels: scored against the baseline)
- texts:           {"text": str, "category"?: str}   (a corpus: the baseline's next-token distributions
  over the text itself, no generation -- llama.cpp's KL-divergence check on your own documents;
  ``max_new_tokens`` 0)
- conversations:   {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...], "category"?: str}
  instead of "prompt" (OpenAI chat format; ShareGPT's {"from": "human"|"gpt"|"system", "value": str}
  too). Rendered through the model's chat template with the assistant turn opened. A trailing
  assistant message is the item's reference (a generation item), else it is a prompts item. The
  default metric of a conversations dataset with references: final_number where every reference has
  GSM8K's ``####``, exact_match where every reference is a short answer (at most
  ``SHORT_ANSWER_WORDS`` words), else top1_agreement: a long reply in a chat log is what some model
  said, not the one right answer, and exact_match would score every candidate, the baseline too, 0.

Metrics (``TaskDataset.metric``); every item scores in [0, 1]:
- multiple choice: ``accuracy`` (lm-eval ``acc``), ``accuracy_norm`` (lm-eval ``acc_norm``);
- generation: ``exact_match`` (normalized: lower case, no punctuation or articles, whitespace
  collapsed; the first non-empty line of the output or the whole output), ``final_number`` (the
  number after the last ``####``, else the last number, compared by value: GSM8K's ``#### 1,234``),
  ``substring`` (the normalized reference occurs in the normalized output, as whole words);
- label-free (prompts datasets, and generation datasets whose references are then ignored), each
  relative to the full-precision baseline, which scores exactly 1 on every item:
  ``top1_agreement`` (fraction of positions where the candidate's most likely next token is the
  baseline's), ``kl_similarity`` (exp(-mean per-token KL(baseline || candidate))),
  ``baseline_match`` (the greedy output equals the baseline's). See ``engines/labelfree.py``.

A metric that cannot score an item (``final_number`` with a reference that holds no number, a
reference that normalizes to nothing) is an error naming the item, never a silent zero.

Generation settings (generation and prompts datasets; stored with the dataset, defaults per metric):
- ``max_new_tokens``: greedy tokens generated per item (``DEFAULT_MAX_NEW_TOKENS``: 32 for
  exact_match, 64 for substring and the label-free metrics, 256 for final_number, GSM8K-style
  reasoning);
- ``stop``: strings that end an output, which is cut before the first of them; they are searched
  for after the output's leading whitespace, so an answer that starts on a new line is not empty
  (``DEFAULT_STOP``: exact_match ``\n``, substring ``\n\n``, final_number ``Question:`` as
  lm-eval's GSM8K, none for the label-free metrics). The end-of-sequence token always stops;
- ``chat_template``: wrap each prompt as one user message in the tokenizer's chat template, with
  the assistant turn opened (instruct models).
A prompt longer than the model's context minus ``max_new_tokens`` is cut from the left (the item is
flagged ``truncated``).

Every error names the file, the line and the field, so the user knows what to fix.
"""

from __future__ import annotations

import csv
import io
import json
import re
import string
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from quantselect.errors import InputError

MULTIPLE_CHOICE = "multiple_choice"
GENERATION = "generation"
PROMPTS = "prompts"  # prompts only, no labels: label-free metrics against the baseline
MULTIPLE_CHOICE_METRICS = ("accuracy", "accuracy_norm")  # accuracy_norm: lm-eval's acc_norm
GENERATION_METRICS = ("exact_match", "final_number", "substring")
LABEL_FREE_METRICS = ("top1_agreement", "kl_similarity", "baseline_match")
TEACHER_FORCED_METRICS = ("top1_agreement", "kl_similarity")  # need no generated tokens (max_new_tokens 0)
METRICS = {
    MULTIPLE_CHOICE: MULTIPLE_CHOICE_METRICS,
    GENERATION: GENERATION_METRICS + LABEL_FREE_METRICS,
    PROMPTS: LABEL_FREE_METRICS,
}
DEFAULT_MAX_NEW_TOKENS = {"exact_match": 32, "substring": 64, "final_number": 256,
                          "top1_agreement": 64, "kl_similarity": 64, "baseline_match": 64}
DEFAULT_STOP: dict[str, tuple[str, ...]] = {
    "exact_match": ("\n",), "substring": ("\n\n",), "final_number": ("Question:",),
    "top1_agreement": (), "kl_similarity": (), "baseline_match": (),
}
MAX_NEW_TOKENS_LIMIT = 32768
SHORT_ANSWER_WORDS = 5  # a conversation's reply up to this long is a label (exact_match), longer a sample
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class Item:
    """``prompt`` is the text fed to the model; for a conversation (``messages``: (role, content)
    pairs ending with a user turn, rendered through the chat template) it is a readable
    ``role: content`` flattening, for display only."""

    prompt: str
    choices: tuple[str, ...] | None = None
    answer: int | None = None
    reference: str | None = None
    category: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if v is not None}
        if self.choices is not None:
            d["choices"] = list(self.choices)
        if self.messages is not None:
            del d["prompt"]
            d["messages"] = self.chat()
        return d

    def chat(self) -> list[dict[str, str]]:
        """The conversation as chat-template messages: ``messages``, or the prompt as one user turn."""
        if self.messages is None:
            return [{"role": "user", "content": self.prompt}]
        return [{"role": r, "content": c} for r, c in self.messages]


@dataclass(frozen=True)
class TaskDataset:
    """Validated items and how to score them. ``max_new_tokens``/``stop`` left as None take the
    metric's defaults (generation and prompts datasets; multiple choice has neither)."""

    kind: str  # MULTIPLE_CHOICE, GENERATION or PROMPTS
    metric: str  # one of METRICS[kind]
    items: tuple[Item, ...]
    source: str = "items"
    max_new_tokens: int | None = None
    stop: tuple[str, ...] | None = None
    chat_template: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.items, tuple):
            object.__setattr__(self, "items", tuple(self.items))
        if self.items and self.items[0].messages is not None:
            object.__setattr__(self, "chat_template", True)  # conversations are rendered through it
        if self.kind not in METRICS:
            raise InputError(f"{self.source}: unknown dataset kind {self.kind!r}")
        _check_metric(self.kind, self.metric)
        if self.kind == MULTIPLE_CHOICE:
            for name in ("max_new_tokens", "stop", "chat_template"):
                if getattr(self, name):
                    raise InputError(f"{name.replace('_', '-')} applies to generation and prompts datasets, "
                                     "not to a multiple-choice dataset")
            return
        n = self.max_new_tokens if self.max_new_tokens is not None else DEFAULT_MAX_NEW_TOKENS[self.metric]
        if n == 0 and self.metric not in TEACHER_FORCED_METRICS:
            raise InputError(f"max-new-tokens 0 scores only the text given, which {' and '.join(TEACHER_FORCED_METRICS)} "
                             f"do; metric {self.metric} needs generated tokens")
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_NEW_TOKENS_LIMIT:
            low = 0 if self.metric in TEACHER_FORCED_METRICS else 1
            raise InputError(f"max-new-tokens {n!r} must be an integer from {low} to {MAX_NEW_TOKENS_LIMIT}")
        stop = DEFAULT_STOP[self.metric] if self.stop is None else self.stop
        if isinstance(stop, str):
            stop = (stop,)
        stop = tuple(stop)
        for s in stop:
            if not isinstance(s, str) or not s:
                raise InputError(f"stop sequence {s!r} must be a non-empty string")
        object.__setattr__(self, "max_new_tokens", n)
        object.__setattr__(self, "stop", tuple(dict.fromkeys(stop)))
        object.__setattr__(self, "chat_template", bool(self.chat_template))
        check_references(self.items, self.metric, [f"{self.source}[{i}]" for i in range(len(self.items))])

    def __len__(self) -> int:
        return len(self.items)

    def slice(self, start: int, stop: int) -> "TaskDataset":
        """Items ``start:stop`` with every setting kept (chunks for early stopping); result indices
        of the slice count from 0."""
        return replace(self, items=self.items[start:stop])

    def sample(self, n: int, seed: int = 0) -> "TaskDataset":
        """A seeded random ``n`` of the items, kept in their order (all of them if there are fewer):
        a dataset sorted by category or difficulty is not cut to its first ones as ``limit`` cuts it."""
        if n >= len(self.items):
            return self
        import random

        keep = sorted(random.Random(seed).sample(range(len(self.items)), n))
        return replace(self, items=tuple(self.items[i] for i in keep))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "kind": self.kind,
            "metric": self.metric,
            "source": self.source,
            "items": [i.to_dict() for i in self.items],
        }
        if self.kind != MULTIPLE_CHOICE:
            d.update(max_new_tokens=self.max_new_tokens, stop=list(self.stop or ()), chat_template=self.chat_template)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TaskDataset":
        """Stored datasets from before the generation settings existed take the defaults."""
        return parse_records(d["items"], source=d.get("source", "items"), metric=d.get("metric"),
                             max_new_tokens=d.get("max_new_tokens"), stop=d.get("stop"),
                             chat_template=bool(d.get("chat_template", False)))


def _check_metric(kind: str, metric: str) -> None:
    if metric not in METRICS[kind]:
        what = {MULTIPLE_CHOICE: "a multiple-choice", GENERATION: "a generation", PROMPTS: "a prompts-only"}[kind]
        raise InputError(f"metric {metric!r} does not fit {what} dataset (use one of {', '.join(METRICS[kind])})")


# --- text metrics ---------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)
# A number: thousands groups "1,234", decimals "0.5" and ".5" (a trailing full stop is not part of
# it), an optional minus sign -- not a hyphen right after a letter, digit or bracket: "5-3" is 5 and 3.
def unescape(text: str, what: str) -> str:
    """``\\n``, ``\\t`` in a shell argument (``what``, named in the error) become the characters;
    other text (é, 中) stays as typed: the escapes are read from its Latin-1 bytes, the rest escaped first."""
    if "\\" not in text:
        return text
    try:
        return text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as e:
        raise InputError(f"{what}: {e.reason}; write a backslash as \\\\ (escapes: \\n, \\t, \\\\)") from None


_NUMBER = re.compile(r"-?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])\.\d+)")  # ".5"; not "No.5", "1..5"


def normalize_text(s: str, articles: bool = True) -> str:
    """Lower case, no punctuation, no articles (unless ``articles=False``), whitespace collapsed."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    if articles:
        s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _normalizer(reference: str) -> Callable[[str], str]:
    """SQuAD-style normalization, keeping the articles where the reference is nothing else (the
    answer "A" of a lettered question)."""
    return normalize_text if normalize_text(reference) else (lambda s: normalize_text(s, articles=False))


def exact_match(output: str, reference: str) -> bool:
    """The normalized reference equals the normalized first non-empty line of the output, or the
    whole normalized output."""
    norm = _normalizer(reference)
    first_line = output.strip().split("\n", 1)[0] if output.strip() else ""
    want = norm(reference)
    return bool(want) and (norm(first_line) == want or norm(output) == want)


def substring_match(output: str, reference: str) -> bool:
    """The normalized reference occurs in the normalized output, on word boundaries."""
    norm = _normalizer(reference)
    want = norm(reference)
    return bool(want) and f" {want} " in f" {norm(output)} "


def final_number(text: str) -> Decimal | None:
    """The first number after the last ``####`` (GSM8K's answer line), else the last number of the
    text; by value, so ``1,234``, ``1234`` and ``1234.00`` are equal."""
    if "####" in text:
        text = text.rsplit("####", 1)[1]
        found = _numbers(text)[:1]
    else:
        found = _numbers(text)[-1:]
    if not found:
        return None
    try:
        return Decimal(found[0].replace(",", ""))
    except InvalidOperation:  # pragma: no cover - the pattern only matches valid numbers
        return None


def _numbers(text: str) -> list[str]:
    out = []
    for m in _NUMBER.finditer(text):
        number, before = m.group(), text[m.start() - 1: m.start()]
        # before is "" at the start of the text (or right after "####"), where a minus is a sign
        if number.startswith("-") and before and (before.isalnum() or before in ")]"):
            number = number[1:]  # a hyphen or a subtraction, not a sign
        out.append(number)
    return out


def final_number_match(output: str, reference: str) -> bool:
    got, want = final_number(output), final_number(reference)
    return got is not None and want is not None and got == want


TEXT_METRICS = {"exact_match": exact_match, "final_number": final_number_match, "substring": substring_match}


def check_references(items: Iterable[Item], metric: str, wheres: list[str]) -> None:
    """Every reference can be scored by ``metric``; else an InputError naming the item."""
    if metric not in TEXT_METRICS:
        return
    for item, where in zip(items, wheres):
        ref = item.reference
        if ref is None or not ref.strip():
            raise InputError(f"{where}: metric {metric} needs a non-empty 'reference'")
        if metric == "final_number" and final_number(ref) is None:
            raise InputError(f"{where}: reference {ref[:60]!r} holds no number for metric final_number "
                             "(use exact_match or substring)")
        if metric != "final_number" and not normalize_text(ref, articles=False):
            raise InputError(f"{where}: reference {ref[:60]!r} is empty once normalized (lower case, no "
                             f"punctuation), so metric {metric} cannot score it")


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
    messages: str | None = None  # the field holding a conversation (ShareGPT's "conversations")
    text: str | None = None  # the field holding a document of a corpus (scored on its own tokens)
    labels_file: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    KEYS = ("prompt", "text", "messages", "choices", "answer", "reference", "category")

    @classmethod
    def parse(cls, pairs: Iterable[str], labels_file: str | None = None) -> "FieldMapping":
        """Parse ``key=value`` strings as given to ``--map``."""
        values: dict[str, Any] = {}
        given: dict[str, str] = {}  # key -> the pair that gave it: a second one is refused, not the last kept
        for pair in pairs:
            key, sep, value = pair.partition("=")
            key = key.strip()
            if not sep or key not in cls.KEYS or not value:
                raise InputError(
                    f"--map {pair!r}: expected KEY=VALUE with KEY one of {', '.join(cls.KEYS)}"
                )
            if key in given:
                raise InputError(f"--map {key}= given twice ({given[key]!r}, {pair!r}): give it once"
                                 + (" (choices=F1,F2 takes every choice)" if key == "choices" else ""))
            given[key] = pair
            if key == "choices":
                values[key] = tuple(v.strip() for v in value.split(",") if v.strip())
            elif key == "prompt":
                values[key] = unescape(value, f"--map {pair!r}")
            else:
                values[key] = value
        return cls(labels_file=labels_file, **values)

    @property
    def is_identity(self) -> bool:
        return not any((self.prompt, self.text, self.choices, self.answer, self.reference, self.category,
                        self.messages))

    def apply(self, record: dict[str, Any], where: str) -> dict[str, Any]:
        if self.is_identity:
            return dict(record)
        out: dict[str, Any] = {}
        prompt = self.prompt or "prompt"
        if sum(bool(k) for k in (self.prompt, self.text, self.messages)) > 1:
            raise InputError("--map: give one of prompt=, text= or messages=, not several")
        chat = self.messages or next((k for k in ("messages", "conversations") if k in record), None)
        if self.text:
            out["text"] = _field(record, self.text, where)
        elif chat and not self.prompt:
            out["messages"] = _field(record, chat, where)  # each message in OpenAI's or ShareGPT's form
        elif not self.prompt and "prompt" not in record and "text" in record:
            out["text"] = record["text"]  # a corpus, with only its category (say) mapped
        elif "{" in prompt:
            try:
                out["prompt"] = prompt.format(**record)
            except KeyError as e:
                raise InputError(f"{where}: field {e.args[0]!r} used in the prompt template is missing") from None
            except (IndexError, ValueError, AttributeError, TypeError) as e:  # "{}", "{q} }", "{q.x}", "{q:d}"
                raise InputError(f"{where}: prompt template {prompt!r} cannot be filled ({e}); name fields as "
                                 "{field} and write a literal brace as {{ or }}") from None
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


@contextmanager
def stat_errors(what: str, path: str | Path):
    """Around asking whether a path the user named is there (``is_file()``, ``exists()``): an error
    the file system answers instead of yes or no -- a name too long for it, a folder that may not be
    entered -- which those let through, is a one-line input error naming ``what`` it is and the path
    (shortened: it may be thousands of characters)."""
    try:
        yield
    except OSError as e:
        name = str(path)
        shown = name if len(name) <= 120 else f"{name[:80]}...{name[-20:]} ({len(name)} characters)"
        raise InputError(f"{what} {shown}: cannot read it ({e.strerror or e})") from None


def load_dataset(
    path: str | Path,
    mapping: FieldMapping | None = None,
    *,
    metric: str | None = None,
    limit: int | None = None,
    max_new_tokens: int | None = None,
    stop: Iterable[str] | None = None,
    chat_template: bool = False,
) -> TaskDataset:
    """Load a task dataset (JSONL; a JSON array in a .json file; CSV; Parquet), validating every item.
    ``metric``, ``max_new_tokens`` and ``stop`` left as None take the defaults (see the module
    docstring)."""
    path = _local(path, "dataset")
    mapping = mapping or FieldMapping()
    with stat_errors("dataset", path):
        found = path.is_file()
    if not found:
        raise InputError(f"{path}: dataset file not found")
    # with labels, every item is read: their counts must agree before the limit cuts the items
    raw = _read_records(path, None if mapping.labels_file else limit)
    if mapping.labels_file:
        labels = _read_labels(_local(mapping.labels_file, "labels"), len(raw))
        for (where, rec), label in zip(raw, labels):
            rec["answer"] = label
        raw = raw[:limit] if limit else raw
    records = [(where, mapping.apply(rec, where)) for where, rec in raw]
    return _validate(records, source=str(path), metric=metric, max_new_tokens=max_new_tokens, stop=stop,
                     chat_template=chat_template)


def parse_records(
    records: list[dict[str, Any]], *, source: str = "items", metric: str | None = None,
    max_new_tokens: int | None = None, stop: Iterable[str] | None = None, chat_template: bool = False,
) -> TaskDataset:
    """Validate items given inline (REST body, stored job)."""
    if not isinstance(records, list):
        raise InputError(f"{source}: expected a list of items")
    return _validate([(f"{source}[{i}]", r) for i, r in enumerate(records)], source=source, metric=metric,
                     max_new_tokens=max_new_tokens, stop=stop, chat_template=chat_template)


def _local(name: str | Path, what: str) -> Path:
    """The path of a file the user named (``what``: dataset, labels, calibration); an address
    (``https://``, ``s3://``), which Path would mangle into a missing file, is refused as such."""
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]+://", str(name)):
        raise InputError(f"{name}: URLs are not read ({what}): download it, or give a file of a Hub dataset, "
                         "hf://datasets/OWNER/NAME/PATH")
    return Path(name)


def _read_text(path: Path) -> str:
    """A UTF-8 text file, without the byte-order mark that Excel's "CSV UTF-8" and some editors write."""
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not valid UTF-8 text") from None


def _lines(text: str) -> list[str]:
    """Lines at LF (or CRLF) only: str.splitlines also splits at U+2028, U+0085 and the like, which
    JSON allows raw inside a string."""
    return [ln.removesuffix("\r") for ln in text.split("\n")]


def _read_records(path: Path, limit: int | None) -> list[tuple[str, dict[str, Any]]]:
    if path.suffix.lower() == ".parquet":
        return _read_parquet(path, limit)
    text = _read_text(path)
    out: list[tuple[str, dict[str, Any]]] = []
    if path.suffix.lower() == ".csv":
        rows = _csv_rows(path, text)
        _, header = next(rows, (0, []))
        for start, row in rows:
            if not row:  # a blank line
                continue
            if len(row) != len(header):
                fix = ("quote cells that contain commas" if len(row) > len(header)
                       else f"no {', '.join(repr(h) for h in header[len(row):])}")
                raise InputError(f"{path}:{start}: {len(row)} fields where the header has {len(header)}; {fix}")
            rec: dict[str, Any] = dict(zip(header, row))
            for name in ("choices", "messages", "conversations"):  # lists in a CSV cell are JSON
                if isinstance(rec.get(name), str) and rec[name].startswith("["):
                    rec[name] = _json(rec[name], f"{path}:{start}: field {name!r}")
            out.append((f"{path}:{start}", rec))
            if limit and len(out) >= limit:
                break
        return out
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):  # one JSON array of items
        records = _json(text, str(path), lines=True)
        for n, rec in enumerate(records[:limit] if limit else records):
            if not isinstance(rec, dict):
                raise InputError(f"{path}[{n}]: expected a JSON object, got {type(rec).__name__}")
            out.append((f"{path}[{n}]", rec))
        return out
    if path.suffix.lower() == ".json" and text.lstrip().startswith("{"):
        _not_one_object(path, text)
    for n, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        rec = _json(line, f"{path}:{n}")
        if not isinstance(rec, dict):
            raise InputError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
        out.append((f"{path}:{n}", rec))
        if limit and len(out) >= limit:
            break
    return out


# A cell may hold a long document: the csv module's default limit (128 KiB a cell) fails it. This
# one fits a C long everywhere (csv.field_size_limit takes one), and is set for the whole process.
CSV_FIELD_LIMIT = 2**31 - 1


def _csv_rows(path: Path, text: str) -> Iterator[tuple[int, list[str]]]:
    """(the line a row starts on, its cells) of a CSV text, the header first. ``newline=""``: a quoted
    cell keeps its line breaks, so a row may span lines. Strict: a stray quote is an error, where the
    lenient reader runs on to the next quote and silently merges rows into one."""
    if csv.field_size_limit() < CSV_FIELD_LIMIT:
        csv.field_size_limit(CSV_FIELD_LIMIT)
    rows = csv.reader(io.StringIO(text, newline=""), strict=True)
    end = 0
    while True:
        start = end + 1
        try:
            row = next(rows)
        except StopIteration:
            return
        except csv.Error as e:
            at = f" on line {rows.line_num}" if rows.line_num > start else ""
            raise InputError(f"{path}:{start}: malformed CSV ({e}{at}); a cell that starts with a quote ends with "
                             'one, and a quote inside it is doubled ("")') from None
        end = rows.line_num
        yield start, row


def _json(text: str, where: str, lines: bool = False) -> Any:
    """``text`` parsed as JSON; what Python's parser raises as an input error naming ``where`` (with
    the line in a multi-line ``text``, ``lines``): malformed JSON, nesting too deep for its recursion,
    an integer longer than it converts (``sys.get_int_max_str_digits``, 4300 digits)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        # e.msg may end with "at" ("Unterminated string starting at"), the column then following it
        at = f"{where}:{e.lineno}" if lines else where
        raise InputError(f"{at}: malformed JSON ({e.msg}{'' if e.msg.endswith(' at') else ' at'} "
                         f"column {e.colno})") from None
    except RecursionError:
        raise InputError(f"{where}: JSON nested too deeply to read (over ~{sys.getrecursionlimit()} levels)") from None
    except ValueError as e:  # the int conversion's limit: name the field and line of the long number
        most = sys.get_int_max_str_digits()
        found = re.search(r'(?:"((?:[^"\\]|\\.)*)"\s*:\s*)?-?(\d{%d,})' % (most + 1), text) if most else None
        if found is None:
            raise InputError(f"{where}: {str(e).split(';')[0]}") from None
        line = f"{where}:{text.count(chr(10), 0, found.start()) + 1}" if lines else where
        name = f"field {found[1]!r} holds " if found[1] is not None else ""
        raise InputError(f"{line}: {name}a number of {len(found[2])} digits, more than the {most} that can be "
                         "read; quote it if it is text") from None


def _not_one_object(path: Path, text: str) -> None:
    """A .json file that is one object wrapping the items (``{"items": [...]}``), or one object
    written over several lines, rather than an array of items or JSON Lines (one item a line, which
    some .json files are): said as such, not as an item that lacks its fields."""
    try:
        whole = json.loads(text)
    except (ValueError, RecursionError):  # JSON Lines (or malformed): read, and said, line by line
        return
    if not isinstance(whole, dict):
        return
    lists = [k for k, v in whole.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)
             and k not in ("messages", "conversations")]
    items = {"prompt", "text", "messages", "conversations"} & set(whole)
    if sum(bool(ln.strip()) for ln in _lines(text)) > 1 or (lists and not items):
        inside = f"; are the items its {lists[0]!r}? give that list" if lists else ""
        raise InputError(f"{path}: one JSON object; expected a JSON array of items (or JSON Lines, an item a "
                         f"line){inside}")


def _read_parquet(path: Path, limit: int | None) -> list[tuple[str, dict[str, Any]]]:
    """A Parquet file (how Hugging Face datasets are stored), a row an item (``file[0]`` is the
    first); list columns (choices, messages) come as lists."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow), or give JSONL") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow's ArrowInvalid and OSError: not a Parquet file, truncated
        raise InputError(f"{path}: not a readable Parquet file ({' '.join(str(e).split())[:120]})") from None
    if limit:
        table = table.slice(0, limit)
    # a null cell is a missing field, as a key left out of a JSON line
    return [(f"{path}[{n}]", {k: v for k, v in rec.items() if v is not None}) for n, rec in enumerate(table.to_pylist())]


def _read_labels(path: Path, n: int) -> list[int]:
    """The labels of a dataset of ``n`` items (all of its file's, before any limit): exactly one a
    line, as the items. A count that differs is a label left out or added, which shifts every later
    one onto the wrong item."""
    with stat_errors("labels", path):
        found = path.is_file()
    if not found:
        raise InputError(f"{path}: labels file not found")
    labels = []
    for i, line in enumerate(_lines(_read_text(path)), start=1):
        if not line.strip():
            continue
        if not re.fullmatch(r"\s*[-+]?[0-9]{1,18}\s*", line):  # (int() takes "1_0", "²" and 5000 digits, slowly)
            raise InputError(f"{path}:{i}: label {line.strip()[:40]!r} is not an integer (a choice's index)")
        labels.append(int(line))
    if len(labels) != n:
        raise InputError(f"{path}: {len(labels)} labels for {n} items: one label per line, in the dataset's order")
    return labels


def _validate(
    records: list[tuple[str, dict[str, Any]]], *, source: str, metric: str | None,
    max_new_tokens: int | None = None, stop: Iterable[str] | None = None, chat_template: bool = False,
) -> TaskDataset:
    if not records:
        raise InputError(f"{source}: the dataset is empty")
    items: list[Item] = []
    kind = shape = None
    for where, rec in records:
        item_kind, item = _item(rec, where)
        if kind is None:
            kind = item_kind
        elif item_kind != kind:
            raise InputError(f"{where}: a {_KIND_NAMES[item_kind]} item in a {_KIND_NAMES[kind]} dataset; "
                             "do not mix kinds")
        # how the item gives its input: a prompt, a text (a corpus, no generation) or a conversation
        mine = "conversation" if item.messages is not None else "text" if "prompt" not in rec else "prompt"
        if shape is None:
            shape = mine
        elif mine != shape:
            raise InputError(f"{where}: a {mine} item in a dataset of {shape}s; give every item "
                             f"'{_SHAPE_FIELDS[shape]}' or every item '{_SHAPE_FIELDS[mine]}'")
        items.append(item)
    assert kind is not None
    if metric is None:
        if kind == MULTIPLE_CHOICE:
            metric = "accuracy"
        elif kind == PROMPTS:
            metric = "top1_agreement"
        elif all("####" in (i.reference or "") for i in items):
            metric = "final_number"
        elif 2 * sum("####" in (i.reference or "") for i in items) > len(items):
            # GSM8K's answer lines, one of them mistyped ("### 18"): not a reason to score every item
            # by exact match of its whole worked answer
            n = sum("####" in (i.reference or "") for i in items)
            where, ref = next((w, i.reference or "") for (w, _), i in zip(records, items)
                              if "####" not in (i.reference or ""))
            raise InputError(f"{where}: reference ending {ref[-40:]!r} has no '####' answer line, which {n} of "
                             f"{len(items)} references have; fix it, or choose the scoring with --metric")
        elif items[0].messages is not None and any(len((i.reference or "").split()) > SHORT_ANSWER_WORDS
                                                   for i in items):
            metric = "top1_agreement"  # replies in a chat log are samples, not the one right answer
        else:
            metric = "exact_match"
    _check_metric(kind, metric)
    check_references(items, metric, [where for where, _ in records])
    if isinstance(stop, str):
        stop = (stop,)
    if shape == "text" and max_new_tokens is None:
        max_new_tokens = 0
    return TaskDataset(kind=kind, metric=metric, items=tuple(items), source=source, max_new_tokens=max_new_tokens,
                       stop=None if stop is None else tuple(stop), chat_template=chat_template)


_SHAPE_FIELDS = {"prompt": "prompt", "text": "text", "conversation": "messages"}
_KIND_NAMES = {MULTIPLE_CHOICE: "multiple_choice", GENERATION: "generation",
               PROMPTS: "prompts-only (no 'choices' or 'reference')"}


def _item(rec: dict[str, Any], where: str) -> tuple[str, Item]:
    category = rec.get("category")
    if category is not None and not isinstance(category, str):
        category = str(category)
    if "messages" in rec or "conversations" in rec:
        return _conversation(rec, where, category)
    if "text" in rec and "prompt" not in rec:
        text = rec["text"]
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{where}: field 'text' must be a non-empty string")
        extra = [k for k in ("choices", "answer", "reference") if k in rec]
        if extra:
            raise InputError(f"{where}: a text item is scored on its own tokens against the baseline; it takes no "
                             f"{extra[0]!r} (give 'prompt' for a task item)")
        return PROMPTS, Item(prompt=text, category=category)
    prompt = rec.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"{where}: field 'prompt' must be a non-empty string (or give 'messages', a conversation)")
    if "choices" in rec:
        choices = rec["choices"]
        if not isinstance(choices, list) or len(choices) < 2:
            raise InputError(f"{where}: field 'choices' must be a list of at least 2 strings")
        for c in choices:
            if not isinstance(c, str) or not c.strip():
                raise InputError(f"{where}: field 'choices' has an empty or non-string choice")
        answer = rec.get("answer")
        if isinstance(answer, str) and re.fullmatch(r"\s*-?[0-9]{1,18}\s*", answer):  # not "--1", "²", 5000 digits
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
    if "answer" in rec:
        raise InputError(
            f"{where}: an item with an 'answer' needs 'choices' (multiple choice); a generation item needs 'reference'"
        )
    return PROMPTS, Item(prompt=prompt, category=category)


def _conversation(rec: dict[str, Any], where: str, category: str | None) -> tuple[str, Item]:
    """An item given as a conversation: OpenAI's ``messages`` ({"role", "content"}, content a string
    or a list of text parts) or ShareGPT's ``conversations`` ({"from": "human"|"gpt"|"system",
    "value"}). A trailing assistant turn is the reference."""
    name = "messages" if "messages" in rec else "conversations"
    if "prompt" in rec:
        raise InputError(f"{where}: give 'prompt' or '{name}', not both")
    if "choices" in rec:
        raise InputError(f"{where}: a conversation item ('{name}') is a generation or prompts item; "
                         "multiple choice needs 'prompt' and 'choices'")
    turns = rec[name]
    if not isinstance(turns, list) or not turns:
        raise InputError(f"{where}: field '{name}' must be a non-empty list of messages")
    messages: list[tuple[str, str]] = []
    for n, m in enumerate(turns):
        at = f"{where}: {name}[{n}]"
        if not isinstance(m, dict):
            raise InputError(f"{at} must be an object with 'role' and 'content'")
        if "role" in m or "content" in m:
            role, content = m.get("role"), m.get("content")
            role = "system" if role == "developer" else role  # OpenAI's newer name for the system turn
        else:  # ShareGPT
            role, content = SHAREGPT_ROLES.get(m.get("from"), m.get("from")), m.get("value")
        if role not in ROLES:
            raise InputError(f"{at}: role {role!r} must be one of {', '.join(ROLES)} (or ShareGPT's human, gpt)")
        if isinstance(content, list):  # OpenAI content parts: only text can be evaluated here
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise InputError(f"{at}: only text content parts ({{\"type\": \"text\", \"text\": ...}}) "
                                 "can be evaluated")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str) or not content.strip():
            raise InputError(f"{at}: 'content' must be a non-empty string")
        messages.append((role, content))
    reference = rec.get("reference")
    if messages[-1][0] == "assistant":
        if reference is not None:
            raise InputError(f"{where}: the answer is the last assistant message or 'reference', not both")
        reference = messages.pop()[1]
    if not messages or messages[-1][0] != "user":
        raise InputError(f"{where}: field '{name}' must end with a user message (optionally followed by the "
                         "assistant's answer, the reference)")
    prompt = "\n\n".join(f"{r}: {c}" for r, c in messages)
    if reference is None:
        return PROMPTS, Item(prompt=prompt, category=category, messages=tuple(messages))
    if isinstance(reference, (int, float)) and not isinstance(reference, bool):
        reference = str(reference)
    if not isinstance(reference, str) or not reference.strip():
        raise InputError(f"{where}: field 'reference' must be a non-empty string")
    return GENERATION, Item(prompt=prompt, reference=reference, category=category, messages=tuple(messages))


def calibration_samples(items: Iterable[Item], chat_template: bool = False) -> list[str | list[dict[str, str]]]:
    """What GPTQ/AWQ calibrate on: each item's prompt followed by its answer where it has one (the
    text the deployed model would see and produce). With the chat template (conversations, or
    ``chat_template``) a sample is the conversation with the answer as the assistant's turn, which
    the quantizing worker renders through the model's template."""
    out: list[str | list[dict[str, str]]] = []
    for it in items:
        answer = it.choices[it.answer] if it.choices is not None and it.answer is not None else it.reference
        if chat_template or it.messages is not None:
            out.append(it.chat() + ([{"role": "assistant", "content": answer}] if answer else []))
        else:
            out.append(f"{it.prompt} {answer}" if answer else it.prompt)
    return out


def load_calibration_file(path: str | Path) -> list[str | list[dict[str, str]]]:
    """Calibration samples from a file: ``.txt`` has one sample per non-empty line; ``.jsonl`` has a
    ``text`` field per line, or is a task dataset (its prompts and answers are used; conversations
    stay conversations, rendered through the chat template by the worker)."""
    path = _local(path, "calibration")
    with stat_errors("calibration", path):
        found = path.is_file()
    if not found:
        raise InputError(f"{path}: calibration file not found")
    if path.suffix.lower() == ".txt":
        texts: list[Any] = [ln.strip() for ln in _lines(_read_text(path)) if ln.strip()]
    else:
        records = _read_records(path, None)
        if records and all(isinstance(r.get("text"), str) for _, r in records):
            texts = [r["text"] for _, r in records if r["text"].strip()]
        else:
            texts = calibration_samples(_validate(records, source=str(path), metric=None).items) if records else []
    if not texts:
        raise InputError(f"{path}: the calibration file holds no samples")
    return texts
