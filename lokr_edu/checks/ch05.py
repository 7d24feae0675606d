"""Checks for chapter 05's exercises (solutions/05_finetune_on_cpu_solutions.ipynb)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lokr_edu.checks.common import CheckError, call_student, passed

__all__ = ["check_trainable", "check_accuracy", "check_storage", "check_freeze_all_but_biases"]


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
