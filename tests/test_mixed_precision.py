"""Adapters under mixed precision, at SD1.5's real widths.

The training recipe of diffusers' scripts (`cast_training_params`): the frozen model is stored in
fp16 / bf16, the adapter's parameters stay fp32, and the forward runs under autocast. On the CPU,
torch.autocast("cpu", bf16 / fp16) stands in for CUDA's. For every method (LoKr on both of its
paths), on Linear and Conv2d layers of the widths SD1.5 has (320, 640, 1280; 768 is the text
encoder's width that to_k / to_v read), with and without gradient checkpointing, the adapter's
output and the gradients of its factors and of the input must match an fp32 run of the same
weights within the half dtype's precision:

    ‖half − fp32‖ / ‖fp32‖ ≤ 2e-2 for bf16 (8 mantissa bits), 4e-3 for fp16 (11 bits).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lokr_edu import inject
from lokr_edu.adapters import AdapterLayer

TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3}

# (name, layer builder, input shape): SD1.5's shapes at a 256-token level (512 px at the 1280 level)
LAYERS = {
    "to_q 320": (lambda: nn.Linear(320, 320, bias=False), (2, 256, 320)),
    "to_k 768->640": (lambda: nn.Linear(768, 640, bias=False), (2, 77, 768)),
    "to_out 1280": (lambda: nn.Linear(1280, 1280), (2, 256, 1280)),
    "ff.net.0.proj 320->2560": (lambda: nn.Linear(320, 2560), (2, 64, 320)),
    "conv1 320": (lambda: nn.Conv2d(320, 320, 3, padding=1), (1, 320, 16, 16)),
    "conv2 1280": (lambda: nn.Conv2d(1280, 1280, 3, padding=1), (1, 1280, 8, 8)),
}
# method, options: LoKr on each of its two paths
METHODS = {
    "lora": ("lora", {}),
    "loha": ("loha", {}),
    "lokr reshape": ("lokr", {"lokr_mode": "reshape"}),
    "lokr materialize": ("lokr", {"lokr_mode": "materialize"}),
}


def _model(layer: str, method: str, half: torch.dtype) -> nn.Sequential:
    """The layer with an adapter whose factors are all non-zero, the frozen part in `half` and
    the adapter in fp32 (diffusers' cast_training_params)."""
    torch.manual_seed(0)
    model = nn.Sequential(LAYERS[layer][0]())
    kind, options = METHODS[method]
    inject(model, "0", method=kind, rank=8, alpha=4.0, **options)
    adapter = model[0].adapters["default"]
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_()
        # ΔW is linear in each factor: scale one so that ΔW's entries are 1/√fan_in, i.e. the
        # update is O(1) on O(1) inputs, like the base layer's output (nothing in fp16's
        # subnormal range)
        delta = adapter.delta_weight()
        fan_in = delta[0].numel()
        next(adapter.parameters()).mul_(1 / (delta.std().item() * fan_in**0.5))
    model.to(half)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def _run(model: nn.Sequential, x: Tensor, grad: Tensor, *, half, checkpointed: bool):
    """(adapter's output, its factors' gradients, the input's gradient) under autocast(half), or
    in fp32 with half None."""
    layer: AdapterLayer = model[0]
    x = x.clone().requires_grad_(True)

    def branch(inputs):
        return layer.adapters["default"](inputs, layer.base)

    def whole(inputs):
        return model(inputs)

    with torch.autocast("cpu", dtype=half or torch.bfloat16, enabled=half is not None):
        out = branch(x)
        y = checkpoint(whole, x, use_reentrant=False) if checkpointed else whole(x)
    assert y.dtype == (half or torch.float32)
    (y.float() * grad).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.adapters.named_parameters()}
    for p in layer.adapters.parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
    return out.float(), grads, x.grad.float()


def _relative(a: Tensor, b: Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


# bf16 at every width; fp16 (emulated, hence slow, on a CPU) on the narrower layers
CASES = [(layer, torch.bfloat16) for layer in LAYERS] + [
    (layer, torch.float16) for layer in ("to_q 320", "to_k 768->640", "conv1 320")
]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize(("layer", "half"), CASES, ids=[f"{n}-{str(h)[6:]}" for n, h in CASES])
def test_adapter_under_autocast_matches_fp32(layer: str, method: str, half: torch.dtype) -> None:
    model = _model(layer, method, half)
    reference = copy.deepcopy(model).float()  # the same (half-rounded) weights, run in fp32
    x = torch.randn(LAYERS[layer][1], generator=torch.Generator().manual_seed(1))
    out_shape = reference(x).shape
    grad = torch.randn(out_shape, generator=torch.Generator().manual_seed(2))

    out, grads, grad_x = _run(model, x, grad, half=half, checkpointed=False)
    ref_out, ref_grads, ref_grad_x = _run(reference, x, grad, half=None, checkpointed=False)

    tolerance = TOLERANCE[half]
    assert _relative(out, ref_out) <= tolerance
    assert _relative(grad_x, ref_grad_x) <= tolerance
    for name, g in grads.items():
        assert ref_grads[name].norm() > 0, f"{name}: no gradient in fp32, nothing is tested"
        assert _relative(g, ref_grads[name]) <= tolerance, name


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("layer", ["to_out 1280", "conv1 320"])
def test_gradient_checkpointing_under_autocast_changes_nothing(layer: str, method: str) -> None:
    """Checkpointing recomputes the forward in backward, under the same autocast state: the
    gradients are those of the plain run, bit for bit."""
    model = _model(layer, method, torch.bfloat16)
    x = torch.randn(LAYERS[layer][1], generator=torch.Generator().manual_seed(1))
    grad = torch.randn(model(x.bfloat16()).shape, generator=torch.Generator().manual_seed(2))

    _, plain, plain_x = _run(model, x, grad, half=torch.bfloat16, checkpointed=False)
    for p in model.parameters():
        p.grad = None
    _, recomputed, recomputed_x = _run(model, x, grad, half=torch.bfloat16, checkpointed=True)

    assert torch.equal(plain_x, recomputed_x)
    for name, g in plain.items():
        assert torch.equal(g, recomputed[name]), name


def test_the_reported_failure_lokr_at_1280_under_bf16_autocast() -> None:
    """nn.Linear(1280, 1280) with LoKr r8, a (2, 256, 1280) input, forward and backward inside
    torch.autocast("cpu", bfloat16): the reshape path used to write a bf16 product into an fp32
    buffer and raise."""
    model = nn.Sequential(nn.Linear(1280, 1280))
    inject(model, ["0"], "lokr", rank=8)
    x = torch.randn(2, 256, 1280, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.float32
    assert torch.isfinite(x.grad).all()


def test_scale_is_a_python_float_refreshed_on_load() -> None:
    """The scale α/r is fixed when the adapter is built (no .item() in forward) and follows a
    state dict that brings another α."""
    model = nn.Sequential(nn.Linear(64, 64))
    inject(model, "0", "lora", rank=4, alpha=2.0)
    adapter = model[0].adapters["default"]
    assert isinstance(adapter.scale, float) and adapter.scale == 0.5
    state = model.state_dict()
    state["0.adapters.default.alpha"] = torch.tensor(8.0)
    model.load_state_dict(state)
    assert adapter.scale == 2.0
