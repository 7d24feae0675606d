"""Checks for chapter 03's exercises (solutions/03_loha_and_lokr_solutions.ipynb)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lokr_edu.checks.common import (
    CheckError,
    call_student,
    not_answered,
    passed,
    prediction_pair,
    random_tensor,
    require_tensor,
)
from lokr_edu.kron import numerical_rank
from lokr_edu.lowrank import (
    adapter_shapes,
    count_params,
    loha_delta,
    lokr_delta,
    lokr_factors,
)

__all__ = [
    "check_loha_params",
    "check_loha_delta",
    "check_lokr_shapes",
    "check_lokr_delta",
    "check_w2_full_rank",
    "check_loha_rank_prediction",
    "check_loha_as_one_product",
    "check_rearrange",
    "mystery_update",
    "check_smallest_lokr",
]

# r = 4 is not first: there a double count 4r(m + n) equals r²(m + n), and the two mistakes
# would get one diagnosis. At r = 8 every likely mistake gives a different number.
LAYERS = [(3072, 768, 8), (320, 320, 4), (1280, 5120, 1), (7, 5, 2)]


def check_loha_params(loha_params: Callable[[int, int, int], int]) -> None:
    """Exercise 3.1: LoHa's trainable numbers on an m × n layer."""
    for m, n, r in LAYERS:
        call = f"loha_params({m}, {n}, {r})"
        got = call_student("loha_params", loha_params, m, n, r, context=f"for {call}")
        want = count_params("loha", m, n, r)
        if got == want:
            continue
        if got == r * (m + n):
            hint = "that is one LoRA; LoHa multiplies two of them, entry by entry"
        elif got == r * r * (m + n):
            hint = "r² is LoHa's rank bound, not its size: two pairs of r-wide factors"
        elif got == 4 * r * (m + n):
            hint = "each factor counted twice: two pairs, B_i (m × r) and A_i (r × n), once each"
        elif got == 2 * r * m * n:
            hint = "the factors are m × r and r × n, so their sizes add (r·m + r·n), not multiply"
        else:
            hint = "B₁, B₂ are m × r and A₁, A₂ are r × n"
        raise CheckError(f"{call} returned {got}; expected {want}: {hint}")
    passed("loha_params counts two rank-r pairs: 2r(m + n)")


# (m, n, r, α): the square layer first, where `@` in place of ⊙ still runs and can be named;
# α/r is never 1, so a missing or doubled scale shows
LOHA_CASES = [(4, 4, 2, 3.0), (6, 5, 2, 4.0), (8, 3, 3, 1.5)]
MATMUL = (
    "`@` is the matrix product; ⊙ is the entry-wise (Hadamard) product, `*` between two "
    "m × n tensors"
)


def check_loha_delta(loha_delta_fn: Callable[..., torch.Tensor]) -> None:
    """Exercise 3.1: ΔW = (α/r)·(w1a·w1b) ⊙ (w2a·w2b), w1a = B₁ (m × r), w1b = A₁ (r × n),
    w2a = B₂, w2b = A₂: each pair up first, as LyCORIS names them."""
    for case, (m, n, r, alpha) in enumerate(LOHA_CASES):
        w1a, w1b = random_tensor(m, r, seed=case), random_tensor(r, n, seed=10 + case)
        w2a, w2b = random_tensor(m, r, seed=20 + case), random_tensor(r, n, seed=30 + case)
        context = f"for m = {m}, n = {n}, r = {r}, α = {alpha:g}"
        try:
            got = call_student(
                "loha_delta", loha_delta_fn, w1a, w1b, w2a, w2b, alpha, context=context
            )
        except CheckError as error:
            cause = error.__cause__
            if isinstance(cause, RuntimeError) and "cannot be multiplied" in str(cause):
                raise CheckError(
                    f"loha_delta raised RuntimeError {context}: {cause}. {MATMUL}: (w1a @ w1b) "
                    "and (w2a @ w2b) are both m × n, and `@` between them needs n = m"
                ) from cause
            raise
        if isinstance(got, torch.Tensor) and m != n and tuple(got.shape) in ((m, m), (n, n)):
            raise CheckError(
                f"loha_delta returned shape {tuple(got.shape)} {context}; expected {(m, n)}: "
                f"{MATMUL}, and a transpose only makes `@` fit"
            )
        require_tensor("loha_delta", got, (m, n), context)
        want = loha_delta(w1a, w1b, w2a, w2b, alpha)
        if torch.allclose(got, want):
            continue
        P, Q, s = w1a @ w1b, w2a @ w2b, alpha / r
        candidates = [
            (P * Q, "the scale α/r is missing"),
            (
                s * s * P * Q,
                "the scale α/r is applied twice (once per half?): it multiplies "
                "the Hadamard product once, ΔW = (α/r)·(P ⊙ Q), not ((α/r)·P) ⊙ ((α/r)·Q)",
            ),
            (s * (P @ Q) if m == n else None, MATMUL),
            (s * (P @ Q.T) if m == n else None, MATMUL),
            (s * (P.T @ Q) if m == n else None, MATMUL),
            (s * s * (P @ Q) if m == n else None, MATMUL + "; and α/r is applied twice"),
            (P @ Q if m == n else None, MATMUL + "; and the scale α/r is missing"),
            (s * (P + Q), "⊙ is the entry-wise product (*), not a sum"),
            ((r / alpha) * P * Q, "the scale is α/r, not r/α"),
            (alpha * P * Q, "the scale is α/r: divide α by the rank r = w1b.shape[0]"),
            ((alpha / m) * P * Q, f"you divided α by {m}, a side of the layer"),
            ((alpha / n) * P * Q, f"you divided α by {n}, a side of the layer"),
        ]
        matching = [h for c, h in candidates if c is not None and torch.allclose(got, c)]
        if matching and "a side of the layer" in matching[0]:
            matching[0] += (
                " (w1a is m × r, w1b is r × n); the rank is r = w1b.shape[0] = w1a.shape[1]"
            )
        ratio = float((got * P * Q).sum() / (P * Q).square().sum())  # got ≈ ratio · P ⊙ Q?
        if not matching and torch.allclose(got, ratio * P * Q):
            matching = [f"you scaled P ⊙ Q by {ratio:g}; the scale is α/r = {s:g}"]
        hint = matching[0] if matching else "ΔW = (α/r)·(w1a @ w1b) * (w2a @ w2b)"
        raise CheckError(f"loha_delta is wrong {context}: {hint}")
    passed("loha_delta multiplies the two LoRA products entry by entry, scaled by α/r once")


# (m, n, r, options), each case catching a different slip: the first splits 320 × 768 with
# c ≠ d and r = 12 between min(c, d)/2 and max(c, d)/2; the second sits exactly on the
# threshold; then decompose_both (below and at W1's threshold), factor, full_matrix, a prime.
SHAPE_CASES = [
    (320, 768, 12, {}),
    (1280, 1280, 20, {}),
    (1280, 768, 4, {"decompose_both": True}),
    (320, 320, 8, {"decompose_both": True}),
    (64, 64, 2, {"factor": 16}),
    (1280, 1280, 4, {"full_matrix": True}),
    (97, 64, 1, {}),
]


def _as_shapes(value: object, context: str) -> dict[str, tuple[int, ...]]:
    if not isinstance(value, dict):
        raise CheckError(
            f"lokr_shapes must return a dict, tensor name -> shape, got {type(value).__name__} "
            f"{context}"
        )
    try:
        return {str(k): tuple(int(s) for s in v) for k, v in value.items()}
    except (TypeError, ValueError) as error:
        raise CheckError(
            f"lokr_shapes returned {value!r} {context}: each shape must be a tuple of ints, "
            "() for alpha"
        ) from error


def _factor_shapes(shapes: dict[str, tuple[int, ...]], name: str) -> tuple[int, int] | None:
    """The shape of Kronecker factor `name` ("w1" or "w2") that a layout implies, or None."""
    whole, up, down = (f"lokr_{name}", f"lokr_{name}_a", f"lokr_{name}_b")
    if whole in shapes and len(shapes[whole]) >= 2:
        return shapes[whole][:2]
    if up in shapes and down in shapes and len(shapes[up]) == len(shapes[down]) == 2:
        return shapes[up][0], shapes[down][1]
    return None


def _lokr_shapes_hint(
    got: dict[str, tuple[int, ...]], m: int, n: int, r: int, options: dict
) -> str:
    factor = options.get("factor", -1)
    decompose_both = options.get("decompose_both", False)
    full_matrix = options.get("full_matrix", False)
    (a, b), (c, d) = lokr_factors(m, n, factor)
    want = adapter_shapes("lokr", m, n, r, **options)
    for name, cols in (("w1", b), ("w2", d)):
        if got.get(f"lokr_{name}_b") == (cols, r) and cols != r:
            return (
                f"lokr_{name}_b is the down factor, r × {'b' if name == 'w1' else 'd'} = "
                f"{(r, cols)}; lokr_{name}_a is the up factor, {'a' if name == 'w1' else 'c'} × r"
            )
    W1, W2 = _factor_shapes(got, "w1"), _factor_shapes(got, "w2")
    if (W1, W2) == ((c, d), (a, b)) and (a, b) != (c, d):
        return (
            "W1 and W2 are swapped: W1 = a × b takes the smaller number of each split, "
            "(a, c) = factorize(m) and (b, d) = factorize(n), so W1 is the small factor"
        )
    if W1 == (a, c) and (a, c) != (a, b):
        return "(a, c) split m and (b, d) split n, but W1 is a × b and W2 is c × d"
    if factor != -1 and (W1, W2) == lokr_factors(m, n):
        return f"the split ignores factor = {factor}: (a, c) = factorize(m, factor)"
    if (W1, W2) != ((a, b), (c, d)):
        return (
            f"W1 must be {a} × {b} and W2 {c} × {d}: (a, c) = factorize(m, factor) and "
            "(b, d) = factorize(n, factor)"
        )
    w2_whole, w1_whole = "lokr_w2" in want, "lokr_w1" in want
    if w2_whole != ("lokr_w2" in got):
        if w2_whole and full_matrix:
            return "full_matrix=True stores both factors whole, lokr_w1 and lokr_w2, at any rank"
        if w2_whole and 2 * r == max(c, d):
            return (
                f"at exactly r = max(c, d)/2 = {max(c, d)}/2, W2 is already whole: the rule is "
                "r ≥ max(c, d)/2"
            )
        if not w2_whole and 2 * r >= min(c, d):
            return (
                f"the rule looks at W2's larger side: W2 is {c} × {d}, whole once "
                f"r ≥ max(c, d)/2 = {max(c, d) / 2:g}, not min(c, d)/2"
            )
        return f"W2 ({c} × {d}) is stored whole (lokr_w2) exactly when r ≥ max(c, d)/2"
    if w1_whole != ("lokr_w1" in got):
        if full_matrix:
            return "full_matrix=True stores both factors whole, lokr_w1 and lokr_w2, at any rank"
        if not w1_whole:
            return (
                "decompose_both=True splits W1 too, into lokr_w1_a (a × r) and lokr_w1_b "
                "(r × b), while r < max(a, b)/2"
            )
        if decompose_both:
            return (
                f"decompose_both splits W1 only while r < max(a, b)/2 = {max(a, b) / 2:g}; at "
                f"r = {r} W1 ({a} × {b}) stays whole"
            )
        return "W1 is stored whole (lokr_w1) unless decompose_both=True"
    rest = {k: v for k, v in got.items() if k != "alpha"}
    if rest == {k: v for k, v in want.items() if k != "alpha"}:
        if "alpha" not in got:
            return 'each layer also stores its alpha, a 0-d tensor: "alpha": ()'
        return f"alpha is a 0-d tensor, shape (), got {got['alpha']}"
    return f"the tensors are {want}"


def check_lokr_shapes(lokr_shapes: Callable[..., dict]) -> None:
    """Exercise 3.2: the tensors one LoKr layer stores in a LyCORIS file, name -> shape, for
    the settings factor, rank, decompose_both and full_matrix (`adapter_shapes`)."""
    for m, n, r, options in SHAPE_CASES:
        settings = "".join(f", {k}={v}" for k, v in options.items())
        call = f"lokr_shapes({m}, {n}, r={r}{settings})"
        got = call_student("lokr_shapes", lokr_shapes, m, n, r, **options, context=f"for {call}")
        got = _as_shapes(got, f"for {call}")
        want = adapter_shapes("lokr", m, n, r, **options)
        if got == want:
            continue
        hint = _lokr_shapes_hint(got, m, n, r, options)
        raise CheckError(f"{call} returned {got}; expected {want}: {hint}")
    passed(
        f"lokr_shapes lists LyCORIS's tensors on {len(SHAPE_CASES)} layers: the split, W2 whole "
        "from r ≥ max(c, d)/2, decompose_both, full_matrix, and one alpha"
    )


LOKR_RULE = (
    "ΔW = scale · kron(w1, W2) with W2 = w2a @ w2b and scale = α/r, r = w2a.shape[1], when W2 "
    "is low-rank, and W2 = w2 with scale exactly 1 (α ignored) when both factors are full"
)


def check_lokr_delta(lokr_delta_fn: Callable[..., torch.Tensor]) -> None:
    """Exercise 3.3: LyCORIS's LoKr with W1 full and W2 low-rank (w2a = B₂, c × r, up; w2b =
    A₂, r × d, down) or full, and its scale rule."""
    w1 = random_tensor(4, 3, seed=1)
    w2a, w2b = random_tensor(5, 2, seed=2), random_tensor(2, 6, seed=3)  # c = 5, r = 2, d = 6
    w2 = random_tensor(5, 6, seed=4)
    cases = [
        ("W2 low-rank", {"w2a": w2a, "w2b": w2b}, lokr_delta(w1=w1, w2a=w2a, w2b=w2b, alpha=3.0)),
        ("W2 full", {"w2": w2}, lokr_delta(w1=w1, w2=w2, alpha=3.0)),
    ]
    for label, factors, want in cases:
        context = f"with {label}, α = 3"
        try:
            got = call_student(
                "lokr_delta", lokr_delta_fn, w1, alpha=3.0, **factors, context=context
            )
        except CheckError as error:
            cause = error.__cause__
            if (
                label == "W2 full"
                and isinstance(cause, AttributeError | TypeError)
                and "None" in str(cause)
            ):
                raise CheckError(
                    f"lokr_delta raised {type(cause).__name__} {context}: {cause}. With W2 full, "
                    "w2a and w2b are None: test `w2 is not None` first, and then there is no "
                    "rank, so the scale is exactly 1"
                ) from cause
            raise
        require_tensor("lokr_delta", got, (20, 18), context + " (ΔW = W1 ⊗ W2 is (4·5) × (3·6))")
        if torch.allclose(got, want):
            continue
        W2 = factors.get("w2", w2a @ w2b)
        kron = torch.kron(w1, W2)
        ratio = float((got * kron).sum() / (kron * kron).sum())  # got ≈ ratio · W1 ⊗ W2?
        scaled = torch.allclose(got, ratio * kron)
        scale = 1.0 if label == "W2 full" else 3.0 / 2
        if torch.allclose(got, scale * torch.kron(W2, w1)):
            hint = "the order matters: ΔW = W1 ⊗ W2, with the small factor W1 first"
        elif label == "W2 full" and scaled:
            hint = (
                f"you scaled by {ratio:g}; with both factors full there is no rank: LyCORIS "
                "uses scale exactly 1 and ignores α"
            )
        elif label == "W2 low-rank" and scaled and abs(ratio - 3.0 / 5) < 1e-9:
            hint = (
                "you divided α by 5 = w2a.shape[0], the rows c of W2; w2a is c × r, so the "
                "rank is r = w2a.shape[1] = 2"
            )
        elif label == "W2 low-rank" and scaled and abs(ratio - 3.0 / 6) < 1e-9:
            hint = (
                "you divided α by 6 = w2b.shape[1], the columns d of W2; w2b is r × d, so the "
                "rank is r = w2a.shape[1] = w2b.shape[0] = 2"
            )
        elif label == "W2 low-rank" and scaled:
            hint = f"you scaled by {ratio:g}; with a low-rank factor the scale is α/r = 3/2"
        else:
            hint = LOKR_RULE
        raise CheckError(f"lokr_delta is wrong {context}: {hint}")
    passed("lokr_delta builds W1 ⊗ W2 with α/r for a low-rank W2 and scale 1 for a full one")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_w2_full_rank(prediction: int) -> None:
    """Exercise 3.4 (predict): the smallest rank at which LyCORIS stores W2 of a 320 × 768 layer
    whole (`lokr_w2`) instead of as the pair lokr_w2_a · lokr_w2_b."""
    if prediction is None or prediction is ...:
        raise not_answered(
            "Exercise 3.4: predict the rank at which W2 is stored whole: not answered yet "
            "(write a whole number)"
        )
    m, n = 320, 768
    (a, b), (c, d) = lokr_factors(m, n)
    want = next(r for r in range(1, m * n) if "lokr_w2" in adapter_shapes("lokr", m, n, r))
    if not _is_int(prediction):
        raise CheckError(f"write your prediction as a whole number (a rank), got {prediction!r}")
    pair, whole = (c + d) * want, c * d
    why = (
        f"{m} × {n} splits as W1 {a} × {b} and W2 {c} × {d}, and W2 is stored whole once "
        f"r ≥ max(c, d)/2 = {max(c, d)}/2; at r = {want} the pair would hold (c + d)·r = "
        f"{pair} numbers against c·d = {whole} for the whole matrix"
    )
    if prediction == want:
        passed(f"W2 is stored whole from r = {want}: {why}")
        return
    if prediction == max(c, d):
        hint = "the switch comes at half of W2's larger side, long before r reaches it"
    elif prediction == -(-min(c, d) // 2):
        hint = "the rule looks at W2's larger side, max(c, d), not the smaller one"
    elif prediction == -(-max(a, b) // 2):
        hint = "max(a, b)/2 is the rule for W1 with decompose_both; W2 = c × d is the large factor"
    elif prediction in (-(-max(m, n) // 2), -(-min(m, n) // 2)):
        hint = "the rule looks at the Kronecker factor W2, not at the whole layer"
    elif prediction == want + 1:
        hint = "the rule is r ≥ max(c, d)/2: at exactly half, W2 is already whole"
    else:
        hint = "split both sides with factorize, then apply r ≥ max(c, d)/2 to W2 = c × d"
    raise CheckError(f"you predicted r = {prediction}; the answer is r = {want}: {hint}. {why}")


def _random_loha_rank(m: int, n: int, r: int, seed: int) -> int:
    w1a, w1b = random_tensor(m, r, seed=seed), random_tensor(r, n, seed=seed + 1)
    w2a, w2b = random_tensor(m, r, seed=seed + 2), random_tensor(r, n, seed=seed + 3)
    return numerical_rank(loha_delta(w1a, w1b, w2a, w2b))


def check_loha_rank_prediction(prediction: tuple[int, int]) -> None:
    """Exercise 3.5 (predict): the rank of a LoHa ΔW, r = 3, random factors, on a 16 × 16 and a
    6 × 40 layer. A tuple or a list of two whole numbers."""
    if prediction is None or prediction is ...:
        raise not_answered(
            "Exercise 3.5: predict the rank of a random LoHa update: not answered yet (write "
            "two whole numbers, (rank on 16 × 16, rank on 6 × 40))"
        )
    r = 3
    want = (_random_loha_rank(16, 16, r, seed=0), _random_loha_rank(6, 40, r, seed=10))
    prediction = prediction_pair(
        prediction, _is_int, "two whole numbers, (rank on 16 × 16, rank on 6 × 40)"
    )
    square, thin = prediction
    measured = f"measured: rank {want[0]} on 16 × 16 and rank {want[1]} on 6 × 40"
    if prediction == want:
        passed(
            f"{measured}. The Hadamard product of two rank-{r} matrices has rank up to "
            f"r² = {r * r}, and random factors reach it unless the layer is narrower: rank ≤ "
            "min(m, n) always"
        )
        return
    if square == r:
        hint = "each half has rank r = 3, but ⊙ does not keep the rank: it can multiply it"
    elif square == 2 * r:
        hint = "2r is what a LoRA with LoHa's 2r(m + n) numbers reaches; ⊙ multiplies the ranks"
    elif square != want[0]:
        hint = f"on 16 × 16 the bound is r² = {r * r}, and random factors reach it"
    elif thin == r * r:
        hint = "r² = 9 is the bound from the factors, but a 6 × 40 matrix has rank at most 6"
    else:
        hint = "the rank is at most min(r², m, n), and random factors reach that"
    raise CheckError(f"you predicted {prediction}; {measured}: {hint}")


def _pairwise(U1: torch.Tensor, U2: torch.Tensor) -> torch.Tensor:
    """Column i·r₂ + j is U1[:, i] ⊙ U2[:, j]: (m, r₁), (m, r₂) -> (m, r₁·r₂)."""
    return (U1[:, :, None] * U2[:, None, :]).reshape(U1.shape[0], -1)


def _loha_product_hint(U: torch.Tensor, V: torch.Tensor, w1a, w1b, w2a, w2b) -> str:
    if w1a.shape[1] == w2a.shape[1]:
        diagonal = (w1a * w2a) @ (w1b * w2b)
        if torch.allclose(U @ V, diagonal):
            return (
                "your U @ V keeps only the pairs i = j; the double sum Σᵢ Σⱼ runs over every "
                "pair (i, j): r₁·r₂ terms"
            )
    U_ij, U_ji = _pairwise(w1a, w2a), _pairwise(w2a, w1a)  # columns in order (i, j) / (j, i)
    V_ij, V_ji = _pairwise(w1b.T, w2b.T).T, _pairwise(w2b.T, w1b.T).T
    if (torch.allclose(U, U_ij) and torch.allclose(V, V_ji)) or (
        torch.allclose(U, U_ji) and torch.allclose(V, V_ij)
    ):
        return (
            "column k of U and row k of V must come from the same pair (i, j): if column "
            "i·r₂ + j of U is w1a[:, i] ⊙ w2a[:, j], row i·r₂ + j of V is w1b[i] ⊙ w2b[j]"
        )
    return (
        "(uᵢvᵢᵀ) ⊙ (xⱼyⱼᵀ) = (uᵢ ⊙ xⱼ)(vᵢ ⊙ yⱼ)ᵀ: one column of U and one row of V per pair "
        "(i, j), uᵢ a column of w1a, xⱼ a column of w2a, vᵢᵀ a row of w1b, yⱼᵀ a row of w2b"
    )


def check_loha_as_one_product(loha_as_one_product: Callable[..., tuple]) -> None:
    """Exercise 3.6 (derive): (w1a·w1b) ⊙ (w2a·w2b) = U·V with U m × r₁r₂ built from w1a, w2a
    alone and V r₁r₂ × n from w1b, w2b alone: hence rank ≤ r₁·r₂. Checked on many random
    shapes, and for the structure (U must not depend on w1b, w2b)."""
    generator = torch.Generator().manual_seed(3)
    shapes = [(7, 5, 2, 2), (4, 9, 3, 1), (6, 6, 1, 3), (3, 3, 2, 3)]
    shapes += [
        tuple(int(v) for v in torch.randint(1, 9, (4,), generator=generator)) for _ in range(60)
    ]
    for case, (m, n, r1, r2) in enumerate(shapes):
        w1a, w1b = random_tensor(m, r1, seed=4 * case), random_tensor(r1, n, seed=4 * case + 1)
        w2a, w2b = random_tensor(m, r2, seed=4 * case + 2), random_tensor(r2, n, seed=4 * case + 3)
        context = f"for m = {m}, n = {n}, r₁ = {r1}, r₂ = {r2}"
        got = call_student(
            "loha_as_one_product", loha_as_one_product, w1a, w1b, w2a, w2b, context=context
        )
        if not (isinstance(got, tuple) and len(got) == 2):
            raise CheckError(f"loha_as_one_product must return (U, V) {context}")
        U, V = got
        require_tensor("loha_as_one_product's U", U, (m, r1 * r2), context)
        require_tensor("loha_as_one_product's V", V, (r1 * r2, n), context)
        want = loha_delta(w1a, w1b, w2a, w2b) if r1 == r2 else (w1a @ w1b) * (w2a @ w2b)
        if not torch.allclose(U @ V, want):
            hint = _loha_product_hint(U, V, w1a, w1b, w2a, w2b)
            raise CheckError(
                f"counterexample {context}: U @ V differs from (w1a @ w1b) * (w2a @ w2b): {hint}"
            )
        other = call_student(
            "loha_as_one_product",
            loha_as_one_product,
            w1a,
            random_tensor(r1, n, seed=999),
            w2a,
            random_tensor(r2, n, seed=998),
            context=context,
        )
        if not (
            isinstance(other, tuple)
            and isinstance(other[0], torch.Tensor)
            and other[0].shape == U.shape
            and torch.allclose(other[0], U)
        ):
            raise CheckError(
                f"U changed when only w1b and w2b changed {context}: factorising the product "
                "afterwards (an SVD, say) proves nothing about the rank in general; build U "
                "from w1a and w2a alone, column (i, j) = w1a[:, i] ⊙ w2a[:, j]"
            )
    passed(
        f"no counterexample in {len(shapes)} random cases: (w1a·w1b) ⊙ (w2a·w2b) = U·V with "
        "r₁·r₂ columns in U, so rank ΔW ≤ r₁·r₂, LoHa's r² bound"
    )


def _rearranged(W: torch.Tensor, a: int, b: int, c: int, d: int) -> torch.Tensor:
    """Van Loan–Pitsianis: row i·b + j of R(W) is block (i, j) of W (c × d), row by row."""
    return W.reshape(a, c, b, d).permute(0, 2, 1, 3).reshape(a * b, c * d)


def check_rearrange(rearrange: Callable[..., torch.Tensor]) -> None:
    """Exercise 3.7 (derive): R(W) with R(X ⊗ Y) = vec(X)·vec(Y)ᵀ, so the nearest Kronecker
    product to W is the best rank-1 approximation of R(W). Checked on random shapes."""
    generator = torch.Generator().manual_seed(9)
    shapes = [(2, 3, 4, 5), (3, 2, 2, 3)]
    shapes += [
        tuple(int(v) for v in torch.randint(1, 6, (4,), generator=generator)) for _ in range(40)
    ]
    for case, (a, b, c, d) in enumerate(shapes):
        X, Y = random_tensor(a, b, seed=100 + case), random_tensor(c, d, seed=200 + case)
        W = torch.kron(X, Y)
        context = f"for W = X ⊗ Y with X {a} × {b} and Y {c} × {d}"
        got = call_student("rearrange", rearrange, W, a, b, c, d, context=context)
        require_tensor("rearrange", got, (a * b, c * d), context)
        want = torch.outer(X.reshape(-1), Y.reshape(-1))  # vec(X)·vec(Y)ᵀ, row-major vec
        if torch.allclose(got, want):
            continue
        if torch.allclose(got, W.reshape(a * b, c * d)):
            hint = (
                "a plain reshape does not cut W into blocks: block (i, j) is "
                "W[i·c:(i+1)·c, j·d:(j+1)·d], and it becomes row i·b + j"
            )
        elif torch.allclose(got, torch.outer(X.T.reshape(-1), Y.reshape(-1))):
            hint = "the blocks go in row-major order: block (i, j) is row i·b + j, not j·a + i"
        elif torch.allclose(got, torch.outer(X.reshape(-1), Y.T.reshape(-1))):
            hint = "flatten each c × d block row by row (Y.reshape(-1)), not column by column"
        else:
            hint = (
                "block (i, j) of X ⊗ Y is X[i, j]·Y, so row i·b + j of R(X ⊗ Y) should be "
                "X[i, j]·vec(Y)ᵀ"
            )
        raise CheckError(f"counterexample {context}: R(W) is not vec(X)·vec(Y)ᵀ: {hint}")
    a, b, c, d = 2, 3, 4, 5
    W = random_tensor(a * c, b * d, seed=300)
    R = call_student("rearrange", rearrange, W, a, b, c, d, context="for a random W")
    if not torch.allclose(R, _rearranged(W, a, b, c, d)):
        raise CheckError(
            "for a W that is not a Kronecker product your R(W) moves entries differently: R "
            "must only rearrange W's entries, block (i, j) into row i·b + j"
        )
    s = torch.linalg.svdvals(R)
    error = float(s[1:].norm() / s.norm())
    passed(
        f"no counterexample in {len(shapes)} random shapes: R(X ⊗ Y) = vec(X)·vec(Y)ᵀ, and R only "
        f"moves entries, so ‖W − X ⊗ Y‖ = ‖R(W) − vec(X)·vec(Y)ᵀ‖. The nearest 2×3 ⊗ 4×5 "
        f"product to a random 8 × 15 W misses it by {error:.0%}"
    )


def mystery_update() -> torch.Tensor:
    """Exercise 3.8 (explore): a 64 × 64 update with a structure to find (float64, ‖W‖ = 8).

    Built as X ⊗ Y, X 2 × 2 random, Y 32 × 32 of rank 3: the split 2 ⊗ 32 holds it with W1
    whole and W2 a rank-3 pair."""
    generator = torch.Generator().manual_seed(303)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    W = torch.kron(randn(2, 2), randn(32, 3) @ randn(3, 32))
    return W / W.norm() * 8


def _nearest_kron(W: torch.Tensor, a: int, b: int) -> tuple[float, int]:
    """(relative error, rank of Y) of the nearest X (a × b) ⊗ Y to W (Van Loan–Pitsianis)."""
    c, d = W.shape[0] // a, W.shape[1] // b
    R = W.reshape(a, c, b, d).permute(0, 2, 1, 3).reshape(a * b, c * d)
    U, S, Vh = torch.linalg.svd(R, full_matrices=False)
    Y = (S[0].sqrt() * Vh[0]).reshape(c, d)
    return float(S[1:].norm() / S.norm()), numerical_rank(Y)


SETTING_KEYS = {"factor", "rank", "decompose_both", "full_matrix"}


def _holds(W: torch.Tensor, setting: dict, cache: dict) -> tuple[bool, str, dict]:
    """Can LyCORIS's LoKr with `setting` hold W exactly? (yes/no, why not, the shapes)."""
    m, n = W.shape
    shapes = adapter_shapes("lokr", m, n, setting["rank"], **_options(setting))
    (a, b), (c, d) = lokr_factors(m, n, setting.get("factor", -1))
    if (a, b) not in cache:
        cache[a, b] = _nearest_kron(W, a, b)
    error, rank_y = cache[a, b]  # the splits that hold W have W1 2 × 2 or 1 × 1: never a pair
    r = setting["rank"]
    if error > 1e-9:
        return (
            False,
            (
                f"with factor = {setting.get('factor', -1)} the split is W1 {a} × {b} ⊗ "
                f"W2 {c} × {d}, and the nearest such Kronecker product misses the update by "
                f"{error:.0%}: no rank helps. Look for the split whose rearranged R(W) has rank 1"
            ),
            shapes,
        )
    if "lokr_w2_a" in shapes and r < rank_y:
        return (
            False,
            (
                f"the split is right, but at r = {r} W2 = lokr_w2_a · lokr_w2_b has rank at most "
                f"{r}, and the W2 this update needs ({c} × {d}) has rank {rank_y}"
            ),
            shapes,
        )
    return True, "", shapes


def _options(setting: dict) -> dict:
    return {k: setting[k] for k in ("factor", "decompose_both", "full_matrix") if k in setting}


def _smallest_exact(W: torch.Tensor, cache: dict) -> tuple[int, dict]:
    """The fewest numbers with which any LyCORIS LoKr setting holds W exactly, and one setting."""
    m = W.shape[0]
    factors = [-1] + [f for f in range(1, m + 1) if m % f == 0]
    best: tuple[int, dict] | None = None
    for factor in factors:
        for rank in range(1, m + 1):
            for decompose_both in (False, True):
                for full_matrix in (False, True):
                    setting = {
                        "factor": factor,
                        "rank": rank,
                        "decompose_both": decompose_both,
                        "full_matrix": full_matrix,
                    }
                    holds, _, shapes = _holds(W, setting, cache)
                    numbers = sum(math.prod(s) for k, s in shapes.items() if k != "alpha")
                    if holds and (best is None or numbers < best[0]):
                        best = (numbers, setting)
    assert best is not None  # factor = 1 with a full W2 always holds W
    return best


def check_smallest_lokr(setting: dict) -> None:
    """Exercise 3.8 (explore): the LyCORIS LoKr setting (factor, rank, and optionally
    decompose_both, full_matrix) with the fewest numbers that holds `mystery_update()` exactly."""
    if setting is None or setting is ...:
        raise not_answered(
            "Exercise 3.8: the smallest LoKr that holds the update: not answered yet (write a "
            "dict such as {'factor': f, 'rank': r})"
        )
    if not (isinstance(setting, dict) and {"factor", "rank"} <= set(setting) <= SETTING_KEYS):
        raise CheckError(
            "write your answer as a dict with the keys 'factor' and 'rank' (and, if you use them, "
            f"'decompose_both' and 'full_matrix'), such as {{'factor': f, 'rank': r}}; got "
            f"{setting!r}"
        )
    if not (_is_int(setting["factor"]) and _is_int(setting["rank"]) and setting["rank"] >= 1):
        raise CheckError(f"factor and rank must be whole numbers, rank ≥ 1; got {setting!r}")
    W, cache = mystery_update(), {}
    try:
        holds, why, shapes = _holds(W, setting, cache)
    except ValueError as error:
        raise CheckError(f"LyCORIS's LoKr refuses {setting!r}: {error}") from error
    if not holds:
        raise CheckError(f"{setting!r} cannot hold the update exactly: {why}")
    numbers = sum(math.prod(s) for k, s in shapes.items() if k != "alpha")
    fewest, _ = _smallest_exact(W, cache)
    stored = {k: v for k, v in shapes.items() if k != "alpha"}
    if numbers > fewest:
        if "lokr_w2" in shapes and not setting.get("full_matrix"):
            hint = (
                "at this rank LyCORIS stores W2 whole (r ≥ max(c, d)/2); a smaller rank keeps "
                "it a low-rank pair"
            )
        elif setting.get("full_matrix"):
            hint = "full_matrix stores both factors whole; a low-rank W2 can be smaller"
        else:
            hint = "W2's pair needs a rank of at least W2's own rank, and no more"
        raise CheckError(
            f"{setting!r} holds the update exactly, with {numbers:,} numbers ({stored}), but "
            f"{fewest:,} are enough: {hint}"
        )
    default_error = _nearest_kron(W, *lokr_factors(*W.shape)[0])[0]
    passed(
        f"{numbers} numbers ({stored}) hold the update exactly, the fewest of any LoKr setting. "
        f"The default split misses it by {default_error:.0%} at any rank, and a LoRA needs rank "
        f"{numerical_rank(W)}: {count_params('lora', *W.shape, numerical_rank(W)):,} numbers"
    )
