"""Chapter 01's module, lokr_edu.kron: values against torch and against LyCORIS / peft."""

from __future__ import annotations

import math

import pytest
import torch
from lycoris.functional.general import factorization as lycoris_factorization
from peft.tuners.lokr.layer import factorization as peft_factorization
from torch.utils.flop_counter import FlopCounterMode

import lokr_edu
from lokr_edu.kron import (
    factorize,
    kron,
    kron_matvec,
    kron_matvec_cost,
    kron_singular_values,
    numerical_rank,
    unvec,
    vec,
)

SHAPES = [((2, 3), (4, 5)), ((1, 6), (3, 2)), ((5, 1), (1, 4)), ((1, 1), (3, 3)), ((7, 2), (2, 7))]


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_public_names() -> None:
    assert lokr_edu.kron is kron
    assert lokr_edu.factorize is factorize


@pytest.mark.parametrize(("a_shape", "b_shape"), SHAPES)
def test_kron_matches_torch(a_shape: tuple[int, int], b_shape: tuple[int, int]) -> None:
    A, B = randn(*a_shape, seed=1), randn(*b_shape, seed=2)
    assert torch.equal(kron(A, B), torch.kron(A, B))


def test_kron_entry_formula() -> None:
    A, B = randn(3, 4, seed=3), randn(2, 5, seed=4)
    K = kron(A, B)
    p, q = B.shape
    for i, j, k, l in [(0, 0, 0, 0), (2, 3, 1, 4), (1, 2, 0, 3)]:
        assert K[i * p + k, j * q + l] == A[i, j] * B[k, l]


def test_kron_properties() -> None:
    A, B, C, D = randn(3, 4, seed=1), randn(2, 5, seed=2), randn(4, 2, seed=3), randn(5, 3, seed=4)
    S, T = randn(3, 3, seed=5), randn(4, 4, seed=6)
    assert torch.allclose(kron(A, B) @ kron(C, D), kron(A @ C, B @ D))
    assert torch.equal(kron(A, B).T, kron(A.T, B.T))
    assert torch.allclose(
        torch.linalg.inv(kron(S, T)), kron(torch.linalg.inv(S), torch.linalg.inv(T))
    )
    assert torch.allclose(torch.trace(kron(S, T)), torch.trace(S) * torch.trace(T))


@pytest.mark.parametrize(("a_shape", "b_shape"), SHAPES)
def test_singular_values_are_products(a_shape: tuple[int, int], b_shape: tuple[int, int]) -> None:
    A, B = randn(*a_shape, seed=7), randn(*b_shape, seed=8)
    s = kron_singular_values(A, B)
    assert s.shape == (min(a_shape) * min(b_shape),)
    full = torch.linalg.svdvals(torch.kron(A, B))
    assert torch.allclose(s, full[: len(s)])
    assert torch.allclose(
        full[len(s) :], torch.zeros(len(full) - len(s), dtype=s.dtype), atol=1e-12
    )


@pytest.mark.parametrize(("r_a", "r_b"), [(1, 1), (2, 3), (4, 1), (5, 5)])
def test_rank_of_kron_is_product_of_ranks(r_a: int, r_b: int) -> None:
    A = randn(7, r_a, seed=r_a) @ randn(r_a, 6, seed=10 + r_a)
    B = randn(5, r_b, seed=20 + r_b) @ randn(r_b, 8, seed=30 + r_b)
    assert numerical_rank(A) == r_a and numerical_rank(B) == r_b
    assert numerical_rank(kron(A, B)) == r_a * r_b == torch.linalg.matrix_rank(kron(A, B))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("rtol", [None, 1e-6, 1e-3, 0.05, 0.5, 0.0])
def test_numerical_rank_is_torchs_matrix_rank(dtype: torch.dtype, rtol: float | None) -> None:
    """numerical_rank is chapter 01's own; torch.linalg.matrix_rank(M, rtol=) is the reference,
    on matrices whose singular values spread over twelve decades (each tolerance cuts some) from
    a largest one of 0.01 to 100 (the tolerance is relative to it)."""
    for seed, (rows, cols) in enumerate([(9, 7), (7, 9), (12, 12), (1, 5), (30, 4)]):
        U, _ = torch.linalg.qr(randn(rows, rows, seed=seed))
        V, _ = torch.linalg.qr(randn(cols, cols, seed=seed + 10))
        k = min(rows, cols)
        spread = torch.logspace(seed - 2, seed - 14, k, dtype=torch.float64)  # σ_max 10^(seed-2)
        M = (U[:, :k] @ torch.diag(spread) @ V[:, :k].T).to(dtype)
        expected = int(torch.linalg.matrix_rank(M, rtol=rtol))
        assert numerical_rank(M, rtol=rtol) == expected, (rows, cols)


def test_numerical_rank_matches_torch_and_drops_under_float32() -> None:
    M = randn(9, 3, seed=1) @ randn(3, 7, seed=2)
    assert numerical_rank(M) == int(torch.linalg.matrix_rank(M)) == 3
    assert numerical_rank(torch.zeros(3, 4)) == 0
    assert numerical_rank(torch.diag(torch.tensor([1.0, 1e-3])), rtol=1e-2) == 1
    # each factor is numerically full rank in float32, their product is not
    U, _ = torch.linalg.qr(randn(10, 10, seed=3))
    A = (U @ torch.diag(torch.logspace(0, -3, 10, dtype=torch.float64)) @ U.T).float()
    assert numerical_rank(A) == 10
    assert numerical_rank(kron(A, A)) < 100
    assert numerical_rank(kron(A.double(), A.double())) == 100


def test_vec_and_unvec_stack_columns() -> None:
    X = torch.arange(6.0).reshape(2, 3)
    assert vec(X).tolist() == [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]
    assert torch.equal(unvec(vec(X), 2, 3), X)


def test_vec_trick_both_conventions() -> None:
    A, B = randn(3, 4, seed=1), randn(5, 2, seed=2)
    X = randn(2, 4, seed=3)  # q×n for the column convention
    assert torch.allclose(kron(A, B) @ vec(X), vec(B @ X @ A.T))
    x = randn(4 * 2, seed=4)
    assert torch.allclose(kron_matvec(A, B, x), kron(A, B) @ x)


@pytest.mark.parametrize("batch", [(), (5,), (2, 3)])
def test_kron_matvec_batches(batch: tuple[int, ...]) -> None:
    A, B = randn(6, 2, seed=1), randn(3, 5, seed=2)
    x = randn(*batch, 2 * 5, seed=3)
    y = kron_matvec(A, B, x)
    assert y.shape == (*batch, 6 * 3)
    assert torch.allclose(y, x @ kron(A, B).T)


def counted_flops(compute) -> int:
    """FLOPs torch's own counter records for what `compute` runs: 2 per multiply-add of a matrix
    product (its convention, and ours), and here also 1 per elementwise product (torch counts
    those as nothing), so that building A ⊗ B is counted too."""
    products = {torch.ops.aten.mul: lambda *args, out_shape, **kwargs: math.prod(out_shape)}
    with FlopCounterMode(display=False, custom_mapping=products) as counter:
        compute()
    return counter.get_total_flops()


@pytest.mark.parametrize("batch", [1, 7])
def test_kron_matvec_cost_counts_what_torch_counts(batch: int) -> None:
    m, n, p, q = 3, 4, 5, 6  # all different: a swapped size changes the count
    A, B, x = randn(m, n, seed=1), randn(p, q, seed=2), randn(batch, n * q, seed=3)
    cost = kron_matvec_cost(m, n, p, q, batch=batch)
    assert cost["vec_trick_flops"] == counted_flops(lambda: kron_matvec(A, B, x))
    assert cost["materialized_flops"] == counted_flops(lambda: x @ kron(A, B).T)
    assert cost["materialized_elements"] == kron(A, B).numel()
    X = x.reshape(batch, n, q)
    assert cost["vec_trick_elements"] == (X @ B.T).numel()  # the intermediate X·Bᵀ, (n × p)


def test_factorize_matches_lycoris_everywhere() -> None:
    for dim in range(1, 2049):
        for factor in [-1, 1, 2, 3, 4, 8, 16, 64]:
            assert factorize(dim, factor) == lycoris_factorization(dim, factor), (dim, factor)


def test_factorize_special_cases() -> None:
    assert factorize(1) == (1, 1)
    assert factorize(97) == factorize(97, 8) == (1, 97)  # prime
    assert factorize(1024) == (32, 32)  # perfect square
    assert factorize(360) == (18, 20)  # closest to √360, not LyCORIS's docstring's (8, 45)
    assert factorize(1280) == (32, 40) and factorize(1280, 16) == (16, 80)
    assert factorize(1280, 7) == (5, 256)  # 7 does not divide: largest divisor ≤ 7
    assert factorize(128, 64) == (2, 64)  # factor divides: sorted


@pytest.mark.upstream
def test_peft_differs_only_by_order_when_factor_divides() -> None:
    for dim in range(1, 1025):
        for factor in [-1, 2, 4, 8, 16, 64]:
            ours, theirs = factorize(dim, factor), peft_factorization(dim, factor)
            if dim % factor == 0 and factor * factor > dim:
                assert theirs == (ours[1], ours[0]) != ours
            else:
                assert theirs == ours


@pytest.mark.parametrize(
    ("call", "names"),
    [
        (lambda: kron(torch.ones(3), torch.ones(2, 2)), "A must be a 2-D matrix"),
        (lambda: kron(torch.ones(2, 2), [[1.0]]), "B must be a torch.Tensor"),
        (lambda: kron_matvec(torch.ones(2, 3), torch.ones(4, 5), torch.ones(7)), "x must have"),
        (lambda: unvec(torch.ones(5), 2, 3), "x must be a vector"),
        (lambda: factorize(0), "dim must be a positive integer"),
        (lambda: factorize(-4), "dim must be a positive integer"),
        (lambda: factorize(2.5), "dim must be a positive integer"),
        (lambda: factorize(12, factor=0), "factor must be -1"),
        (lambda: factorize(12, factor=-3), "factor must be -1"),
        (lambda: numerical_rank(torch.ones(2, 2), rtol=-1.0), "rtol must be non-negative"),
        (lambda: kron_matvec_cost(0, 1, 1, 1), "m must be a positive integer"),
    ],
)
def test_bad_input_names_the_argument(call, names: str) -> None:
    with pytest.raises(ValueError, match=names):
        call()
