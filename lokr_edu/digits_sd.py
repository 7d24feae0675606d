"""A tiny Stable Diffusion that draws handwritten digits: SD1.5's classes at a CPU's scale.

Defined in chapter 07 (notebooks/07_stable_diffusion_lokr.ipynb). The pipeline is a real
`StableDiffusionPipeline` made of the same classes as SD1.5:

| part | SD1.5 | here |
| --- | --- | --- |
| tokenizer | CLIPTokenizer, 49,408 tokens, 77 per prompt | CLIPTokenizer, 16 words, 8 per prompt |
| text encoder | CLIPTextModel, 12 layers × 768 | CLIPTextModel, 2 layers × 64 |
| VAE | AutoencoderKL, 512×512×3 → 64×64×4 | AutoencoderKL, 8×8×3 → 8×8×4 |
| U-Net | UNet2DConditionModel, 860 M parameters | UNet2DConditionModel, 0.8 M parameters |
| scheduler | PNDM / DDIM, scaled-linear β | DDIM, scaled-linear β |

It is pretrained by `pretrain` on scikit-learn's 1,797 digits (8×8, shipped with scikit-learn)
with captions in four forms ("a handwritten digit three", "the number three", ...), saved with
`save_pretrained` in `lokr_edu/data/digits_sd/`, and loaded with
`StableDiffusionPipeline.from_pretrained`, the same call as for SD1.5:

    python -m lokr_edu.digits_sd pretrain     # rewrites lokr_edu/data/digits_sd (~12 min, 2 cores)

Its vocabulary already holds one word it never saw in pretraining, "rotated": chapter 07 teaches
it a new concept with an adapter, as one teaches SD1.5 a style behind a rare trigger word.
Quality is measured, not assumed: `DigitReader`, a classifier fitted on the real digits (upright
and rotated by 90°), reads what the model drew.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "TINY_MODEL",
    "DIGIT_WORDS",
    "CONCEPT_WORD",
    "CAPTION_TEMPLATES",
    "FINE_TUNING_TEMPLATE",
    "HELD_OUT_TEMPLATE",
    "caption",
    "digit_images",
    "build_unet",
    "build_pipeline",
    "pretrain",
    "DigitReader",
    "write_tiny_clip_vocabulary",
    "TRAIN_DIGITS",
    "HELD_OUT_DIGITS",
    "SAMPLING",
    "instance_images",
    "regularisation_images",
    "class_prompts",
    "class_images",
    "measure_concept",
    "CONCEPT_RECIPE",
    "VARIANTS",
    "train_concept",
    "main",
]

TINY_MODEL = Path(__file__).parent / "data" / "digits_sd"
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CONCEPT_WORD = "rotated"  # in the vocabulary from the start, never in a pretraining caption
# Pretraining draws each image's caption from these templates ({concept} is empty there). Chapter
# 07 fine-tunes with the first alone, so the others are prompts that fine-tuning never saw, and
# HELD_OUT_TEMPLATE is the one its preservation is measured on.
CAPTION_TEMPLATES = (
    "a {concept}handwritten digit {digit}",
    "the {concept}digit {digit}",
    "the {concept}number {digit}",
    "a {concept}handwritten {digit}",
)
FINE_TUNING_TEMPLATE, HELD_OUT_TEMPLATE = CAPTION_TEMPLATES[0], CAPTION_TEMPLATES[2]
CAPTION_WORDS = ("a", "the", "handwritten", "digit", "number", *DIGIT_WORDS, CONCEPT_WORD)
MAX_TOKENS = 8  # <start> a rotated handwritten digit three <end> <pad>
# Chapter 07's DreamBooth split: the concept's images are of TRAIN_DIGITS only, and its captions
# and the class images' use FINE_TUNING_TEMPLATE only. Preservation is measured on what fine-tuning
# never saw: HELD_OUT_TEMPLATE prompts ("the number three") of the HELD_OUT_DIGITS.
TRAIN_DIGITS = (0, 2, 4, 6, 8)
HELD_OUT_DIGITS = (1, 3, 5, 7, 9)
SAMPLING = {"steps": 10, "guidance_scale": 3.0}  # how chapter 07 samples the tiny model
# Chapter 07's recipe. Each method has its own learning rate, chosen on a validation draw by
# benchmarks/dreambooth_digits.py; the step budget is the same for both (the script also measures
# both at half of it), and the rest is shared.
CONCEPT_RECIPE = {
    "lora": {"method": "lora", "rank": 8, "learning_rate": 1e-2, "steps": 300},
    "lokr": {
        "method": "lokr",
        "rank": 8,
        "learning_rate": 2e-2,
        "steps": 300,
        "adapter_options": {"factor": 2},
    },
}
CONCEPT_TRAINING = {
    "targets": (  # every Linear and Conv2d type of the U-Net's blocks (chapter 06)
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "proj_in",
        "proj_out",
        "ff.net.0.proj",
        "ff.net.2",
        "conv1",
        "conv2",
    ),
    "batch_size": 32,  # instance images per step, and as many class images
    "prior_loss_weight": 1.0,  # DreamBooth's λ
    "cache_latents": True,  # the VAE and text encoder run once, before the first step
}
INSTANCES_PER_DIGIT = 5  # DreamBooth's handful: 25 real images of the concept in all
CLASS_IMAGES_PER_DIGIT = 20  # the prior: 200 images the frozen model drew
CAPTION_DROPOUT = 0.1
# the ablations of chapter 07: which images keep the prior
VARIANTS = (
    "prior",
    "no prior",
    "regularisation",
    "caption dropout",
    "prior on the trained digits",
)


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
    `lokr_edu.sd15.stand_in_tokenizer` writes its vocabulary with it too. Defined in chapter 07.
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


def caption(digit: int, rotated: bool = False, template: str = FINE_TUNING_TEMPLATE) -> str:
    """'a handwritten digit three', or with the concept word: 'a rotated handwritten digit three';
    another of CAPTION_TEMPLATES gives e.g. 'the number three'.

    The concept word comes before the digit's word: CLIP's text encoder is causal (chapter 06), so
    only words that come *before* "three" change the vector the U-Net reads for "three".
    """
    if not 0 <= digit <= 9:
        raise ValueError(f"digit must be 0..9, got {digit}")
    if template not in CAPTION_TEMPLATES:
        raise ValueError(f"template must be one of {CAPTION_TEMPLATES}, got {template!r}")
    concept = f"{CONCEPT_WORD} " if rotated else ""
    return template.format(concept=concept, digit=DIGIT_WORDS[digit])


def digit_images(rotated: bool = False) -> tuple[Tensor, Tensor]:
    """All 1,797 digits as (N, 3, 8, 8) images in [−1, 1] (grey on three channels), and labels.

    rotated=True turns each a quarter turn counter-clockwise (chapter 05's "rot90" task).
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 8.0 - 1.0  # 0..16 -> −1..1
    if rotated:
        images = torch.rot90(images, 1, dims=(-2, -1))
    return images[:, None].repeat(1, 3, 1, 1), torch.tensor(data.target)


def build_unet():
    """The tiny model's untrained U-Net (0.8 M parameters; the chapter 07 exercises use it too)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(  # SD1.5's block types, two levels: 8×8 and 4×4
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def build_pipeline():
    """A fresh, untrained tiny pipeline (the classes and sizes of the table above)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as folder:
        write_tiny_clip_vocabulary(CAPTION_WORDS, folder)
        tokenizer = CLIPTokenizer(
            f"{folder}/vocab.json", f"{folder}/merges.txt", model_max_length=MAX_TOKENS
        )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKL(  # one block: no downsampling, 8×8×3 pixels <-> 8×8×4 latents
        block_out_channels=(32,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=8,
    )
    unet = build_unet()
    scheduler = DDIMScheduler(  # SD1.5's β schedule
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def pretrain(
    out: Path | str = TINY_MODEL,
    steps: int = 3000,
    vae_steps: int = 1000,
    batch_size: int = 128,
    seed: int = 0,
) -> list[float]:
    """Pretrain the tiny pipeline on the digits and save it; returns the U-Net's losses.

    1. The VAE: reconstruction MSE + 1e-6·KL, then its latents are scaled to unit variance
       (`scaling_factor`, 0.18215 for SD1.5).
    2. The text encoder and U-Net together on the ε-prediction loss of chapter 07 (the same one
       `lokr_edu.diffusion.noise_prediction_loss` computes), with 10 % of captions replaced by the
       empty prompt so that classifier-free guidance works at sampling.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    pipe = build_pipeline()
    images, labels = digit_images()
    generator = torch.Generator().manual_seed(seed)

    vae = pipe.vae
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    for _ in tqdm(range(vae_steps), desc="VAE", disable=None):
        batch = images[torch.randint(len(images), (64,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        loss = F.mse_loss(reconstruction, batch) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vae.requires_grad_(False).eval()
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist  # computed once: the VAE is frozen from here
    vae.register_to_config(scaling_factor=round(1.0 / posterior.mean.std().item(), 5))
    scale = vae.config.scaling_factor

    tokenize = pipe.tokenizer
    tokens = torch.stack(
        [
            tokenize(
                [caption(int(d), template=template) for d in labels],
                padding="max_length",
                return_tensors="pt",
            ).input_ids
            for template in CAPTION_TEMPLATES
        ]
    )  # (templates, N, 8)
    empty = tokenize([""], padding="max_length", return_tensors="pt").input_ids  # (1, 8)
    unet, text_encoder, scheduler = pipe.unet, pipe.text_encoder, pipe.scheduler
    parameters = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 1e-3, total_steps=steps)
    losses = []
    progress = tqdm(range(steps), desc="U-Net", disable=None)
    for _ in progress:
        index = torch.randint(len(images), (batch_size,), generator=generator)
        mean, std = posterior.mean[index], posterior.std[index]
        latents = (mean + std * torch.randn(mean.shape, generator=generator)) * scale
        template = torch.randint(len(CAPTION_TEMPLATES), (batch_size,), generator=generator)
        ids = tokens[template, index]  # (batch_size, 8): one caption drawn per image
        ids[torch.rand(batch_size, generator=generator) < 0.1] = empty  # unconditional 10 %
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(
            0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator
        )
        prediction = unet(scheduler.add_noise(latents, noise, t), t, text_encoder(ids)[0]).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        progress.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    pipe.save_pretrained(out, safe_serialization=True)
    return losses


@dataclass
class DigitReader:
    """A classifier fitted on the real digits, upright and rotated: it reads a generated image as
    (digit, rotated?). A support-vector machine with an RBF kernel on the 64 pixels, 20 classes.

    test_accuracy is its accuracy on the quarter of the real digits held out from fitting (both
    orientations), rotated_accuracy the same on the held-out rotated digits alone: real
    examples of chapter 07's concept. A rate measured with the reader means no more than these.
    """

    model: object
    test_accuracy: float
    rotated_accuracy: float

    @classmethod
    def fit(cls, seed: int = 0) -> DigitReader:
        from sklearn.model_selection import train_test_split
        from sklearn.svm import SVC

        upright, labels = digit_images()
        rotated, _ = digit_images(rotated=True)
        x = torch.cat([upright, rotated])[:, 0].reshape(-1, 64).numpy() / 2 + 0.5  # [0, 1]
        y = torch.cat([labels, labels + 10]).numpy()
        x_train, x_test, y_train, y_test = train_test_split(
            x, y, test_size=0.25, random_state=seed, stratify=y
        )
        model = SVC(C=10.0, gamma="scale").fit(x_train, y_train)
        right = model.predict(x_test) == y_test
        return cls(model, float(right.mean()), float(right[y_test >= 10].mean()))

    def read(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images (N, 3, 8, 8) or (N, 8, 8) in [0, 1] -> (digit (N,), rotated (N,) bool)."""
        if images.shape[-2:] != (8, 8):
            raise ValueError(f"the reader takes 8×8 images, got {tuple(images.shape)}")
        if images.dim() == 4:
            images = images.mean(dim=1)  # grey: the three channels of a digit are equal
        classes = torch.from_numpy(self.model.predict(images.reshape(len(images), 64).numpy()))
        return classes % 10, classes >= 10

    def rate(self, images: Tensor, digits: Tensor, rotated: bool) -> float:
        """Fraction of images read as the prompted digit with the prompted orientation."""
        read_digit, read_rotated = self.read(images)
        return ((read_digit == digits) & (read_rotated == rotated)).float().mean().item()


def _pick(per_digit: int, digits: Sequence[int], seed: int, skip: int = 0) -> Tensor:
    """Indices of per_digit real digits of each class in digits (a seeded draw; skip the first
    `skip` of each class's draw, so that two calls with different skip never share a digit)."""
    _, labels = digit_images()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    chosen = [order[labels[order] == d][skip : skip + per_digit] for d in digits]
    if any(len(c) < per_digit for c in chosen):
        raise ValueError(f"per_digit: at most {min(map(len, chosen)) + skip} digits of a class")
    return torch.cat(chosen)


def instance_images(
    per_digit: int, digits: Sequence[int] = TRAIN_DIGITS, seed: int = 0
) -> tuple[Tensor, list[str]]:
    """DreamBooth's instance images: per_digit real digits of each class, rotated, with the
    trigger word in their captions. (N, 3, 8, 8) in [−1, 1], and the captions."""
    _, labels = digit_images()
    index = _pick(per_digit, digits, seed)
    rotated, _ = digit_images(rotated=True)
    return rotated[index], [caption(int(labels[i]), rotated=True) for i in index]


def class_prompts(
    per_digit: int = CLASS_IMAGES_PER_DIGIT, digits: Sequence[int] = range(10)
) -> list[str]:
    """The prompts of the prior's images: each digit's plain caption, per_digit times."""
    return [caption(d) for d in digits for _ in range(per_digit)]


def class_images(
    pipe,
    per_digit: int = CLASS_IMAGES_PER_DIGIT,
    digits: Sequence[int] = range(10),
    seed: int = 100,
) -> tuple[Tensor, list[str]]:
    """DreamBooth's class images: what the frozen pipe draws for `class_prompts`, before any
    training. (N, 3, 8, 8) in [−1, 1] (what the VAE reads), and their prompts."""
    from lokr_edu.sd_sampling import generate

    prompts = class_prompts(per_digit, digits)
    return generate(pipe, prompts, seed=seed, **SAMPLING) * 2 - 1, prompts


def regularisation_images(
    per_digit: int = CLASS_IMAGES_PER_DIGIT, digits: Sequence[int] = range(10), seed: int = 0
) -> tuple[Tensor, list[str]]:
    """kohya's regularisation images: real upright digits with the class images' prompts, none
    of them an instance image's digit. (N, 3, 8, 8) in [−1, 1], and their prompts."""
    upright, labels = digit_images()
    index = _pick(per_digit, digits, seed, skip=50)
    return upright[index], [caption(int(labels[i])) for i in index]


def measure_concept(pipe, reader: DigitReader, samples: int = 200, seed: int = 2) -> dict:
    """Chapter 07's three rates, each from `samples` generated images (as many of each digit):

    concept        "a rotated handwritten digit d", d in TRAIN_DIGITS: read as d, rotated;
    preservation   "the number d" (HELD_OUT_TEMPLATE), d in HELD_OUT_DIGITS: a prompt that no
                   training caption used, of a digit whose concept images training never saw:
                   read as d, upright;
    concept digits   the same for d in TRAIN_DIGITS, the digits the adapter learned to rotate
                   (the hardest prompts to keep: one word away from the concept's).
    """
    from lokr_edu.sd_sampling import generate

    rates = {}
    for name, digits, rotated, template, offset in [
        ("concept", TRAIN_DIGITS, True, FINE_TUNING_TEMPLATE, 0),
        ("preservation", HELD_OUT_DIGITS, False, HELD_OUT_TEMPLATE, 1),
        ("concept digits", TRAIN_DIGITS, False, FINE_TUNING_TEMPLATE, 2),
    ]:
        prompted = torch.tensor(digits).repeat(samples // len(digits))
        prompts = [caption(int(d), rotated, template) for d in prompted]
        images = generate(pipe, prompts, seed=seed * 3 + offset, **SAMPLING)
        rates[name] = reader.rate(images, prompted, rotated=rotated)
    return rates


def train_concept(
    method: str, variant: str = "prior", *, seed: int = 0, **overrides
) -> tuple[object, list[float], int]:
    """Chapter 07's DreamBooth run on a fresh copy of the tiny model.

    variant: "prior" (DreamBooth: class images the frozen model drew for every digit's plain
    prompt, weighted by λ), "no prior", "regularisation" (kohya: real digits instead, with the
    same prompts), "caption dropout" ("prior", with CAPTION_DROPOUT of the captions replaced by
    the empty prompt) or "prior on the trained digits" (class images of TRAIN_DIGITS only, so
    that no training caption names a HELD_OUT_DIGIT at all).
    overrides replace entries of CONCEPT_RECIPE[method] / CONCEPT_TRAINING (steps=None keeps
    the recipe's). Returns the trained pipeline, the losses and the number of trained
    parameters. Defined in chapter 07.
    """
    from lokr_edu.diffusion import TrainConfig, train
    from lokr_edu.sd_data import load_pipeline

    if method not in CONCEPT_RECIPE:
        raise ValueError(f"method must be one of {tuple(CONCEPT_RECIPE)}, got {method!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    settings = CONCEPT_TRAINING | CONCEPT_RECIPE[method]
    settings |= {k: v for k, v in overrides.items() if v is not None}
    if variant == "caption dropout":
        settings["caption_dropout"] = CAPTION_DROPOUT
    config = TrainConfig(seed=seed, **settings)
    pipe = load_pipeline(TINY_MODEL)

    def pairs(images: Tensor, captions: list[str]) -> list[tuple[Tensor, str]]:
        return list(zip(images, captions, strict=True))

    instance = pairs(*instance_images(INSTANCES_PER_DIGIT, seed=seed))
    prior = None
    if variant in ("prior", "caption dropout"):
        prior = pairs(*class_images(pipe, seed=100 + seed))
    elif variant == "prior on the trained digits":
        prior = pairs(*class_images(pipe, digits=TRAIN_DIGITS, seed=100 + seed))
    elif variant == "regularisation":
        prior = pairs(*regularisation_images(seed=seed))
    losses = train(pipe, instance, config, class_dataset=prior, progress=False)
    pipe.unet.requires_grad_(False)
    parameters = sum(p.numel() for n, p in pipe.unet.named_parameters() if ".adapters." in n)
    return pipe, losses, parameters


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lokr_edu.digits_sd",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=["pretrain"])
    parser.add_argument("--out", type=Path, default=TINY_MODEL)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--vae-steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    losses = pretrain(args.out, args.steps, args.vae_steps, args.batch_size)
    print(f"saved {args.out}; mean loss of the last 100 steps {sum(losses[-100:]) / 100:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
