"""Chapter 07's checks pass on the reference answers and explain plausible wrong ones."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from check_cases import check_tests
from torch import nn

from lokr_edu import checks


def add_noise(z0, noise, alphas_cumprod, t):
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    return a.sqrt() * z0 + (1 - a).sqrt() * noise


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


def guided(unet, z, t, text, empty, g):
    eps_empty, eps_text = unet(torch.cat([z, z]), t, torch.cat([empty, text])).sample.chunk(2)
    return eps_empty + g * (eps_text - eps_empty)


def guided_twice(unet, z, t, text, empty, g):
    eps_empty, eps_text = unet(z, t, empty).sample, unet(z, t, text).sample
    return eps_empty + g * (eps_text - eps_empty)


def guided_wrong(kind):
    def answer(unet, z, t, text, empty, g):
        e, c = unet(torch.cat([z, z]), t, torch.cat([empty, text])).sample.chunk(2)
        return {"swapped": c + g * (e - c), "scaled": g * c, "from text": c + g * (c - e)}[kind]

    return answer


def terminal(beta_start, beta_end, steps, scaled=True, root=True, variance=True):
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    if not scaled:
        betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
    last = torch.cumprod(1 - betas, dim=0)[-1].item()
    share = last**0.5 if root else last
    return share, last / (1 - last) if variance else last**0.5 / (1 - last**0.5)


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
        checks.check_add_noise,
        add_noise,
        [
            (
                lambda z, e, a, t: a[t].view(-1, 1, 1, 1) * z + (1 - a[t].view(-1, 1, 1, 1)) * e,
                "square roots",
            ),
            (
                lambda z, e, a, t: (
                    (1 - a[t].view(-1, 1, 1, 1)).sqrt() * z + a[t].view(-1, 1, 1, 1).sqrt() * e
                ),
                "swapped",
            ),
            (
                lambda z, e, a, t: a[t[0]].sqrt() * z + (1 - a[t[0]]).sqrt() * e,
                "each example has its own t",
            ),
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
        checks.check_guided_noise,
        guided,
        [
            (guided_wrong("swapped"), "the branches are swapped"),
            (guided_wrong("scaled"), "not g·ε(text)"),
            (guided_wrong("from text"), "start from ε(∅), not ε(text)"),
            (guided_twice, "run it once on the doubled batch"),
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
        checks.check_terminal_signal,
        terminal,
        [
            (lambda a, b, n: terminal(a, b, n, scaled=False), "linear in √β"),
            (lambda a, b, n: terminal(a, b, n, root=False), "the square root of the product"),
            (lambda a, b, n: terminal(a, b, n, variance=False), "a ratio of variances"),
        ],
    ),
]

test_check_passes_on_the_reference, test_check_explains_a_wrong_answer = check_tests(CASES)
