"""lokr_edu.lowrank against the formulas and against the installed lycoris-lora and peft."""

from __future__ import annotations

import logging
import math

import pytest
import safetensors.torch
import torch
from lycoris.functional import factorization as lycoris_factorization
from lycoris.functional import locon as lycoris_locon
from lycoris.functional import loha as lycoris_loha
from lycoris.functional import lokr as lycoris_lokr
from lycoris.modules.locon import LoConModule
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule
from peft.tuners.lokr import LoKrConfig
from peft.tuners.lokr.layer import Linear as PeftLoKrLinear
from torch import nn

from lokr_edu.lowrank import (
    adapter_shapes,
    count_params,
    file_size_bytes,
    layout_shapes,
    loha_delta,
    lokr_delta,
    lokr_factors,
    lora_delta,
    safetensors_size_bytes,
)


@pytest.fixture(autouse=True)
def _quiet_lycoris():
    """LyCORIS logs "lora_dim too large ... full matrix mode" at WARNING; not needed here."""
    logger = logging.getLogger("LyCORIS")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


def g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=g(seed), dtype=torch.float64)


def randomize(module: nn.Module, seed: int = 0) -> None:
    gen = g(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))


def lycoris_forward_delta(module: nn.Module, base: nn.Linear) -> torch.Tensor:
    """ΔW that a LyCORIS module's forward adds: feed the identity, subtract the base."""
    eye = torch.eye(base.in_features)
    with torch.no_grad():
        return (module(eye) - base(eye)).T  # (m, n)


# ---------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------


def test_lora_delta_formula() -> None:
    down, up = randn(3, 7, seed=1), randn(5, 3, seed=2)
    assert torch.allclose(lora_delta(down, up), up @ down)
    assert torch.allclose(lora_delta(down, up, alpha=6), 2.0 * up @ down)
    assert torch.allclose(lora_delta(down, up, alpha=0), up @ down)  # kohya: alpha 0 means r
    assert torch.linalg.matrix_rank(lora_delta(down, up)).item() == 3


@pytest.mark.parametrize("alpha", [None, 1.0, 8.0])
def test_lora_delta_matches_lycoris(alpha: float | None) -> None:
    base = nn.Linear(24, 20)
    module = LoConModule("m", base, lora_dim=4, alpha=alpha)
    randomize(module)
    down, up = module.lora_down.weight.detach(), module.lora_up.weight.detach()
    ours = lora_delta(down, up, alpha)
    torch.testing.assert_close(ours, lycoris_forward_delta(module, base), rtol=1e-5, atol=1e-5)
    gamma = 1.0 if alpha is None else alpha / 4
    functional = lycoris_locon.diff_weight(down, up, None, gamma=gamma, backend="torch")
    torch.testing.assert_close(ours, functional)


def test_lora_delta_matches_peft() -> None:
    from peft.tuners.lora import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    layer = PeftLoraLinear(nn.Linear(24, 20), "default", r=4, lora_alpha=12, config=LoraConfig())
    randomize(layer.lora_B)
    A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    torch.testing.assert_close(lora_delta(A, B, alpha=12), layer.get_delta_weight("default"))


def test_lora_delta_bad_input() -> None:
    with pytest.raises(ValueError, match="up"):
        lora_delta(randn(3, 7), randn(5, 4))
    with pytest.raises(ValueError, match="rank r = 6"):
        lora_delta(randn(6, 7), randn(5, 6))
    with pytest.raises(ValueError, match="down"):
        lora_delta(torch.zeros(0, 7), torch.zeros(5, 0))
    with pytest.raises(ValueError, match="down must be a 2-D matrix"):
        lora_delta(randn(3, 7, 1, 1), randn(5, 3))


# ---------------------------------------------------------------------------------------------
# LoHa
# ---------------------------------------------------------------------------------------------


def test_loha_delta_formula_and_rank() -> None:
    w1a, w2a = randn(30, 3, seed=1), randn(30, 3, seed=2)
    w1b, w2b = randn(3, 40, seed=3), randn(3, 40, seed=4)
    delta = loha_delta(w1a, w1b, w2a, w2b, alpha=1.5)
    assert torch.allclose(delta, 0.5 * (w1a @ w1b) * (w2a @ w2b))
    assert torch.linalg.matrix_rank(delta).item() == 9  # r² with r = 3, from 2r(m + n) numbers


@pytest.mark.parametrize("alpha", [None, 2.0])
def test_loha_delta_matches_lycoris_and_peft(alpha: float | None) -> None:
    base = nn.Linear(24, 20)
    module = LohaModule("m", base, lora_dim=4, alpha=alpha)
    randomize(module)
    w = {k: getattr(module, f"hada_{k}").detach() for k in ("w1_a", "w1_b", "w2_a", "w2_b")}
    ours = loha_delta(w["w1_a"], w["w1_b"], w["w2_a"], w["w2_b"], alpha)
    torch.testing.assert_close(ours, lycoris_forward_delta(module, base), rtol=1e-5, atol=1e-5)
    gamma = 1.0 if alpha is None else alpha / 4
    functional = lycoris_loha.diff_weight(
        w["w1_b"], w["w1_a"], w["w2_b"], w["w2_a"], None, None, gamma=gamma, backend="torch"
    )
    torch.testing.assert_close(ours, functional)

    from peft.tuners.loha import LoHaConfig
    from peft.tuners.loha.layer import Linear as PeftLoHaLinear

    peft_alpha = 4 if alpha is None else alpha
    layer = PeftLoHaLinear(
        nn.Linear(24, 20), "default", r=4, alpha=peft_alpha, config=LoHaConfig(init_weights=False)
    )
    ours = loha_delta(*(getattr(layer, f"hada_{k}")["default"].detach() for k in w), peft_alpha)
    torch.testing.assert_close(ours, layer.get_delta_weight("default"))


def test_loha_delta_bad_input() -> None:
    with pytest.raises(ValueError, match="w1a"):
        loha_delta(randn(5, 3), randn(2, 7), randn(5, 3), randn(3, 7))
    with pytest.raises(ValueError, match="w2a @ w2b"):
        loha_delta(randn(5, 3), randn(3, 7), randn(6, 3), randn(3, 7))
    with pytest.raises(ValueError, match="rank"):
        loha_delta(randn(5, 3), randn(3, 7), randn(5, 2), randn(2, 7))


# ---------------------------------------------------------------------------------------------
# LoKr
# ---------------------------------------------------------------------------------------------


def test_lokr_delta_is_a_scaled_kronecker_product() -> None:
    w1, w2a, w2b = randn(2, 3, seed=1), randn(4, 2, seed=2), randn(2, 5, seed=3)
    delta = lokr_delta(w1=w1, w2a=w2a, w2b=w2b, alpha=1.0)  # scale α/r = 1/2
    assert delta.shape == (8, 15)
    W2 = w2a @ w2b
    for i in range(2):
        for j in range(3):  # block (i, j) of W1 ⊗ W2 is w1[i, j] · W2
            assert torch.allclose(delta[4 * i : 4 * i + 4, 5 * j : 5 * j + 5], 0.5 * w1[i, j] * W2)


def test_lokr_delta_ignores_alpha_when_both_factors_are_full() -> None:
    w1, w2 = randn(2, 3, seed=1), randn(4, 5, seed=2)
    assert torch.equal(lokr_delta(w1=w1, w2=w2, alpha=123.0), torch.kron(w1, w2))


LOKR_LAYOUTS = {  # which halves are low-rank; shapes for m = 6·8 = 48, n = 4·10 = 40, r = 2
    "full_full": dict(w1=(6, 4), w2=(8, 10)),
    "full_lowrank": dict(w1=(6, 4), w2a=(8, 2), w2b=(2, 10)),
    "lowrank_full": dict(w1a=(6, 2), w1b=(2, 4), w2=(8, 10)),
    "lowrank_lowrank": dict(w1a=(6, 2), w1b=(2, 4), w2a=(8, 2), w2b=(2, 10)),
}


@pytest.mark.parametrize("layout", LOKR_LAYOUTS)
@pytest.mark.parametrize("alpha", [None, 3.0])
def test_lokr_delta_matches_lycoris_functional(layout: str, alpha: float | None) -> None:
    factors = {k: randn(*s, seed=i) for i, (k, s) in enumerate(LOKR_LAYOUTS[layout].items())}
    ours = lokr_delta(**factors, alpha=alpha)
    names = ("w1", "w1a", "w1b", "w2", "w2a", "w2b")
    weights = [factors.get(k) for k in names] + [None]  # no tucker core
    gamma = 2.0 if alpha is None else alpha  # functional.lokr takes alpha and divides by r itself
    theirs = lycoris_lokr.diff_weight(*weights, gamma=gamma, backend="torch")
    torch.testing.assert_close(ours, theirs)
    if layout == "full_full":
        torch.testing.assert_close(ours, torch.kron(factors["w1"], factors["w2"]))


LOKR_MODULE_CASES = [  # (m, n, rank, decompose_both, factor)
    (48, 40, 2, False, -1),  # w1 full (6×4 ... ), w2 low-rank
    (48, 40, 2, True, -1),  # both low-rank
    (48, 40, 6, False, -1),  # r ≥ max(c, d)/2: both full, scale 1
    (64, 96, 3, True, 4),  # an explicit factor
    (20, 15, 2, False, -1),
]


@pytest.mark.parametrize(("m", "n", "rank", "decompose_both", "factor"), LOKR_MODULE_CASES)
def test_lokr_delta_and_shapes_match_lycoris_module(
    m: int, n: int, rank: int, decompose_both: bool, factor: int
) -> None:
    base = nn.Linear(n, m)
    module = LokrModule(
        "m", base, lora_dim=rank, alpha=5.0, decompose_both=decompose_both, factor=factor
    )
    randomize(module)
    stored = module.custom_state_dict()
    expected = adapter_shapes("lokr", m, n, rank, factor=factor, decompose_both=decompose_both)
    assert {k: tuple(v.shape) for k, v in stored.items()} == expected
    assert count_params("lokr", m, n, rank, factor=factor, decompose_both=decompose_both) == sum(
        p.numel() for p in module.parameters()
    )
    key = {"lokr_w1": "w1", "lokr_w1_a": "w1a", "lokr_w1_b": "w1b"}
    key |= {"lokr_w2": "w2", "lokr_w2_a": "w2a", "lokr_w2_b": "w2b"}
    factors = {key[k]: v.detach() for k, v in stored.items() if k in key}
    ours = lokr_delta(**factors, alpha=5.0)
    torch.testing.assert_close(ours, lycoris_forward_delta(module, base), rtol=1e-4, atol=1e-4)
    if "w1" in factors and "w2" in factors:  # both full: LyCORIS stores alpha = r, scale 1
        assert module.scale == 1.0 and stored["alpha"].item() == rank


@pytest.mark.upstream
def test_lycoris_get_diff_weight_scales_loha_and_lokr_twice() -> None:
    """A LyCORIS quirk the course points out: for LoHa and LoKr, Module.get_diff_weight (used
    when merging) multiplies by α/r a second time; the forward pass, which defines the adapter,
    applies it once, as lokr_delta does. It only matters when α ≠ r."""
    base = nn.Linear(40, 48)
    module = LokrModule("m", base, lora_dim=2, alpha=5.0)
    randomize(module)
    forward = lycoris_forward_delta(module, base)
    with torch.no_grad():
        merged = module.get_diff_weight()[0]
    torch.testing.assert_close(merged, 2.5 * forward, rtol=1e-4, atol=1e-4)


def test_lokr_delta_matches_peft_and_peft_keeps_alpha_over_r_when_both_full() -> None:
    # low-rank w2: peft and LyCORIS agree
    layer = PeftLoKrLinear(
        nn.Linear(40, 48), "default", r=2, alpha=5.0, config=LoKrConfig(init_weights=False)
    )
    w1 = layer.lokr_w1["default"].detach()
    w2a, w2b = layer.lokr_w2_a["default"].detach(), layer.lokr_w2_b["default"].detach()
    torch.testing.assert_close(
        lokr_delta(w1=w1, w2a=w2a, w2b=w2b, alpha=5.0), layer.get_delta_weight("default")
    )
    # r ≥ max(c, d)/2 makes both halves full; peft still scales by α/r, LyCORIS by 1
    layer = PeftLoKrLinear(
        nn.Linear(40, 48), "default", r=6, alpha=3.0, config=LoKrConfig(init_weights=False)
    )
    w1, w2 = layer.lokr_w1["default"].detach(), layer.lokr_w2["default"].detach()
    torch.testing.assert_close(
        0.5 * lokr_delta(w1=w1, w2=w2, alpha=3.0), layer.get_delta_weight("default")
    )


@pytest.mark.upstream
def test_peft_and_lycoris_factorize_differently_for_a_large_factor() -> None:
    """factor=16 on 64: LyCORIS sorts to (4, 16) so W1 stays the small half; peft keeps
    (16, 4). Our lokr_factors follows LyCORIS."""
    assert lokr_factors(64, 64, factor=16) == ((4, 4), (16, 16))
    assert lycoris_factorization(64, 16) == (4, 16)
    layer = PeftLoKrLinear(
        nn.Linear(64, 64), "default", r=2, alpha=2, config=LoKrConfig(decompose_factor=16)
    )
    assert tuple(layer.lokr_w1["default"].shape) == (16, 16)


def test_lokr_delta_with_four_thin_factors() -> None:
    """decompose_both: W1 = w1a·w1b and W2 = w2a·w2b, so ΔW = (A Bᵀ) ⊗ (C Dᵀ), of rank ≤ r²."""
    A, B, C, D = randn(4, 2, seed=1), randn(5, 2, seed=2), randn(6, 2, seed=3), randn(3, 2, seed=4)
    delta = lokr_delta(w1a=A, w1b=B.T, w2a=C, w2b=D.T)
    assert delta.shape == (24, 15)  # (a·c) × (b·d)
    torch.testing.assert_close(delta, torch.kron(A @ B.T, C @ D.T))
    assert torch.linalg.matrix_rank(delta).item() == 4  # rank(ABᵀ) · rank(CDᵀ) = r²


def test_lokr_delta_bad_input() -> None:
    w1, w2 = randn(2, 3), randn(4, 5)
    with pytest.raises(ValueError, match="w1"):
        lokr_delta(w1=w1, w1a=randn(2, 1), w1b=randn(1, 3), w2=w2)
    with pytest.raises(ValueError, match=r"\(w2a, w2b\)"):
        lokr_delta(w1=w1, w2a=randn(4, 1))
    with pytest.raises(ValueError, match="w2a"):
        lokr_delta(w1=w1, w2a=randn(4, 2), w2b=randn(3, 5))
    with pytest.raises(ValueError, match="one rank"):
        lokr_delta(w1a=randn(2, 1), w1b=randn(1, 3), w2a=randn(4, 2), w2b=randn(2, 5))


# ---------------------------------------------------------------------------------------------
# counting
# ---------------------------------------------------------------------------------------------


def test_count_params_formulas() -> None:
    m, n, r = 320, 768, 4
    assert count_params("full", m, n) == 245_760
    assert count_params("lora", m, n, r) == r * (m + n) == 4352
    assert count_params("loha", m, n, r) == 2 * r * (m + n) == 8704
    (a, b), (c, d) = lokr_factors(m, n)
    assert ((a, c), (b, d)) == ((16, 20), (24, 32))
    assert count_params("lokr", m, n, r, decompose_both=True) == r * (a + b + c + d) == 368
    assert count_params("lokr", m, n, r) == a * b + (c + d) * r == 592
    assert count_params("lokr", m, n, 16) == a * b + c * d == 1024  # 16 ≥ max(20, 32)/2


def test_four_factor_lokr_bound_and_equality() -> None:
    """With four thin factors, r(a + b + c + d) ≥ 2r(√m + √n), with equality when a = c, b = d."""
    for m, n in [(320, 768), (1280, 5120), (10240, 1280), (768, 3072)]:
        lhs = count_params("lokr", m, n, 4, decompose_both=True)
        (a, b), (c, d) = lokr_factors(m, n)
        assert lhs == 4 * (a + b + c + d)
        assert lhs >= 2 * 4 * (math.sqrt(m) + math.sqrt(n)) - 1e-9
    assert count_params("lokr", 1024, 256, 4, decompose_both=True) == 2 * 4 * (32 + 16)


def test_lokr_w2_switches_to_full_at_half_its_largest_side() -> None:
    """LyCORIS keeps w2 low-rank while r < max(c, d)/2, here max(20, 20)/2 = 10."""
    assert set(adapter_shapes("lokr", 320, 320, 9)) == {
        "lokr_w1",
        "lokr_w2_a",
        "lokr_w2_b",
        "alpha",
    }
    assert set(adapter_shapes("lokr", 320, 320, 10)) == {"lokr_w1", "lokr_w2", "alpha"}
    assert count_params("lokr", 320, 320, 9) == 256 + 40 * 9
    assert count_params("lokr", 320, 320, 10) == 256 + 400


CONV_CASES = [  # (out, in, kernel, rank, decompose_both)
    (64, 32, 1, 4, False),
    (64, 32, 3, 4, False),
    (64, 32, 3, 4, True),
    (64, 32, 3, 8, False),  # r ≥ max(8, 8)/2 = 4: full w2 with the kernel axes
    (320, 320, 3, 4, False),
]


@pytest.mark.parametrize(("m", "n", "k", "rank", "decompose_both"), CONV_CASES)
def test_conv_shapes_match_lycoris(m: int, n: int, k: int, rank: int, decompose_both: bool) -> None:
    base = nn.Conv2d(n, m, k, padding=k // 2)
    for method, cls, kwargs in [
        ("lora", LoConModule, {}),
        ("loha", LohaModule, {}),
        ("lokr", LokrModule, {"decompose_both": decompose_both}),
    ]:
        module = cls("m", base, lora_dim=rank, alpha=1.0, **kwargs)
        stored = module.custom_state_dict() if method != "lora" else module.state_dict()
        options = {"decompose_both": decompose_both} if method == "lokr" else {}
        expected = adapter_shapes(method, m, n, rank, kernel_size=k, **options)
        assert {key: tuple(v.shape) for key, v in stored.items()} == expected, method
        assert count_params(method, m, n, rank, kernel_size=k, **options) == sum(
            p.numel() for p in module.parameters()
        )
    # kohya LoRA on a k×k conv: down r×n×k×k, up m×r×1×1
    assert count_params("lora", m, n, rank, kernel_size=k) == rank * (n * k * k + m)


def test_count_params_bad_input() -> None:
    with pytest.raises(ValueError, match="rank"):
        count_params("lora", 320, 768, 0)
    with pytest.raises(ValueError, match="rank = 400"):
        count_params("lora", 320, 768, 400)
    with pytest.raises(ValueError, match="method"):
        count_params("dora", 320, 768, 4)
    with pytest.raises(ValueError, match="out_features"):
        count_params("lokr", 0, 768, 4)
    with pytest.raises(ValueError, match="factor"):
        count_params("lokr", 320, 768, 4, factor=0)


# ---------------------------------------------------------------------------------------------
# file sizes
# ---------------------------------------------------------------------------------------------


def test_file_size_bytes() -> None:
    assert file_size_bytes(1000) == 2000  # fp16 by default
    assert file_size_bytes(1000, torch.float32) == 4000
    assert file_size_bytes(1000, torch.float16, n_alphas=3) == 2006
    with pytest.raises(ValueError, match="dtype"):
        file_size_bytes(1000, torch.int8)
    with pytest.raises(ValueError, match="n_params"):
        file_size_bytes(-1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("metadata", [None, {"ss_network_dim": "4", "note": "ΔW"}])
def test_safetensors_size_is_exact(dtype: torch.dtype, metadata: dict[str, str] | None) -> None:
    shapes: dict[str, tuple[int, ...]] = {}
    for prefix, (m, n) in [("lora_unet_a_to_q", (320, 320)), ("lora_unet_a_ff_net_2", (320, 1280))]:
        for method in ("lokr", "lora"):
            for name, shape in adapter_shapes(method, m, n, 4).items():
                shapes[f"{prefix}_{method}.{name}"] = shape
    tensors = {k: torch.zeros(s, dtype=dtype) for k, s in shapes.items()}
    real = len(safetensors.torch.save(tensors, metadata=metadata))
    assert safetensors_size_bytes(shapes, dtype, metadata) == real
    data = sum(math.prod(s) for s in shapes.values()) * dtype.itemsize
    assert real > data  # the header is on top of the data


@pytest.mark.parametrize("factor", [-1, 4, 8, 16])
def test_lokr_factors_match_lycoris_on_sd15_dims(factor: int) -> None:
    for m, n in [(320, 320), (320, 768), (1280, 5120), (10240, 1280), (2560, 320), (768, 3072)]:
        (a, b), (c, d) = lokr_factors(m, n, factor)
        assert (a, c) == lycoris_factorization(m, factor)
        assert (b, d) == lycoris_factorization(n, factor)
        assert a * c == m and b * d == n


@pytest.mark.parametrize("w1_low_rank", [False, True])
@pytest.mark.parametrize("w2_low_rank", [False, True])
def test_every_lokr_layout_multiplies_out_to_the_layer_s_delta_w(w1_low_rank, w2_low_rank):
    """layout_shapes, the one table of layouts, against the products themselves: factors of
    those shapes give, through lokr_delta (torch.kron), a ΔW of the layer's shape (m, n), with
    W1 of the shape asked for; LoRA's and LoHa's give (m, n) through their own products."""
    m, n, rank = 24, 20, 3
    shapes = layout_shapes(
        "lokr", (m, n), rank, w1=(4, 5), w1_low_rank=w1_low_rank, w2_low_rank=w2_low_rank
    )
    names = {"lokr_w1": "w1", "lokr_w1_a": "w1a", "lokr_w1_b": "w1b"}
    names |= {"lokr_w2": "w2", "lokr_w2_a": "w2a", "lokr_w2_b": "w2b"}
    factors = {names[k]: torch.randn(shape, generator=g(1)) for k, shape in shapes.items()}
    assert lokr_delta(**factors).shape == (m, n)
    w1 = factors["w1"] if "w1" in factors else factors["w1a"] @ factors["w1b"]
    assert w1.shape == (4, 5)
    lora = layout_shapes("lora", (m, n), rank)
    down, up = (torch.randn(shape, generator=g(2)) for shape in lora.values())
    assert lora_delta(down, up).shape == (m, n)
    loha = [torch.randn(s, generator=g(3)) for s in layout_shapes("loha", (m, n), rank).values()]
    assert loha_delta(*loha).shape == (m, n)
