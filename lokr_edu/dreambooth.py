"""DreamBooth with prior preservation, on cached latents: a concept behind a trigger word.

Defined in chapter 07. DreamBooth (Ruiz et al., 2023) teaches a model a concept from a handful of
*instance* images whose captions name it with a rare trigger word, and keeps the model's prior
for the concept's class with *class* images that the frozen model generated itself from the
class prompt, before training:

    loss = ‖ε − ε_θ(z_t, t, c_instance)‖²  +  λ · ‖ε' − ε_θ(z'_t, t', c_class)‖²
           └─ instance images, trigger word ┘     └─ the frozen model's own images ─┘

(diffusers' `train_dreambooth_lora.py`, `--with_prior_preservation --prior_loss_weight λ`).
Real images of the class with plain captions instead of generated ones are kohya's
"regularisation images": the same loss, other data.

Real trainers encode every training image with the VAE and every caption with the text encoder
once, before the first step (`--cache_latents`, diffusers' `--pre_compute_text_embeddings`):
the frozen parts then cost nothing per step, and a step is one U-Net forward and backward.
`cache` does that; `train` runs the loop on what it cached. With caption_dropout p, each
caption's embedding is replaced by the empty prompt's with probability p, so the adapter also
learns the unconditional branch that classifier-free guidance subtracts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lokr_edu.adapters import adapter_layers, inject
from lokr_edu.diffusion import noise_prediction_loss
from lokr_edu.sd_data import tokenize_captions

__all__ = ["Cached", "cache", "encode_prompts", "train"]


@dataclass
class Cached:
    """Training examples with the frozen parts already applied.

    latent_mean, latent_std: (N, 4, h, w) the VAE posterior of each image (z0 is drawn from it
    at every step, scaled by the VAE's scaling_factor); text: (N, L, d) each caption's embedding.
    """

    latent_mean: Tensor
    latent_std: Tensor
    text: Tensor

    def __len__(self) -> int:
        return len(self.latent_mean)

    def z0(self, index: Tensor, generator: torch.Generator) -> Tensor:
        mean, std = self.latent_mean[index], self.latent_std[index]
        return mean + std * torch.randn(mean.shape, generator=generator)


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str]) -> Tensor:
    """(len(prompts), L, d): the text encoder's last hidden states, what the U-Net reads."""
    ids = tokenize_captions(pipe.tokenizer, list(prompts)).to(pipe.text_encoder.device)
    return pipe.text_encoder(ids)[0]


@torch.no_grad()
def cache(pipe, images: Tensor, captions: Sequence[str]) -> Cached:
    """Encode images (N, 3, H, W) in [−1, 1] and their captions once (see the module docstring)."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if len(images) == 0:
        raise ValueError("images: give at least one")
    scale = pipe.vae.config.scaling_factor
    posterior = pipe.vae.encode(images.to(pipe.vae.device, pipe.vae.dtype)).latent_dist
    return Cached(posterior.mean * scale, posterior.std * scale, encode_prompts(pipe, captions))


def train(
    pipe,
    instance: Cached,
    prior: Cached | None = None,
    *,
    method: str = "lokr",
    rank: int = 8,
    targets: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0"),
    steps: int = 200,
    batch_size: int = 32,
    learning_rate: float = 1e-2,
    prior_weight: float = 1.0,
    caption_dropout: float = 0.0,
    max_grad_norm: float | None = 1.0,
    empty_prompt: Tensor | None = None,
    seed: int = 0,
    adapter_options: dict | None = None,
    progress: bool = False,
) -> list[float]:
    """Inject an adapter into pipe.unet and train it; returns the loss of every step.

    Each step draws batch_size instance examples and, with a prior, batch_size class examples
    (with replacement), and takes one AdamW step on
    loss = instance loss + prior_weight · prior loss (module docstring), with the gradient's norm
    clipped to max_grad_norm as diffusers' scripts do (None: no clipping). Every draw comes from a
    generator seeded with `seed`, and so do the adapter's initial factors: the same call trains
    the same adapter. empty_prompt (1, L, d) is the embedding caption dropout puts in a dropped
    caption's place (default: `encode_prompts(pipe, [""])`). adapter_options go to `inject`
    (LoKr's factor, for one).
    """
    from tqdm.auto import tqdm

    if not 0.0 <= caption_dropout < 1.0:
        raise ValueError(f"caption_dropout must be in [0, 1), got {caption_dropout}")
    if prior_weight < 0:
        raise ValueError(f"prior_weight must be ≥ 0, got {prior_weight}")
    unet = pipe.unet
    if list(adapter_layers(unet)):
        raise ValueError("pipe.unet already has an adapter: train a fresh copy of the base model")
    with torch.random.fork_rng():  # the initial factors depend on seed alone
        torch.manual_seed(seed)
        inject(unet, list(targets), method, rank, **(adapter_options or {}))
    parameters = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=1e-2)
    if caption_dropout and empty_prompt is None:
        empty_prompt = encode_prompts(pipe, [""])
    generator = torch.Generator().manual_seed(seed)
    sets = [instance] if prior is None or prior_weight == 0 else [instance, prior]
    weights = torch.tensor([1.0, prior_weight][: len(sets)])
    losses = []
    unet.train()
    for _ in tqdm(range(steps), disable=None if progress else True, desc="DreamBooth"):
        latents, text = [], []
        for examples in sets:
            index = torch.randint(len(examples), (batch_size,), generator=generator)
            latents.append(examples.z0(index, generator))
            text.append(examples.text[index])
        latents, text = torch.cat(latents), torch.cat(text)  # (S·batch, 4, h, w), (S·batch, L, d)
        if caption_dropout:
            dropped = torch.rand(len(text), generator=generator) < caption_dropout
            text = torch.where(dropped[:, None, None], empty_prompt, text)
        per_example = noise_prediction_loss(
            unet, latents, text, pipe.scheduler, generator, reduction="none"
        ).view(len(sets), batch_size)
        loss = (per_example.mean(dim=1) * weights).sum()
        optimizer.zero_grad()
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
        optimizer.step()
        losses.append(loss.detach())
    unet.eval()
    unet.requires_grad_(False)
    return torch.stack(losses).tolist()  # one synchronisation, after the loop
