"""Chapter 07's command line, `python -m lokr_edu.train`, on a tiny pipeline saved to disk."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_sd import tiny_pipeline

from lokr_edu.diffusion import load_pipeline, tokenize_captions
from lokr_edu.digits_sd import write_tiny_clip_vocabulary
from lokr_edu.io import load_adapter, read_safetensors
from lokr_edu.train import main

REPO = Path(__file__).resolve().parent.parent
WORDS = "a digit red green blue square".split()


def tiny_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    write_tiny_clip_vocabulary(WORDS, folder)
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16
    )


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """tests/tiny_sd.py's pipeline with a real CLIPTokenizer, written by save_pretrained."""
    from diffusers import StableDiffusionPipeline

    root = tmp_path_factory.mktemp("tiny_model")
    pipe = tiny_pipeline()
    components = {**pipe.components, "tokenizer": tiny_tokenizer(root / "vocabulary")}
    StableDiffusionPipeline(**components).save_pretrained(root / "pipeline")
    return root / "pipeline"


def caption_folder(folder: Path, captions: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    for i, caption in enumerate(captions):
        Image.new("RGB", (20, 20), colours[i % 4]).save(folder / f"image{i}.png")
        (folder / f"image{i}.txt").write_text(caption + "\n")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    captions = ["a red square", "a green square", "a blue square", "a digit"]
    return caption_folder(tmp_path_factory.mktemp("data"), captions)


def adapter_tensors(pipe) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in pipe.unet.named_parameters() if ".adapters." in n}


def run(model: Path, data: Path, output: Path, *flags: str) -> int:
    return main(
        [
            *("--model", str(model), "--data", str(data), "--output", str(output)),
            *("--resolution", "16", "--batch-size", "2", "--learning-rate", "1e-3"),
            *flags,
        ]
    )


def test_two_lora_steps_write_a_checkpoint_and_files_that_load_back(model, data, tmp_path):
    assert run(model, data, tmp_path, "--method", "lora", "--rank", "2", "--steps", "2") == 0
    tensors, metadata = read_safetensors(tmp_path / "checkpoint.safetensors")
    assert metadata["step"] == "2"
    trained = {k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")}
    for file in ("adapter.safetensors", "pytorch_lora_weights.safetensors"):
        pipe = load_pipeline(model)
        load_adapter(pipe, tmp_path / file)
        loaded = adapter_tensors(pipe)
        assert loaded.keys() == trained.keys(), file
        assert all(torch.equal(loaded[k], trained[k]) for k in trained), file


def test_a_config_file_with_flags_over_it_and_an_exact_resume(model, data, tmp_path):
    settings = {"method": "lokr", "rank": 2, "steps": 3, "gradient_accumulation_steps": 2}
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**settings, "lr_scheduler": "cosine", "lr_warmup_steps": 1}))
    straight, parts = tmp_path / "straight", tmp_path / "parts"
    assert run(model, data, straight, "--config", str(config)) == 0
    assert run(model, data, parts, "--config", str(config), "--steps", "1", "--no-export") == 0
    assert not (parts / "adapter.safetensors").exists()
    assert run(model, data, parts, "--config", str(config), "--resume") == 0
    ours, _ = read_safetensors(parts / "checkpoint.safetensors")
    reference, metadata = read_safetensors(straight / "checkpoint.safetensors")
    assert metadata["step"] == "3" and ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k]) for k in reference)
    assert (straight / "adapter.safetensors").exists()
    assert not (straight / "pytorch_lora_weights.safetensors").exists()  # diffusers: LoRA only


def bad_runs(model: Path, data: Path, tmp: Path) -> list[tuple[list[str], str]]:
    unknown = tmp / "unknown.json"
    unknown.write_text(json.dumps({"rank": 2, "learning_rat": 1e-3}))
    no_index = tmp / "no_index"
    no_index.mkdir()
    empty = tmp / "empty"
    empty.mkdir()
    uncaptioned = caption_folder(tmp / "uncaptioned", ["a digit"])
    (uncaptioned / "image0.txt").unlink()
    long_caption = caption_folder(tmp / "long", ["a red square " * 6])
    model, data = str(model), str(data)
    return [
        (["--rank", "0"], "rank must be an integer ≥ 1"),
        (["--method", "dora"], "invalid choice: 'dora'"),
        (["--mixed-precision", "fp16"], "'fp16' needs a GPU"),
        (["--config", str(unknown)], r"unknown settings \['learning_rat'\]"),
        (["--model", str(tmp / "nowhere")], "does not exist"),
        (["--model", str(no_index)], "has no model_index.json"),
        (["--data", str(empty)], "has no images"),
        (["--data", str(uncaptioned)], r"image0.png has no caption \(image0.txt\)"),
        (["--resolution", "0"], "resolution must be a positive multiple"),
        (["--data", str(long_caption)], "is 20 tokens long .* at most 16: shorten it"),
        (["--resume"], "resume: no checkpoint"),
    ]


def test_every_bad_input_is_an_error_before_any_step(model, data, tmp_path, capsys):
    for flags, message in bad_runs(model, data, tmp_path):
        output = tmp_path / "output"
        with pytest.raises(SystemExit) as stop:
            run(model, data, output, "--steps", "1", *flags)
        assert stop.value.code == 2, flags
        error = capsys.readouterr().err
        assert re.search(message, error), (flags, error)
        assert not (output / "checkpoint.safetensors").exists(), flags


def test_a_hub_id_without_network_is_a_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never touch the network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ValueError, match="could not be loaded from the Hugging Face Hub") as e:
        load_pipeline("lokr-edu/no-such-model")
    assert "hf download lokr-edu/no-such-model" in str(e.value)
    assert "pass the folder instead" in str(e.value)


def test_tokenize_captions_pads_and_refuses_what_it_would_truncate(tmp_path):
    tokenizer = tiny_tokenizer(tmp_path)
    ids = tokenize_captions(tokenizer, ["a red square", "a digit"])
    assert ids.shape == (2, 16) and ids.dtype == torch.long
    assert tokenizer.decode(ids[0, 1:4]) == "a red square"
    too_long = "a digit " * 8  # 16 words + start + end = 18 tokens
    with pytest.raises(ValueError, match=r"caption 'a digit a digit .* is 18 tokens long"):
        tokenize_captions(tokenizer, ["a digit", too_long])


def test_the_console_script_is_declared():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["lokr-edu-train"] == "lokr_edu.train:main"


def test_a_broken_image_is_named_before_the_model_is_loaded(data, tmp_path, monkeypatch, capsys):
    import lokr_edu.train

    broken = caption_folder(tmp_path / "broken", ["a red square", "a digit"])
    (broken / "image1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a header, no image
    (broken / "image0.txt").write_text("\n")

    def load_pipeline(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(lokr_edu.train, "load_pipeline", load_pipeline)
    with pytest.raises(SystemExit) as stop:
        run(Path("no/such/model/needed"), broken, tmp_path / "output", "--steps", "1")
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert f"{broken / 'image1.png'}: not a readable image (UnidentifiedImageError" in error
    assert f"{broken / 'image0.txt'}: empty caption" in error
    assert "Traceback" not in error


def test_help_shows_only_the_course_s_own_lines_and_the_default_model():
    import os
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "lokr_edu.train", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
        env={**os.environ, "COLUMNS": "200"},  # argparse wraps at the terminal's width
    )
    assert done.stderr == ""
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in done.stdout
    assert "--center-crop" in done.stdout and "--random-flip" in done.stdout
    assert "runwayml" not in done.stdout


def test_crop_and_flip_flags_reach_the_dataset(model, data, tmp_path):
    flags = ("--method", "lora", "--rank", "2", "--steps", "1", "--no-export")
    assert run(model, data, tmp_path / "a", *flags, "--center-crop", "--random-flip") == 0
    from lokr_edu.train import build_parser, settings_from

    args = build_parser().parse_args(
        ["--data", "d", "--output", "o", "--random-flip", "--resolution", "64"]
    )
    config, settings = settings_from(args)
    assert settings["model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert settings["random_flip"] is True and settings["center_crop"] is False
    assert config.sample_resolution == 64  # samples are drawn at the training resolution


def test_a_diverging_run_exits_with_status_1_naming_the_step(model, data, tmp_path, capsys):
    flags = ("--method", "lora", "--rank", "2", "--steps", "4", "--checkpoint-every", "1")
    with pytest.raises(SystemExit) as stop:
        run(model, data, tmp_path, *flags, "--learning-rate", "1e30", "--max-grad-norm", "1e30")
    assert stop.value.code == 1
    error = capsys.readouterr().err
    _, metadata = read_safetensors(tmp_path / "checkpoint.safetensors")
    assert re.search(rf"the loss of step {int(metadata['step']) + 1} is (nan|inf)", error), error
    assert "last good checkpoint" in error and "Traceback" not in error
    assert not (tmp_path / "adapter.safetensors").exists()  # nothing diverged is exported


def test_load_pipeline_converts_to_a_dtype_through_diffusers_public_argument(model):
    """diffusers 0.42 renamed from_pretrained's torch_dtype to dtype and deprecates the old name:
    load_pipeline passes the name the installed diffusers reads (by its version, a public fact),
    so the weights load in that dtype and nothing warns."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = load_pipeline(model, dtype=torch.bfloat16)
    assert {p.dtype for p in pipe.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in pipe.text_encoder.parameters()} == {torch.bfloat16}
    assert not [w for w in caught if "dtype" in str(w.message)], [str(w.message) for w in caught]


def test_every_train_config_field_is_a_flag_of_its_own_type():
    """The flags are generated from TrainConfig: a value for every field, given on the command
    line, arrives in the TrainConfig unchanged (a new field without a flag fails here)."""
    import dataclasses

    from lokr_edu.diffusion import TrainConfig
    from lokr_edu.train import _flag_options, build_parser, settings_from

    flags = {
        "method": ["--method", "loha"],
        "rank": ["--rank", "3"],
        "alpha": ["--alpha", "1.5"],
        "targets": ["--targets", "to_q", "to_v"],
        "steps": ["--steps", "7"],
        "batch_size": ["--batch-size", "2"],
        "learning_rate": ["--learning-rate", "0.003"],
        "weight_decay": ["--weight-decay", "0.5"],
        "snr_gamma": ["--snr-gamma", "5"],
        "checkpoint_every": ["--checkpoint-every", "3"],
        "seed": ["--seed", "11"],
        "adapter_options": ["--adapter-options", '{"rank_dropout": 0.1}'],
        "gradient_accumulation_steps": ["--gradient-accumulation-steps", "4"],
        "lr_scheduler": ["--lr-scheduler", "cosine"],
        "lr_warmup_steps": ["--lr-warmup-steps", "2"],
        "max_grad_norm": ["--max-grad-norm", "0.5"],
        "mixed_precision": ["--mixed-precision", "bf16"],
        "gradient_checkpointing": ["--gradient-checkpointing"],
        "sample_every": ["--sample-every", "2"],
        "sample_prompts": ["--sample-prompt", "a digit", "--sample-prompt", "a red square"],
        "sample_inference_steps": ["--sample-inference-steps", "5"],
        "sample_resolution": ["--sample-resolution", "32"],
    }
    assert flags.keys() == {f.name for f in dataclasses.fields(TrainConfig)}
    argv = [flag for name in flags for flag in flags[name]]
    config, _ = settings_from(build_parser().parse_args(["--data", "d", "--output", "o", *argv]))
    expected = TrainConfig(
        method="loha",
        rank=3,
        alpha=1.5,
        targets=("to_q", "to_v"),
        steps=7,
        batch_size=2,
        learning_rate=0.003,
        weight_decay=0.5,
        snr_gamma=5.0,
        checkpoint_every=3,
        seed=11,
        adapter_options={"rank_dropout": 0.1},
        gradient_accumulation_steps=4,
        lr_scheduler="cosine",
        lr_warmup_steps=2,
        max_grad_norm=0.5,
        mixed_precision="bf16",
        gradient_checkpointing=True,
        sample_every=2,
        sample_prompts=("a digit", "a red square"),
        sample_inference_steps=5,
        sample_resolution=32,
    )
    assert config == expected
    defaults = TrainConfig()
    assert all(getattr(expected, n) != getattr(defaults, n) for n in flags), "test every field"
    with pytest.raises(TypeError, match="no command-line form for"):
        _flag_options("weights", complex)
