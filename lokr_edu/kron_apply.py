"""Applying a LoKr update ΔW = s·(W1 ⊗ W2) to inputs without ever building W1 ⊗ W2.

Defined in chapter 04 (notebooks/04_adapter_from_scratch.ipynb, the section on the reshape path),
from chapter 01's vec trick (`lokr_edu.kron.kron_matvec`). With W1 (a × b), W2 (c × d),
m = a·c outputs, n = b·d inputs and torch's row-major flattening, an input vector x (n) is a
matrix X (b × d) and

    (W1 ⊗ W2)·x = flatten(W1 · X · W2ᵀ)                                (a × c, flattened to m)

`kron_matvec` evaluates this with one small product per vector. Here the N input vectors of a
layer go through two *large* products instead: X·W2ᵀ for all of them at once (rows (vector, j)),
then W1 against all (vector, k) columns at once; one transposed copy in between lines up the
axis j that W1 contracts. That is 2·N·b·c·(d + a) FLOPs, against 2·N·m·n for a dense ΔW plus
m·n to build it.

When W2 is low-rank, W2 = A·B with A (c × r) and B (r × d) (LyCORIS's default layout), the
mixed-product rule splits the Kronecker product once more,

    W1 ⊗ (A·B) = (I_a ⊗ A)·(W1 ⊗ B)

so the same two products run with B in place of W2, on r-column intermediates, and a third
product applies A: 2·N·r·(b·d + a·b + a·c) FLOPs, and W2 is never formed either.

The vectors go through in chunks of a few MB, so the intermediates stay in cache and the only
full-size tensors are the output (and in backward, the input's gradient).

A convolution splits the same way: ΔW's block (i, j) is W1[i, j]·W2, so conv(x, ΔW) convolves
each group of d input channels with W2 (c, d, kh, kw) and then mixes the b groups with W1.

The reshape path is purely a speed and memory optimisation of `kron_matvec`: it computes the
same numbers, to rounding, and the tests hold it to that. `lokr_apply(..., mode="auto")` takes it
for every layer but tiny ones (`auto_mode`, a fixed rule); mode="reshape" or "materialize"
forces one. The cost model (`lokr_costs`, `lokr_seconds`, `choose_mode`) is chapter 04's
material: it explains where that rule draws its line, and the rates it assumes are a CPU's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lokr_edu.kron import kron_matvec_cost
from lokr_edu.validate import require_int

__all__ = [
    "MODES",
    "lokr_costs",
    "lokr_seconds",
    "choose_mode",
    "auto_mode",
    "compute_dtype",
    "kron_linear",
    "lokr_apply",
]

MODES = ("auto", "reshape", "materialize")

# The cost model's machine: rough figures for a laptop/server CPU core pair running fp32.
# Dense products reach about 1e11 FLOP/s, streaming through memory (including the first touch
# of a fresh page) about 1e10 bytes/s, and each op launched from Python costs about 10 µs.
FLOPS_PER_SECOND = 1e11
BYTES_PER_SECOND = 1e10
SECONDS_PER_KERNEL = 1e-5
# Vectors go through the reshape path in chunks of about this many elements of input, output or
# intermediate (4 MiB of fp32): small enough to stay in cache and to be recycled by malloc
# instead of being mapped fresh from the OS (page faults) at every step, large enough that each
# product runs at full speed and there are few kernel launches.
CHUNK_ELEMENTS = 1 << 20
MIN_CHUNK = 256  # vectors: below this, launching kernels costs more than the chunk's work
# `auto_mode`: a ΔW of at most this many elements is built (a 128 × 128 layer); the cost model
# puts the switch there for every number of vectors (chapter 04).
SMALL_DELTA = 128 * 128


def _chunk(vectors: int, width: int) -> int:
    """How many vectors go through at once when each needs `width` elements per intermediate:
    at most CHUNK_ELEMENTS per intermediate and an eighth of the vectors (so the intermediates
    stay small next to the layer's own input and output), at least MIN_CHUNK vectors."""
    step = min(CHUNK_ELEMENTS // max(1, width), -(-vectors // 8))
    return min(vectors, max(MIN_CHUNK, step))


def _width(a: int, b: int, c: int, dk: int, rank: int | None) -> int:
    """Elements per vector of the largest tensor a chunk handles: its input (b·dk), its output
    (a·c) or an intermediate (c·max(a, b, dk), or r·max(a, b) when a rank-r W2 is applied as
    B first: rank not None). Chunks sized by it keep the input's chunk in cache for its second
    read."""
    inner = c * max(a, b, dk) if rank is None else rank * max(a, b)
    return max(inner, b * dk, a * c)


def _low_rank_first(a: int, b: int, c: int, dk: int, rank: int | None) -> bool:
    """Whether W2 = A·B (rank r) is cheaper applied as (I ⊗ A)(W1 ⊗ B) than formed first:
    r·(b·dk + a·b + a·c) against b·c·(dk + a) multiply-adds per vector."""
    return rank is not None and rank * (b * dk + a * b + a * c) < b * c * (dk + a)


def lokr_costs(
    a: int,
    b: int,
    c: int,
    d: int,
    vectors: int,
    kernel: int = 1,
    *,
    backward: bool = False,
    rank: int | None = None,
    itemsize: int = 4,
) -> dict[str, dict[str, int]]:
    """FLOPs, bytes moved and kernels launched by the two ways to apply s·(W1 ⊗ W2).

    W1 is a × b, W2 is c × d (× kernel = kh·kw for a Conv2d); rank: W2 = A·B has rank r.
    vectors: tokens for a Linear, batch·H_out·W_out for a Conv2d. With N = vectors,
    inp = N·b·d·kernel and out = N·a·c elements, the forward pass costs (FLOPs as in
    chapter 01's `kron_matvec_cost`):

        materialize: build ΔW (m·n·kernel), then one dense product 2·N·m·n·kernel;
                     reads inp and ΔW, writes out
        reshape:     2·N·b·c·(d·kernel + a) in two products (or, for a low-rank W2 where that is
                     fewer, 2·N·r·(b·d·kernel + a·b + a·c) in three); reads inp, writes out and
                     passes over cache-sized intermediates

    backward=True adds the backward pass: dense, two more products of the size of the forward one
    (the input's and ΔW's gradients) and ΔW's gradient folded back onto W1 and W2; reshaped, the
    gradients of every factor and of the input, recomputing the intermediates instead of keeping
    them (so only x and the factors are saved). Defined in chapter 04.
    """
    # counted by hand because chapter 04 teaches it; tests hold it to torch's FlopCounterMode
    sizes = {"a": a, "b": b, "c": c, "d": d, "vectors": vectors, "kernel": kernel}
    for name, value in sizes.items():
        require_int(name, value)
    if rank is not None:
        require_int("rank", rank)
    N, dk = vectors, d * kernel  # dk: what W2 contracts per group, d channels × the window
    dense = kron_matvec_cost(a, b, c, dk, batch=N)
    delta = dense["materialized_elements"]  # m·n·kernel
    inp, out = N * b * dk, N * a * c
    low_rank = _low_rank_first(a, b, c, dk, rank)
    if low_rank:
        mid = N * rank * (a + b)  # P = X·Bᵀ and W1·P, r columns each
        flops = 2 * N * rank * (b * dk + a * b + a * c)
        flops_back = 2 * N * rank * (3 * b * dk + 3 * a * b + 2 * a * c)
        kernels, kernels_back = 5, 10
    else:
        mid = 2 * N * b * c  # X·W2ᵀ and its transposed copy
        flops = dense["vec_trick_flops"]  # 2·N·b·c·(dk + a)
        flops_back = 2 * N * b * c * (3 * dk + 2 * a)
        kernels, kernels_back = 4, 8
    chunks = math.ceil(N / _chunk(N, _width(a, b, c, dk, rank if low_rank else None)))
    costs = {
        "materialize": {
            "flops": dense["materialized_flops"],
            "bytes": itemsize * (2 * delta + inp + out),
            "kernels": 3,  # W2·scale, kron, one product
        },
        "reshape": {
            "flops": flops,
            "bytes": itemsize * (inp + out + 2 * mid),
            "kernels": 1 + kernels * chunks,
        },
    }
    if backward:
        costs["materialize"]["flops"] += 4 * N * a * c * b * dk + 2 * delta
        costs["materialize"]["bytes"] += itemsize * (2 * inp + 2 * out + 5 * delta)
        costs["materialize"]["kernels"] += 8
        costs["reshape"]["flops"] += flops_back
        costs["reshape"]["bytes"] += itemsize * (3 * inp + 2 * out + 4 * mid)
        costs["reshape"]["kernels"] += 3 + kernels_back * chunks
    return costs


def lokr_seconds(costs: dict[str, int]) -> float:
    """One path's estimated time: FLOPs, bytes and kernel launches at the model's rates.

    seconds = flops / FLOPS_PER_SECOND + bytes / BYTES_PER_SECOND + kernels · SECONDS_PER_KERNEL.
    Defined in chapter 04.
    """
    return (
        costs["flops"] / FLOPS_PER_SECOND
        + costs["bytes"] / BYTES_PER_SECOND
        + costs["kernels"] * SECONDS_PER_KERNEL
    )


def choose_mode(
    a: int,
    b: int,
    c: int,
    d: int,
    vectors: int,
    kernel: int = 1,
    *,
    backward: bool = False,
    rank: int | None = None,
) -> str:
    """ "reshape" or "materialize", whichever `lokr_costs` estimates to be faster.

    Training (backward=True) counts forward and backward; inference only the forward. Small
    layers (a few thousand weights) favour "materialize", where the dozen kernel launches of the
    reshape path cost more than one dense product; SD1.5's layers favour "reshape" from one
    token on. Defined in chapter 04.
    """
    costs = lokr_costs(a, b, c, d, vectors, kernel, backward=backward, rank=rank)
    return min(("reshape", "materialize"), key=lambda mode: lokr_seconds(costs[mode]))


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a layer's products run in for input x: under autocast (torch.autocast on x's
    device) the autocast dtype, fp16 or bf16, which is what F.linear would use; else x's dtype.

    The reshape path writes into buffers it allocates (`torch.mm(..., out=...)`), so its inputs
    must all share this dtype before it starts, rather than letting autocast pick per product.
    A device without autocast (PyTorch's `meta`, which the tests use to catch tensors made on
    the wrong device) has no autocast dtype: x's own.
    """
    device = x.device.type
    if not torch.amp.is_autocast_available(device):
        return x.dtype
    if x.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def auto_mode(a: int, b: int, c: int, d: int, kernel: int = 1) -> str:
    """The path `lokr_apply(mode="auto")` takes for W1 (a × b) ⊗ W2 (c × d × kernel, kernel =
    kh·kw for a Conv2d): "materialize" when ΔW has at most SMALL_DELTA = 128² elements, or when
    the reshape path saves no FLOPs (a·d ≤ a + d: a factor of width 1, or both 2); "reshape"
    otherwise.

    Per vector, reshape does a·d/(a + d) times fewer FLOPs than a dense ΔW and keeps nothing of
    ΔW's size for backward; for a tiny ΔW, building it takes microseconds and the reshape
    path's dozen kernel launches cost more. The cost model (`lokr_costs`, `choose_mode`,
    chapter 04) draws the line at about a 128 × 128 layer, whatever the number of vectors, and
    every SD1.5 layer is far above it: the rule keeps its verdict without evaluating the model at
    every call. Either way the result is the same, to rounding.
    """
    small = a * b * c * d * kernel <= SMALL_DELTA
    return "materialize" if small or a * d <= a + d else "reshape"


def _swap_rows(t: Tensor, p: int, q: int) -> Tensor:
    """t (p·q, w) with rows indexed (i, j) -> a copy with rows indexed (j, i), (q·p, w).

    With p = vectors and q = groups this turns rows (v, j) into group-major rows (j, v)."""
    return t.view(p, q, -1).transpose(0, 1).reshape(q * p, -1)


class _KronLinear(torch.autograd.Function):
    """y = (W1 ⊗ W2)·x on the last axis of x, in chunks of vectors; never builds W1 ⊗ W2.

    W2 is A (c × d) when B is None, else A·B with A (c × r) and B (r × d). For one chunk of
    vectors X_v (b × d), G_v the output gradient as a (a × c) matrix:

    full W2:   Z_v = X_v W2ᵀ,  Y_v = W1 Z_v;          with H_v = W1ᵀ G_v (b × c):
               ∂x_v = H_v W2,  ∂W2 = Σ_v H_vᵀ X_v,  ∂W1 = Σ_v G_v Z_vᵀ
    W2 = A·B:  P_v = X_v Bᵀ,  M_v = W1 P_v,  Y_v = M_v Aᵀ;   with U_v = G_v A (a × r):
               ∂A = Σ_v G_vᵀ M_v,  ∂W1 = Σ_v U_v P_vᵀ,  and with K_v = W1ᵀ U_v (b × r):
               ∂x_v = K_v B,  ∂B = Σ_v K_vᵀ X_v

    Each line is one product over the whole chunk, the v's stacked along rows or columns. W1
    contracts the group axis j, which sits between v and the columns, so its operand is first
    copied into group-major order (rows (j, v)) and back (`_swap_rows`); for a low-rank W2 those
    copies have r columns. Only x and the factors are kept; backward recomputes Z or P and M.
    """

    @staticmethod
    def forward(ctx, x: Tensor, W1: Tensor, A: Tensor, B: Tensor | None) -> Tensor:
        (a, b), c = W1.shape, A.shape[0]
        d = A.shape[1] if B is None else B.shape[1]
        N = x.numel() // (b * d)
        X = x.reshape(N, b, d)
        y = x.new_empty(*x.shape[:-1], a * c)  # not a view: autograd may accumulate into it
        Y = y.view(N, a, c)
        step = _chunk(N, _width(a, b, c, d, None if B is None else B.shape[0]))
        for start in range(0, N, step):
            n = min(N, start + step) - start
            Xs = X[start : start + n].reshape(n * b, d)  # (n·b, d): rows (v, j)
            if B is None:
                Zt = _swap_rows(Xs @ A.T, n, b).view(b, n * c)  # (n·b, c) -> (b, n·c): rows j
                Yt = W1 @ Zt  # (a, b)(b, n·c) -> (a, n·c): columns (v, k)
                del Zt
                Y[start : start + n] = Yt.view(a, n, c).transpose(0, 1)  # (n, a, c)
                del Yt
            else:
                Pt = _swap_rows(Xs @ B.T, n, b).view(b, -1)  # (n·b, r) -> (b, n·r): rows j
                Mv = _swap_rows((W1 @ Pt).view(a * n, -1), a, n)  # (a, n·r) -> (n·a, r)
                del Pt
                torch.mm(Mv, A.T, out=Y[start : start + n].view(n * a, c))  # (n·a, c)
                del Mv
        ctx.save_for_backward(x, W1, A, B)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, W1, A, B = ctx.saved_tensors
        need_x, need_W1, need_A, need_B = ctx.needs_input_grad
        (a, b), c = W1.shape, A.shape[0]
        d = A.shape[1] if B is None else B.shape[1]
        N = x.numel() // (b * d)
        X = x.reshape(N, b, d)
        G = grad.reshape(N, a, c)
        # grad_x is allocated in x's shape, not viewed into it: autograd then adds the other
        # branch's gradient of x (the frozen base layer's) into it in place
        grad_x = x.new_empty(x.shape) if need_x else None
        GX = grad_x.view(N, b, d) if need_x else None
        grad_W1 = torch.zeros_like(W1) if need_W1 else None
        grad_A = torch.zeros_like(A) if need_A else None
        grad_B = torch.zeros_like(B) if need_B else None
        step = _chunk(N, _width(a, b, c, d, None if B is None else B.shape[0]))
        for start in range(0, N, step):
            n = min(N, start + step) - start
            Xs = X[start : start + n].reshape(n * b, d)  # (n·b, d): rows (v, j)
            out = GX[start : start + n].view(n * b, d) if need_x else None
            if B is None:
                Gt = G[start : start + n].transpose(0, 1).reshape(a, n * c)  # copy: (a, n·c)
                if need_W1:  # Z recomputed, group-major
                    grad_W1.addmm_(Gt, _swap_rows(Xs @ A.T, n, b).view(b, n * c).T)
                if need_x or need_A:
                    H = _swap_rows((W1.T @ Gt).view(b * n, c), b, n)  # rows (v, j): (n·b, c)
                    del Gt
                    if need_x:
                        torch.mm(H, A, out=out)  # (n·b, c)(c, d)
                    if need_A:
                        grad_A.addmm_(H.T, Xs)  # (c, n·b)(n·b, d)
                    del H
                continue
            Gs = G[start : start + n].reshape(n * a, c)  # a view: rows (v, i)
            Ut = _swap_rows(Gs @ A, n, a).view(a, -1)  # (n·a, r) -> (a, n·r): U_v, rows i
            if need_W1 or need_A:
                Pt = _swap_rows(Xs @ B.T, n, b).view(b, -1)  # recomputed: (b, n·r), rows j
                if need_W1:
                    grad_W1.addmm_(Ut, Pt.T)  # (a, n·r)(n·r, b)
                if need_A:
                    Mv = _swap_rows((W1 @ Pt).view(a * n, -1), a, n)  # (n·a, r): M_v, rows (v, i)
                    grad_A.addmm_(Gs.T, Mv)  # (c, n·a)(n·a, r)
                    del Mv
                del Pt
            if need_x or need_B:
                K = _swap_rows((W1.T @ Ut).view(b * n, -1), b, n)  # (b, n·r) -> (n·b, r)
                del Ut
                if need_x:
                    torch.mm(K, B, out=out)  # (n·b, r)(r, d)
                if need_B:
                    grad_B.addmm_(K.T, Xs)  # (r, n·b)(n·b, d)
                del K
        return grad_x, grad_W1, grad_A, grad_B


def kron_linear(x: Tensor, W1: Tensor, W2: Tensor | tuple[Tensor, Tensor]) -> Tensor:
    """(W1 ⊗ W2) applied to the last axis of x (..., b·d) -> (..., a·c), never forming W1 ⊗ W2.

    W2 is a (c × d) matrix, or its low-rank factors (w2a (c × r), w2b (r × d)), which are then
    applied one after the other and W2 is not formed either. The reshape path of a LoKr Linear,
    differentiable in x and every factor. Defined in chapter 04.
    """
    if not isinstance(W1, Tensor) or W1.dim() != 2:
        raise ValueError(f"W1 must be a 2-D matrix, got {getattr(W1, 'shape', type(W1))}")
    A, B, _, d, _ = _split_w2(W2, conv=False)
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != W1.shape[1] * d:
        raise ValueError(
            f"x must end in b·d = {W1.shape[1]}·{d} = {W1.shape[1] * d} features, "
            f"got {getattr(x, 'shape', type(x))}"
        )
    dtype = compute_dtype(x)  # one dtype for every product (autocast's, if on)
    return _KronLinear.apply(
        x.to(dtype), W1.to(dtype), A.to(dtype), B if B is None else B.to(dtype)
    )


def _conv_reshape(
    x: Tensor,
    W1: Tensor,
    A: Tensor,
    B: Tensor | None,
    kernel_size: tuple[int, int],
    conv: dict[str, object],
) -> Tensor:
    """conv2d(x, W1 ⊗ W2) without building it: each group of d input channels convolved with W2
    (c, d, kh, kw) as one batch, then the b groups mixed by W1 (a × b), one product per image.
    For W2 = A·B (A: c × r, B: r × d·kh·kw): convolve to r channels with B, mix the groups with
    W1 while they are r channels wide, then apply A (a 1×1 convolution)."""
    a, b = W1.shape
    Bn, n, H, W = x.shape
    d = n // b
    groups = x.reshape(Bn * b, d, H, W)  # (B·b, d, H, W)
    if B is None:
        c = A.shape[0]
        groups = F.conv2d(groups, A, None, **conv)  # (B·b, c, Ho, Wo)
        Ho, Wo = groups.shape[-2:]
        mixed = W1 @ groups.reshape(Bn, b, c * Ho * Wo)  # (a, b)(B, b, c·Ho·Wo) -> (B, a, ·)
        return mixed.reshape(Bn, a * c, Ho, Wo)  # channel i·c + k, as in ΔW's row order
    r, c = B.shape[0], A.shape[0]
    thin = F.conv2d(groups, B.reshape(r, d, *kernel_size), None, **conv)  # (B·b, r, Ho, Wo)
    Ho, Wo = thin.shape[-2:]
    mixed = W1 @ thin.reshape(Bn, b, r * Ho * Wo)  # (a, b)(B, b, r·Ho·Wo) -> (B, a, r·Ho·Wo)
    wide = A @ mixed.reshape(Bn * a, r, Ho * Wo)  # (c, r)(B·a, r, Ho·Wo) -> (B·a, c, Ho·Wo)
    return wide.reshape(Bn, a * c, Ho, Wo)


def _split_w2(W2: object, conv: bool) -> tuple[Tensor, Tensor | None, int, int, int]:
    """(A, B, c, d, kernel) from W2 = A or from W2's factors (A, B); ValueError naming W2.

    For factors of a Conv2d, d is B's column count d·kh·kw and kernel 1 (split later)."""
    if isinstance(W2, Tensor):
        if W2.dim() != (4 if conv else 2):
            layout = "(c, d, kh, kw) for a Conv2d" if conv else "a 2-D (c, d) matrix"
            raise ValueError(f"W2 must be {layout}, got shape {tuple(W2.shape)}")
        kernel = W2.shape[2] * W2.shape[3] if conv else 1
        return W2, None, W2.shape[0], W2.shape[1], kernel
    if (
        not isinstance(W2, tuple | list)
        or len(W2) != 2
        or not all(isinstance(t, Tensor) and t.dim() == 2 for t in W2)
    ):
        raise ValueError(
            "W2 must be a tensor or a pair (w2a (c, r), w2b (r, d·kh·kw)) of 2-D tensors, "
            f"got {type(W2).__name__}"
        )
    A, B = W2
    if A.shape[1] != B.shape[0]:
        raise ValueError(
            f"W2: w2a is {tuple(A.shape)} and w2b is {tuple(B.shape)}; "
            "w2a.shape[1] must equal w2b.shape[0] (the rank)"
        )
    return A, B, A.shape[0], B.shape[1], 1


def lokr_apply(
    x: Tensor,
    W1: Tensor,
    W2: Tensor | tuple[Tensor, Tensor],
    scale: float = 1.0,
    conv: dict[str, object] | None = None,
    mode: str = "auto",
    kernel_size: tuple[int, int] | None = None,
) -> Tensor:
    """scale·(W1 ⊗ W2) applied to x, as a LoKr layer's ΔW acts on its input (bias-free).

    Linear (conv None): x is (..., n), W1 (a × b), W2 (c × d) with n = b·d; returns (..., a·c),
    the same as F.linear(x, scale·kron(W1, W2)).
    Conv2d: x is (B, n, H, W), W2 is (c, d, kh, kw), conv = {"stride", "padding", "dilation"}
    of the base layer; returns conv2d(x, scale·kron(W1, W2)), (B, a·c, H', W').
    W2 may also be given as its low-rank factors (w2a (c × r), w2b (r × d·kh·kw)), LyCORIS's
    lokr_w2_a / lokr_w2_b; a Conv2d then needs kernel_size (kh, kw). Where that is fewer FLOPs
    they are applied one after the other, (I ⊗ w2a)(W1 ⊗ w2b), and W2 is never formed.
    mode "reshape" never builds W1 ⊗ W2, "materialize" builds it and multiplies, "auto" follows
    the simple rule `auto_mode` (reshape for every layer but tiny ones). Both paths compute the
    same numbers, to rounding: the choice is one of speed and memory only. Gradients flow to x
    and every factor on both paths. Defined in chapter 04.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(W1, Tensor) or W1.dim() != 2:
        raise ValueError(f"W1 must be a 2-D matrix, got {getattr(W1, 'shape', type(W1))}")
    a, b = W1.shape
    A, B, c, d, kernel = _split_w2(W2, conv is not None)
    if conv is None:
        if x.dim() < 1 or x.shape[-1] != b * d:
            raise ValueError(
                f"x must end in n = b·d = {b}·{d} = {b * d} features, got {tuple(x.shape)}"
            )
    else:
        if not isinstance(conv, dict) or set(conv) != {"stride", "padding", "dilation"}:
            raise ValueError("conv must be a dict with exactly the keys stride, padding, dilation")
        if B is None:
            kernel_size = tuple(A.shape[2:])
        else:
            if kernel_size is None or len(kernel_size) != 2:
                raise ValueError("kernel_size (kh, kw) is needed with a low-rank conv W2")
            kernel = kernel_size[0] * kernel_size[1]
            if d % kernel:
                raise ValueError(f"W2: w2b has {d} columns, not a multiple of kh·kw = {kernel}")
            d //= kernel
        if x.dim() != 4 or x.shape[1] != b * d:
            raise ValueError(f"x must be (B, b·d = {b * d}, H, W), got {tuple(x.shape)}")
    rank = None if B is None else B.shape[0]
    if x.numel() == 0:
        mode = "materialize"
    elif mode == "auto":
        mode = auto_mode(a, b, c, d, kernel)
    # Every product runs in one dtype: autocast's (fp16 / bf16) where it is on for x's device, as
    # F.linear would; else x's. The casts are differentiable, so fp32 factors get fp32 gradients.
    dtype = compute_dtype(x)
    x, W1, A = x.to(dtype), W1.to(dtype), (A * scale).to(dtype)  # the scale on a small factor
    B = None if B is None else B.to(dtype)
    if B is not None and (mode == "materialize" or not _low_rank_first(a, b, c, d * kernel, rank)):
        A, B = (A @ B).reshape(c, d, *(kernel_size if conv is not None else ())), None
    if mode == "materialize":
        delta = torch.kron(W1.reshape(a, b, *[1] * (A.dim() - 2)), A)  # (a·c, b·d[, kh, kw])
        if conv is None:
            return F.linear(x, delta)
        return F.conv2d(x, delta, None, **conv)
    if conv is None:
        return _KronLinear.apply(x, W1, A, B)
    return _conv_reshape(x, W1, A, B, kernel_size, conv)
