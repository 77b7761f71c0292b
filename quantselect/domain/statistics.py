"""How sure are we that a candidate keeps the baseline's quality? Paired statistics on per-item scores.

Every function here takes *paired* per-item scores in [0, 1]: ``baseline[i]`` and ``candidate[i]``
are the two models' scores on the same item ``i`` (0/1 for accuracy-like metrics, graded for
label-free agreement metrics). The quantity of interest is the relative score

    relative = mean(candidate) / mean(baseline),

and a candidate *meets the threshold* ``t`` when ``relative >= t``. The items are treated as an
i.i.d. sample from the population of inputs the task stands for, so every statement below is about
that population, not only about the items at hand.

Two tools:

``compare`` -- a fixed-sample analysis, for when all items have been scored:
    * a paired bootstrap percentile interval for ``relative`` (items resampled with replacement,
      the same indices for both models, so the correlation between the two models' scores -- most
      items are right or wrong for both -- narrows the interval as it should);
    * the verdict: PASS when the whole interval is at or above ``t``, FAIL when it is wholly below,
      INCONCLUSIVE otherwise. With a two-sided interval at ``confidence`` = 1 - alpha, each wrong
      verdict has probability at most about alpha / 2 (bootstrap intervals are approximate);
    * for 0/1 scores, the exact McNemar test on the discordant pairs (does the candidate differ
      from the baseline at all? -- a different question from "does it meet t", reported as context);
    * ``items_needed``: how many items a paired test needs to detect the drop that ``t`` allows.

    That interval is valid for ONE look at a sample size fixed in advance. Recomputing it after
    every chunk and stopping as soon as it excludes ``t`` inflates the error rate far above alpha
    (with 100 looks, several times alpha; see tests/test_statistics.py).

``SequentialTest`` -- anytime-valid early stopping, for evaluating a candidate chunk by chunk and
    dropping (or accepting) it as soon as the verdict is settled. It is a pair of tests by betting
    (nonnegative test supermartingales, Waudby-Smith & Ramdas 2023, "Estimating means of bounded
    random variables by betting", JRSS-B) whose error guarantee holds simultaneously at every
    sample size by Ville's inequality, so it may be checked after every item or chunk, and stopped
    at any data-dependent time. Details in its docstring.

Pure module: standard library only (numpy is imported lazily, only to speed up large bootstraps).
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Sequence

PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"
DEFAULT_CONFIDENCE = 0.95
POWER = 0.8

# Above this many resampled index draws (n * resamples) the bootstrap uses numpy when it is
# installed: pure Python manages ~5 M draws a second, numpy ~100 M.
_PURE_PYTHON_DRAWS = 1_000_000
_NUMPY_BLOCK = 2_000_000  # index draws per numpy block (16 MB of int64)

# SequentialTest: bets are truncated so that one item can cost at most half the wealth.
_TRUNCATION = 0.5
_PRIOR_VARIANCE = 0.25  # aGRAPA's prior variance of x (the largest a [0, 1] variable can have), weight 1


# ----------------------------------------------------------------------------------------------
# Validation


def _check_threshold(threshold: float) -> float:
    t = float(threshold)
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"threshold {threshold!r} must be a positive number (e.g. 0.98)")
    return t


def _check_probability(value: float, name: str) -> float:
    v = float(value)
    if not (0 < v < 1):
        raise ValueError(f"{name} {value!r} must be strictly between 0 and 1")
    return v


def _scores(values: Sequence[float], name: str) -> list[float]:
    out = [float(v) for v in values]
    for i, v in enumerate(out):
        if not (0.0 <= v <= 1.0):  # also rejects NaN
            raise ValueError(f"{name} score {v!r} at item {i} is outside [0, 1]")
    return out


def _pair(baseline: Sequence[float], candidate: Sequence[float], *, allow_empty: bool = False):
    b = _scores(baseline, "baseline")
    c = _scores(candidate, "candidate")
    if len(b) != len(c):
        raise ValueError(f"paired scores need equal lengths: {len(b)} baseline vs {len(c)} candidate scores")
    if not b and not allow_empty:
        raise ValueError("no paired items to compare")
    return b, c


def _is_binary(values: list[float]) -> bool:
    return all(v == 0.0 or v == 1.0 for v in values)


# ----------------------------------------------------------------------------------------------
# Fixed-sample analysis


@dataclass(frozen=True)
class PairedComparison:
    """The fixed-sample comparison of a candidate with the baseline on the same items (see ``compare``)."""

    n: int  # paired items
    baseline_score: float  # mean
    candidate_score: float  # mean
    relative: float | None  # candidate_score / baseline_score; None when baseline_score == 0
    ci_low: float | None  # confidence interval of `relative` at `confidence`
    ci_high: float | None
    confidence: float
    method: str
    mcnemar_p: float | None  # exact McNemar two-sided p-value; None unless all scores are 0/1
    discordant: tuple[int, int] | None  # (baseline right & candidate wrong, baseline wrong & candidate right)
    verdict: str  # PASS if ci_low >= threshold, FAIL if ci_high < threshold, else INCONCLUSIVE
    threshold: float
    items_needed: int | None  # items to detect a relative drop of (1 - threshold), power POWER
    underpowered: bool  # items_needed > n

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["discordant"] = list(self.discordant) if self.discordant is not None else None
        return d


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar test: the p-value of ``b`` vs ``c`` discordant pairs.

    ``b`` = items the baseline got right and the candidate wrong, ``c`` = the reverse. Under the null
    hypothesis (both models equally accurate) each discordant pair goes either way with probability
    1/2, so ``min(b, c)`` is Binomial(b + c, 1/2) in its lower tail; the p-value doubles that tail,
    capped at 1. Returns 1.0 when there are no discordant pairs. Computed exactly with integers.
    """
    if isinstance(b, bool) or isinstance(c, bool) or not isinstance(b, int) or not isinstance(c, int):
        raise ValueError(f"discordant counts must be integers, got {b!r} and {c!r}")
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got {b} and {c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


def items_needed(
    baseline: Sequence[float],
    candidate: Sequence[float],
    threshold: float,
    confidence: float = DEFAULT_CONFIDENCE,
    power: float = POWER,
) -> int | None:
    """Items a paired test needs to detect the largest drop the threshold allows.

    The drop is ``delta = (1 - threshold) * mean(baseline)`` in the mean score. A two-sided paired
    z-test at level ``alpha = 1 - confidence`` detects it with probability ``power`` once

        n >= ((z_{1 - alpha/2} + z_{power}) * sd_d / delta) ** 2,

    where ``sd_d`` is the standard deviation of the paired differences ``d_i = candidate_i -
    baseline_i`` (sample variance, n - 1 denominator).

    Variance floor: the observed variance is raised to at least ``delta * (1 - delta)``. That is the
    smallest variance a paired 0/1 difference can have when its mean drops by ``delta`` (the drop must
    come from at least a fraction ``delta`` of items flipping right -> wrong, so d is -1 with
    probability >= delta). Without it, a sample where the two models never disagree (variance 0)
    would claim that one item suffices; with it, such a sample asks for the items needed to see the
    first disagreements that a drop of ``delta`` implies. For graded scores a uniform small shift
    could in principle have a lower variance; the floor is then conservative (asks for more items).

    Returns ``None`` when ``threshold >= 1`` (no drop to detect) or the baseline mean is 0.
    """
    b, c = _pair(baseline, candidate)
    t = _check_threshold(threshold)
    alpha = 1 - _check_probability(confidence, "confidence")
    power = _check_probability(power, "power")
    if t >= 1:
        return None
    n = len(b)
    mean_b = math.fsum(b) / n
    if mean_b == 0:
        return None
    delta = (1 - t) * mean_b
    diffs = [y - x for x, y in zip(b, c)]
    var = statistics.variance(diffs) if n >= 2 else 0.0
    var = max(var, delta * (1 - delta))
    z = statistics.NormalDist().inv_cdf(1 - alpha / 2) + statistics.NormalDist().inv_cdf(power)
    return max(1, math.ceil(z * z * var / (delta * delta)))


def _bootstrap_sums(b: list[float], c: list[float], resamples: int, seed: int) -> tuple[list[float], list[float]]:
    """Sums of baseline and candidate scores over ``resamples`` paired resamples of the items."""
    n = len(b)
    np = None
    if n * resamples > _PURE_PYTHON_DRAWS:
        try:
            import numpy as np  # lazily: a large bootstrap in pure Python takes seconds
        except ImportError:  # pragma: no cover - numpy comes with the project's dependencies
            np = None
    if np is not None:
        gen = np.random.Generator(np.random.PCG64(seed))
        bb, cc = np.asarray(b, dtype=float), np.asarray(c, dtype=float)
        sums_b: list[float] = []
        sums_c: list[float] = []
        block = max(1, _NUMPY_BLOCK // n)
        for start in range(0, resamples, block):
            idx = gen.integers(0, n, size=(min(block, resamples - start), n))
            sums_b.extend(bb[idx].sum(axis=1).tolist())
            sums_c.extend(cc[idx].sum(axis=1).tolist())
        return sums_b, sums_c
    rng = random.Random(seed)
    pool = [complex(x, y) for x, y in zip(b, c)]  # one C-level sum gives both sums
    sums = [sum(rng.choices(pool, k=n)) for _ in range(resamples)]
    return [s.real for s in sums], [s.imag for s in sums]


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation quantile of a sorted list (numpy's default, 'type 7')."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def compare(
    baseline: Sequence[float],
    candidate: Sequence[float],
    threshold: float,
    confidence: float = DEFAULT_CONFIDENCE,
    *,
    resamples: int = 2000,
    seed: int = 0,
) -> PairedComparison:
    """Compare a candidate with the baseline on the same items, once all items are scored.

    * ``relative`` = mean(candidate) / mean(baseline).
    * ``ci_low``/``ci_high``: a paired bootstrap percentile interval for ``relative`` at ``confidence``:
      ``resamples`` times, draw n item indices with replacement, the same indices for both models,
      and take the ratio of the two means; the interval is the (alpha/2, 1 - alpha/2) quantiles of
      those ratios (linear interpolation). Resamples whose baseline mean is 0 have no ratio and are
      skipped. The resampled items include two pseudo-items, one the baseline gets right and the
      candidate wrong and one the other way round (as Agresti & Min's interval for matched
      proportions adds pseudo-counts): without them, a candidate that disagrees with the baseline on
      none of a few items gets the degenerate interval [1, 1] and passes any threshold -- one item
      would do -- and one that loses, say, 5 % of the baseline's right answers passes 0.98 on 60
      items one time in ten. Deterministic for a given ``seed``: up to 1 M index draws
      (n * resamples) use ``random.Random(seed)``; larger bootstraps use numpy's PCG64 generator
      seeded with ``seed`` (pure Python would take seconds).
    * ``verdict``: PASS when ``ci_low >= threshold``, FAIL when ``ci_high < threshold``, otherwise
      INCONCLUSIVE. Valid for one look at a sample size fixed in advance -- use ``SequentialTest`` to
      stop early.
    * ``mcnemar_p``/``discordant``: for 0/1 scores only, the exact McNemar test (see ``mcnemar_exact``).
    * ``items_needed``/``underpowered``: see ``items_needed``; underpowered when it exceeds n.

    A baseline mean of 0 leaves the ratio undefined: ``relative``, the interval and ``items_needed``
    are None and the verdict is INCONCLUSIVE (the caller decides what a baseline that scores nothing
    means). Raises ValueError on no items, unequal lengths, scores outside [0, 1], a threshold <= 0,
    a confidence outside (0, 1) or resamples < 1.
    """
    b, c = _pair(baseline, candidate)
    t = _check_threshold(threshold)
    confidence = _check_probability(confidence, "confidence")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples {resamples!r} must be a positive integer")
    alpha = 1 - confidence
    n = len(b)
    mean_b, mean_c = math.fsum(b) / n, math.fsum(c) / n

    mcnemar_p: float | None = None
    discordant: tuple[int, int] | None = None
    if _is_binary(b) and _is_binary(c):
        b_only = sum(1 for x, y in zip(b, c) if x == 1.0 and y == 0.0)
        c_only = sum(1 for x, y in zip(b, c) if x == 0.0 and y == 1.0)
        discordant = (b_only, c_only)
        mcnemar_p = mcnemar_exact(b_only, c_only)

    relative = ci_low = ci_high = None
    verdict = INCONCLUSIVE
    if mean_b > 0:
        relative = mean_c / mean_b
        # one disagreement each way: no disagreement seen is not read as none possible
        sums_b, sums_c = _bootstrap_sums([*b, 1.0, 0.0], [*c, 0.0, 1.0], resamples, seed)
        ratios = sorted(sc / sb for sb, sc in zip(sums_b, sums_c) if sb > 0)
        if ratios:
            ci_low, ci_high = _quantile(ratios, alpha / 2), _quantile(ratios, 1 - alpha / 2)
            if ci_low >= t:
                verdict = PASS
            elif ci_high < t:
                verdict = FAIL

    needed = items_needed(b, c, t, confidence)
    return PairedComparison(
        n=n,
        baseline_score=mean_b,
        candidate_score=mean_c,
        relative=relative,
        ci_low=ci_low,
        ci_high=ci_high,
        confidence=confidence,
        method=f"paired bootstrap ({resamples} resamples, percentile, a disagreement added each way)",
        mcnemar_p=mcnemar_p,
        discordant=discordant,
        verdict=verdict,
        threshold=t,
        items_needed=needed,
        underpowered=needed is not None and needed > n,
    )


# ----------------------------------------------------------------------------------------------
# Anytime-valid early stopping


class SequentialTest:
    """Anytime-valid early stopping: settles PASS or FAIL as soon as the evidence allows.

    Feed paired scores chunk by chunk with ``update``; ``decision`` becomes PASS or FAIL once settled
    (and stays so), and is None while open. The decision may be checked after every chunk and the
    candidate stopped at any data-dependent time: the guarantee is uniform over time.

    Reduction to a bounded mean. With baseline score ``b`` and candidate score ``c`` in [0, 1] and the
    threshold ``t``, let ``d = c - t * b`` in [-t, 1] and rescale ``x = (d + t) / (1 + t)`` in [0, 1].
    Then ``relative >= t  <=>  E[d] >= 0  <=>  E[x] >= m`` with ``m = t / (1 + t)``.

    Two one-sided tests by betting (Waudby-Smith & Ramdas 2023), each a wealth process starting at 1:

    * FAIL test, null hypothesis ``E[x] >= m`` (the candidate meets ``t``):
      ``K_fail_n = prod_i (1 - lam_i * (x_i - m))`` with ``0 <= lam_i <= c / (1 - m)``;
    * PASS test, null hypothesis ``E[x] <= m`` (the candidate does not exceed ``t``):
      ``K_pass_n = prod_i (1 + lam'_i * (x_i - m))`` with ``0 <= lam'_i <= c / m``.

    The bets ``lam_i`` are *predictable* -- computed from ``x_1 .. x_{i-1}`` only -- and nonnegative,
    and the caps (truncation ``c = 0.5``) keep every factor >= 1/2 > 0. Under its null hypothesis the
    conditional expectation of each factor is <= 1, so each wealth is a nonnegative supermartingale
    with initial value 1, and by Ville's inequality ``P(sup_n K_n >= 2 / alpha) <= alpha / 2``.
    A test settles when its wealth has reached ``2 / alpha`` (``alpha = 1 - confidence``) at some
    point, and only once ``min_items`` items have been seen. Hence, at any stopping time:

    * if the true relative is >= t, P(ever settled FAIL) <= alpha / 2;
    * if the true relative is <= t, P(ever settled PASS) <= alpha / 2;
    * so even at the worst case, relative exactly t, P(any decision) <= alpha.

    Each side uses alpha / 2 (equivalently, the two one-sided tests are hedged with weights 1/2) so
    that the pair is a two-sided level-alpha test, matching ``compare``'s two-sided interval: the
    thresholds not yet rejected form a ``confidence`` confidence sequence for the relative. Using
    alpha per side would need ~log(20) instead of log(40) of log-wealth (roughly 20 % fewer items).
    In practice the error rates are far below these bounds (Ville's inequality is conservative).

    Betting strategy: aGRAPA (approximate growth-rate adaptive to the particular alternative, WSR 2023
    section 5): ``lam = (mu - m) / (s2 + (mu - m)**2)`` for the PASS test when ``mu > m``, and
    ``(m - mu) / (s2 + (mu - m)**2)`` for the FAIL test when ``mu < m``, clipped to the caps above
    (the other test bets 0), where ``mu`` and ``s2`` are running estimates of the mean and variance
    of the past ``x`` with prior mean ``m`` (no bet before any data) and prior variance 1/4, weight 1.
    A test therefore only bets in the direction the past data point to; a wrong-way run of bets can
    lose at most half the wealth per item and is undone by the data that follow.

    Assumption: the items are i.i.d. draws from the task's population, presented in random order --
    the caller shuffles the item order with a fixed seed and feeds both models' scores in that same
    order. (A random permutation of an i.i.d. sample is still i.i.d.) Without the shuffle, an item
    order correlated with difficulty (e.g. a dataset sorted by category) breaks the guarantee. The
    guarantee is about the population relative, the same quantity ``compare`` estimates.
    """

    def __init__(self, threshold: float, confidence: float = DEFAULT_CONFIDENCE, min_items: int = 0) -> None:
        self.threshold = _check_threshold(threshold)
        self.confidence = _check_probability(confidence, "confidence")
        if isinstance(min_items, bool) or not isinstance(min_items, int) or min_items < 0:
            raise ValueError(f"min_items {min_items!r} must be an integer >= 0")
        self.min_items = min_items
        self.alpha = 1 - self.confidence
        self.decision: str | None = None
        self.decided_at: int | None = None  # items seen when the decision was settled
        self.n = 0  # items seen
        self.log_wealth_pass = 0.0
        self.log_wealth_fail = 0.0
        self._m = self.threshold / (1 + self.threshold)
        self._log_bar = math.log(2 / self.alpha)
        self._cap_pass = _TRUNCATION / self._m
        self._cap_fail = _TRUNCATION / (1 - self._m)
        self._k = 0  # observations in the wealth (items up to the decision)
        self._sum_x = 0.0
        self._sum_sq = 0.0  # sum of (x_i - mu_i)^2, mu_i the running mean including x_i
        self._max_pass = 0.0  # running max of the log-wealth
        self._max_fail = 0.0

    def update(self, baseline: Sequence[float], candidate: Sequence[float]) -> str | None:
        """Feed the next chunk of paired scores (in the shuffled item order); returns ``self.decision``.

        After the decision is settled, further items are only counted in ``n``.
        """
        b, c = _pair(baseline, candidate, allow_empty=True)
        t, m = self.threshold, self._m
        for bi, ci in zip(b, c):
            self.n += 1
            if self.decision is not None:
                continue
            x = min(1.0, max(0.0, (ci - t * bi + t) / (1 + t)))
            # Predictable bets: from the observations before this one only.
            k = self._k
            mu = (m + self._sum_x) / (k + 1)
            s2 = (_PRIOR_VARIANCE + self._sum_sq) / (k + 1)
            gap = mu - m
            if gap > 0:
                lam = min(gap / (s2 + gap * gap), self._cap_pass)
                self.log_wealth_pass += math.log1p(lam * (x - m))
            elif gap < 0:
                lam = min(-gap / (s2 + gap * gap), self._cap_fail)
                self.log_wealth_fail += math.log1p(-lam * (x - m))
            self._k = k + 1
            self._sum_x += x
            self._sum_sq += (x - (m + self._sum_x) / (k + 2)) ** 2
            self._max_pass = max(self._max_pass, self.log_wealth_pass)
            self._max_fail = max(self._max_fail, self.log_wealth_fail)
            if self.n >= self.min_items:
                if self._max_fail >= self._log_bar:
                    self.decision, self.decided_at = FAIL, self.n
                elif self._max_pass >= self._log_bar:
                    self.decision, self.decided_at = PASS, self.n
        return self.decision

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "decision": self.decision,
            "decided_at": self.decided_at,
            "threshold": self.threshold,
            "confidence": self.confidence,
            "alpha": self.alpha,
            "min_items": self.min_items,
            "log_wealth_pass": self.log_wealth_pass,
            "log_wealth_fail": self.log_wealth_fail,
            "log_wealth_to_settle": self._log_bar,
            "method": "test by betting (aGRAPA, truncation 0.5), alpha/2 per side, Ville's inequality",
        }
