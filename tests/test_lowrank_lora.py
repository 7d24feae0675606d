"""Chapter 02's functions in lokr_edu.lowrank: the best rank-r approximation and applying LoRA,
checked against the SVD and against a real peft LoRA layer."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lokr_edu.lowrank import best_rank_r, lora_delta, lora_forward, lora_forward_flops


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize(("m", "n", "r"), [(8, 6, 1), (8, 6, 3), (5, 9, 5), (7, 7, 7)])
def test_best_rank_r_is_the_eckart_young_optimum(m: int, n: int, r: int) -> None:
    W = randn(m, n, seed=m + n + r)
    up, down = best_rank_r(W, r)
    assert up.shape == (m, r) and down.shape == (r, n)
    assert torch.linalg.matrix_rank(up @ down) == r
    S = torch.linalg.svdvals(W)
    assert torch.isclose(torch.linalg.norm(W - up @ down), S[r:].square().sum().sqrt(), atol=1e-10)
    # no other rank-r factorization tried here does better
    for seed in range(5):
        B, A = up + 0.01 * randn(m, r, seed=seed), down + 0.01 * randn(r, n, seed=99 + seed)
        assert torch.linalg.norm(W - B @ A) >= torch.linalg.norm(W - up @ down)


def test_lora_forward_matches_the_merged_weight_and_strength() -> None:
    W, down, up, x = (
        randn(6, 5, seed=1),
        randn(2, 5, seed=2),
        randn(6, 2, seed=3),
        randn(4, 5, seed=4),
    )
    # ΔW by its definition, independently of lora_delta: a sum of r outer products, times α/r
    r = down.shape[0]
    delta = sum(torch.outer(up[:, i], down[i]) for i in range(r)) * (4.0 / r)
    assert torch.allclose(lora_delta(down, up, alpha=4.0), delta)
    for eta in [0.0, 0.5, 1.0, -1.0, 2.0]:
        # y_k = Σ_j (W + η·ΔW)_kj x_j, entry by entry
        merged = W + eta * delta
        expected = torch.stack([torch.mv(merged, row) for row in x])
        assert torch.allclose(lora_forward(x, W, down, up, alpha=4.0, strength=eta), expected)
    assert torch.equal(lora_forward(x, W, down, up, strength=0.0), x @ W.T)


def test_lora_forward_matches_a_real_peft_lora_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 7, bias=True))
    peft_model = get_peft_model(model, LoraConfig(r=3, lora_alpha=6, target_modules=["0"]))
    layer = peft_model.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # peft initializes B to zero
    down = layer.lora_A["default"].weight.double()
    up = layer.lora_B["default"].weight.double()
    W, bias = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    x = torch.randn(5, 12)
    ours = lora_forward(x.double(), W, down, up, alpha=6) + bias
    assert torch.allclose(peft_model(x).double(), ours, atol=1e-5)


def counted_flops(compute) -> int:
    """FLOPs torch's own counter records for the products `compute` runs (2 per multiply-add)."""
    with FlopCounterMode(display=False) as counter:
        compute()
    return counter.get_total_flops()


def test_lora_forward_flops_match_torchs_flop_counter() -> None:
    """The counts of chapter 02, checked against torch.utils.flop_counter on the real products
    (the counter counts matrix products only; the merge's m·n additions are added by hand)."""
    m, n, r, tokens = 96, 40, 8, 7
    W, down, up, x = randn(m, n), randn(r, n, seed=1), randn(m, r, seed=2), randn(tokens, n)
    f = lora_forward_flops(m, n, r, tokens=tokens)
    assert f["fused_per_token"] * tokens == counted_flops(lambda: x @ W.T)
    on_the_fly = counted_flops(lambda: x @ W.T + (x @ down.T) @ up.T)
    assert f["on_the_fly_total"] == on_the_fly
    assert f["on_the_fly_per_token"] * tokens == on_the_fly
    assert f["fused_merge"] == counted_flops(lambda: up @ down) + m * n  # build ΔW, add it to W
    merged = W + up @ down
    assert f["fused_total"] == f["fused_merge"] + counted_flops(lambda: x @ merged.T)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: best_rank_r(torch.ones(3, 4), 0), "rank must be a positive integer"),
        (lambda: best_rank_r(torch.ones(3, 4), 4), "rank r = 4 exceeds min"),
        (lambda: best_rank_r(torch.ones(3), 1), "W must be a 2-D matrix"),
        (
            lambda: lora_forward(
                torch.ones(2, 4), torch.ones(3, 5), torch.ones(1, 5), torch.ones(3, 1)
            ),
            "x has 4 features",
        ),
        (
            lambda: lora_forward(
                torch.ones(2, 5), torch.ones(3, 5), torch.ones(1, 4), torch.ones(3, 1)
            ),
            "do not fit W",
        ),
        (lambda: lora_forward_flops(3072, 768, 0, 1), "rank must be a positive integer"),
    ],
)
def test_bad_input_names_the_argument(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
