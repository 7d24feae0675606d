"""Checks for chapter 04's exercises (solutions/04_adapter_from_scratch_solutions.ipynb)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lokr_edu.adapters import AdapterLayer, LoRA, inject, set_strength
from lokr_edu.checks.ch01 import _forbid_kron
from lokr_edu.checks.common import (
    CheckError,
    call_student,
    passed,
    prediction_pair,
    random_tensor,
    require_tensor,
    shape_str,
)
from lokr_edu.kron import numerical_rank
from lokr_edu.lowrank import adapter_shapes, lora_delta
from lokr_edu.sd15 import kohya_key

__all__ = [
    "check_lora_linear",
    "check_merged_weight",
    "check_kohya_key",
    "check_split_adapter",
    "check_lokr_reshape",
    "check_lora_delta_from_file",
    "check_eta_prediction",
    "check_stacked_adapters",
    "check_mergeable_lora",
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
        elif torch.allclose(got, x @ (base.weight + eta * delta / 4).T + base.bias):
            hint = "the scale is α/r = 6/3 = 2, not r/α = 3/6: self.alpha / self.rank"
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


def _holds_tensors_of(tensors: object, state: dict, module: str) -> bool:
    """Whether the dict `tensors` holds one of `module`'s factors (alpha aside) from `state`."""
    if not isinstance(tensors, dict):
        return False
    theirs = [v for k, v in state.items() if k.startswith(module + ".") and v.dim() > 0]
    return any(
        isinstance(mine, torch.Tensor) and mine.shape == v.shape and torch.equal(mine, v)
        for mine in tensors.values()
        for v in theirs
    )


# (the module to read, the other modules in the file): kohya keys, then LyCORIS keys of a plain
# nn.Sequential, where 'lycoris_1' is also the start of 'lycoris_10' and 'lycoris_11'
SPLIT_FILES = [
    (
        "lora_te_text_model_encoder_layers_1_mlp_fc1",
        [
            "lora_te_text_model_encoder_layers_11_mlp_fc1",
            "lora_unet_mid_block_attentions_0_proj_in",
        ],
    ),
    ("lycoris_1", ["lycoris_10", "lycoris_11", "lycoris_0"]),
]


def check_split_adapter(split_adapter: Callable[[dict, str], tuple[str, dict]]) -> None:
    """Exercise 4.4: pick one module's tensors out of a kohya file and name its method."""
    for wanted, others in SPLIT_FILES:
        for method in ["lora", "loha", "lokr"]:
            state = _adapter_file(method, wanted, seed=1)
            for seed, other in enumerate(others, start=2):
                state |= _adapter_file(method, other, seed=seed)
            want = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(wanted + ".")}
            context = f"for a {method} file and module {wanted!r}"
            got = call_student("split_adapter", split_adapter, state, wanted, context=context)
            if not (isinstance(got, tuple) and len(got) == 2):
                raise CheckError(f"split_adapter must return (method, tensors) {context}")
            got_method, tensors = got
            if got_method != method:
                raise CheckError(
                    f"split_adapter said {got_method!r} {context}; expected {method!r}: "
                    "lora_down → 'lora', hada_* → 'loha', lokr_* → 'lokr'"
                )
            if not isinstance(tensors, dict) or set(tensors) != set(want):
                names = sorted(tensors) if isinstance(tensors, dict) else tensors
                extended = [
                    other
                    for other in others
                    if other.startswith(wanted) and _holds_tensors_of(tensors, state, other)
                ]
                if extended:
                    hint = (
                        f": the tensors of {extended[0]!r} got in, because {wanted!r} is also "
                        f"the start of {extended[0]!r}; filter by the module key plus the dot, "
                        f"'{wanted}.'"
                    )
                elif isinstance(tensors, dict) and any(str(k).startswith(wanted) for k in tensors):
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
    passed(
        "split_adapter finds the module's tensors and its method for LoRA, LoHa and LoKr files, "
        "also where another module's key starts with the same characters"
    )


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


def check_lora_delta_from_file(lora_delta_from_file: Callable[[dict], torch.Tensor]) -> None:
    """Exercise 4.6 (debug): one kohya LoRA group {lora_down.weight, lora_up.weight, alpha} ->
    ΔW = (α/r)·up @ down, m × n (out × in), r = down.shape[0]."""
    for case, (m, n, r, alpha) in enumerate([(6, 4, 2, 8.0), (3, 7, 1, 1.0), (5, 5, 3, 6.0)]):
        down, up = random_tensor(r, n, seed=50 + case), random_tensor(m, r, seed=60 + case)
        tensors = {
            "lora_down.weight": down.clone(),
            "lora_up.weight": up.clone(),
            "alpha": torch.tensor(alpha, dtype=torch.float64),
        }
        context = f"for a {m} × {n} layer, r = {r}, alpha = {alpha}"
        got = call_student("lora_delta_from_file", lora_delta_from_file, tensors, context=context)
        if isinstance(got, torch.Tensor) and tuple(got.shape) == (n, m) and m != n:
            raise CheckError(
                f"lora_delta_from_file returned shape {(n, m)} {context}: that is ΔWᵀ. ΔW is "
                f"m × n (out × in) = up @ down, ({m} × {r}) @ ({r} × {n}); down.T @ up.T is its "
                "transpose"
            )
        require_tensor("lora_delta_from_file", got, (m, n), context)
        want = lora_delta(down, up, alpha)
        if torch.allclose(got, want):
            continue
        product = up @ down
        guesses = [
            (r / alpha, f"the scale is α/r = {alpha:g}/{r}; r/α inverts it"),
            (1.0, f"the scale α/r = {alpha:g}/{r} is missing"),
            (alpha, f"divide α by the rank r = down.shape[0] = {r}"),
            (
                alpha / n,
                f"r is down.shape[0] = {r} (down is r × n); you read n = {n} off the other axis",
            ),
            (alpha / m, f"r is down.shape[0] = {r}; you divided by up.shape[0] = m = {m}"),
        ]
        hint = "ΔW = (alpha / r) · up @ down with r = down.shape[0]"
        for scale, text in guesses:
            if torch.allclose(got, scale * product):
                hint = text
                break
        raise CheckError(f"lora_delta_from_file is still wrong {context}: {hint}")
    passed("lora_delta_from_file reads a kohya LoRA group: ΔW = (α/r)·up @ down, out × in")


def _eta_outputs(model: nn.Module, x: torch.Tensor) -> dict[float, torch.Tensor]:
    outputs = {}
    for eta in (0.0, 0.5, 1.0):
        set_strength(model, eta)
        with torch.no_grad():
            outputs[eta] = model(x)
    return outputs


def _eta_gap(model: nn.Module, seed: int) -> float:
    """‖y(0.5) − (y(0) + y(1))/2‖ / ‖y(1) − y(0)‖ for random non-zero adapters."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(random_tensor(*p.shape, seed=seed) * 0.5)
                seed += 1
    x = random_tensor(16, model[0].base.in_features, seed=seed)
    y = _eta_outputs(model, x)
    return float((y[0.5] - (y[0.0] + y[1.0]) / 2).norm() / (y[1.0] - y[0.0]).norm())


def check_eta_prediction(prediction: tuple[bool, bool]) -> None:
    """Exercise 4.7 (predict): is the output at η = 0.5 the average of the outputs at η = 0 and
    η = 1, (a) for one adapted Linear, (b) for a three-layer ReLU network with LoRA on all three?"""
    torch.manual_seed(0)
    one = nn.Sequential(nn.Linear(8, 6)).double()
    inject(one, "0", method="lora", rank=2, alpha=2.0)
    net = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    ).double()
    inject(net, ["0", "2", "4"], method="lora", rank=2, alpha=2.0)
    gaps = (_eta_gap(one, seed=70), _eta_gap(net, seed=80))
    want = tuple(gap < 1e-9 for gap in gaps)
    prediction = prediction_pair(
        prediction, lambda v: isinstance(v, bool), "two booleans, (one layer, network)"
    )
    one_gap = "0 (to rounding)" if gaps[0] < 1e-9 else f"{gaps[0]:.2g}"
    measured = (
        f"measured ‖y(0.5) − average‖ / ‖y(1) − y(0)‖ = {one_gap} for one layer and "
        f"{gaps[1]:.2f} for the network"
    )
    if prediction == want:
        passed(
            f"{measured}: one layer's output base(x) + η·ΔW·x is a straight line in η; through "
            "three adapted layers η multiplies η (and ReLU bends the rest), so η = 0.5 is not "
            "half of the adapter's effect"
        )
        return
    if prediction[0] != want[0]:
        hint = (
            "(a) one layer computes base(x) + η·ΔW·x: affine in η, so the midpoint is exact, "
            "to rounding"
        )
    else:
        hint = (
            "(b) layer 2 receives layer 1's output, which has already moved by η·ΔW₁x, and "
            "multiplies it by W₂ + η·ΔW₂: terms in η² and η³ appear, and ReLU is not linear "
            "either, so η = 0.5 is not the average of η = 0 and η = 1"
        )
    raise CheckError(f"you predicted {prediction}, the truth is {want}; {measured}: {hint}")


def check_stacked_adapters(layer: nn.Module) -> None:
    """Exercise 4.8 (explore): two LoRA adapters "a" and "b" of rank 3 on one nn.Linear(12, 10),
    each ΔW of rank 3, whose sum, measured from the layer's outputs, has rank at most 3."""
    if not isinstance(layer, AdapterLayer):
        raise CheckError(f"layer must be an AdapterLayer, got {type(layer).__name__}")
    base = layer.base
    if not (isinstance(base, nn.Linear) and tuple(base.weight.shape) == (10, 12)):
        raise CheckError(f"the base layer must be nn.Linear(12, 10), got {base}")
    if set(layer.adapters) != {"a", "b"}:
        raise CheckError(
            f"the layer must hold adapters 'a' and 'b', found {sorted(layer.adapters)}"
        )
    rtol = 100 * 12 * torch.finfo(base.weight.dtype).eps  # rounding of the layer's dtype
    for name, adapter in layer.adapters.items():
        if not isinstance(adapter, LoRA) or adapter.rank != 3:
            raise CheckError(f"adapter {name!r} must be a LoRA of rank 3, got {adapter!r}")
        if not layer.enabled[name] or name in layer.merged or layer.strength[name] == 0:
            raise CheckError(
                f"adapter {name!r} must be enabled, unmerged and with a strength ≠ 0, so that "
                "the outputs show it"
            )
        own = numerical_rank(adapter.delta_weight().detach(), rtol=rtol)
        if own != 3:
            raise CheckError(
                f"adapter {name!r} alone has ΔW of rank {own}; each must have rank 3 (a zero "
                "lora_up, as initialised, gives rank 0: give it values)"
            )
    eye = torch.eye(12, dtype=base.weight.dtype, device=base.weight.device)
    with torch.no_grad():
        total = (layer(eye) - base(eye)).T  # column j: the update applied to e_j
    rank = numerical_rank(total, rtol=rtol)
    if rank > 3:
        hint = (
            "the two updates add up: η_a·ΔW_a + η_b·ΔW_b = [up_a, up_b] · diag(scales) · "
            "[down_a; down_b], one LoRA of rank ≤ 6, and random factors reach 6. Make b's "
            "columns live in a's column space, lora_up_b = lora_up_a @ M with M 3 × 3 "
            "invertible (or share the row space through lora_down)"
        )
        raise CheckError(f"the total update measured from the outputs has rank {rank}: {hint}")
    passed(
        f"the stacked update has rank {rank} although each adapter has rank 3: two stacked "
        "LoRAs are one LoRA with concatenated factors, and their ranks add only when their "
        "column and row spaces are independent"
    )


def check_mergeable_lora(mergeable_class: type[nn.Module]) -> None:
    """Exercise 4.9 (debug): a LoRA layer with merge(), unmerge() and set_strength(η) whose
    outputs never depend on whether it is merged, and whose base weight comes back."""
    torch.manual_seed(0)
    base = nn.Linear(7, 5).double()
    W0 = base.weight.detach().clone()
    layer = call_student(
        "MergeableLoRA", mergeable_class, base, 3, 6.0, context="for (base, 3, 6.0)"
    )
    with torch.no_grad():
        layer.down.copy_(random_tensor(3, 7, seed=90))
        layer.up.copy_(random_tensor(5, 3, seed=91))
    x = random_tensor(9, 7, seed=92)  # full column rank: the outputs pin the weight down
    delta = lora_delta(layer.down.detach(), layer.up.detach(), 6.0)

    def expect(eta: float) -> torch.Tensor:
        return x @ (W0 + eta * delta).T + base.bias

    previous = [1.0]  # the η of the last step that was right

    def run(step: str, action: Callable[[], object], eta: float) -> None:
        call_student("MergeableLoRA", action, context=f"in step '{step}'")
        with torch.no_grad():
            got = call_student("MergeableLoRA.forward", layer, x, context=f"after '{step}'")
        if torch.allclose(got, expect(eta)):
            previous[0] = eta
            return
        update = x @ delta.T
        acts_as = float(((got - expect(0.0)) * update).sum() / (update * update).sum())
        if torch.allclose(got, expect(2 * eta)):
            hint = (
                "η·ΔW is counted twice: once in the merged weight and once by the branch; a "
                "merged layer must skip its LoRA branch"
            )
        elif torch.allclose(got, expect(0.0)) and eta != 0:
            hint = (
                "the update vanished: the branch is skipped as if the layer were merged, but "
                "η·ΔW is not in the weight (does unmerge clear the merged state?)"
            )
        elif "while merged" in step and torch.allclose(got, expect(previous[0] + eta)):
            hint = (
                f"the weight holds W + {previous[0] + eta:g}·ΔW, the old {previous[0]:g}·ΔW plus "
                f"the new {eta:g}·ΔW: set_strength merged the new strength on top of the old "
                "one; take the old η·ΔW out first (unmerge), then merge the new one"
            )
        elif "strength" in step and torch.allclose(got, expect(previous[0])):
            hint = (
                "changing η on a merged layer must take the old η·ΔW out of the weight (unmerge) "
                "and put the new one in (merge); otherwise the weight keeps the old strength"
            )
        elif torch.allclose(got, expect(acts_as)):
            hint = (
                f"the layer acts as W + {acts_as:g}·ΔW: the base weight did not come back to W "
                "plus exactly the merged η·ΔW; unmerge must subtract the η that was merged, once"
            )
        else:
            hint = f"expected the output of base weight W + {eta:g}·ΔW"
        raise CheckError(f"after '{step}' the output is wrong (η = {eta:g}): {hint}")

    run("merge()", layer.merge, 1.0)
    run("set_strength(0.3) while merged", lambda: layer.set_strength(0.3), 0.3)
    run("set_strength(-1.0) while merged", lambda: layer.set_strength(-1.0), -1.0)
    run("unmerge()", layer.unmerge, -1.0)
    run("set_strength(2.0) unmerged", lambda: layer.set_strength(2.0), 2.0)
    run("merge() again", layer.merge, 2.0)
    run("unmerge() again", layer.unmerge, 2.0)
    passed(
        "merged or not, the layer computes base(x) + η·ΔW·x through merge, set_strength and "
        "unmerge, and the base weight comes back"
    )
