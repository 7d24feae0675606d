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
    not_answered,
    passed,
    random_tensor,
    require_tensor,
    shape_str,
)
from lokr_edu.kron import factorize as reference_factorize
from lokr_edu.kron import numerical_rank as reference_numerical_rank
from lokr_edu.kron import vec

__all__ = [
    "check_kron",
    "check_kron_singular_values",
    "check_numerical_rank",
    "check_kron_matvec",
    "check_factorize",
    "check_kron_rank_prediction",
    "check_vec_column_form",
    "check_rank_loss",
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
        # the 4-D product indexed [i, j, k, l] (A's indices first): right shape, wrong order
        a_first = (A[:, :, None, None] * B[None, None, :, :]).reshape(m * p, n * q)
        if torch.allclose(got, a_first):
            raise CheckError(
                f"kron merged the indices in the order [i, j, k, l] {context}: row i·p + k "
                "needs i and k side by side, so index the 4-D product as [i, k, j, l] "
                "(A[:, None, :, None] * B[None, :, None, :]) before the reshape"
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
        if not isinstance(got, int) or isinstance(got, bool):
            convert = " (convert with int(...))" if isinstance(got, torch.Tensor) else ""
            raise CheckError(
                f"numerical_rank must return a Python int, got {type(got).__name__} {where}"
                f"{convert}: a rank is a count, and a tensor would leak into later arithmetic"
            )
        if got != want:
            hint = (
                "the zero matrix has rank 0: count σ strictly greater than rtol·σ_max, since "
                "with σ_max = 0 every σ satisfies σ ≥ rtol·σ_max"
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


def _require_answer(exercise: str, value: object, what: str = "your prediction") -> None:
    """An answer left blank (None or ...) is not answered yet, not a wrong answer."""
    if value is None or value is Ellipsis:
        raise not_answered(f"{exercise}: not answered yet (write {what})")


def _rank_factors() -> tuple[torch.Tensor, torch.Tensor]:
    """Exercise 1.6's factors: A 6×5 of rank 2 and B 4×7 of rank 3, as the notebook builds them."""
    A = random_tensor(6, 2, seed=61) @ random_tensor(2, 5, seed=62)
    B = random_tensor(4, 3, seed=63) @ random_tensor(3, 7, seed=64)
    return A, B


def check_kron_rank_prediction(prediction: object) -> None:
    """Exercise 1.6 (predict): rank(A ⊗ B) for A 6×5 of rank 2 and B 4×7 of rank 3."""
    _require_answer("Exercise 1.6: predict the rank of A ⊗ B", prediction)
    A, B = _rank_factors()
    rank_a, rank_b = reference_numerical_rank(A, 1e-10), reference_numerical_rank(B, 1e-10)
    truth = reference_numerical_rank(torch.kron(A, B), 1e-10)
    if not isinstance(prediction, int) or isinstance(prediction, bool):
        raise CheckError(f"the prediction must be an int (a rank), got {prediction!r}")
    if prediction == truth:
        passed(
            f"rank(A ⊗ B) = {truth} = {rank_a}·{rank_b}, as you predicted: measured on the "
            "24×35 product, whose other singular values are zero"
        )
        return
    if prediction == rank_a + rank_b:
        hint = "ranks multiply, they do not add: every σ_i(A)·σ_j(B) is a singular value"
    elif prediction == min(24, 35):
        hint = "24 is the largest rank a 24×35 matrix can have, but A and B are rank-deficient"
    elif prediction == min(6, 5) * min(4, 7):
        hint = "min(m, n)·min(p, q) = 20 would hold for full-rank factors; use the actual ranks"
    elif prediction == 0:
        hint = "rank-deficient is not rank 0: A and B each have non-zero singular values"
    else:
        hint = "the singular values of A ⊗ B are the products σ_i(A)·σ_j(B)"
    raise CheckError(
        f"you predicted rank(A ⊗ B) = {prediction}; measured {truth} "
        f"(rank A = {rank_a}, rank B = {rank_b}): {hint}"
    )


def _column_form_cases() -> Iterator[tuple[int, int, int, int]]:
    """Square cases first (so a transposed answer has the right shape), then a random search."""
    yield from [(3, 3, 3, 3), (2, 4, 3, 2), (4, 2, 4, 3), (1, 5, 3, 1), (3, 1, 1, 4)]
    g = torch.Generator().manual_seed(7)
    for _ in range(40):
        yield tuple(int(v) for v in torch.randint(1, 6, (4,), generator=g))


def check_vec_column_form(column_form: Callable[..., torch.Tensor]) -> None:
    """Exercise 1.7 (derive): Y (p × m) with vec(Y) = (A ⊗ B)·vec(X), vec stacking columns."""
    count = 0
    for case, (m, n, p, q) in enumerate(_column_form_cases()):
        A, B = random_tensor(m, n, seed=300 + case), random_tensor(p, q, seed=400 + case)
        X = random_tensor(q, n, seed=500 + case)
        context = f"for A {m}×{n}, B {p}×{q} and X {q}×{n}"
        with _forbid_kron("column_form", "derive Y from A, B and X; A ⊗ B is what it replaces"):
            got = call_student("column_form", column_form, A, B, X, context=context)
        require_tensor("column_form", got, (p, m), context + " (Y = unvec of a p·m vector)")
        want_vec = torch.kron(A, B) @ vec(X)
        count += 1
        if torch.allclose(vec(got), want_vec):
            continue
        want = want_vec.reshape(m, p).T
        if m == p and torch.allclose(got, want.T):
            hint = (
                "that is Yᵀ = A·Xᵀ·Bᵀ, the row-major form transposed; vec stacks columns, "
                "so the factor acting on X's columns (B) comes first"
            )
        elif n == m and torch.allclose(got, B @ X @ A):
            hint = "A enters transposed: column j of Y mixes columns of X with row j of A"
        elif m == p and q == n and torch.allclose(got, A @ X @ B.T):
            hint = "A·X·Bᵀ is the row form, for X of shape n × q; here X is q × n"
        else:
            hint = (
                "write y = vec(Y) entry by entry: y[j·p + k] = Σ A[j, l]·B[k, i]·X[i, l] "
                "(X[i, l] sits at index l·q + i of vec(X)), and read off the matrix product"
            )
        raise CheckError(
            f"vec(column_form(A, B, X)) ≠ (A ⊗ B)·vec(X) {context}: a counterexample, "
            f"largest error {(vec(got) - want_vec).abs().max():.3g}; {hint}"
        )
    passed(f"vec(Y) = (A ⊗ B)·vec(X) on {count} shapes, no counterexample found")


def check_rank_loss(A: object, B: object) -> None:
    """Exercise 1.8 (explore): float32 A and B, each full-rank, whose A ⊗ B loses numerical rank."""
    for M in (A, B):
        _require_answer("Exercise 1.8: make float32 lose a rank", M, "A and B")
    for name, M in (("A", A), ("B", B)):
        if not isinstance(M, torch.Tensor) or M.dim() != 2:
            raise CheckError(f"{name} must be a 2-D torch.Tensor, got {type(M).__name__}")
        if M.dtype != torch.float32:
            raise CheckError(
                f"{name} is {M.dtype}: make it torch.float32. The effect lives in the tolerance "
                "max(rows, cols)·ε·σ_max, and float32's ε ≈ 1.2e-7 is what makes it visible"
            )
        if max(M.shape) > 8 or min(M.shape) < 2:
            raise CheckError(f"{name} is {shape_str(M)}: keep each factor between 2×2 and 8×8")
    full = []
    for name, M in (("A", A), ("B", B)):
        s = torch.linalg.svdvals(M)
        tol = max(M.shape) * torch.finfo(torch.float32).eps * s[0]
        rank = int(torch.linalg.matrix_rank(M))
        if rank < min(M.shape):
            raise CheckError(
                f"{name} itself already has numerical rank {rank} < {min(M.shape)} in float32: "
                f"its smallest singular value {s[-1]:.3g} is under the tolerance {tol:.3g}; "
                "each factor must look full-rank on its own"
            )
        full.append(rank)
    AB = torch.kron(A, B)
    s = torch.linalg.svdvals(AB)
    tol = max(AB.shape) * torch.finfo(torch.float32).eps * s[0]
    got = int(torch.linalg.matrix_rank(AB))
    if got >= full[0] * full[1]:
        raise CheckError(
            f"A ⊗ B ({shape_str(AB)}) still has full numerical rank {got}: its smallest singular "
            f"value σ_min(A)·σ_min(B) = {s[-1]:.3g} is above its tolerance {tol:.3g}. Spread the "
            "spectra: each factor's σ_min/σ_max must stay above its own tolerance, while their "
            "product falls below that of A ⊗ B"
        )
    # σ_min(A)·σ_min(B) from float64 SVDs of the factors: exact to the digits printed, unlike
    # the float32 SVD of A ⊗ B, whose smallest values carry an error of order ε·σ_max
    smallest = torch.linalg.svdvals(A.double())[-1] * torch.linalg.svdvals(B.double())[-1]
    passed(
        f"A ({shape_str(A)}) and B ({shape_str(B)}) each have full rank in float32, but "
        f"A ⊗ B counts {got} instead of {full[0] * full[1]}: {full[0] * full[1] - got} lost to "
        f"products of small singular values (σ_min(A)·σ_min(B) = {smallest:.2g}, "
        f"tolerance {tol:.2g})"
    )
