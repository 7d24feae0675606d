"""Checks for chapter 07's exercises (solutions/07_stable_diffusion_lokr_solutions.ipynb)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lokr_edu.checks.common import CheckError, call_student, passed, random_tensor, require_tensor

__all__ = [
    "check_velocity",
    "check_noise_prediction_loss",
    "check_text_reading_targets",
    "check_lokr_merged_weight",
    "check_predict_half_strength",
    "check_rescaled_guidance",
    "check_forgetting",
    "check_zero_terminal_snr",
]


def _alphas_cumprod() -> torch.Tensor:
    """ᾱ_t of SD1.5's scaled-linear schedule, T = 1000 (what DDPMScheduler computes)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def _reference_add_noise(z0, noise, alphas_cumprod, t):
    a = alphas_cumprod[t].view(-1, *[1] * (z0.dim() - 1))  # (batch, 1, 1, 1)
    return a.sqrt() * z0 + (1 - a).sqrt() * noise


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal up to float32 rounding: an answer computed in single precision passes."""
    return torch.allclose(got, want, rtol=1e-4, atol=1e-5)


def _scheduler(zero_terminal_snr: bool = False):
    """diffusers' DDPMScheduler with SD1.5's schedule, optionally rescaled to ᾱ_T = 0."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        rescale_betas_zero_snr=zero_terminal_snr,
    )


def _velocity_hint(got, z0, noise, alphas_cumprod, t) -> str:
    """The likely mistake behind a wrong v, or the formula."""

    def per_example(values: torch.Tensor) -> torch.Tensor:
        return values.view(-1, *[1] * (z0.dim() - 1))  # (batch,) -> (batch, 1, 1, 1)

    a = per_example(alphas_cumprod[t])
    signal, spread = a.sqrt(), (1 - a).sqrt()
    if _close(got, signal * z0 + spread * noise):
        return (
            "that is z_t, the noised latent (scheduler.add_noise); v weighs ε by √ᾱ_t and "
            "subtracts √(1 − ᾱ_t)·z0"
        )
    if _close(got, -(signal * noise - spread * z0)):
        return "the sign is reversed: v = √ᾱ_t·ε − √(1 − ᾱ_t)·z0, so v ≈ +ε at t = 0"
    if _close(got, spread * noise - signal * z0):
        return "the weights are swapped: ε gets √ᾱ_t (near 1 at t = 0), z0 gets √(1 − ᾱ_t)"
    if _close(got, signal * z0 - spread * noise):
        return "z0 and ε have swapped places: v = √ᾱ_t·ε − √(1 − ᾱ_t)·z0, ε with the plus sign"
    if _close(got, a * noise - (1 - a) * z0):
        return "the weights are square roots: √ᾱ_t and √(1 − ᾱ_t), as in z_t"
    for one in t.tolist():
        b = alphas_cumprod[one]
        if _close(got, b.sqrt() * noise - (1 - b).sqrt() * z0):
            return (
                f"every example got ᾱ at t = {one}: each example has its own t; index "
                "alphas_cumprod with t and reshape to (batch, 1, 1, 1)"
            )
    return "v = √ᾱ_t·ε − √(1 − ᾱ_t)·z0 with ᾱ_t = alphas_cumprod[t], one t per example"


def check_velocity(velocity: Callable) -> None:
    """Exercise 7.1: v = √ᾱ_t·ε − √(1 − ᾱ_t)·z0 (Salimans & Ho, 2022), one t per example.

    The reference is diffusers' `DDPMScheduler.get_velocity`, on SD1.5's schedule and on the
    same schedule rescaled to zero terminal SNR (exercise 7.8), where v at t = T is −z0.
    """
    z0, noise = random_tensor(3, 4, 8, 8, seed=1), random_tensor(3, 4, 8, 8, seed=2)
    t = torch.tensor([999, 500, 0])
    for zero_terminal_snr in (False, True):
        scheduler = _scheduler(zero_terminal_snr)
        alphas = scheduler.alphas_cumprod.double()
        schedule = "zero-terminal-SNR " if zero_terminal_snr else ""
        context = f"for z0 of shape (3, 4, 8, 8), t = [999, 500, 0] and SD1.5's {schedule}schedule"
        got = call_student(
            "velocity", velocity, z0.clone(), noise.clone(), alphas.clone(), t, context=context
        )
        require_tensor("velocity", got, (3, 4, 8, 8), context)
        want = scheduler.get_velocity(z0, noise, t)
        if not _close(got.double(), want):
            hint = _velocity_hint(got.double(), z0, noise, alphas, t)
            raise CheckError(f"velocity is wrong {context}: {hint}")
    if not _close(got[0].double(), -z0[0]):  # ᾱ_999 = 0 on the rescaled schedule
        raise CheckError("velocity at t = 999 of the zero-terminal-SNR schedule should be −z0")
    passed(
        "v = √ᾱ_t·ε − √(1 − ᾱ_t)·z0 per example, as scheduler.get_velocity; where ᾱ_T = 0 "
        "(exercise 7.8), v at t = 999 is −z0"
    )


class _FakeUNet(nn.Module):
    """Stands in for the U-Net: a fixed function of (z_t, t, text) with the same call."""

    def forward(self, z: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return 0.5 * z + 1e-3 * t.view(-1, 1, 1, 1) + text.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def check_noise_prediction_loss(loss_fn: Callable) -> None:
    """Exercise 7.2: mean of (ε_θ(z_t, t, text) − ε)² over every element of the batch, with
    z_t = √ᾱ_t·z0 + √(1 − ᾱ_t)·ε (chapter 07, section 3)."""
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
    a = alphas[t].view(-1, 1, 1, 1)  # (batch, 1, 1, 1)
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
    elif torch.allclose(got, ((unet(a * z0 + (1 - a) * noise, t, text) - noise) ** 2).mean()):
        hint = "z_t mixes with square roots: √ᾱ_t·z0 + √(1 − ᾱ_t)·ε, so its variance stays 1"
    else:
        hint = "loss = mean((ε_θ(z_t, t, text) − ε)²) with z_t = √ᾱ_t·z0 + √(1 − ᾱ_t)·ε"
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


def _rescaled(eps_text, eps_guided, phi, dims=(1, 2, 3), invert=False, reverse=False):
    """Guidance rescale with a chosen std axis, ratio and mix: the right answer and its slips."""
    std_text = eps_text.std(dim=dims, keepdim=True)
    std_guided = eps_guided.std(dim=dims, keepdim=True)
    ratio = std_guided / std_text if invert else std_text / std_guided
    weight = 1 - phi if reverse else phi
    return weight * eps_guided * ratio + (1 - weight) * eps_guided


def check_rescaled_guidance(rescaled_guidance: Callable) -> None:
    """Exercise 7.6: φ·ε̂·σ(ε_text)/σ(ε̂) + (1 − φ)·ε̂, σ per example over (C, H, W).

    Lin et al. (2024, §3.4); the reference is diffusers' `rescale_noise_cfg`, what a Stable
    Diffusion pipeline applies when called with `guidance_rescale=φ`.
    """
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    spread = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64).view(-1, 1, 1, 1)
    eps_text = spread * random_tensor(3, 4, 8, 8, seed=11)  # each example its own spread
    eps_empty = spread * random_tensor(3, 4, 8, 8, seed=12)
    eps_guided = eps_empty + 7.0 * (eps_text - eps_empty)  # guidance at g = 7
    for phi in (0.7, 0.0):
        context = f"at φ = {phi:g}, for predictions of shape (3, 4, 8, 8) guided at g = 7"
        got = call_student(
            "rescaled_guidance",
            rescaled_guidance,
            eps_text.clone(),
            eps_guided.clone(),
            phi,
            context=context,
        )
        require_tensor("rescaled_guidance", got, (3, 4, 8, 8), context)
        want = rescale_noise_cfg(eps_guided, eps_text, guidance_rescale=phi)
        if _close(got.double(), want):
            continue
        got = got.double()
        slips = [
            (
                dict(dims=(0, 1, 2, 3)),
                "take one standard deviation per example, over its (C, H, W) values (dims 1, "
                "2, 3), not one over the whole batch: each image keeps its own scale",
            ),
            (
                dict(dims=(2, 3)),
                "take the standard deviation over all of an example's values, C, H and W "
                "together (dims 1, 2, 3), not one per channel",
            ),
            (
                dict(reverse=True),
                "the mix is reversed: φ weighs the rescaled prediction, φ·ε_rescaled + "
                "(1 − φ)·ε̂, so that φ = 0 is plain guidance",
            ),
            (
                dict(invert=True),
                "the ratio is inverted: multiply ε̂ by σ(ε_text)/σ(ε̂), which brings its "
                "spread down to the text prediction's",
            ),
            (
                dict(phi=1.0),
                "mix the rescaled prediction with ε̂ by φ: φ·ε_rescaled + (1 − φ)·ε̂; this "
                "is φ = 1 whatever φ is",
            ),
        ]
        hint = next(
            (
                hint
                for options, hint in slips
                if _close(got, _rescaled(eps_text, eps_guided, **({"phi": phi} | options)))
            ),
            "ε_rescaled = ε̂·σ(ε_text)/σ(ε̂) per example; return φ·ε_rescaled + (1 − φ)·ε̂",
        )
        raise CheckError(f"rescaled_guidance is wrong {context}: {hint}")
    passed(
        "ε̂ rescaled to the text prediction's standard deviation, example by example, and mixed "
        "by φ: diffusers' rescale_noise_cfg (guidance_rescale=φ)"
    )


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
    passed(f"one run each: the plain prompts kept {kept:.2f} with the prior, {lost:.2f} without it")


def _zero_snr_slip(
    betas: torch.Tensor,
    on_root: bool = True,
    keep_first: bool = True,
    first_to_one: bool = False,
    square: bool = True,
    output: str = "betas",
) -> torch.Tensor:
    """Algorithm 1 of Lin et al. (2024) with one step changed: the plausible slips."""
    alphas_bar = torch.cumprod(1 - betas, dim=0)
    x = alphas_bar.sqrt() if on_root else alphas_bar
    first, last = x[0].clone(), x[-1].clone()
    x = x - last
    if first_to_one:
        x = x / (first - last)
    elif keep_first:
        x = x * first / (first - last)
    alphas_bar = x**2 if on_root and square else x
    if output == "alphas_cumprod":
        return alphas_bar
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return alphas if output == "alphas" else 1 - alphas


def _zero_snr_hint(got: torch.Tensor, betas: torch.Tensor) -> str:
    slips = [
        (
            dict(output="alphas_cumprod"),
            "that is ᾱ_t; return β: α_t = ᾱ_t / ᾱ_{t−1} (α_1 = ᾱ_1), then β_t = 1 − α_t",
        ),
        (dict(output="alphas"), "that is α_t = 1 − β_t; return β_t"),
        (
            dict(keep_first=False),
            "shifting √ᾱ down by √ᾱ_T is half of it: scale it after the shift so that the "
            "first step's √ᾱ_1 gets its old value back",
        ),
        (
            dict(first_to_one=True),
            "keep √ᾱ_1 at its old value, not at 1: scale by √ᾱ_1 / (√ᾱ_1 − √ᾱ_T)",
        ),
        (
            dict(square=False),
            "the shifted and scaled values are √ᾱ_t: square them before turning them into β",
        ),
        (
            dict(on_root=False),
            "shift and scale √ᾱ_t, the share of z0 in z_t, not ᾱ_t: the map is affine in √ᾱ_t",
        ),
    ]
    for options, hint in slips:
        if torch.allclose(got, _zero_snr_slip(betas, **options), rtol=1e-5, atol=1e-8):
            return hint
    old, new = torch.cumprod(1 - betas, dim=0), torch.cumprod(1 - got, dim=0)
    if abs(new[-1].item()) > 1e-6:
        return f"your β give ᾱ_T = {new[-1].item():.3g}: the point is ᾱ_T = 0"
    if abs(new[0].item() - old[0].item()) > 1e-6:
        return f"your β change ᾱ_1 from {old[0].item():.6f} to {new[0].item():.6f}: keep it"
    return "√ᾱ_t ← (√ᾱ_t − √ᾱ_T)·√ᾱ_1 / (√ᾱ_1 − √ᾱ_T), then ᾱ_t, then β_t = 1 − ᾱ_t / ᾱ_{t−1}"


def check_zero_terminal_snr(zero_terminal_snr: Callable) -> None:
    """Exercise 7.8: β rescaled so that ᾱ_T = 0 and ᾱ_1 is kept (Lin et al., 2024, Algorithm 1).

    √ᾱ_t ← (√ᾱ_t − √ᾱ_T)·√ᾱ_1 / (√ᾱ_1 − √ᾱ_T), then β_t = 1 − ᾱ_t / ᾱ_{t−1}. The reference
    is diffusers' `rescale_zero_terminal_snr` (its schedulers' `rescale_betas_zero_snr=True`).
    """
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

    schedules = {
        "SD1.5's scaled-linear β over 1000 steps": torch.linspace(
            0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64
        )
        ** 2,
        "a linear β from 1e-4 to 0.02 over 500 steps": torch.linspace(
            1e-4, 0.02, 500, dtype=torch.float64
        ),
    }
    for name, betas in schedules.items():
        context = f"for {name}"
        got = call_student("zero_terminal_snr", zero_terminal_snr, betas.clone(), context=context)
        if isinstance(got, torch.Tensor) and tuple(got.shape) == (len(betas) - 1,):
            raise CheckError(
                f"zero_terminal_snr returned {len(betas) - 1} values {context}; the first step "
                "has a β too: β_1 = 1 − ᾱ_1 (ᾱ_0 = 1)"
            )
        require_tensor("zero_terminal_snr", got, tuple(betas.shape), context)
        want = rescale_zero_terminal_snr(betas.clone())
        if not torch.allclose(got.double(), want, rtol=1e-3, atol=1e-6):  # float32 passes
            hint = _zero_snr_hint(got.double(), betas)
            raise CheckError(f"zero_terminal_snr is wrong {context}: {hint}")
    betas = schedules["SD1.5's scaled-linear β over 1000 steps"]
    before = torch.cumprod(1 - betas, dim=0).sqrt()
    after = torch.cumprod(1 - rescale_zero_terminal_snr(betas.clone()), dim=0).sqrt()
    passed(
        f"SD1.5's schedule with ᾱ_T = 0: √ᾱ at t = 500 goes from {before[500]:.3f} to "
        f"{after[500]:.3f}, at t = 998 from {before[998]:.3f} to {after[998]:.4f}; "
        f"β_T = {1 - after[-1] ** 2 / after[-2] ** 2:.0f}: the last step keeps nothing of z0"
    )
