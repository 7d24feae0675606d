"""Checks for chapter 01's exercises (solutions/01_kronecker_product_solutions.ipynb)."""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterator

import torch

import lokr_edu
from lokr_edu.checks.common import (
    CheckError,
    call_student,
    passed,
    random_tensor,
    require_tensor,
    shape_str,
)
from lokr_edu.kron import factorize as reference_factorize

__all__ = [
    "check_kron",
    "check_kron_singular_values",
    "check_numerical_rank",
    "check_kron_matvec",
    "check_factorize",
]


@contextlib.contextmanager
def _forbid_kron(
    exercise: str, reason: str = "the point is to get the answer without building A ⊗ B"
) -> Iterator[None]:
    """Make torch.kron and lokr_edu.kron raise while a student's function runs."""

    def refuse(*args: object, **kwargs: object) -> torch.Tensor:
        raise CheckError(f"{exercise} called torch.kron (or lokr_edu.kron): {reason}")

    # lokr_edu.kron is both a module and (re-exported) a function: patch all three names.
    module = sys.modules["lokr_edu.kron"]
    saved = torch.kron, module.kron, lokr_edu.kron
    torch.kron = module.kron = lokr_edu.kron = refuse
    try:
        yield
    finally:
        torch.kron, module.kron, lokr_edu.kron = saved


KRON_SHAPES = [((2, 3), (3, 4)), ((1, 5), (4, 1)), ((3, 1), (1, 2)), ((4, 4), (2, 3))]


def check_kron(kron: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """Exercise 1.1: kron(A, B) equals torch.kron on square, non-square, 1×n and n×1 shapes."""
    for case, (a_shape, b_shape) in enumerate(KRON_SHAPES):
        A, B = random_tensor(*a_shape, seed=case), random_tensor(*b_shape, seed=100 + case)
        (m, n), (p, q) = a_shape, b_shape
        context = f"for A {shape_str(A)} and B {shape_str(B)}"
        with _forbid_kron("kron", "write it from the definition, block (i, j) = A[i, j]·B"):
            got = call_student("kron", kron, A, B, context=context)
        require_tensor("kron", got, (m * p, n * q), context + " (A ⊗ B is (m·p)×(n·q))")
        want = torch.kron(A, B)
        if torch.allclose(got, want):
            continue
        if got.shape == want.shape and torch.allclose(got, torch.kron(B, A)):
            raise CheckError(
                f"kron computed B ⊗ A {context}: block (i, j) of A ⊗ B is A[i, j]·B, "
                "so the outer loop runs over the entries of A"
            )
        r, c = (torch.isclose(got, want) == 0).nonzero()[0].tolist()
        i, k, j, l = r // p, r % p, c // q, c % q
        raise CheckError(
            f"kron is wrong {context} at entry [{r}, {c}]: it should be "
            f"A[{i}, {j}]·B[{k}, {l}] = {want[r, c]:.4f}, got {got[r, c]:.4f} "
            f"(row {r} = i·p + k with p = {p}; column {c} = j·q + l with q = {q})"
        )
    passed(f"kron matches torch.kron on {len(KRON_SHAPES)} shapes, including 1×n and n×1")


def check_kron_singular_values(
    kron_singular_values: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> None:
    """Exercise 1.2: the singular values of A ⊗ B, from those of A and B, largest first."""
    for case, (a_shape, b_shape) in enumerate(KRON_SHAPES):
        A, B = random_tensor(*a_shape, seed=case), random_tensor(*b_shape, seed=100 + case)
        context = f"for A {shape_str(A)} and B {shape_str(B)}"
        count = min(a_shape) * min(b_shape)
        with _forbid_kron("kron_singular_values"):
            got = call_student("kron_singular_values", kron_singular_values, A, B, context=context)
        require_tensor(
            "kron_singular_values", got, (count,), context + " (min(m, n)·min(p, q) values)"
        )
        # A ⊗ B has min(m·p, n·q) ≥ count singular values; those past `count` are zero.
        want = torch.linalg.svdvals(torch.kron(A, B))[:count]
        if torch.allclose(got, want):
            continue
        if torch.allclose(torch.sort(got, descending=True).values, want):
            raise CheckError(f"the values are right but not sorted largest first {context}")
        raise CheckError(
            f"kron_singular_values is wrong {context}: expected {want[:4].tolist()}…, got "
            f"{got[:4].tolist()}…; each singular value of A ⊗ B is a product σ_i(A)·σ_j(B)"
        )
    passed("kron_singular_values matches the SVD of A ⊗ B without building it")


def _matrix_with_spectrum(values: list[float], rows: int, cols: int, seed: int) -> torch.Tensor:
    """A rows×cols matrix with the given singular values (and zeros after them)."""
    U, _ = torch.linalg.qr(random_tensor(rows, rows, seed=seed))
    V, _ = torch.linalg.qr(random_tensor(cols, cols, seed=seed + 1))
    S = torch.zeros(rows, cols, dtype=torch.float64)
    S[range(len(values)), range(len(values))] = torch.tensor(values, dtype=torch.float64)
    return U @ S @ V.T


def check_numerical_rank(numerical_rank: Callable[[torch.Tensor, float], int]) -> None:
    """Exercise 1.3: count singular values above rtol·σ_max."""
    cases = [
        ([3.0, 2.0, 1.0], 5, 4, 1e-8, 3),
        ([1.0, 1e-3, 1e-9], 6, 6, 1e-6, 2),
        ([5.0, 4.0], 3, 7, 1e-8, 2),
        ([2.0, 1.0, 0.5, 0.25], 4, 4, 0.3, 2),
        ([], 3, 3, 1e-8, 0),
    ]
    for seed, (values, rows, cols, rtol, want) in enumerate(cases):
        M = _matrix_with_spectrum(values, rows, cols, seed=10 * seed)
        where = f"for a {rows}×{cols} matrix with singular values {values or '(all zero)'}"
        got = call_student("numerical_rank", numerical_rank, M, rtol, context=where)
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if not isinstance(got, int) or isinstance(got, bool):
            raise CheckError(f"numerical_rank must return an int, got {type(got).__name__} {where}")
        if got != want:
            hint = (
                "the zero matrix has rank 0 (guard against σ_max = 0)"
                if not values
                else f"the tolerance is relative: count σ > rtol·σ_max = {rtol * max(values):.3g}"
            )
            raise CheckError(
                f"numerical_rank returned {got} {where} and rtol={rtol}; expected {want}: {hint}"
            )
    passed(f"numerical_rank is right on {len(cases)} matrices, the zero matrix included")


def check_kron_matvec(
    kron_matvec: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> None:
    """Exercise 1.4: (A ⊗ B) @ x for one vector and for a batch, without building A ⊗ B."""
    # a square B first, so that using B for Bᵀ gives wrong values rather than a crash
    for case, (a_shape, b_shape) in enumerate([((3, 2), (3, 3)), *KRON_SHAPES]):
        A, B = random_tensor(*a_shape, seed=case), random_tensor(*b_shape, seed=100 + case)
        (m, n), (p, q) = a_shape, b_shape
        for batch in [(), (5,)]:
            x = random_tensor(*batch, n * q, seed=200 + case)
            context = f"for A {shape_str(A)}, B {shape_str(B)} and x of shape {tuple(x.shape)}"
            with _forbid_kron("kron_matvec"):
                got = call_student("kron_matvec", kron_matvec, A, B, x, context=context)
            require_tensor("kron_matvec", got, (*batch, m * p), context)
            want = x @ torch.kron(A, B).T
            if torch.allclose(got, want):
                continue
            X = x.reshape(*batch, n, q)
            if q == p and torch.allclose(got, (A @ X @ B).reshape(*batch, m * p)):
                raise CheckError(f"kron_matvec used B instead of Bᵀ {context}: y = A·X·Bᵀ")
            raise CheckError(
                f"kron_matvec is wrong {context}: with torch's row-major flattening, "
                f"X = x.reshape(..., n, q) and (A ⊗ B) x = (A @ X @ B.T).reshape(..., m·p)"
            )
    passed("kron_matvec matches (A ⊗ B) @ x for single vectors and batches")


FACTORIZE_DIMS = [1, 2, 7, 12, 16, 64, 97, 128, 250, 320, 360, 640, 768, 1024, 1280, 3072]


def check_factorize(factorize: Callable[[int, int], tuple[int, int]]) -> None:
    """Exercise 1.5: LyCORIS's factorization, with and without the `factor` cap."""
    for factor in [-1, 4, 8, 16]:
        for dim in FACTORIZE_DIMS:
            call = f"factorize({dim}, factor={factor})"
            got = call_student("factorize", factorize, dim, factor, context=f"for {call}")
            want = reference_factorize(dim, factor)
            if not (
                isinstance(got, tuple) and len(got) == 2 and all(isinstance(v, int) for v in got)
            ):
                raise CheckError(f"{call} must return a tuple of two ints, got {got!r}")
            if got == want:
                continue
            p, q = got
            if p * q != dim:
                hint = f"the two factors must multiply to {dim}, but {p}·{q} = {p * q}"
            elif p > q:
                hint = "return the smaller factor first"
            elif factor > 0 and dim % factor == 0:
                hint = (
                    f"{factor} divides {dim}, so the split is exactly {factor} and {dim // factor}"
                )
            elif factor > 0 and p > factor:
                hint = f"the smaller factor may not exceed factor={factor}"
            else:
                hint = f"the divisor pair closest to √{dim} ≈ {math.sqrt(dim):.2f} is {want}"
            raise CheckError(f"{call} returned {got}; expected {want}: {hint}")
    passed(f"factorize agrees with LyCORIS on {len(FACTORIZE_DIMS)} dims × 4 factor settings")
