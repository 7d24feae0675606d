"""Chapter 03's checks pass on the reference answers and explain plausible wrong ones."""

from __future__ import annotations

import pytest
import torch
from check_cases import check_tests

from lokr_edu import checks
from lokr_edu.kron import factorize
from lokr_edu.lowrank import adapter_shapes, count_params, loha_delta, lokr_delta


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


def loha_scaled_twice(a, b, c, d, alpha):
    s = alpha / b.shape[0]
    return (s * (a @ b)) * (s * (c @ d))


def loha_matmul(a, b, c, d, alpha):
    return (alpha / b.shape[0]) * (a @ b) @ (c @ d)


def loha_matmul_transposed(a, b, c, d, alpha):
    return (alpha / b.shape[0]) * (a @ b) @ (c @ d).T


def loha_matmul_when_not_square(a, b, c, d, alpha):  # reaches the non-square case with `@`
    if a.shape[0] == b.shape[1]:
        return loha_delta(a, b, c, d, alpha)
    return (alpha / b.shape[0]) * (a @ b) @ (c @ d)


def loha_matmul_transposed_when_not_square(a, b, c, d, alpha):
    if a.shape[0] == b.shape[1]:
        return loha_delta(a, b, c, d, alpha)
    return (alpha / b.shape[0]) * (a @ b) @ (c @ d).T


def lokr_shapes(m, n, r, factor=-1, decompose_both=False, full_matrix=False):
    return adapter_shapes(
        "lokr", m, n, r, factor=factor, decompose_both=decompose_both, full_matrix=full_matrix
    )


def lokr_shapes_with(bug: str):
    """lokr_shapes with one slip a student makes, named by `bug`."""

    def shapes(m, n, r, factor=-1, decompose_both=False, full_matrix=False):
        split = -1 if bug == "factor ignored" else factor
        (a, c), (b, d) = factorize(m, split), factorize(n, split)
        w1, w2 = (a, b), (c, d)
        if bug == "swapped":
            w1, w2 = w2, w1
        if bug == "paired by dimension":
            w1, w2 = (a, c), (b, d)
        full = full_matrix and bug != "full_matrix ignored"
        side = min(w2) if bug == "min side" else max(w2)
        w2_pair = (r <= side / 2 if bug == "strict threshold" else r < side / 2) and not full
        w1_pair = (
            decompose_both
            and bug != "decompose_both ignored"
            and (r < max(w1) / 2 or bug == "W1 always split")
            and not full
        )
        out = {"lokr_w1_a": (w1[0], r), "lokr_w1_b": (r, w1[1])} if w1_pair else {"lokr_w1": w1}
        if w2_pair:
            down = (w2[1], r) if bug == "down factor transposed" else (r, w2[1])
            out |= {"lokr_w2_a": (w2[0], r), "lokr_w2_b": down}
        else:
            out |= {"lokr_w2": w2}
        if bug == "alpha 1-d":
            out["alpha"] = (1,)
        elif bug != "no alpha":
            out["alpha"] = ()
        if bug == "an extra tensor":
            out["lokr_t2"] = (r, r)
        return out

    shapes.__name__ = f"lokr_shapes_{bug.replace(' ', '_')}"
    return shapes


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
            (loha_scaled_twice, "the scale α/r is applied twice"),
            (loha_matmul, "`@` is the matrix product; ⊙ is the entry-wise"),
            (loha_matmul_transposed, "`@` is the matrix product; ⊙ is the entry-wise"),
            (
                lambda a, b, c, d, alpha: (alpha / b.shape[0]) ** 2 * (a @ b) @ (c @ d),
                "and α/r is applied twice",
            ),
            (lambda a, b, c, d, alpha: (a @ b) @ (c @ d), "and the scale α/r is missing"),
            (loha_matmul_when_not_square, "needs n = m"),
            (loha_matmul_transposed_when_not_square, "a transpose only makes `@` fit"),
            (lambda a, b, c, d, alpha: (b.shape[0] / alpha) * (a @ b) * (c @ d), "not r/α"),
            (lambda a, b, c, d, alpha: alpha * (a @ b) * (c @ d), "divide α by the rank"),
            (
                lambda a, b, c, d, alpha: (alpha / a.shape[0]) * (a @ b) * (c @ d),
                "a side of the layer (w1a is m × r, w1b is r × n)",
            ),
            (lambda a, b, c, d, alpha: 7 * (a @ b) * (c @ d), "you scaled P ⊙ Q by 7"),
            (
                lambda a, b, c, d, alpha: loha_delta(a, b, c, d, alpha) + 1,
                "ΔW = (α/r)·(w1a @ w1b) * (w2a @ w2b)",
            ),
        ],
    ),
    (
        checks.check_lokr_shapes,
        lokr_shapes,
        [
            (lokr_shapes_with("no alpha"), "each layer also stores its alpha"),
            (lokr_shapes_with("alpha 1-d"), "alpha is a 0-d tensor"),
            (lokr_shapes_with("swapped"), "W1 and W2 are swapped"),
            (lokr_shapes_with("paired by dimension"), "(a, c) split m and (b, d) split n"),
            (lokr_shapes_with("factor ignored"), "the split ignores factor = 16"),
            (lokr_shapes_with("strict threshold"), "at exactly r = max(c, d)/2 = 40/2"),
            (lokr_shapes_with("min side"), "the rule looks at W2's larger side"),
            (lokr_shapes_with("decompose_both ignored"), "decompose_both=True splits W1 too"),
            (lokr_shapes_with("W1 always split"), "decompose_both splits W1 only while"),
            (lokr_shapes_with("full_matrix ignored"), "full_matrix=True stores both factors"),
            (lokr_shapes_with("down factor transposed"), "lokr_w2_b is the down factor"),
            (lokr_shapes_with("an extra tensor"), "the tensors are"),
            (lambda m, n, r, **options: [(m, n)], "must return a dict"),
            (lambda m, n, r, **options: {"lokr_w1": 4}, "each shape must be a tuple of ints"),
            (lambda m, n, r, **options: {"lokr_w1": (1, m)}, "W1 must be 16 × 24"),
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
            ((9,), "two whole numbers"),
            ("9, 6", "two whole numbers"),
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

CASES += [
    (
        checks.check_smallest_lokr,
        {"factor": 2, "rank": 3},
        [
            ({"factor": -1, "rank": 4}, "misses the update by"),
            ({"factor": 4, "rank": 8}, "with factor = 4 the split is W1 4 × 4"),
            ({"factor": 2, "rank": 2}, "the W2 this update needs (32 × 32) has rank 3"),
            ({"factor": 2, "rank": 8}, "W2's pair needs a rank of at least W2's own rank"),
            ({"factor": 2, "rank": 16}, "at this rank LyCORIS stores W2 whole"),
            ({"factor": 2, "rank": 3, "full_matrix": True}, "full_matrix stores both"),
            ({"factor": 1, "rank": 6}, "but 196 are enough"),
            ({"factor": 0, "rank": 3}, "LyCORIS's LoKr refuses"),
            ((2, 3), "write your answer as a dict"),
            ({"factor": 2, "rank": 3, "alpha": 1}, "write your answer as a dict"),
            ({"factor": 2.0, "rank": 3}, "factor and rank must be whole numbers"),
        ],
    ),
]

test_check_passes_on_the_reference, test_check_explains_a_wrong_answer = check_tests(CASES)


@pytest.mark.parametrize(
    ("check", "answer"),
    [
        (checks.check_loha_rank_prediction, [9, 6]),  # a list is a pair too
        (checks.check_smallest_lokr, {"factor": 32, "rank": 3}),  # the same split, sorted
        (checks.check_smallest_lokr, {"factor": 2, "rank": 3, "decompose_both": True}),
        (checks.check_smallest_lokr, {"factor": 3, "rank": 3}),  # 3 does not divide 64: 2 · 32
    ],
    ids=lambda value: getattr(value, "__name__", str(value)),
)
def test_check_accepts_an_answer_written_differently(check, answer, capsys) -> None:
    check(answer)
    assert capsys.readouterr().out.startswith("✓ ")


@pytest.mark.parametrize(
    "check",
    [checks.check_w2_full_rank, checks.check_loha_rank_prediction, checks.check_smallest_lokr],
)
def test_an_answer_left_blank_reads_as_not_done_yet(check) -> None:
    with pytest.raises(NotImplementedError, match=r"^Exercise 3\.\d: .*not answered yet"):
        check(None)


def test_the_mystery_update_is_a_kronecker_product_that_the_default_split_misses() -> None:
    W = checks.mystery_update()
    R = W.reshape(2, 32, 2, 32).permute(0, 2, 1, 3).reshape(4, 32 * 32)
    assert torch.linalg.matrix_rank(R) == 1  # W = X ⊗ Y with X 2 × 2
    assert torch.linalg.matrix_rank(W) == 6  # rank(X)·rank(Y) = 2 · 3
    assert count_params("lokr", 64, 64, 3, factor=2) == 4 + 3 * (32 + 32) == 196
