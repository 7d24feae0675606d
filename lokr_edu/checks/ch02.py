"""Checks for chapter 02's exercises (solutions/02_peft_and_lora_solutions.ipynb)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode  # documented in "Extending PyTorch"

from lokr_edu.checks.common import (
    CheckError,
    call_student,
    not_answered,
    passed,
    prediction_pair,
    random_tensor,
    require_tensor,
)
from lokr_edu.lowrank import (
    best_rank_r,
    count_params,
    lora_delta,
    lora_forward,
    lora_forward_flops,
)

__all__ = [
    "check_lora_params",
    "check_lora_delta",
    "check_lora_forward",
    "check_best_rank_r",
    "check_lora_grads",
    "check_break_even_prediction",
    "check_fixed_lora_forward",
]

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
    # the first case tells every mistake apart: α/r = 1.5, α·r = 6, r/α ≈ 0.67, α/d_in = 0.75,
    # α/d_out = 0.5 and no scale (1) all differ
    for case, (d_out, d_in, r, alpha) in enumerate(
        [(6, 4, 2, 3.0), (3, 5, 1, 1.0), (8, 8, 4, 16.0)]
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
        elif torch.allclose(got, (alpha / d_in) * (B @ A)):
            hint = (
                f"you divided by d_in = {d_in}: r is the inner size the factors share, "
                "A.shape[0] (= B.shape[1]), not A.shape[1]"
            )
        elif torch.allclose(got, (alpha / d_out) * (B @ A)):
            hint = (
                f"you divided by d_out = {d_out}: r is the inner size the factors share, "
                "B.shape[1] (= A.shape[0]), not B.shape[0]"
            )
        else:
            hint = "ΔW = (α/r)·B @ A"
        raise CheckError(f"lora_delta is wrong {context}: {hint}")
    passed("lora_delta computes (α/r)·B·A")


def _tensors(value: object) -> list[torch.Tensor]:
    """The tensors in an operation's arguments or results (nested in lists, tuples, dicts)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


class _LayerSizedResults(TorchDispatchMode):
    """Records every torch operation that computes a new d_out × d_in (or d_in × d_out) tensor
    while it is active: B·A, W + B·A and the like. Views of an input (W.T) and plain copies
    (W.T.contiguous(), W.float()) are not computed, and are not recorded."""

    COPIES = (torch.ops.aten.clone, torch.ops.aten._to_copy, torch.ops.aten.copy_)

    def __init__(self, d_out: int, d_in: int) -> None:
        super().__init__()
        self.shapes = {(d_out, d_in), (d_in, d_out)}
        self.found: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in self.COPIES:
            return out
        storages = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
        for t in _tensors(out):
            if (
                t.dim() >= 2
                and tuple(t.shape[-2:]) in self.shapes
                and t.untyped_storage().data_ptr() not in storages  # not a view of an input
            ):
                self.found.append((func.overloadpacket.__name__, tuple(t.shape)))
        return out


def check_lora_forward(
    lora_forward_fn: Callable[..., torch.Tensor],
) -> None:
    """Exercise 2.3: y = x Wᵀ + η·(α/r)·(x Aᵀ) Bᵀ, for one input vector and for a batch, without
    forming B·A: the check watches torch's operations and refuses any that computes a
    d_out × d_in matrix."""
    d_out, d_in, r, alpha = 6, 5, 2, 4.0  # a batch of 3 and r = 2 never make a 6×5 result
    W = random_tensor(d_out, d_in, seed=1)
    B, A = random_tensor(d_out, r, seed=2), random_tensor(r, d_in, seed=3)
    # η = 0.5 first: at η = 1 a forgotten η is invisible, at η = 0 so is a forgotten α/r
    for eta in [0.5, 2.0, 1.0, 0.0]:
        for batch in [(), (3,)]:
            x = random_tensor(*batch, d_in, seed=4)
            context = f"for x of shape {tuple(x.shape)} and η = {eta}"
            watch = _LayerSizedResults(d_out, d_in)
            with watch:
                got = call_student(
                    "lora_forward", lora_forward_fn, x, W, A, B, alpha, eta, context=context
                )
            require_tensor("lora_forward", got, (*batch, d_out), context)
            want = lora_forward(x, W, A, B, alpha, strength=eta)
            if torch.allclose(got, want):
                continue
            branch = (x @ A.T) @ B.T
            if eta == 0.0:  # reached only by answers right at η = 0.5, 2 and 1
                hint = "η = 0 must give the base layer x Wᵀ exactly (0 is a strength, not unset)"
            elif torch.allclose(got, x @ W.T + eta * branch):
                hint = "the LoRA branch is scaled by η·α/r; the α/r is missing"
            elif torch.allclose(got, x @ W.T + (alpha / r) * branch):
                hint = "the strength η multiplies the LoRA branch; it is missing"
            else:
                hint = "y = x @ W.T + η·(α/r)·(x @ A.T) @ B.T"
            raise CheckError(f"lora_forward is wrong {context}: {hint}")
        if watch.found:
            op, shape = watch.found[0]
            raise CheckError(
                f"lora_forward gives the right values but formed a {d_out}×{d_in} matrix, the "
                f"size of W (torch's {op} computed a tensor of shape {shape}) {context}: that is "
                "B·A, or W plus it. On the fly, apply the factors to x one after the other, "
                "(x @ A.T) @ B.T, so that the only intermediate is (..., r)"
            )
    passed(
        "lora_forward matches the merged weight W + η·(α/r)·B·A for η = 0, 0.5, 1, 2, "
        "without forming B·A"
    )


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
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U_r, S_r, V_rows = U[:, :r], S[:r], Vh[:, :r].T  # V_rows: r columns of Vh, as rows
        product = B @ A
        if torch.allclose(product, U_r @ Vh[:r]):
            hint = (
                "B·A has the right singular vectors, but every singular value is 1: the "
                "singular values are missing. Scale U's columns by them, B = U[:, :r] * S[:r], "
                "and keep A = Vh[:r]"
            )
        elif torch.allclose(product, (U_r * S_r) @ V_rows) or torch.allclose(product, U_r @ V_rows):
            missing = "" if torch.allclose(product, (U_r * S_r) @ V_rows) else " (and S is missing)"
            hint = (
                "the right singular vectors are transposed: torch.linalg.svd returns Vh = Vᵀ, "
                "whose rows are the right singular vectors, so A = Vh[:r], not Vh[:, :r].T "
                f"(that is V transposed twice){missing}"
            )
        else:
            hint = (
                "keep the r largest singular values and their vectors, "
                "B = U[:, :r]·diag(S[:r]), A = Vh[:r] (svd returns Vᵀ)"
            )
        raise CheckError(
            f"best_rank_r is not optimal {context}: ‖W − B·A‖_F = {error:.4f}, but the best "
            f"rank-{r} error is {optimum:.4f} = sqrt(σ_{r + 1}² + …): {hint}"
        )
    passed("best_rank_r reaches the Eckart–Young optimum on 4 matrices")


def _lora_grads_reference(x, A, B, alpha, G):
    """(∂L/∂A, ∂L/∂B) by autograd, for L with ∂L/∂y = G and y = x Wᵀ + (α/r)·(x Aᵀ) Bᵀ."""
    A_, B_ = A.clone().requires_grad_(), B.clone().requires_grad_()
    with torch.enable_grad():
        y = (alpha / A.shape[0]) * ((x @ A_.T) @ B_.T)  # x Wᵀ does not depend on A or B
        y.backward(G)
    return A_.grad, B_.grad


def _grad_cases():
    """A first case that tells mistakes apart, the two initialisations, then a random search."""
    yield 7, 5, 4, 2, 6.0, "random"  # α/r = 3 differs from the batch size 7
    yield 4, 6, 5, 2, 4.0, "B = 0"
    yield 4, 6, 5, 2, 4.0, "both 0"
    g = torch.Generator().manual_seed(5)
    for _ in range(30):
        batch, d_out, d_in, r = (int(v) for v in torch.randint(1, 7, (4,), generator=g))
        yield batch, d_out, d_in, r, float(torch.randint(1, 9, (), generator=g)), "random"


def check_lora_grads(lora_grads: Callable[..., tuple]) -> None:
    """Exercise 2.5 (derive): ∂L/∂A and ∂L/∂B of a LoRA branch by hand, checked against
    autograd on many shapes, and what they are at B = 0 and at A = B = 0."""
    norms = {}
    for case, (batch, d_out, d_in, r, alpha, init) in enumerate(_grad_cases()):
        x, G = random_tensor(batch, d_in, seed=700 + case), random_tensor(batch, d_out, seed=800)
        A, B = random_tensor(r, d_in, seed=900 + case), random_tensor(d_out, r, seed=1000 + case)
        if init != "random":
            B = torch.zeros_like(B)
        if init == "both 0":
            A = torch.zeros_like(A)
        context = f"for x {batch}×{d_in}, A {r}×{d_in}, B {d_out}×{r}, α = {alpha:g} ({init})"
        with torch.no_grad():  # by hand: autograd is not available inside
            got = call_student(
                "lora_grads",
                lora_grads,
                *(x, A, B, alpha, G),
                context=context + " (autograd is off inside the check: derive them by hand)",
            )
        if not (isinstance(got, tuple) and len(got) == 2):
            raise CheckError(
                "lora_grads must return a pair (grad_A, grad_B), "
                f"got {type(got).__name__} {context}"
            )
        grad_A, grad_B = got
        if (
            isinstance(grad_A, torch.Tensor)
            and isinstance(grad_B, torch.Tensor)
            and (d_out, d_in) != (r, r)
            and tuple(grad_A.shape) == (d_out, r)
            and tuple(grad_B.shape) == (r, d_in)
        ):
            raise CheckError(f"return (grad_A, grad_B), the down factor's first, {context}")
        require_tensor("lora_grads's grad_A", grad_A, (r, d_in), context + " (shaped like A)")
        require_tensor("lora_grads's grad_B", grad_B, (d_out, r), context + " (shaped like B)")
        want_A, want_B = _lora_grads_reference(x, A, B, alpha, G)
        norms[init] = (want_A.norm().item(), want_B.norm().item())
        ok_A, ok_B = torch.allclose(grad_A, want_A), torch.allclose(grad_B, want_B)
        if ok_A and ok_B:
            continue
        s = alpha / r
        wrong = "grad_A" if not ok_A else "grad_B"
        got_w, want_w = (grad_A, want_A) if not ok_A else (grad_B, want_B)
        if torch.allclose(got_w * s, want_w):
            hint = "the branch is scaled by α/r, so both gradients carry α/r too"
        elif torch.allclose(got_w * batch, want_w) and batch > 1:
            hint = "sum over the batch rows, do not average (G already holds the loss's 1/N)"
        elif not ok_A:
            hint = (
                "with H = x Aᵀ, the branch is (α/r)·H Bᵀ, so ∂L/∂H = (α/r)·G B, and H = x Aᵀ "
                "gives ∂L/∂A = (∂L/∂H)ᵀ x"
            )
        else:
            hint = "with H = x Aᵀ, the branch is (α/r)·H Bᵀ, so ∂L/∂B = (α/r)·Gᵀ H"
        raise CheckError(
            f"{wrong} is wrong {context}: largest error {(got_w - want_w).abs().max():.3g}; {hint}"
        )
    passed(
        "lora_grads matches autograd on 33 cases. At B = 0: ‖∂L/∂A‖ = "
        f"{norms['B = 0'][0]:.0f}, ‖∂L/∂B‖ = {norms['B = 0'][1]:.2f}; at A = B = 0 both are "
        f"{norms['both 0'][0]:.0f}: each factor's gradient goes through the other factor"
    )


BREAK_EVEN_LAYER = (1280, 1280)
BREAK_EVEN_RANKS = (4, 64)


def on_the_fly_extra(d_out: int, d_in: int, r: int) -> int:
    """FLOPs on the fly adds per token: the two small products, 2·r·(d_in + d_out), and d_out
    additions to put the branch into x·Wᵀ (chapter 02, section 6)."""
    flops = lora_forward_flops(d_out, d_in, r, tokens=1)
    return flops["on_the_fly_per_token"] - flops["fused_per_token"] + d_out


def break_even_tokens(d_out: int, d_in: int, r: int) -> float:
    """Tokens at which merging once, 2·d_out·r·d_in + d_out·d_in FLOPs, costs as much as the
    on-the-fly overhead, 2·r·(d_in + d_out) + d_out FLOPs per token."""
    merge = lora_forward_flops(d_out, d_in, r, tokens=1)["fused_merge"]
    return merge / on_the_fly_extra(d_out, d_in, r)


def check_break_even_prediction(prediction: object) -> None:
    """Exercise 2.6 (predict): the break-even token counts of fused and on-the-fly LoRA on a
    1280 × 1280 layer at r = 4 and r = 64, each right within 25%."""
    values = prediction if isinstance(prediction, tuple | list) else (prediction,)
    if any(v is None or v is Ellipsis for v in values):
        raise not_answered(
            "Exercise 2.6: predict the break-even token counts at r = 4 and r = 64: "
            "not answered yet (write your two predictions)"
        )
    prediction = prediction_pair(
        prediction,
        lambda v: isinstance(v, int | float) and not isinstance(v, bool) and v > 0,
        "a pair of positive numbers, (tokens at r = 4, tokens at r = 64)",
    )
    d_out, d_in = BREAK_EVEN_LAYER
    truth = tuple(break_even_tokens(d_out, d_in, r) for r in BREAK_EVEN_RANKS)
    explain = "; ".join(
        f"r = {r}: merge {lora_forward_flops(d_out, d_in, r, tokens=1)['fused_merge']:,} FLOPs / "
        f"{on_the_fly_extra(d_out, d_in, r):,} extra per token = {t:,.0f} tokens"
        for r, t in zip(BREAK_EVEN_RANKS, truth, strict=True)
    )
    ratios = [p / t for p, t in zip(prediction, truth, strict=True)]
    if all(0.75 <= q <= 1.25 for q in ratios):
        passed(f"within 25% at both ranks. {explain}: r cancels, T ≈ d_out·d_in/(d_out + d_in)")
        return
    if prediction[1] / prediction[0] > 2 or prediction[0] / prediction[1] > 2:
        hint = (
            "you expected the break-even to move with r, but both the merge (2·d_out·r·d_in, "
            "plus d_out·d_in additions) and the per-token overhead (2·r·(d_out + d_in), plus "
            "d_out additions) grow linearly in r, so r nearly cancels"
        )
    elif all(1.6 <= q <= 2.5 for q in ratios) or all(0.4 <= q <= 0.625 for q in ratios):
        hint = "off by about 2: count a multiply-add as 2 FLOPs on both sides, or on neither"
    else:
        hint = "the break-even is the merge's cost divided by the on-the-fly overhead per token"
    raise CheckError(
        f"you predicted {prediction[0]:,} and {prediction[1]:,} tokens; the truth is "
        f"{truth[0]:,.0f} and {truth[1]:,.0f} ({explain}): {hint}"
    )


def check_fixed_lora_forward(fixed: Callable[..., torch.Tensor]) -> None:
    """Exercise 2.7 (debug): y = x Wᵀ + (α/r)·(x Aᵀ) Bᵀ; says which bug is still there."""
    cases = [(6, 6, 2, 8.0, ()), (6, 6, 2, 8.0, (3,)), (5, 7, 3, 6.0, (4,)), (9, 4, 1, 1.5, ())]
    for case, (d_out, d_in, r, alpha, batch) in enumerate(cases):
        W = random_tensor(d_out, d_in, seed=1100 + case)
        B, A = random_tensor(d_out, r, seed=1200 + case), random_tensor(r, d_in, seed=1300 + case)
        x = random_tensor(*batch, d_in, seed=1400 + case)
        square = "" if d_out == d_in else ", not square: a transposed factor no longer fits"
        context = f"for a {d_out}×{d_in} layer{square}, r = {r}, α = {alpha:g}, x {tuple(x.shape)}"
        got = call_student("fixed_lora_forward", fixed, x, W, A, B, alpha, context=context)
        require_tensor("fixed_lora_forward", got, (*batch, d_out), context)
        base, D, s = x @ W.T, B @ A, alpha / r
        if torch.allclose(got, base + s * (x @ D.T)):
            continue
        candidates = [
            (base + (1 / s) * (x @ D) if d_out == d_in else None, "both bugs are still there"),
            (
                base + s * (x @ D) if d_out == d_in else None,
                "the update is still applied "
                "transposed: (x @ B) @ A is x·(B·A), but a layer computes x·Wᵀ, so the branch is "
                "x·(B·A)ᵀ = (x @ A.T) @ B.T",
            ),
            (
                base + (1 / s) * (x @ D.T),
                "the orientation is fixed, but the scale is still r/α; LoRA scales by α/r",
            ),
            (base + x @ D.T, "the scale is now missing: the branch is multiplied by α/r"),
            (s * (x @ D.T), "the base layer x @ W.T is missing"),
        ]
        matching = [h for c, h in candidates if c is not None and torch.allclose(got, c)]
        hint = matching[0] if matching else "y = x @ W.T + (α/r)·(x @ A.T) @ B.T"
        raise CheckError(f"fixed_lora_forward is still wrong {context}: {hint}")
    passed("fixed_lora_forward is right on square and non-square layers, one vector and batches")
