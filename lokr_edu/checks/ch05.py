"""Checks for chapter 05's exercises (solutions/05_finetune_on_cpu_solutions.ipynb)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lokr_edu.checks.common import CheckError, call_student, passed

__all__ = [
    "check_trainable",
    "check_accuracy",
    "check_storage",
    "check_freeze_all_but_biases",
    "check_predict_bigger_adapter",
    "check_freeze_base",
    "check_lokr_beats_lora",
]


def _network() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def check_trainable(trainable: Callable[[nn.Module], int]) -> None:
    """Exercise 5.1: the number of parameters that require grad."""
    cases = [("all trainable", lambda m: None, 53)]
    cases.append(("first layer frozen", lambda m: m[0].requires_grad_(False), 18))
    cases.append(
        (
            "only the last bias",
            lambda m: [p.requires_grad_(n == "2.bias") for n, p in m.named_parameters()],
            3,
        )
    )
    for label, setup, want in cases:
        model = _network()
        setup(model)
        got = call_student("trainable", trainable, model, context=f"with {label}")
        if got == want:
            continue
        total = sum(p.numel() for p in model.parameters())
        hint = (
            "count only parameters with p.requires_grad"
            if got == total
            else "count numbers (p.numel()), not parameter tensors"
            if got == sum(1 for p in model.parameters() if p.requires_grad)
            else "sum p.numel() over the parameters that require grad"
        )
        raise CheckError(f"trainable returned {got} with {label}; expected {want}: {hint}")
    passed("trainable counts the numbers that training will change")


def check_accuracy(accuracy: Callable[[nn.Module, torch.Tensor, torch.Tensor], float]) -> None:
    """Exercise 5.2: the fraction of inputs whose largest logit is the label."""
    model = nn.Identity()
    logits = torch.tensor(
        [[0.1, 2.0, 0.3, 0.0], [3.0, 1.0, 0.0, 0.0], [0.0, 0.1, 0.2, 0.0], [1.0, 0.0, 5.0, 0.5]]
    )  # 4 examples, 4 classes: rows 0 and 2 are right
    labels = torch.tensor([1, 2, 2, 0])
    got = call_student("accuracy", accuracy, model, logits, labels, context="on 4 examples")
    if isinstance(got, torch.Tensor):
        got = got.item()
    if got == 0.5:
        passed("accuracy is the fraction of rows whose argmax is the label")
        return
    if got == 2:
        hint = "divide the number of correct rows by the number of rows"
    elif got == 0.25:
        hint = "take the argmax over the classes (dim=-1), not over the examples"
    else:
        hint = "(model(x).argmax(dim=-1) == y).float().mean()"
    raise CheckError(f"accuracy returned {got!r} on 4 examples with 2 right; expected 0.5: {hint}")


def check_storage(storage: Callable[[int, int, int], tuple[int, int]]) -> None:
    """Exercise 5.3: numbers stored for K tasks as copies, and as one base plus adapters."""
    for d_original, d_peft, k in [(26_122, 1_088, 4), (859_520_964, 797_184, 10), (100, 10, 0)]:
        call = f"storage({d_original:,}, {d_peft:,}, K={k})"
        got = call_student("storage", storage, d_original, d_peft, k, context=f"for {call}")
        want = ((k + 1) * d_original, d_original + k * d_peft)
        if got == want:
            continue
        if isinstance(got, tuple) and len(got) == 2 and got[0] == k * d_original:
            hint = "the base model is kept too: K copies plus the original"
        elif isinstance(got, tuple) and len(got) == 2 and got[1] == k * d_peft:
            hint = "the adapters need the base model: d_original + K·d_peft"
        else:
            hint = "return ((K + 1)·d_original, d_original + K·d_peft)"
        raise CheckError(f"{call} returned {got}; expected {want}: {hint}")
    passed("storage gives (K + 1)·d_original for copies and d_original + K·d_peft for adapters")


def check_freeze_all_but_biases(freeze: Callable[[nn.Module], None]) -> None:
    """Exercise 5.4: the "tune a subset" adapter of chapter 02, with the biases as the subset."""
    model = _network()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    call_student("freeze_all_but_biases", freeze, model, context="on a 2-layer network")
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    if trainable != ["0.bias", "2.bias"]:
        raise CheckError(
            f"after freeze_all_but_biases the trainable parameters are {trainable}; "
            "expected ['0.bias', '2.bias']: set requires_grad on every parameter, "
            "True only for biases"
        )
    if any(not torch.equal(p, weights[n]) for n, p in model.named_parameters()):
        raise CheckError(
            "freeze_all_but_biases changed parameter values: only requires_grad should change"
        )
    passed("freeze_all_but_biases leaves exactly the biases trainable")


# ---- exercises 5.5–5.7: predict, debug, explore -------------------------------------------------

ADAPTED = ["0", "2", "4"]  # the base model's three Linear layers, as in the chapter
CHOICES = {"LoRA r=1": ("lora", 1), "LoKr r=8": ("lokr", 8)}


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
    """Exercise 5.5: which adapter on the three layers has more trainable numbers."""
    if prediction not in CHOICES:
        raise CheckError(
            f"prediction is {prediction!r}: write one of {sorted(CHOICES)}, exactly as spelled"
        )
    models = {label: _adapted(*spec) for label, spec in CHOICES.items()}
    counts = {label: _count(model) for label, model in models.items()}
    bigger = max(counts, key=counts.get)
    summary = ", ".join(f"{label}: {n:,}" for label, n in counts.items())
    if prediction != bigger:
        factors = ", ".join(
            f"{name} {'×'.join(map(str, p.shape))}"
            for name, p in models["LoKr r=8"][2].adapters["default"].named_parameters()
        )
        raise CheckError(
            f"you predicted {prediction}, but {bigger} has more ({summary}). LoRA r = 1 pays "
            "d_in + d_out per layer; LoKr's r = 8 sets no factor's size, it only decides whether "
            f"W2 is factorised, and here it is not: the 128×128 layer gets {factors}. "
            "Read the shapes off lowrank.adapter_shapes before you compare ranks across methods"
        )
    passed(
        f"{bigger} has more trainable numbers ({summary}): a LoKr rank of 8 costs about what "
        "a LoRA rank of 1 does here"
    )


def check_freeze_base(freeze: Callable[[nn.Module], None]) -> None:
    """Exercise 5.6 (debug): after freeze(model), only the adapters' parameters train."""
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


def validation_split(n_val: int = 300):
    """rot90 with the first n_val training images held out as a validation set (in x_test)."""
    from lokr_edu.toy import Digits, load_digits

    rot90 = load_digits("rot90")
    return Digits(
        rot90.x_train[n_val:], rot90.y_train[n_val:], rot90.x_train[:n_val], rot90.y_train[:n_val]
    )


def validation_accuracy(
    label: str, lr: float, seed: int = 0, steps: int = 200
) -> tuple[float, float]:
    """Train one of CHOICES on the tuning split at this rate: (validation, test) accuracy."""
    from lokr_edu.toy import accuracy, load_digits, train

    data, test = validation_split(), load_digits("rot90")
    model = _adapted(*CHOICES[label], seed=seed)
    train(model, data, steps=steps, lr=lr, seed=seed)
    return accuracy(model, data.x_test, data.y_test), accuracy(model, test.x_test, test.y_test)


MARGIN = 0.05  # a win smaller than this can come from the seed, or move between CPUs


def check_lokr_beats_lora(lr: float) -> None:
    """Exercise 5.7 (explore): a learning rate at which LoKr r=8 beats LoRA r=1 on validation."""
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not 0.0 < lr < 1.0:
        raise CheckError(f"lr is {lr!r}: give a learning rate as a number between 0 and 1")
    val, test = {}, {}
    for label in CHOICES:
        val[label], test[label] = validation_accuracy(label, lr)
    gap = val["LoKr r=8"] - val["LoRA r=1"]
    measured = (
        f"at lr = {lr:g}, validation accuracy LoKr r=8 {val['LoKr r=8']:.2f}, "
        f"LoRA r=1 {val['LoRA r=1']:.2f}"
    )
    if max(val.values()) < 0.3:
        raise CheckError(
            f"{measured}: neither has learned the task in 200 steps. Both adapters start "
            "from ΔW = 0 and this rate moves them too little: try larger ones"
        )
    if gap <= MARGIN:
        raise CheckError(
            f"{measured}: LoKr does not beat LoRA by more than {MARGIN} here. Compare the two "
            "over a range of rates (a factor 3 apart): LoKr's ΔW is a product of factors that "
            "both have to move, so it needs a larger step than LoRA to get going"
        )
    passed(
        f"{measured}: LoKr wins by {gap:.2f} with about the same number of parameters "
        f"(and on the untouched test set: {test['LoKr r=8']:.2f} vs {test['LoRA r=1']:.2f})"
    )
