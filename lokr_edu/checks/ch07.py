"""Checks for chapter 07's exercises (solutions/07_stable_diffusion_lokr_solutions.ipynb)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lokr_edu.checks.common import CheckError, call_student, passed, random_tensor, require_tensor

__all__ = [
    "check_add_noise",
    "check_noise_prediction_loss",
    "check_text_reading_targets",
    "check_lokr_merged_weight",
]


def _alphas_cumprod() -> torch.Tensor:
    """ᾱ_t of SD1.5's scaled-linear schedule, T = 1000 (what DDPMScheduler computes)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def _reference_add_noise(z0, noise, alphas_cumprod, t):
    a = alphas_cumprod[t].view(-1, *[1] * (z0.dim() - 1))  # (batch, 1, 1, 1)
    return a.sqrt() * z0 + (1 - a).sqrt() * noise


def check_add_noise(add_noise: Callable) -> None:
    """Exercise 7.1: z_t = √ᾱ_t·z0 + √(1 − ᾱ_t)·ε, with one t per example."""
    alphas = _alphas_cumprod()
    z0, noise = random_tensor(3, 4, 8, 8, seed=1), random_tensor(3, 4, 8, 8, seed=2)
    t = torch.tensor([0, 500, 999])
    context = "for z0 of shape (3, 4, 8, 8) and t = [0, 500, 999]"
    got = call_student("add_noise", add_noise, z0, noise, alphas, t, context=context)
    require_tensor("add_noise", got, (3, 4, 8, 8), context)
    want = _reference_add_noise(z0, noise, alphas, t)
    if torch.allclose(got, want):
        passed("add_noise mixes z0 and ε with the weights √ᾱ_t and √(1 − ᾱ_t)")
        return
    a = alphas[t].view(-1, 1, 1, 1)
    if torch.allclose(got, a * z0 + (1 - a) * noise):
        hint = "the weights are square roots: √ᾱ_t and √(1 − ᾱ_t), so the variance stays 1"
    elif torch.allclose(got, (1 - a).sqrt() * z0 + a.sqrt() * noise):
        hint = "the weights are swapped: z0 gets √ᾱ_t (near 1 at t = 0), ε gets √(1 − ᾱ_t)"
    elif torch.allclose(got[0], want[0]) and not torch.allclose(got[2], want[2]):
        hint = "each example has its own t: index ᾱ with t and reshape to (batch, 1, 1, 1)"
    else:
        hint = "z_t = √ᾱ_t·z0 + √(1 − ᾱ_t)·ε with ᾱ_t = alphas_cumprod[t]"
    raise CheckError(f"add_noise is wrong {context}: {hint}")


class _FakeUNet(nn.Module):
    """Stands in for the U-Net: a fixed function of (z_t, t, text) with the same call."""

    def forward(self, z: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return 0.5 * z + 1e-3 * t.view(-1, 1, 1, 1) + text.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def check_noise_prediction_loss(loss_fn: Callable) -> None:
    """Exercise 7.2: mean of (ε_θ(z_t, t, text) − ε)² over every element of the batch."""
    alphas = _alphas_cumprod()
    unet = _FakeUNet()
    z0, noise = random_tensor(4, 4, 8, 8, seed=3), random_tensor(4, 4, 8, 8, seed=4)
    text, t = random_tensor(4, 8, 64, seed=5), torch.tensor([10, 200, 600, 950])
    context = "with a stand-in U-Net ε_θ(z, t, text) = z/2 + t/1000 + mean(text)"
    got = call_student(
        "noise_prediction_loss", loss_fn, unet, z0, text, noise, t, alphas, context=context
    )
    require_tensor("noise_prediction_loss", got, (), context)
    z_t = _reference_add_noise(z0, noise, alphas, t)
    want = ((unet(z_t, t, text) - noise) ** 2).mean()
    if torch.allclose(got, want):
        passed("the loss compares the U-Net's prediction on z_t with the noise that made z_t")
        return
    if torch.allclose(got, ((unet(z_t, t, text) - z0) ** 2).mean()):
        hint = "the U-Net predicts the noise ε (ε-prediction), not the clean latents z0"
    elif torch.allclose(got, ((unet(z0, t, text) - noise) ** 2).mean()):
        hint = "give the U-Net the noisy latents z_t, not z0: it learns to see through the noise"
    elif torch.allclose(got, ((unet(z_t, t, text) - noise) ** 2).sum()):
        hint = "average the squared error (mean), as F.mse_loss does, rather than summing it"
    else:
        hint = "loss = mean((ε_θ(z_t, t, text) − ε)²) with z_t from exercise 7.1"
    raise CheckError(f"noise_prediction_loss is wrong {context}: {hint}")


def _small_unet() -> nn.Module:
    from lokr_edu.digits_sd import build_unet

    torch.manual_seed(0)
    return build_unet()


def check_text_reading_targets(targets_fn: Callable[[nn.Module], list[str]]) -> None:
    """Exercise 7.3: the full names of the nn.Linear layers that read the text: attn2.to_k/to_v."""
    unet = _small_unet()
    got = call_student("text_reading_targets", targets_fn, unet, context="on a small U-Net")
    if not isinstance(got, (list, tuple)) or not all(isinstance(n, str) for n in got):
        raise CheckError(f"text_reading_targets must return a list of names, got {got!r:.80}")
    want = sorted(
        name
        for name, module in unet.named_modules()
        if isinstance(module, nn.Linear) and name.endswith(("attn2.to_k", "attn2.to_v"))
    )
    got = sorted(got)
    if got == want:
        passed(f"the {len(want)} projections that read the text: attn2's to_k and to_v")
        return
    modules = dict(unet.named_modules())
    unknown = [n for n in got if n not in modules]
    if unknown:
        hint = f"{unknown[0]!r} is not a module of the U-Net: give full names from named_modules()"
    elif any(".attn1." in n for n in got):
        hint = "attn1 is self-attention: its keys and values come from the image, not the text"
    elif any(n.endswith(("to_q", "to_out.0")) for n in got):
        hint = "to_q and to_out.0 act on image features; only to_k and to_v read the text"
    else:
        missing = sorted(set(want) - set(got))
        hint = f"{len(missing)} are missing, e.g. {missing[0]!r}" if missing else "extra names"
    raise CheckError(f"text_reading_targets is wrong: {hint}")


def check_lokr_merged_weight(merged_weight: Callable) -> None:
    """Exercise 7.4: W + η·(α/r)·(W1 ⊗ (w2a·w2b)) for a LoKr layer, as merging at η gives."""
    from lokr_edu.adapters import inject, merge, set_strength

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32)).double()
    inject(model, "0", "lokr", rank=4, alpha=1.0, factor=4)  # α/r = 0.25
    layer = model[0]
    adapter = layer.adapters["default"]
    with torch.no_grad():
        adapter.lokr_w2_b.normal_()  # the trained state: W2 is no longer zero
    base = layer.base.weight.detach().clone()
    for eta in (0.5, 1.5):
        context = f"at η = {eta}"
        got = call_student("lokr_merged_weight", merged_weight, layer, eta, context=context)
        require_tensor("lokr_merged_weight", got, tuple(base.shape), context)
        set_strength(model, eta)
        merge(model)
        want = layer.base.weight.detach().clone()
        layer.unmerge("default")
        if torch.allclose(got, want):
            continue
        w1, w2 = adapter.lokr_w1, adapter.lokr_w2_a @ adapter.lokr_w2_b
        scale = adapter.alpha.item() / adapter.lokr_w2_a.shape[1]
        if torch.allclose(got, base + eta * torch.kron(w1, w2)):
            hint = "the scale α/r is missing (r is the rank of the low-rank factor)"
        elif torch.allclose(got, base + eta * scale * torch.kron(w2, w1)):
            hint = "the Kronecker product is in the wrong order: W1 ⊗ W2, W1 is the small block"
        elif torch.allclose(got, base + scale * torch.kron(w1, w2)):
            hint = "η is missing: the strength multiplies ΔW"
        elif torch.allclose(got, eta * (base + scale * torch.kron(w1, w2))):
            hint = "η scales ΔW only, not the frozen weight W"
        else:
            hint = "W + η·(α/r)·kron(W1, w2a @ w2b)"
        raise CheckError(f"lokr_merged_weight is wrong {context}: {hint}")
    passed("the merged weight at η is W + η·(α/r)·(W1 ⊗ W2), the weight that merging at η writes")
