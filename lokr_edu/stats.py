"""The course's one rule for "A is better than B": Welch's t-test on per-seed results.

Every chapter, solution and benchmark that calls one method better than another calls
`compare` and nothing else (chapters 05 and 07 teach it). The rule:

    difference d = mean(a) - mean(b)
    standard error SE = sqrt(s_a² / n_a + s_b² / n_b)                (Welch 1947)
    degrees of freedom ν = SE⁴ / ((s_a²/n_a)² / (n_a - 1) + (s_b²/n_b)² / (n_b - 1))
    95 % interval d ± t_{0.975, ν} · SE

"A > B" when the whole interval lies above zero, "A < B" when it lies below, and "≈" otherwise:
the seeds show no difference we can see. With three seeds an interval is wide (t_{0.975, 2} is
4.3), which is the honest price of three seeds; five narrow it (t_{0.975, 4} = 2.8).

The t-test itself is scipy's (`scipy.stats.ttest_ind(equal_var=False)`); this module only fixes
the level, the wording and what happens when a side has no spread at all.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats as _scipy_stats

LEVEL = 0.05  # two-sided; the interval is 1 - LEVEL = 95 %


@dataclass(frozen=True)
class Comparison:
    """The verdict of `compare` and the numbers behind it."""

    verdict: str  # ">", "<" or "≈"
    difference: float  # mean(a) - mean(b)
    low: float  # the 95 % interval of the difference
    high: float
    p_value: float
    n_a: int
    n_b: int

    @property
    def seen(self) -> bool:
        """Whether the seeds show a difference (the verdict is not "≈")."""
        return self.verdict != "≈"

    def __str__(self) -> str:
        return (
            f"{self.verdict}  (difference {self.difference:+.3f}, "
            f"95 % interval [{self.low:+.3f}, {self.high:+.3f}], "
            f"Welch p = {self.p_value:.3f}, {self.n_a} vs {self.n_b} seeds)"
        )


def compare(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Comparison:
    """Compare two methods from their per-seed results (one number per seed, higher is better).

    Welch's t-test (unequal variances), two-sided at `level`; the verdict is ">" or "<" only when
    the (1 - level) interval of mean(a) - mean(b) excludes zero. Each side needs two seeds or
    more. When neither side varies across its seeds the test is undefined: equal means are "≈",
    and different ones are a difference seen on every seed.
    """
    a, b = [float(v) for v in a], [float(v) for v in b]
    if len(a) < 2 or len(b) < 2:
        raise ValueError(
            f"compare needs at least two seeds per side to see a spread; got {len(a)} and {len(b)}"
        )
    if not 0 < level < 1:
        raise ValueError(f"level is a probability between 0 and 1, got {level}")
    difference = statistics.fmean(a) - statistics.fmean(b)
    if statistics.pvariance(a) == 0 and statistics.pvariance(b) == 0:
        p_value = 1.0 if difference == 0 else 0.0
        low = high = difference
    else:
        with warnings.catch_warnings():  # one side without spread: scipy warns, the test holds
            warnings.filterwarnings("ignore", "Precision loss", RuntimeWarning)
            test = _scipy_stats.ttest_ind(a, b, equal_var=False)
        interval = test.confidence_interval(confidence_level=1 - level)
        p_value, low, high = float(test.pvalue), float(interval.low), float(interval.high)
    if low > 0:
        verdict = ">"
    elif high < 0:
        verdict = "<"
    else:
        verdict = "≈"
    if math.isnan(p_value):  # pragma: no cover - scipy returns nan only for degenerate input
        raise ValueError(f"Welch's test is undefined for {a} and {b}")
    return Comparison(verdict, difference, low, high, p_value, len(a), len(b))


def mean_sd(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, sample standard deviation, number of seeds): how every table reports a result."""
    values = [float(v) for v in values]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), sd, len(values)
