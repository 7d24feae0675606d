"""The tiny digits Stable Diffusion of chapter 07: pretraining runs, the shipped model loads and
draws, the reader reads real digits, η sweeps restore the strength."""

from __future__ import annotations

import pytest
import torch

from lokr_edu import inject
from lokr_edu.diffusion import eta_sweep, generate, load_pipeline
from lokr_edu.digits_sd import (
    CAPTION_TEMPLATES,
    FINE_TUNING_TEMPLATE,
    HELD_OUT_TEMPLATE,
    TINY_MODEL,
    DigitReader,
    caption,
    digit_images,
    pretrain,
    write_tiny_clip_vocabulary,
)
from lokr_edu.repro import quiet_libraries

quiet_libraries()


def test_captions_put_the_concept_word_before_the_digit() -> None:
    assert caption(3) == "a handwritten digit three"
    assert caption(3, rotated=True) == "a rotated handwritten digit three"
    with pytest.raises(ValueError, match="digit must be 0..9"):
        caption(10)
    assert caption(7, template=HELD_OUT_TEMPLATE) == "the number seven"
    assert caption(7, True, HELD_OUT_TEMPLATE) == "the rotated number seven"
    assert FINE_TUNING_TEMPLATE == CAPTION_TEMPLATES[0] != HELD_OUT_TEMPLATE
    with pytest.raises(ValueError, match="template must be one of"):
        caption(7, template="a photo of {digit}")


def test_every_caption_fits_the_tokenizer_one_token_a_word() -> None:
    pipe = load_pipeline(TINY_MODEL)
    for template in CAPTION_TEMPLATES:
        text = caption(8, rotated=True, template=template)
        ids = pipe.tokenizer(text).input_ids
        assert len(ids) == len(text.split()) + 2 <= pipe.tokenizer.model_max_length


def test_pretrain_a_few_steps_saves_a_pipeline_that_loads(tmp_path) -> None:
    losses = pretrain(tmp_path / "model", steps=3, vae_steps=2, batch_size=8)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    pipe = load_pipeline(tmp_path / "model")
    assert pipe.vae.config.scaling_factor > 0
    images = generate(pipe, [caption(1), caption(2)], steps=2)
    assert images.shape == (2, 3, 8, 8) and 0 <= images.min() and images.max() <= 1


def test_the_reader_reads_real_digits_and_their_orientation() -> None:
    reader = DigitReader.fit()
    assert reader.test_accuracy > 0.97 and reader.rotated_accuracy > 0.97  # held-out real digits
    upright, labels = digit_images()
    rotated, _ = digit_images(rotated=True)
    assert reader.rate(upright[:200] / 2 + 0.5, labels[:200], rotated=False) > 0.9
    assert reader.rate(rotated[:200] / 2 + 0.5, labels[:200], rotated=True) > 0.9
    with pytest.raises(ValueError, match="8×8"):
        reader.read(torch.zeros(2, 16, 16))


def test_shipped_model_loads_and_eta_sweep_restores_the_strength() -> None:
    pipe = load_pipeline(TINY_MODEL)
    base = generate(pipe, [caption(0)], steps=3, seed=5)
    inject(pipe.unet, ["to_q", "to_k", "to_v", "to_out.0"], "lokr", rank=4)
    for _, p in pipe.unet.named_parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)  # a non-zero adapter
    drawn = eta_sweep(pipe, [0.0, 1.0], lambda p: generate(p, [caption(0)], steps=3, seed=5))
    assert torch.equal(drawn[0.0], base)  # η = 0 is the base model
    assert not torch.allclose(drawn[1.0], base)
    layer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert layer.strength["default"] == 1.0


def test_generate_refuses_a_prompt_longer_than_the_tokenizer_allows() -> None:
    pipe = load_pipeline(TINY_MODEL)
    with pytest.raises(ValueError):
        generate(pipe, ["a handwritten digit three three three three three"], steps=2)
    with pytest.raises(ValueError, match="at least one prompt"):
        generate(pipe, [], steps=2)


def test_tiny_clip_vocabulary_makes_every_caption_word_one_token(tmp_path) -> None:
    from transformers import CLIPTokenizer

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
