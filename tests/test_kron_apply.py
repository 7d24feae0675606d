"""The LoKr reshape path: same outputs and gradients as ΔW = s·(W1 ⊗ W2), never building it."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, addmm_flop

import lokr_edu.kron_apply as kron_apply
from lokr_edu.adapters import Adapter, LoKr, inject
from lokr_edu.kron_apply import choose_mode, kron_linear, lokr_apply, lokr_costs
from lokr_edu.lowrank import adapter_shapes

TOLERANCE = 1e-5  # relative error, fp32


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).norm() / reference.norm()).item()


def assert_close_with_gradients(ours_fn, reference_fn, inputs: list[torch.Tensor]) -> None:
    """Outputs and the gradients of a random projection of them agree within TOLERANCE."""
    ours = ours_fn()
    reference = reference_fn()
    assert ours.shape == reference.shape
    assert relative_error(ours, reference) <= TOLERANCE
    weights = torch.randn(ours.shape, generator=torch.Generator().manual_seed(7))
    g_ours = torch.autograd.grad((ours * weights).sum(), inputs)
    g_ref = torch.autograd.grad((reference * weights).sum(), inputs)
    for name, a, b in zip(range(len(inputs)), g_ours, g_ref, strict=True):
        assert a.shape == b.shape, name
        assert relative_error(a, b) <= TOLERANCE, (name, relative_error(a, b))


def factors(a, b, c, d, rank=None, kernel=(), seed=0):
    """W1 (a, b) and W2 (c, d, *kernel), or W2's factors (c, r), (r, d·kh·kw), requiring grad."""
    g = torch.Generator().manual_seed(seed)
    W1 = torch.randn(a, b, generator=g).requires_grad_()
    if rank is None:
        W2 = torch.randn(c, d, *kernel, generator=g).requires_grad_()
        return W1, W2, [W1, W2], W2
    kk = torch.Size(kernel).numel()
    w2a = torch.randn(c, rank, generator=g).requires_grad_()
    w2b = torch.randn(rank, d * kk, generator=g).requires_grad_()
    full = (w2a @ w2b).reshape(c, d, *kernel)
    return W1, (w2a, w2b), [W1, w2a, w2b], full


# (a, b), (c, d), leading dims, rank of W2 (None: full): primes, non-square, batch dims, r = 1
LINEAR_CASES = [
    ((3, 5), (7, 11), (13,), None),
    ((2, 7), (13, 3), (2, 5), None),
    ((1, 1), (6, 4), (3,), None),
    ((5, 3), (1, 7), (2, 3, 2), None),
    ((8, 8), (8, 8), (4, 16), 2),
    ((3, 5), (17, 19), (2, 11), 3),
    ((7, 2), (29, 31), (37,), 1),
    ((16, 16), (20, 20), (2, 77), 8),
    ((2, 2), (3, 3), (5,), 3),  # r too large to pay off: W2 is formed first
]


@pytest.mark.parametrize(("w1", "w2", "lead", "rank"), LINEAR_CASES)
@pytest.mark.parametrize("mode", ["reshape", "materialize", "auto"])
def test_linear_matches_the_definition_with_gradients(w1, w2, lead, rank, mode) -> None:
    W1, W2, params, W2_full = factors(*w1, *w2, rank=rank)
    x = torch.randn(*lead, w1[1] * w2[1], requires_grad=True)
    scale = 0.7
    assert_close_with_gradients(
        lambda: lokr_apply(x, W1, W2, scale, mode=mode),
        lambda: F.linear(x, scale * torch.kron(W1, W2_full)),
        [x, *params],
    )


def test_linear_over_many_chunks(monkeypatch) -> None:
    # tiny chunks: the vectors go through in many pieces, the last one shorter
    monkeypatch.setattr(kron_apply, "CHUNK_ELEMENTS", 50)
    monkeypatch.setattr(kron_apply, "MIN_CHUNK", 1)
    for rank in [None, 2]:
        W1, W2, params, W2_full = factors(4, 3, 5, 6, rank=rank)
        x = torch.randn(3, 7, 18, requires_grad=True)
        assert_close_with_gradients(
            lambda W1=W1, W2=W2, x=x: kron_linear(x, W1, W2),
            lambda W1=W1, W2_full=W2_full, x=x: F.linear(x, torch.kron(W1, W2_full)),
            [x, *params],
        )


def test_random_shapes_against_the_definition() -> None:
    rng = random.Random(0)
    for _ in range(12):
        a, b, c, d = (rng.randint(1, 9) for _ in range(4))
        rank = rng.choice([None, 1, 2, 3])
        lead = tuple(rng.randint(1, 5) for _ in range(rng.randint(1, 3)))
        W1, W2, params, W2_full = factors(a, b, c, d, rank=rank, seed=rng.randint(0, 99))
        x = torch.randn(*lead, b * d, requires_grad=True)
        assert_close_with_gradients(
            lambda W1=W1, W2=W2, x=x: lokr_apply(x, W1, W2, 1.3, mode="reshape"),
            lambda W1=W1, W2_full=W2_full, x=x: F.linear(x, 1.3 * torch.kron(W1, W2_full)),
            [x, *params],
        )


def test_gradients_only_where_asked() -> None:
    W1, W2, _, W2_full = factors(3, 4, 5, 2)
    x = torch.randn(6, 8)  # no grad: the first layer of a network
    (gW1, gW2) = torch.autograd.grad(lokr_apply(x, W1, W2, mode="reshape").sum(), [W1, W2])
    (rW1, rW2) = torch.autograd.grad(F.linear(x, torch.kron(W1, W2_full)).sum(), [W1, W2])
    assert relative_error(gW1, rW1) <= TOLERANCE and relative_error(gW2, rW2) <= TOLERANCE
    x.requires_grad_()
    frozen_W1 = W1.detach()
    (gx,) = torch.autograd.grad(lokr_apply(x, frozen_W1, W2, mode="reshape").sum(), [x])
    (rx,) = torch.autograd.grad(F.linear(x, torch.kron(frozen_W1, W2_full)).sum(), [x])
    assert relative_error(gx, rx) <= TOLERANCE


CONV_CASES = [
    # kernel, stride, padding, dilation, rank
    ((1, 1), 1, 0, 1, None),
    ((1, 1), 2, 0, 1, 2),
    ((3, 3), 1, 1, 1, None),
    ((3, 3), 2, 1, 1, 3),
    ((3, 3), 1, 2, 2, 2),
    ((3, 2), (2, 1), (1, 0), 1, None),
    ((3, 3), 1, "same", 1, 2),
]


@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation", "rank"), CONV_CASES)
@pytest.mark.parametrize("mode", ["reshape", "materialize", "auto"])
def test_conv_matches_the_definition_with_gradients(
    kernel, stride, padding, dilation, rank, mode
) -> None:
    a, b, c, d = 3, 2, 5, 3
    W1, W2, params, W2_full = factors(a, b, c, d, rank=rank, kernel=kernel, seed=1)
    x = torch.randn(2, b * d, 7, 6, requires_grad=True)
    conv = {"stride": stride, "padding": padding, "dilation": dilation}
    delta = torch.kron(W1[:, :, None, None], W2_full)  # (a·c, b·d, kh, kw)
    assert_close_with_gradients(
        lambda: lokr_apply(x, W1, W2, 1.3, conv, mode=mode, kernel_size=kernel),
        lambda: F.conv2d(x, 1.3 * delta, None, **conv),
        [x, *params],
    )


@pytest.mark.parametrize(
    "options", [{}, {"decompose_both": True}, {"full_matrix": True}, {"alpha": 3.0}]
)
@pytest.mark.parametrize("layer", ["linear", "conv1x1", "conv3x3"])
def test_lokr_adapter_matches_its_delta_weight(options, layer) -> None:
    """Every LoKr layout an Adapter can hold: forward through lokr_apply == ΔW of delta_weight."""
    torch.manual_seed(2)
    if layer == "linear":
        base, x = nn.Linear(96, 60), torch.randn(4, 5, 96, requires_grad=True)
    elif layer == "conv1x1":
        base, x = nn.Conv2d(48, 40, 1), torch.randn(2, 48, 5, 4, requires_grad=True)
    else:
        base = nn.Conv2d(48, 40, 3, stride=2, padding=1)
        x = torch.randn(2, 48, 7, 6, requires_grad=True)
    options = {"alpha": 5.0} | options
    for mode in ["reshape", "materialize", "auto"]:
        adapter = LoKr(base, rank=2, lokr_mode=mode, **options)
        with torch.no_grad():
            for p in adapter.parameters():
                p.normal_()
        params = list(adapter.parameters())

        def reference(adapter=adapter):
            delta = adapter.delta_weight()
            if layer == "linear":
                return F.linear(x, delta)
            return F.conv2d(x, delta, None, base.stride, base.padding, base.dilation)

        assert_close_with_gradients(
            lambda adapter=adapter: adapter(x, base), reference, [x, *params]
        )


def test_inject_passes_lokr_mode_and_the_model_trains() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 6))
    inject(model, ["0", "2"], "lokr", rank=2, lokr_mode="reshape")
    assert {m.lokr_mode for m in model.modules() if isinstance(m, Adapter)} == {"reshape"}
    x = torch.randn(8, 12)
    model(x).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def counted_flops(compute) -> int:
    """FLOPs torch's own counter records for the matrix products and convolutions `compute` runs,
    2 per multiply-add (elementwise work is not counted). The counter leaves out the in-place
    addmm_ that backward accumulates with; it is counted here with torch's formula for addmm."""
    in_place = {torch.ops.aten.addmm_: addmm_flop.__wrapped__}  # the formula on shapes
    with FlopCounterMode(display=False, custom_mapping=in_place) as counter:
        compute()
    return counter.get_total_flops()


# (a, b), (c, d), rank of W2, whether W2 = A·B is formed before it is applied
FLOP_CASES = [
    pytest.param((4, 6), (10, 8), None, False, id="full"),
    # applied as (I ⊗ A)(W1 ⊗ B): three products on r columns
    pytest.param((4, 6), (10, 8), 2, False, id="low-rank"),
    # r too large to pay off: W2 formed first, 2·c·r·d FLOPs
    pytest.param((2, 2), (3, 3), 3, True, id="low-rank-formed"),
]


@pytest.mark.parametrize(("w1", "w2", "rank", "formed"), FLOP_CASES)
@pytest.mark.parametrize("mode", ["reshape", "materialize"])
@pytest.mark.parametrize("backward", [False, True])
def test_cost_model_flops_are_those_torch_counts(
    w1, w2, rank, formed, mode, backward, monkeypatch
) -> None:
    """lokr_costs's FLOPs against torch.utils.flop_counter on what lokr_apply runs for a Linear
    (forward, or forward and backward to x and every factor), over many chunks of vectors.
    What the counter does not see: materialize builds W1 ⊗ W2 with m·n elementwise products,
    and its backward folds ΔW's gradient back onto W1 and W2 with 2·m·n more. What the model
    leaves out: forming W2 = A·B (2·c·r·d, once per call, and twice that in backward)."""
    monkeypatch.setattr(kron_apply, "CHUNK_ELEMENTS", 600)
    monkeypatch.setattr(kron_apply, "MIN_CHUNK", 1)
    (a, b), (c, d) = w1, w2
    W1, W2, _, _ = factors(a, b, c, d, rank=rank)
    x = torch.randn(3, 100, b * d, requires_grad=True)  # 300 vectors

    def run() -> None:
        y = lokr_apply(x, W1, W2, 0.7, mode=mode)
        if backward:
            y.square().sum().backward()

    model = lokr_costs(a, b, c, d, vectors=300, rank=rank, backward=backward)[mode]["flops"]
    passes = 3 if backward else 1  # backward: two products per product of the forward
    elementwise = passes * a * b * c * d if mode == "materialize" else 0
    forming = passes * 2 * c * rank * d if formed or (rank and mode == "materialize") else 0
    assert counted_flops(run) == model - elementwise + forming


@pytest.mark.parametrize("rank", [None, 2])
@pytest.mark.parametrize("mode", ["reshape", "materialize"])
def test_cost_model_flops_of_a_conv_are_those_torch_counts(rank, mode) -> None:
    """The same for a 3×3 Conv2d: N = batch·H_out·W_out vectors, W2 (c, d, 3, 3) contracts d·9
    numbers per group; convolutions counted by the counter as 2 FLOPs per multiply-add."""
    (a, b), (c, d), kernel = (2, 3), (4, 5), (3, 3)
    W1, W2, _, _ = factors(a, b, c, d, rank=rank, kernel=kernel)
    x = torch.randn(2, b * d, 6, 6)
    conv = {"stride": 1, "padding": 1, "dilation": 1}
    flops = counted_flops(lambda: lokr_apply(x, W1, W2, 0.7, conv, mode, kernel_size=kernel))
    model = lokr_costs(a, b, c, d, vectors=2 * 6 * 6, kernel=9, rank=rank)[mode]["flops"]
    if mode == "materialize":  # the elementwise build of ΔW; W2 = A·B formed first
        model += -a * b * c * d * 9 + (2 * c * rank * d * 9 if rank else 0)
    assert flops == model


def test_cost_model_choices() -> None:
    # a tiny layer: launching a dozen kernels costs more than its dense product
    assert choose_mode(2, 2, 2, 2, vectors=4) == "materialize"
    assert choose_mode(2, 2, 2, 2, vectors=4, backward=True) == "materialize"
    # SD1.5's layers: reshape from 77 tokens on, for inference and for training
    for (a, b), (c, d) in [((16, 16), (20, 20)), ((32, 32), (40, 40)), ((80, 32), (128, 40))]:
        for vectors in [154, 2048, 8192]:
            for backward in [False, True]:
                assert choose_mode(a, b, c, d, vectors, backward=backward, rank=8) == "reshape"
    # 1280 × 1280 = (32 × 32) ⊗ (40 × 40): building ΔW alone costs more than reshaping one token
    assert choose_mode(32, 32, 40, 40, vectors=1) == "reshape"
    # a prime output size: W1 is 1 × 1, W2 is the whole layer; few tokens, materialize
    assert choose_mode(1, 1, 7, 5, vectors=3) == "materialize"


def test_auto_rule_agrees_with_the_cost_model_away_from_its_boundary() -> None:
    """auto_mode is a fixed rule; the cost model it summarises gives the same verdict for the toy
    layers (materialize) and SD1.5's layers (reshape), for training and inference, at every
    number of vectors."""
    layers = {  # (m, n): LyCORIS's layout at r = 8
        "toy": [(16, 32), (32, 32), (48, 20), (64, 48), (64, 64), (96, 96)],
        "sd15": [(320, 320), (640, 640), (1280, 1280), (640, 768), (2560, 320), (1280, 5120)],
    }
    for kind, shapes in layers.items():
        for m, n in shapes:
            s = adapter_shapes("lokr", m, n, 8)
            (a, b) = s["lokr_w1"]
            if "lokr_w2" in s:
                (c, d), rank = s["lokr_w2"], None
            else:
                (c, rank), d = s["lokr_w2_a"], s["lokr_w2_b"][1]
            rule = kron_apply.auto_mode(a, b, c, d)
            assert rule == ("materialize" if kind == "toy" else "reshape"), (m, n)
            for vectors in [1, 16, 154, 1024, 8192]:
                for backward in [False, True]:
                    model = choose_mode(a, b, c, d, vectors, backward=backward, rank=rank)
                    assert model == rule, (m, n, vectors, backward)


def test_auto_rule_edges() -> None:
    assert kron_apply.auto_mode(8, 8, 16, 16) == "materialize"  # 128 × 128: at the line
    assert kron_apply.auto_mode(10, 10, 16, 16) == "reshape"  # 160 × 160
    assert kron_apply.auto_mode(16, 16, 20, 20) == "reshape"  # 320 × 320
    assert kron_apply.auto_mode(4, 4, 8, 8) == "materialize"  # a 32-channel 1×1 conv
    assert kron_apply.auto_mode(4, 4, 8, 8, kernel=9) == "materialize"  # 3×3: 9216 elements
    assert kron_apply.auto_mode(4, 8, 8, 8, kernel=9) == "reshape"  # 32 -> 64 channels, 3×3
    assert kron_apply.auto_mode(1, 1, 1283, 1280) == "materialize"  # prime m: W1 is 1 × 1
    assert kron_apply.auto_mode(2, 40, 640, 2) == "materialize"  # a = d = 2: no FLOPs saved


def test_auto_takes_the_rule(monkeypatch) -> None:
    """lokr_apply(mode="auto") runs the path auto_mode names, and evaluates no cost model."""
    monkeypatch.setattr(kron_apply, "choose_mode", None)  # calling it would fail
    monkeypatch.setattr(kron_apply, "lokr_costs", None)
    calls = []
    kron = torch.kron
    monkeypatch.setattr(torch, "kron", lambda *args: calls.append(1) or kron(*args))
    W1, W2, _, _ = factors(3, 4, 5, 2)  # ΔW 15 × 8: tiny, materialized
    lokr_apply(torch.randn(2, 6, 8), W1, W2)
    assert calls == [1]
    W1, W2, _, _ = factors(10, 10, 16, 16)  # 160 × 160: reshaped
    lokr_apply(torch.randn(2, 3, 160), W1, W2)
    assert calls == [1]


def test_forced_modes_are_obeyed(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(torch, "kron", lambda *args: calls.append(1) or torch.ones(15, 8))
    W1, W2, _, _ = factors(3, 4, 5, 2)
    lokr_apply(torch.randn(2, 8), W1, W2, mode="reshape")
    assert not calls  # the reshape path never forms W1 ⊗ W2
    lokr_apply(torch.randn(2, 8), W1, W2, mode="materialize")
    assert calls == [1]


def test_bad_input_names_the_argument() -> None:
    W1, W2 = torch.ones(2, 2), torch.ones(3, 3)
    conv = {"stride": 1, "padding": 0, "dilation": 1}
    cases = [
        ("mode", lambda: lokr_apply(torch.ones(2, 6), W1, W2, mode="fast")),
        ("x", lambda: lokr_apply(torch.ones(2, 5), W1, W2)),
        ("x", lambda: lokr_apply([1.0] * 6, W1, W2)),
        ("W1", lambda: lokr_apply(torch.ones(2, 6), torch.ones(4), W2)),
        ("W2", lambda: lokr_apply(torch.ones(2, 6), W1, torch.ones(3, 3, 1, 1))),
        ("W2", lambda: lokr_apply(torch.ones(2, 6), W1, (torch.ones(3, 2), torch.ones(1, 3)))),
        ("W2", lambda: lokr_apply(torch.ones(2, 6), W1, "W2")),
        ("x", lambda: lokr_apply(torch.ones(2, 6), W1, torch.ones(3, 3, 1, 1), 1.0, conv)),
        ("conv", lambda: lokr_apply(torch.ones(1, 6, 2, 2), W1, torch.ones(3, 3, 1, 1), 1, {})),
        (
            "kernel_size",
            lambda: lokr_apply(
                torch.ones(1, 6, 2, 2), W1, (torch.ones(3, 1), torch.ones(1, 3)), 1.0, conv
            ),
        ),
        ("vectors", lambda: lokr_costs(2, 2, 3, 3, vectors=0)),
        ("rank", lambda: lokr_costs(2, 2, 3, 3, vectors=1, rank=0)),
        ("lokr_mode", lambda: LoKr(nn.Linear(4, 4), rank=1, lokr_mode="never")),
    ]
    for name, call in cases:
        with pytest.raises(ValueError, match=rf"^{name}\b"):
            call()
