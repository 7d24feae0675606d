"""Chapter 02's checks pass on the reference answers and explain plausible wrong ones."""

from __future__ import annotations

import pytest
import torch
from check_cases import check_tests

from lokr_edu import checks
from lokr_edu.lowrank import best_rank_r, count_params, lora_delta, lora_forward


def reference_params(d_out, d_in, r):
    return count_params("lora", d_out, d_in, r)


def reference_delta(A, B, alpha):
    return lora_delta(A, B, alpha)


def reference_forward(x, W, A, B, alpha, eta):
    return lora_forward(x, W, A, B, alpha, strength=eta)


def reference_best(W, r):
    return best_rank_r(W, r)


def reference_grads(x, A, B, alpha, G):
    scale = alpha / A.shape[0]
    return scale * (G @ B).T @ x, scale * G.T @ (x @ A.T)


def grads_swapped(x, A, B, alpha, G):
    return reference_grads(x, A, B, alpha, G)[::-1]


def grads_without_scale(x, A, B, alpha, G):
    return tuple(g / (alpha / A.shape[0]) for g in reference_grads(x, A, B, alpha, G))


def grads_batch_mean(x, A, B, alpha, G):
    return tuple(g / x.shape[0] for g in reference_grads(x, A, B, alpha, G))


def grads_by_autograd(x, A, B, alpha, G):
    A, B = A.clone().requires_grad_(), B.clone().requires_grad_()
    ((alpha / A.shape[0]) * (x @ A.T) @ B.T).backward(G)
    return A.grad, B.grad


def grads_wrong_A(x, A, B, alpha, G):  # a sign slip in ∂L/∂A
    grad_A, grad_B = reference_grads(x, A, B, alpha, G)
    return -grad_A, grad_B


def grads_wrong_B(x, A, B, alpha, G):  # forgets A: Gᵀ x is d_out × d_in, not d_out × r
    grad_A, grad_B = reference_grads(x, A, B, alpha, G)
    return grad_A, grad_B + 1.0


def buggy_forward(x, W, A, B, alpha):  # the exercise's function: both bugs
    return x @ W.T + (A.shape[0] / alpha) * (x @ B) @ A


def forward_still_transposed(x, W, A, B, alpha):
    return x @ W.T + (alpha / A.shape[0]) * (x @ B) @ A


def forward_scale_still_inverted(x, W, A, B, alpha):
    return x @ W.T + (A.shape[0] / alpha) * (x @ A.T) @ B.T


def forward_scale_dropped(x, W, A, B, alpha):
    return x @ W.T + (x @ A.T) @ B.T


def forward_base_dropped(x, W, A, B, alpha):
    return (alpha / A.shape[0]) * (x @ A.T) @ B.T


def forward_fixed_via_merge(x, W, A, B, alpha):  # correct, if wasteful
    return x @ (W + (alpha / A.shape[0]) * B @ A).T


CASES = [
    (
        checks.check_lora_params,
        reference_params,
        [
            (lambda d_out, d_in, r: d_out * d_in, "that is the full matrix"),
            (lambda d_out, d_in, r: r * d_out, "count both factors"),
            (lambda d_out, d_in, r: r * (d_out + d_in) + 1, "α is a fixed hyperparameter"),
            (lambda d_out, d_in, r: r * d_out * d_in, "B has d_out·r entries"),
        ],
    ),
    (
        checks.check_lora_delta,
        reference_delta,
        [
            (lambda A, B, alpha: B @ A, "left out the scale α/r"),
            (lambda A, B, alpha: alpha * A.shape[0] * (B @ A), "α divided by r"),
            (lambda A, B, alpha: (A.shape[0] / alpha) * (B @ A), "not r/α"),
            (lambda A, B, alpha: (alpha / A.shape[0]) * (A.T @ B.T), "returned shape"),
            (lambda A, B, alpha: (alpha / A.shape[0]) * (B @ A) + 1, "ΔW = (α/r)·B @ A"),
            (lambda A, B, alpha: (alpha / A.shape[1]) * (B @ A), "you divided by d_in"),
            (lambda A, B, alpha: (alpha / B.shape[0]) * (B @ A), "you divided by d_out"),
        ],
    ),
    (
        checks.check_lora_forward,
        reference_forward,
        [
            (lambda x, W, A, B, alpha, eta: x @ W.T + eta * ((x @ A.T) @ B.T), "α/r is missing"),
            (
                lambda x, W, A, B, alpha, eta: x @ W.T + (alpha / A.shape[0]) * ((x @ A.T) @ B.T),
                "the strength η multiplies the LoRA branch; it is missing",
            ),
            (  # η = 0 taken as "not given"
                lambda x, W, A, B, alpha, eta: (
                    x @ W.T + (eta or 1.0) * (alpha / A.shape[0]) * ((x @ A.T) @ B.T)
                ),
                "η = 0 must give the base layer",
            ),
            (
                lambda x, W, A, B, alpha, eta: x @ W.T + eta * (alpha / 2) * ((x @ B) @ A),
                "raised RuntimeError",
            ),
        ],
    ),
    (
        checks.check_best_rank_r,
        reference_best,
        [
            (
                lambda W, r: (torch.linalg.svd(W)[0][:, :r], torch.linalg.svd(W)[2][:r]),
                "keep the r largest",
            ),
            (
                lambda W, r: (
                    torch.linalg.svd(W, full_matrices=False)[0][:, -r:]
                    * torch.linalg.svd(W, full_matrices=False)[1][-r:],
                    torch.linalg.svd(W, full_matrices=False)[2][-r:],
                ),
                "not optimal",
            ),
            (lambda W, r: torch.linalg.svd(W, full_matrices=False)[0][:, :r], "must return a pair"),
            (lambda W, r: (W[:, :r], torch.eye(r, W.shape[1], dtype=W.dtype)), "not optimal"),
        ],
    ),
    (
        checks.check_lora_grads,
        reference_grads,
        [
            (grads_swapped, "return (grad_A, grad_B)"),
            (grads_without_scale, "both gradients carry α/r"),
            (grads_batch_mean, "sum over the batch rows"),
            (grads_by_autograd, "autograd is off inside the check"),
            (grads_wrong_A, "∂L/∂A = (∂L/∂H)ᵀ x"),
            (grads_wrong_B, "∂L/∂B = (α/r)·Gᵀ H"),
            (lambda x, A, B, alpha, G: reference_grads(x, A, B, alpha, G)[0], "must return a pair"),
        ],
    ),
    (
        checks.check_break_even_prediction,
        (720, 645),
        [
            ((720, 720 * 16), "move with r"),
            ((60, 900), "move with r"),
            ((360, 322), "off by about 2"),
            ((1440, 1290), "off by about 2"),
            ((100, 100), "merge's cost divided by the on-the-fly overhead"),
            (700, "a pair of positive numbers"),
            ((720, -1), "a pair of positive numbers"),
        ],
    ),
    (
        checks.check_fixed_lora_forward,
        forward_fixed_via_merge,
        [
            (buggy_forward, "both bugs are still there"),
            (forward_still_transposed, "still applied transposed"),
            (forward_scale_still_inverted, "the scale is still r/α"),
            (forward_scale_dropped, "the scale is now missing"),
            (forward_base_dropped, "the base layer x @ W.T is missing"),
            (lambda x, W, A, B, alpha: buggy_forward(x, W, A, B, alpha) + 1, "y = x @ W.T"),
            (
                lambda x, W, A, B, alpha: (
                    x @ W.T + (alpha / A.shape[0]) * (x @ B) @ A
                    if W.shape[0] == W.shape[1]
                    else 0 * x
                ),
                "still applied transposed",
            ),
        ],
    ),
]


test_check_passes_on_the_reference, test_check_explains_a_wrong_answer = check_tests(CASES)


def test_the_reference_forward_passes_the_debug_check(capsys) -> None:
    checks.check_fixed_lora_forward(
        lambda x, W, A, B, alpha: lora_forward(x, W, A, B, alpha, strength=1.0)
    )
    assert capsys.readouterr().out.startswith("✓ ")


def test_a_non_square_layer_exposes_a_transposed_factor() -> None:
    def transposed_only_where_it_fits(x, W, A, B, alpha):
        if W.shape[0] == W.shape[1]:
            return forward_fixed_via_merge(x, W, A, B, alpha)
        return forward_still_transposed(x, W, A, B, alpha)

    with pytest.raises(checks.CheckError, match="not square: a transposed factor no longer fits"):
        checks.check_fixed_lora_forward(transposed_only_where_it_fits)


@pytest.mark.parametrize("blank", [None, ..., (720, None), (..., 645)])
def test_a_blank_prediction_is_not_answered_yet(blank) -> None:
    with pytest.raises(NotImplementedError, match=r"Exercise 2\.6: predict .*: not answered yet"):
        checks.check_break_even_prediction(blank)
