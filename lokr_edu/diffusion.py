"""Fine-tuning a Stable Diffusion pipeline with an adapter: data, loss, training loop, checkpoints.

Defined in chapter 07 (work in progress: the notebook and the tiny pretrained model are not
written yet). The recipe is that of diffusers' `train_text_to_image_lora.py`:

    z0 = scaling_factor · VAE.encode(image)          latents of the training image
    ε ~ N(0, I), t ~ U{0, …, T−1}, z_t = √ᾱ_t·z0 + √(1−ᾱ_t)·ε   (scheduler.add_noise)
    loss = ‖ε − ε_θ(z_t, t, text(caption))‖²        (ε-prediction; optional SNR-γ weights)

Only the adapter's factors are trained (`lokr_edu.inject` on the U-Net). Every random draw of a
step (which images, which t, which ε) comes from a generator seeded with (seed, step), so a run
that is interrupted and resumed from a checkpoint ends with exactly the adapter of a run that was
not. Checkpoints are safetensors (adapter, optimizer moments) with the rest as JSON metadata:
nothing is pickled.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from lokr_edu.adapters import adapter_layers, inject
from lokr_edu.io import write_safetensors_atomically

__all__ = [
    "TrainConfig",
    "ImageCaptionFolder",
    "noise_prediction_loss",
    "save_checkpoint",
    "load_checkpoint",
    "train",
    "write_tiny_clip_vocabulary",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class TrainConfig:
    """Everything that defines a run; a checkpoint records it and refuses another config."""

    method: str = "lokr"
    rank: int = 8
    alpha: float | None = None
    targets: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0")
    steps: int = 100
    batch_size: int = 4
    learning_rate: float = 1e-4
    weight_decay: float = 1e-2
    snr_gamma: float | None = None
    checkpoint_every: int = 50
    seed: int = 0
    adapter_options: dict = field(default_factory=dict)

    def key(self) -> str:
        """The settings that must match for a checkpoint to be resumed (all but `steps`)."""
        settings = asdict(self)
        settings.pop("steps")
        settings["targets"] = list(self.targets)
        return json.dumps(settings, sort_keys=True)


class ImageCaptionFolder(torch.utils.data.Dataset):
    """Images in a folder, each with a caption in a .txt file of the same name.

    Images are resized to `resolution` (a multiple of `multiple`, the VAE's downsampling) and
    scaled to [−1, 1]. Errors come at construction, before any training step.
    """

    def __init__(self, folder: Path | str, resolution: int, multiple: int = 8) -> None:
        from PIL import Image

        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"folder: {folder} is not a directory")
        if resolution < multiple or resolution % multiple:
            raise ValueError(
                f"resolution must be a positive multiple of {multiple} (the VAE downsamples by "
                f"{multiple}), got {resolution}"
            )
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise ValueError(f"folder: {folder} has no images ({', '.join(IMAGE_SUFFIXES)})")
        missing = [p.name for p in images if not p.with_suffix(".txt").exists()]
        if missing:
            raise ValueError(f"folder: {missing[0]} has no caption ({Path(missing[0]).stem}.txt)")
        self.items = [
            (p, p.with_suffix(".txt").read_text(encoding="utf-8").strip()) for p in images
        ]
        self.resolution, self._open = resolution, Image.open

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Tensor, str]:
        path, caption = self.items[index]
        image = self._open(path).convert("RGB").resize((self.resolution, self.resolution))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32))  # (H, W, 3), 0..255
        return pixels.permute(2, 0, 1) / 127.5 - 1.0, caption  # (3, H, W), −1..1


def noise_prediction_loss(
    unet: nn.Module,
    latents: Tensor,
    text_embeddings: Tensor,
    scheduler,
    generator: torch.Generator,
    snr_gamma: float | None = None,
) -> Tensor:
    """The ε-prediction loss of one batch of clean latents z0 (module docstring).

    With snr_gamma, each example is weighted by min(SNR_t, γ)/SNR_t (Hang et al., 2023), as
    diffusers' script does; SNR_t = ᾱ_t / (1 − ᾱ_t).
    """
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype)
    T = scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, T, (latents.shape[0],), generator=generator)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, encoder_hidden_states=text_embeddings).sample
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    if snr_gamma is None:
        return F.mse_loss(prediction.float(), target.float())
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    weights = torch.clamp(snr, max=snr_gamma) / snr  # (batch,)
    per_example = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(
        dim=(1, 2, 3)
    )
    return (weights * per_example).mean()


def _trainable(unet: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in unet.named_parameters() if p.requires_grad]


def save_checkpoint(path: Path, unet: nn.Module, optimizer, config: TrainConfig, step: int) -> None:
    """Adapter factors and Adam moments as tensors; step, config and schedule as JSON. Atomic."""
    names = [n for n, _ in _trainable(unet)]
    tensors = {f"param.{n}": p.detach().clone() for n, p in _trainable(unet)}
    state = optimizer.state_dict()
    for index, moments in state["state"].items():
        for key, value in moments.items():
            tensors[f"optimizer.{names[index]}.{key}"] = value.detach().clone().reshape(-1)
    metadata = {
        "step": str(step),
        "config": config.key(),
        "param_groups": json.dumps(state["param_groups"]),
    }
    write_safetensors_atomically(tensors, Path(path), metadata)


def load_checkpoint(path: Path, unet: nn.Module, optimizer, config: TrainConfig) -> int:
    """Restore a checkpoint written by `save_checkpoint`; returns the step to continue from."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    if metadata.get("config") != config.key():
        raise ValueError(
            f"checkpoint {Path(path).name} was written by another configuration: "
            f"{metadata.get('config')} (this run: {config.key()})"
        )
    tensors = load_file(str(path))
    trainable = _trainable(unet)
    with torch.no_grad():
        for name, p in trainable:
            p.copy_(tensors[f"param.{name}"])
    state = {"state": {}, "param_groups": json.loads(metadata["param_groups"])}
    for index, (name, _) in enumerate(trainable):
        moments = {
            key.rsplit(".", 1)[1]: value
            for key, value in tensors.items()
            if key.startswith(f"optimizer.{name}.")
        }
        if moments:
            shape = {"step": (), "exp_avg": trainable[index][1].shape}
            shape["exp_avg_sq"] = shape["exp_avg"]
            state["state"][index] = {
                k: v.reshape(shape.get(k, v.shape)) for k, v in moments.items()
            }
    optimizer.load_state_dict(state)
    return int(metadata["step"])


def train(
    pipe,
    dataset: Sequence[tuple[Tensor, str]],
    config: TrainConfig,
    tokenize: Callable[[list[str]], Tensor],
    checkpoint_dir: Path | str | None = None,
    resume: bool = False,
    stop_after: int | None = None,
) -> list[float]:
    """Train an adapter on `pipe.unet`; returns the loss of every step run.

    With checkpoint_dir, a checkpoint is written every `config.checkpoint_every` steps (and at
    the end); resume=True continues from the latest one. stop_after ends early after that many
    steps of this call (to simulate an interruption in tests).
    """
    from tqdm.auto import tqdm

    if len(dataset) == 0:
        raise ValueError("dataset: it has no examples")
    unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
    if not list(adapter_layers(unet)):
        inject(
            unet,
            list(config.targets),
            config.method,
            config.rank,
            config.alpha,
            **config.adapter_options,
        )
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    optimizer = torch.optim.AdamW(
        [p for _, p in _trainable(unet)], lr=config.learning_rate, weight_decay=config.weight_decay
    )
    start = 0
    checkpoint = Path(checkpoint_dir) / "checkpoint.safetensors" if checkpoint_dir else None
    if resume:
        if checkpoint is None or not checkpoint.exists():
            raise ValueError(f"resume: no checkpoint in {checkpoint_dir}")
        start = load_checkpoint(checkpoint, unet, optimizer, config)
    losses = []
    end = config.steps if stop_after is None else min(config.steps, start + stop_after)
    for step in tqdm(range(start, end), initial=start, total=config.steps, disable=None):
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        indices = torch.randint(len(dataset), (config.batch_size,), generator=generator).tolist()
        pixels = torch.stack([dataset[i][0] for i in indices])
        captions = [dataset[i][1] for i in indices]
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample(generator) * vae.config.scaling_factor
            text = text_encoder(tokenize(captions))[0]
        loss = noise_prediction_loss(
            unet, latents, text, pipe.scheduler, generator, config.snr_gamma
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        done = step + 1
        if checkpoint is not None and (done % config.checkpoint_every == 0 or done == end):
            save_checkpoint(checkpoint, unet, optimizer, config, done)
    if not all(math.isfinite(v) for v in losses):
        raise FloatingPointError("training diverged: a loss is not finite")
    return losses


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's byte-pair merging of one word: repeatedly join the lowest-ranked adjacent pair."""
    parts = [*word[:-1], word[-1] + "</w>"]
    while len(parts) > 1:
        rank, i = min(
            (ranks.get((parts[i], parts[i + 1]), math.inf), i) for i in range(len(parts) - 1)
        )
        if rank == math.inf:
            break
        parts = [*parts[:i], parts[i] + parts[i + 1], *parts[i + 2 :]]
    return parts


def write_tiny_clip_vocabulary(words: Sequence[str], folder: Path | str) -> Path:
    """vocab.json and merges.txt for a CLIPTokenizer that knows exactly `words`, one token each.

    The tiny text-to-image model of chapter 07 uses SD1.5's classes, CLIPTokenizer included; its
    vocabulary only needs the words of its captions. Merges are added until every word is a single
    token (a later word can reuse, or be broken by, an earlier word's merges, so this iterates).
    """
    words = sorted({w.lower() for w in words})
    if not words or not all(w.isalpha() and w.isascii() for w in words):
        raise ValueError(
            f"words must be a non-empty list of ASCII letters-only words, got {words!r}"
        )
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    changed = True
    while changed:
        changed = False
        for word in words:
            parts = _bpe(word, ranks)
            if len(parts) > 1:
                ranks[(parts[0], parts[1])] = len(merges)
                merges.append((parts[0], parts[1]))
                changed = True
    vocab: dict[str, int] = {}
    for char in sorted({c for w in words for c in w}):
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{left} {right}" for left, right in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder
