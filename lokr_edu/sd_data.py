"""What fine-tuning Stable Diffusion reads: the pipeline, the training images and their captions.

Defined in chapter 07. `load_pipeline` opens a StableDiffusionPipeline from a Hugging Face Hub id
or a local folder (safetensors weights only). `ImageCaptionFolder` is a folder of images, each with
a caption in a .txt file of the same name, every file checked before any model is loaded; each
image is prepared as diffusers' `train_text_to_image_lora.py` prepares it (`resize_and_crop`):

    Resize(resolution)                      the shorter side becomes `resolution` (bilinear)
    CenterCrop / RandomCrop(resolution)     a square window: nothing is squashed
    RandomHorizontalFlip (optional)         with probability ½
    x = pixels / 127.5 − 1                  in [−1, 1], what the VAE encodes

`tokenize_captions` turns captions into the text encoder's token ids, padded to the tokenizer's
model_max_length (77 for SD1.5); a longer caption is an error that names it, never silently cut.
The training loop that reads them is `lokr_edu.diffusion.train`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lokr_edu.sd15 import MODEL_ID
from lokr_edu.validate import require_int

__all__ = [
    "ImageCaptionFolder",
    "encode_prompts",
    "load_pipeline",
    "resize_and_crop",
    "tokenize_captions",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _looks_like_a_path(model: str) -> bool:
    """A hub id is "owner/name"; anything else with a path's shape is meant as a folder."""
    return (
        model.startswith(("/", "./", "../", "~", "."))
        or "\\" in model
        or model.count("/") > 1
        or model.endswith("/")
    )


def load_pipeline(
    model: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
):
    """A StableDiffusionPipeline from a Hugging Face Hub id or a local folder.

    `model` is an id (MODEL_ID, "stable-diffusion-v1-5/stable-diffusion-v1-5", downloaded once
    into the Hugging Face cache) or a folder written by `pipe.save_pretrained(folder)` (or
    `hf download ... --local-dir folder`). This is `StableDiffusionPipeline.from_pretrained(model,
    safety_checker=None, use_safetensors=True)`: safetensors weights only, never a pickle, and no
    safety checker (fine-tuning does not need it). dtype (torch.float16 for inference on a GPU:
    the weights are converted as they load) and device (applied after loading). Errors
    (ValueError, before any training step): a local folder that does not exist, a folder without
    model_index.json (not a diffusers pipeline), a hub id that cannot be fetched (offline, no
    network, or not a model id) and is not in the cache.
    Defined in chapter 07.
    """
    from diffusers import StableDiffusionPipeline

    text = str(model)
    path = Path(text).expanduser()
    local = isinstance(model, Path) or path.exists() or _looks_like_a_path(text)
    if local:
        if not path.exists():
            raise ValueError(f"model: the folder {path} does not exist")
        if not path.is_dir():
            raise ValueError(f"model: {path} is a file; give the pipeline's folder")
        if not (path / "model_index.json").is_file():
            raise ValueError(
                f"model: {path} has no model_index.json, so it is not a diffusers pipeline folder "
                "(write one with pipe.save_pretrained(folder), or download one with "
                f"`hf download {MODEL_ID} --local-dir {path}`)"
            )
    options: dict[str, object] = {
        "safety_checker": None,
        "requires_safety_checker": False,
        "use_safetensors": True,
    }
    if dtype is not None:  # diffusers 0.42 renamed torch_dtype to dtype (and warns on the old one)
        import diffusers
        from packaging.version import Version

        renamed = Version(diffusers.__version__) >= Version("0.42")
        options["dtype" if renamed else "torch_dtype"] = dtype
    try:
        pipe = StableDiffusionPipeline.from_pretrained(str(path) if local else text, **options)
    except (OSError, ValueError) as error:  # huggingface_hub's errors are OSError / ValueError
        reason = (str(error).splitlines() or [type(error).__name__])[0].rstrip(".")
        if local:
            raise ValueError(f"model: could not load the pipeline in {path}: {reason}") from error
        raise ValueError(
            f"model: {text!r} is not a local folder and could not be loaded from the Hugging "
            f"Face Hub (offline, unreachable, or not a model id): {reason}. Download the weights "
            f"on a machine with network (`hf download {text} --local-dir FOLDER`) and pass the "
            "folder instead, or unset HF_HUB_OFFLINE if you are online."
        ) from error
    if device is not None:
        pipe.to(device)
    return pipe


def _short(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def tokenize_captions(tokenizer, captions: Sequence[str]) -> Tensor:
    """Token ids (len(captions), tokenizer.model_max_length), padded, for the text encoder.

    CLIP reads at most model_max_length tokens (77 for SD1.5: 75 plus the start and end tokens).
    diffusers' script truncates longer captions silently, so the end of a caption would be
    trained on without ever being seen; here such a caption is an error that names it.
    Defined in chapter 07.
    """
    captions = list(captions)
    limit = tokenizer.model_max_length
    for caption, ids in zip(captions, tokenizer(captions, verbose=False).input_ids, strict=True):
        if len(ids) > limit:
            raise ValueError(
                f"caption {_short(caption)!r} is {len(ids)} tokens long (with the start and end "
                f"tokens); the tokenizer reads at most {limit}: shorten it"
            )
    return tokenizer(
        captions, padding="max_length", max_length=limit, truncation=True, return_tensors="pt"
    ).input_ids


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str]) -> Tensor:
    """(len(prompts), L, d): the text encoder's last hidden states, what the U-Net reads.

    The pipeline's own tokenizer (`tokenize_captions`) and text encoder, on its device. The
    empty prompt "" gives the unconditional embedding that classifier-free guidance and caption
    dropout use. Defined in chapter 07.
    """
    ids = tokenize_captions(pipe.tokenizer, list(prompts)).to(pipe.text_encoder.device)
    return pipe.text_encoder(ids)[0]


def resize_and_crop(image, resolution: int, left: float = 0.5, top: float = 0.5):
    """An image resized so that its shorter side is `resolution`, then cropped to a square.

    torchvision's Resize(resolution) then CenterCrop / RandomCrop(resolution), in PIL: the scale
    is resolution / min(w, h) (bilinear, the aspect ratio kept: nothing is squashed), then a
    resolution × resolution window is cut at `left`, `top` ∈ [0, 1] of the room there is
    (0.5, 0.5: the centre; 0: the left / top edge). Defined in chapter 07.
    """
    from PIL import Image

    width, height = image.size
    scale = resolution / min(width, height)
    # torchvision: the shorter side becomes exactly `resolution`, the longer int(side · scale)
    size = (
        (resolution, int(height * scale)) if width <= height else (int(width * scale), resolution)
    )
    image = image.resize(size, Image.Resampling.BILINEAR)
    x = int(round((size[0] - resolution) * left))
    y = int(round((size[1] - resolution) * top))
    return image.crop((x, y, x + resolution, y + resolution))


class ImageCaptionFolder(torch.utils.data.Dataset):
    """Images in a folder, each with a caption in a .txt file of the same name.

    Each image is prepared as diffusers' train_text_to_image_lora.py does (torchvision's Resize,
    CenterCrop or RandomCrop, RandomHorizontalFlip, Normalize(0.5, 0.5)): its shorter side
    resized to `resolution` (a multiple of `multiple`, the VAE's downsampling), a square crop
    (`resize_and_crop`: nothing is squashed), optionally flipped left-right, scaled to [−1, 1].
    `dataset[i]` crops the centre and never flips. `dataset.draw(i, generator)`, what `train`
    uses, crops at a random place (unless center_crop, diffusers' --center_crop) and flips with
    probability ½ (with random_flip, diffusers' --random_flip), drawing from `generator`, so a
    resumed run draws the same crops as an uninterrupted one.
    caption: one caption for every image (diffusers' --instance_prompt); the .txt files are then
    neither needed nor read. limit: only the first `limit` images, in name order (diffusers'
    --num_class_images reads that many of a class folder).
    Every file is checked at construction, before any model is loaded: an image PIL cannot
    decode, a caption file that is missing, empty or not UTF-8 text is a ValueError naming
    each such file. Defined in chapter 07.
    """

    def __init__(
        self,
        folder: Path | str,
        resolution: int,
        multiple: int = 8,
        *,
        center_crop: bool = False,
        random_flip: bool = False,
        caption: str | None = None,
        limit: int | None = None,
    ) -> None:
        from PIL import Image

        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"folder: {folder} is not a directory")
        if resolution < multiple or resolution % multiple:
            raise ValueError(
                f"resolution must be a positive multiple of {multiple} (the VAE downsamples by "
                f"{multiple}), got {resolution}"
            )
        if caption is not None and (not isinstance(caption, str) or not caption.strip()):
            raise ValueError(f"caption: give a non-empty caption (or None), got {caption!r}")
        if limit is not None:
            require_int("limit", limit)
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise ValueError(f"folder: {folder} has no images ({', '.join(IMAGE_SUFFIXES)})")
        problems, self.items = [], []
        for path in images[:limit]:
            text = path.with_suffix(".txt")
            try:
                with Image.open(path) as image:
                    image.load()  # decodes it all: a truncated file fails here, not at step 900
            except (OSError, SyntaxError, ValueError) as error:  # PIL's errors for bad files
                problems.append(f"{path}: not a readable image ({type(error).__name__}: {error})")
            if caption is not None:  # one caption for every image: no .txt files read
                self.items.append((path, caption.strip()))
                continue
            if not text.exists():
                problems.append(f"{path.name} has no caption ({text.name})")
                continue
            try:
                own = text.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as error:
                problems.append(f"{text}: caption not readable as UTF-8 text ({error})")
                continue
            if not own:
                problems.append(f"{text}: empty caption")
            self.items.append((path, own))
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise ValueError(f"folder {folder}: " + "; ".join(problems[:5]) + more)
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip

    @property
    def captions(self) -> list[str]:
        """Every caption, in order, without opening an image."""
        return [caption for _, caption in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def _pixels(self, index: int, left: float, top: float, flip: bool) -> tuple[Tensor, str]:
        from PIL import Image

        path, caption = self.items[index]
        with Image.open(path) as image:
            image = resize_and_crop(image.convert("RGB"), self.resolution, left, top)
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32))  # (H, W, 3), 0..255
        return pixels.permute(2, 0, 1) / 127.5 - 1.0, caption  # (3, H, W), −1..1

    def __getitem__(self, index: int) -> tuple[Tensor, str]:
        """The image centre-cropped, not flipped, and its caption."""
        return self._pixels(index, 0.5, 0.5, flip=False)

    def draw(self, index: int, generator: torch.Generator) -> tuple[Tensor, str]:
        """The image as training sees it: a random crop (or the centre), maybe flipped."""
        left, top, flip = torch.rand(3, generator=generator).tolist()  # always 3 draws
        if self.center_crop:
            left = top = 0.5
        return self._pixels(index, left, top, flip=self.random_flip and flip < 0.5)
