"""The Kronecker product from scratch, its rank and singular values, the vec trick, `factorize`.

Defined in chapter 01 (notebooks/01_kronecker_product.ipynb).

For A (m×n) and B (p×q), A ⊗ B is the (m·p)×(n·q) block matrix whose block (i, j) is a_ij·B:

    (A ⊗ B)[i·p + k, j·q + l] = A[i, j] · B[k, l]

Everything here works on 2-D torch tensors. Vectors are flattened the way torch flattens them
(row-major); chapter 01 explains how that relates to the column-stacking `vec` of textbooks.
"""

from __future__ import annotations

import math

import torch

from lokr_edu.validate import require_int, require_matrix

__all__ = [
    "kron",
    "kron_singular_values",
    "numerical_rank",
    "vec",
    "unvec",
    "kron_matvec",
    "kron_matvec_cost",
    "factorize",
]


def kron(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """A ⊗ B for 2-D A (m×n) and B (p×q): the (m·p)×(n·q) matrix with block (i, j) = a_ij·B.

    Built by broadcasting, without loops: the 4-D tensor T[i, k, j, l] = A[i, j]·B[k, l]
    is exactly A ⊗ B once rows (i, k) and columns (j, l) are merged, row-major.
    Section 1 of chapter 01.
    """
    require_matrix("A", A)
    require_matrix("B", B)
    m, n = A.shape
    p, q = B.shape
    blocks = A[:, None, :, None] * B[None, :, None, :]  # (m, p, n, q): [i, k, j, l]
    return blocks.reshape(m * p, n * q)


def kron_singular_values(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The singular values of A ⊗ B without forming it: all products σ_i(A)·σ_j(B), descending.

    From compact SVDs A = U_A Σ_A V_Aᵀ and B = U_B Σ_B V_Bᵀ (Σ square and diagonal, U and V with
    orthonormal columns) and the mixed-product rule, A ⊗ B = (U_A ⊗ U_B)(Σ_A ⊗ Σ_B)(V_A ⊗ V_B)ᵀ
    is itself a compact SVD: Σ_A ⊗ Σ_B is square and diagonal. (With full SVDs and a non-square
    factor, Σ_A ⊗ Σ_B is diagonal only up to a permutation.) The zeros among the products are
    the remaining singular values. Section 3 of chapter 01.
    """
    require_matrix("A", A)
    require_matrix("B", B)
    s_a = torch.linalg.svdvals(A)  # (min(m, n),)
    s_b = torch.linalg.svdvals(B)  # (min(p, q),)
    products = torch.outer(s_a, s_b).flatten()  # (min(m, n)·min(p, q),)
    return torch.sort(products, descending=True).values


def numerical_rank(M: torch.Tensor, rtol: float | None = None) -> int:
    """The number of singular values of M above rtol·σ_max.

    With rtol=None the tolerance is max(rows, cols)·eps(dtype), the default of
    `torch.linalg.matrix_rank` and NumPy. In exact arithmetic rank(A ⊗ B) = rank(A)·rank(B)
    always; under a tolerance the two sides can differ (section 3 of chapter 01).
    """
    # by hand because chapter 01 teaches it; tests hold it to torch.linalg.matrix_rank(M, rtol=)
    require_matrix("M", M)
    if rtol is None:
        rtol = max(M.shape) * torch.finfo(M.dtype).eps
    if rtol < 0:
        raise ValueError(f"rtol must be non-negative, got {rtol}")
    s = torch.linalg.svdvals(M)
    if s.numel() == 0 or s[0] == 0:
        return 0
    return int((s > rtol * s[0]).sum())


def vec(X: torch.Tensor) -> torch.Tensor:
    """The textbook vec: stack the columns of X (r×c) into one vector of length r·c."""
    require_matrix("X", X)
    return X.T.reshape(-1)  # column j of X becomes entries j·r … j·r + r - 1


def unvec(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of `vec`: refill a (rows×cols) matrix column by column."""
    if x.dim() != 1 or x.numel() != rows * cols:
        raise ValueError(
            f"x must be a vector of length rows·cols = {rows * cols}, got {tuple(x.shape)}"
        )
    return x.reshape(cols, rows).T


def kron_matvec(A: torch.Tensor, B: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(A ⊗ B) @ x for a batch of vectors x (..., n·q), without building A ⊗ B.

    The vec trick in torch's row-major convention: reshape each x into X (n×q), then
    (A ⊗ B) x = flatten(A · X · Bᵀ). (The column-stacking form is (A ⊗ B) vec(X) = vec(B X Aᵀ).)
    Costs 2·n·p·(q + m) multiply-adds per vector instead of 2·m·p·n·q. Section 4 of chapter 01.
    """
    require_matrix("A", A)
    require_matrix("B", B)
    m, n = A.shape
    p, q = B.shape
    if x.shape[-1] != n * q:
        raise ValueError(
            f"x must have last dimension n·q = {n}·{q} = {n * q} to match A ⊗ B, "
            f"got shape {tuple(x.shape)}"
        )
    X = x.reshape(*x.shape[:-1], n, q)  # (..., n, q)
    Y = A @ (X @ B.T)  # (..., n, p) then (..., m, p)
    return Y.reshape(*x.shape[:-1], m * p)  # (..., m·p)


def kron_matvec_cost(m: int, n: int, p: int, q: int, batch: int = 1) -> dict[str, int]:
    """Multiply-add FLOPs and stored elements of (A ⊗ B) @ x for `batch` vectors, two ways.

    materialized: build A ⊗ B (m·p·n·q products), then a dense matmul 2·(m·p)·(n·q)·batch.
    vec trick:    X·Bᵀ costs 2·n·q·p and A·(X·Bᵀ) costs 2·m·n·p per vector; stores n·p.
    Section 4 of chapter 01.
    """
    # counted by hand because chapter 01 teaches it; tests hold it to torch's FlopCounterMode
    for name, value in {"m": m, "n": n, "p": p, "q": q, "batch": batch}.items():
        require_int(name, value)
    return {
        "materialized_flops": m * p * n * q + 2 * m * p * n * q * batch,
        "materialized_elements": m * p * n * q,
        "vec_trick_flops": 2 * n * p * (q + m) * batch,
        "vec_trick_elements": n * p * batch,
    }


def factorize(dim: int, factor: int = -1) -> tuple[int, int]:
    """Split dim = p·q with p ≤ q, as LyCORIS (and peft) factorize a LoKr dimension.

    - factor = -1 (no cap): the divisor pair closest to √dim, i.e. p is the largest divisor
      of dim with p ≤ √dim. Primes give (1, dim); perfect squares give (√dim, √dim).
    - factor > 0 that divides dim: exactly (factor, dim // factor), sorted.
    - factor > 0 that does not divide dim: the closest pair to √dim whose smaller side is
      at most `factor`.
    Defined in chapter 01, section 5.
    """
    require_int("dim", dim)
    if isinstance(factor, bool) or not isinstance(factor, int) or (factor < 1 and factor != -1):
        raise ValueError(f"factor must be -1 (no cap) or a positive integer, got {factor!r}")
    if factor > 0 and dim % factor == 0:
        p, q = factor, dim // factor
        return (min(p, q), max(p, q))
    cap = math.isqrt(dim) if factor == -1 else min(factor, math.isqrt(dim))
    p = max(d for d in range(1, cap + 1) if dim % d == 0)
    return (p, dim // p)
