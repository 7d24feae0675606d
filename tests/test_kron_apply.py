"""The LoKr reshape path: same outputs and gradients as ΔW = s·(W1 ⊗ W2), never building it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lokr_edu.adapters import Adapter, inject
from lokr_edu.kron_apply import choose_mode, lokr_apply, lokr_costs


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).norm() / reference.norm()).item()


LINEAR_CASES = [
    ((3, 4), (5, 2), (7,)),
    ((2, 7), (13, 3), (2, 5)),
    ((1, 1), (6, 4), (3,)),
    ((8, 8), (8, 8), (4, 16)),
]


@pytest.mark.parametrize(("w1_shape", "w2_shape", "lead"), LINEAR_CASES)
def test_linear_reshape_matches_the_definition_with_gradients(w1_shape, w2_shape, lead) -> None:
    torch.manual_seed(0)
    W1 = torch.randn(w1_shape, requires_grad=True)
    W2 = torch.randn(w2_shape, requires_grad=True)
    x = torch.randn(*lead, w1_shape[1] * w2_shape[1], requires_grad=True)
    results = {}
    for mode in ["reshape", "materialize"]:
        y = lokr_apply(x, W1, W2, 0.7, mode=mode)
        grads = torch.autograd.grad(
            (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum(), [x, W1, W2]
        )
        results[mode] = (y, *grads)
    reference = F.linear(x, 0.7 * torch.kron(W1, W2))
    assert relative_error(results["reshape"][0], reference) <= 1e-5
    for ours, theirs in zip(results["reshape"], results["materialize"], strict=True):
        assert relative_error(ours, theirs) <= 1e-5


@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize(("stride", "padding"), [(1, 0), (2, 1)])
def test_conv_reshape_matches_the_definition_with_gradients(kernel, stride, padding) -> None:
    torch.manual_seed(1)
    W1 = torch.randn(3, 2, requires_grad=True)
    W2 = torch.randn(4, 5, kernel, kernel, requires_grad=True)
    x = torch.randn(2, 10, 7, 6, requires_grad=True)
    conv = {"stride": stride, "padding": padding, "dilation": 1}
    reference = F.conv2d(x, 1.3 * torch.kron(W1[:, :, None, None], W2), None, stride, padding)
    ours = lokr_apply(x, W1, W2, 1.3, conv, mode="reshape")
    assert relative_error(ours, reference) <= 1e-5
    g_ours = torch.autograd.grad(ours.square().sum(), [x, W1, W2])
    g_ref = torch.autograd.grad(reference.square().sum(), [x, W1, W2])
    for a, b in zip(g_ours, g_ref, strict=True):
        assert relative_error(a, b) <= 1e-5


@pytest.mark.parametrize("options", [{}, {"decompose_both": True}, {"full_matrix": True}])
@pytest.mark.parametrize("layer", ["linear", "conv3x3"])
def test_lokr_adapter_reshape_equals_materialize(options, layer) -> None:
    torch.manual_seed(2)
    base = nn.Linear(96, 64) if layer == "linear" else nn.Conv2d(16, 24, 3, padding=1)
    x = torch.randn(4, 96) if layer == "linear" else torch.randn(2, 16, 5, 5)
    outputs = {}
    for mode in ["reshape", "materialize"]:
        model = nn.Sequential(base)
        torch.manual_seed(3)
        inject(model, "0", "lokr", rank=2, alpha=3.0, lokr_mode=mode, **options)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_()
        y = model(x)
        y.square().sum().backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        outputs[mode] = (y, *grads)
        base = model[0].base  # unwrap for the next round
    for ours, theirs in zip(outputs["reshape"], outputs["materialize"], strict=True):
        assert relative_error(ours, theirs) <= 1e-5


def test_cost_model_picks_materialize_only_for_tiny_layers() -> None:
    # 16 × 16: launching kernels and copying inputs cost more than the tiny dense product
    assert choose_mode(4, 4, 4, 4, vectors=1) == "materialize"
    assert choose_mode(4, 4, 4, 4, vectors=4096) == "materialize"
    assert choose_mode(16, 16, 20, 20, vectors=77) == "reshape"  # SD's smallest layer, 320 × 320
    # 1280 × 1280 = (32 × 32) ⊗ (40 × 40): building ΔW alone costs more than reshaping one token
    assert choose_mode(32, 32, 40, 40, vectors=1) == "reshape"
    assert choose_mode(32, 32, 40, 40, vectors=4096) == "reshape"
    costs = lokr_costs(32, 32, 40, 40, vectors=4096)
    assert costs["reshape"]["flops"] == 2 * 4096 * (32 * 40 * 40 + 32 * 32 * 40)
    assert costs["materialize"]["flops"] == 1280 * 1280 + 2 * 4096 * 1280 * 1280


def test_forced_modes_and_bad_input() -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        lokr_apply(torch.ones(2, 6), torch.ones(2, 2), torch.ones(3, 3), 1.0, mode="fast")
    with pytest.raises(ValueError, match="x must end in n = b·d = 6"):
        lokr_apply(torch.ones(2, 5), torch.ones(2, 2), torch.ones(3, 3), 1.0)
    with pytest.raises(ValueError, match=r"x must be \(B, b·d = 6, H, W\)"):
        lokr_apply(
            torch.ones(2, 6),
            torch.ones(2, 2),
            torch.ones(3, 3, 1, 1),
            1.0,
            {"stride": 1, "padding": 0, "dilation": 1},
        )
    with pytest.raises(ValueError, match="vectors must be a positive integer"):
        lokr_costs(2, 2, 3, 3, vectors=0)
    with pytest.raises(ValueError, match="lokr_mode must be one of"):
        Adapter("lokr", nn.Linear(4, 4), rank=1, lokr_mode="never")
