"""Every exercise check passes on the reference answer and fails, helpfully, on wrong ones."""

from __future__ import annotations

import math

import pytest
import torch
from check_cases import check_tests

from lokr_edu import checks
from lokr_edu.kron import (
    factorize,
    kron,
    kron_matvec,
    kron_singular_values,
    numerical_rank,
    unvec,
    vec,
)


# ---- plausible wrong answers a student might write -------------------------------------------
def kron_swapped(A, B):  # B ⊗ A
    return kron(B, A)


def kron_wrong_column_order(A, B):  # merges columns as (l, j) instead of (j, l)
    (m, n), (p, q) = A.shape, B.shape
    return (A[:, None, None, :] * B[None, :, :, None]).reshape(m * p, n * q)


def kron_indices_a_first(A, B):  # the 4-D product indexed [i, j, k, l], then reshaped
    (m, n), (p, q) = A.shape, B.shape
    return (A[:, :, None, None] * B[None, None, :, :]).reshape(m * p, n * q)


def kron_wrong_shape(A, B):
    return (A[:, None, :, None] * B[None, :, None, :]).reshape(A.shape[0] * B.shape[0], -1).T


def kron_via_torch(A, B):
    return torch.kron(A, B)


def singular_values_unsorted(A, B):
    return torch.outer(torch.linalg.svdvals(A), torch.linalg.svdvals(B)).flatten()


def singular_values_sums(A, B):
    s = torch.linalg.svdvals(A)[:, None] + torch.linalg.svdvals(B)[None, :]
    return torch.sort(s.flatten(), descending=True).values


def singular_values_built(A, B):
    return torch.linalg.svdvals(torch.kron(A, B))


def rank_absolute_tolerance(M, rtol):  # forgets to scale by σ_max
    s = torch.linalg.svdvals(M)
    return int((s > rtol).sum())


def rank_forgets_zero_matrix(M, rtol):  # ≥ instead of >: on the zero matrix every σ is ≥ 0·rtol
    s = torch.linalg.svdvals(M)
    return int((s >= rtol * s[0]).sum())


def rank_returns_tensor(M, rtol):
    s = torch.linalg.svdvals(M)
    return (s > rtol * s[0]).sum().float().reshape(1, 1).repeat(1, 2)


def rank_returns_0d_tensor(M, rtol):  # right count, but the tensor that .sum() gives
    s = torch.linalg.svdvals(M)
    return 0 if s[0] == 0 else (s > rtol * s[0]).sum()


def rank_returns_float(M, rtol):
    return float(numerical_rank(M, rtol))


def matvec_uses_B_not_Bt(A, B, x):
    (m, n), (p, q) = A.shape, B.shape
    X = x.reshape(*x.shape[:-1], n, q)
    return (A @ X @ B).reshape(*x.shape[:-1], m * p)


def matvec_column_major(A, B, x):  # reshapes as if torch stacked columns
    (m, n), (p, q) = A.shape, B.shape
    X = x.reshape(*x.shape[:-1], q, n).transpose(-1, -2)
    return (A @ X @ B.T).reshape(*x.shape[:-1], m * p)


def matvec_no_batch(A, B, x):
    (m, n), (p, q) = A.shape, B.shape
    return (A @ x.reshape(n, q) @ B.T).reshape(m * p)


def matvec_builds_kron(A, B, x):
    return x @ torch.kron(A, B).T


def column_form(A, B, X):  # the reference: vec(B X Aᵀ) = (A ⊗ B) vec(X)
    return B @ X @ A.T


def column_form_transposed(A, B, X):  # Yᵀ
    return A @ X.T @ B.T


def column_form_A_not_transposed(A, B, X):
    return B @ X @ A


def column_form_row_order(A, B, X):  # the row form's order, on the column form's X
    return A @ X @ B.T


def column_form_almost(A, B, X):  # right on most shapes: only a search finds the counterexample
    Y = B @ X @ A.T
    return Y + 1e-3 if A.shape == (3, 4) else Y


def column_form_via_kron(A, B, X):
    return unvec(torch.kron(A, B) @ vec(X), B.shape[0], A.shape[0])


def with_spectrum(values, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    n = len(values)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (U @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ V.T).to(dtype)


SPREAD = torch.logspace(0, -3.5, 8).tolist()


def check_rank_loss_pair(pair):  # check_cases passes one answer: the pair (A, B)
    checks.check_rank_loss(*pair)


def factorize_unsorted(dim, factor=-1):
    p, q = factorize(dim, factor)
    return (q, p)


def factorize_ignores_factor(dim, factor=-1):
    return factorize(dim)


def factorize_sqrt_floor(dim, factor=-1):  # assumes √dim is a divisor
    p = math.isqrt(dim)
    return (p, dim // p)


def factorize_returns_list(dim, factor=-1):
    return list(factorize(dim, factor))


def factorize_cap_ignored_when_not_dividing(dim, factor=-1):
    if factor > 0 and dim % factor == 0:
        return factorize(dim, factor)
    return factorize(dim)


CASES = [
    (
        checks.check_kron,
        kron,
        [
            (kron_swapped, "computed B ⊗ A"),
            (kron_wrong_column_order, "at entry"),
            (kron_indices_a_first, "merged the indices in the order [i, j, k, l]"),
            (kron_wrong_shape, "returned shape"),
            (kron_via_torch, "called torch.kron"),
        ],
    ),
    (
        checks.check_kron_singular_values,
        kron_singular_values,
        [
            (singular_values_unsorted, "not sorted largest first"),
            (singular_values_sums, "is a product σ_i(A)·σ_j(B)"),
            (singular_values_built, "called torch.kron"),
        ],
    ),
    (
        checks.check_numerical_rank,
        numerical_rank,
        [
            (rank_absolute_tolerance, "the tolerance is relative"),
            (rank_returns_tensor, "must return a Python int"),
            (rank_returns_0d_tensor, "must return a Python int, got Tensor"),
            (rank_returns_float, "must return a Python int, got float"),
            (rank_forgets_zero_matrix, "the zero matrix has rank 0: count σ strictly greater"),
        ],
    ),
    (
        checks.check_kron_matvec,
        kron_matvec,
        [
            (matvec_uses_B_not_Bt, "used B instead of Bᵀ"),
            (matvec_column_major, "row-major flattening"),
            (matvec_no_batch, "raised RuntimeError for A 3×2, B 3×3 and x of shape (5, 6)"),
            (matvec_builds_kron, "called torch.kron"),
        ],
    ),
    (
        checks.check_factorize,
        factorize,
        [
            (factorize_unsorted, "smaller factor first"),
            (factorize_ignores_factor, "divides"),
            (factorize_sqrt_floor, "must multiply to"),
            (factorize_returns_list, "tuple of two ints"),
            (factorize_cap_ignored_when_not_dividing, "may not exceed factor"),
        ],
    ),
    (
        checks.check_kron_rank_prediction,
        6,
        [
            (5, "ranks multiply, they do not add"),
            (24, "largest rank a 24×35 matrix can have"),
            (20, "would hold for full-rank factors"),
            (0, "rank-deficient is not rank 0"),
            (7, "the products σ_i(A)·σ_j(B)"),
            (6.0, "must be an int"),
            (torch.tensor(6), "must be an int"),
        ],
    ),
    (
        checks.check_vec_column_form,
        column_form,
        [
            (column_form_transposed, "that is Yᵀ"),
            (column_form_A_not_transposed, "A enters transposed"),
            (column_form_row_order, "A·X·Bᵀ is the row form"),
            (column_form_almost, "for A 3×4, B"),
            (column_form_via_kron, "called torch.kron"),
            (lambda A, B, X: (B @ X @ A.T).T.contiguous().reshape(-1), "returned shape"),
        ],
    ),
    (
        check_rank_loss_pair,
        (with_spectrum(SPREAD, 1), with_spectrum(SPREAD, 2)),
        [
            ((with_spectrum(SPREAD, 1, torch.float64), with_spectrum(SPREAD, 2)), "float32"),
            ((with_spectrum([1.0] * 8, 1), with_spectrum(SPREAD, 2)), "still has full"),
            (
                (with_spectrum(torch.logspace(0, -8, 8).tolist(), 1), with_spectrum(SPREAD, 2)),
                "A itself already has numerical rank",
            ),
            ((with_spectrum(SPREAD, 1), with_spectrum([1.0] * 9, 2)), "between 2×2 and 8×8"),
            ((with_spectrum(SPREAD, 1), torch.ones(8)), "2-D torch.Tensor"),
        ],
    ),
]


test_check_passes_on_the_reference, test_check_explains_a_wrong_answer = check_tests(CASES)


@pytest.mark.parametrize("blank", [None, ...])
def test_a_blank_answer_is_not_answered_yet(blank) -> None:
    with pytest.raises(NotImplementedError, match=r"Exercise 1\.6: .*not answered yet"):
        checks.check_kron_rank_prediction(blank)
    with pytest.raises(NotImplementedError, match=r"Exercise 1\.8: .*not answered yet"):
        checks.check_rank_loss(blank, blank)


def test_forbidden_kron_is_restored_after_a_check() -> None:
    with pytest.raises(checks.CheckError):
        checks.check_kron(kron_via_torch)
    assert torch.kron is not None and torch.equal(
        torch.kron(torch.ones(1, 1), torch.eye(2)), torch.eye(2)
    )
    import lokr_edu

    assert lokr_edu.kron is kron
