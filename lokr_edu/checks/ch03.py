"""Checks for chapter 03's exercises (solutions/03_loha_and_lokr_solutions.ipynb)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lokr_edu.checks.common import CheckError, call_student, passed, random_tensor, require_tensor
from lokr_edu.kron import numerical_rank
from lokr_edu.lowrank import (
    adapter_shapes,
    count_params,
    file_size_bytes,
    loha_delta,
    lokr_delta,
    lokr_factors,
)

__all__ = [
    "check_loha_params",
    "check_loha_delta",
    "check_lokr_factors",
    "check_lokr_delta",
    "check_file_kib",
    "check_w2_full_rank",
    "check_loha_rank_prediction",
    "check_loha_as_one_product",
    "check_rearrange",
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


def check_loha_delta(loha_delta_fn: Callable[..., torch.Tensor]) -> None:
    """Exercise 3.2: ΔW = (α/r)·(w1a·w1b) ⊙ (w2a·w2b)."""
    for case, (m, n, r, alpha) in enumerate([(6, 5, 2, 4.0), (4, 4, 1, 1.0), (8, 3, 3, 1.5)]):
        w1a, w1b = random_tensor(m, r, seed=case), random_tensor(r, n, seed=10 + case)
        w2a, w2b = random_tensor(m, r, seed=20 + case), random_tensor(r, n, seed=30 + case)
        context = f"for m = {m}, n = {n}, r = {r}, α = {alpha}"
        got = call_student("loha_delta", loha_delta_fn, w1a, w1b, w2a, w2b, alpha, context=context)
        require_tensor("loha_delta", got, (m, n), context)
        want = loha_delta(w1a, w1b, w2a, w2b, alpha)
        if torch.allclose(got, want):
            continue
        if torch.allclose(got, (w1a @ w1b) * (w2a @ w2b)):
            hint = "the scale α/r is missing"
        elif torch.allclose(got, (alpha / r) * (w1a @ w1b + w2a @ w2b)):
            hint = "⊙ is the entry-wise product (*), not a sum"
        else:
            hint = "ΔW = (α/r)·(w1a @ w1b) * (w2a @ w2b)"
        raise CheckError(f"loha_delta is wrong {context}: {hint}")
    passed("loha_delta multiplies the two LoRA products entry by entry, scaled by α/r")


def check_lokr_factors(lokr_factors_fn: Callable[[int, int], tuple]) -> None:
    """Exercise 3.3: m = a·c, n = b·d, with W1 = a × b the small factor."""
    for m, n in [(320, 320), (1280, 768), (3072, 768), (10240, 1280), (97, 64)]:
        call = f"lokr_factors({m}, {n})"
        got = call_student("lokr_factors", lokr_factors_fn, m, n, context=f"for {call}")
        want = lokr_factors(m, n)
        if got == want:
            continue
        (a, b), (c, d) = want
        if got == ((c, d), (a, b)):
            hint = "W1 = a × b takes the smaller number of each split"
        elif got == ((a, c), (b, d)):
            hint = "(a, c) split m and (b, d) split n, but W1 is a × b and W2 is c × d"
        else:
            hint = "(a, c) = factorize(m) and (b, d) = factorize(n)"
        raise CheckError(f"{call} returned {got}; expected {want}: {hint}")
    passed("lokr_factors splits both dimensions as LyCORIS does")


LOKR_RULE = (
    "ΔW = scale · kron(w1, W2) with W2 = w2a @ w2b and scale = α/r, r = w2a.shape[1], when W2 "
    "is low-rank, and W2 = w2 with scale exactly 1 (α ignored) when both factors are full"
)


def check_lokr_delta(lokr_delta_fn: Callable[..., torch.Tensor]) -> None:
    """Exercise 3.4: LyCORIS's LoKr with W1 full and W2 low-rank or full, and its scale rule."""
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
            got = lokr_delta_fn(w1, alpha=3.0, **factors)
        except (NotImplementedError, CheckError):
            raise
        except (AttributeError, TypeError) as error:
            if label == "W2 full" and "None" in str(error):
                raise CheckError(
                    f"lokr_delta raised {type(error).__name__} {context}: {error}. With W2 full, "
                    "w2a and w2b are None: test `w2 is not None` first, and then there is no "
                    "rank, so the scale is exactly 1"
                ) from error
            raise CheckError(
                f"lokr_delta raised {type(error).__name__} {context}: {error}"
            ) from error
        except Exception as error:
            raise CheckError(
                f"lokr_delta raised {type(error).__name__} {context}: {error}"
            ) from error
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


def check_file_kib(file_kib: Callable[[int, int, int], float]) -> None:
    """Exercise 3.5: KiB of tensor data in a kohya file: the numbers plus one alpha per layer."""
    for n_params, n_layers, itemsize in [(2_359_296, 264, 4), (267_904, 264, 2), (1_000, 3, 2)]:
        call = f"file_kib({n_params:,}, {n_layers}, {itemsize})"
        got = call_student(
            "file_kib", file_kib, n_params, n_layers, itemsize, context=f"for {call}"
        )
        dtype = torch.float32 if itemsize == 4 else torch.float16
        want = file_size_bytes(n_params, dtype, n_alphas=n_layers) / 1024
        if isinstance(got, int | float) and abs(got - want) < 1e-9:
            continue
        if isinstance(got, int | float) and abs(got - n_params * itemsize / 1024) < 1e-9:
            hint = "each layer also stores its alpha, one number of the same dtype"
        elif isinstance(got, int | float) and abs(got - want * 1024 / 1000) < 1e-9:
            hint = "a KiB is 1024 bytes"
        else:
            hint = "(numbers + layers) · bytes per number / 1024"
        raise CheckError(f"{call} returned {got!r}; expected {want:.3f}: {hint}")
    passed("file_kib counts the numbers and the alphas, in KiB")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_w2_full_rank(prediction: int) -> None:
    """Exercise 3.6 (predict): the smallest rank at which LyCORIS stores W2 of a 320 × 768 layer
    whole (`lokr_w2`) instead of as the pair lokr_w2_a · lokr_w2_b."""
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
    """Exercise 3.7 (predict): the rank of a LoHa ΔW, r = 3, random factors, on a 16 × 16 and a
    6 × 40 layer."""
    r = 3
    want = (_random_loha_rank(16, 16, r, seed=0), _random_loha_rank(6, 40, r, seed=10))
    if not (
        isinstance(prediction, tuple) and len(prediction) == 2 and all(map(_is_int, prediction))
    ):
        raise CheckError(
            f"write your prediction as two whole numbers, (rank on 16 × 16, rank on 6 × 40), "
            f"got {prediction!r}"
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
    """Exercise 3.8 (derive): (w1a·w1b) ⊙ (w2a·w2b) = U·V with U m × r₁r₂ built from w1a, w2a
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
    """Exercise 3.9 (derive): R(W) with R(X ⊗ Y) = vec(X)·vec(Y)ᵀ, so the nearest Kronecker
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
