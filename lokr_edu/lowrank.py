"""ΔW of LoRA, LoHa and LoKr as pure functions, and what each one costs to store.

Every adapter adds a weight update ΔW (m × n, out × in) to a frozen layer W, built from a few
small factors. The three families differ only in how the factors make ΔW:

    LoRA   ΔW = (α/r) · up @ down                          r(m + n) numbers
    LoHa   ΔW = (α/r) · (w1a @ w1b) ⊙ (w2a @ w2b)          2r(m + n) numbers
    LoKr   ΔW = scale · W1 ⊗ W2,  W1 (a × b), W2 (c × d)    m = ac, n = bd

Names and layouts follow LyCORIS (its `functional/` and the keys it writes), so a function here
computes, number for number, what `lycoris` computes, and `peft` too except where
`tests/test_lowrank.py` shows the two libraries differ. The scale rule, as kohya and LyCORIS read
a file: alpha None (or a stored alpha of 0) means alpha = r, i.e. scale 1.

The second half counts: the tensors an adapter stores for one layer (`adapter_shapes`, from the
one table of layouts `layout_shapes`), how many
trainable numbers that is (`count_params`), and the bytes of a `.safetensors` file
(`file_size_bytes`, `safetensors_size_bytes`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lokr_edu.validate import require_int, require_matrix

METHODS = ("full", "lora", "loha", "lokr")

_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


# ---------------------------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------------------------


def alpha_scale(alpha: float | None, rank: int) -> float:
    """α/r, where alpha None or 0 means α = r (the kohya / LyCORIS convention): the scale of
    LoRA and LoHa, and of LoKr when a factor is low-rank. Defined in chapter 02."""
    if alpha is None or alpha == 0:
        return 1.0
    return float(alpha) / rank


def lokr_scale(alpha: float | None, rank: int | None) -> float:
    """LoKr's scale: α/r when a factor is low-rank (rank r), exactly 1 when both factors are
    full (rank None): no rank is involved, and LyCORIS then ignores alpha.

    The one home of this rule: `lokr_delta`, the adapter layers (chapter 04) and the file
    loader (`lokr_edu.io`) all call it. Defined in chapter 03 (03_loha_and_lokr.ipynb).
    """
    return 1.0 if rank is None else alpha_scale(alpha, rank)


def _product(name: str, a_name: str, a: Tensor, b_name: str, b: Tensor) -> Tensor:
    """a @ b, with a message naming both factors when the inner sizes disagree."""
    if a.shape[1] != b.shape[0]:
        raise ValueError(
            f"{name}: {a_name} is {tuple(a.shape)} and {b_name} is {tuple(b.shape)}; "
            f"{a_name}.shape[1] must equal {b_name}.shape[0] (the rank)"
        )
    return a @ b


# ---------------------------------------------------------------------------------------------
# ΔW as pure functions
# ---------------------------------------------------------------------------------------------


def lora_delta(down: Tensor, up: Tensor, alpha: float | None = None) -> Tensor:
    """LoRA: ΔW = (α/r) · up @ down, with r = down.shape[0].

    up is m × r ("lora_up", B in Hu et al.), down is r × n ("lora_down", A); ΔW is m × n and
    has rank ≤ r. alpha None (or 0) means α = r, so scale 1. The rank must satisfy
    1 ≤ r ≤ min(m, n): a larger r stores more numbers than it can use.
    Defined in chapter 02 (02_peft_and_lora.ipynb).
    """
    down, up = (
        require_matrix("down", down),
        require_matrix("up", up),
    )
    r = down.shape[0]
    m, n = up.shape[0], down.shape[1]
    if up.shape[1] != r:
        raise ValueError(
            f"up is {tuple(up.shape)} but down is {tuple(down.shape)}: up must be m × r"
        )
    if r > min(m, n):
        raise ValueError(f"rank r = {r} (down.shape[0]) exceeds min(m, n) = {min(m, n)}")
    return alpha_scale(alpha, r) * (up @ down)  # (m, r) @ (r, n) -> (m, n)


def loha_delta(
    w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor, alpha: float | None = None
) -> Tensor:
    """LoHa: ΔW = (α/r) · (w1a @ w1b) ⊙ (w2a @ w2b), with r = w1b.shape[0].

    LyCORIS naming: w1a, w2a are m × r ("hada_w1_a"), w1b, w2b are r × n ("hada_w1_b"). The
    Hadamard product of two rank-r matrices has rank ≤ r², for 2r(m + n) numbers.
    Factor order: each pair comes up first, as LyCORIS names it. In chapter 02's letters
    (B up, A down), ΔW = (α/r)·(B₁A₁) ⊙ (B₂A₂) with w1a = B₁, w1b = A₁, w2a = B₂, w2b = A₂;
    `lora_delta(down, up)` takes its single pair the other way round, down first.
    Defined in chapter 03 (03_loha_and_lokr.ipynb).
    """
    w1a, w1b = (
        require_matrix("w1a", w1a),
        require_matrix("w1b", w1b),
    )
    w2a, w2b = (
        require_matrix("w2a", w2a),
        require_matrix("w2b", w2b),
    )
    left = _product("loha_delta", "w1a", w1a, "w1b", w1b)  # (m, n)
    right = _product("loha_delta", "w2a", w2a, "w2b", w2b)  # (m, n)
    if left.shape != right.shape:
        raise ValueError(
            f"w1a @ w1b is {tuple(left.shape)} but w2a @ w2b is {tuple(right.shape)}; "
            "both halves must be m × n"
        )
    r = w1b.shape[0]
    if w2b.shape[0] != r:
        raise ValueError(f"w1b has rank {r} but w2b has rank {w2b.shape[0]}; they must agree")
    return alpha_scale(alpha, r) * (left * right)


def _lokr_half(
    label: str, full: Tensor | None, a: Tensor | None, b: Tensor | None
) -> tuple[Tensor, int | None]:
    """One Kronecker factor: the full matrix, or the product of its two low-rank factors."""
    names = (label, f"{label}a", f"{label}b")
    if full is not None:
        if a is not None or b is not None:
            raise ValueError(f"give either {names[0]} or ({names[1]}, {names[2]}), not both")
        return require_matrix(names[0], full), None
    if a is None or b is None:
        raise ValueError(f"give either {names[0]} or both of ({names[1]}, {names[2]})")
    a, b = (
        require_matrix(names[1], a),
        require_matrix(names[2], b),
    )
    return _product("lokr_delta", names[1], a, names[2], b), a.shape[1]


def lokr_delta(
    w1: Tensor | None = None,
    w1a: Tensor | None = None,
    w1b: Tensor | None = None,
    w2: Tensor | None = None,
    w2a: Tensor | None = None,
    w2b: Tensor | None = None,
    alpha: float | None = None,
) -> Tensor:
    """LoKr as LyCORIS and peft store it: ΔW = scale · W1 ⊗ W2.

    W1 = w1 (a × b) or w1a @ w1b (a × r, r × b); W2 = w2 (c × d) or w2a @ w2b (c × r, r × d).
    ΔW is (a·c) × (b·d). Factor order: each pair up first, as LyCORIS names it; in chapter
    02's letters (B up, A down) W1 = B₁A₁ and W2 = B₂A₂ with w1a = B₁, w1b = A₁, w2a = B₂,
    w2b = A₂. Pass them by keyword.
    The scale is α/r as soon as one factor is low-rank (r is read off w1a, else w2a), and
    exactly 1 when both are full: LyCORIS then ignores alpha, because no rank is involved.
    (peft's LoKr keeps α/r even then; see tests/test_lowrank.py.)
    Defined in chapter 03 (03_loha_and_lokr.ipynb).
    """
    W1, r1 = _lokr_half("w1", w1, w1a, w1b)  # (a, b)
    W2, r2 = _lokr_half("w2", w2, w2a, w2b)  # (c, d)
    if r1 is not None and r2 is not None and r1 != r2:
        raise ValueError(f"w1a has rank {r1} but w2a has rank {r2}; LoKr uses one rank")
    rank = r1 if r1 is not None else r2
    return lokr_scale(alpha, rank) * torch.kron(W1, W2)  # (a·c, b·d)


# ---------------------------------------------------------------------------------------------
# what one adapted layer stores
# ---------------------------------------------------------------------------------------------


def _kernel(kernel_size: int | Sequence[int] | None) -> tuple[int, ...]:
    """() for a Linear layer, (kh, kw) for a Conv2d."""
    if kernel_size is None:
        return ()
    k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    for v in k:
        require_int("kernel_size", v)
    return k


def lokr_factors(
    out_features: int, in_features: int, factor: int = -1
) -> tuple[tuple[int, int], tuple[int, int]]:
    """((a, b), (c, d)): the shapes of W1 and W2 that LyCORIS picks, m = a·c and n = b·d.

    (a, c) = factorize(m, factor) and (b, d) = factorize(n, factor), each with the smaller
    number first, so W1 = a × b is the small factor and W2 = c × d the large one.
    Defined in chapter 03 (03_loha_and_lokr.ipynb).
    """
    from lokr_edu.kron import factorize  # lazy: kron.py is chapter 01's module

    m = require_int("out_features", out_features)
    n = require_int("in_features", in_features)
    a, c = factorize(m, factor)
    b, d = factorize(n, factor)
    return (a, b), (c, d)


def layout_shapes(
    method: str,
    weight_shape: Sequence[int],
    rank: int,
    *,
    w1: tuple[int, int] | None = None,
    w1_low_rank: bool = False,
    w2_low_rank: bool = True,
) -> dict[str, tuple[int, ...]]:
    """The shape of each factor `method` stores for a layer whose weight is `weight_shape`, (m, n)
    or (m, n, kh, kw), at rank r, once the layout is chosen (no "alpha"):

    - lora: "lora_down.weight" (r, n, kh, kw), "lora_up.weight" (m, r, 1, 1);
    - loha: "hada_w{1,2}_a" (m, r), "hada_w{1,2}_b" (r, n·kh·kw);
    - lokr: W1 is w1 = (a, b), W2 is (c, d) = (m/a, n/b); W1 is "lokr_w1" (a, b), or with
      w1_low_rank "lokr_w1_a" (a, r) and "lokr_w1_b" (r, b); W2 with w2_low_rank is "lokr_w2_a"
      (c, r) and "lokr_w2_b" (r, d·kh·kw), else "lokr_w2" (c, d, kh, kw).

    The one table of the layouts: `adapter_shapes` chooses a layout by LyCORIS's rules,
    `lokr_edu.io` reads one off a file, and both take the shapes from here. Nothing is checked
    (each caller checks what it was given). Defined in chapter 03 (03_loha_and_lokr.ipynb).
    """
    m, n, k = weight_shape[0], weight_shape[1], tuple(weight_shape[2:])
    kk = math.prod(k)
    if method == "lora":
        return {"lora_down.weight": (rank, n, *k), "lora_up.weight": (m, rank, *(1,) * len(k))}
    if method == "loha":
        return {
            "hada_w1_a": (m, rank),
            "hada_w1_b": (rank, n * kk),
            "hada_w2_a": (m, rank),
            "hada_w2_b": (rank, n * kk),
        }
    if method != "lokr" or w1 is None:
        raise ValueError(f"layout_shapes: method lora, loha or lokr (with w1), got {method!r}")
    (a, b), c, d = w1, m // w1[0], n // w1[1]
    shapes = (
        {"lokr_w1_a": (a, rank), "lokr_w1_b": (rank, b)} if w1_low_rank else {"lokr_w1": (a, b)}
    )
    if w2_low_rank:
        return shapes | {"lokr_w2_a": (c, rank), "lokr_w2_b": (rank, d * kk)}
    return shapes | {"lokr_w2": (c, d, *k)}


def adapter_shapes(
    method: str,
    out_features: int,
    in_features: int,
    rank: int | None = None,
    *,
    kernel_size: int | Sequence[int] | None = None,
    factor: int = -1,
    decompose_both: bool = False,
    full_matrix: bool = False,
) -> dict[str, tuple[int, ...]]:
    """The tensors one adapted layer stores in a kohya / LyCORIS file, name -> shape.

    kernel_size None is a Linear (m × n); an int or (kh, kw) is a Conv2d, whose weight is
    m × n × kh × kw. Each low-rank method also stores a 0-d "alpha" tensor per layer.
    - full: "diff" (m, n, kh, kw): the whole ΔW, m·n·kh·kw numbers.
    - lora: "lora_down.weight" (r, n, kh, kw), "lora_up.weight" (m, r, 1, 1): r(n·kh·kw + m).
    - loha: "hada_w{1,2}_a" (m, r), "hada_w{1,2}_b" (r, n·kh·kw): 2r(m + n·kh·kw).
    - lokr: W1 = "lokr_w1" (a, b), or "lokr_w1_a" (a, r) and "lokr_w1_b" (r, b) when
      decompose_both and r < max(a, b)/2; W2 = "lokr_w2_a" (c, r) and "lokr_w2_b"
      (r, d·kh·kw) when r < max(c, d)/2, else the full "lokr_w2" (c, d, kh, kw).
      full_matrix forces both full. (Tucker / use_tucker layouts are not covered.)
    Defined in chapter 03 (03_loha_and_lokr.ipynb).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    m = require_int("out_features", out_features)
    n = require_int("in_features", in_features)
    k = _kernel(kernel_size)
    kk = math.prod(k)
    if method == "full":
        return {"diff": (m, n, *k)}
    r = require_int("rank", rank)
    if method == "lora" and r > min(m, n * kk):
        raise ValueError(f"rank = {r} exceeds min(out, in·kh·kw) = {min(m, n * kk)}")
    if method in ("lora", "loha"):
        return layout_shapes(method, (m, n, *k), r) | {"alpha": ()}
    (a, b), (c, d) = lokr_factors(m, n, factor)
    # LyCORIS: "lora_dim too large ... full matrix mode" when r ≥ half the factor's larger side
    w1_low_rank = decompose_both and not full_matrix and r < max(a, b) / 2
    w2_low_rank = not full_matrix and r < max(c, d) / 2
    shapes = layout_shapes(
        "lokr", (m, n, *k), r, w1=(a, b), w1_low_rank=w1_low_rank, w2_low_rank=w2_low_rank
    )
    return shapes | {"alpha": ()}


def count_params(
    method: str,
    out_features: int,
    in_features: int,
    rank: int | None = None,
    *,
    kernel_size: int | Sequence[int] | None = None,
    factor: int = -1,
    decompose_both: bool = False,
    full_matrix: bool = False,
) -> int:
    """Trainable numbers one adapted layer stores (the per-layer alpha scalar not included).

    Linear m × n: full m·n; LoRA r(m + n); LoHa 2r(m + n);
    LoKr as LyCORIS stores it: a·b + (c + d)·r, or a·b + c·d once r ≥ max(c, d)/2.
    The keyword options are those of `adapter_shapes`.
    Defined in chapter 02 (02_peft_and_lora.ipynb) and chapter 03 (03_loha_and_lokr.ipynb).
    """
    shapes = adapter_shapes(
        method,
        out_features,
        in_features,
        rank,
        kernel_size=kernel_size,
        factor=factor,
        decompose_both=decompose_both,
        full_matrix=full_matrix,
    )
    return sum(math.prod(s) for name, s in shapes.items() if name != "alpha")


# ---------------------------------------------------------------------------------------------
# file sizes
# ---------------------------------------------------------------------------------------------


def _itemsize(dtype: torch.dtype) -> int:
    if dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"dtype must be one of {list(_SAFETENSORS_DTYPES)}, got {dtype!r}")
    return dtype.itemsize


def file_size_bytes(n_params: int, dtype: torch.dtype = torch.float16, n_alphas: int = 0) -> int:
    """Bytes of tensor data: (n_params + n_alphas) · itemsize (4 for fp32, 2 for fp16/bf16).

    kohya and LyCORIS store one alpha scalar per adapted layer, in the same dtype, so pass the
    number of layers as n_alphas. The safetensors header comes on top: `safetensors_size_bytes`.
    Defined in chapter 03 (03_loha_and_lokr.ipynb).
    """
    require_int("n_params", n_params, least=0)
    require_int("n_alphas", n_alphas, least=0)
    return (n_params + n_alphas) * _itemsize(dtype)


def safetensors_size_bytes(
    shapes: Mapping[str, Sequence[int]],
    dtype: torch.dtype = torch.float16,
    metadata: Mapping[str, str] | None = None,
) -> int:
    """The exact size of a .safetensors file holding these tensors, all of one dtype.

    Layout: 8 bytes (header length) + a JSON header {"__metadata__": ..., name: {"dtype",
    "shape", "data_offsets"}} padded with spaces to a multiple of 8 + the raw data, tensors in
    name order. For a whole SD1.5 adapter the header is a few hundred kB of names.
    Defined in chapter 03 (03_loha_and_lokr.ipynb).
    """
    size = _itemsize(dtype)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name in sorted(shapes):
        shape = [int(s) for s in shapes[name]]
        end = offset + math.prod(shape) * size
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": shape,
            "data_offsets": [offset, end],
        }
        offset = end
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    return 8 + math.ceil(len(text) / 8) * 8 + offset


# ---------------------------------------------------------------------------------------------
# chapter 02: the best rank-r approximation, and two ways to apply LoRA
# ---------------------------------------------------------------------------------------------


def best_rank_r(W: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(up, down) with up @ down the best rank-r approximation of W (Eckart–Young).

    From the SVD W = U Σ Vᵀ: up = U[:, :r] Σ[:r] (m × r), down = Vᵀ[:r] (r × n). No matrix of
    rank ≤ r is closer to W in the Frobenius (or spectral) norm; the error is
    ‖W − up @ down‖_F = sqrt(σ_{r+1}² + σ_{r+2}² + …). Defined in chapter 02.
    """
    W = require_matrix("W", W)
    rank = require_int("rank", rank)
    if rank > min(W.shape):
        raise ValueError(
            f"rank r = {rank} exceeds min(m, n) = {min(W.shape)} for W {tuple(W.shape)}"
        )
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # U (m, k), S (k,), Vh (k, n)
    return U[:, :rank] * S[:rank], Vh[:rank]


def lora_forward(
    x: Tensor,
    W: Tensor,
    down: Tensor,
    up: Tensor,
    alpha: float | None = None,
    strength: float = 1.0,
) -> Tensor:
    """On-the-fly LoRA: y = x Wᵀ + η·(α/r)·(x downᵀ) upᵀ, never forming up @ down.

    x is (..., n), W is m × n. Per input vector this costs 2mn + 2r(m + n) FLOPs instead of the
    2mn of a fused weight W + η·ΔW, but W stays untouched, so η can change at every call.
    Defined in chapter 02 (02_peft_and_lora.ipynb).
    """
    W, down, up = (
        require_matrix("W", W),
        require_matrix("down", down),
        require_matrix("up", up),
    )
    if x.shape[-1] != W.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features but W is {tuple(W.shape)} (m × n)")
    if down.shape[1] != W.shape[1] or up.shape[0] != W.shape[0] or up.shape[1] != down.shape[0]:
        raise ValueError(
            f"down {tuple(down.shape)} and up {tuple(up.shape)} do not fit W {tuple(W.shape)}: "
            "down must be r × n and up m × r"
        )
    scale = strength * alpha_scale(alpha, down.shape[0])
    return x @ W.T + scale * ((x @ down.T) @ up.T)  # (..., n) -> (..., r) -> (..., m)


def lora_forward_flops(
    out_features: int, in_features: int, rank: int, tokens: int
) -> dict[str, int]:
    """FLOPs (2 per multiply-add) to apply a LoRA layer to `tokens` input vectors.

    fused:      merge once (2·m·r·n, plus m·n adds), then 2·m·n per token.
    on_the_fly: 2·m·n + 2·r·(m + n) per token, no merge. Defined in chapter 02.
    """
    m = require_int("out_features", out_features)
    n = require_int("in_features", in_features)
    r = require_int("rank", rank)
    t = require_int("tokens", tokens)
    return {
        "fused_merge": 2 * m * r * n + m * n,
        "fused_per_token": 2 * m * n,
        "on_the_fly_per_token": 2 * m * n + 2 * r * (m + n),
        "fused_total": 2 * m * r * n + m * n + 2 * m * n * t,
        "on_the_fly_total": (2 * m * n + 2 * r * (m + n)) * t,
    }
