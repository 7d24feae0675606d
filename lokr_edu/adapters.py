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
from lokr_edu.lowrank import (
    adapter_shapes,
    alpha_scale,
    loha_delta,
    lokr_delta,
    lokr_scale,
    lora_delta,
)

__all__ = [
    "ADAPTERS",
    "ADAPTER_METHODS",
    "Adapter",
    "LoRA",
    "LoHa",
    "LoKr",
    "make_adapter",
    "AdapterLayer",
    "adapter_layers",
    "inject",
    "set_strength",
    "enable",
    "disable",
    "merge",
    "unmerge",
]

WRAPPABLE = (nn.Linear, nn.Conv2d)


def _param_name(key: str) -> str:
    """LyCORIS key -> attribute name: "lora_down.weight" -> "lora_down"; others unchanged."""
    return key.removesuffix(".weight")


def tensor_key(attribute: str) -> str:
    """Attribute name -> LyCORIS / kohya key: "lora_down" -> "lora_down.weight" (the two LoRA
    factors are stored as a Linear's weight); others unchanged. The inverse of `_param_name`."""
    return f"{attribute}.weight" if attribute in ("lora_down", "lora_up") else attribute


class Adapter(nn.Module):
    """What LoRA, LoHa and LoKr share: one adapter's factors for one layer, and ΔW from them.

    A subclass names its `method`, the factors it initialises to zero (`zero_factors`, so that
    ΔW = 0 and training starts from the base model, as in kohya / LyCORIS), and computes
    `delta_weight()`; it may also apply ΔW to x without forming it (`apply`). The factors carry
    LyCORIS's names and shapes, from `lowrank.adapter_shapes(method, ...)`; `shapes` (LyCORIS
    key -> shape) overrides them: `lokr_edu.io` uses it to rebuild an adapter as a file stores it.
    `alpha` is a buffer (not trained; files store it); alpha None (or 0, as kohya reads it)
    means α = r. The scale it implies is a Python float, `self.scale`, fixed here and refreshed
    when a state dict is loaded: forward never reads a tensor back to the host (that would
    stall a GPU once per layer per step).
    Build one with `make_adapter(method, base, rank, ...)` or the subclass itself.
    """

    method: str = ""
    zero_factors: tuple[str, ...] = ()

    def __init__(
        self,
        base: nn.Linear | nn.Conv2d,
        rank: int,
        alpha: float | None = None,
        *,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        shapes: dict[str, tuple[int, ...]] | None = None,
        **layout: object,  # factor, decompose_both, full_matrix: see lowrank.adapter_shapes
    ) -> None:
        super().__init__()
        if not isinstance(base, WRAPPABLE):
            raise ValueError(f"base must be nn.Linear or nn.Conv2d, got {type(base).__name__}")
        if isinstance(base, nn.Conv2d) and base.groups != 1:
            raise ValueError(f"base: grouped convolutions (groups={base.groups}) are not supported")
        for label, p in [("rank_dropout", rank_dropout), ("module_dropout", module_dropout)]:
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{label} must be in [0, 1), got {p}")
        self.rank = rank
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout
        weight = base.weight
        self.weight_shape = tuple(weight.shape)  # (m, n) or (m, n, kh, kw)
        m, n, kernel = weight.shape[0], weight.shape[1], tuple(weight.shape[2:])
        if shapes is None:
            shapes = adapter_shapes(self.method, m, n, rank, kernel_size=kernel or None, **layout)
        options = {"device": weight.device, "dtype": weight.dtype}
        for key, shape in shapes.items():
            if key != "alpha":
                setattr(self, _param_name(key), nn.Parameter(torch.empty(shape, **options)))
        stored_alpha = float(alpha) if alpha else float(rank)
        self.register_buffer("alpha", torch.tensor(stored_alpha, dtype=weight.dtype))
        self._set_alpha(stored_alpha)
        self.register_load_state_dict_post_hook(Adapter._alpha_from_buffer)
        self.reset_parameters()

    def _set_alpha(self, alpha: float) -> None:
        """Cache α and the scale α/r as Python floats (LoKr overrides the rule)."""
        self.alpha_value, self.scale = alpha, alpha_scale(alpha, self.rank)

    @staticmethod
    def _alpha_from_buffer(module: Adapter, incompatible_keys: object) -> None:
        module._set_alpha(float(module.alpha))  # after load_state_dict: once, not per forward

    @property
    def keys(self) -> list[str]:
        """The LyCORIS / kohya names of this adapter's tensors, alpha included."""
        names = [n for n, _ in self.named_parameters(recurse=False)]
        return [tensor_key(n) for n in names] + ["alpha"]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Zero the `zero_factors`, and draw the others at random (`init_random`)."""
        for name, p in self.named_parameters(recurse=False):
            if name in self.zero_factors:
                nn.init.zeros_(p)
            else:
                self.init_random(name, p)

    def init_random(self, name: str, p: nn.Parameter) -> None:
        """Kaiming-uniform, as nn.Linear initialises its weight (LoHa overrides)."""
        nn.init.kaiming_uniform_(p.view(p.shape[0], -1), a=math.sqrt(5))

    def delta_weight(self) -> Tensor:
        """ΔW in the base weight's shape, (m, n) or (m, n, kh, kw), scale applied, η not."""
        raise NotImplementedError

    def apply_delta(self, x: Tensor, base: nn.Linear | nn.Conv2d) -> Tensor:
        """ΔW applied to x: by default, build ΔW and run the base layer's operation with it."""
        y = _apply_weight(x, self.delta_weight(), base)
        return self._drop_output_channels(y, base) if self.training else y

    def forward(self, x: Tensor, base: nn.Linear | nn.Conv2d) -> Tensor:
        """ΔW applied to x with the base layer's convolution settings (no bias, no η)."""
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return torch.zeros((), dtype=x.dtype, device=x.device)
        return self.apply_delta(x, base)

    def _drop_output_channels(self, y: Tensor, base: nn.Linear | nn.Conv2d) -> Tensor:
        """LyCORIS's rank dropout for LoHa / LoKr: drop whole output rows of ΔW, i.e. output
        channels of ΔW·x, each with probability rank_dropout."""
        return _drop_channels(y, self.rank_dropout, base, rescale=False)


class LoRA(Adapter):
    """LoRA (chapter 02): ΔW = (α/r)·up @ down, applied as up(down(x)), never formed.

    lora_down (r, n[, kh, kw]) is Kaiming-uniform, lora_up (m, r[, 1, 1]) is zero: ΔW = 0, and
    up's gradient is not, because down is not zero.
    """

    method = "lora"
    zero_factors = ("lora_up",)

    def delta_weight(self) -> Tensor:
        delta = lora_delta(self.lora_down.flatten(1), self.lora_up.flatten(1), self.alpha_value)
        return delta.reshape(self.weight_shape)  # (m, n·kh·kw) -> (m, n, kh, kw)

    def apply_delta(self, x: Tensor, base: nn.Linear | nn.Conv2d) -> Tensor:
        hidden = _apply_weight(x, self.lora_down, base)  # (..., r) or (N, r, H', W')
        if self.training:  # kohya's rank dropout: drop ranks, rescale the rest
            hidden = _drop_channels(hidden, self.rank_dropout, base, rescale=True)
        up = self.lora_up.to(hidden.dtype)
        if isinstance(base, nn.Linear):
            return F.linear(hidden, up) * self.scale
        return F.conv2d(hidden, up) * self.scale


class LoHa(Adapter):
    """LoHa (chapter 03): ΔW = (α/r)·(w1a @ w1b) ⊙ (w2a @ w2b), built, then applied.

    hada_w2_a is zero (one Hadamard factor is 0, so ΔW = 0); the other three are normal, the
    "_b" factors with std 1 and the "_a" factors with std 0.1, as LyCORIS initialises them.
    """

    method = "loha"
    zero_factors = ("hada_w2_a",)

    def init_random(self, name: str, p: nn.Parameter) -> None:
        nn.init.normal_(p, std=1.0 if name.endswith("_b") else 0.1)

    def delta_weight(self) -> Tensor:
        delta = loha_delta(
            self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.alpha_value
        )
        return delta.reshape(self.weight_shape)  # (m, n·kh·kw) -> (m, n, kh, kw)


class LoKr(Adapter):
    """LoKr (chapters 03–04): ΔW = scale·W1 ⊗ W2, applied without building it (`kron_apply`).

    W1 (a × b) is lokr_w1, or lokr_w1_a @ lokr_w1_b; W2 (c × d[, kh, kw]) is lokr_w2, or
    lokr_w2_a @ lokr_w2_b (the layout `lowrank.adapter_shapes` picks from the rank). W2 starts
    at zero (lokr_w2, or lokr_w2_b), W1 Kaiming-uniform. The scale is `lowrank.lokr_scale`:
    α/r with r read off a low-rank factor, 1 when both are full (LyCORIS then stores α = r).
    `lokr_mode` picks how ΔW meets x: "auto", "reshape" or "materialize" (`lokr_apply`).
    """

    method = "lokr"
    zero_factors = ("lokr_w2", "lokr_w2_b")

    def __init__(self, *args: object, lokr_mode: str = "auto", **options: object) -> None:
        if lokr_mode not in MODES:
            raise ValueError(f"lokr_mode must be one of {MODES}, got {lokr_mode!r}")
        self.lokr_mode = lokr_mode
        super().__init__(*args, **options)

    def _set_alpha(self, alpha: float) -> None:
        names = dict(self.named_parameters(recurse=False))
        low_rank = names.get("lokr_w1_a", names.get("lokr_w2_a"))  # (·, r), or None: both full
        if low_rank is None:  # no rank: LyCORIS stores α = r, and the scale is 1 regardless
            alpha = float(self.rank)
            self.alpha.fill_(alpha)
        self.alpha_value = alpha
        self.scale = lokr_scale(alpha, None if low_rank is None else low_rank.shape[1])

    def _w1(self) -> dict[str, Tensor]:
        """W1 as lokr_delta's keywords: {"w1": (a, b)} or {"w1a": (a, r), "w1b": (r, b)}."""
        names = dict(self.named_parameters(recurse=False))
        if "lokr_w1" in names:
            return {"w1": names["lokr_w1"]}
        return {"w1a": names["lokr_w1_a"], "w1b": names["lokr_w1_b"]}

    def _w2(self) -> dict[str, Tensor]:
        """W2 as lokr_delta's keywords: {"w2": (c, d[, kh, kw])} or {"w2a": (c, r), "w2b": ...}."""
        names = dict(self.named_parameters(recurse=False))
        if "lokr_w2" in names:
            return {"w2": names["lokr_w2"]}
        return {"w2a": names["lokr_w2_a"], "w2b": names["lokr_w2_b"]}

    def delta_weight(self) -> Tensor:
        # a full conv W2 is (c, d, kh, kw); as a (c, d·kh·kw) matrix its Kronecker product
        # with W1 (a, b) is exactly ΔW flattened to (a·c, b·d·kh·kw).
        w2 = {k: v.flatten(1) if k == "w2" else v for k, v in self._w2().items()}
        delta = lokr_delta(**self._w1(), **w2, alpha=self.alpha_value)
        return delta.reshape(self.weight_shape)  # (m, n·kh·kw) -> (m, n, kh, kw)

    def apply_delta(self, x: Tensor, base: nn.Linear | nn.Conv2d) -> Tensor:
        w1 = self._w1()
        W1 = w1["w1"] if "w1" in w1 else w1["w1a"] @ w1["w1b"]  # (a, b): small, formed
        w2 = self._w2()
        W2 = w2["w2"] if "w2" in w2 else (w2["w2a"], w2["w2b"])  # (c, r), (r, d·kh·kw): thin
        conv = None
        if isinstance(base, nn.Conv2d):
            conv = {"stride": base.stride, "padding": base.padding, "dilation": base.dilation}
        kernel_size = tuple(self.weight_shape[2:]) or None
        y = lokr_apply(x, W1, W2, self.scale, conv, mode=self.lokr_mode, kernel_size=kernel_size)
        return self._drop_output_channels(y, base) if self.training else y


ADAPTERS: dict[str, type[Adapter]] = {"lora": LoRA, "loha": LoHa, "lokr": LoKr}
ADAPTER_METHODS = tuple(ADAPTERS)


def make_adapter(
    method: str, base: nn.Linear | nn.Conv2d, rank: int, alpha: float | None = None, **options
) -> Adapter:
    """The adapter of `method` ("lora", "loha" or "lokr") for one layer; options go to its class
    (rank_dropout, module_dropout, shapes; factor, decompose_both, full_matrix; lokr_mode)."""
    if method not in ADAPTERS:
        raise ValueError(f"method must be one of {ADAPTER_METHODS}, got {method!r}")
    if method != "lokr" and "lokr_mode" in options:
        if options["lokr_mode"] not in MODES:
            raise ValueError(f"lokr_mode must be one of {MODES}, got {options['lokr_mode']!r}")
        options = {k: v for k, v in options.items() if k != "lokr_mode"}  # LoKr's alone
    return ADAPTERS[method](base, rank, alpha, **options)


def _drop_channels(t: Tensor, p: float, base: nn.Module, *, rescale: bool) -> Tensor:
    """Zero each channel of t (the last axis after a Linear, axis 1 after a Conv2d) with
    probability p, and with `rescale` divide the kept ones by 1 − p (dropout's rule)."""
    if not p:
        return t
    axis = t.dim() - 1 if isinstance(base, nn.Linear) else 1
    shape = [1] * t.dim()
    shape[axis] = t.shape[axis]
    keep = (torch.rand(t.shape[axis], device=t.device) > p).to(t.dtype).view(shape)
    return t * keep / (1.0 - p) if rescale else t * keep


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
        new[module_name] = make_adapter(method, base, rank, alpha, **options)
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
