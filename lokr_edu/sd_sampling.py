"""Using a trained adapter: drawing images, at any strength, and exporting its files.

Defined in chapter 07. `generate` draws images for prompts with the pipeline's own sampling loop
(its scheduler) and classifier-free guidance, g = guidance_scale:

    ε̂ = ε_θ(z_t, t, ∅) + g · (ε_θ(z_t, t, text) − ε_θ(z_t, t, ∅))

`sample_grid` is the grid `lokr_edu.diffusion.train` saves as it trains; `eta_sweep` measures the
pipeline with the adapter at strengths η (W + η·ΔW, chapter 04); `export_adapter` writes the files
other tools read (kohya/LyCORIS keys, and diffusers/peft keys for a LoRA).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lokr_edu.adapters import adapter_layers, set_strength
from lokr_edu.io import save_adapter
from lokr_edu.sd_data import tokenize_captions

if TYPE_CHECKING:  # for the annotations only: lokr_edu.diffusion imports this module
    from lokr_edu.diffusion import TrainConfig

__all__ = ["generate", "default_batch_size", "sample_grid", "eta_sweep", "export_adapter"]

KOHYA_FILE = "adapter.safetensors"  # A1111, ComfyUI, kohya sd-scripts, LyCORIS
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # the name pipe.load_lora_weights(folder) reads


def default_batch_size(pipe, resolution: int | None = None) -> int:
    """How many prompts `generate` samples at once: 8 at 512 × 512, more for smaller images.

    With classifier-free guidance a batch of 8 prompts is 16 U-Net rows; SD1.5 in fp16 at 512²
    then stays well inside a 16 GB GPU (a T4), and VAE slicing decodes one image at a time.
    The count grows as the pixels shrink, 8 · (512 / side)², up to 250 (the tiny model of
    chapter 07 draws its 200 prompts in one batch). Defined in chapter 07.
    """
    side = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    return max(1, min(250, 8 * 512**2 // side**2))


@torch.no_grad()
def generate(
    pipe,
    prompts: Sequence[str],
    *,
    steps: int = 20,
    guidance_scale: float = 3.0,
    seed: int = 0,
    batch_size: int | None = None,
    resolution: int | None = None,
) -> Tensor:
    """Images for `prompts` from any StableDiffusionPipeline: (N, 3, H, W) in [0, 1].

    The pipeline's own sampling loop (its scheduler, classifier-free guidance
    ε̂ = ε(∅) + g·(ε(text) − ε(∅)) with g = guidance_scale), in batches of batch_size prompts
    (default: `default_batch_size`, sized for a 16 GB GPU), decoding with VAE slicing (one image
    at a time), from one generator seeded with `seed`: the same call gives the same images.
    resolution: the images' side in pixels (default: the pipeline's, 512 for SD1.5).
    Defined in chapter 07.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts: give at least one prompt")
    tokenize_captions(pipe.tokenizer, prompts)  # a too-long prompt is an error, not truncated
    batch_size = batch_size or default_batch_size(pipe, resolution)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.enable_slicing()  # decode one image at a time: the VAE's peak memory of one
    generator = torch.Generator().manual_seed(seed)
    images = []
    for start in range(0, len(prompts), batch_size):
        out = pipe(
            prompts[start : start + batch_size],
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generator,
            height=resolution,
            width=resolution,
            output_type="pt",
        ).images  # (n, 3, H, W) in [0, 1]
        images.append(out.float().cpu())
    return torch.cat(images)


@torch.no_grad()
def sample_grid(pipe, config: TrainConfig, tokenize=None, autocast=None):
    """The sample grid `train` saves: one row, an image per config.sample_prompts (a PIL image).

    The pipeline's sampling loop, config.sample_inference_steps steps, seeded with config.seed,
    config.sample_resolution pixels square, the prompts' embeddings computed with `tokenize`
    (default: the pipeline's tokenizer), under `autocast` (a context manager; `train` passes
    torch.autocast in its mixed-precision dtype). The same call on a pipeline that reloaded the
    exported adapter draws the same grid. Defined in chapter 07.
    """
    from diffusers.utils import make_image_grid

    if tokenize is None:
        tokenize = functools.partial(tokenize_captions, pipe.tokenizer)
    prompts = list(config.sample_prompts)
    device = pipe.unet.device
    side = config.sample_resolution
    pipe.set_progress_bar_config(disable=True)
    with autocast if autocast is not None else contextlib.nullcontext():
        embeddings = pipe.text_encoder(tokenize(prompts).to(device))[0]
        empty = pipe.text_encoder(tokenize([""] * len(prompts)).to(device))[0]
        images = pipe(
            prompt_embeds=embeddings,
            negative_prompt_embeds=empty,
            num_inference_steps=config.sample_inference_steps,
            generator=torch.Generator().manual_seed(config.seed),
            height=side,
            width=side,
        ).images
    return make_image_grid(images, rows=1, cols=len(images))


def eta_sweep(
    pipe,
    etas: Sequence[float],
    measure: Callable[[object], object],
    name: str | None = None,
) -> dict[float, object]:
    """{η: measure(pipe)} with the U-Net's adapter (all, or the one called `name`) at strength η.

    η = 0 is the base model, η = 1 the adapter as trained, η > 1 extrapolates along ΔW
    (W + η·ΔW, chapter 04). The strength is set back to 1 afterwards, even on an error.
    """
    results = {}
    try:
        for eta in etas:
            set_strength(pipe.unet, eta, name)
            results[float(eta)] = measure(pipe)
    finally:
        set_strength(pipe.unet, 1.0, name)
    return results


def export_adapter(pipe, folder: Path | str, *, dtype: torch.dtype | None = None) -> list[Path]:
    """Write the trained adapter as the files other tools read (`lokr_edu.save_adapter`):

        folder/adapter.safetensors                 kohya/LyCORIS keys: A1111, ComfyUI, LyCORIS
        folder/pytorch_lora_weights.safetensors    diffusers/peft keys, for LoRA only:
                                                   pipe.load_lora_weights(folder) reads it
    dtype converts the tensors (torch.float16 halves the files, as most shared files are).
    Returns the paths written. Defined in chapter 07.
    """
    folder = Path(folder)
    methods = {
        adapter.method
        for model in (pipe.unet, pipe.text_encoder)
        for _, layer in adapter_layers(model)
        for adapter in layer.adapters.values()
    }
    paths = [save_adapter(pipe, folder / KOHYA_FILE, "kohya", dtype=dtype)]
    if methods == {"lora"}:
        paths.append(save_adapter(pipe, folder / DIFFUSERS_FILE, "peft", dtype=dtype))
    return paths
