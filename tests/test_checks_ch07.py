"""Chapter 07's checks pass on the reference answers and explain plausible wrong ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from check_cases import check_tests
from torch import nn

from lokr_edu import checks


def add_noise(z0, noise, alphas_cumprod, t):
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    return a.sqrt() * z0 + (1 - a).sqrt() * noise


def velocity(z0, noise, alphas_cumprod, t, kind="right"):
    """v = √ᾱ_t·ε − √(1 − ᾱ_t)·z0 (Salimans & Ho, 2022), and the slips a student makes."""
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    if kind == "one t":
        a = alphas_cumprod[t[0]]
    s, r = (a, 1 - a) if kind == "no roots" else (a.sqrt(), (1 - a).sqrt())
    return {
        "right": s * noise - r * z0,
        "one t": s * noise - r * z0,
        "no roots": s * noise - r * z0,
        "z_t": s * z0 + r * noise,
        "sign": r * z0 - s * noise,
        "swapped": r * noise - s * z0,
        "places": s * z0 - r * noise,
    }[kind]


def rescaled_guidance(eps_text, eps_guided, phi, dims=(1, 2, 3), kind="right"):
    """Lin et al. (2024, §3.4), written from the formula, and the slips a student makes."""
    std_text = eps_text.std(dim=dims, keepdim=True)
    std_guided = eps_guided.std(dim=dims, keepdim=True)
    ratio = std_guided / std_text if kind == "inverted" else std_text / std_guided
    rescaled = eps_guided * ratio
    if kind == "reversed":
        return (1 - phi) * rescaled + phi * eps_guided
    if kind == "no mix":
        return rescaled
    return phi * rescaled + (1 - phi) * eps_guided


def zero_terminal_snr(betas, kind="right"):
    """β with ᾱ_T = 0 and ᾱ_1 kept (Lin et al., 2024, Algorithm 1), and the slips."""
    root = torch.cumprod(1 - betas, dim=0).sqrt()
    if kind == "on alphas_bar":
        root = torch.cumprod(1 - betas, dim=0)
    first, last = root[0], root[-1]
    root = root - last
    if kind == "to one":
        root = root / (first - last)
    elif kind != "no scale":
        root = root * first / (first - last)
    alphas_bar = root if kind in ("on alphas_bar", "unsquared") else root**2
    if kind == "alphas_bar":
        return alphas_bar
    alphas = alphas_bar[1:] / alphas_bar[:-1]
    if kind == "no first":
        return 1 - alphas
    alphas = torch.cat([alphas_bar[:1], alphas])
    return alphas if kind == "alphas" else 1 - alphas


def loss(unet, z0, text, noise, t, alphas_cumprod):
    return ((unet(add_noise(z0, noise, alphas_cumprod, t), t, text) - noise) ** 2).mean()


def text_reading_targets(unet):
    return [
        n
        for n, m in unet.named_modules()
        if isinstance(m, nn.Linear) and n.endswith(("attn2.to_k", "attn2.to_v"))
    ]


def lokr_factors(layer):
    adapter = layer.adapters["default"]
    w2 = adapter.lokr_w2_a @ adapter.lokr_w2_b
    return adapter.lokr_w1, w2, adapter.alpha.item() / adapter.lokr_w2_a.shape[1]


def merged_weight(layer, eta):
    w1, w2, scale = lokr_factors(layer)
    return layer.base.weight + eta * scale * torch.kron(w1, w2)


def merged_weight_wrong(kind):
    def answer(layer, eta):
        w1, w2, scale = lokr_factors(layer)
        W = layer.base.weight
        return {
            "no scale": W + eta * torch.kron(w1, w2),
            "order": W + eta * scale * torch.kron(w2, w1),
            "no eta": W + scale * torch.kron(w1, w2),
            "eta on W": eta * (W + scale * torch.kron(w1, w2)),
        }[kind]

    return answer


def half_strength_answer() -> str:
    """Exercise 7.5's answer, computed here from the committed runs (not by the check)."""
    results = json.loads(RESULTS.read_text())
    runs = [r for r in results["runs"] if r["variant"] == "prior" and "eta" in r]
    ratio = sum(r["eta"]["0.5"]["concept"] for r in runs) / sum(
        r["eta"]["1.0"]["concept"] for r in runs
    )
    return "none" if ratio < 0.25 else "all" if ratio > 0.75 else "half"


RESULTS = Path(__file__).parent.parent / "benchmarks" / "results" / "dreambooth_digits.json"
HALF = half_strength_answer()


def all_k_v(unet):
    return [n for n, m in unet.named_modules() if n.endswith(("to_k", "to_v"))]


CASES = [
    (
        checks.check_velocity,
        velocity,
        [
            (lambda z, e, a, t: velocity(z, e, a, t, "z_t"), "that is z_t"),
            (lambda z, e, a, t: velocity(z, e, a, t, "sign"), "the sign is reversed"),
            (lambda z, e, a, t: velocity(z, e, a, t, "swapped"), "the weights are swapped"),
            (lambda z, e, a, t: velocity(z, e, a, t, "places"), "z0 and ε have swapped places"),
            (lambda z, e, a, t: velocity(z, e, a, t, "no roots"), "square roots"),
            (lambda z, e, a, t: velocity(z, e, a, t, "one t"), "each example has its own t"),
            (lambda z, e, a, t: velocity(z, e, a, t).float()[:2], "returned shape"),
        ],
    ),
    (
        checks.check_noise_prediction_loss,
        loss,
        [
            (
                lambda u, z, c, e, t, a: ((u(add_noise(z, e, a, t), t, c) - z) ** 2).mean(),
                "not the clean latents",
            ),
            (lambda u, z, c, e, t, a: ((u(z, t, c) - e) ** 2).mean(), "the noisy latents z_t"),
            (
                lambda u, z, c, e, t, a: ((u(add_noise(z, e, a, t), t, c) - e) ** 2).sum(),
                "rather than summing",
            ),
            (
                lambda u, z, c, e, t, a: (
                    (u(a[t].view(-1, 1, 1, 1) * z + (1 - a[t].view(-1, 1, 1, 1)) * e, t, c) - e)
                    ** 2
                ).mean(),
                "z_t mixes with square roots",
            ),
        ],
    ),
    (
        checks.check_text_reading_targets,
        text_reading_targets,
        [
            (all_k_v, "attn1 is self-attention"),
            (lambda u: ["to_k", "to_v"], "give full names"),
            (
                lambda u: [
                    *text_reading_targets(u),
                    *[n for n in dict(u.named_modules()) if n.endswith("attn2.to_q")],
                ],
                "only to_k and to_v read the text",
            ),
            (lambda u: text_reading_targets(u)[1:], "are missing"),
        ],
    ),
    (
        checks.check_lokr_merged_weight,
        merged_weight,
        [
            (merged_weight_wrong("no scale"), "the scale α/r is missing"),
            (merged_weight_wrong("order"), "wrong order"),
            (merged_weight_wrong("no eta"), "η is missing"),
            (merged_weight_wrong("eta on W"), "not the frozen weight"),
        ],
    ),
    (
        checks.check_predict_half_strength,
        HALF,
        [
            (next(a for a in ("none", "half", "all") if a != HALF), "is not what happens"),
            ("some", "must be one of"),
        ],
    ),
    (
        checks.check_rescaled_guidance,
        rescaled_guidance,
        [
            (
                lambda c, g, phi: rescaled_guidance(c, g, phi, dims=(0, 1, 2, 3)),
                "not one over the whole batch",
            ),
            (lambda c, g, phi: rescaled_guidance(c, g, phi, dims=(2, 3)), "not one per channel"),
            (lambda c, g, phi: rescaled_guidance(c, g, phi, kind="reversed"), "mix is reversed"),
            (lambda c, g, phi: rescaled_guidance(c, g, phi, kind="inverted"), "ratio is inverted"),
            (lambda c, g, phi: rescaled_guidance(c, g, phi, kind="no mix"), "this is φ = 1"),
            (lambda c, g, phi: g, "ε_rescaled = ε̂·σ(ε_text)/σ(ε̂) per example"),
        ],
    ),
    (
        checks.check_forgetting,
        {"prior": 0.99, "no prior": 0.12},
        [
            ({"prior": 0.12, "no prior": 0.99}, "are the two keys swapped"),
            ({"prior": 0.99, "no prior": 0.95}, "almost no difference"),
            ({"with": 0.99, "without": 0.1}, "the keys 'prior' and 'no prior'"),
        ],
    ),
    (
        checks.check_zero_terminal_snr,
        zero_terminal_snr,
        [
            (lambda b: zero_terminal_snr(b, "alphas_bar"), "that is ᾱ_t; return β"),
            (lambda b: zero_terminal_snr(b, "alphas"), "that is α_t = 1 − β_t"),
            (lambda b: zero_terminal_snr(b, "no scale"), "gets its old value back"),
            (lambda b: zero_terminal_snr(b, "to one"), "not at 1"),
            (lambda b: zero_terminal_snr(b, "unsquared"), "square them before"),
            (lambda b: zero_terminal_snr(b, "on alphas_bar"), "not ᾱ_t: the map is affine"),
            (lambda b: zero_terminal_snr(b, "no first"), "the first step has a β too"),
            (lambda b: b, "the point is ᾱ_T = 0"),
            (lambda b: b.tolist(), "must return a torch.Tensor"),
        ],
    ),
]

test_check_passes_on_the_reference, test_check_explains_a_wrong_answer = check_tests(CASES)


def rescaled_guidance_fused(eps_text, eps_guided, phi):
    """Lin et al.'s fused form ε̂·(φ·σ_text/σ̂ + 1 − φ), with population standard deviations."""
    std = lambda x: x.flatten(1).std(dim=1, correction=0).view(-1, 1, 1, 1)  # noqa: E731
    return eps_guided * (phi * std(eps_text) / std(eps_guided) + 1 - phi)


@pytest.mark.parametrize(
    ("check", "answer"),
    [
        (checks.check_velocity, lambda z, e, a, t: velocity(z.float(), e.float(), a.float(), t)),
        (checks.check_rescaled_guidance, rescaled_guidance_fused),
        (checks.check_zero_terminal_snr, lambda b: zero_terminal_snr(b.float())),
    ],
    ids=["velocity in float32", "fused guidance rescale", "zero terminal SNR in float32"],
)
def test_a_right_answer_written_differently_passes(check, answer, capsys) -> None:
    check(answer)
    assert capsys.readouterr().out.startswith("✓ ")
