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
    "check_predict_half_strength",
    "check_guided_noise",
    "check_forgetting",
    "check_terminal_signal",
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


def _committed_runs() -> list[dict]:
    """The runs of benchmarks/dreambooth_digits.py committed with the course."""
    import json

    from lokr_edu.course import repository_root

    path = repository_root() / "benchmarks" / "results" / "dreambooth_digits.json"
    return json.loads(path.read_text())["runs"]


HALF_STRENGTH_ANSWERS = ("none", "half", "all")


def check_predict_half_strength(prediction: str) -> None:
    """Exercise 7.5: at η = 0.5, how much of the concept is drawn, against η = 1?

    The answer comes from the committed runs (mean over methods and seeds of the prior variant):
    "none" if η = 0.5 draws under a quarter of η = 1's concept rate, "all" above three quarters,
    "half" between.
    """
    if prediction not in HALF_STRENGTH_ANSWERS:
        raise CheckError(f"prediction must be one of {HALF_STRENGTH_ANSWERS}, got {prediction!r}")
    runs = [r for r in _committed_runs() if r["variant"] == "prior" and "eta" in r]
    half = sum(r["eta"]["0.5"]["concept"] for r in runs) / len(runs)
    full = sum(r["eta"]["1.0"]["concept"] for r in runs) / len(runs)
    ratio = half / full
    answer = "none" if ratio < 0.25 else "all" if ratio > 0.75 else "half"
    measured = f"measured over {len(runs)} runs: concept {half:.2f} at η = 0.5, {full:.2f} at η = 1"
    if prediction == answer:
        passed(f"{answer}: {measured}")
        return
    if prediction == "half":
        hint = (
            "η scales ΔW linearly, but the U-Net is not linear in its weights, and sampling "
            "repeats it ten times: a small change in every step's prediction need not give half "
            "a rotation"
        )
    else:
        hint = "compare the two rates: the answer is where their ratio falls"
    raise CheckError(f"the prediction {prediction!r} is not what happens ({measured}): {hint}")


def _fake_unet(z: torch.Tensor, t: int, text: torch.Tensor):
    """A stand-in U-Net with the real call: ε(z, t, text) depends on each row's own text."""
    from types import SimpleNamespace

    return SimpleNamespace(sample=0.5 * z + text.mean(dim=(1, 2)).view(-1, 1, 1, 1) + 1e-3 * t)


def check_guided_noise(guided_noise: Callable) -> None:
    """Exercise 7.6: ε̂ = ε(∅) + g·(ε(text) − ε(∅)), with the U-Net run once on a doubled batch."""
    z, text = random_tensor(3, 4, 8, 8, seed=11), random_tensor(3, 8, 64, seed=12)
    empty = random_tensor(1, 8, 64, seed=13).expand(3, 8, 64)
    calls = []

    def unet(z_in, t, text_in):
        calls.append(len(z_in))
        return _fake_unet(z_in, t, text_in)

    eps_text, eps_empty = _fake_unet(z, 501, text).sample, _fake_unet(z, 501, empty).sample
    for g in (1.0, 3.0):
        calls.clear()
        context = f"at guidance g = {g:g}, for 3 latents"
        got = call_student(
            "guided_noise", guided_noise, unet, z, 501, text, empty, g, context=context
        )
        require_tensor("guided_noise", got, (3, 4, 8, 8), context)
        want = eps_empty + g * (eps_text - eps_empty)
        if torch.allclose(got, want):
            continue
        if torch.allclose(got, eps_text + g * (eps_empty - eps_text)):
            hint = "the branches are swapped: start from ε(∅) and move towards ε(text)"
        elif torch.allclose(got, g * eps_text):
            hint = "guidance mixes two predictions: ε(∅) + g·(ε(text) − ε(∅)), not g·ε(text)"
        elif torch.allclose(got, eps_text + g * (eps_text - eps_empty)):
            hint = "start from ε(∅), not ε(text): g = 1 must give ε(text) exactly"
        else:
            hint = "ε̂ = ε(∅) + g·(ε(text) − ε(∅)); check which half of the batch is which"
        raise CheckError(f"guided_noise is wrong {context}: {hint}")
    if calls != [6]:
        raise CheckError(
            f"guided_noise called the U-Net with batches of {calls}: run it once on the doubled "
            "batch torch.cat([z, z]) with torch.cat([empty, text]), as the pipeline does (one "
            "call of 2N rows is faster than two of N)"
        )
    passed("ε̂ = ε(∅) + g·(ε(text) − ε(∅)) from one U-Net call on both branches")


def check_forgetting(rates: dict) -> None:
    """Exercise 7.7: the concept digits' plain prompts with and without the prior."""
    if not isinstance(rates, dict) or set(rates) != {"prior", "no prior"}:
        raise CheckError(f"give a dict with the keys 'prior' and 'no prior', got {rates!r:.80}")
    if not all(isinstance(v, float) and 0 <= v <= 1 for v in rates.values()):
        raise CheckError(f"each rate is a float in [0, 1] (reader.rate returns one), got {rates}")
    kept, lost = rates["prior"], rates["no prior"]
    if kept < lost:
        raise CheckError(
            f"the run with the prior kept fewer plain digits ({kept:.2f}) than the run without "
            f"({lost:.2f}): are the two keys swapped?"
        )
    if kept - lost < 0.3:
        raise CheckError(
            f"prior {kept:.2f}, no prior {lost:.2f}: almost no difference. Did the no-prior run "
            "really train without class images (train_concept(method, 'no prior'))? And did "
            "you measure the plain prompts of the concept digits, not the concept?"
        )
    passed(
        f"without the prior the plain prompts forget: {kept:.2f} kept with it, {lost:.2f} without"
    )


def check_terminal_signal(terminal_signal: Callable) -> None:
    """Exercise 7.8: √ᾱ_T and SNR_T = ᾱ_T / (1 − ᾱ_T) of a scaled-linear β schedule."""
    found = []
    for beta_start, beta_end, steps in [(0.00085, 0.012, 1000), (0.0001, 0.02, 500)]:
        context = f"for β from {beta_start} to {beta_end} over {steps} steps"
        got = call_student(
            "terminal_signal", terminal_signal, beta_start, beta_end, steps, context=context
        )
        if not (isinstance(got, tuple) and len(got) == 2):
            raise CheckError(f"terminal_signal must return (√ᾱ_T, SNR_T), got {got!r:.80}")
        share, snr = (float(v) for v in got)
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
        last = torch.cumprod(1 - betas, dim=0)[-1].item()
        want = (last**0.5, last / (1 - last))
        if abs(share - want[0]) <= 1e-6 * max(1, want[0]) and abs(snr - want[1]) <= 1e-6 * max(
            1, want[1]
        ):
            found.append(want)
            continue
        linear = torch.cumprod(
            1 - torch.linspace(beta_start, beta_end, steps, dtype=torch.float64), dim=0
        )[-1].item()
        if abs(share - linear**0.5) < 1e-9:
            hint = "scaled linear means linear in √β: linspace(√β_start, √β_end) then square"
        elif abs(share - last) < 1e-9:
            hint = "the share of z0 is √ᾱ_T, the square root of the product"
        elif abs(snr - last**0.5 / (1 - last**0.5)) < 1e-9:
            hint = "SNR is a ratio of variances: ᾱ_T / (1 − ᾱ_T), not of standard deviations"
        else:
            hint = "ᾱ_T = Π (1 − β_t) over all steps; √ᾱ_T and ᾱ_T / (1 − ᾱ_T)"
        raise CheckError(
            f"terminal_signal returned ({share:.6g}, {snr:.6g}) {context}; expected "
            f"({want[0]:.6g}, {want[1]:.6g}): {hint}"
        )
    share, snr = found[0]
    passed(f"SD1.5's schedule: √ᾱ_T = {share:.3f}, SNR_T = {snr:.4f}; a trace of z0 survives")
