"""Checks for chapter 03's exercises (solutions/03_loha_and_lokr_solutions.ipynb)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lokr_edu.checks.common import CheckError, call_student, passed, random_tensor, require_tensor
from lokr_edu.lowrank import count_params, file_size_bytes, loha_delta, lokr_delta, lokr_factors

__all__ = [
    "check_loha_params",
    "check_loha_delta",
    "check_lokr_factors",
    "check_lokr_delta",
    "check_file_kib",
]

LAYERS = [(320, 320, 4), (3072, 768, 8), (1280, 5120, 1), (7, 5, 2)]


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


def check_lokr_delta(lokr_delta_fn: Callable[..., torch.Tensor]) -> None:
    """Exercise 3.4: LyCORIS's LoKr with W1 full and W2 low-rank or full, and its scale rule."""
    w1 = random_tensor(4, 3, seed=1)
    w2a, w2b = random_tensor(5, 2, seed=2), random_tensor(2, 6, seed=3)
    w2 = random_tensor(5, 6, seed=4)
    cases = [
        ("W2 low-rank", {"w2a": w2a, "w2b": w2b}, lokr_delta(w1=w1, w2a=w2a, w2b=w2b, alpha=3.0)),
        ("W2 full", {"w2": w2}, lokr_delta(w1=w1, w2=w2, alpha=3.0)),
    ]
    for label, factors, want in cases:
        context = f"with {label}, α = 3"
        got = call_student("lokr_delta", lokr_delta_fn, w1, alpha=3.0, **factors, context=context)
        require_tensor("lokr_delta", got, (20, 18), context + " (ΔW = W1 ⊗ W2 is (4·5) × (3·6))")
        if torch.allclose(got, want):
            continue
        W2 = factors.get("w2", w2a @ w2b)
        scale = 1.0 if label == "W2 full" else 3.0 / 2
        if torch.allclose(got, scale * torch.kron(W2, w1)):
            hint = "the order matters: ΔW = W1 ⊗ W2, with the small factor W1 first"
        elif label == "W2 full" and torch.allclose(got, 1.5 * want):
            hint = "with both factors full there is no rank: LyCORIS uses scale 1 and ignores α"
        elif label == "W2 low-rank" and torch.allclose(got, want / 1.5):
            hint = "with a low-rank factor the scale is α/r, r = w2a.shape[1]"
        else:
            hint = "ΔW = scale · kron(w1, W2), W2 = w2 or w2a @ w2b"
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
