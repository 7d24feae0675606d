"""Adapter layers (LoRA, LoHa, LoKr) around nn.Linear / nn.Conv2d, and the verbs that use them.

Defined in chapter 04 (notebooks/04_adapter_from_scratch.ipynb).

A wrapped layer computes, for its frozen base weight W and each of its named adapters i,

    y = base(x) + Σ_i η_i · (ΔW_i applied to x)          ΔW_i from lokr_edu.lowrank

where η_i is the adapter's strength (`set_strength`). `merge` folds η_i·ΔW_i into W instead and
`unmerge` takes it out again. The tensors of each adapter carry LyCORIS's names and shapes
(`lowrank.adapter_shapes`), so saving in the kohya / LyCORIS format is a renaming (`lokr_edu.io`).

    inject(model, ["to_q", "to_v"], method="lokr", rank=8)   # wrap, freeze the rest
    set_strength(model, 0.7); merge(model); unmerge(model); disable(model); enable(model)
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lokr_edu.kron_apply import MODES, lokr_apply
from lokr_edu.lowrank import _scale, adapter_shapes, loha_delta, lokr_delta, lokr_scale, lora_delta

__all__ = [
    "ADAPTER_METHODS",
    "Adapter",
    "AdapterLayer",
    "adapter_layers",
    "inject",
    "set_strength",
    "enable",
    "disable",
    "merge",
    "unmerge",
]

ADAPTER_METHODS = ("lora", "loha", "lokr")
WRAPPABLE = (nn.Linear, nn.Conv2d)


def _param_name(key: str) -> str:
    """LyCORIS key -> attribute name: "lora_down.weight" -> "lora_down"; others unchanged."""
    return key.removesuffix(".weight")


class Adapter(nn.Module):
    """One adapter's factors for one layer, and ΔW computed from them.

    Initialization makes ΔW = 0, so training starts from the base model, as in kohya / LyCORIS:
    - LoRA: lora_down is Kaiming-uniform, lora_up is zero (ΔW = up·down = 0, and the gradient of
      up is non-zero because down is not);
    - LoHa: hada_w2_a is zero (one Hadamard factor is 0), the other three are random;
    - LoKr: W2 is zero (lokr_w2, or lokr_w2_b when W2 is low-rank), W1 is Kaiming-uniform.
    `alpha` is a buffer (it is not trained; files store it); alpha None means α = r. The scale
    it implies (α/r, or LoKr's rule `lowrank.lokr_scale`) is a Python float, `self.scale`, fixed
    here and refreshed when a state dict is loaded: forward never reads a tensor back to the
    host (`.item()` would stall a GPU once per layer per step).
    `shapes` (LyCORIS key -> shape) overrides the layout that `lowrank.adapter_shapes` derives
    from the options: `lokr_edu.io` uses it to rebuild an adapter exactly as a file stores it.
    """

    def __init__(
        self,
        method: str,
        base: nn.Linear | nn.Conv2d,
        rank: int,
        alpha: float | None = None,
        *,
        factor: int = -1,
        decompose_both: bool = False,
        full_matrix: bool = False,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        shapes: dict[str, tuple[int, ...]] | None = None,
        lokr_mode: str = "auto",
    ) -> None:
        super().__init__()
        if lokr_mode not in MODES:
            raise ValueError(f"lokr_mode must be one of {MODES}, got {lokr_mode!r}")
        self.lokr_mode = lokr_mode
        if method not in ADAPTER_METHODS:
            raise ValueError(f"method must be one of {ADAPTER_METHODS}, got {method!r}")
        if not isinstance(base, WRAPPABLE):
            raise ValueError(f"base must be nn.Linear or nn.Conv2d, got {type(base).__name__}")
        if isinstance(base, nn.Conv2d) and base.groups != 1:
            raise ValueError(f"base: grouped convolutions (groups={base.groups}) are not supported")
        for label, p in [("rank_dropout", rank_dropout), ("module_dropout", module_dropout)]:
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{label} must be in [0, 1), got {p}")
        self.method, self.rank = method, rank
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout
        weight = base.weight
        self.weight_shape = tuple(weight.shape)  # (m, n) or (m, n, kh, kw)
        m, n, kernel = weight.shape[0], weight.shape[1], tuple(weight.shape[2:])
        if shapes is None:
            shapes = adapter_shapes(
                method,
                m,
                n,
                rank,
                kernel_size=kernel or None,
                factor=factor,
                decompose_both=decompose_both,
                full_matrix=full_matrix,
            )
        options = {"device": weight.device, "dtype": weight.dtype}
        for key, shape in shapes.items():
            if key == "alpha":
                continue
            setattr(self, _param_name(key), nn.Parameter(torch.empty(shape, **options)))
        both_full = method == "lokr" and "lokr_w1" in shapes and "lokr_w2" in shapes
        # alpha None (or 0, as kohya reads it) means α = r. LyCORIS stores alpha = r when both
        # LoKr factors are full: no rank is involved, the scale is 1 regardless.
        stored_alpha = float(rank) if not alpha or both_full else float(alpha)
        self.register_buffer("alpha", torch.tensor(stored_alpha, dtype=weight.dtype))
        self._set_scale(stored_alpha)
        self.register_load_state_dict_post_hook(Adapter._scale_from_buffer)
        self.reset_parameters()

    def _set_scale(self, alpha: float) -> None:
        """Cache α (a float) and the scale it gives: α/r for LoRA / LoHa, LoKr's rule for LoKr."""
        self.alpha_value = alpha
        if self.method == "lokr":
            low_rank = getattr(self, "lokr_w1_a", getattr(self, "lokr_w2_a", None))  # (·, r)
            self.scale = lokr_scale(alpha, None if low_rank is None else low_rank.shape[1])
        else:
            self.scale = _scale(alpha, self.rank)

    @staticmethod
    def _scale_from_buffer(module: Adapter, incompatible_keys: object) -> None:
        module._set_scale(float(module.alpha))  # after load_state_dict: once, not per forward

    @property
    def keys(self) -> list[str]:
        """The LyCORIS / kohya names of this adapter's tensors, alpha included."""
        names = [n for n, _ in self.named_parameters(recurse=False)]
        return [f"{n}.weight" if n in ("lora_down", "lora_up") else n for n in names] + ["alpha"]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for name, p in self.named_parameters(recurse=False):
            zero = name in ("lora_up", "hada_w2_a", "lokr_w2", "lokr_w2_b")
            if zero:
                nn.init.zeros_(p)
            elif name.startswith("hada"):
                nn.init.normal_(p, std=1.0 if name.endswith("_b") else 0.1)
            else:
                nn.init.kaiming_uniform_(p.view(p.shape[0], -1), a=math.sqrt(5))

    def delta_weight(self) -> Tensor:
        """ΔW in the base weight's shape, (m, n) or (m, n, kh, kw), alpha/r applied, η not."""
        alpha = self.alpha_value
        if self.method == "lora":
            delta = lora_delta(self.lora_down.flatten(1), self.lora_up.flatten(1), alpha)
        elif self.method == "loha":
            delta = loha_delta(
                self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, alpha
            )
        else:
            # a full conv W2 is (c, d, kh, kw); as a (c, d·kh·kw) matrix its Kronecker product
            # with W1 (a, b) is exactly ΔW flattened to (a·c, b·d·kh·kw).
            delta = lokr_delta(
                w1=getattr(self, "lokr_w1", None),
                w1a=getattr(self, "lokr_w1_a", None),
                w1b=getattr(self, "lokr_w1_b", None),
                w2=self.lokr_w2.flatten(1) if hasattr(self, "lokr_w2") else None,
                w2a=getattr(self, "lokr_w2_a", None),
                w2b=getattr(self, "lokr_w2_b", None),
                alpha=alpha,
            )
        return delta.reshape(self.weight_shape)  # (m, n·kh·kw) -> (m, n, kh, kw)

    def forward(self, x: Tensor, base: nn.Linear | nn.Conv2d) -> Tensor:
        """ΔW applied to x with the base layer's convolution settings (no bias, no η)."""
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return torch.zeros((), dtype=x.dtype, device=x.device)
        if self.method == "lora":
            return self._lora_forward(x, base)
        if self.method == "lokr":
            return self._lokr_forward(x, base)
        delta = self.delta_weight()
        if self.training and self.rank_dropout:  # LyCORIS: drop whole output rows of ΔW
            keep = torch.rand(delta.shape[0], device=delta.device) > self.rank_dropout
            delta = delta * keep.to(delta.dtype).view(-1, *[1] * (delta.dim() - 1))
        return _apply_weight(x, delta, base)

    def _lokr_forward(self, x: Tensor, base: nn.Linear | nn.Conv2d) -> Tensor:
        """LoKr without building W1 ⊗ W2 when that is cheaper (kron_apply, chapter 04 §9)."""
        W1 = self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a @ self.lokr_w1_b
        if hasattr(self, "lokr_w2"):
            W2 = self.lokr_w2  # (c, d) or (c, d, kh, kw)
        else:
            W2 = (self.lokr_w2_a, self.lokr_w2_b)  # (c, r), (r, d·kh·kw): kept apart, thin
        conv = None
        if isinstance(base, nn.Conv2d):
            conv = {"stride": base.stride, "padding": base.padding, "dilation": base.dilation}
        kernel_size = tuple(self.weight_shape[2:]) or None
        y = lokr_apply(x, W1, W2, self.scale, conv, mode=self.lokr_mode, kernel_size=kernel_size)
        if self.training and self.rank_dropout:  # LyCORIS: drop whole output rows of ΔW
            keep = (
                torch.rand(y.shape[-1] if conv is None else y.shape[1], device=y.device)
                > self.rank_dropout
            )
            y = (
                y * keep.to(y.dtype).view(-1, *[1] * (y.dim() - 2))
                if conv
                else y * keep.to(y.dtype)
            )
        return y

    def _lora_forward(self, x: Tensor, base: nn.Linear | nn.Conv2d) -> Tensor:
        """LoRA on the fly (chapter 02): up(down(x))·α/r, never forming up·down."""
        hidden = _apply_weight(x, self.lora_down, base)  # (..., r) or (N, r, H', W')
        if self.training and self.rank_dropout:  # kohya: drop ranks, rescale the rest
            shape = (
                (hidden.shape[-1],) if isinstance(base, nn.Linear) else (1, hidden.shape[1], 1, 1)
            )
            keep = (torch.rand(shape, device=hidden.device) > self.rank_dropout).to(hidden.dtype)
            hidden = hidden * keep / (1.0 - self.rank_dropout)
        if isinstance(base, nn.Linear):
            return F.linear(hidden, self.lora_up.to(hidden.dtype)) * self.scale
        return F.conv2d(hidden, self.lora_up.to(hidden.dtype)) * self.scale


def _apply_weight(x: Tensor, weight: Tensor, base: nn.Linear | nn.Conv2d) -> Tensor:
    if isinstance(base, nn.Linear):
        return F.linear(x, weight.to(x.dtype))
    return F.conv2d(x, weight.to(x.dtype), None, base.stride, base.padding, base.dilation)


class AdapterLayer(nn.Module):
    """A frozen nn.Linear / nn.Conv2d with named adapters, each with a strength η.

    forward: base(x) + Σ η_i·adapter_i(x) over enabled adapters that are not merged.
    """

    def __init__(self, base: nn.Linear | nn.Conv2d) -> None:
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self.strength: dict[str, float] = {}
        self.enabled: dict[str, bool] = {}
        self.merged: dict[str, float] = {}  # name -> the η that was folded into base.weight

    def add(self, name: str, adapter: Adapter) -> None:
        if name in self.adapters:
            raise ValueError(f"name: this layer already has an adapter called {name!r}")
        self.adapters[name] = adapter
        self.strength[name], self.enabled[name] = 1.0, True

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        for name, adapter in self.adapters.items():
            if self.enabled[name] and name not in self.merged and self.strength[name] != 0:
                y = y + self.strength[name] * adapter(x, self.base)
        return y

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """W ← W + η·ΔW for one adapter; its branch is then skipped in forward."""
        if name not in self.merged and self.enabled[name]:
            delta = self.adapters[name].delta_weight().to(self.base.weight.dtype)
            self.base.weight += self.strength[name] * delta
            self.merged[name] = self.strength[name]

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        """W ← W − η·ΔW with the η that was merged: the base weight comes back (to rounding)."""
        if name in self.merged:
            delta = self.adapters[name].delta_weight().to(self.base.weight.dtype)
            self.base.weight -= self.merged.pop(name) * delta

    def extra_repr(self) -> str:
        parts = [
            f"{n}: {a.method} r={a.rank} η={self.strength[n]}"
            + ("" if self.enabled[n] else " disabled")
            + (" merged" if n in self.merged else "")
            for n, a in self.adapters.items()
        ]
        return ", ".join(parts)


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """(module name, layer) for every AdapterLayer in the model, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def _matches(name: str, pattern: str) -> bool:
    """A pattern names a module by a dotted suffix ("to_q", "attn1.to_out.0") or, if it holds
    regex characters, by a regular expression matched against the whole name."""
    if any(ch in pattern for ch in "*?[]^$()|+\\"):
        return re.fullmatch(pattern, name) is not None
    return name == pattern or name.endswith("." + pattern)


def _wrappable(model: nn.Module) -> dict[str, nn.Module]:
    """Candidate modules by name: Linear/Conv2d not inside an AdapterLayer, and AdapterLayers."""
    found = {}
    for name, module in model.named_modules():
        inside = any(isinstance(model.get_submodule(p), AdapterLayer) for p in _parents(name))
        if not inside and isinstance(module, (*WRAPPABLE, AdapterLayer)):
            found[name] = module
    return found


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def inject(
    model: nn.Module,
    targets: str | Iterable[str],
    method: str = "lora",
    rank: int = 4,
    alpha: float | None = None,
    *,
    name: str = "default",
    **options: object,
) -> list[str]:
    """Wrap every nn.Linear / nn.Conv2d whose name matches a pattern; return the wrapped names.

    Patterns are dotted suffixes ("to_q", "to_out.0", "q_proj", "fc1") or regular expressions
    over the full module name. A pattern that matches nothing is an error that lists close
    matches. Afterwards only adapter parameters are trainable. Injecting into an already wrapped
    layer adds a second adapter under another `name`. `options` go to `Adapter` (factor,
    decompose_both, full_matrix, rank_dropout, module_dropout).
    """
    patterns = [targets] if isinstance(targets, str) else list(targets)
    if not patterns:
        raise ValueError("targets: give at least one module-name pattern")
    candidates = _wrappable(model)
    chosen: dict[str, nn.Module] = {}
    for pattern in patterns:
        hits = {n: m for n, m in candidates.items() if _matches(n, pattern)}
        if not hits:
            suffixes = sorted({n.rsplit(".", 1)[-1] for n in candidates} | set(candidates))
            close = difflib.get_close_matches(pattern, suffixes, n=5, cutoff=0.5)
            hint = f"; close matches: {close}" if close else ""
            raise ValueError(
                f"targets: pattern {pattern!r} matches no nn.Linear or nn.Conv2d in the model{hint}"
            )
        chosen.update(hits)
    # build every adapter before changing the model, so a bad option leaves it untouched
    new = {}
    for module_name, module in chosen.items():
        base = module.base if isinstance(module, AdapterLayer) else module
        if isinstance(module, AdapterLayer) and name in module.adapters:
            raise ValueError(f"name: {module_name} already has an adapter called {name!r}")
        new[module_name] = Adapter(method, base, rank, alpha, **options)
    for p in model.parameters():
        p.requires_grad_(False)
    for module_name, adapter in new.items():
        module = chosen[module_name]
        if not isinstance(module, AdapterLayer):
            module = AdapterLayer(module)
            parent_name, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module)
        module.add(name, adapter)
    for _, layer in adapter_layers(model):
        for adapter in layer.adapters.values():
            adapter.requires_grad_(True)
    return list(new)


def _select(model: nn.Module, name: str | None) -> Iterator[tuple[AdapterLayer, str]]:
    layers = list(adapter_layers(model))
    if not layers:
        raise ValueError("model: it has no adapters (use inject first)")
    names = {n for _, layer in layers for n in layer.adapters}
    if name is not None and name not in names:
        raise ValueError(f"name: no adapter called {name!r}; the model has {sorted(names)}")
    for _, layer in layers:
        for adapter_name in list(layer.adapters):
            if name is None or adapter_name == name:
                yield layer, adapter_name


def set_strength(model: nn.Module, eta: float, name: str | None = None) -> None:
    """Set η for one adapter (by name) or all; any real number. Merged adapters are re-merged."""
    eta = float(eta)
    if not math.isfinite(eta):
        raise ValueError(f"eta must be a finite number, got {eta}")
    for layer, adapter_name in _select(model, name):
        was_merged = adapter_name in layer.merged
        layer.unmerge(adapter_name)
        layer.strength[adapter_name] = eta
        if was_merged:
            layer.merge(adapter_name)


def enable(model: nn.Module, name: str | None = None) -> None:
    """Switch adapters back on (all, or the one called `name`)."""
    for layer, adapter_name in _select(model, name):
        layer.enabled[adapter_name] = True


def disable(model: nn.Module, name: str | None = None) -> None:
    """Switch adapters off: the model computes as its base (merged ones are unmerged first)."""
    for layer, adapter_name in _select(model, name):
        layer.unmerge(adapter_name)
        layer.enabled[adapter_name] = False


def merge(model: nn.Module, name: str | None = None) -> None:
    """Fold η·ΔW of the enabled adapters into the base weights (fused inference, chapter 02)."""
    for layer, adapter_name in _select(model, name):
        layer.merge(adapter_name)


def unmerge(model: nn.Module, name: str | None = None) -> None:
    """Take merged adapters back out of the base weights."""
    for layer, adapter_name in _select(model, name):
        layer.unmerge(adapter_name)
