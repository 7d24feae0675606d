"""Chapter 05's checks pass on the reference answers and explain plausible wrong ones."""

from __future__ import annotations

import math
import statistics

import torch
from check_cases import check_tests
from scipy import stats
from torch import nn

from lokr_edu import checks
from lokr_edu.checks.ch05 import WELCH_CASES
from lokr_edu.stats import compare
from lokr_edu.toy import accuracy


def subset_row(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[int, float]:
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("bias"))
    with torch.no_grad():
        right = (model(x).argmax(dim=-1) == y).float().mean().item()
    return sum(p.numel() for p in model.parameters() if p.requires_grad), right


def subset_row_written_differently(model, x, y):  # a valid answer, not the reference's code
    trainable = 0
    for name, p in model.named_parameters():
        p.requires_grad = "bias" in name
        trainable += p.numel() if p.requires_grad else 0
    return trainable, float(torch.mean((torch.argmax(model(x), 1) == y).double()))


def counting_tensors(model, x, y):
    _, right = subset_row(model, x, y)
    return sum(1 for p in model.parameters() if p.requires_grad), right


def counting_everything(model, x, y):
    _, right = subset_row(model, x, y)
    return sum(p.numel() for p in model.parameters()), right


def argmax_over_examples(model, x, y):
    count, _ = subset_row(model, x, y)
    return count, (model(x).argmax(0) == y).float().mean().item()


def counting_right_rows(model, x, y):
    count, _ = subset_row(model, x, y)
    return count, (model(x).argmax(-1) == y).sum().item()


def freezing_the_first_weight_only(model, x, y):
    model[0].weight.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad), accuracy(model, x, y)


def zeroing_the_weights(model, x, y):
    result = subset_row(model, x, y)
    with torch.no_grad():
        model[0].weight.zero_()
    return result


def welch(a, b):
    d = statistics.fmean(a) - statistics.fmean(b)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    nu = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = stats.t.ppf(0.975, nu) * se
    return d, d - half, d + half


def welch_with_scipy(a, b):  # a valid answer: scipy's own Welch test
    test = stats.ttest_ind(a, b, equal_var=False)
    interval = test.confidence_interval(0.95)
    return statistics.fmean(a) - statistics.fmean(b), interval.low, interval.high


def welch_with(*, z=None, q=0.975, ddof=1, df=None, pooled=False, per_seed=True, swap=False):
    """Welch's interval with one slip switched on."""

    def answer(a, b):
        if swap:
            a, b = b, a
        d = statistics.fmean(a) - statistics.fmean(b)
        var = statistics.variance if ddof == 1 else statistics.pvariance
        va, vb = var(a), var(b)
        if per_seed:
            va, vb = va / len(a), vb / len(b)
        se = math.sqrt(va + vb)
        if pooled:
            s2 = ((len(a) - 1) * var(a) + (len(b) - 1) * var(b)) / (len(a) + len(b) - 2)
            se = math.sqrt(s2 * (1 / len(a) + 1 / len(b)))
        nu = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
        t = z if z is not None else stats.t.ppf(q, nu if df is None else df(len(a), len(b)))
        return d, d - t * se, d + t * se

    return answer


def freeze_base(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(".adapters." in name)


def freeze_weights_by_suffix(model: nn.Module) -> None:  # the broken one of exercise 5.4
    for name, p in model.named_parameters():
        if name.endswith("weight") and ".adapters." not in name:
            p.requires_grad = False


def freeze_copies(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if ".adapters." not in name:
            p.data.requires_grad = False


def freeze_first_layer_only(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if name.startswith("0.") and ".adapters." not in name:
            p.requires_grad_(False)


def freeze_and_reset(model: nn.Module) -> None:
    freeze_base(model)
    with torch.no_grad():
        model[0].base.bias.zero_()


CASES = [
    (
        checks.check_bias_subset,
        subset_row,
        [
            (counting_tensors, "not parameter tensors"),
            (counting_everything, "only the parameters with p.requires_grad"),
            (argmax_over_examples, "over the classes (dim=-1)"),
            (counting_right_rows, "divide the number of correct rows"),
            (freezing_the_first_weight_only, "True only for the biases"),
            (zeroing_the_weights, "changed parameter values"),
            (lambda m, x, y: 4, "return two numbers"),
        ],
    ),
    (checks.check_bias_subset, subset_row_written_differently, []),
    (
        checks.check_welch_interval,
        welch,
        [
            (welch_with(swap=True), "not mean(b) − mean(a)"),
            (welch_with(ddof=0), "sample variance"),
            (welch_with(z=1.96), "not the normal 1.96"),
            (welch_with(q=0.95), "t at 0.975, not 0.95"),
            (welch_with(df=lambda na, nb: na + nb - 2), "Welch's degrees of freedom ν"),
            (welch_with(pooled=True, df=lambda na, nb: na + nb - 2), "the pooled variance"),
            (welch_with(per_seed=False), "divide each variance by its number of seeds"),
            (lambda a, b: welch(a, b)[1:], "return three numbers"),
        ],
    ),
    (checks.check_welch_interval, welch_with_scipy, []),
    (
        checks.check_predict_bigger_adapter,
        "LoKr",
        [("LoRA", "but LoKr has more"), ("LoKr r=8", 'write "LoRA" or "LoKr"')],
    ),
    (
        checks.check_freeze_base,
        freeze_base,
        [
            (freeze_weights_by_suffix, "the biases are part of the base model too"),
            (lambda m: m.requires_grad_(False), "froze the adapter too"),
            (freeze_copies, "froze nothing"),
            (freeze_first_layer_only, "base parameters still train: 2.base.weight"),
            (freeze_and_reset, "changed parameter values"),
        ],
    ),
    (
        checks.check_lokr_beats_lora,
        0.03,
        [
            (0.001, "neither has learned the task"),
            (0.003, "no difference we can see"),
            (0.0, "give a learning rate"),
            ("3e-2", "give a learning rate"),
        ],
    ),
]

test_check_passes_on_the_reference, test_check_explains_a_wrong_answer = check_tests(CASES)


def test_welch_cases_are_told_apart_by_every_slip() -> None:
    """Each slip the check names gives a different interval from compare's on the first case."""
    a, b = WELCH_CASES[0]  # 5 against 3 seeds: Welch's and Student's tests differ
    reference = compare(a, b)
    slips = [
        welch_with(swap=True),
        welch_with(ddof=0),
        welch_with(z=1.96),
        welch_with(q=0.95),
        welch_with(df=lambda na, nb: na + nb - 2),
        welch_with(per_seed=False),
        welch_with(pooled=True, df=lambda na, nb: na + nb - 2),
    ]
    for slip in slips:
        low = slip(a, b)[1]
        assert not math.isclose(low, reference.low, rel_tol=1e-4), slip
    assert math.isclose(welch(a, b)[1], reference.low, rel_tol=1e-9)
