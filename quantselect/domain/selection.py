"""The recommendation: the cheapest candidate (cost per 1M tokens; costs within 5 % count as a tie,
decided by memory) whose quality
relative to the baseline qualifies under the chosen policy, with its evidence and the reason every
other candidate lost.

Every comparison is paired: a candidate's items are matched with the baseline's by index, so a
candidate stopped early is compared on the items it saw. Each candidate gets a verdict at the job's
confidence (``statistics.compare``): pass (the whole interval of its relative score is at or above
the threshold), fail (all below), or inconclusive. The policy decides who qualifies:

- ``point``: the point estimate meets the threshold (an inconclusive candidate can win; the output
  says so);
- ``lower-bound``: the lower confidence bound meets it (only a pass verdict qualifies).

A candidate whose verdict an early-stopping test settled keeps that verdict where it answers the
question asked: a pass for the threshold it was settled at or a lower one, a fail for it or a higher
one, at its confidence or a lower one; asked anything else (`recommend --threshold`), the candidate
is compared on the items it saw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

from quantselect.domain.results import (
    DEFAULT_CONFIDENCE,
    DEFAULT_POLICY,
    SUCCEEDED,
    CandidateResult,
    ItemResult,
    cost_per_1m_tokens,
)
from quantselect.domain.candidates import BASELINE
from quantselect.domain.cost import ServingCost
from quantselect.domain.planner import fmt_bytes
from quantselect.domain.statistics import FAIL, INCONCLUSIVE, PASS, PairedComparison, compare

CATEGORY_RESAMPLES = 1000  # per-category intervals: many small comparisons, a coarser bootstrap
# Costs within this fraction of the cheapest count as a tie, broken by memory: throughput
# measurements on shared machines wobble by a few per cent, and that wobble must not pick a model
# twice the size.
COST_TIE = 0.05


@dataclass(frozen=True)
class CategoryVerdict:
    category: str
    n_items: int
    relative_score: float | None
    ci_low: float | None
    ci_high: float | None
    verdict: str
    passed: bool | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


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
    n_items: int | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    verdict: str | None = None  # pass / fail / inconclusive at the job's confidence
    mcnemar_p: float | None = None
    items_needed: int | None = None
    underpowered: bool | None = None
    stopped_early: bool = False
    categories: tuple[CategoryVerdict, ...] = ()
    cost: ServingCost | None = None  # on the target GPU: throughput, measured or estimated, and why none
    perplexity: float | None = None  # label-free metrics: exp(NLL per token) over the candidate's items

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["categories"] = [c.to_dict() for c in self.categories]
        d["cost"] = self.cost.to_dict() if self.cost else None
        d["cost_source"] = self.cost_source
        return d

    @property
    def cost_source(self) -> str | None:
        """"measured" or "estimated" (roofline) for the target GPU; None without a cost."""
        return self.cost.throughput.source if self.cost and self.cost.throughput else None


@dataclass(frozen=True)
class Recommendation:
    threshold: float
    chosen: str | None
    baseline_score: float | None
    verdicts: tuple[Verdict, ...]
    message: str
    confidence: float = DEFAULT_CONFIDENCE
    policy: str = DEFAULT_POLICY
    warnings: tuple[str, ...] = ()
    per_category: dict[str, str | None] = field(default_factory=dict)
    target_gpu: str | None = None

    def verdict(self, name: str) -> Verdict:
        return next(v for v in self.verdicts if v.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "confidence": self.confidence,
            "policy": self.policy,
            "chosen": self.chosen,
            "baseline_score": self.baseline_score,
            "message": self.message,
            "warnings": list(self.warnings),
            "per_category": dict(self.per_category),
            "target_gpu": self.target_gpu,
            "candidates": [v.to_dict() for v in self.verdicts],
        }


def _memory(r: CandidateResult) -> int | None:
    return r.peak_memory_bytes or r.weight_bytes


def _qualifies(relative: float | None, ci_low: float | None, threshold: float, policy: str) -> bool | None:
    value = ci_low if policy == "lower-bound" else relative
    return None if value is None else value >= threshold - 1e-12


@dataclass
class _Evidence:
    relative: float | None = None
    passed: bool | None = None
    comparison: PairedComparison | None = None
    decision: str | None = None  # settled by early stopping
    n: int | None = None
    categories: tuple[CategoryVerdict, ...] = ()


def _paired(base: dict[int, ItemResult], items: Sequence[ItemResult]) -> tuple[list[float], list[float], list[str | None]]:
    b, c, cats = [], [], []
    for it in items:
        if it.index in base:
            b.append(float(base[it.index].score))
            c.append(float(it.score))
            cats.append(it.category)
    return b, c, cats


def _settled(early: dict, threshold: float, confidence: float) -> str | None:
    """An early-stopping test's decision, where it answers this question too: it settled PASS at
    its threshold (FAIL), so it holds for any lower (higher) one, at its confidence or a lower one.
    Asked of another threshold or a higher confidence (`recommend --threshold`), it says nothing,
    and the candidate is compared on the items it saw."""
    decision, t, c = early.get("decision"), early.get("threshold"), early.get("confidence")
    if decision not in (PASS, FAIL):
        return None
    if t is None or c is None:  # (stored without them: as it was settled)
        return decision
    if confidence > c + 1e-12:
        return None
    holds = threshold <= t + 1e-12 if decision == PASS else threshold >= t - 1e-12
    return decision if holds else None


def _reference(comp: PairedComparison, threshold: float) -> PairedComparison:
    """The baseline against itself: 1 by definition, not an estimate."""
    return replace(comp, ci_low=1.0, ci_high=1.0, verdict=PASS if threshold <= 1 + 1e-12 else FAIL)


def _evidence(r: CandidateResult, base: CandidateResult, base_items: dict[int, ItemResult],
              items: Sequence[ItemResult], threshold: float, confidence: float, policy: str) -> _Evidence:
    if not base_items or not items:  # no per-item results stored: the plain ratio, no interval
        if not base.score:
            return _Evidence()
        rel = (r.score or 0.0) / base.score
        return _Evidence(relative=rel, passed=policy == "point" and rel >= threshold - 1e-12, n=r.n_items)
    b, c, cats = _paired(base_items, items)
    if not b:
        return _Evidence()
    comp = compare(b, c, threshold, confidence)
    comp = _reference(comp, threshold) if r.is_baseline else comp
    decision = None if r.is_baseline else _settled(r.early_stop or {}, threshold, confidence)
    passed = (decision == PASS) if decision else _qualifies(comp.relative, comp.ci_low, threshold, policy)
    categories: list[CategoryVerdict] = []
    names = sorted({k for k in cats if k is not None})
    if len(names) > 1:
        for name in names:
            cb = [x for x, k in zip(b, cats) if k == name]
            cc = [x for x, k in zip(c, cats) if k == name]
            cat = compare(cb, cc, threshold, confidence, resamples=CATEGORY_RESAMPLES)
            cat = _reference(cat, threshold) if r.is_baseline else cat
            categories.append(CategoryVerdict(name, cat.n, cat.relative, cat.ci_low, cat.ci_high, cat.verdict,
                                              _qualifies(cat.relative, cat.ci_low, threshold, policy)))
    return _Evidence(comp.relative, passed, comp, decision, comp.n, tuple(categories))


def recommend(results: list[CandidateResult], threshold: float, costs: Mapping[str, ServingCost] | float, *,
              items: dict[str, list[ItemResult]] | None = None, confidence: float = DEFAULT_CONFIDENCE,
              policy: str = DEFAULT_POLICY, target_gpu: str | None = None) -> Recommendation:
    """``costs``: per candidate, its serving cost on the target GPU (``cost.serving_cost``); or a
    GPU-hour price, to cost each candidate at its own measured batch-1 throughput (no target)."""
    items = items or {}
    if not isinstance(costs, Mapping):
        price = float(costs)
        costs = {r.name: ServingCost(cost_per_1m_tokens(price, r.tokens_per_second), None) for r in results}
    base = next((r for r in results if r.is_baseline), None)
    base_ok = base is not None and base.status == SUCCEEDED and base.score is not None
    base_items = {i.index: i for i in items.get(base.name, [])} if base_ok and base else {}
    evidence = {
        r.name: (_evidence(r, base, base_items, items.get(r.name, []), threshold, confidence, policy)
                 if base_ok and base and r.status == SUCCEEDED and r.score is not None else _Evidence())
        for r in results
    }

    def cost(r: CandidateResult) -> float | None:
        c = costs.get(r.name)
        return c.usd_per_1m_tokens if c else None

    def runs_on_target(r: CandidateResult) -> bool:
        c = costs.get(r.name)
        return c is None or c.runs_on_target

    def memory(r: CandidateResult) -> float | None:
        """On the target GPU when costed there (a CPU's peak RSS includes the float model loaded
        before quantizing); else what was measured."""
        c = costs.get(r.name)
        return c.weight_bytes if c is not None and c.weight_bytes else _memory(r)

    def key(r: CandidateResult) -> tuple[float, float]:
        c, m = cost(r), memory(r)
        return (c if c is not None else float("inf"), float(m) if m is not None else float("inf"))

    eligible = [r for r in results if evidence[r.name].passed and runs_on_target(r)]
    chosen = _cheapest(eligible, key)
    cheapest = min(eligible, key=key) if eligible else None  # the cost window is measured from it
    base_score = base.score if base_ok and base else None
    verdicts = [replace(_verdict(r, evidence[r.name], chosen, cheapest, cost, memory, base_score, threshold, policy,
                                 costs.get(r.name)), perplexity=perplexity(items.get(r.name, [])))
                for r in results]
    warnings = _warnings(verdicts, chosen, threshold, confidence, policy)
    per_category = _per_category(results, verdicts, key, runs_on_target)

    if chosen is not None:
        message = f"deploy {chosen.name}: {next(v for v in verdicts if v.name == chosen.name).reason}"
    elif base_score is None:
        message = "no recommendation: the baseline did not produce a score"
    elif base_score == 0:
        message = "no recommendation: the baseline scores 0 on this task, so there is nothing to keep"
    else:
        blocked = [r for r in results if evidence[r.name].passed and not runs_on_target(r)]
        why = "; ".join(f"{r.name}: {costs[r.name].note}" for r in blocked)
        where = target_gpu or "the target"
        if not blocked:
            message = f"no candidate meets the threshold {threshold:.3f} under the {policy} policy"
        elif not any(runs_on_target(r) for r in results):
            message = f"no candidate can run on {where}: {why}"
        else:
            message = (f"no candidate that can run on {where} meets the threshold {threshold:.3f} under the {policy} "
                       f"policy; those that meet it cannot run there ({why})")
    return Recommendation(threshold=threshold, chosen=chosen.name if chosen else None, baseline_score=base_score,
                          verdicts=tuple(verdicts), message=message, confidence=confidence, policy=policy,
                          warnings=tuple(warnings), per_category=per_category, target_gpu=target_gpu)


def perplexity(items: Sequence[ItemResult]) -> float | None:
    """Over the items' tokens: exp(total NLL / total tokens), where label-free scoring stored them
    (the perplexity of a text corpus, or of the prompts and the baseline's continuations)."""
    rows = [i.prediction for i in items if isinstance(i.prediction, dict) and "nll" in i.prediction]
    tokens = sum(p["n_tokens"] for p in rows)
    return math.exp(sum(p["nll"] for p in rows) / tokens) if rows and len(rows) == len(items) and tokens else None


def _where(serving: ServingCost | None) -> str:
    return " of weights on the target" if serving is not None and serving.weight_bytes else " measured"


def _tie_reason(chosen: str, c: float | None, cc: float | None, best: float | None, m: float | None,
                mc: float | None, serving: ServingCost | None) -> str:
    """Why a candidate whose cost is within COST_TIE of the cheapest (``best``) lost to the chosen one
    (also within it): its memory, with the figures (of weights on the target GPU where costed there),
    or, with the same memory, its cost."""
    rival = chosen
    if c is None or best is None:
        same = "meets the threshold (no cost to compare)"
    elif c <= best:
        same = f"meets the threshold and is the cheapest (${c:.4g} per 1M tokens)"
        rival = f"{chosen}, which costs within {COST_TIE:.0%} of it"
    else:
        same = f"meets the threshold and costs within {COST_TIE:.0%} of the cheapest (${best:.4g} per 1M tokens)"
    if m is not None and mc is not None and m > mc:
        return f"{same} but needs more memory than {rival}: {fmt_bytes(m)} vs {fmt_bytes(mc)}{_where(serving)}"
    if c is not None and cc is not None and c > cc:
        return f"{same} and the same memory as {chosen}, at ${c:.4g} vs ${cc:.4g} per 1M tokens"
    return f"{same} and the same memory as {chosen}: either will do"


def _winner_reason(c: float | None, best: float | None, cheapest: str, m: float | None, mb: float | None,
                   serving: ServingCost | None) -> str:
    """Why the chosen candidate won: the lowest cost, or (within COST_TIE of the cheapest) the least memory."""
    if c is None or best is None or c <= best:
        return "cheapest candidate that meets the threshold"
    memory = f": {fmt_bytes(m)} vs {fmt_bytes(mb)}{_where(serving)} for {cheapest}" if m is not None and mb else ""
    return (f"meets the threshold at ${c:.4g} per 1M tokens, within {COST_TIE:.0%} of the cheapest "
            f"(${best:.4g} for {cheapest}), with the least memory of those{memory}")


def _cheapest(candidates: list[CandidateResult], key: Any) -> CandidateResult | None:
    """The lowest cost; costs within COST_TIE of it are a tie, decided by memory."""
    if not candidates:
        return None
    best = key(min(candidates, key=key))[0]
    tied = [r for r in candidates if key(r)[0] <= best * (1 + COST_TIE)]
    return min(tied, key=lambda r: (key(r)[1], key(r)[0]))


def _verdict(r: CandidateResult, ev: _Evidence, chosen: CandidateResult | None, cheapest: CandidateResult | None,
             cost: Any, memory: Any, base_score: float | None, threshold: float, policy: str,
             serving: ServingCost | None) -> Verdict:
    c = cost(r)
    comp = ev.comparison
    stopped = bool((r.early_stop or {}).get("stopped_early"))
    if r.status != SUCCEEDED:
        reason = f"{r.status}: {r.error}" if r.error else f"not finished ({r.status})"
    elif base_score is None:
        reason = "no baseline score to compare with (the baseline did not succeed)"
    elif ev.relative is None:
        reason = "the baseline scores 0 on this task: no relative quality to compare"
    elif not ev.passed:
        if ev.decision == FAIL:
            settled_at = (r.early_stop or {}).get("threshold", threshold)
            reason = (f"quality {ev.relative:.3f} of the baseline; an early-stopping test settled it below the "
                      f"threshold {settled_at:.3f} after {ev.n} items")
        elif policy == "lower-bound" and comp is not None and ev.relative >= threshold:
            reason = (f"quality {ev.relative:.3f} of the baseline, but the lower bound {comp.ci_low:.3f} of its "
                      f"{comp.confidence:.0%} interval is below the threshold {threshold:.3f}")
        else:
            reason = f"quality {ev.relative:.3f} of the baseline is below the threshold {threshold:.3f}"
    elif serving is not None and not serving.runs_on_target:
        reason = f"meets the threshold but cannot run on the target: {serving.note}"
    elif chosen is not None and r.name == chosen.name:
        assert cheapest is not None
        reason = _winner_reason(c, cost(cheapest), cheapest.name, memory(r), memory(cheapest), serving)
    else:
        assert chosen is not None and cheapest is not None
        cc, best = cost(chosen), cost(cheapest)
        if c is None and best is not None:
            why = f": {serving.note}" if serving is not None and serving.note else ""
            reason = f"meets the threshold but has no cost to compare{why}"
        elif c is not None and best is not None and c > best * (1 + COST_TIE):
            if cheapest.name == chosen.name:
                reason = f"meets the threshold but costs ${c:.4g} vs ${cc:.4g} per 1M tokens for {chosen.name}"
            else:
                reason = (f"meets the threshold but costs ${c:.4g} per 1M tokens, more than {COST_TIE:.0%} above "
                          f"the cheapest (${best:.4g} for {cheapest.name})")
        else:
            reason = _tie_reason(chosen.name, c, cc, best, memory(r), memory(chosen), serving)
    return Verdict(
        name=r.name, status=r.status, score=r.score, relative_score=ev.relative, passed=ev.passed,
        cost_per_1m_tokens_usd=c, reason=reason, n_items=ev.n,
        memory_bytes=int(serving.weight_bytes) if serving is not None and serving.weight_bytes else _memory(r),
        ci_low=comp.ci_low if comp else None, ci_high=comp.ci_high if comp else None,
        verdict=ev.decision or (comp.verdict if comp else None), mcnemar_p=comp.mcnemar_p if comp else None,
        items_needed=comp.items_needed if comp else None, underpowered=comp.underpowered if comp else None,
        stopped_early=stopped, categories=ev.categories, cost=serving,
    )


def _warnings(verdicts: list[Verdict], chosen: CandidateResult | None, threshold: float, confidence: float,
              policy: str) -> list[str]:
    out = []
    for v in verdicts:
        # below the threshold in a category, or (lower-bound policy) only not shown to meet it there
        failing = [c for c in v.categories if c.passed is False
                   and (c.relative_score is None or c.relative_score < threshold - 1e-12)]
        unsure = [c for c in v.categories if c.passed is False and c not in failing]
        if v.passed and unsure:
            names = ", ".join(f"{c.category!r} (lower bound {c.ci_low:.3f})" if c.ci_low is not None
                              else repr(c.category) for c in unsure)
            out.append(f"{v.name} passes overall, but the lower bound of its interval is below the threshold in "
                       f"categor{'y' if len(unsure) == 1 else 'ies'} {names}: too few items there to show it "
                       "meets it")
        if v.passed and failing:
            worst = min(failing, key=lambda c: c.relative_score if c.relative_score is not None else 0.0)
            names = ", ".join(f"{c.category!r} ({c.relative_score:.3f})" if c.relative_score is not None
                              else repr(c.category) for c in failing)
            out.append(f"{v.name} passes overall but fails categor{'y' if len(failing) == 1 else 'ies'} {names}"
                       + (f"; worst: {worst.category}" if len(failing) > 1 else ""))
    chosen_v = next((v for v in verdicts if chosen is not None and v.name == chosen.name), None)
    if chosen_v is not None and chosen_v.verdict not in (None, PASS) and chosen_v.ci_low is not None:
        out.append(f"{chosen_v.name}'s verdict is {chosen_v.verdict} at {confidence:.0%} confidence: its interval "
                   f"[{chosen_v.ci_low:.3f}, {chosen_v.ci_high:.3f}] straddles the threshold {threshold:.3f}; "
                   "evaluate more items or use --policy lower-bound for a conservative choice")
    sources: dict[str, list[str]] = {}
    for v in verdicts:
        if v.passed and v.cost_source:
            sources.setdefault(v.cost_source, []).append(v.name)
    if chosen_v is not None and len(sources) > 1:  # the cheapest was picked across two kinds of figure
        out.append(f"the costs compared mix measurements ({', '.join(sources['measured'])}: batch 16 of short "
                   f"prompts) and roofline estimates ({', '.join(sources['estimated'])}: a 1,024-token context), "
                   "which can differ by more than the candidates do: read each cost's basis before trusting the ranking")
    short = [v for v in verdicts  # the winner, and every candidate left undecided, when the items are too few
             if v.name != BASELINE and v.underpowered and v.items_needed
             and (v is chosen_v or v.verdict == INCONCLUSIVE)]
    if short:
        same_n = len({v.n_items for v in short}) == 1  # else each candidate's own count
        needed = ", ".join(f"{v.name} ~{v.items_needed}" + ("" if same_n else f" (has {v.n_items})") for v in short)
        many = f"{short[0].n_items} items are" if same_n else "the items are"
        out.append(f"{many} too few to detect a quality drop of {1 - threshold:.1%} with 80 % "
                   f"power at {confidence:.0%} confidence; items needed: {needed}")
    return out


def _per_category(results: list[CandidateResult], verdicts: list[Verdict], key: Any,
                  runs_on_target: Any) -> dict[str, str | None]:
    by_name = {r.name: r for r in results}
    names = sorted({c.category for v in verdicts for c in v.categories})
    out: dict[str, str | None] = {}
    for cat in names:
        ok = [by_name[v.name] for v in verdicts for c in v.categories
              if c.category == cat and c.passed and runs_on_target(by_name[v.name])]
        best = _cheapest(ok, key)
        out[cat] = best.name if best else None
    return out
