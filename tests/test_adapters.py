"""Chapter 04's adapter layers, in peft's test discipline: every method, Linear and Conv2d, the
same outputs before and after merge, with adapters disabled, and at any strength."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lokr_edu
from lokr_edu.adapters import (
    AdapterLayer,
    LoKr,
    adapter_layers,
    disable,
    enable,
    inject,
    merge,
    set_strength,
    unmerge,
)

METHODS = ["lora", "loha", "lokr"]
LAYERS = {
    "linear": (lambda: nn.Linear(12, 20), (3, 12)),
    "linear_prime": (lambda: nn.Linear(13, 7), (2, 5, 13)),
    "conv1x1": (lambda: nn.Conv2d(8, 12, 1), (2, 8, 4, 4)),
    "conv3x3": (lambda: nn.Conv2d(6, 10, 3, stride=2, padding=1), (2, 6, 7, 7)),
}


def make(layer: str, method: str, rank: int = 2, **options) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    build, x_shape = LAYERS[layer]
    model = nn.Sequential(build(), nn.Tanh())
    inject(model, "0", method=method, rank=rank, alpha=3.0, **options)
    with torch.no_grad():  # move ΔW away from zero so every check below has something to see
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.3)
    return model, torch.randn(x_shape)


def reference(model: nn.Module, x: torch.Tensor, eta: float = 1.0) -> torch.Tensor:
    """The definition: the base layer with weight W + η·ΔW."""
    layer = model[0]
    W = layer.base.weight + eta * layer.adapters["default"].delta_weight()
    base = layer.base
    if isinstance(base, nn.Linear):
        return torch.tanh(F.linear(x, W, base.bias))
    return torch.tanh(F.conv2d(x, W, base.bias, base.stride, base.padding, base.dilation))


def test_public_names() -> None:
    for name in ["inject", "merge", "unmerge", "set_strength"]:
        assert getattr(lokr_edu, name) is getattr(lokr_edu.adapters, name)


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("method", METHODS)
def test_new_adapter_starts_at_the_base_model(layer: str, method: str) -> None:
    torch.manual_seed(0)
    build, x_shape = LAYERS[layer]
    model = nn.Sequential(build())
    x = torch.randn(x_shape)
    before = model(x)
    inject(model, "0", method=method, rank=2)
    assert torch.equal(model(x), before)
    assert torch.count_nonzero(model[0].adapters["default"].delta_weight()) == 0


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("method", METHODS)
def test_forward_merge_unmerge_disable(layer: str, method: str) -> None:
    model, x = make(layer, method)
    base_weight = model[0].base.weight.clone()
    y = model(x)
    assert torch.allclose(y, reference(model, x), atol=1e-5)
    merge(model)
    assert torch.allclose(model(x), y, atol=1e-5)
    unmerge(model)
    assert torch.allclose(model[0].base.weight, base_weight, atol=1e-6)
    assert torch.allclose(model(x), y, atol=1e-6)
    disable(model)
    assert torch.allclose(model(x), reference(model, x, eta=0.0), atol=1e-6)
    enable(model)
    assert torch.allclose(model(x), y, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("eta", [0.0, 0.5, -1.0, 2.5])
def test_strength_scales_the_update(method: str, eta: float) -> None:
    model, x = make("conv3x3", method)
    at_one = reference(model, x, 1.0)
    set_strength(model, eta)
    assert torch.allclose(model(x), reference(model, x, eta), atol=1e-5)
    merge(model)
    set_strength(model, 1.0)  # re-merges with the new strength
    assert torch.allclose(model(x), at_one, atol=1e-5)


def test_only_adapter_parameters_are_trainable() -> None:
    model, x = make("linear", "lokr")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".adapters.default." in n for n in trainable)
    model(x).sum().backward()
    assert model[0].base.weight.grad is None
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_two_named_adapters_with_their_own_strengths() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10))
    x = torch.randn(4, 10)
    inject(model, "0", "lora", rank=2, name="style")
    inject(model, "0", "lokr", rank=2, name="subject")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    set_strength(model, 0.5, name="style")
    set_strength(model, -2.0, name="subject")
    layer = model[0]
    W = (
        layer.base.weight
        + 0.5 * layer.adapters["style"].delta_weight()
        - 2.0 * layer.adapters["subject"].delta_weight()
    )
    assert torch.allclose(model(x), F.linear(x, W, layer.base.bias), atol=1e-5)
    disable(model, name="subject")
    W_style = layer.base.weight + 0.5 * layer.adapters["style"].delta_weight()
    assert torch.allclose(model(x), F.linear(x, W_style, layer.base.bias), atol=1e-5)
    merge(model, name="style")
    assert layer.merged == {"style": 0.5}
    assert torch.allclose(model(x), F.linear(x, W_style, layer.base.bias), atol=1e-5)


def test_inject_by_suffix_and_regex_returns_what_it_wrapped() -> None:
    model = nn.ModuleDict(
        {
            "attn": nn.ModuleDict({n: nn.Linear(8, 8) for n in ["to_q", "to_k", "to_v"]}),
            "ff": nn.Linear(8, 8),
        }
    )
    assert inject(model, ["to_q", "attn.to_k"]) == ["attn.to_q", "attn.to_k"]
    assert inject(model, [r"attn\.to_.*"], name="second") == ["attn.to_q", "attn.to_k", "attn.to_v"]
    assert [n for n, _ in adapter_layers(model)] == ["attn.to_q", "attn.to_k", "attn.to_v"]
    assert isinstance(model["ff"], nn.Linear)


def _parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    ("targets", "kwargs", "message"),
    [
        (
            ["to_qq"],
            {},
            "pattern 'to_qq' matches no nn.Linear or nn.Conv2d in the model; "
            "close matches: ['to_q'",
        ),
        ([], {}, "targets: give at least one"),
        (["to_q"], {"method": "dora"}, "method must be one of"),
        (["to_q"], {"rank": 0}, "rank must be a positive integer"),
        (["to_q"], {"rank": 9}, "exceeds min"),
        (["to_q"], {"rank_dropout": 1.0}, "rank_dropout must be in [0, 1)"),
        (["to_q", "norm"], {}, "pattern 'norm' matches no"),
    ],
)
def test_bad_inject_raises_and_changes_nothing(targets, kwargs, message) -> None:
    model = nn.ModuleDict({"to_q": nn.Linear(8, 8), "norm": nn.LayerNorm(8)})
    before = _parameters(model)
    with pytest.raises(
        ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
    ):
        inject(model, targets, **kwargs)
    assert isinstance(model["to_q"], nn.Linear)
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_duplicate_adapter_name_and_unknown_name() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    inject(model, "0", rank=2)
    with pytest.raises(ValueError, match="already has an adapter called 'default'"):
        inject(model, "0", rank=2)
    with pytest.raises(ValueError, match=r"no adapter called 'x'; the model has \['default'\]"):
        set_strength(model, 1.0, name="x")
    with pytest.raises(ValueError, match="eta must be a finite number"):
        set_strength(model, float("nan"))
    with pytest.raises(ValueError, match="it has no adapters"):
        merge(nn.Sequential(nn.Linear(2, 2)))


def test_lokr_alpha_is_ignored_when_both_factors_are_full() -> None:
    base = nn.Linear(16, 16)
    full = LoKr(base, rank=8, alpha=1.0)  # r ≥ max(c, d)/2: W2 full, W1 full
    assert {n for n, _ in full.named_parameters()} == {"lokr_w1", "lokr_w2"}
    assert full.alpha.item() == 8.0  # stored as r, as LyCORIS does: scale 1
    low = LoKr(nn.Linear(64, 64), rank=2, alpha=1.0)
    assert low.alpha.item() == 1.0 and hasattr(low, "lokr_w2_a")


RATE = 0.25  # the dropout probability p in the tests below


def within_binomial_band(dropped: int, trials: int, p: float = RATE) -> bool:
    """dropped ~ Binomial(trials, p): within 4.5 standard deviations of trials·p."""
    return abs(dropped - trials * p) <= 4.5 * (trials * p * (1 - p)) ** 0.5


def channels(y: torch.Tensor, layer: str) -> torch.Tensor:
    """y's output channels first: (channels, everything else)."""
    return y.movedim(-1 if layer.startswith("linear") else 1, 0).flatten(1)


@pytest.mark.parametrize("layer", ["linear", "conv3x3"])
@pytest.mark.parametrize("method", METHODS)
def test_rank_dropout_rate_and_rescaling(method: str, layer: str) -> None:
    """Rank dropout in training (LyCORIS's rank_dropout): LoRA drops each of its r ranks, the
    channels between down and up, with probability p and rescales the kept ones by 1/(1 − p),
    as kohya's networks/lora.py does; LoHa and LoKr drop each output channel of ΔW·x with
    probability p and do not rescale (LyCORIS's default, rank_dropout_scale=False). A channel is
    dropped for the whole batch and every position at once."""
    model, x = make(layer, method, rank=4, rank_dropout=RATE)
    adapter, base = model[0].adapters["default"], model[0].base
    if method == "lora":  # up = [I; 0]: output channel k < r carries rank k alone
        with torch.no_grad():
            m, r = adapter.lora_up.shape[:2]
            adapter.lora_up.copy_(torch.eye(m, r).view_as(adapter.lora_up))
    adapter.eval()
    full = channels(adapter(x, base), layer)  # (channels, ·): no dropout in eval
    watched = full[:4] if method == "lora" else full  # the channels a drop can reach
    assert (watched.abs().amax(dim=1) > 1e-3).all()  # every one visibly nonzero
    rescale = 1 / (1 - RATE) if method == "lora" else 1.0
    adapter.train()
    torch.manual_seed(1)
    dropped = 0
    for _ in range(200):
        y = channels(adapter(x, base), layer)[: len(watched)]
        gone = (y == 0).all(dim=1)  # (channels,)
        kept = torch.isclose(y, rescale * watched, rtol=1e-5, atol=1e-6).all(dim=1)
        assert (gone ^ kept).all()  # each channel: all dropped, or all kept and rescaled
        dropped += int(gone.sum())
    assert within_binomial_band(dropped, 200 * len(watched)), dropped / (200 * len(watched))


@pytest.mark.parametrize("method", METHODS)
def test_module_dropout_skips_the_whole_adapter_at_its_rate(method: str) -> None:
    """Module dropout in training: with probability p the layer is its base alone for that
    forward (the whole adapter skipped), else the adapter acts in full, not rescaled (kohya,
    LyCORIS)."""
    model, x = make("linear", method, rank=4, module_dropout=RATE)
    with_adapter, base_alone = reference(model, x), torch.tanh(model[0].base(x))
    assert not torch.allclose(with_adapter, base_alone, atol=1e-3)
    model.train()
    torch.manual_seed(2)
    dropped = 0
    for _ in range(600):
        y = model(x)
        if torch.equal(y, base_alone):
            dropped += 1
        else:
            assert torch.allclose(y, with_adapter, atol=1e-5)
    assert within_binomial_band(dropped, 600), dropped / 600


@pytest.mark.parametrize("layer", ["linear", "conv3x3"])
@pytest.mark.parametrize("method", METHODS)
def test_dropouts_only_act_in_training(method: str, layer: str) -> None:
    """In eval mode a layer with rank and module dropout computes exactly what the same layer
    without dropout computes, every time."""
    plain, x = make(layer, method, rank=4)
    dropping, _ = make(layer, method, rank=4, rank_dropout=RATE, module_dropout=RATE)
    expected = plain(x)
    dropping.eval()
    assert all(torch.equal(dropping(x), expected) for _ in range(20))
    dropping.train()  # the same layer in training does drop (the flags reach the adapter)
    torch.manual_seed(3)
    assert any(not torch.allclose(dropping(x), expected) for _ in range(20))


def test_adapter_layer_repr_and_keys() -> None:
    model, _ = make("conv1x1", "lora")
    layer = model[0]
    assert isinstance(layer, AdapterLayer)
    assert "default: lora r=2 η=1.0" in repr(layer)
    assert layer.adapters["default"].keys == ["lora_down.weight", "lora_up.weight", "alpha"]
    assert layer.adapters["default"].lora_up.shape == (12, 2, 1, 1)
