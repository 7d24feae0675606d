"""Chapter 03's checks pass on the reference answers and explain plausible wrong ones."""

from __future__ import annotations

import torch
from check_cases import check_tests

from lokr_edu import checks
from lokr_edu.lowrank import count_params, file_size_bytes, loha_delta, lokr_delta, lokr_factors


def lokr(w1, w2a=None, w2b=None, w2=None, alpha=1.0):
    return lokr_delta(w1=w1, w2a=w2a, w2b=w2b, w2=w2, alpha=alpha)


def lokr_always_alpha_over_r(w1, w2a=None, w2b=None, w2=None, alpha=1.0):
    W2 = w2 if w2 is not None else w2a @ w2b
    return (alpha / 2) * torch.kron(w1, W2)


def lokr_swapped(w1, w2a=None, w2b=None, w2=None, alpha=1.0):
    W2 = w2 if w2 is not None else w2a @ w2b
    return (1.0 if w2 is not None else alpha / w2a.shape[1]) * torch.kron(W2, w1)


def lokr_no_scale(w1, w2a=None, w2b=None, w2=None, alpha=1.0):
    return torch.kron(w1, w2 if w2 is not None else w2a @ w2b)


def factors_swapped(m, n):
    (a, b), (c, d) = lokr_factors(m, n)
    return (c, d), (a, b)


def factors_paired_by_dimension(m, n):
    (a, b), (c, d) = lokr_factors(m, n)
    return (a, c), (b, d)


def kib(n_params, n_layers, itemsize):
    dtype = torch.float32 if itemsize == 4 else torch.float16
    return file_size_bytes(n_params, dtype, n_alphas=n_layers) / 1024


CASES = [
    (
        checks.check_loha_params,
        lambda m, n, r: count_params("loha", m, n, r),
        [
            (lambda m, n, r: r * (m + n), "that is one LoRA"),
            (lambda m, n, r: r * r * (m + n), "r² is LoHa's rank bound"),
            (lambda m, n, r: 2 * r * m * n, "B₁, B₂ are m × r"),
        ],
    ),
    (
        checks.check_loha_delta,
        loha_delta,
        [
            (lambda a, b, c, d, alpha: (a @ b) * (c @ d), "the scale α/r is missing"),
            (lambda a, b, c, d, alpha: (alpha / b.shape[0]) * (a @ b + c @ d), "not a sum"),
            (
                lambda a, b, c, d, alpha: (
                    (alpha / b.shape[0]) * (a @ b) @ (c @ d).T[:, : b.shape[1]]
                ),
                "(α/r)·(w1a @ w1b) * (w2a @ w2b)",
            ),
        ],
    ),
    (
        checks.check_lokr_factors,
        lokr_factors,
        [
            (factors_swapped, "W1 = a × b takes the smaller number"),
            (factors_paired_by_dimension, "(a, c) split m and (b, d) split n"),
            (lambda m, n: ((1, 1), (m, n)), "(a, c) = factorize(m)"),
        ],
    ),
    (
        checks.check_lokr_delta,
        lokr,
        [
            (lokr_always_alpha_over_r, "LyCORIS uses scale 1 and ignores α"),
            (lokr_swapped, "the order matters"),
            (lokr_no_scale, "the scale is α/r, r = w2a.shape[1]"),
        ],
    ),
    (
        checks.check_file_kib,
        kib,
        [
            (lambda n, layers, size: n * size / 1024, "also stores its alpha"),
            (lambda n, layers, size: (n + layers) * size / 1000, "a KiB is 1024 bytes"),
            (lambda n, layers, size: (n + layers) * 4 / 1024, "bytes per number"),
        ],
    ),
]

test_check_passes_on_the_reference, test_check_explains_a_wrong_answer = check_tests(CASES)
