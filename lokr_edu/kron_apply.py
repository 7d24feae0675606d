"""Applying a LoKr update ΔW = s·(W1 ⊗ W2) to inputs without ever building W1 ⊗ W2.

Defined in chapter 04 (notebooks/04_adapter_from_scratch.ipynb, section 9), from chapter 01's
vec trick. With W1 (a × b), W2 (c × d), m = a·c outputs and n = b·d inputs, and torch's row-major
flattening, each input vector x (n) is a matrix X (b × d) and

    (W1 ⊗ W2)·x = flatten(W1 · X · W2ᵀ)                               (a × c, flattened to m)

For N input vectors this is two matrix products over all of them at once, (N·b × d)(d × c) and
(a × b)(b × N·c): 2·N·b·c·(d + a) FLOPs, against 2·N·m·n for a dense ΔW plus m·n to build it.
A convolution splits the same way over input-channel groups: ΔW's block (i, j) is W1[i, j]·W2, so
conv(x, ΔW) convolves each group of d input channels with W2, then mixes groups with W1.

`lokr_apply(..., mode="auto")` picks the cheaper of "reshape" and "materialize" with `choose_mode`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MODES", "lokr_costs", "choose_mode", "lokr_apply"]

MODES = ("auto", "reshape", "materialize")
# The cost model's exchange rates, rough CPU figures: moving a byte costs about as much time as
# 8 FLOPs, and launching one kernel as much as 200,000 (a few microseconds).
BYTES_PER_FLOP = 8
FLOPS_PER_KERNEL = 200_000


def lokr_costs(
    a: int, b: int, c: int, d: int, vectors: int, kernel: int = 1, itemsize: int = 4
) -> dict[str, dict[str, int]]:
    """FLOPs, bytes moved and kernels launched of the two ways to apply s·(W1 ⊗ W2).

    vectors: tokens for a Linear, batch·H_out·W_out for a Conv2d (kernel = kh·kw).
    materialize: build ΔW (m·n·kernel), then one dense product; reshape: two products plus the
    two transposed copies of the input and intermediate (forward only; backward is ≈ 2× both).
    """
    for name, value in {
        "a": a,
        "b": b,
        "c": c,
        "d": d,
        "vectors": vectors,
        "kernel": kernel,
    }.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    m, n = a * c, b * d
    return {
        "materialize": {
            "flops": m * n * kernel + 2 * vectors * m * n * kernel,
            "bytes": itemsize * (2 * m * n * kernel + vectors * (n * kernel + m)),
            "kernels": 2,  # kron, then one product
        },
        "reshape": {
            "flops": 2 * vectors * (b * c * d * kernel + a * b * c),
            "bytes": itemsize * vectors * (n * kernel + 2 * b * c + 2 * m),
            "kernels": 4,  # two products, two transposed copies
        },
    }


def choose_mode(a: int, b: int, c: int, d: int, vectors: int, kernel: int = 1) -> str:
    """ "reshape" or "materialize", whichever the cost model says is cheaper."""
    costs = lokr_costs(a, b, c, d, vectors, kernel)
    total = {
        k: v["flops"] + BYTES_PER_FLOP * v["bytes"] + FLOPS_PER_KERNEL * v["kernels"]
        for k, v in costs.items()
    }
    return "reshape" if total["reshape"] <= total["materialize"] else "materialize"


def _linear_reshape(x: Tensor, W1: Tensor, W2: Tensor) -> Tensor:
    """(W1 ⊗ W2) applied to the last axis of x (..., b·d) -> (..., a·c), as two large products.

    X_n is x_n viewed as b × d. First every row of every X_n meets W2 in one product (a view, no
    copy); then one transposed copy lines up the b axis so that W1 meets all N·c columns at once.
    """
    (a, b), (c, d) = W1.shape, W2.shape
    lead = x.shape[:-1]
    N = math.prod(lead)
    Z = x.reshape(N * b, d) @ W2.T  # (N·b, d)(d, c) -> (N·b, c): rows (n, j), columns k
    Z = Z.reshape(N, b, c).transpose(0, 1).reshape(b, N * c)  # one copy: (b, N·c)
    Y = W1 @ Z  # (a, b)(b, N·c) -> (a, N·c)
    return Y.reshape(a, N, c).transpose(0, 1).reshape(*lead, a * c)  # (N, a, c): index i·c + k


class _KronLinear(torch.autograd.Function):
    """y = (W1 ⊗ W2)·x with a hand-written backward that keeps only x, W1, W2 for it.

    Autograd through `_linear_reshape` would also keep the (b, N·c) intermediate, as large as
    the input; here backward recomputes it. With G_n the output gradient of vector n as a × c:
        H_n = W1ᵀ G_n (b × c),  ∂x_n = H_n W2,  ∂W2 = Σ_n H_nᵀ X_n,  ∂W1 = Σ_n G_n (X_n W2ᵀ)ᵀ
    each sum a single product over all N vectors.
    """

    @staticmethod
    def forward(ctx, x: Tensor, W1: Tensor, W2: Tensor) -> Tensor:
        ctx.save_for_backward(x, W1, W2)
        return _linear_reshape(x, W1, W2)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x, W1, W2 = ctx.saved_tensors
        (a, b), (c, d) = W1.shape, W2.shape
        N = grad.numel() // (a * c)
        G = grad.reshape(N, a, c).transpose(0, 1).reshape(a, N * c)  # (a, N·c)
        H = (W1.T @ G).reshape(b, N, c).transpose(0, 1).reshape(N * b, c)  # (N·b, c)
        X = x.reshape(N * b, d)  # (N·b, d), a view
        grad_x = (H @ W2).reshape(x.shape)  # (N·b, d)
        grad_W2 = H.T @ X  # (c, d)
        P = (X @ W2.T).reshape(N, b, c).transpose(0, 1).reshape(b, N * c)  # X_n W2ᵀ, (b, N·c)
        grad_W1 = G @ P.T  # (a, b)
        return grad_x, grad_W1, grad_W2


def _conv_reshape(x: Tensor, W1: Tensor, W2: Tensor, stride, padding, dilation) -> Tensor:
    """conv2d(x, W1 ⊗ W2): convolve each group of d input channels with W2 (c, d, kh, kw) as one
    batch, then mix the b groups with W1 (a × b)."""
    a, b = W1.shape
    c, d = W2.shape[:2]
    B, _, H, W = x.shape
    groups = F.conv2d(
        x.reshape(B * b, d, H, W), W2, None, stride, padding, dilation
    )  # (B·b, c, H', W')
    H2, W2_ = groups.shape[-2:]
    mixed = W1 @ groups.reshape(B, b, c * H2 * W2_)  # (a, b) @ (B, b, c·H'·W') -> (B, a, c·H'·W')
    return mixed.reshape(B, a * c, H2, W2_)


def lokr_apply(
    x: Tensor,
    W1: Tensor,
    W2: Tensor,
    scale: float,
    conv: dict[str, object] | None = None,
    mode: str = "auto",
) -> Tensor:
    """scale·(W1 ⊗ W2) applied to x: a Linear's input (..., n) when conv is None, else a
    Conv2d's input (B, n, H, W) with conv = {"stride", "padding", "dilation"} and W2 4-D
    (c, d, kh, kw). mode "reshape" never builds W1 ⊗ W2; "materialize" does; "auto" asks
    `choose_mode`. Autograd flows through both paths."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if W1.dim() != 2:
        raise ValueError(f"W1 must be a 2-D matrix, got shape {tuple(W1.shape)}")
    a, b = W1.shape
    c, d = W2.shape[:2]
    kernel = math.prod(W2.shape[2:]) if conv is not None else 1
    if conv is None and (W2.dim() != 2 or x.shape[-1] != b * d):
        raise ValueError(
            f"x must end in n = b·d = {b * d} features for W2 {tuple(W2.shape)}, "
            f"got {tuple(x.shape)}"
        )
    if conv is not None and (W2.dim() != 4 or x.dim() != 4 or x.shape[1] != b * d):
        raise ValueError(
            f"x must be (B, b·d = {b * d}, H, W) with a 4-D W2, "
            f"got x {tuple(x.shape)}, W2 {tuple(W2.shape)}"
        )
    if mode == "auto":
        vectors = math.prod(x.shape[:-1]) if conv is None else x.shape[0] * x.shape[2] * x.shape[3]
        mode = choose_mode(a, b, c, d, vectors, kernel)
    W1, W2 = W1.to(x.dtype), W2.to(x.dtype)
    if mode == "materialize":
        delta = torch.kron(W1.reshape(a, b, *[1] * (W2.dim() - 2)), W2)  # (a·c, b·d[, kh, kw])
        if conv is None:
            return F.linear(x, delta) * scale
        return F.conv2d(x, delta, None, **conv) * scale
    if conv is None:
        return _KronLinear.apply(x, W1, W2 * scale)
    return _conv_reshape(x, W1, W2 * scale, **conv)
