"""Checks for chapter 02's exercises (solutions/02_peft_and_lora_solutions.ipynb)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lokr_edu.checks.common import (
    CheckError,
    call_student,
    passed,
    random_tensor,
    require_tensor,
)
from lokr_edu.lowrank import best_rank_r, count_params, lora_delta, lora_forward

__all__ = ["check_lora_params", "check_lora_delta", "check_lora_forward", "check_best_rank_r"]

LAYERS = [(3072, 768, 32), (768, 768, 4), (320, 1280, 8), (10, 7, 1), (5, 5, 5)]


def check_lora_params(lora_params: Callable[[int, int, int], int]) -> None:
    """Exercise 2.1: the trainable numbers of a rank-r LoRA on a d_out × d_in layer."""
    for d_out, d_in, r in LAYERS:
        call = f"lora_params(d_out={d_out}, d_in={d_in}, r={r})"
        got = call_student("lora_params", lora_params, d_out, d_in, r, context=f"for {call}")
        want = count_params("lora", d_out, d_in, r)
        if got == want:
            continue
        if got == d_out * d_in:
            hint = "that is the full matrix; LoRA stores B (d_out × r) and A (r × d_in)"
        elif got in (r * d_out, r * d_in):
            hint = "count both factors: B is d_out × r and A is r × d_in"
        elif got == want + 1:
            hint = "α is a fixed hyperparameter, not a trainable number (files store it separately)"
        else:
            hint = "B has d_out·r entries and A has r·d_in"
        raise CheckError(f"{call} returned {got}; expected {want}: {hint}")
    passed(f"lora_params is right on {len(LAYERS)} layers, 3072×768 at r = 32 included")


def check_lora_delta(
    lora_delta_fn: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor],
) -> None:
    """Exercise 2.2: ΔW = (α/r)·B·A for A (down, r × d_in) and B (up, d_out × r), called as
    lora_delta(A, B, alpha): the package's order, the order in which the input meets them."""
    for case, (d_out, d_in, r, alpha) in enumerate(
        [(6, 4, 2, 4.0), (3, 5, 1, 1.0), (8, 8, 4, 16.0)]
    ):
        B, A = random_tensor(d_out, r, seed=case), random_tensor(r, d_in, seed=50 + case)
        context = f"for A {r}×{d_in}, B {d_out}×{r}, alpha={alpha}"
        got = call_student("lora_delta", lora_delta_fn, A, B, alpha, context=context)
        require_tensor("lora_delta", got, (d_out, d_in), context + " (ΔW is d_out × d_in)")
        want = lora_delta(A, B, alpha)
        if torch.allclose(got, want):
            continue
        if torch.allclose(got, B @ A):
            hint = "you left out the scale α/r"
        elif torch.allclose(got, alpha * r * (B @ A)):
            hint = "the scale is α divided by r, not α times r"
        elif torch.allclose(got, (r / alpha) * (B @ A)):
            hint = "the scale is α/r, not r/α"
        else:
            hint = "ΔW = (α/r)·B @ A"
        raise CheckError(f"lora_delta is wrong {context}: {hint}")
    passed("lora_delta computes (α/r)·B·A")


def check_lora_forward(
    lora_forward_fn: Callable[..., torch.Tensor],
) -> None:
    """Exercise 2.3: y = x Wᵀ + η·(α/r)·(x Aᵀ) Bᵀ, for one input vector and for a batch."""
    d_out, d_in, r, alpha = 6, 5, 2, 4.0
    W = random_tensor(d_out, d_in, seed=1)
    B, A = random_tensor(d_out, r, seed=2), random_tensor(r, d_in, seed=3)
    for eta in [0.0, 1.0, 0.5, 2.0]:
        for batch in [(), (3,)]:
            x = random_tensor(*batch, d_in, seed=4)
            context = f"for x of shape {tuple(x.shape)} and η = {eta}"
            got = call_student(
                "lora_forward", lora_forward_fn, x, W, A, B, alpha, eta, context=context
            )
            require_tensor("lora_forward", got, (*batch, d_out), context)
            want = lora_forward(x, W, A, B, alpha, strength=eta)
            if torch.allclose(got, want):
                continue
            if eta == 0.0:
                hint = "η = 0 must give the base layer x Wᵀ exactly"
            elif torch.allclose(got, x @ W.T + eta * ((x @ A.T) @ B.T)):
                hint = "the LoRA branch is scaled by η·α/r; the α/r is missing"
            elif torch.allclose(got, x @ W.T + (alpha / r) * ((x @ A.T) @ B.T)):
                hint = "the strength η multiplies the LoRA branch"
            else:
                hint = "y = x @ W.T + η·(α/r)·(x @ A.T) @ B.T"
            raise CheckError(f"lora_forward is wrong {context}: {hint}")
    passed("lora_forward matches the merged weight W + η·(α/r)·B·A for η = 0, 0.5, 1, 2")


def check_best_rank_r(best_rank_r_fn: Callable[[torch.Tensor, int], tuple]) -> None:
    """Exercise 2.4: B (m × r), A (r × n) with B·A the best rank-r approximation of W."""
    for case, (m, n, r) in enumerate([(8, 6, 2), (5, 9, 1), (7, 7, 4), (6, 4, 4)]):
        W = random_tensor(m, n, seed=10 + case)
        context = f"for W {m}×{n} and r = {r}"
        got = call_student("best_rank_r", best_rank_r_fn, W, r, context=context)
        if not (isinstance(got, tuple) and len(got) == 2):
            raise CheckError(
                f"best_rank_r must return a pair (B, A), got {type(got).__name__} {context}"
            )
        B, A = got
        require_tensor("best_rank_r's B", B, (m, r), context)
        require_tensor("best_rank_r's A", A, (r, n), context)
        up, down = best_rank_r(W, r)
        optimum = torch.linalg.norm(W - up @ down)
        error = torch.linalg.norm(W - B @ A)
        if torch.isclose(error, optimum, atol=1e-9):
            continue
        raise CheckError(
            f"best_rank_r is not optimal {context}: ‖W − B·A‖_F = {error:.4f}, but the best "
            f"rank-{r} error is {optimum:.4f} = sqrt(σ_{r + 1}² + …): keep the r largest singular "
            "values and their vectors, B = U[:, :r]·diag(S[:r]), A = Vh[:r] (svd returns Vᵀ)"
        )
    passed("best_rank_r reaches the Eckart–Young optimum on 4 matrices")
