"""Fine-tuning a Stable Diffusion pipeline with an adapter: the configuration, the loss, the loop.

Defined in chapters 07 and 08. One loop, `train`, does both kinds of fine-tuning a practitioner
meets. Without class images it is diffusers' `train_text_to_image_lora.py`:

    z0 = scaling_factor · VAE.encode(image)          latents of the training image
    ε ~ N(0, I), t ~ U{0, …, T−1}, z_t = √ᾱ_t·z0 + √(1−ᾱ_t)·ε   (scheduler.add_noise)
    loss = ‖ε − ε_θ(z_t, t, text(caption))‖²        (ε-prediction; optional SNR-γ weights)

With class images it is DreamBooth with prior preservation (Ruiz et al., 2023; diffusers'
`train_dreambooth_lora.py --with_prior_preservation`): every step draws as many class examples
as instance examples, and

    loss = mean over the instance examples + λ · mean over the class examples

(λ = prior_loss_weight; λ = 0 draws no class example at all, so it is the plain loss). With
caption_dropout p each caption is replaced by the empty prompt with probability p, so the
adapter also learns the unconditional branch that classifier-free guidance subtracts. With
cache_latents the VAE encodes every image and the text encoder every caption once, before the
first step (kohya's `--cache_latents`, diffusers' `--pre_compute_text_embeddings`): a step is
then one U-Net forward and backward, and z0 is drawn from each image's cached posterior
N(mean, std²); random crops and flips are then fixed at the centre, unflipped.

Only the adapter's factors are trained (`lokr_edu.inject` on the U-Net), with AdamW, an LR
schedule (`diffusers.optimization.get_scheduler`), gradient clipping and gradient accumulation,
under `accelerate.Accelerator`: the same loop runs on a CPU, on one GPU in fp16/bf16 mixed
precision, and on several GPUs with `accelerate launch --multi_gpu -m lokr_edu.train`.

Every random draw of a micro-batch (which images, which t, which ε) comes from a generator seeded
with (seed, step, micro-batch, process), so a run that is interrupted and resumed from a
checkpoint ends with exactly the adapter of a run that was not.

Every tensor of a step is made on the model's device, or drawn on the CPU from a CPU generator
(the same numbers on any device) and then moved there: `tests/test_diffusion.py` runs a step with
the U-Net on PyTorch's `meta` device, which refuses any CPU tensor.

The rest of chapter 07's code has a module per idea, and every public name of those is
importable from here too (`from lokr_edu.diffusion import generate` works):

    lokr_edu.sd_data         what training reads: load_pipeline, ImageCaptionFolder,
                             resize_and_crop, tokenize_captions
    lokr_edu.sd_checkpoint   save_checkpoint, load_checkpoint (safetensors, nothing pickled)
    lokr_edu.sd_sampling     generate, default_batch_size, sample_grid, eta_sweep, export_adapter
"""

from __future__ import annotations

import contextlib
import csv
import functools
import importlib.util
import json
import os
import secrets
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lokr_edu.adapters import ADAPTER_METHODS, adapter_layers, inject
from lokr_edu.sd_checkpoint import (
    CHECKPOINT_FILE,
    _trainable,  # the parameters' order, shared with checkpoints
    load_checkpoint,
    save_checkpoint,
)
from lokr_edu.sd_data import (
    IMAGE_SUFFIXES,  # noqa: F401 (still importable from here)
    ImageCaptionFolder,
    encode_prompts,
    load_pipeline,
    resize_and_crop,
    tokenize_captions,
)
from lokr_edu.sd_sampling import (
    DIFFUSERS_FILE,  # noqa: F401 (still importable from here)
    KOHYA_FILE,  # noqa: F401 (still importable from here)
    default_batch_size,
    eta_sweep,
    export_adapter,
    generate,
    sample_grid,
)

__all__ = [
    "TrainConfig",
    "ImageCaptionFolder",
    "resize_and_crop",
    "load_pipeline",
    "tokenize_captions",
    "encode_prompts",
    "noise_prediction_loss",
    "prior_preservation_loss",
    "CachedExamples",
    "EncodedExamples",
    "save_checkpoint",
    "load_checkpoint",
    "train",
    "export_adapter",
    "generate",
    "default_batch_size",
    "sample_grid",
    "eta_sweep",
]

METHODS = ADAPTER_METHODS  # the methods lokr_edu.adapters implements
MIXED_PRECISION = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# diffusers.optimization.SchedulerType, less piecewise_constant (it needs step rules)
LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)
LOG_EVERY = 10  # train's progress bar shows the mean loss of the last LOG_EVERY steps
REPORT_TO = ("none", "tensorboard")  # accelerate's trackers that train can log to
LOG_FILE = "log.csv"  # train writes one row per step into the run's folder
LOG_COLUMNS = ("step", "loss", "instance_loss", "prior_loss", "learning_rate")
STEP_FOLDERS = "checkpoints"  # checkpoints/step_NNNNNN/: the adapter exported at each checkpoint


@dataclass
class TrainConfig:
    """Everything that defines a run; a checkpoint records it and refuses another config.

    One step is one optimizer update. It sees gradient_accumulation_steps × batch_size examples
    (on each process, under `accelerate launch`), so `steps` is diffusers' max_train_steps and
    batch_size its train_batch_size. The learning rate follows
    diffusers.optimization.get_scheduler(lr_scheduler, warmup = lr_warmup_steps, total = steps);
    the gradient norm is clipped to max_grad_norm (None: no clipping). mixed_precision is
    "no" (fp32), "fp16" (a GPU, with loss scaling) or "bf16", as accelerate spells them: the
    U-Net's forward runs under torch.autocast in that dtype, the frozen weights are kept in it
    and the trained factors in fp32, as diffusers does.
    gradient_checkpointing recomputes the U-Net's activations in the backward pass (less memory,
    about a third more time). With sample_every > 0, a grid of images for sample_prompts is
    saved every sample_every steps, sample_resolution pixels square (None: the pipeline's
    default, 512 for SD1.5). prior_loss_weight (λ) and caption_dropout are DreamBooth's (module
    docstring; λ counts only when `train` is given class images); cache_latents encodes the
    images and captions once. With a checkpoint folder, each checkpoint also exports the adapter
    to checkpoints/step_NNNNNN/ in that folder, keeping the last checkpoints_total_limit of them
    (None: all), and report_to="tensorboard" logs the loss and learning rate through accelerate's
    tracker (the log.csv of every step is written either way).
    Bad values raise ValueError here, before anything runs. Defined in chapters 07 and 08.
    """

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
    gradient_accumulation_steps: int = 1
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    sample_every: int = 0
    sample_prompts: Sequence[str] = ()
    sample_inference_steps: int = 25
    sample_resolution: int | None = None
    prior_loss_weight: float = 1.0
    caption_dropout: float = 0.0
    cache_latents: bool = False
    checkpoints_total_limit: int | None = None
    report_to: str = "none"

    # What a resumed run may change: none of these changes what the adapter learns.
    RESUMABLE: ClassVar[tuple[str, ...]] = (
        "checkpoints_total_limit",
        "report_to",
        "steps",
        "checkpoint_every",
        "gradient_checkpointing",
        "sample_every",
        "sample_prompts",
        "sample_inference_steps",
        "sample_resolution",
    )

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        if isinstance(self.sample_prompts, str):
            self.sample_prompts = (self.sample_prompts,)
        self.targets, self.sample_prompts = tuple(self.targets), tuple(self.sample_prompts)
        problems = []
        if self.method not in METHODS:
            problems.append(f"method must be one of {METHODS}, got {self.method!r}")
        for name, least in [
            ("rank", 1),
            ("steps", 1),
            ("batch_size", 1),
            ("gradient_accumulation_steps", 1),
            ("checkpoint_every", 1),
            ("sample_inference_steps", 1),
            ("lr_warmup_steps", 0),
            ("sample_every", 0),
            ("seed", 0),
            ("checkpoints_total_limit", 1),
        ]:
            if name == "checkpoints_total_limit" and self.checkpoints_total_limit is None:
                continue
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                problems.append(f"{name} must be an integer ≥ {least}, got {value!r}")
        if self.sample_resolution is not None and (
            isinstance(self.sample_resolution, bool)
            or not isinstance(self.sample_resolution, int)
            or self.sample_resolution < 8
            or self.sample_resolution % 8
        ):
            problems.append(
                "sample_resolution must be a positive multiple of 8 (or None), "
                f"got {self.sample_resolution!r}"
            )
        for name in ("learning_rate", "max_grad_norm", "snr_gamma", "alpha"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                problems.append(f"{name} must be a positive number, got {value!r}")
        weight = self.prior_loss_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            problems.append(f"prior_loss_weight must be a number ≥ 0, got {weight!r}")
        dropout = self.caption_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            problems.append(f"caption_dropout must be a number in [0, 1), got {dropout!r}")
        elif not 0 <= dropout < 1:
            problems.append(f"caption_dropout must be in [0, 1), got {dropout!r}")
        if self.report_to not in REPORT_TO:
            problems.append(f"report_to must be one of {REPORT_TO}, got {self.report_to!r}")
        elif self.report_to != "none" and importlib.util.find_spec(self.report_to) is None:
            problems.append(
                f"report_to {self.report_to!r} needs the {self.report_to} package: "
                f"pip install {self.report_to}"
            )
        if self.lr_scheduler not in LR_SCHEDULERS:
            problems.append(
                f"lr_scheduler must be one of {LR_SCHEDULERS}, got {self.lr_scheduler!r}"
            )
        if self.mixed_precision not in MIXED_PRECISION:
            problems.append(
                f"mixed_precision must be one of {tuple(MIXED_PRECISION)}, "
                f"got {self.mixed_precision!r}"
            )
        if self.sample_every and not self.sample_prompts:
            problems.append("sample_every > 0 needs sample_prompts (the prompts to draw)")
        if not self.targets:
            problems.append("targets: give at least one module-name pattern")
        if problems:
            raise ValueError("TrainConfig: " + "; ".join(problems))

    def key(self) -> str:
        """The settings that must match for a checkpoint to be resumed (all but RESUMABLE)."""
        settings = asdict(self)
        for name in self.RESUMABLE:
            settings.pop(name)
        return json.dumps(settings, sort_keys=True)


def noise_prediction_loss(
    unet: nn.Module,
    latents: Tensor,
    text_embeddings: Tensor,
    scheduler,
    generator: torch.Generator,
    snr_gamma: float | None = None,
    reduction: str = "mean",
) -> Tensor:
    """The ε-prediction loss of one batch of clean latents z0 (module docstring).

    ε and t are drawn on the CPU from `generator` (the same draws on any device), then moved to
    the latents' device. For a v-prediction scheduler the target is v = √ᾱ_t·ε − √(1−ᾱ_t)·z0.
    With snr_gamma, each example is weighted by min(SNR_t, γ)/SNR_t (Hang et al., 2023; for
    v-prediction min(SNR_t, γ)/(SNR_t + 1)), as diffusers' script does; SNR_t = ᾱ_t / (1 − ᾱ_t).
    reduction="none" returns each example's (weighted) loss, shape (batch,), instead of the mean.
    """
    from diffusers.training_utils import compute_snr

    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    T = scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, T, (latents.shape[0],), generator=generator).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, encoder_hidden_states=text_embeddings).sample
    v_prediction = scheduler.config.prediction_type == "v_prediction"
    target = scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    per_example = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(
        dim=(1, 2, 3)
    )  # (batch,)
    if snr_gamma is not None:
        snr = compute_snr(scheduler, timesteps)  # (batch,)
        per_example = (
            per_example * torch.clamp(snr, max=snr_gamma) / (snr + 1 if v_prediction else snr)
        )
    return per_example.mean() if reduction == "mean" else per_example


def prior_preservation_loss(
    unet: nn.Module,
    scheduler,
    sets: Sequence[tuple[Tensor, Tensor]],
    weights: Sequence[float],
    generator: torch.Generator,
    *,
    caption_dropout: float = 0.0,
    empty_prompt: Tensor | None = None,
    snr_gamma: float | None = None,
) -> tuple[Tensor, Tensor]:
    """One micro-batch's loss, Σ_s weights[s] · (mean loss of set s); and each set's mean (S,).

    sets: (z0, text) per set, (B_s, 4, h, w) and (B_s, L, d): the instance examples, then the
    class examples with weight λ (DreamBooth's prior preservation, module docstring); one set
    with weight 1 is the plain loss. All sets go through the U-Net as one batch. With
    caption_dropout p, each row's text is replaced by empty_prompt (1, L, d) with probability p.
    Draws (the dropout mask, then ε and t) come from the CPU `generator` and are moved to the
    latents' device. Defined in chapter 07.
    """
    if len(sets) != len(weights) or not sets:
        raise ValueError(f"{len(sets)} sets of examples but {len(weights)} weights")
    latents = torch.cat([z0 for z0, _ in sets])  # (ΣB_s, 4, h, w)
    text = torch.cat([embedding for _, embedding in sets])  # (ΣB_s, L, d)
    if caption_dropout:
        if empty_prompt is None:
            raise ValueError("caption_dropout needs empty_prompt, the empty caption's embedding")
        dropped = torch.rand(len(text), generator=generator) < caption_dropout  # on the CPU
        text = torch.where(dropped.to(text.device)[:, None, None], empty_prompt.to(text), text)
    per_example = noise_prediction_loss(
        unet, latents, text, scheduler, generator, snr_gamma, reduction="none"
    )  # (ΣB_s,)
    per_set = torch.stack([part.mean() for part in per_example.split([len(z) for z, _ in sets])])
    loss = sum(weight * mean for weight, mean in zip(weights, per_set, strict=True))
    return loss, per_set


class EncodedExamples:
    """A dataset of (image, caption), encoded at each draw: random crops and flips stay random.

    `draw(batch_size, generator)` picks batch_size examples with replacement, prepares each with
    `dataset.draw(i, generator)` when it has one (ImageCaptionFolder: a random crop, a flip) or
    `dataset[i]`, and returns (z0, text): z0 sampled from the VAE's posterior with the generator,
    text the text encoder's last hidden states. Defined in chapter 07.
    """

    def __init__(self, dataset, pipe, tokenize, device: torch.device, dtype: torch.dtype):
        self.dataset, self.pipe, self.tokenize = dataset, pipe, tokenize
        self.device, self.dtype = device, dtype

    def __len__(self) -> int:
        return len(self.dataset)

    @torch.no_grad()
    def draw(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        vae, text_encoder = self.pipe.vae, self.pipe.text_encoder
        indices = torch.randint(len(self.dataset), (batch_size,), generator=generator).tolist()
        draw_example = getattr(self.dataset, "draw", None)  # ImageCaptionFolder: crop / flip
        examples = [
            draw_example(i, generator) if draw_example else self.dataset[i] for i in indices
        ]
        pixels = torch.stack([image for image, _ in examples]).to(self.device, self.dtype)
        latents = vae.encode(pixels).latent_dist.sample(generator) * vae.config.scaling_factor
        ids = self.tokenize([caption for _, caption in examples]).to(self.device)
        return latents, text_encoder(ids)[0]


@dataclass
class CachedExamples:
    """A dataset encoded once: each image's VAE posterior and each caption's embedding.

    latent_mean, latent_std: (N, 4, h, w), already × the VAE's scaling_factor; text: (N, L, d);
    all on the model's device. `draw(batch_size, generator)` picks examples with replacement and
    draws z0 = mean + std · ε, ε from the CPU generator, moved to the device (the same numbers on
    any device). Defined in chapter 07.
    """

    latent_mean: Tensor
    latent_std: Tensor
    text: Tensor

    def __len__(self) -> int:
        return len(self.latent_mean)

    @classmethod
    @torch.no_grad()
    def encode(cls, dataset, pipe, tokenize, device, dtype, chunk: int = 8) -> CachedExamples:
        """Encode every example of dataset (`dataset[i]`: centre crop, no flip) once, `chunk`
        images at a time (a GPU never holds more than a chunk's activations)."""
        vae, text_encoder, scale = pipe.vae, pipe.text_encoder, pipe.vae.config.scaling_factor
        means, stds, texts = [], [], []
        for start in range(0, len(dataset), chunk):
            examples = [dataset[i] for i in range(start, min(start + chunk, len(dataset)))]
            pixels = torch.stack([image for image, _ in examples]).to(device, dtype)
            posterior = vae.encode(pixels).latent_dist
            means.append(posterior.mean * scale)
            stds.append(posterior.std * scale)
            texts.append(text_encoder(tokenize([c for _, c in examples]).to(device))[0])
        return cls(torch.cat(means), torch.cat(stds), torch.cat(texts))

    def draw(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        index = torch.randint(len(self), (batch_size,), generator=generator)
        noise = torch.randn((batch_size, *self.latent_mean.shape[1:]), generator=generator)
        index = index.to(self.latent_mean.device)
        mean, std = self.latent_mean[index], self.latent_std[index]  # (B, 4, h, w)
        return mean + std * noise.to(mean.device, mean.dtype), self.text[index]


def _accelerator(config: TrainConfig, project_dir: Path | None = None):
    """An accelerate.Accelerator for the config's gradient accumulation (and device, processes),
    logging to config.report_to's tracker in project_dir.

    Its own mixed precision stays "no": accelerate keeps one precision per process, fixed by the
    first Accelerator, and has no public way to change it, yet a notebook may train in "no", then
    in "bf16". Mixed precision is done with PyTorch's public API instead (`_autocast`, and a
    torch.amp.GradScaler for fp16), which is what accelerate's mixed_precision wraps.
    """
    from accelerate import Accelerator

    tracker = None if config.report_to == "none" else config.report_to
    if tracker is not None and project_dir is None:
        raise ValueError(f"report_to {tracker!r}: give checkpoint_dir, where its logs go")
    accelerator = Accelerator(
        mixed_precision="no",
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=tracker,
        project_dir=project_dir,
    )
    if config.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ValueError(
            "mixed_precision 'fp16' needs a GPU (PyTorch's fp16 autocast and loss scaling run on "
            "CUDA); on the CPU use 'bf16' or 'no'"
        )
    return accelerator


def _autocast(device: torch.device, mixed_precision: str):
    """A fresh context that runs the U-Net's forward in the mixed-precision dtype ("no": fp32)."""
    if mixed_precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=MIXED_PRECISION[mixed_precision])


def _optimizer_update(accelerator, optimizer, lr_scheduler, scaler, params, max_grad_norm) -> None:
    """One optimizer update from the accumulated gradients, on the last micro-batch of a step.

    fp16: the gradients are unscaled before clipping; a step whose gradients hold an inf or NaN
    is skipped by the scaler (which lowers its scale), and then the LR schedule waits too, as
    under accelerate's own fp16. Without fp16 the scaler is disabled and every call is a no-op
    (get_scale() is then 1.0, without a device sync).
    """
    scaler.unscale_(optimizer)
    if max_grad_norm is not None:
        accelerator.clip_grad_norm_(params, max_grad_norm)
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    if scaler.get_scale() >= scale:  # a lowered scale: the scaler skipped this step
        lr_scheduler.step()
    optimizer.zero_grad()


def _check_captions(dataset: Sequence[tuple[Tensor, str]], tokenize) -> None:
    """Tokenize every caption once, so a bad one stops the run before its first step."""
    if hasattr(dataset, "captions"):
        captions = list(dataset.captions)
    else:
        captions = [dataset[i][1] for i in range(len(dataset))]
    unique = sorted(set(captions))
    for start in range(0, len(unique), 256):
        tokenize(unique[start : start + 256])


def _save_samples(pipe, config: TrainConfig, tokenize, folder: Path, step: int):
    """`sample_grid` saved as folder/step_NNNNNN.png (atomically)."""
    grid = sample_grid(pipe, config, tokenize, _autocast(pipe.unet.device, config.mixed_precision))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:06d}.png"
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    grid.save(temporary, format="PNG")
    os.replace(temporary, path)


def _diverged(step: int, loss: float, checkpoint: Path | None, saved: int | None) -> str:
    """What to say when the loss of `step` is not finite (NaN or ±inf)."""
    if checkpoint is None:
        kept = "no checkpoint was being written (give checkpoint_dir to keep one)"
    elif saved is None:
        kept = f"no checkpoint was written before it, so {checkpoint} is not from this run"
    else:
        kept = f"the last good checkpoint, {checkpoint} (step {saved}), is kept as it was"
    return (
        f"training diverged: the loss of step {step} is {loss}, so it stopped there; {kept}. "
        "Lower the learning rate (or use mixed_precision 'bf16' instead of 'fp16')."
    )


def _prepare_log(path: Path, start: int) -> None:
    """A fresh log.csv with its header; on resume, the rows up to `start` kept, the rest dropped
    (a run killed after its last checkpoint logged steps that the resumed run does again)."""
    rows = []
    if start and path.exists():
        with path.open(newline="", encoding="utf-8") as file:
            rows = [row for row in csv.DictReader(file) if int(row["step"]) <= start]
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _export_step(pipe, folder: Path, step: int, keep: int | None) -> None:
    """The adapter as trained so far, exported to folder/step_NNNNNN/; only the last `keep`
    step folders are kept (None: all), as diffusers' --checkpoints_total_limit."""
    export_adapter(pipe, folder / f"step_{step:06d}")
    steps = sorted(folder.glob("step_*"))
    for old in steps[: len(steps) - keep] if keep is not None else []:
        shutil.rmtree(old)


def train(
    pipe,
    dataset: Sequence[tuple[Tensor, str]],
    config: TrainConfig,
    tokenize: Callable[[list[str]], Tensor] | None = None,
    checkpoint_dir: Path | str | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    *,
    class_dataset: Sequence[tuple[Tensor, str]] | None = None,
    sample_dir: Path | str | None = None,
    progress: bool = True,
) -> list[float]:
    """Train an adapter on `pipe.unet`; returns the loss of every step run (its mean over the
    accumulated micro-batches and the processes). The course's one training loop: chapter 07's
    DreamBooth on the tiny model, chapter 08's on SD1.5, `python -m lokr_edu.train`.

    One step, under accelerate (diffusers' train_dreambooth_lora.py):
        for each of the gradient_accumulation_steps micro-batches:
            batch_size examples of `dataset` (and as many of `class_dataset`, if given and λ > 0)
            loss = prior_preservation_loss(...);  backward(loss / gradient_accumulation_steps)
        clip ‖∇‖ to max_grad_norm;  AdamW step;  LR schedule step;  zero the gradients
    dataset and class_dataset hold (image (3, H, W) in [−1, 1], caption) pairs: an
    ImageCaptionFolder (random crops and flips, through its `draw`) or any sequence of pairs.
    Without class_dataset the loss is the plain ε-prediction loss. With config.cache_latents
    both are encoded once before the first step (`CachedExamples`), else at every draw
    (`EncodedExamples`).
    If pipe.unet has no adapter yet, one is injected (its initial factors drawn from
    config.seed). tokenize maps captions to token ids (default: `tokenize_captions` with
    pipe.tokenizer); every caption is tokenized once before the first step, so a caption that
    is too long stops the run there.
    With checkpoint_dir (the run's folder): a checkpoint (CHECKPOINT_FILE) every
    config.checkpoint_every steps and at the end, and with it the adapter exported to
    checkpoints/step_NNNNNN/ (the last config.checkpoints_total_limit kept); log.csv gets a row
    per step (step, loss, instance_loss, prior_loss, learning_rate); resume=True continues from
    the checkpoint exactly, the log too. stop_after ends early after that many steps of this
    call (to simulate an interruption in tests). A loss that is not finite (NaN, ±inf: diverged)
    stops training at once with a FloatingPointError naming the step; the checkpoint on disk is
    then the last good one. That test is the one host-device sync of a step (a GPU then waits
    for the step to end before the next is queued; the stop must come before the step's
    checkpoint is written): the losses stay tensors, handed to Python once at the end (and
    every LOG_EVERY steps, as the mean the progress bar shows; and every step for log.csv,
    once the sync has happened).
    Sample grids go to sample_dir (default checkpoint_dir/samples). progress=False hides the
    tqdm bar. After training the whole pipeline is on the accelerator's device, in the
    mixed-precision dtype ("no": fp32), ready to sample. Defined in chapter 07.
    """
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from tqdm.auto import tqdm

    if len(dataset) == 0:
        raise ValueError("dataset: it has no examples")
    if class_dataset is not None and len(class_dataset) == 0:
        raise ValueError("class_dataset: it has no examples (give None to train without a prior)")
    if tokenize is None:
        if getattr(pipe, "tokenizer", None) is None:
            raise ValueError("tokenize: the pipeline has no tokenizer; pass tokenize=")
        tokenize = functools.partial(tokenize_captions, pipe.tokenizer)
    with_prior = class_dataset is not None and config.prior_loss_weight > 0
    for examples in (dataset, class_dataset) if with_prior else (dataset,):
        _check_captions(examples, tokenize)
    folder = Path(checkpoint_dir) if checkpoint_dir else None
    checkpoint = folder / CHECKPOINT_FILE if folder else None
    if resume and (checkpoint is None or not checkpoint.exists()):
        raise ValueError(f"resume: no checkpoint in {checkpoint_dir}")
    if config.sample_every:
        tokenize(list(config.sample_prompts))
        if sample_dir is None and checkpoint_dir is None:
            raise ValueError("sample_every: give checkpoint_dir or sample_dir for the sample grids")
        sample_dir = Path(sample_dir) if sample_dir else folder / "samples"

    accelerator = _accelerator(config, folder)
    device, dtype = accelerator.device, MIXED_PRECISION[config.mixed_precision]
    unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
    if not list(adapter_layers(unet)):
        with torch.random.fork_rng():  # the initial factors depend on config.seed alone
            torch.manual_seed(config.seed)
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
    # frozen weights in the mixed-precision dtype, trained factors in fp32 (diffusers' recipe)
    for model in (unet, vae, text_encoder):
        model.to(device)
        if any(p.dtype != dtype for p in model.parameters() if not p.requires_grad):
            model.to(dtype=dtype)
    cast_training_params(unet, dtype=torch.float32)
    if config.cache_latents:
        sources = [
            CachedExamples.encode(examples, pipe, tokenize, device, dtype)
            for examples in ((dataset, class_dataset) if with_prior else (dataset,))
        ]
    else:
        sources = [
            EncodedExamples(examples, pipe, tokenize, device, dtype)
            for examples in ((dataset, class_dataset) if with_prior else (dataset,))
        ]
    weights = [1.0, float(config.prior_loss_weight)][: len(sources)]
    empty_prompt = None
    if config.caption_dropout:
        with torch.no_grad():
            empty_prompt = text_encoder(tokenize([""]).to(device))[0]  # (1, L, d)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for _, p in _trainable(unet)]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    # accelerate steps a prepared scheduler once per process per update, hence the × (diffusers)
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=config.steps * accelerator.num_processes,
    )
    model, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    scaler = torch.amp.GradScaler(device.type, enabled=config.mixed_precision == "fp16")
    loss_scale = scaler if scaler.is_enabled() else None  # what a checkpoint records
    start = 0
    if resume:
        start = load_checkpoint(checkpoint, unet, optimizer, config, lr_scheduler, loss_scale)
    log = folder / LOG_FILE if folder and accelerator.is_main_process else None
    if log is not None:
        folder.mkdir(parents=True, exist_ok=True)
        _prepare_log(log, start)
    if config.report_to != "none":
        accelerator.init_trackers("lokr_edu")

    accumulation = config.gradient_accumulation_steps

    def micro_batch_loss(step: int, micro: int) -> tuple[Tensor, Tensor]:
        draw = (step * accumulation + micro) * accelerator.num_processes + accelerator.process_index
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + draw)
        sets = [source.draw(config.batch_size, generator) for source in sources]
        with _autocast(device, config.mixed_precision):
            return prior_preservation_loss(
                model,
                pipe.scheduler,
                sets,
                weights,
                generator,
                caption_dropout=config.caption_dropout,
                empty_prompt=empty_prompt,
                snr_gamma=config.snr_gamma,
            )

    losses: list[Tensor] = []  # each step's loss, on the device: handed to Python at the end
    saved = start if resume else None
    end = config.steps if stop_after is None else min(config.steps, start + stop_after)
    bar = tqdm(
        range(start, end),
        initial=start,
        total=config.steps,
        desc="DreamBooth" if with_prior else "fine-tuning",
        disable=None if progress and accelerator.is_local_main_process else True,
    )
    for step in bar:
        learning_rate = optimizer.param_groups[0]["lr"]  # this step's, before the update
        micro_losses, micro_sets = [], []
        for micro in range(accumulation):
            with accelerator.accumulate(model):  # syncs and steps on the last micro-batch only
                loss, per_set = micro_batch_loss(step, micro)
                accelerator.backward(scaler.scale(loss))  # of loss / accumulation
                if accelerator.sync_gradients:
                    _optimizer_update(
                        accelerator, optimizer, lr_scheduler, scaler, params, config.max_grad_norm
                    )
            micro_losses.append(loss.detach())
            micro_sets.append(per_set.detach())
        loss = accelerator.reduce(torch.stack(micro_losses).mean(), reduction="mean")
        if not torch.isfinite(loss):  # the one host-device sync of every step (docstring)
            accelerator.wait_for_everyone()
            raise FloatingPointError(_diverged(step + 1, float(loss), checkpoint, saved))
        losses.append(loss)
        done = step + 1
        if folder is not None or config.report_to != "none":  # the loss is on the host already
            # a collective: every process reduces, the main one writes
            per_set = accelerator.reduce(torch.stack(micro_sets).mean(dim=0), reduction="mean")
            values = [float(loss), *per_set.tolist(), None][:3]
            row = dict(zip(LOG_COLUMNS, [done, *values, learning_rate], strict=True))
            if log is not None:
                with log.open("a", newline="", encoding="utf-8") as file:
                    csv.DictWriter(file, LOG_COLUMNS).writerow(row)
            if config.report_to != "none":
                accelerator.log(
                    {k: v for k, v in row.items() if k != "step" and v is not None}, done
                )
        if done % LOG_EVERY == 0 or done == end:  # the bar: the mean of the last LOG_EVERY
            recent = float(torch.stack(losses[-LOG_EVERY:]).mean())
            bar.set_postfix(loss=f"{recent:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
        if checkpoint is not None and (done % config.checkpoint_every == 0 or done == end):
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:  # the export first: a checkpoint's step has one
                _export_step(pipe, folder / STEP_FOLDERS, done, config.checkpoints_total_limit)
                save_checkpoint(checkpoint, unet, optimizer, config, done, lr_scheduler, loss_scale)
            saved = done
        sample_now = config.sample_every and (
            done % config.sample_every == 0 or done == config.steps
        )
        if sample_now and accelerator.is_main_process:
            _save_samples(pipe, config, tokenize, sample_dir, done)
    accelerator.wait_for_everyone()
    if config.report_to != "none":
        accelerator.end_training()
    if config.gradient_checkpointing:
        unet.disable_gradient_checkpointing()
    cast_training_params(unet, dtype=dtype)  # one dtype for the whole pipeline, for sampling
    return torch.stack(losses).tolist() if losses else []  # to Python once
