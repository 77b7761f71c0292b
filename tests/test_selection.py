"""The recommendation from stored per-item results: paired intervals, verdicts, policies,
categories, early-stopped candidates and the too-few-items warning."""

from __future__ import annotations

import pytest

from quantselect.domain.candidates import BASELINE
from quantselect.domain.results import SUCCEEDED, CandidateResult, ItemResult
from quantselect.domain.selection import recommend


def cand(name, correct, tps, cats=None, mem=100, early_stop=None):
    items = [ItemResult(i, bool(c), 0, category=cats[i] if cats else None) for i, c in enumerate(correct)]
    r = CandidateResult(name=name, config={}, status=SUCCEEDED, score=sum(correct) / len(correct),
                        tokens_per_second=tps, peak_memory_bytes=mem, n_items=len(correct), early_stop=early_stop)
    return r, items


def run(cands, threshold=0.98, **kw):
    results = [r for r, _ in cands]
    items = {r.name: its for r, its in cands}
    return recommend(results, threshold, 2.0, items=items, **kw)


BASE = [1] * 160 + [0] * 40  # 0.80 on 200 items


def test_paired_evidence_for_every_candidate():
    same = list(BASE)
    broken = [1 if i % 2 else 0 for i in range(200)]  # 0.50
    rec = run([cand(BASELINE, BASE, 100), cand("int8", same, 200), cand("int2", broken, 400)])
    assert rec.chosen == "int8"
    v = rec.verdict("int8")
    assert v.relative_score == 1.0 and 0.98 <= v.ci_low < 1.0 < v.ci_high and v.verdict == "pass"
    assert v.mcnemar_p == 1.0 and v.n_items == 200
    b = rec.verdict("int2")
    assert b.verdict == "fail" and b.ci_high < 0.98 and b.mcnemar_p < 0.001 and not b.passed
    assert rec.to_dict()["candidates"][1]["ci_low"] == v.ci_low


def test_policies_differ_on_an_inconclusive_candidate():
    # 4 items flipped wrong, 2 flipped right: relative 0.9875, interval straddles 0.98.
    c = list(BASE)
    for i in range(4):
        c[i] = 0
    c[160] = c[161] = 1
    cands = [cand(BASELINE, BASE, 100), cand("int4", c, 300)]
    point = run(cands, policy="point")
    assert point.chosen == "int4" and point.verdict("int4").verdict == "inconclusive"
    assert any("straddles" in w for w in point.warnings)
    strict = run(cands, policy="lower-bound")
    assert strict.chosen == BASELINE and strict.verdict("int4").passed is False
    assert "lower bound" in strict.verdict("int4").reason


def test_category_failure_is_warned_and_recommended_per_category():
    cats = ["math"] * 50 + ["chat"] * 150
    base = [1] * 200
    c = [0] * 5 + [1] * 195  # overall 0.975 relative... make it pass overall at 0.95
    cands = [cand(BASELINE, base, 100, cats), cand("int4", c, 300, cats)]
    rec = run(cands, threshold=0.95)
    assert rec.chosen == "int4"
    cat = {x.category: x for x in rec.verdict("int4").categories}
    assert cat["math"].relative_score == 0.9 and cat["math"].passed is False and cat["chat"].passed
    assert any("fails category 'math'" in w for w in rec.warnings)
    assert rec.per_category == {"chat": "int4", "math": BASELINE}


def test_a_category_too_small_to_show_a_pass_is_not_called_a_failure():
    """Under the lower-bound policy a candidate identical to the baseline may not be shown to meet
    the threshold in a small category: the warning says so, not that it fails there; the
    baseline, the reference itself, is [1, 1] and passes any threshold up to 1."""
    cats = ["math"] * 40 + ["chat"] * 560
    base = ([1] * 32 + [0] * 8) + ([1] * 448 + [0] * 112)
    rec = run([cand(BASELINE, base, 100, cats), cand("int8", list(base), 300, cats)], threshold=0.985,
              policy="lower-bound")
    assert rec.chosen == "int8" and rec.per_category == {"chat": "int8", "math": BASELINE}, rec.per_category
    (w,) = [w for w in rec.warnings if w.startswith("int8 passes overall")]
    assert w.startswith("int8 passes overall, but the lower bound of its interval is below the threshold in "
                        "category 'math' (lower bound 0."), w
    assert "fails" not in w
    b = rec.verdict(BASELINE)
    assert (b.ci_low, b.ci_high, b.verdict) == (1.0, 1.0, "pass")
    over = run([cand(BASELINE, base, 100), cand("int8", list(base), 300)], threshold=1.1).verdict(BASELINE)
    assert (over.verdict, over.passed) == ("fail", False)


def test_early_stopped_candidate_keeps_its_settled_verdict():
    short = [1 if i % 2 else 0 for i in range(40)]
    r, items = cand("int2", short, 500, early_stop={"decision": "fail", "n": 40, "stopped_early": True})
    rec = run([cand(BASELINE, BASE, 100), (r, items)])
    v = rec.verdict("int2")
    assert v.passed is False and v.verdict == "fail" and v.stopped_early and v.n_items == 40
    assert "early-stopping test" in v.reason


def test_a_settled_verdict_answers_only_the_question_it_settled():
    """`recommend --threshold` asks again: a fail settled at 0.98 holds at 0.99, not at 0.6, where
    the candidate is compared on the items it saw (and a pass settled at 0.9 not at 0.99)."""
    lost = list(BASE[:100])
    for i in range(0, 80, 10):  # 8 of the baseline's 100 right answers lost: relative 0.92
        lost[i] = 0
    settled = {"n": 100, "stopped_early": True, "threshold": 0.98, "confidence": 0.95}
    fail = cand("int4", lost, 500, early_stop={**settled, "decision": "fail"})
    assert run([cand(BASELINE, BASE, 100), fail], threshold=0.99).verdict("int4").verdict == "fail"
    assert run([cand(BASELINE, BASE, 100), fail], threshold=0.98, confidence=0.99).verdict("int4").verdict != "fail"
    v = run([cand(BASELINE, BASE, 100), fail], threshold=0.6).verdict("int4")
    assert v.passed and v.verdict == "pass" and v.relative_score == pytest.approx(0.92), v
    passed = cand("int4", lost, 500, early_stop={**settled, "threshold": 0.85, "decision": "pass"})
    assert run([cand(BASELINE, BASE, 100), passed], threshold=0.8).verdict("int4").passed
    v = run([cand(BASELINE, BASE, 100), passed], threshold=0.99).verdict("int4")
    assert not v.passed and v.verdict == "fail" and "early-stopping" not in v.reason, v


def test_too_few_items_say_how_many_would_be_needed():
    base = [1] * 16 + [0] * 4
    c = [1] * 15 + [0] * 5
    rec = run([cand(BASELINE, base, 100), cand("int8", c, 200)], threshold=0.9)
    assert rec.chosen == "int8"
    v = rec.verdict("int8")
    assert v.underpowered and v.items_needed > 20
    assert any(f"items needed: int8 ~{v.items_needed}" in w for w in rec.warnings)


def test_recommendation_without_item_results_falls_back_to_the_ratio():
    results = [CandidateResult(BASELINE, {}, SUCCEEDED, score=0.8, tokens_per_second=100),
               CandidateResult("int8", {}, SUCCEEDED, score=0.8, tokens_per_second=200)]
    rec = recommend(results, 0.98, 2.0)
    assert rec.chosen == "int8" and rec.verdict("int8").ci_low is None


def test_a_baseline_that_scores_zero_gives_no_recommendation():
    rec = run([cand(BASELINE, [0] * 10, 100), cand("int8", [0] * 10, 200)])
    assert rec.chosen is None and "scores 0" in rec.message


def test_costs_within_measurement_noise_tie_and_memory_decides():
    # int8 measured 3 % slower than the baseline (noise on a CPU) but needs 40 % of its memory.
    rec = run([cand(BASELINE, BASE, 100, mem=500), cand("int8", list(BASE), 97, mem=200)])
    assert rec.chosen == "int8"
    assert rec.verdict(BASELINE).reason.endswith(
        "is the cheapest ($5.556 per 1M tokens) but needs more memory than int8, which costs within 5% of it: "
        "500 B vs 200 B measured")
    assert rec.verdict("int8").reason.startswith(
        "meets the threshold at $5.727 per 1M tokens, within 5% of the cheapest")
    # the same memory: the cost decides, and the reason says so instead of "more memory"
    rec = run([cand(BASELINE, BASE, 100, mem=500), cand("int8", list(BASE), 98, mem=200), cand("w8a8", list(BASE), 99, mem=200)])
    assert rec.chosen == "w8a8" and "the same memory as w8a8, at $" in rec.verdict("int8").reason
    # A real cost difference still wins over memory.
    rec = run([cand(BASELINE, BASE, 100, mem=500), cand("int8", list(BASE), 80, mem=200)])
    assert rec.chosen == BASELINE


def test_the_cost_window_is_measured_from_the_cheapest_and_every_reason_is_true():
    """baseline $1.00 / 16 GiB, int8 $1.04 / 8 GiB, int4 $1.08 / 4 GiB: int8 is within 5 % of the
    cheapest and needs less memory than the baseline; int4 is more than 5 % above the cheapest."""
    from quantselect.domain.cost import ServingCost

    gib = 1024**3
    cands = [cand(BASELINE, BASE, 100), cand("int8", list(BASE), 100), cand("int4", list(BASE), 100)]
    costs = {BASELINE: ServingCost(1.00, None, weight_bytes=16 * gib),
             "int8": ServingCost(1.04, None, weight_bytes=8 * gib), "int4": ServingCost(1.08, None, weight_bytes=4 * gib)}
    rec = recommend([r for r, _ in cands], 0.98, costs, items={r.name: its for r, its in cands})
    assert rec.chosen == "int8"
    assert rec.verdict("int8").reason == ("meets the threshold at $1.04 per 1M tokens, within 5% of the cheapest "
                                          "($1 for baseline), with the least memory of those: 8.0 GiB vs 16.0 GiB "
                                          "of weights on the target for baseline")
    assert rec.verdict("int4").reason == ("meets the threshold but costs $1.08 per 1M tokens, more than 5% above the "
                                          "cheapest ($1 for baseline)")
    assert rec.verdict(BASELINE).reason == ("meets the threshold and is the cheapest ($1 per 1M tokens) but needs more "
                                            "memory than int8, which costs within 5% of it: 16.0 GiB vs 8.0 GiB of "
                                            "weights on the target")
    assert rec.message.startswith("deploy int8: meets the threshold at $1.04")


def test_the_too_few_items_warning_gives_each_candidates_own_count():
    base = [1] * 16 + [0] * 4
    c = [1] * 15 + [0] * 5
    r, items = cand("int4", c[:12], 300, early_stop={"n": 12, "stopped_early": True})
    rec = run([cand(BASELINE, base, 100), cand("int8", c, 200), (r, items)], threshold=0.9)
    short = [rec.verdict(n) for n in ("int8", "int4")]
    assert rec.chosen == "int4" and short[0].verdict == "inconclusive"  # the winner and an undecided one
    assert [v.n_items for v in short] == [20, 12] and all(v.underpowered for v in short)
    warning = next(w for w in rec.warnings if "too few" in w)
    assert warning.startswith("the items are too few to detect")
    assert warning.endswith(f"items needed: int8 ~{short[0].items_needed} (has 20), int4 ~{short[1].items_needed} "
                            "(has 12)")
