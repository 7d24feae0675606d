"""Chapter 07's checks pass on the reference answers and explain plausible wrong ones."""

from __future__ import annotations

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
]

test_check_passes_on_the_reference, test_check_explains_a_wrong_answer = check_tests(CASES)
