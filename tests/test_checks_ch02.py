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


def forward_merged(x, W, A, B, alpha, eta):  # right values, but builds W + η·ΔW
    return x @ (W + eta * (alpha / A.shape[0]) * B @ A).T


def forward_builds_delta(x, W, A, B, alpha, eta):  # right values, but builds B·A
    return x @ W.T + eta * (alpha / A.shape[0]) * (x @ (B @ A).T)


def forward_einsum_three(x, W, A, B, alpha, eta):  # einsum contracts B with A first
    return x @ W.T + eta * (alpha / A.shape[0]) * torch.einsum("ir,rj,...j->...i", B, A, x)


def forward_linear(x, W, A, B, alpha, eta):  # valid: F.linear, factor by factor
    branch = torch.nn.functional.linear(torch.nn.functional.linear(x, A), B)
    return torch.nn.functional.linear(x, W) + eta * alpha / A.shape[0] * branch


def forward_contiguous(x, W, A, B, alpha, eta):  # valid: copies of W.T and A.T are not B·A
    scale = eta * alpha / A.shape[0]
    return x @ W.T.contiguous() + scale * (x @ A.T.contiguous()) @ B.T


def svd_r(W, r):
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, :r], S[:r], Vh


def best_without_singular_values(W, r):  # B = U_r, A = V_rᵀ
    U_r, _, Vh = svd_r(W, r)
    return U_r, Vh[:r]


def best_with_v_transposed(W, r):  # takes columns of Vh, as if svd returned V
    U_r, S_r, Vh = svd_r(W, r)
    return U_r * S_r, Vh[:, :r].T


def best_with_both_mistakes(W, r):
    U_r, _, Vh = svd_r(W, r)
    return U_r, Vh[:, :r].T


def best_split_evenly(W, r):  # valid: √σ into each factor
    U_r, S_r, Vh = svd_r(W, r)
    return U_r * S_r.sqrt(), S_r.sqrt()[:, None] * Vh[:r]


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
            (forward_merged, "formed a 6×5 matrix, the size of W"),
            (forward_builds_delta, "formed a 6×5 matrix, the size of W"),
            (forward_einsum_three, "formed a 6×5 matrix, the size of W"),
        ],
    ),
    (
        checks.check_best_rank_r,
        reference_best,
        [
            (best_without_singular_values, "every singular value is 1"),
            (best_with_v_transposed, "the right singular vectors are transposed"),
            (best_with_both_mistakes, "transposed twice) (and S is missing)"),
            (
                lambda W, r: (
                    torch.linalg.svd(W, full_matrices=False)[0][:, -r:]
                    * torch.linalg.svd(W, full_matrices=False)[1][-r:],
                    torch.linalg.svd(W, full_matrices=False)[2][-r:],
                ),
                "not optimal",
            ),
            (lambda W, r: torch.linalg.svd(W, full_matrices=False)[0][:, :r], "must return a pair"),
            (
                lambda W, r: (W[:, :r], torch.eye(r, W.shape[1], dtype=W.dtype)),
                "keep the r largest",
            ),
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
        (678, 643),
        [
            ((678, 678 * 16), "move with r"),
            ((60, 900), "move with r"),
            ((339, 321), "off by about 2"),
            ((1356, 1286), "off by about 2"),
            ((100, 100), "merge's cost divided by the on-the-fly overhead"),
            (700, "a pair of positive numbers"),
            ((678, -1), "a pair of positive numbers"),
            ((True, 643), "a pair of positive numbers"),
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


@pytest.mark.parametrize("answer", [forward_linear, forward_contiguous])
def test_lora_forward_accepts_on_the_fly_answers_written_differently(answer, capsys) -> None:
    checks.check_lora_forward(answer)
    assert capsys.readouterr().out.startswith("✓ ")


def test_best_rank_r_accepts_any_split_of_the_singular_values(capsys) -> None:
    checks.check_best_rank_r(best_split_evenly)
    assert capsys.readouterr().out.startswith("✓ ")


def test_a_break_even_prediction_may_be_a_list(capsys) -> None:
    checks.check_break_even_prediction([678, 643])
    assert capsys.readouterr().out.startswith("✓ within 25% at both ranks")


def test_the_break_even_charges_on_the_fly_its_additions() -> None:
    from lokr_edu.checks.ch02 import break_even_tokens

    # merge 2·d·r·d + d², overhead 2·r·2d + d per token: T = d·(2r + 1)/(4r + 1) for d × d
    for r in (4, 64):
        assert break_even_tokens(1280, 1280, r) == pytest.approx(1280 * (2 * r + 1) / (4 * r + 1))
    assert round(break_even_tokens(3072, 768, 32)) == 616  # chapter 02's layer


@pytest.mark.parametrize("blank", [None, ..., (720, None), (..., 645), [None, 645]])
def test_a_blank_prediction_is_not_answered_yet(blank) -> None:
    with pytest.raises(NotImplementedError, match=r"Exercise 2\.6: predict .*: not answered yet"):
        checks.check_break_even_prediction(blank)
