"""DreamBooth's class images (lokr_edu.sd_class_images), drawn by chapter 07's digits model."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from PIL import Image

import lokr_edu.sd_class_images as class_images
from lokr_edu.digits_sd import TINY_MODEL
from lokr_edu.sd_class_images import (
    CLASS_IMAGE_SAMPLING,
    check_class_folder,
    class_images_in,
    ensure_class_images,
)
from lokr_edu.sd_data import load_pipeline
from lokr_edu.sd_sampling import generate

PROMPT = "a handwritten digit two"
QUICK = {"steps": 5, "guidance_scale": 3.0}  # what these tests draw with, to be quick


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(TINY_MODEL)


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def folder_state(folder) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_the_missing_images_are_drawn_with_their_captions_then_reused(pipe, tmp_path, monkeypatch):
    folder = tmp_path / "class" / "twos"  # made, parents too
    pipe.vae.disable_slicing()
    paths = ensure_class_images(
        pipe, folder, PROMPT, 5, 8, seed=3, batch_size=2, progress=False, **QUICK
    )
    assert pipe.vae.use_slicing is False  # generate turns it on; it is left as it was found
    assert [p.name for p in paths] == [f"class_{i:06d}.png" for i in range(5)]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [p.name for p in paths] + [p.with_suffix(".txt").name for p in paths]
    )
    assert all(p.with_suffix(".txt").read_text() == PROMPT + "\n" for p in paths)
    # each PNG holds what generate draws for its batch (seed·1000003 + first index), to 8 bits
    for start, size in [(0, 2), (2, 2), (4, 1)]:
        images = generate(
            pipe,
            [PROMPT] * size,
            seed=3 * 1_000_003 + start,
            batch_size=size,
            resolution=8,
            **QUICK,
        )  # (n, 3, 8, 8) in [0, 1]
        expected = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        for i in range(size):
            assert np.array_equal(pixels(paths[start + i]), expected[i]), start + i
    assert len({pixels(p).tobytes() for p in paths}) == 5  # five different images

    def never(*args, **kwargs):
        raise AssertionError("a class image was drawn again")

    before = folder_state(folder)
    monkeypatch.setattr(class_images, "generate", never)
    assert ensure_class_images(pipe, folder, PROMPT, 5, 8, progress=False) == paths
    assert ensure_class_images(pipe, folder, PROMPT, 3, 8, progress=False) == paths[:3]
    assert folder_state(folder) == before


def test_an_interrupted_draw_keeps_its_finished_images_and_draws_only_the_rest(
    pipe, tmp_path, monkeypatch
):
    real, seeds = class_images.generate, []

    def crash_on_the_second_batch(pipe, prompts, **options):
        seeds.append(options["seed"])
        if len(seeds) == 2:
            raise KeyboardInterrupt
        return real(pipe, prompts, **options)

    monkeypatch.setattr(class_images, "generate", crash_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        ensure_class_images(pipe, tmp_path, PROMPT, 5, 8, batch_size=2, progress=False, **QUICK)
    # the first batch is on disk, whole; nothing half-written is left
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "class_000000.png",
        "class_000000.txt",
        "class_000001.png",
        "class_000001.txt",
    ]
    first = [pixels(p) for p in class_images_in(tmp_path)]
    monkeypatch.setattr(class_images, "generate", real)
    paths = ensure_class_images(pipe, tmp_path, PROMPT, 5, 8, batch_size=2, progress=False, **QUICK)
    assert seeds == [0, 2]  # the first batch, then the one that crashed
    assert [p.name for p in paths] == [f"class_{i:06d}.png" for i in range(5)]
    assert all(np.array_equal(pixels(p), f) for p, f in zip(paths, first, strict=False))
    assert len({pixels(p).tobytes() for p in paths}) == 5  # the rest drawn anew, none repeated


def test_images_already_there_count_and_new_names_skip_theirs(pipe, tmp_path):
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "class_000000.png")  # no caption
    Image.new("RGB", (8, 8), (0, 255, 0)).save(tmp_path / "a_green.jpg")
    (tmp_path / "a_green.txt").write_text(f"  {PROMPT}\n")
    paths = ensure_class_images(pipe, tmp_path, PROMPT, 4, 8, progress=False, **QUICK)
    assert [p.name for p in paths] == [
        "a_green.jpg",
        "class_000000.png",
        "class_000001.png",
        "class_000002.png",
    ]
    assert not (tmp_path / "class_000000.txt").exists()  # an existing image is left as it is
    assert (tmp_path / "class_000002.txt").read_text() == PROMPT + "\n"


def test_a_bad_class_folder_is_named_before_any_model_is_needed(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(ValueError, match=f"class folder {a_file} is a file, not a folder"):
        check_class_folder(a_file, PROMPT, 8)
    with pytest.raises(ValueError, match="cannot be created or written"):
        check_class_folder(a_file / "below", PROMPT, 8)
    folder = tmp_path / "class"
    assert check_class_folder(folder, PROMPT, 8) == [] and folder.is_dir()
    Image.new("RGB", (8, 8)).save(folder / "fine.png")
    Image.new("RGB", (8, 16)).save(folder / "tall.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    Image.new("RGB", (8, 8)).save(folder / "three.png")
    (folder / "three.txt").write_text("a handwritten digit three")
    with pytest.raises(ValueError) as error:
        check_class_folder(folder, PROMPT, 8)
    message = str(error.value)
    assert f"{folder / 'tall.png'} is 8×16 pixels, but the training resolution is 8×8" in message
    assert f"{folder / 'broken.png'}: not a readable image" in message
    assert f"{folder / 'three.txt'} holds 'a handwritten digit three', not the class prompt" in (
        message
    )
    assert "fine.png" not in message
    with pytest.raises(ValueError, match="prompt: give the class prompt"):
        check_class_folder(tmp_path / "other", " ", 8)


def test_class_images_are_drawn_as_diffusers_draws_them():
    """diffusers' script calls pipeline(prompt): StableDiffusionPipeline.__call__'s defaults."""
    from diffusers import StableDiffusionPipeline

    defaults = inspect.signature(StableDiffusionPipeline.__call__).parameters
    assert CLASS_IMAGE_SAMPLING == {
        "steps": defaults["num_inference_steps"].default,
        "guidance_scale": defaults["guidance_scale"].default,
    }
    parameters = inspect.signature(ensure_class_images).parameters
    assert parameters["steps"].default == 50 and parameters["guidance_scale"].default == 7.5


def test_bad_arguments_are_errors(pipe, tmp_path):
    with pytest.raises(ValueError, match="count must be a positive integer, got 0"):
        ensure_class_images(pipe, tmp_path, PROMPT, 0, 8)
    with pytest.raises(ValueError, match="resolution must be a positive integer"):
        check_class_folder(tmp_path, PROMPT, 0)
    assert list(tmp_path.iterdir()) == []
