"""Item by item: where a candidate and another (the baseline by default) scored differently, with
the prompt, what was expected and what each one answered -- the examples behind a relative score
("int4 gets the long multiplications wrong"), as `quantselect compare` shows them.

Pure: it takes the job's evaluated dataset and the stored per-item results of the two candidates.
Items only one of them scored (a candidate stopped early, or still running) are left out and
counted."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from quantselect.domain.dataset import LABEL_FREE_METRICS, TaskDataset
from quantselect.domain.results import ItemResult


@dataclass(frozen=True)
class ItemDiff:
    index: int  # the item's position in the job's evaluated dataset (`results --items`)
    category: str | None
    prompt: str
    expected: str | None  # the right choice or the reference; None where the metric has none (label-free)
    against_output: str | None  # the choice picked or the text generated; None where not stored
    candidate_output: str | None
    against_score: float
    candidate_score: float


@dataclass(frozen=True)
class ItemComparison:
    candidate: str
    against: str
    metric: str
    n_items: int  # items both scored
    candidate_score: float | None  # mean over those items
    against_score: float | None
    n_worse: int
    n_better: int
    n_only_one: int  # items only one of the two scored
    worse: list[ItemDiff] = field(default_factory=list)  # the largest drops first, at most `limit`
    better: list[ItemDiff] = field(default_factory=list)

    @property
    def n_same(self) -> int:
        return self.n_items - self.n_worse - self.n_better

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "n_same": self.n_same}


def compare_items(dataset: TaskDataset, candidate: str, cand_items: Sequence[ItemResult], against: str,
                  against_items: Sequence[ItemResult], limit: int = 10) -> ItemComparison:
    """The items the two scored differently, the largest differences first (``limit`` of each way)."""
    mine = {r.index: r for r in cand_items}
    theirs = {r.index: r for r in against_items}
    both = sorted(mine.keys() & theirs.keys())
    diffs = [_diff(dataset, i, theirs[i], mine[i]) for i in both if _score(mine[i]) != _score(theirs[i])]
    worse = sorted((d for d in diffs if d.candidate_score < d.against_score),
                   key=lambda d: (d.candidate_score - d.against_score, d.index))
    better = sorted((d for d in diffs if d.candidate_score > d.against_score),
                    key=lambda d: (d.against_score - d.candidate_score, d.index))

    def mean(rows: dict[int, ItemResult]) -> float | None:
        return sum(_score(rows[i]) for i in both) / len(both) if both else None

    return ItemComparison(
        candidate=candidate, against=against, metric=dataset.metric, n_items=len(both),
        candidate_score=mean(mine), against_score=mean(theirs), n_worse=len(worse), n_better=len(better),
        n_only_one=len(mine.keys() ^ theirs.keys()), worse=worse[:limit], better=better[:limit],
    )


def _score(r: ItemResult) -> float:
    return float(r.score if r.score is not None else r.correct)


def _diff(dataset: TaskDataset, index: int, against: ItemResult, cand: ItemResult) -> ItemDiff:
    item = dataset.items[index]
    if item.choices is not None:
        expected: str | None = item.choices[item.answer] if item.answer is not None else None
    else:  # label-free metrics score against the baseline, not the reference
        expected = None if dataset.metric in LABEL_FREE_METRICS else item.reference
    return ItemDiff(index=index, category=item.category, prompt=item.prompt, expected=expected,
                    against_output=_output(item, against.prediction), candidate_output=_output(item, cand.prediction),
                    against_score=_score(against), candidate_score=_score(cand))


def _output(item: Any, prediction: Any) -> str | None:
    """What the model answered: the choice it picked, the text it generated, or (label-free metrics)
    the greedy output where the metric stored one."""
    if isinstance(prediction, dict):
        prediction = prediction.get("output")
    if item.choices is not None and isinstance(prediction, int) and 0 <= prediction < len(item.choices):
        return item.choices[prediction]
    return prediction if isinstance(prediction, str) else None
