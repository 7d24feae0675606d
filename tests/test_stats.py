"""The course's one comparison rule (lokr_edu.stats): cases it must call >, < and ≈."""

import math
import statistics

import pytest

from lokr_edu.stats import compare, mean_sd


def welch_by_hand(a, b):
    """Welch's interval from the formula in lokr_edu.stats' docstring, t from a table."""
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    nu = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return ma - mb, se, nu


def test_a_clear_gap_is_a_difference_both_ways():
    a, b = [0.95, 0.96, 0.97, 0.94, 0.96], [0.80, 0.82, 0.79, 0.81, 0.80]
    assert compare(a, b).verdict == ">"
    assert compare(b, a).verdict == "<"
    assert compare(a, b).low > 0 and compare(b, a).high < 0


def test_a_gap_inside_the_spread_is_no_difference():
    # chapter 07's old rule called 1.00 > 0.99 on a 0.007 gap; three seeds cannot show it
    assert compare([1.0, 1.0, 1.0], [0.995, 0.99, 0.995]).verdict == "≈"
    # LoRA 0.855 ± 0.12 against LoKr 0.755 ± 0.18 over three seeds: no difference we can see
    found = compare([0.97, 0.735, 0.86], [0.895, 0.55, 0.82])
    assert found.verdict == "≈" and found.low < 0 < found.high


def test_the_interval_is_welchs():
    a, b = [0.9, 0.7, 0.85, 0.95, 0.8], [0.6, 0.75, 0.7]
    d, se, nu = welch_by_hand(a, b)
    found = compare(a, b)
    assert found.difference == pytest.approx(d)
    half = found.high - d
    assert found.low == pytest.approx(d - half)
    # t_{0.975, ν} lies between the table's values at the integer degrees of freedom around ν
    t = half / se
    table = {2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365}
    assert table[math.ceil(nu)] - 1e-3 <= t <= table[math.floor(nu)] + 1e-3
    assert (found.verdict == ">") == (found.p_value < 0.05)


def test_a_wider_level_sees_more():
    a, b = [0.9, 0.8, 0.85], [0.8, 0.7, 0.78]
    assert compare(a, b, level=0.05).verdict == "≈"
    assert compare(a, b, level=0.5).verdict == ">"


def test_no_spread_on_either_side():
    assert compare([1.0, 1.0], [1.0, 1.0]).verdict == "≈"
    assert compare([1.0, 1.0], [0.0, 0.0]).verdict == ">"


def test_bad_input_says_what_is_wrong():
    with pytest.raises(ValueError, match="at least two seeds"):
        compare([0.9], [0.8, 0.7])
    with pytest.raises(ValueError, match="level"):
        compare([0.9, 0.8], [0.8, 0.7], level=5)


def test_str_gives_the_interval_and_the_seeds():
    text = str(compare([0.9, 0.8, 0.85], [0.8, 0.7, 0.78]))
    assert text.startswith("≈") and "95 % interval" in text and "3 vs 3 seeds" in text


def test_mean_sd():
    assert mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0, 3)
    assert mean_sd([0.5]) == (0.5, 0.0, 1)
