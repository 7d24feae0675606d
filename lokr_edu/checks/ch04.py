"""Checks for chapter 04's exercises (solutions/04_adapter_from_scratch_solutions.ipynb)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lokr_edu.checks.ch01 import _forbid_kron
from lokr_edu.checks.common import (
    CheckError,
    call_student,
    passed,
    random_tensor,
    require_tensor,
    shape_str,
)
from lokr_edu.lowrank import adapter_shapes, lora_delta
from lokr_edu.sd15 import kohya_key

__all__ = [
    "check_lora_linear",
    "check_merged_weight",
    "check_kohya_key",
    "check_split_adapter",
    "check_lokr_reshape",
]


def check_lora_linear(lora_linear_class: type[nn.Module]) -> None:
    """Exercise 4.1: LoRALinear(base, rank, alpha).forward = base(x) + η·(α/r)·up(down(x))."""
    torch.manual_seed(0)
    base = nn.Linear(7, 5).double()
    layer = call_student(
        "LoRALinear", lora_linear_class, base, 3, 6.0, context="for LoRALinear(base, 3, 6.0)"
    )
    x = random_tensor(4, 7, seed=1)
    got = call_student("LoRALinear.forward", layer, x, context="on a fresh layer")
    require_tensor("LoRALinear.forward", got, (4, 5), "for x of shape (4, 7)")
    if torch.allclose(got, x @ base.weight.T):
        raise CheckError("the base layer's bias is missing: call self.base(x) for the frozen part")
    if not torch.allclose(got, base(x)):
        raise CheckError(
            "a fresh LoRALinear must compute exactly base(x): is up initialized to zero?"
        )
    with torch.no_grad():
        layer.down.copy_(random_tensor(3, 7, seed=2))
        layer.up.copy_(random_tensor(5, 3, seed=3))
    for eta in [1.0, 0.5, 0.0, -2.0]:
        layer.strength = eta
        got = call_student("LoRALinear.forward", layer, x, context=f"with strength {eta}")
        delta = lora_delta(layer.down.detach(), layer.up.detach(), 6.0)
        want = x @ (base.weight + eta * delta).T + base.bias
        if torch.allclose(got, want):
            continue
        if torch.allclose(got, x @ (base.weight + eta * layer.up @ layer.down).T + base.bias):
            hint = "the LoRA branch is scaled by α/r = 6/3 = 2; it is missing"
        elif torch.allclose(got, x @ (base.weight + delta).T + base.bias):
            hint = "multiply the LoRA branch by self.strength (η)"
        elif torch.allclose(got, x @ (base.weight + eta * delta).T):
            hint = "the base layer's bias is missing: call self.base(x) for the frozen part"
        else:
            hint = "y = self.base(x) + η·(α/r)·(x @ down.T) @ up.T"
        raise CheckError(f"LoRALinear.forward is wrong with strength η = {eta}: {hint}")
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    if trainable != {"down", "up"}:
        raise CheckError(
            f"only down and up may be trainable, found {sorted(trainable)}: freeze the base"
        )
    passed("LoRALinear starts at the base layer, applies η·(α/r)·up·down, and trains only down, up")


def check_merged_weight(merged_weight: Callable[..., torch.Tensor]) -> None:
    """Exercise 4.2: W + η·(α/r)·up·down, and back again with −η."""
    cases = [(6, 4, 2, 4.0, 0.3), (5, 5, 1, 1.0, 1.0), (3, 8, 3, 6.0, -1.5)]
    for case, (m, n, r, alpha, eta) in enumerate(cases):
        W = random_tensor(m, n, seed=case)
        W_before = W.clone()
        down, up = random_tensor(r, n, seed=10 + case), random_tensor(m, r, seed=20 + case)
        want = W + eta * lora_delta(down, up, alpha)
        context = f"for W {m}×{n}, r = {r}, α = {alpha}, η = {eta}"
        got = call_student("merged_weight", merged_weight, W, down, up, alpha, eta, context=context)
        if not torch.equal(W, W_before):
            raise CheckError(f"merged_weight changed its input W in place {context}: return W + …")
        require_tensor("merged_weight", got, (m, n), context)
        if torch.allclose(got, want):
            back = call_student(
                "merged_weight", merged_weight, got, down, up, alpha, -eta, context=context
            )
            if not torch.allclose(back, W):
                raise CheckError(f"merging the result with −η must give W back {context}")
            continue
        if torch.allclose(got, W + lora_delta(down, up, alpha)):
            hint = "scale ΔW by the strength η"
        elif torch.allclose(got, W + eta * up @ down):
            hint = "ΔW includes the factor α/r"
        elif torch.allclose(got, eta * lora_delta(down, up, alpha)):
            hint = "return the merged weight W + η·ΔW, not ΔW alone"
        else:
            hint = "W + η·(α/r)·up @ down"
        raise CheckError(f"merged_weight is wrong {context}: {hint}")
    passed("merged_weight gives W + η·ΔW, and −η undoes it")


KOHYA_NAMES = [
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "unet"),
    ("mid_block.attentions.0.proj_in", "unet"),
    ("up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0", "unet"),
    ("text_model.encoder.layers.0.self_attn.q_proj", "text_encoder"),
    ("encoder.layers.11.mlp.fc2", "text_encoder"),
]


def check_kohya_key(kohya_key_fn: Callable[[str, str], str]) -> None:
    """Exercise 4.3: a diffusers / transformers module path -> its kohya key."""
    for name, component in KOHYA_NAMES:
        call = f"kohya_key({name!r}, {component!r})"
        got = call_student("kohya_key", kohya_key_fn, name, component, context=f"for {call}")
        want = kohya_key(name, component)
        if got == want:
            continue
        if not isinstance(got, str):
            hint = "return a str"
        elif got.replace("lora_te_", "lora_unet_") == want.replace("lora_te_", "lora_unet_"):
            hint = "the U-Net's prefix is lora_unet_, the text encoder's lora_te_"
        elif "." in got:
            hint = "every '.' of the path becomes '_'"
        elif component == "text_encoder" and "text_model" not in got:
            hint = "transformers 5 drops 'text_model.'; SD1.5 files keep it, so put it back"
        else:
            hint = f"expected {want!r}"
        raise CheckError(f"{call} returned {got!r}: {hint}")
    passed(f"kohya_key is right on {len(KOHYA_NAMES)} U-Net and text-encoder paths")


def _adapter_file(method: str, module: str, seed: int) -> dict[str, torch.Tensor]:
    shapes = (
        adapter_shapes(method, 8, 8, 2) if method != "lokr" else adapter_shapes("lokr", 64, 64, 2)
    )
    return {
        f"{module}.{key}": (
            torch.tensor(2.0) if key == "alpha" else random_tensor(*shape, seed=seed)
        )
        for key, shape in shapes.items()
    }


def check_split_adapter(split_adapter: Callable[[dict, str], tuple[str, dict]]) -> None:
    """Exercise 4.4: pick one module's tensors out of a kohya file and name its method."""
    wanted = "lora_te_text_model_encoder_layers_1_mlp_fc1"
    for method in ["lora", "loha", "lokr"]:
        state = {
            **_adapter_file(method, wanted, seed=1),
            **_adapter_file(method, wanted.replace("layers_1_", "layers_11_"), seed=2),
            **_adapter_file(method, "lora_unet_mid_block_attentions_0_proj_in", seed=3),
        }
        want = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(wanted + ".")}
        context = f"for a {method} file and module {wanted!r}"
        got = call_student("split_adapter", split_adapter, state, wanted, context=context)
        if not (isinstance(got, tuple) and len(got) == 2):
            raise CheckError(f"split_adapter must return (method, tensors) {context}")
        got_method, tensors = got
        if got_method != method:
            raise CheckError(
                f"split_adapter said {got_method!r} {context}; expected {method!r}: lora_down → "
                "'lora', hada_* → 'loha', lokr_* → 'lokr'"
            )
        if not isinstance(tensors, dict) or set(tensors) != set(want):
            names = sorted(tensors) if isinstance(tensors, dict) else tensors
            if isinstance(tensors, dict) and any(str(k).startswith(wanted) for k in tensors):
                hint = f": remove the module prefix '{wanted}.' from the keys"
            else:
                hint = ""
            raise CheckError(
                f"split_adapter returned tensors {names} {context}; expected the keys "
                f"{sorted(want)}{hint}"
            )
        for key, value in want.items():
            if not torch.equal(tensors[key], value):
                raise CheckError(
                    f"split_adapter's {key!r} {context} is not the tensor from the file"
                )
    passed("split_adapter finds the module's tensors and its method for LoRA, LoHa and LoKr files")


# (a, b, c, d, r, leading dims of x): square factors first, so that a wrong order gives wrong
# values (and a specific hint) rather than a crash; then non-square, batched and single vectors.
LOKR_CASES = [
    (3, 3, 4, 4, 2, (5,)),
    (2, 3, 4, 5, 2, (6,)),
    (4, 2, 3, 6, 3, (2, 3)),
    (1, 5, 6, 2, 1, ()),
]


def _lokr_hint(got: torch.Tensor, x: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor, s: float):
    """The likely mistake behind a wrong scale·(W1 ⊗ W2)·x, or a reminder of the formula."""
    lead, (a, b), (c, d) = x.shape[:-1], W1.shape, W2.shape
    X = x.reshape(*lead, b, d)
    Y = W1 @ X @ W2.T  # (..., a, c)
    guesses = [
        (Y.reshape(*lead, a * c), "multiply the result by scale"),
        (
            s * (W1 @ x.reshape(*lead, d, b).mT @ W2.T).reshape(*lead, a * c),
            "x's n = b·d features are b blocks of d in torch's row-major order: "
            "X = x.reshape(..., b, d), not x.reshape(..., d, b) transposed",
        ),
        (
            s * Y.mT.reshape(*lead, a * c),
            "flatten Y = W1·X·W2ᵀ (a × c) as it is, row by row: output feature i·c + k is "
            "Y[i, k]; do not transpose it first",
        ),
        (
            s * x @ torch.kron(W2, W1).T,
            "that is (W2 ⊗ W1)·x: either W1 and W2 are swapped, or x was read and y written "
            "column by column (the textbook vec(W2·X·W1ᵀ) form, which assumes column-major order)",
        ),
    ]
    if c == d:
        guesses.append(
            (s * (W1 @ X @ W2).reshape(*lead, a * c), "it is W1·X·W2ᵀ: use the transpose of W2")
        )
    for guess, hint in guesses:
        if torch.allclose(got, guess):
            return hint
    return (
        "with torch's row-major flattening, X = x.reshape(..., b, d) and "
        "y = scale·(W1 @ X @ W2.T).reshape(..., a·c), where W2 = w2a @ w2b"
    )


def check_lokr_reshape(lokr_reshape: Callable[..., torch.Tensor]) -> None:
    """Exercise 4.5: scale·(W1 ⊗ w2a·w2b) on x's last axis without torch.kron, with gradients."""
    names = ["x", "W1", "w2a", "w2b"]
    for case, (a, b, c, d, r, lead) in enumerate(LOKR_CASES):
        x = random_tensor(*lead, b * d, seed=30 + case)
        W1 = random_tensor(a, b, seed=case)
        w2a, w2b = random_tensor(c, r, seed=10 + case), random_tensor(r, d, seed=20 + case)
        scale = 0.5 + case
        context = (
            f"for W1 {shape_str(W1)}, w2a {shape_str(w2a)}, w2b {shape_str(w2b)}, "
            f"scale {scale} and x of shape {tuple(x.shape)}"
        )
        inputs = [t.clone().requires_grad_() for t in (x, W1, w2a, w2b)]
        with _forbid_kron("lokr_reshape", "the point is to never build W1 ⊗ W2: reshape x"):
            got = call_student("lokr_reshape", lokr_reshape, *inputs, scale, context=context)
        require_tensor("lokr_reshape", got, (*lead, a * c), context)
        W2 = w2a @ w2b
        if not torch.allclose(got.detach(), scale * x @ torch.kron(W1, W2).T):
            hint = _lokr_hint(got.detach(), x, W1, W2, scale)
            raise CheckError(f"lokr_reshape is wrong {context}: {hint}")
        no_grad = "compute it with torch operations on the inputs (no .detach(), numpy or no_grad)"
        if not got.requires_grad:
            raise CheckError(f"lokr_reshape's output carries no gradient {context}: {no_grad}")
        probe = random_tensor(*got.shape, seed=40 + case)
        grads = torch.autograd.grad((got * probe).sum(), inputs, allow_unused=True)
        ref = [t.clone().requires_grad_() for t in (x, W1, w2a, w2b)]
        want = scale * ref[0] @ torch.kron(ref[1], ref[2] @ ref[3]).T
        want_grads = torch.autograd.grad((want * probe).sum(), ref)
        for name, grad, want_grad in zip(names, grads, want_grads, strict=True):
            if grad is None or torch.count_nonzero(grad) == 0:
                raise CheckError(f"no gradient reaches {name} {context}: {no_grad}")
            if not torch.allclose(grad, want_grad):
                raise CheckError(f"the gradient with respect to {name} is wrong {context}")
    passed(
        "lokr_reshape computes scale·(W1 ⊗ w2a·w2b)·x and its gradients on "
        f"{len(LOKR_CASES)} shapes, batches included, without torch.kron"
    )
