"""lokr_edu against peft (installed from PyPI): the same factors give the same outputs.

Each test builds one layer twice, wraps it with peft and with lokr_edu, copies lokr_edu's
(randomized) factor values into peft's, and compares outputs and ΔW in fp32 (relative error
≤ 1e-5). Where the two libraries follow different conventions, a test says so by name and
asserts the difference:
- LoKr with both Kronecker factors full: LyCORIS and lokr_edu use scale 1 (no rank is
  involved), peft keeps α/r (test_lokr_with_both_factors_full_differs_from_peft_by_alpha_over_r).
- LoKr factorization with a factor larger than √dim: peft returns (factor, dim/factor)
  unsorted, so its W1 is the large factor (test_lokr_factorization_differs_from_peft_...).
- LoKr initialization: both start at ΔW = 0, but peft zeroes W1 and LyCORIS / lokr_edu zero W2
  (peft's init_weights="lycoris" follows LyCORIS) (test_lokr_initialization_differs_...).
And the peft file format: lokr_edu's peft-format file loads into a peft model, and a peft
`save_pretrained` folder loads with `load_adapter` (r and α from its adapter_config.json).
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model, set_peft_model_state_dict
from peft.tuners.lokr.layer import factorization
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_sd import randomize_adapters
from torch import nn

from lokr_edu.adapters import inject
from lokr_edu.io import load_adapter, save_adapter
from lokr_edu.kron import factorize

# (layer factory, input shape): prime and non-square dimensions, Linear, Conv2d 1×1 and 3×3
LAYERS = {
    "linear 13->7": (lambda: nn.Linear(13, 7), (3, 13)),
    "linear 64->96": (lambda: nn.Linear(64, 96), (2, 5, 64)),
    "linear 30->17": (lambda: nn.Linear(30, 17), (4, 30)),
    "conv1x1 12->20": (lambda: nn.Conv2d(12, 20, 1), (2, 12, 4, 4)),
    "conv3x3 8->16": (lambda: nn.Conv2d(8, 16, 3, padding=1), (2, 8, 5, 5)),
    "conv3x3 7->10 stride 2": (lambda: nn.Conv2d(7, 10, 3, stride=2), (2, 7, 9, 9)),
}
PEFT_CONFIGS = {
    "lora": lambda r, a, **kw: LoraConfig(r=r, lora_alpha=a, target_modules=["0"], **kw),
    "loha": lambda r, a, **kw: LoHaConfig(r=r, alpha=a, target_modules=["0"], **kw),
    "lokr": lambda r, a, **kw: LoKrConfig(r=r, alpha=a, target_modules=["0"], **kw),
}
PEFT_NAMES = {"lora_down": "lora_A", "lora_up": "lora_B"}  # the rest keep LyCORIS's names


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).norm() / theirs.norm()).item()


def pair(layer: str, method: str, rank: int, alpha: float, **options):
    """(our model, peft's model, input): the same base weights and the same factor values."""
    build, shape = LAYERS[layer]
    torch.manual_seed(list(LAYERS).index(layer))
    base = nn.Sequential(build())
    ours = nn.Sequential(build())
    ours.load_state_dict(base.state_dict())
    peft_options = {"decompose_both": True} if options.get("decompose_both") else {}
    theirs = get_peft_model(base, PEFT_CONFIGS[method](rank, alpha, **peft_options))
    inject(ours, "0", method, rank=rank, alpha=alpha, **options)
    randomize_adapters(ours)
    peft_layer = theirs.base_model.model[0]
    with torch.no_grad():
        for name, value in ours[0].adapters["default"].named_parameters():
            store = getattr(peft_layer, PEFT_NAMES.get(name, name))["default"]
            store = store.weight if isinstance(store, nn.Module) else store
            assert store.shape == value.shape, f"{name}: peft {store.shape}, ours {value.shape}"
            store.copy_(value)
    return ours, theirs, torch.randn(shape, generator=torch.Generator().manual_seed(9))


def assert_same(ours: nn.Module, theirs: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        assert relative_error(ours(x), theirs(x)) <= 1e-5
        ours_delta = ours[0].adapters["default"].delta_weight()
        peft_delta = theirs.base_model.model[0].get_delta_weight("default")
        assert relative_error(ours_delta, peft_delta) <= 1e-5


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("method", ["lora", "loha"])
def test_lora_and_loha_match_peft(layer: str, method: str) -> None:
    assert_same(*pair(layer, method, rank=2, alpha=3.0))


@pytest.mark.parametrize("layer", LAYERS)
def test_lokr_matches_peft_when_a_factor_is_low_rank(layer: str) -> None:
    # r = 1 keeps W2 low-rank on every shape here, so both libraries scale by α/r
    ours, theirs, x = pair(layer, "lokr", rank=1, alpha=3.0)
    assert "lokr_w2_a" in dict(ours[0].adapters["default"].named_parameters())
    assert_same(ours, theirs, x)


def test_lokr_with_both_factors_decomposed_matches_peft() -> None:
    ours, theirs, x = pair("linear 64->96", "lokr", rank=1, alpha=3.0, decompose_both=True)
    names = set(dict(ours[0].adapters["default"].named_parameters()))
    assert names == {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}
    assert_same(ours, theirs, x)


@pytest.mark.parametrize("layer", ["linear 64->96", "conv1x1 12->20", "conv3x3 8->16"])
def test_lokr_with_both_factors_full_matches_peft_when_alpha_equals_r(layer: str) -> None:
    ours, theirs, x = pair(layer, "lokr", rank=8, alpha=8.0)  # 8 ≥ max(c, d)/2: W2 full
    assert set(dict(ours[0].adapters["default"].named_parameters())) == {"lokr_w1", "lokr_w2"}
    assert_same(ours, theirs, x)


@pytest.mark.upstream
def test_lokr_with_both_factors_full_differs_from_peft_by_alpha_over_r() -> None:
    """A difference of convention: with W1 and W2 both full there is no rank in ΔW, and
    LyCORIS (so lokr_edu) uses scale 1 and ignores α; peft still multiplies by α/r."""
    ours, theirs, _ = pair("linear 64->96", "lokr", rank=8, alpha=2.0)
    assert set(dict(ours[0].adapters["default"].named_parameters())) == {"lokr_w1", "lokr_w2"}
    ours_delta = ours[0].adapters["default"].delta_weight()
    peft_delta = theirs.base_model.model[0].get_delta_weight("default")
    assert torch.allclose(peft_delta, (2.0 / 8) * ours_delta, atol=1e-6)


@pytest.mark.upstream
def test_lokr_factorization_differs_from_peft_when_factor_divides_and_exceeds_sqrt() -> None:
    """peft returns (factor, dim/factor) unsorted; LyCORIS and lokr_edu put the smaller first.
    With factor 16 on a 64 × 64 layer, peft's W1 is 16 × 16 and its W2 4 × 4; lokr_edu's W1 is
    4 × 4 and its W2 16 × 16. Both span the same kind of ΔW, but a file from one does not fit
    the other's layer layout, so factor values cannot be exchanged for such a factor."""
    assert factorization(64, 16) == (16, 4) and factorize(64, 16) == (4, 16)
    assert factorization(64, 4) == factorize(64, 4) == (4, 16)  # factor ≤ √dim: they agree
    theirs = get_peft_model(
        nn.Sequential(nn.Linear(64, 64)), LoKrConfig(r=1, target_modules=["0"], decompose_factor=16)
    )
    ours = nn.Sequential(nn.Linear(64, 64))
    inject(ours, "0", "lokr", rank=1, factor=16)
    peft_layer = theirs.base_model.model[0]
    assert tuple(peft_layer.lokr_w1["default"].shape) == (16, 16)
    assert tuple(ours[0].adapters["default"].lokr_w1.shape) == (4, 4)


@pytest.mark.upstream
def test_lokr_initialization_differs_from_peft_but_both_start_at_zero() -> None:
    """Both make ΔW = 0 at the start, by zeroing different factors: peft's default zeroes W1,
    LyCORIS and lokr_edu zero W2 (peft's init_weights="lycoris" does the same as LyCORIS)."""
    zero_factors = {}
    for init in (True, "lycoris"):
        model = get_peft_model(
            nn.Sequential(nn.Linear(16, 16)),
            LoKrConfig(r=2, alpha=2, target_modules=["0"], init_weights=init),
        )
        layer = model.base_model.model[0]
        assert torch.count_nonzero(layer.get_delta_weight("default")) == 0
        zero_factors[init] = {
            n
            for n in ["lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"]
            if "default" in getattr(layer, n)
            and torch.count_nonzero(getattr(layer, n)["default"]) == 0
        }
    ours = nn.Sequential(nn.Linear(16, 16))
    inject(ours, "0", "lokr", rank=2)
    zero_ours = {
        n for n, p in ours[0].adapters["default"].named_parameters() if torch.count_nonzero(p) == 0
    }
    assert torch.count_nonzero(ours[0].adapters["default"].delta_weight()) == 0
    assert zero_ours == {"lokr_w2"}  # LyCORIS: W2 starts at zero, W1 random
    assert zero_factors[True] == {"lokr_w1"}  # peft: W1 starts at zero, W2 random
    assert zero_factors["lycoris"] == zero_ours


# ---------------------------------------------------------------------------------------------
# the peft file format
# ---------------------------------------------------------------------------------------------


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 31), nn.GELU(), nn.Linear(31, 5)
    )


def test_our_peft_file_loads_into_peft_with_the_same_outputs(tmp_path) -> None:
    ours = mlp()
    inject(ours, ["0", "2"], "lora", rank=4, alpha=8.0)
    inject(ours, ["4"], "lora", rank=2, alpha=1.0)  # other rank and α: rank/alpha_pattern
    randomize_adapters(ours)
    path = save_adapter(ours, tmp_path / "adapter_model.safetensors", format="peft")
    with safe_open(str(path), framework="pt") as f:
        config = json.loads(f.metadata()["lora_adapter_metadata"])
    assert config["rank_pattern"] == {"4": 2} and config["alpha_pattern"] == {"4": 1.0}
    theirs = get_peft_model(mlp(), LoraConfig(**config))
    result = set_peft_model_state_dict(theirs, load_file(str(path)))
    assert not result.unexpected_keys
    x = torch.randn(6, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert relative_error(ours(x), theirs(x)) <= 1e-5


def test_a_peft_save_pretrained_folder_loads_with_alpha_from_its_config(tmp_path) -> None:
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["0", "2", "4"],
        rank_pattern={"4": 2},
        alpha_pattern={"4": 1},
    )
    theirs = get_peft_model(mlp(), config)
    randomize_adapters(theirs)
    theirs.save_pretrained(str(tmp_path))  # adapter_model.safetensors + adapter_config.json
    ours = mlp()
    assert load_adapter(ours, tmp_path / "adapter_model.safetensors") == ["0", "2", "4"]
    assert ours[0].adapters["default"].alpha.item() == 8.0
    assert ours[4].adapters["default"].alpha.item() == 1.0
    x = torch.randn(6, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert relative_error(ours(x), theirs(x)) <= 1e-5
