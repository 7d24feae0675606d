"""Chapter 07's training loop on a tiny SD-shaped pipeline: loss, checkpoints, exact resume."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from tiny_sd import tiny_pipeline

from lokr_edu.adapters import adapter_layers
from lokr_edu.diffusion import ImageCaptionFolder, TrainConfig, noise_prediction_loss, train


def tokenize(captions: list[str]) -> torch.Tensor:
    """A stand-in tokenizer for the tiny text encoder (vocabulary of 100, 16 positions)."""
    ids = torch.zeros(len(captions), 16, dtype=torch.long)
    for row, caption in enumerate(captions):
        words = [sum(map(ord, w)) % 99 + 1 for w in caption.split()][:16]
        ids[row, : len(words)] = torch.tensor(words)
    return ids


DATASET = [
    (torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(i)) * 2 - 1, f"a digit {i}")
    for i in range(4)
]
CONFIG = TrainConfig(
    method="lokr", rank=2, steps=6, batch_size=2, learning_rate=1e-3, checkpoint_every=2
)


def adapter_state(pipe) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if ".adapters." in n}


def test_training_runs_and_trains_only_the_adapter() -> None:
    pipe = tiny_pipeline()
    frozen = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    suffixes = ("to_q", "to_k", "to_v", "to_out.0")
    projections = [n for n, _ in pipe.unet.named_modules() if n.endswith(suffixes)]
    losses = train(pipe, DATASET, CONFIG, tokenize)
    assert len(losses) == 6 and all(v > 0 for v in losses)
    assert [n for n, _ in adapter_layers(pipe.unet)] == projections
    after = {
        n.replace(".base.", "."): p
        for n, p in pipe.unet.named_parameters()
        if ".adapters." not in n
    }
    assert after.keys() == frozen.keys()
    assert all(torch.equal(after[n], frozen[n]) for n in frozen)


def test_an_interrupted_and_resumed_run_ends_bit_for_bit_where_an_uninterrupted_one_does(
    tmp_path,
) -> None:
    straight = tiny_pipeline()
    train(straight, DATASET, CONFIG, tokenize, checkpoint_dir=tmp_path / "a")
    interrupted = tiny_pipeline()
    train(interrupted, DATASET, CONFIG, tokenize, checkpoint_dir=tmp_path / "b", stop_after=3)
    resumed = tiny_pipeline()  # a fresh process: nothing but the checkpoint carries over
    losses = train(resumed, DATASET, CONFIG, tokenize, checkpoint_dir=tmp_path / "b", resume=True)
    assert len(losses) == 3
    ours, reference = adapter_state(resumed), adapter_state(straight)
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k]) for k in ours)


def test_resuming_another_configuration_is_refused(tmp_path) -> None:
    train(tiny_pipeline(), DATASET, CONFIG, tokenize, checkpoint_dir=tmp_path, stop_after=2)
    other = TrainConfig(**{**CONFIG.__dict__, "rank": 4})
    with pytest.raises(ValueError, match="was written by another configuration"):
        train(tiny_pipeline(), DATASET, other, tokenize, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="no checkpoint"):
        train(
            tiny_pipeline(),
            DATASET,
            CONFIG,
            tokenize,
            checkpoint_dir=tmp_path / "empty",
            resume=True,
        )


def test_snr_weighting_changes_the_loss_but_not_its_scale_wildly() -> None:
    pipe = tiny_pipeline()
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    text = pipe.text_encoder(tokenize(["a", "b"]))[0]
    plain = noise_prediction_loss(
        pipe.unet, latents, text, pipe.scheduler, torch.Generator().manual_seed(1)
    )
    weighted = noise_prediction_loss(
        pipe.unet, latents, text, pipe.scheduler, torch.Generator().manual_seed(1), 5.0
    )
    assert 0 < weighted <= plain + 1e-6  # min(SNR, γ)/SNR ≤ 1


def test_image_folder_and_its_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="has no images"):
        ImageCaptionFolder(tmp_path, resolution=16)
    Image.new("RGB", (20, 20), (255, 0, 0)).save(tmp_path / "red.png")
    with pytest.raises(ValueError, match=r"red.png has no caption \(red.txt\)"):
        ImageCaptionFolder(tmp_path, resolution=16)
    (tmp_path / "red.txt").write_text("a red square\n")
    with pytest.raises(ValueError, match="resolution must be a positive multiple of 8"):
        ImageCaptionFolder(tmp_path, resolution=20)
    data = ImageCaptionFolder(tmp_path, resolution=16)
    pixels, caption = data[0]
    assert pixels.shape == (3, 16, 16) and caption == "a red square"
    assert torch.allclose(pixels[0], torch.ones(16, 16)) and torch.allclose(
        pixels[1], -torch.ones(16, 16)
    )


def test_tiny_clip_vocabulary_makes_every_caption_word_one_token(tmp_path) -> None:
    from transformers import CLIPTokenizer

    from lokr_edu.diffusion import write_tiny_clip_vocabulary

    words = (
        "a handwritten digit zero one two three four five six seven eight nine in thin bold".split()
    )
    folder = write_tiny_clip_vocabulary(words, tmp_path)
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=8
    )
    for word in words:
        assert len(tokenizer(word).input_ids) == 3, word  # start, the word, end
    ids = tokenizer("a handwritten digit three", padding="max_length", max_length=8).input_ids
    assert len(ids) == 8 and tokenizer.decode(ids[1:5]) == "a handwritten digit three"
    with pytest.raises(ValueError, match="ASCII letters-only words"):
        write_tiny_clip_vocabulary(["digit-3"], tmp_path)
