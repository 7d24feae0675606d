"""Chapters 07 and 08's command line, `python -m lokr_edu.train`: plain fine-tuning on a tiny
pipeline saved to disk, and DreamBooth with prior preservation on the digits model."""

from __future__ import annotations

import csv
import json
import re
import tomllib
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_sd import tiny_pipeline

from lokr_edu.diffusion import ImageCaptionFolder, load_pipeline, tokenize_captions
from lokr_edu.digits_sd import TINY_MODEL, instance_images, write_tiny_clip_vocabulary
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
    for flag in [
        "--instance-prompt",
        "--with-prior-preservation",
        "--class-prompt",
        "--class-data",
        "--num-class-images",
        "--sample-batch-size",
        "--prior-loss-weight",
        "--checkpoints-total-limit",
        "--report-to {none,tensorboard}",
    ]:
        assert flag in done.stdout, flag
    assert "(default 100)" in done.stdout  # --num-class-images, as diffusers
    # the per-method defaults, each with its source, as sd_recipes states them
    from lokr_edu.sd_recipes import help_table

    assert help_table() in done.stdout
    lines = done.stdout.splitlines()
    for method, value, source in [
        ("lora", "--learning-rate 1e-4", '"--learning_rate=1e-4"'),
        ("lora", "--rank 4", '"--rank" default=4'),
        ("loha", "--alpha 4", '"network_alpha = 4"'),
        ("lokr", "--learning-rate 2e-4", '"unet_lr = 2e-4"'),
        ("lokr", "--rank 100000", '"network_dim = 100000"'),
        ("lokr", "--adapter-options '{\"factor\": 6}'", '"factor=6"'),
    ]:
        section = lines[lines.index(f"  {method}") :]
        at = section.index(f"    {value}")
        assert source in section[at + 1], (method, value)
    assert max(map(len, lines[lines.index("  lora") :])) <= 100  # readable at 100 columns


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
        "prior_loss_weight": ["--prior-loss-weight", "0.5"],
        "caption_dropout": ["--caption-dropout", "0.1"],
        "cache_latents": ["--cache-latents"],
        "checkpoints_total_limit": ["--checkpoints-total-limit", "2"],
        "report_to": ["--report-to", "tensorboard"],
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
        prior_loss_weight=0.5,
        caption_dropout=0.1,
        cache_latents=True,
        checkpoints_total_limit=2,
        report_to="tensorboard",
    )
    assert config == expected
    defaults = TrainConfig()
    assert all(getattr(expected, n) != getattr(defaults, n) for n in flags), "test every field"
    with pytest.raises(TypeError, match="no command-line form for"):
        _flag_options("weights", complex)


# ---------------------------------------------------------------------------------------------
# The per-method recipes (lokr_edu.sd_recipes)
# ---------------------------------------------------------------------------------------------


def parsed(*flags: str):
    from lokr_edu.train import build_parser, settings_from

    return settings_from(build_parser().parse_args(["--data", "d", "--output", "o", *flags]))[0]


def test_the_method_s_recipe_fills_in_what_is_not_given_and_a_given_value_wins(tmp_path):
    from lokr_edu.sd_recipes import ATTN_MLP

    lora, loha, lokr = (parsed("--method", m) for m in ("lora", "loha", "lokr"))
    assert (lora.learning_rate, lora.rank, lora.alpha) == (1e-4, 4, None)
    assert lora.targets == ("to_k", "to_q", "to_v", "to_out.0") and lora.adapter_options == {}
    assert (loha.learning_rate, loha.rank, loha.alpha, loha.targets) == (2e-4, 8, 4, ATTN_MLP)
    assert (lokr.learning_rate, lokr.rank, lokr.adapter_options) == (2e-4, 100_000, {"factor": 6})
    assert parsed() == lokr  # LoKr is TrainConfig's default method
    assert lokr.learning_rate != lora.learning_rate  # no default trains LoKr at LoRA's rate
    # a flag wins; the rest of the recipe stays
    ranked = parsed("--method", "lokr", "--rank", "8")
    assert (ranked.rank, ranked.learning_rate, ranked.adapter_options) == (8, 2e-4, {"factor": 6})
    # --config wins too, and adapter_options merge key by key, the given keys winning
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"learning_rate": 5e-5, "adapter_options": {"factor": 4}}))
    given = parsed("--config", str(config), "--adapter-options", '{"rank_dropout": 0.1}')
    assert given.learning_rate == 5e-5 and given.adapter_options == {
        "rank_dropout": 0.1,
        "factor": 6,
    }
    given = parsed("--config", str(config))
    assert given.adapter_options == {"factor": 4} and given.targets == ATTN_MLP


@pytest.mark.upstream
def test_the_attn_mlp_targets_wrap_what_lycoris_preset_attn_mlp_wraps():
    """LyCORIS's preset=attn-mlp, applied by lycoris-lora itself to a diffusers U-Net, wraps the
    layers that sd_recipes.ATTN_MLP's patterns name (the 1×1 proj_in / proj_out too), and, since
    lycoris-lora added the class TimestepEmbedding to the preset (for Anima), the time
    embedding's two Linear layers, which are neither attention nor MLP: the preset as the
    LyCORIS guidelines knew it listed Transformer2DModel alone on a U-Net."""
    import logging

    from lycoris.kohya import LycorisNetworkKohya, create_network

    from lokr_edu.adapters import inject
    from lokr_edu.sd_recipes import ATTN_MLP

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    saved = {k: v for k, v in vars(LycorisNetworkKohya).items() if k.isupper()}
    try:
        pipe = tiny_pipeline()
        network = create_network(
            1.0, 4, 1.0, pipe.vae, pipe.text_encoder, pipe.unet, preset="attn-mlp", algo="lora"
        )
        theirs = {lora.lora_name for lora in network.unet_loras}
    finally:
        for key, value in saved.items():
            setattr(LycorisNetworkKohya, key, value)
    ours = {"lora_unet_" + n.replace(".", "_") for n in inject(tiny_pipeline().unet, ATTN_MLP)}
    assert len(ours) == 48
    assert theirs - ours == {
        "lora_unet_time_embedding_linear_1",
        "lora_unet_time_embedding_linear_2",
    }
    assert ours <= theirs


# ---------------------------------------------------------------------------------------------
# DreamBooth with prior preservation, on chapter 07's digits model (8×8 pixels)
# ---------------------------------------------------------------------------------------------

INSTANCE_PROMPT = "a rotated handwritten digit two"
CLASS_PROMPT = "a handwritten digit two"


@pytest.fixture(scope="module")
def twos(tmp_path_factory) -> Path:
    """Three rotated twos, 8×8 PNGs without captions: --instance-prompt captions them."""
    folder = tmp_path_factory.mktemp("twos")
    images, _ = instance_images(3, digits=(2,))  # (3, 3, 8, 8) in [−1, 1]
    for i, image in enumerate(images):
        pixels = ((image.permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"two{i}.png")
    return folder


@pytest.fixture(scope="module")
def drawn(tmp_path_factory) -> Path:
    """A class folder the CLI finds full: 5 images of CLASS_PROMPT drawn by the digits model
    (10 sampling steps, to be quick), each with its caption."""
    from lokr_edu.sd_class_images import ensure_class_images

    folder = tmp_path_factory.mktemp("drawn")
    pipe = load_pipeline(TINY_MODEL)
    ensure_class_images(pipe, folder, CLASS_PROMPT, 5, 8, steps=10, progress=False)
    return folder


def dreambooth(data: Path, output: Path, class_data: Path | None, *flags: str) -> int:
    """python -m lokr_edu.train on the digits model; with class_data, with the prior."""
    prior = [
        *("--with-prior-preservation", "--class-prompt", CLASS_PROMPT),
        *("--class-data", str(class_data), "--num-class-images", "5", "--sample-batch-size", "2"),
    ]
    return main(
        [
            *("--model", str(TINY_MODEL), "--data", str(data), "--output", str(output)),
            *("--resolution", "8", "--instance-prompt", INSTANCE_PROMPT, "--batch-size", "2"),
            *(prior if class_data is not None else []),
            *flags,
        ]
    )


def log_rows(output: Path) -> list[dict[str, str]]:
    with (output / "log.csv").open(newline="") as file:
        return list(csv.DictReader(file))


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(path)[0]


def same_tensors(a: Path, b: Path) -> bool:
    ours, theirs = tensors(a), tensors(b)
    return ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_dreambooth_draws_the_class_images_once_then_reuses_them(twos, tmp_path, monkeypatch):
    import lokr_edu.sd_class_images

    real, calls = lokr_edu.sd_class_images.generate, []

    def counted(pipe, prompts, **options):
        calls.append((list(prompts), options["seed"]))
        return real(pipe, prompts, **options)

    monkeypatch.setattr(lokr_edu.sd_class_images, "generate", counted)
    classes = tmp_path / "classes"
    assert dreambooth(twos, tmp_path / "first", classes, "--steps", "2") == 0
    # 5 images, 2 at a time; the batch starting at image k seeded with seed·1000003 + k (seed 0)
    assert calls == [([CLASS_PROMPT] * 2, 0), ([CLASS_PROMPT] * 2, 2), ([CLASS_PROMPT], 4)]
    names = [f"class_{i:06d}" for i in range(5)]
    assert sorted(p.name for p in classes.iterdir()) == sorted(
        f"{n}{ext}" for n in names for ext in (".png", ".txt")
    )
    for name in names:
        with Image.open(classes / f"{name}.png") as image:
            assert (image.size, image.mode) == ((8, 8), "RGB")
        assert (classes / f"{name}.txt").read_text() == CLASS_PROMPT + "\n"
    files = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in classes.iterdir()}

    def never(*args, **kwargs):
        raise AssertionError("the class images were drawn again")

    monkeypatch.setattr(lokr_edu.sd_class_images, "generate", never)
    assert dreambooth(twos, tmp_path / "second", classes, "--steps", "2") == 0
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in classes.iterdir()} == files
    # the same images, the same seed: the second run trained exactly what the first did
    first, second = tmp_path / "first", tmp_path / "second"
    assert same_tensors(first / "checkpoint.safetensors", second / "checkpoint.safetensors")
    # LoKr's recipe reached the adapter: full factors (rank 100000), attn-mlp's layers
    trained = tensors(first / "adapter.safetensors")
    assert any(k.endswith("ff_net_2.lokr_w2") for k in trained)
    assert any(k.endswith("proj_in.lokr_w1") for k in trained)
    assert not any("lokr_w2_a" in k for k in trained)


def test_the_prior_adds_lambda_times_the_class_images_loss(twos, drawn, tmp_path):
    assert dreambooth(twos, tmp_path / "plain", None, "--steps", "3") == 0
    plain = log_rows(tmp_path / "plain")
    assert [row["step"] for row in plain] == ["1", "2", "3"]
    assert all(row["prior_loss"] == "" for row in plain)
    assert all(float(row["loss"]) == float(row["instance_loss"]) for row in plain)
    flags = ("--steps", "3", "--prior-loss-weight", "0.5")
    assert dreambooth(twos, tmp_path / "half", drawn, *flags) == 0
    half = log_rows(tmp_path / "half")
    assert [row["step"] for row in half] == ["1", "2", "3"]
    for row in half:
        instance, prior = float(row["instance_loss"]), float(row["prior_loss"])
        assert prior > 0 and float(row["loss"]) == pytest.approx(instance + 0.5 * prior, rel=1e-6)
        assert float(row["learning_rate"]) == 2e-4  # LoKr's recipe
    plain_end = tensors(tmp_path / "plain" / "checkpoint.safetensors")
    half_end = tensors(tmp_path / "half" / "checkpoint.safetensors")
    assert any(not torch.equal(plain_end[k], half_end[k]) for k in plain_end if "param." in k)


def test_the_last_n_step_folders_are_kept_and_the_log_has_a_row_per_step(twos, tmp_path):
    flags = ("--method", "lora", "--steps", "5", "--checkpoint-every", "1")
    assert dreambooth(twos, tmp_path, None, *flags, "--checkpoints-total-limit", "2") == 0
    steps = tmp_path / "checkpoints"
    assert sorted(p.name for p in steps.iterdir()) == ["step_000004", "step_000005"]
    for folder in steps.iterdir():
        files = {"adapter.safetensors", "pytorch_lora_weights.safetensors"}
        assert {p.name for p in folder.iterdir()} == files
    for file in ("adapter.safetensors", "pytorch_lora_weights.safetensors"):
        assert same_tensors(steps / "step_000005" / file, tmp_path / file)  # the final export
    assert not same_tensors(
        steps / "step_000004" / "adapter.safetensors", steps / "step_000005" / "adapter.safetensors"
    )
    rows = log_rows(tmp_path)
    assert [int(row["step"]) for row in rows] == [1, 2, 3, 4, 5]
    assert {float(row["learning_rate"]) for row in rows} == {1e-4}  # LoRA's recipe
    assert all(float(row["loss"]) > 0 for row in rows)


def test_a_resumed_dreambooth_run_ends_exactly_as_an_uninterrupted_one(twos, drawn, tmp_path):
    classes, straight, parts = drawn, tmp_path / "straight", tmp_path / "parts"
    flags = ("--checkpoint-every", "2")
    assert dreambooth(twos, straight, classes, *flags, "--steps", "4") == 0
    assert dreambooth(twos, parts, classes, *flags, "--steps", "2", "--no-export") == 0
    assert not (parts / "adapter.safetensors").exists()
    assert dreambooth(twos, parts, classes, *flags, "--steps", "4", "--resume") == 0
    for file in [
        "checkpoint.safetensors",
        "adapter.safetensors",
        "checkpoints/step_000002/adapter.safetensors",
        "checkpoints/step_000004/adapter.safetensors",
    ]:
        assert same_tensors(parts / file, straight / file), file
    assert read_safetensors(parts / "checkpoint.safetensors")[1]["step"] == "4"
    assert (parts / "log.csv").read_text() == (straight / "log.csv").read_text()
    assert len(log_rows(parts)) == 4 and all(row["prior_loss"] for row in log_rows(parts))


def dreambooth_bad_runs(tmp: Path) -> list[tuple[list[str], str]]:
    """(flags after the instance folder and output, the error) for each bad DreamBooth input."""
    a_file = tmp / "a_file"
    a_file.write_text("not a folder")
    too_big = tmp / "too_big"
    too_big.mkdir()
    Image.new("RGB", (16, 12)).save(too_big / "big.png")
    other_class = tmp / "other_class"
    other_class.mkdir()
    Image.new("RGB", (8, 8)).save(other_class / "three.png")
    (other_class / "three.txt").write_text("a handwritten digit three\n")
    config = tmp / "prior.json"
    config.write_text(json.dumps({"with_prior_preservation": True, "class_prompt": CLASS_PROMPT}))
    prior = ["--with-prior-preservation"]
    with_class = [*prior, "--class-prompt", CLASS_PROMPT, "--class-data"]
    return [
        (prior, "--with-prior-preservation needs --class-prompt and --class-data"),
        ([*prior, "--class-prompt", CLASS_PROMPT], "--with-prior-preservation needs --class-data"),
        (["--config", str(config)], "--with-prior-preservation needs --class-data"),
        (["--class-prompt", CLASS_PROMPT], "--class-prompt: used only with --with-prior-pres"),
        (["--class-data", str(tmp / "c")], "--class-data: used only with --with-prior-preserv"),
        ([*with_class, str(tmp / "c"), "--num-class-images", "0"], "--num-class-images must be"),
        ([*with_class, str(tmp / "c"), "--sample-batch-size", "0"], "--sample-batch-size must"),
        (["--instance-prompt", " "], "--instance-prompt: give a non-empty prompt"),
        ([*with_class, str(a_file)], f"--class-data: class folder {a_file} is a file"),
        ([*with_class, str(a_file / "sub")], f"{a_file / 'sub'} cannot be created or written"),
        (
            [*with_class, str(too_big)],
            re.escape(f"{too_big / 'big.png'} is 16×12 pixels, but the training resolution is 8×8"),
        ),
        (
            [*with_class, str(other_class)],
            f"{other_class / 'three.txt'} holds 'a handwritten digit three', not the class "
            f"prompt '{CLASS_PROMPT}'",
        ),
    ]


def test_every_bad_dreambooth_input_is_an_error_before_the_model_loads(
    twos, tmp_path, monkeypatch, capsys
):
    import lokr_edu.train

    def load_pipeline(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(lokr_edu.train, "load_pipeline", load_pipeline)
    for flags, message in dreambooth_bad_runs(tmp_path):
        output = tmp_path / "output"
        with pytest.raises(SystemExit) as stop:
            dreambooth(twos, output, None, "--steps", "1", *flags)
        assert stop.value.code == 2, flags
        error = capsys.readouterr().err
        assert re.search(message, error), (flags, error)
        assert "Traceback" not in error and not output.exists(), flags
    assert not (tmp_path / "c").exists()  # a bad setting stops before the class folder is made


def test_a_too_long_instance_prompt_stops_before_any_class_image_is_drawn(twos, tmp_path, capsys):
    classes = tmp_path / "classes"
    too_long = "a rotated handwritten digit two a rotated handwritten"
    with pytest.raises(SystemExit) as stop:
        dreambooth(
            twos, tmp_path / "output", classes, "--steps", "1", "--instance-prompt", too_long
        )
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert re.search(r"is 10 tokens long .* reads at most 8: shorten it", error), error
    assert list(classes.iterdir()) == []  # checked and made, but nothing drawn
    assert not (tmp_path / "output" / "checkpoint.safetensors").exists()


def test_an_instance_prompt_captions_every_image_and_a_limit_takes_the_first(twos):
    (twos / "two0.txt").write_text("never read\n")  # a caption file is ignored then
    try:
        folder = ImageCaptionFolder(twos, 8, caption=" a rotated handwritten digit two ")
        assert folder.captions == [INSTANCE_PROMPT] * 3
        first = ImageCaptionFolder(twos, 8, caption=INSTANCE_PROMPT, limit=2)
        assert [path.name for path, _ in first.items] == ["two0.png", "two1.png"]
        assert torch.equal(first[1][0], folder[1][0])
    finally:
        (twos / "two0.txt").unlink()
    with pytest.raises(ValueError, match="two0.png has no caption"):
        ImageCaptionFolder(twos, 8)
    with pytest.raises(ValueError, match="caption: give a non-empty caption"):
        ImageCaptionFolder(twos, 8, caption="")


def test_report_to_tensorboard_logs_what_log_csv_holds(twos, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert dreambooth(twos, tmp_path, None, "--steps", "3", "--report-to", "tensorboard") == 0
    (events,) = tmp_path.rglob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events.parent))
    accumulator.Reload()
    rows = log_rows(tmp_path)
    for tag in ("loss", "instance_loss", "learning_rate"):
        logged = [(e.step, e.value) for e in accumulator.Scalars(tag)]
        expected = [(int(row["step"]), float(row[tag])) for row in rows]
        assert [s for s, _ in logged] == [s for s, _ in expected] == [1, 2, 3], tag
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6), tag
    assert "prior_loss" not in accumulator.Tags()["scalars"]  # no prior, nothing logged


def test_report_to_tensorboard_without_the_package_says_what_to_install(
    twos, tmp_path, monkeypatch, capsys
):
    import importlib.util

    find_spec = importlib.util.find_spec

    def without_tensorboard(name, *args, **kwargs):
        return None if name == "tensorboard" else find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", without_tensorboard)
    with pytest.raises(SystemExit) as stop:
        dreambooth(twos, tmp_path, None, "--steps", "1", "--report-to", "tensorboard")
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert "needs the tensorboard package: pip install tensorboard" in error
    assert not (tmp_path / "checkpoint.safetensors").exists()


def readme_commands() -> list[list[str]]:
    """The arguments of each `python -m lokr_edu.train` command in the README's SD1.5 section."""
    import shlex

    readme = (REPO / "README.md").read_text()
    section = readme.split("## On a GPU: Stable Diffusion 1.5")[1].split("### The rehearsal")[0]
    commands = []
    for block in section.split("```bash")[1:]:
        code = block.split("```")[0].replace("\\\n", " ")
        for line in code.splitlines():
            words = shlex.split(line, comments=True)
            if "lokr_edu.train" in words:
                commands.append(words[words.index("lokr_edu.train") + 1 :])
    return commands


def test_the_readme_s_commands_parse_and_its_table_is_the_recipes():
    from lokr_edu.sd_recipes import markdown_table
    from lokr_edu.train import build_parser, settings_from

    assert markdown_table() in (REPO / "README.md").read_text()
    dreambooth_command, plain, multi_gpu = (
        settings_from(build_parser().parse_args(argv)) for argv in readme_commands()
    )
    config, run = dreambooth_command  # diffusers' DreamBooth-LoRA example, with the prior
    assert run["instance_prompt"] == "a photo of sks dog" and run["with_prior_preservation"]
    assert (run["class_prompt"], run["num_class_images"]) == ("a photo of dog", 200)
    assert (config.method, config.learning_rate, config.rank) == ("lora", 1e-4, 4)
    assert (config.steps, config.batch_size, config.prior_loss_weight) == (500, 1, 1.0)
    assert (config.checkpoint_every, config.checkpoints_total_limit) == (100, 5)
    for config, run in (plain, multi_gpu):  # diffusers' train_text_to_image_lora.py settings
        settings = (config.method, config.rank, config.learning_rate, config.steps)
        assert settings == ("lora", 4, 1e-4, 15000)
        assert not run["with_prior_preservation"]
