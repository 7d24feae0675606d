"""Chapter 05's checks pass on the reference answers and explain plausible wrong ones."""

from __future__ import annotations

import torch
from check_cases import check_tests
from torch import nn

from lokr_edu import checks
from lokr_edu.toy import accuracy


def freeze_all_but_biases(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("bias"))


def freeze_weights_only_of_first(model: nn.Module) -> None:
    model[0].weight.requires_grad_(False)


def freeze_base(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(".adapters." in name)


def freeze_weights_by_suffix(model: nn.Module) -> None:  # the broken one of exercise 5.6
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


def zero_weights(model: nn.Module) -> None:
    freeze_all_but_biases(model)
    for name, p in model.named_parameters():
        if name.endswith("weight"):
            p.data.zero_()


CASES = [
    (
        checks.check_trainable,
        lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad),
        [
            (
                lambda m: sum(p.numel() for p in m.parameters()),
                "only parameters with p.requires_grad",
            ),
            (lambda m: sum(1 for p in m.parameters() if p.requires_grad), "not parameter tensors"),
        ],
    ),
    (
        checks.check_accuracy,
        accuracy,
        [
            (lambda m, x, y: (m(x).argmax(-1) == y).sum().item(), "divide the number of correct"),
            (
                lambda m, x, y: (m(x).argmax(0) == y).float().mean().item(),
                "over the classes",
            ),
        ],
    ),
    (
        checks.check_storage,
        lambda d, p, k: ((k + 1) * d, d + k * p),
        [
            (lambda d, p, k: (k * d, d + k * p), "the base model is kept too"),
            (lambda d, p, k: ((k + 1) * d, k * p), "the adapters need the base model"),
            (lambda d, p, k: (d + k * p, (k + 1) * d), "return ((K + 1)·d_original"),
        ],
    ),
    (
        checks.check_freeze_all_but_biases,
        freeze_all_but_biases,
        [
            (freeze_weights_only_of_first, "True only for biases"),
            (zero_weights, "changed parameter values"),
        ],
    ),
    (
        checks.check_predict_bigger_adapter,
        "LoKr r=8",
        [("LoRA r=1", "but LoKr r=8 has more"), ("lokr", "write one of")],
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
            (0.003, "LoKr does not beat LoRA"),
            (0.0, "give a learning rate"),
            ("3e-2", "give a learning rate"),
        ],
    ),
]

test_check_passes_on_the_reference, test_check_explains_a_wrong_answer = check_tests(CASES)
