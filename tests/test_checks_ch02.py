"""Chapter 02's checks pass on the reference answers and explain plausible wrong ones."""

from __future__ import annotations

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
        ],
    ),
    (
        checks.check_lora_forward,
        reference_forward,
        [
            (lambda x, W, A, B, alpha, eta: x @ W.T + eta * ((x @ A.T) @ B.T), "α/r is missing"),
            (
                lambda x, W, A, B, alpha, eta: x @ W.T + (alpha / A.shape[0]) * ((x @ A.T) @ B.T),
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
]


test_check_passes_on_the_reference, test_check_explains_a_wrong_answer = check_tests(CASES)
