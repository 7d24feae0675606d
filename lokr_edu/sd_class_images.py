"""DreamBooth's class images: what the frozen model itself draws for the class prompt.

Defined in chapter 08. DreamBooth (Ruiz et al., 2023) teaches a model a subject from a handful
of images captioned with a rare word ("a photo of sks dog"). Trained on those alone, the model
forgets what the class looks like: every "dog" drifts towards the subject (language drift) and
loses its variety. Prior preservation adds a second term on class images x′, captioned with
the class prompt ("a photo of a dog"):

    loss = E‖ε − ε_θ(z_t, t, c_instance)‖² + λ · E‖ε′ − ε_θ(z′_t′, t′, c_class)‖²
           x′ ~ p_frozen(x | c_class): drawn by the model before any training

The class images come from the model itself, not from real photographs, because what must be
kept is the model's own prior for the class: Ruiz et al. call the loss "autogenous" for that
reason. A step on the model's own samples pulls the adapted model back to what it drew before
training; real photographs would instead teach it someone else's idea of the class.

`check_class_folder` runs before any model is loaded (minutes for SD1.5): the folder can be
created and written, each image in it is of the training resolution, each caption is the class
prompt. `ensure_class_images` then draws only the missing ones with the frozen pipeline
(`lokr_edu.sd_sampling.generate`, in batches), and writes each as a PNG with a .txt of the same
name holding the class prompt, so the folder is an `ImageCaptionFolder`; a second run finds
them and draws nothing, as diffusers' train_dreambooth_lora.py (--class_data_dir,
--num_class_images, --sample_batch_size) does.
"""

from __future__ import annotations

import itertools
import os
import secrets
import tempfile
from pathlib import Path

from lokr_edu.sd_data import IMAGE_SUFFIXES
from lokr_edu.sd_sampling import default_batch_size, generate
from lokr_edu.validate import require_int

__all__ = ["CLASS_IMAGE_SAMPLING", "check_class_folder", "class_images_in", "ensure_class_images"]

# diffusers' script draws class images with `pipeline(prompt)`: StableDiffusionPipeline.__call__'s
# defaults, 50 steps with guidance scale 7.5
CLASS_IMAGE_SAMPLING = {"steps": 50, "guidance_scale": 7.5}
FILE_NAME = "class_{:06d}.png"  # the name of the n-th drawn image (n counts from 0)


def class_images_in(folder: Path | str) -> list[Path]:
    """The images in folder, in name order (the suffixes ImageCaptionFolder reads)."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def check_class_folder(folder: Path | str, prompt: str, resolution: int) -> list[Path]:
    """Check a class-image folder before any model loads; return the images already in it.

    The folder is created if missing, and must take a file. Each image in it must be readable
    and exactly resolution × resolution pixels (the class images are drawn at the training
    resolution); each caption (.txt of the same name) must be the class prompt. An image without
    a .txt is taken as the class prompt's (diffusers' class folders have no captions). Every
    problem is a ValueError naming the file. Defined in chapter 08.
    """
    from PIL import Image

    folder = Path(folder)
    require_int("resolution", resolution)
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt: give the class prompt, got {prompt!r}")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"class folder {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ValueError(
            f"class folder {folder} cannot be created or written ({error.strerror or error}); "
            "give a folder this user can write"
        ) from None
    problems = []
    images = class_images_in(folder)
    for path in images:
        try:
            with Image.open(path) as image:
                image.load()  # decodes it all: a truncated file fails here, not in training
                size = image.size
        except (OSError, SyntaxError, ValueError) as error:  # PIL's errors for bad files
            problems.append(f"{path}: not a readable image ({type(error).__name__}: {error})")
            continue
        if size != (resolution, resolution):
            problems.append(
                f"{path} is {size[0]}×{size[1]} pixels, but the training resolution is "
                f"{resolution}×{resolution}"
            )
        text = path.with_suffix(".txt")
        if not text.exists():
            continue
        try:
            caption = text.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            problems.append(f"{text}: caption not readable as UTF-8 text ({error})")
            continue
        if caption != prompt.strip():
            problems.append(f"{text} holds {caption!r}, not the class prompt {prompt.strip()!r}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(
            f"class folder {folder}: " + "; ".join(problems[:5]) + more + " (remove those files, "
            "or give another folder: the missing class images are then drawn again)"
        )
    return images


def _write_atomically(path: Path, write) -> None:
    """write(temporary) then rename it to path: a crash leaves no half-written file."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def ensure_class_images(
    pipe,
    folder: Path | str,
    prompt: str,
    count: int,
    resolution: int,
    *,
    seed: int = 0,
    batch_size: int | None = None,
    steps: int = CLASS_IMAGE_SAMPLING["steps"],
    guidance_scale: float = CLASS_IMAGE_SAMPLING["guidance_scale"],
    progress: bool = True,
) -> list[Path]:
    """The first `count` class images of folder (name order), drawing the missing ones.

    `check_class_folder` first; then, if the folder holds n < count images, the frozen `pipe`
    draws count − n images of `prompt` (`generate`, resolution × resolution, `steps` steps,
    classifier-free guidance `guidance_scale`), batch_size prompts at a time (default:
    `default_batch_size`, sized for a 16 GB GPU). Each is written as class_NNNNNN.png with
    class_NNNNNN.txt holding the prompt, the caption first and each file atomically, after each
    batch: an interrupted run keeps its finished images and the next one draws only the rest.
    The batch that starts at image k is drawn with seed · 1000003 + k, so the same call draws
    the same images, and a resumed draw never repeats one. Defined in chapter 08.
    """
    from diffusers.image_processor import VaeImageProcessor
    from tqdm.auto import tqdm

    require_int("count", count)
    require_int("seed", seed, least=0)
    folder = Path(folder)
    existing = check_class_folder(folder, prompt, resolution)
    missing = count - len(existing)
    if missing > 0:
        batch_size = require_int("batch_size", batch_size or default_batch_size(pipe, resolution))
        taken = {p.name for p in existing}
        free = (name for name in map(FILE_NAME.format, itertools.count()) if name not in taken)
        paths = [folder / name for name in itertools.islice(free, missing)]
        slicing = pipe.vae.use_slicing  # generate turns it on; put it back as it was
        bar = tqdm(total=missing, desc="class images", unit="image", disable=not progress)
        try:
            for start in range(0, missing, batch_size):
                batch = paths[start : start + batch_size]
                images = generate(
                    pipe,
                    [prompt] * len(batch),
                    steps=steps,
                    guidance_scale=guidance_scale,
                    seed=seed * 1_000_003 + len(existing) + start,
                    batch_size=len(batch),
                    resolution=resolution,
                )  # (n, 3, H, W) in [0, 1]
                pictures = VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(images))
                for path, picture in zip(batch, pictures, strict=True):
                    caption = path.with_suffix(".txt")
                    _write_atomically(
                        caption, lambda t: t.write_text(prompt.strip() + "\n", encoding="utf-8")
                    )
                    _write_atomically(path, lambda t, p=picture: p.save(t, format="PNG"))
                bar.update(len(batch))
        finally:
            bar.close()
            if not slicing:
                pipe.vae.disable_slicing()
    return class_images_in(folder)[:count]
