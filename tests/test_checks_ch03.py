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


def lokr_rank_from_w2a_always(w1, w2a=None, w2b=None, w2=None, alpha=1.0):
    rank = w2a.shape[1]  # crashes when W2 is full: w2a is None
    return (alpha / rank) * torch.kron(w1, w2 if w2 is not None else w2a @ w2b)


def lokr_rank_off_rows(w1, w2a=None, w2b=None, w2=None, alpha=1.0):
    if w2 is not None:
        return torch.kron(w1, w2)
    return (alpha / w2a.shape[0]) * torch.kron(w1, w2a @ w2b)


def lokr_rank_off_columns(w1, w2a=None, w2b=None, w2=None, alpha=1.0):
    if w2 is not None:
        return torch.kron(w1, w2)
    return (alpha / w2b.shape[1]) * torch.kron(w1, w2a @ w2b)


def lokr_alpha_when_full(w1, w2a=None, w2b=None, w2=None, alpha=1.0):
    if w2 is not None:
        return alpha * torch.kron(w1, w2)
    return (alpha / w2a.shape[1]) * torch.kron(w1, w2a @ w2b)


def lokr_plus_one(w1, w2a=None, w2b=None, w2=None, alpha=1.0):
    return lokr(w1, w2a, w2b, w2, alpha) + 1.0


def lokr_refuses(w1, w2a=None, w2b=None, w2=None, alpha=1.0):
    raise ValueError("no")


def pairwise(P, Q):
    return (P[:, :, None] * Q[:, None, :]).reshape(P.shape[0], -1)


def one_product(w1a, w1b, w2a, w2b):
    return pairwise(w1a, w2a), pairwise(w1b.T, w2b.T).T


def one_product_diagonal_only(w1a, w1b, w2a, w2b):
    (m, r1), (r2, n) = w1a.shape, w2b.shape
    U, V = torch.zeros(m, r1 * r2, dtype=w1a.dtype), torch.zeros(r1 * r2, n, dtype=w1a.dtype)
    for i in range(min(r1, r2)):
        U[:, i * r2 + i], V[i * r2 + i] = w1a[:, i] * w2a[:, i], w1b[i] * w2b[i]
    return U, V


def one_product_pairs_mismatched(w1a, w1b, w2a, w2b):
    return pairwise(w1a, w2a), pairwise(w2b.T, w1b.T).T


def one_product_by_svd(w1a, w1b, w2a, w2b):
    P = (w1a @ w1b) * (w2a @ w2b)
    k = w1a.shape[1] * w2a.shape[1]
    U, S, Vh = torch.linalg.svd(P, full_matrices=False)
    up, down = U * S, Vh
    pad = k - S.shape[0]
    if pad > 0:
        up = torch.cat([up, torch.zeros(P.shape[0], pad, dtype=P.dtype)], 1)
        down = torch.cat([down, torch.zeros(pad, P.shape[1], dtype=P.dtype)], 0)
    return up[:, :k], down[:k]


def one_product_double(w1a, w1b, w2a, w2b):
    U, V = one_product(w1a, w1b, w2a, w2b)
    return 2 * U, V


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
            (lambda m, n, r: 4 * r * (m + n), "each factor counted twice"),
            (lambda m, n, r: 2 * r * m * n, "their sizes add (r·m + r·n)"),
            (lambda m, n, r: 2 * r * (m + n) + 1, "B₁, B₂ are m × r"),
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
            (lokr_always_alpha_over_r, "you scaled by 1.5; with both factors full"),
            (lokr_alpha_when_full, "you scaled by 3; with both factors full"),
            (lokr_rank_from_w2a_always, "test `w2 is not None` first"),
            (lokr_swapped, "the order matters"),
            (lokr_no_scale, "the scale is α/r = 3/2"),
            (lokr_rank_off_rows, "you divided α by 5 = w2a.shape[0]"),
            (lokr_rank_off_columns, "you divided α by 6 = w2b.shape[1]"),
            (lokr_plus_one, "scale = α/r, r = w2a.shape[1], when W2 is low-rank"),
            (lokr_refuses, "lokr_delta raised ValueError with W2 low-rank, α = 3: no"),
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

CASES += [
    (
        checks.check_w2_full_rank,
        16,
        [
            (32, "half of W2's larger side"),
            (10, "not the smaller one"),
            (12, "decompose_both"),
            (384, "not at the whole layer"),
            (17, "at exactly half, W2 is already whole"),
            (15, "apply r ≥ max(c, d)/2"),
            (16.0, "a whole number"),
        ],
    ),
    (
        checks.check_loha_rank_prediction,
        (9, 6),
        [
            ((3, 3), "⊙ does not keep the rank"),
            ((6, 6), "2r is what a LoRA"),
            ((8, 6), "on 16 × 16 the bound is r² = 9"),
            ((9, 9), "a 6 × 40 matrix has rank at most 6"),
            ((9, 5), "min(r², m, n)"),
            ([9, 6], "two whole numbers"),
        ],
    ),
    (
        checks.check_loha_as_one_product,
        one_product,
        [
            (one_product_diagonal_only, "keeps only the pairs i = j"),
            (one_product_pairs_mismatched, "must come from the same pair (i, j)"),
            (one_product_by_svd, "U changed when only w1b and w2b changed"),
            (one_product_double, "one column of U and one row of V per pair"),
            (lambda w1a, w1b, w2a, w2b: (w1a, w1b), "expected (7, 4)"),
            (lambda w1a, w1b, w2a, w2b: one_product(w1a, w1b, w2a, w2b)[0], "return (U, V)"),
        ],
    ),
]


def rearrange(W, a, b, c, d):
    return W.reshape(a, c, b, d).permute(0, 2, 1, 3).reshape(a * b, c * d)


def rank_one_of_rearranged(W, a, b, c, d):
    U, S, Vh = torch.linalg.svd(rearrange(W, a, b, c, d), full_matrices=False)
    return S[0] * torch.outer(U[:, 0], Vh[0])


CASES += [
    (
        checks.check_rearrange,
        rearrange,
        [
            (lambda W, a, b, c, d: W.reshape(a * b, c * d), "a plain reshape does not cut"),
            (
                lambda W, a, b, c, d: W.reshape(a, c, b, d).permute(2, 0, 1, 3).reshape(a * b, -1),
                "not j·a + i",
            ),
            (
                lambda W, a, b, c, d: W.reshape(a, c, b, d).permute(0, 2, 3, 1).reshape(a * b, -1),
                "not column by column",
            ),
            (lambda W, a, b, c, d: 2 * rearrange(W, a, b, c, d), "X[i, j]·vec(Y)ᵀ"),
            (lambda W, a, b, c, d: rearrange(W, a, b, c, d).T, "expected (6, 20)"),
            (rank_one_of_rearranged, "moves entries differently"),
        ],
    ),
]

test_check_passes_on_the_reference, test_check_explains_a_wrong_answer = check_tests(CASES)
