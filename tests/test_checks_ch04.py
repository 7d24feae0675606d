"""Chapter 04's checks pass on the reference answers and explain plausible wrong ones."""

from __future__ import annotations

import math

import pytest
import torch
from check_cases import check_tests
from torch import nn

from lokr_edu import checks
from lokr_edu.adapters import AdapterLayer, LoRA
from lokr_edu.checks.common import CheckError
from lokr_edu.kron_apply import kron_linear
from lokr_edu.sd15 import kohya_key


def lora_linear(forward=None, zero_up: bool = True, freeze: bool = True) -> type[nn.Module]:
    class LoRALinear(nn.Module):
        def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
            super().__init__()
            self.base, self.rank, self.alpha, self.strength = base, rank, alpha, 1.0
            if freeze:
                base.requires_grad_(False)
            dtype = base.weight.dtype
            self.down = nn.Parameter(torch.empty(rank, base.in_features, dtype=dtype))
            self.up = nn.Parameter(torch.zeros(base.out_features, rank, dtype=dtype))
            nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
            if not zero_up:
                nn.init.normal_(self.up)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if forward is not None:
                return forward(self, x)
            branch = (x @ self.down.T) @ self.up.T
            return self.base(x) + self.strength * (self.alpha / self.rank) * branch

    return LoRALinear


def split(state: dict, module: str, sep: str = ".") -> tuple[str, dict]:
    tensors = {k[len(module) + 1 :]: v for k, v in state.items() if k.startswith(module + sep)}
    method = (
        "lora" if "lora_down.weight" in tensors else "loha" if "hada_w1_a" in tensors else "lokr"
    )
    return method, tensors


def merged(W, down, up, alpha, eta):
    return W + eta * (alpha / down.shape[0]) * (up @ down)


def merged_in_place(W, down, up, alpha, eta):
    W += eta * (alpha / down.shape[0]) * (up @ down)
    return W


def lokr_reshape(x, W1, w2a, w2b, scale):
    """The reference: lokr_edu's own reshape path, W2 kept as its two factors."""
    return scale * kron_linear(x, W1, (w2a, w2b))


def lokr_by_parts(x, W1, w2a, w2b, scale, read=None, flatten=None):
    """The formula with one step replaced, as a student might write it."""
    (a, b), c, d = W1.shape, w2a.shape[0], w2b.shape[1]
    lead = x.shape[:-1]
    X = read(x, b, d) if read else x.reshape(*lead, b, d)
    Y = W1 @ X @ (w2a @ w2b).T
    return scale * (flatten(Y) if flatten else Y.reshape(*lead, a * c))


def lokr_via_kron(x, W1, w2a, w2b, scale):
    return scale * x @ torch.kron(W1, w2a @ w2b).T


def lokr_column_major(x, W1, w2a, w2b, scale):  # the textbook vec(W2·X·W1ᵀ), column-major
    (a, b), c, d = W1.shape, w2a.shape[0], w2b.shape[1]
    X = x.reshape(*x.shape[:-1], d, b).mT  # column-major read: X[j, l] = x[l·b + j]
    return scale * (W1 @ X @ (w2a @ w2b).T).mT.reshape(*x.shape[:-1], a * c)


def lokr_detached_w1(x, W1, w2a, w2b, scale):
    return lokr_reshape(x, W1.detach(), w2a, w2b, scale)


CASES = [
    (
        checks.check_lora_linear,
        lora_linear(),
        [
            (
                lora_linear(lambda s, x: s.base(x) + s.strength * (x @ s.down.T) @ s.up.T),
                "α/r = 6/3 = 2",
            ),
            (
                lora_linear(lambda s, x: s.base(x) + (s.alpha / s.rank) * (x @ s.down.T) @ s.up.T),
                "self.strength",
            ),
            (
                lora_linear(
                    lambda s, x: (
                        x @ s.base.weight.T
                        + s.strength * (s.alpha / s.rank) * (x @ s.down.T) @ s.up.T
                    )
                ),
                "bias is missing",
            ),
            (
                lora_linear(
                    lambda s, x: (
                        s.base(x) + s.strength * (s.rank / s.alpha) * (x @ s.down.T) @ s.up.T
                    )
                ),
                "not r/α = 3/6",
            ),
            (lora_linear(zero_up=False), "is up initialized to zero?"),
            (lora_linear(freeze=False), "freeze the base"),
        ],
    ),
    (
        checks.check_merged_weight,
        merged,
        [
            (
                lambda W, down, up, alpha, eta: merged(W, down, up, alpha, 1.0),
                "scale ΔW by the strength η",
            ),
            (lambda W, down, up, alpha, eta: W + eta * up @ down, "includes the factor α/r"),
            (lambda W, down, up, alpha, eta: merged(W, down, up, alpha, eta) - W, "not ΔW alone"),
            (merged_in_place, "changed its input W in place"),
        ],
    ),
    (
        checks.check_kohya_key,
        kohya_key,
        [
            (lambda name, component: "lora_unet_" + name.replace(".", "_"), "lora_te_"),
            (
                lambda name, component: (
                    {"unet": "lora_unet_", "text_encoder": "lora_te_"}[component] + name
                ),
                "every '.' of the path becomes '_'",
            ),
            (
                lambda name, component: (
                    {"unet": "lora_unet_", "text_encoder": "lora_te_"}[component] + name
                ).replace(".", "_"),
                "put it back",
            ),
        ],
    ),
    (
        checks.check_split_adapter,
        split,
        [
            (
                lambda state, module: (
                    "lora" if "lora_down.weight" in str(state) else split(state, module)[0],
                    {k: v for k, v in state.items() if k.startswith(module)},
                ),
                "remove the module prefix",
            ),
            (
                lambda state, module: (
                    split(state, module)[0],
                    {k.split(".", 1)[1]: v for k, v in state.items()},
                ),
                "is not the tensor from the file",
            ),
            (lambda state, module: ("lora", split(state, module)[1]), "expected 'loha'"),
            (lambda state, module: split(state, module)[1], "must return (method, tensors)"),
            (
                lambda state, module: (
                    split(state, module)[0],
                    {
                        k.removeprefix(module + "."): v
                        for k, v in state.items()
                        if k.startswith(module)  # no dot: 'lycoris_1' also matches 'lycoris_10'
                    },
                ),
                "the tensors of 'lycoris_10' got in",
            ),
            (lambda state, module: split(state, module, sep=""), "plus the dot, 'lycoris_1.'"),
        ],
    ),
    (
        checks.check_lokr_reshape,
        lokr_reshape,
        [
            (lokr_via_kron, "called torch.kron"),
            (
                lambda *args: lokr_by_parts(
                    *args, read=lambda x, b, d: x.reshape(*x.shape[:-1], d, b).mT
                ),
                "not x.reshape(..., d, b) transposed",
            ),
            (
                lambda *args: lokr_by_parts(*args, flatten=lambda Y: Y.mT.flatten(-2)),
                "do not transpose it first",
            ),
            (lokr_column_major, "(W2 ⊗ W1)·x"),
            (lambda x, W1, w2a, w2b, scale: lokr_by_parts(x, W1, w2a, w2b, 1.0), "by scale"),
            (
                lambda x, W1, w2a, w2b, s: s * (W1 @ x.reshape(-1, 3, 4) @ (w2a @ w2b)).flatten(-2),
                "use the transpose of W2",
            ),
            (
                lambda x, W1, w2a, w2b, s: lokr_by_parts(
                    x, W1, w2a, w2b, s, flatten=lambda Y: Y.reshape(-1, Y.shape[-2] * Y.shape[-1])
                ),
                "expected (2, 3, 12)",
            ),
            (lokr_detached_w1, "no gradient reaches W1"),
            (lambda *args: lokr_reshape(*args).detach(), "carries no gradient"),
        ],
    ),
]


def delta_from_file(tensors, transpose=False, scale=None, rank_axis=0, rank_from_up=False):
    down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
    alpha = float(tensors["alpha"])
    r = up.shape[0] if rank_from_up else down.shape[rank_axis]
    s = alpha / r if scale is None else scale(alpha, r)
    return s * (down.T @ up.T if transpose else up @ down)


def stacked_layer(share: bool = True, rank_b: int = 3, zero_b: bool = False, eta_b: float = 1.0):
    layer = AdapterLayer(nn.Linear(12, 10).double())
    layer.add("a", LoRA(layer.base, 3))
    layer.add("b", LoRA(layer.base, rank_b))
    with torch.no_grad():
        layer.adapters["a"].lora_up.normal_()
        if not zero_b:
            layer.adapters["b"].lora_up.normal_()
        if share and not zero_b:
            mix = torch.randn(3, rank_b, dtype=torch.float64)
            layer.adapters["b"].lora_up.copy_(layer.adapters["a"].lora_up @ mix)
    layer.strength["b"] = eta_b
    return layer


def one_adapter_layer():
    layer = AdapterLayer(nn.Linear(12, 10))
    layer.add("a", LoRA(layer.base, 3))
    return layer


CASES += [
    (
        checks.check_lora_delta_from_file,
        delta_from_file,
        [
            (lambda t: delta_from_file(t, transpose=True), "that is ΔWᵀ"),
            (lambda t: delta_from_file(t, scale=lambda a, r: r / a), "r/α inverts it"),
            (lambda t: delta_from_file(t, scale=lambda a, r: 1.0), "is missing"),
            (lambda t: delta_from_file(t, scale=lambda a, r: a), "divide α by the rank"),
            (lambda t: delta_from_file(t, rank_axis=1), "off the other axis"),
            (lambda t: delta_from_file(t, rank_from_up=True), "you divided by up.shape[0]"),
            (lambda t: delta_from_file(t) + 1, "ΔW = (alpha / r) · up @ down"),
        ],
    ),
    (
        checks.check_eta_prediction,
        (True, False),
        [
            ((False, False), "(a) one layer computes base(x) + η·ΔW·x"),
            ((True, True), "(b) layer 2 receives layer 1's output"),
            (("yes", "no"), "two booleans"),
        ],
    ),
    (
        checks.check_stacked_adapters,
        stacked_layer(),
        [
            (stacked_layer(share=False), "has rank 6"),
            (stacked_layer(zero_b=True), "adapter 'b' alone has ΔW of rank 0"),
            (stacked_layer(rank_b=2), "must be a LoRA of rank 3"),
            (stacked_layer(eta_b=0.0), "strength ≠ 0"),
            (nn.Linear(12, 10), "must be an AdapterLayer"),
            (AdapterLayer(nn.Linear(10, 12)), "must be nn.Linear(12, 10)"),
            (one_adapter_layer(), "must hold adapters 'a' and 'b'"),
        ],
    ),
]


class BrokenMergeableLoRA(nn.Module):
    """The exercise's broken layer: set_strength ignores a merge, unmerge keeps the merged state."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base, self.rank, self.alpha, self.strength = base, rank, alpha, 1.0
        base.requires_grad_(False)
        dtype = base.weight.dtype
        self.down = nn.Parameter(torch.randn(rank, base.in_features, dtype=dtype) / rank)
        self.up = nn.Parameter(torch.zeros(base.out_features, rank, dtype=dtype))
        self.merged_eta = None

    def delta(self) -> torch.Tensor:
        return (self.alpha / self.rank) * self.up @ self.down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged_eta is None:
            y = y + self.strength * (self.alpha / self.rank) * (x @ self.down.T) @ self.up.T
        return y

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged_eta is None:
            self.base.weight += self.strength * self.delta()
            self.merged_eta = self.strength

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged_eta is not None:
            self.base.weight -= self.merged_eta * self.delta()

    def set_strength(self, eta: float) -> None:
        self.strength = eta


class UnmergeFixed(BrokenMergeableLoRA):
    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged_eta is not None:
            self.base.weight -= self.merged_eta * self.delta()
            self.merged_eta = None


class SetStrengthFixed(BrokenMergeableLoRA):
    def set_strength(self, eta: float) -> None:
        was_merged = self.merged_eta is not None
        self.unmerge()
        self.strength = eta
        if was_merged:
            self.merge()


class MergeableLoRA(UnmergeFixed, SetStrengthFixed):
    pass


class BranchWhenMerged(MergeableLoRA):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = (x @ self.down.T) @ self.up.T
        return self.base(x) + self.strength * (self.alpha / self.rank) * branch


class UnmergeTwice(MergeableLoRA):
    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged_eta is not None:
            self.base.weight -= 2 * self.merged_eta * self.delta()
            self.merged_eta = None


class UnmergeWithNewStrength(MergeableLoRA):
    def set_strength(self, eta: float) -> None:
        was_merged = self.merged_eta is not None
        self.strength = eta
        if was_merged:
            with torch.no_grad():
                self.base.weight -= self.strength * self.delta()
            self.merged_eta = None
            self.merge()


class MergeOnTopOfMerge(UnmergeFixed):
    """set_strength re-merges the new η without taking the old η·ΔW out first."""

    def set_strength(self, eta: float) -> None:
        was_merged = self.merged_eta is not None
        self.strength = eta
        if was_merged:
            self.merged_eta = None
            self.merge()


class NoBiasWhenMerged(MergeableLoRA):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged_eta is not None:
            return x @ self.base.weight.T
        return super().forward(x)


CASES += [
    (
        checks.check_mergeable_lora,
        MergeableLoRA,
        [
            (BrokenMergeableLoRA, "must take the old η·ΔW out of the weight"),
            (UnmergeWithNewStrength, "must take the old η·ΔW out of the weight"),
            (SetStrengthFixed, "does unmerge clear the merged state?"),
            (UnmergeFixed, "must take the old η·ΔW out of the weight"),
            (BranchWhenMerged, "η·ΔW is counted twice"),
            (UnmergeTwice, "the base weight did not come back"),
            (MergeOnTopOfMerge, "the weight holds W + 1.3·ΔW, the old 1·ΔW plus the new 0.3·ΔW"),
            (NoBiasWhenMerged, "expected the output of base weight W + 1·ΔW"),
        ],
    ),
]
test_check_passes_on_the_reference, test_check_explains_a_wrong_answer = check_tests(CASES)


def test_a_prediction_written_as_a_list_is_read_as_the_pair() -> None:
    """Exercise 4.7: [True, False] is the answer (True, False); a wrong list is still wrong."""
    checks.check_eta_prediction([True, False])
    with pytest.raises(CheckError, match="one layer computes"):
        checks.check_eta_prediction([False, False])
