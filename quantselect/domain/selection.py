"""The recommendation: the cheapest candidate whose quality relative to the baseline meets the
threshold (cost per 1M tokens, then memory), with the reason every other candidate lost."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quantselect.domain.results import SUCCEEDED, CandidateResult, cost_per_1m_tokens


@dataclass(frozen=True)
class Verdict:
    name: str
    status: str
    score: float | None
    relative_score: float | None
    passed: bool | None
    cost_per_1m_tokens_usd: float | None
    memory_bytes: int | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Recommendation:
    threshold: float
    chosen: str | None
    baseline_score: float | None
    verdicts: tuple[Verdict, ...]
    message: str

    def verdict(self, name: str) -> Verdict:
        return next(v for v in self.verdicts if v.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "chosen": self.chosen,
            "baseline_score": self.baseline_score,
            "message": self.message,
            "candidates": [v.to_dict() for v in self.verdicts],
        }


def _memory(r: CandidateResult) -> int | None:
    return r.peak_memory_bytes or r.weight_bytes


def relative_scores(results: list[CandidateResult], threshold: float) -> dict[str, tuple[float | None, bool | None]]:
    base = next((r for r in results if r.is_baseline), None)
    base_score = base.score if base and base.status == SUCCEEDED else None
    out: dict[str, tuple[float | None, bool | None]] = {}
    for r in results:
        if r.status != SUCCEEDED or r.score is None or base_score is None:
            out[r.name] = (None, None)
        elif base_score == 0:
            # Nothing is worse than a baseline that gets nothing right: relative quality is 1 at best.
            out[r.name] = (1.0 if r.score >= 0 else 0.0, True)
        else:
            rel = r.score / base_score
            out[r.name] = (rel, rel >= threshold - 1e-12)
    return out


def recommend(results: list[CandidateResult], threshold: float, gpu_hour_usd: float) -> Recommendation:
    rel = relative_scores(results, threshold)
    base = next((r for r in results if r.is_baseline), None)
    base_score = base.score if base and base.status == SUCCEEDED else None

    def cost(r: CandidateResult) -> float | None:
        return cost_per_1m_tokens(gpu_hour_usd, r.tokens_per_second)

    eligible = [r for r in results if rel[r.name][1]]

    def key(r: CandidateResult) -> tuple[float, float]:
        c = cost(r)
        m = _memory(r)
        return (c if c is not None else float("inf"), float(m) if m is not None else float("inf"))

    chosen = min(eligible, key=key) if eligible else None
    verdicts = []
    for r in results:
        score_rel, passed = rel[r.name]
        c = cost(r)
        if r.status != SUCCEEDED:
            reason = f"{r.status}: {r.error}" if r.error else f"not finished ({r.status})"
        elif base_score is None:
            reason = "no baseline score to compare with (the baseline did not succeed)"
        elif not passed:
            reason = f"quality {score_rel:.3f} of the baseline is below the threshold {threshold:.3f}"
        elif chosen is not None and r.name == chosen.name:
            reason = "cheapest candidate that meets the threshold"
        else:
            assert chosen is not None
            cc = cost(chosen)
            if c is not None and cc is not None and c > cc:
                reason = f"meets the threshold but costs ${c:.4g} vs ${cc:.4g} per 1M tokens for {chosen.name}"
            else:
                reason = f"meets the threshold and costs the same but needs more memory than {chosen.name}"
        verdicts.append(
            Verdict(
                name=r.name,
                status=r.status,
                score=r.score,
                relative_score=score_rel,
                passed=passed,
                cost_per_1m_tokens_usd=c,
                memory_bytes=_memory(r),
                reason=reason,
            )
        )
    if chosen is not None:
        message = f"deploy {chosen.name}: {verdicts[results.index(chosen)].reason}"
    elif base_score is None:
        message = "no recommendation: the baseline did not produce a score"
    else:
        message = f"no candidate meets the threshold {threshold:.3f}"
    return Recommendation(
        threshold=threshold,
        chosen=chosen.name if chosen else None,
        baseline_score=base_score,
        verdicts=tuple(verdicts),
        message=message,
    )
