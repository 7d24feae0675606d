"""Checks for chapter 05's exercises (solutions/05_finetune_on_cpu_solutions.ipynb)."""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Callable, Sequence

import torch
from torch import nn

from lokr_edu.checks.common import CheckError, call_student, passed
from lokr_edu.stats import compare, mean_sd

__all__ = [
    "check_bias_subset",
    "check_welch_interval",
    "check_predict_bigger_adapter",
    "check_freeze_base",
    "check_lokr_beats_lora",
]


# ---- exercise 5.1: one row of the table, for the bias subset -----------------------------------


def _logit_network() -> nn.Sequential:
    """One Linear layer 4 → 4 whose output is its input: model(x) are the logits x."""
    layer = nn.Linear(4, 4)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(4))
        layer.bias.zero_()
    return nn.Sequential(layer)


LOGITS = torch.tensor(
    [[0.1, 2.0, 0.3, 0.0], [3.0, 1.0, 0.0, 0.0], [0.0, 0.1, 0.2, 0.0], [1.0, 0.0, 5.0, 0.5]]
)  # 4 examples, 4 classes: rows 0 and 2 are right
LABELS = torch.tensor([1, 2, 2, 0])


def _number(value: object) -> object:
    return value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value


def check_bias_subset(subset_row: Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple]) -> None:
    """Exercise 5.1: make the biases the only trainable parameters; return (numbers, accuracy).

    trainable numbers = Σ p.numel() over the parameters with requires_grad (chapter 05's table);
    accuracy = mean over rows of [argmax_j logits_ij = y_i]."""
    from lokr_edu.toy import accuracy, load_base_model, load_digits

    upright = load_digits("upright")
    cases = [
        (_logit_network(), LOGITS, LABELS, "on a 4 → 4 layer whose logits are its input"),
        (load_base_model(), upright.x_test, upright.y_test, "on chapter 05's base model"),
    ]
    for model, x, y, context in cases:
        values = {n: p.detach().clone() for n, p in model.named_parameters()}
        want_accuracy = accuracy(model, x, y)
        biases = sorted(n for n in values if n.endswith("bias"))
        want_count = sum(values[n].numel() for n in biases)
        got = call_student("subset_row", subset_row, model, x, y, context=context)
        if not isinstance(got, tuple | list) or len(got) != 2:
            raise CheckError(
                f"subset_row returned {got!r} {context}: return two numbers, (trainable, accuracy)"
            )
        count, acc = (_number(v) for v in got)
        if any(not torch.equal(p, values[n]) for n, p in model.named_parameters()):
            raise CheckError(
                "subset_row changed parameter values: only requires_grad should change"
            )
        trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        if trainable != biases:
            raise CheckError(
                f"after subset_row {context} the trainable parameters are {trainable}; expected "
                f"{biases}: set requires_grad on every parameter, True only for the biases"
            )
        if count != want_count:
            if count == len(biases):
                hint = "count numbers (p.numel()), not parameter tensors"
            elif count == sum(v.numel() for v in values.values()):
                hint = "count only the parameters with p.requires_grad"
            else:
                hint = "sum p.numel() over the parameters that require grad"
            raise CheckError(
                f"subset_row counted {count!r} trainable numbers {context}; "
                f"expected {want_count}: {hint}"
            )
        if not isinstance(acc, int | float) or not math.isclose(acc, want_accuracy, abs_tol=1e-6):
            if isinstance(acc, int | float) and math.isclose(acc, want_accuracy * len(y)):
                hint = "divide the number of correct rows by the number of rows"
            elif acc == 0.25 and len(y) == 4:
                hint = "take the argmax over the classes (dim=-1), not over the examples"
            else:
                hint = "(model(x).argmax(dim=-1) == y).float().mean().item()"
            raise CheckError(
                f"subset_row's accuracy is {acc!r} {context}; expected {want_accuracy}: {hint}"
            )
    passed(
        f"subset_row leaves exactly the biases trainable and scores the model: on chapter 05's "
        f"base model {count:,} numbers train, and it classifies {acc:.3f} of the upright test "
        "digits"
    )


# ---- exercise 5.2: Welch's interval by hand ---------------------------------------------------

WELCH_CASES = [  # (a, b): per-seed results of two methods; unequal numbers of seeds first
    ([0.90, 0.70, 0.85, 0.95, 0.80], [0.60, 0.75, 0.70]),
    ([0.927, 0.939, 0.938, 0.953, 0.954], [0.936, 0.941, 0.941, 0.926, 0.943]),
    ([0.73, 0.826, 0.776, 0.862, 0.757], [0.895, 0.88, 0.895, 0.895, 0.901]),
]


def _welch_variants(a: Sequence[float], b: Sequence[float]) -> list[tuple[str, tuple]]:
    """(difference, low, high) of likely slips, each with the hint it earns."""
    from scipy.stats import t

    na, nb = len(a), len(b)
    d = statistics.fmean(a) - statistics.fmean(b)
    sa, sb = statistics.variance(a), statistics.variance(b)
    va, vb = sa / na, sb / nb
    se = math.sqrt(va + vb)
    nu = (va + vb) ** 2 / (va**2 / (na - 1) + vb**2 / (nb - 1))
    pa, pb = statistics.pvariance(a) / na, statistics.pvariance(b) / nb
    p_nu = (pa + pb) ** 2 / (pa**2 / (na - 1) + pb**2 / (nb - 1))
    raw_nu = (sa + sb) ** 2 / (sa**2 / (na - 1) + sb**2 / (nb - 1))  # ν without the /n
    pooled = ((na - 1) * sa + (nb - 1) * sb) / (na + nb - 2)
    pooled_se = math.sqrt(pooled * (1 / na + 1 / nb))

    def around(centre: float, half: float) -> tuple:
        return (centre, centre - half, centre + half)

    slips = {
        "the difference is mean(a) − mean(b), not mean(b) − mean(a)": around(
            -d, t.ppf(0.975, nu) * se
        ),
        "use each side's sample variance, divided by n − 1 (statistics.variance)": around(
            d, t.ppf(0.975, p_nu) * math.sqrt(pa + pb)
        ),
        "t comes from Student's t distribution at Welch's ν, not the normal 1.96: "
        "a few seeds estimate the spread only roughly, so the interval is wider": around(
            d, 1.96 * se
        ),
        "a two-sided 95 % interval takes t at 0.975, not 0.95": around(d, t.ppf(0.95, nu) * se),
        "use Welch's degrees of freedom ν, not n_a + n_b − 2": around(
            d, t.ppf(0.975, na + nb - 2) * se
        ),
        "the pooled variance assumes both methods vary equally: Welch's SE is "
        "√(s_a²/n_a + s_b²/n_b)": around(d, t.ppf(0.975, na + nb - 2) * pooled_se),
    }
    per_seed = "divide each variance by its number of seeds: SE = √(s_a²/n_a + s_b²/n_b)"
    variants = list(slips.items())
    variants.append((per_seed, around(d, t.ppf(0.975, nu) * math.sqrt(sa + sb))))
    variants.append((per_seed, around(d, t.ppf(0.975, raw_nu) * math.sqrt(sa + sb))))
    return variants


def _close(x: Sequence[float], y: Sequence[float]) -> bool:
    return all(math.isclose(u, v, rel_tol=1e-6, abs_tol=1e-9) for u, v in zip(x, y, strict=True))


def check_welch_interval(welch: Callable[[list, list], tuple]) -> None:
    """Exercise 5.2: (difference, low, high), Welch's 95 % interval of mean(a) − mean(b).

    d = mean(a) − mean(b), SE = √(s_a²/n_a + s_b²/n_b),
    ν = SE⁴ / ((s_a²/n_a)²/(n_a − 1) + (s_b²/n_b)²/(n_b − 1)), interval d ± t_{0.975, ν}·SE
    (Welch 1947; `lokr_edu.stats.compare` is the reference)."""
    for a, b in WELCH_CASES:
        call = f"welch({a}, {b})"
        got = call_student("welch", welch, list(a), list(b), context=f"for {call}")
        if not isinstance(got, tuple | list) or len(got) != 3:
            raise CheckError(
                f"{call} returned {got!r}: return three numbers, (difference, low, high)"
            )
        try:
            got = tuple(float(v) for v in got)
        except (TypeError, ValueError) as error:
            raise CheckError(f"{call} returned {got!r}: return three numbers") from error
        ref = compare(a, b)
        want = (ref.difference, ref.low, ref.high)
        if _close(got, want):
            continue
        shown = ", ".join(f"{v:+.4f}" for v in got)
        expected = ", ".join(f"{v:+.4f}" for v in want)
        message = f"{call} returned ({shown}); expected ({expected})"
        for hint, variant in _welch_variants(a, b):
            if _close(got, variant):
                raise CheckError(f"{message}: {hint}")
        if math.isclose(got[0], want[0], rel_tol=1e-6):
            raise CheckError(
                f"{message}: the difference is right, the interval is not; it is d ± t·SE with "
                "t = scipy.stats.t.ppf(0.975, ν)"
            )
        raise CheckError(f"{message}: start from d = mean(a) − mean(b)")
    a, b = WELCH_CASES[1]
    passed(
        "welch gives Welch's 95 % interval, as lokr_edu.stats.compare does; chapter 05's LoHa r=2 "
        f"against LoRA r=4 (their seeds to three digits) is {compare(a, b)}"
    )


# ---- exercises 5.3–5.5: predict, debug, explore -------------------------------------------------

ADAPTED = ["0", "2", "4"]  # the base model's three Linear layers, as in the chapter
LORA, LOKR = "LoRA r=1", "LoKr 8×8 ⊗ 16×16"  # 586 and 608 trainable numbers
CHOICES = {LORA: ("lora", 1), LOKR: ("lokr", 8)}  # label -> (method, rank given to inject)


def _adapted(method: str, rank: int, seed: int = 0) -> nn.Module:
    from lokr_edu.adapters import inject
    from lokr_edu.toy import load_base_model

    torch.manual_seed(seed)
    model = load_base_model()
    inject(model, ADAPTED, method=method, rank=rank)
    return model


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_predict_bigger_adapter(prediction: str) -> None:
    """Exercise 5.3: LoRA r = 1 or LoKr built with rank 8: which has more trainable numbers."""
    if prediction not in ("LoRA", "LoKr"):
        raise CheckError(
            f'prediction is {prediction!r}: write "LoRA" or "LoKr", exactly as spelled'
        )
    models = {label.split()[0]: _adapted(*spec) for label, spec in CHOICES.items()}
    counts = {label: _count(model) for label, model in models.items()}
    bigger = max(counts, key=counts.get)
    factors = ", ".join(
        f"{name} {'×'.join(map(str, p.shape))}"
        for name, p in models["LoKr"][2].adapters["default"].named_parameters()
    )
    summary = f"LoRA r=1: {counts['LoRA']:,}, LoKr built with rank 8: {counts['LoKr']:,}"
    if prediction != bigger:
        raise CheckError(
            f"you predicted {prediction}, but {bigger} has more ({summary}). LoRA r = 1 pays "
            "d_in + d_out per layer; LoKr's rank 8 sets no factor's size, it only decides whether "
            f"W2 is factorised, and here it is not: the 128×128 layer gets {factors}. "
            "Read the shapes off lowrank.adapter_shapes before you compare ranks across methods"
        )
    passed(
        f"{bigger} has more trainable numbers ({summary}): its 128×128 layer is {factors}, "
        f"so it is {LOKR}, with no rank at all, and costs about what LoRA r = 1 does here"
    )


def check_freeze_base(freeze: Callable[[nn.Module], None]) -> None:
    """Exercise 5.4 (debug): after freeze(model), only the adapters' parameters train."""
    model = _adapted("lora", 2)
    model.requires_grad_(True)  # as after a careless `model.train()` loop that unfroze everything
    values = {n: p.detach().clone() for n, p in model.named_parameters()}
    call_student("freeze_base", freeze, model, context="on the chapter's model with LoRA r=2")
    still = [n for n, p in model.named_parameters() if p.requires_grad and ".adapters." not in n]
    frozen_adapter = [
        n for n, p in model.named_parameters() if ".adapters." in n and not p.requires_grad
    ]
    if any(not torch.equal(p, values[n]) for n, p in model.named_parameters()):
        raise CheckError("freeze_base changed parameter values: only requires_grad should change")
    if frozen_adapter:
        raise CheckError(
            f"freeze_base froze the adapter too ({frozen_adapter[0]}, …): nothing would train. "
            "Freeze the base and leave every parameter with '.adapters.' in its name trainable"
        )
    if len(still) == sum(1 for n, _ in model.named_parameters() if ".adapters." not in n):
        raise CheckError(
            "freeze_base froze nothing: requires_grad set on p.data or p.detach() changes a "
            "copy, not the parameter; call p.requires_grad_(False) on the parameter itself"
        )
    if still and all(n.endswith("bias") for n in still):
        n_still = sum(p.numel() for n, p in model.named_parameters() if n in still)
        raise CheckError(
            f"{len(still)} base tensors still train ({', '.join(still)}: {n_still} numbers): "
            "the biases are part of the base model too; freeze by name, not by 'weight'"
        )
    if still:
        raise CheckError(f"base parameters still train: {', '.join(still)}")
    passed(f"freeze_base leaves exactly the adapters trainable ({_count(model):,} numbers)")


@functools.lru_cache(maxsize=1)
def _rot90():
    from lokr_edu.toy import load_digits

    return load_digits("rot90")  # read once: every training run of 5.5 uses the same images


def validation_split(n_val: int = 300):
    """rot90 with the first n_val training images held out as a validation set (in x_test)."""
    from lokr_edu.toy import Digits

    rot90 = _rot90()
    return Digits(
        rot90.x_train[n_val:], rot90.y_train[n_val:], rot90.x_train[:n_val], rot90.y_train[:n_val]
    )


def validation_accuracy(
    label: str, lr: float, seed: int = 0, steps: int = 200
) -> tuple[float, float]:
    """Train one of CHOICES on the tuning split at this rate: (validation, test) accuracy."""
    from lokr_edu.toy import accuracy, train

    if label not in CHOICES:
        raise ValueError(f"label must be one of {list(CHOICES)}, got {label!r}")
    data, test = validation_split(), _rot90()
    model = _adapted(*CHOICES[label], seed=seed)
    train(model, data, steps=steps, lr=lr, seed=seed)
    return accuracy(model, data.x_test, data.y_test), accuracy(model, test.x_test, test.y_test)


SEEDS = (0, 1, 2, 3, 4)  # the verdict is compare's over five seeds a side


def _spread(values: Sequence[float]) -> str:
    mean, sd, _ = mean_sd(values)
    return f"{mean:.2f} ± {sd:.2f}"


def check_lokr_beats_lora(lr: float) -> None:
    """Exercise 5.5 (explore): a rate at which LoKr 8×8 ⊗ 16×16 beats LoRA r = 1 on validation,
    as `lokr_edu.stats.compare` decides it over five seeds (Welch's 95 % interval above 0)."""
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not 0.0 < lr < 1.0:
        raise CheckError(f"lr is {lr!r}: give a learning rate as a number between 0 and 1")
    val = {label: [] for label in CHOICES}
    test = {label: [] for label in CHOICES}
    for seed in SEEDS:
        for label in CHOICES:
            v, t = validation_accuracy(label, lr, seed=seed)
            val[label].append(v)
            test[label].append(t)
        if seed == SEEDS[0] and max(v[0] for v in val.values()) < 0.3:
            raise CheckError(
                f"at lr = {lr:g}, seed 0 reaches {val[LOKR][0]:.2f} with LoKr and "
                f"{val[LORA][0]:.2f} with LoRA on validation: neither has learned the task in "
                "200 steps. Both adapters start from ΔW = 0 and this rate moves them too "
                "little: try larger ones"
            )
    found = compare(val[LOKR], val[LORA])
    measured = (
        f"at lr = {lr:g}, validation accuracy over {len(SEEDS)} seeds: {LOKR} "
        f"{_spread(val[LOKR])}, {LORA} {_spread(val[LORA])}; {found}"
    )
    if found.verdict == "≈":
        raise CheckError(
            f"{measured}: no difference we can see. Compare the two over a range of rates a "
            "factor 3 apart: each method has its own best rate, and one stalled seed widens "
            "the interval"
        )
    if found.verdict == "<":
        raise CheckError(f"{measured}: LoRA is ahead at this rate; look for another")
    passed(
        f"{measured}. On the untouched test set: {LOKR} {_spread(test[LOKR])}, "
        f"{LORA} {_spread(test[LORA])}; {compare(test[LOKR], test[LORA])}"
    )
