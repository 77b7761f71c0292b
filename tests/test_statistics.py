"""quantselect.domain.statistics: paired comparison, McNemar, sample size, anytime-valid early stopping."""

from __future__ import annotations

import ast
import json
import math
import random
import statistics as stdlib_statistics
from pathlib import Path

import pytest

from quantselect.domain import statistics as qs
from quantselect.domain.statistics import (
    DEFAULT_CONFIDENCE,
    FAIL,
    INCONCLUSIVE,
    PASS,
    PairedComparison,
    SequentialTest,
    compare,
    items_needed,
    mcnemar_exact,
)

ALPHA = 1 - DEFAULT_CONFIDENCE


def _binary_pairs(rng: random.Random, n: int, p_base: float, relative: float, flip_up: float = 0.05):
    """n correlated 0/1 pairs with baseline accuracy p_base and candidate accuracy p_base * relative.

    The candidate gets an item right with probability ``flip_up`` when the baseline got it wrong and
    with the probability q1 that makes its accuracy exactly p_base * relative when the baseline got
    it right -- most items agree, like a quantized model and its original.
    """
    q1 = (p_base * relative - (1 - p_base) * flip_up) / p_base
    assert 0 <= q1 <= 1
    b, c = [], []
    for _ in range(n):
        bi = 1.0 if rng.random() < p_base else 0.0
        ci = 1.0 if rng.random() < (q1 if bi else flip_up) else 0.0
        b.append(bi)
        c.append(ci)
    return b, c


def _mc_bound(p: float, runs: int) -> float:
    """p plus two Monte Carlo standard errors: what an error rate of at most p can read as in `runs` runs."""
    return p + 2 * math.sqrt(p * (1 - p) / runs)


# ----------------------------------------------------------------------------------------------
# Layer rule


def test_module_is_pure():
    tree = ast.parse(Path(qs.__file__).read_text())
    top_level = set()
    for node in tree.body:  # module level only: numpy may be imported lazily inside a function
        if isinstance(node, ast.Import):
            top_level.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            top_level.add(node.module.split(".")[0])
    assert not top_level & {"numpy", "torch", "ray", "sqlalchemy", "click", "fastapi", "scipy"}
    everywhere = {
        a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    } | {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not everywhere & {"torch", "ray", "sqlalchemy", "click", "fastapi"}


# ----------------------------------------------------------------------------------------------
# McNemar


@pytest.mark.parametrize(
    "b, c, expected",
    [
        # values from scipy.stats.binomtest(min(b, c), b + c, 0.5).pvalue
        (10, 2, 0.03857421875),
        (2, 10, 0.03857421875),
        (0, 5, 0.0625),
        (0, 6, 0.03125),
        (3, 12, 0.03515625),
        (20, 35, 0.05806414679240905),
        (100, 130, 0.05561357778139238),
        (5, 5, 1.0),
        (7, 8, 1.0),
        (0, 0, 1.0),
        (1, 0, 1.0),
    ],
)
def test_mcnemar_exact_known_values(b, c, expected):
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_rejects_bad_counts():
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 3)
    with pytest.raises(ValueError):
        mcnemar_exact(2.5, 3)


# ----------------------------------------------------------------------------------------------
# compare()


def test_compare_broken_candidate_fails():
    base = [1.0] * 65 + [0.0] * 35
    cand = [1.0] * 35 + [0.0] * 65  # right only where the baseline is right, on 35 of its 65
    r = compare(base, cand, 0.98)
    assert r.verdict == FAIL
    assert r.relative == pytest.approx(35 / 65)
    assert r.ci_high < 0.98
    assert r.discordant == (30, 0)
    assert r.mcnemar_p == pytest.approx(mcnemar_exact(30, 0))
    assert r.mcnemar_p < 1e-8


def test_compare_identical_candidate_passes_only_on_enough_items():
    """No disagreement seen is not none possible: the interval of an identical candidate narrows
    with the items, and passes once they are enough (never on one item, as [1, 1] did)."""
    rng = random.Random(5)
    base = [1.0 if rng.random() < 0.6 else 0.0 for _ in range(200)]
    r = compare(base, list(base), 0.95)
    assert r.relative == 1.0 and 0.95 <= r.ci_low < 1.0 < r.ci_high
    assert r.verdict == PASS
    assert r.discordant == (0, 0) and r.mcnemar_p == 1.0
    assert compare([1.0], [1.0], 0.98).verdict == INCONCLUSIVE
    assert compare(base[:30], base[:30], 0.98).verdict == INCONCLUSIVE
    graded = [rng.random() for _ in range(400)]
    assert compare(graded, list(graded), 0.98).verdict == PASS


def test_compare_rarely_passes_a_candidate_below_the_threshold_that_disagreed_on_few_items():
    """A candidate that loses 5 % of the baseline's right answers (relative 0.95) passes 0.98 at most
    about as often as the confidence allows (2.5 %), on few items too, where it often disagrees on
    none (the bootstrap alone passed it 45 % of the time on 20 items, 10 % on 60)."""
    rng = random.Random(17)
    for n in (20, 60):
        passed = 0
        for _ in range(200):
            base = [1.0 if rng.random() < 0.8 else 0.0 for _ in range(n)]
            cand = [0.0 if x == 1.0 and rng.random() < 0.05 else x for x in base]
            passed += compare(base, cand, 0.98, resamples=500).verdict == PASS
        assert passed / 200 <= _mc_bound(ALPHA / 2, 200), (n, passed)


def test_compare_borderline_small_sample_is_inconclusive():
    base = [1.0] * 30 + [0.0] * 20
    cand = [0.0] + [1.0] * 29 + [0.0] * 20  # one item lost: relative 29/30 = 0.967 vs threshold 0.98
    r = compare(base, cand, 0.98)
    assert r.verdict == INCONCLUSIVE
    assert r.ci_low < 0.98 <= r.ci_high
    assert r.underpowered and r.items_needed > r.n


def test_compare_interval_contains_estimate_and_is_deterministic():
    rng = random.Random(11)
    base, cand = _binary_pairs(rng, 300, 0.7, 0.96)
    r = compare(base, cand, 0.98, seed=3)
    assert r.ci_low <= r.relative <= r.ci_high
    assert r.ci_low < r.ci_high
    assert r.method == "paired bootstrap (2000 resamples, percentile, a disagreement added each way)"
    assert compare(base, cand, 0.98, seed=3) == r
    other = compare(base, cand, 0.98, seed=4)
    assert (other.ci_low, other.ci_high) != (r.ci_low, r.ci_high)
    wider = compare(base, cand, 0.98, confidence=0.99, seed=3)
    assert wider.ci_low <= r.ci_low and wider.ci_high >= r.ci_high


def test_compare_graded_scores():
    rng = random.Random(2)
    base = [rng.random() for _ in range(400)]
    cand = [min(1.0, max(0.0, x + rng.gauss(-0.2, 0.05))) for x in base]
    r = compare(base, cand, 0.98, resamples=500)
    assert r.mcnemar_p is None and r.discordant is None
    assert r.verdict == FAIL
    assert r.ci_low <= r.relative <= r.ci_high
    assert r.method == "paired bootstrap (500 resamples, percentile, a disagreement added each way)"


def test_compare_large_input_is_deterministic():
    # (its speed is a benchmark matter, not a test's)
    rng = random.Random(7)
    base, cand = _binary_pairs(rng, 5000, 0.65, 0.99)
    r = compare(base, cand, 0.98)
    assert r.ci_low <= r.relative <= r.ci_high
    assert compare(base, cand, 0.98) == r


def test_compare_zero_baseline_is_inconclusive():
    r = compare([0.0] * 10, [1.0] * 3 + [0.0] * 7, 0.98)
    assert r.relative is None and r.ci_low is None and r.ci_high is None
    assert r.verdict == INCONCLUSIVE
    assert r.items_needed is None and r.underpowered is False


def test_compare_to_dict_is_json_friendly():
    r = compare([1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0], 0.9, resamples=100)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["discordant"] == [1, 0]
    assert d["verdict"] == r.verdict and d["n"] == 4
    assert set(d) == set(PairedComparison.__dataclass_fields__)


@pytest.mark.parametrize(
    "base, cand, kwargs",
    [
        ([], [], {}),
        ([1.0, 0.0], [1.0], {}),
        ([1.5], [1.0], {}),
        ([1.0], [-0.1], {}),
        ([float("nan")], [1.0], {}),
        ([1.0], [1.0], {"threshold": 0.0}),
        ([1.0], [1.0], {"confidence": 1.0}),
        ([1.0], [1.0], {"resamples": 0}),
    ],
)
def test_compare_rejects_bad_input(base, cand, kwargs):
    kwargs = {"threshold": 0.98, **kwargs}
    with pytest.raises(ValueError):
        compare(base, cand, **kwargs)


# ----------------------------------------------------------------------------------------------
# items_needed()


def test_items_needed_formula_and_variance_floor():
    z = stdlib_statistics.NormalDist().inv_cdf(0.975) + stdlib_statistics.NormalDist().inv_cdf(0.8)
    base = [1.0] * 60 + [0.0] * 40
    # no disagreement: the variance is floored at delta * (1 - delta), so it does not claim 1 item
    delta = 0.02 * 0.6
    assert items_needed(base, list(base), 0.98) == math.ceil(z * z * delta * (1 - delta) / delta**2)
    # with disagreements the observed variance of the differences counts
    cand = [0.0] * 6 + [1.0] * 54 + [1.0] * 4 + [0.0] * 36
    var = stdlib_statistics.variance([y - x for x, y in zip(base, cand)])
    assert var > delta * (1 - delta)
    assert items_needed(base, cand, 0.98) == math.ceil(z * z * var / delta**2)


def test_items_needed_grows_towards_threshold_one():
    rng = random.Random(3)
    base, cand = _binary_pairs(rng, 500, 0.65, 0.99)
    needs = [items_needed(base, cand, t) for t in (0.9, 0.95, 0.98, 0.99)]
    assert needs == sorted(needs) and len(set(needs)) == 4
    assert items_needed(base, cand, 1.0) is None
    assert items_needed(base, cand, 1.05) is None
    assert items_needed([0.0, 0.0], [1.0, 0.0], 0.9) is None
    assert items_needed(base, cand, 0.98, power=0.9) > items_needed(base, cand, 0.98)
    tiny = compare(base[:20], cand[:20], 0.98, resamples=200)
    assert tiny.underpowered and tiny.items_needed > 20
    assert not compare(base, cand, 0.5, resamples=200).underpowered


# ----------------------------------------------------------------------------------------------
# SequentialTest


def _simulate(make_pairs, threshold: float, runs: int, max_items: int, chunk: int, seed: int, naive_from=None):
    """Run SequentialTest on `runs` simulated candidates; counts decisions, stopping sizes and, with
    `naive_from`, how often the naive rule "a fixed-n 95 % interval for the mean of c - t*b, re-checked
    after every chunk from `naive_from` items on" would ever have said PASS."""
    rng = random.Random(seed)
    z = stdlib_statistics.NormalDist().inv_cdf(1 - ALPHA / 2)
    decisions = {PASS: 0, FAIL: 0, None: 0}
    stopped_at = []
    naive_pass = 0
    for _ in range(runs):
        base, cand = make_pairs(rng, max_items)
        test = SequentialTest(threshold)
        s = ss = 0.0
        naive = False
        for start in range(0, max_items, chunk):
            b, c = base[start : start + chunk], cand[start : start + chunk]
            test.update(b, c)
            if naive_from is not None:
                for x, y in zip(b, c):
                    d = y - threshold * x
                    s, ss = s + d, ss + d * d
                k = start + len(b)
                mean = s / k
                if k >= naive_from and mean - z * math.sqrt(max(ss / k - mean * mean, 0.0) / (k - 1)) > 0:
                    naive = True
            elif test.decision is not None:
                break  # stop the candidate, as the caller would
        decisions[test.decision] += 1
        naive_pass += naive
        if test.decision is not None:
            stopped_at.append(math.ceil(test.decided_at / chunk) * chunk)
    return decisions, stopped_at, naive_pass


def test_sequential_false_decisions_at_the_boundary_binary():
    """True relative exactly t (the worst case for both errors): neither verdict is right, and the
    test must settle either at most alpha/2 of the time (alpha in all), however often it is checked.
    The naive fixed-n interval, re-checked after every chunk, is wrong far more often."""
    t, runs = 0.98, 600
    decisions, _, naive_pass = _simulate(
        lambda rng, n: _binary_pairs(rng, n, 0.65, t), t, runs, max_items=1000, chunk=10, seed=20240601, naive_from=100
    )
    assert decisions[PASS] / runs <= _mc_bound(ALPHA / 2, runs)
    assert decisions[FAIL] / runs <= _mc_bound(ALPHA / 2, runs)
    assert (decisions[PASS] + decisions[FAIL]) / runs <= _mc_bound(ALPHA, runs)
    # ~17 % with this set-up (and ~45 % when the naive rule already looks from 20 items on)
    assert naive_pass / runs > _mc_bound(ALPHA, runs)


def test_sequential_false_decisions_at_the_boundary_graded():
    t, runs = 0.9, 300

    def graded(rng, n):  # c = b * U, U ~ uniform(0.8, 1.0): mean(c) / mean(b) = 0.9 exactly
        base = [rng.random() for _ in range(n)]
        return base, [x * rng.uniform(0.8, 1.0) for x in base]

    decisions, _, _ = _simulate(graded, t, runs, max_items=600, chunk=10, seed=7)
    assert (decisions[PASS] + decisions[FAIL]) / runs <= _mc_bound(ALPHA, runs)
    assert decisions[PASS] / runs <= _mc_bound(ALPHA / 2, runs)


def test_sequential_no_wrong_fail_above_threshold():
    t, runs = 0.98, 300
    decisions, _, _ = _simulate(
        lambda rng, n: _binary_pairs(rng, n, 0.65, 1.0), t, runs, max_items=500, chunk=10, seed=8
    )
    assert decisions[FAIL] / runs <= _mc_bound(ALPHA / 2, runs)


def test_sequential_no_wrong_pass_below_threshold():
    t, runs = 0.98, 300
    decisions, _, _ = _simulate(
        lambda rng, n: _binary_pairs(rng, n, 0.65, 0.92), t, runs, max_items=500, chunk=10, seed=9
    )
    assert decisions[PASS] / runs <= _mc_bound(ALPHA / 2, runs)
    assert decisions[FAIL] > runs / 4  # and it does catch some of them


@pytest.mark.parametrize("chunk", [10, 50])
def test_sequential_stops_a_broken_candidate_early(chunk):
    runs = 200
    decisions, stopped_at, _ = _simulate(
        lambda rng, n: _binary_pairs(rng, n, 0.65, 0.35 / 0.65), 0.98, runs, max_items=300, chunk=chunk, seed=10
    )
    assert decisions[FAIL] == runs  # every run settled FAIL within 300 items
    assert stdlib_statistics.median(stopped_at) <= 100
    assert sorted(stopped_at)[int(0.9 * runs)] <= 150


def test_sequential_passes_an_identical_candidate():
    runs = 100

    def identical(rng, n):
        base = [1.0 if rng.random() < 0.65 else 0.0 for _ in range(n)]
        return base, list(base)

    decisions, stopped_at, _ = _simulate(identical, 0.9, runs, max_items=300, chunk=10, seed=11)
    assert decisions[PASS] == runs
    assert max(stopped_at) <= 250


def test_sequential_decision_does_not_depend_on_chunking_and_is_sticky():
    base, cand = _binary_pairs(random.Random(12), 400, 0.65, 0.5)
    one = SequentialTest(0.98)
    for b, c in zip(base, cand):
        one.update([b], [c])
    many = SequentialTest(0.98)
    assert many.update(base[:37], cand[:37]) is None or many.decided_at <= 37
    many.update(base[37:], cand[37:])
    assert one.decision == many.decision == FAIL
    assert one.decided_at == many.decided_at < 100
    assert many.n == 400
    # sticky: even a run of perfect items afterwards does not undo it
    assert many.update([1.0] * 200, [1.0] * 200) == FAIL
    assert many.n == 600


def test_sequential_min_items_and_first_bet():
    test = SequentialTest(0.98, min_items=200)
    test.update([1.0], [0.0])
    # no bet before any data: the first item cannot move either wealth
    assert test.log_wealth_pass == test.log_wealth_fail == 0.0
    test.update([1.0] * 150, [0.0] * 150)
    assert test.decision is None and test.n == 151  # overwhelming evidence, but under min_items
    assert test.update([1.0] * 48, [0.0] * 48) is None
    assert test.update([1.0, 1.0], [0.0, 0.0]) == FAIL and test.decided_at == 200
    d = json.loads(json.dumps(test.to_dict()))
    assert d["n"] == 201 and d["decided_at"] == 200 and d["decision"] == FAIL and d["alpha"] == pytest.approx(ALPHA)
    assert d["log_wealth_fail"] >= d["log_wealth_to_settle"] == pytest.approx(math.log(2 / ALPHA))
    assert SequentialTest(0.98).update([], []) is None


def test_sequential_threshold_above_one():
    test = SequentialTest(1.2)  # the candidate must be 20 % better than the baseline
    base = [1.0 if i % 3 else 0.0 for i in range(300)]
    assert test.update(base, list(base)) == FAIL  # identical = relative 1 < 1.2


@pytest.mark.parametrize(
    "kwargs", [{"threshold": 0.0}, {"threshold": -1.0}, {"confidence": 0.0}, {"confidence": 1.0}, {"min_items": -1}]
)
def test_sequential_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        SequentialTest(**{"threshold": 0.98, **kwargs})


def test_sequential_rejects_bad_chunks():
    test = SequentialTest(0.98)
    with pytest.raises(ValueError):
        test.update([1.0, 0.0], [1.0])
    with pytest.raises(ValueError):
        test.update([2.0], [1.0])
    assert test.n == 0
