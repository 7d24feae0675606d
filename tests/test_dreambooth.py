"""lokr_edu.dreambooth and chapter 07's recipe on the tiny model (lokr_edu.digits_sd)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lokr_edu import dreambooth
from lokr_edu.adapters import adapter_layers
from lokr_edu.diffusion import load_pipeline
from lokr_edu.digits_sd import (
    CLASS_IMAGES_PER_DIGIT,
    CONCEPT_RECIPE,
    HELD_OUT_DIGITS,
    HELD_OUT_TEMPLATE,
    INSTANCES_PER_DIGIT,
    TINY_MODEL,
    TRAIN_DIGITS,
    _pick,
    caption,
    class_prompts,
    instance_images,
    regularisation_images,
    train_concept,
)

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(TINY_MODEL)


@pytest.fixture(scope="module")
def examples(pipe):
    images, captions = instance_images(2)
    plain = [caption(d) for d in TRAIN_DIGITS for _ in range(2)]
    return dreambooth.cache(pipe, images, captions), dreambooth.cache(pipe, images, plain)


def test_cache_encodes_once_what_the_unet_reads(pipe, examples) -> None:
    instance, _ = examples
    assert len(instance) == 2 * len(TRAIN_DIGITS)
    assert instance.latent_mean.shape == (10, 4, 8, 8) == instance.latent_std.shape
    assert instance.text.shape == (10, 8, 64)
    ids = pipe.tokenizer([caption(0, rotated=True)], padding="max_length", return_tensors="pt")
    with torch.no_grad():
        direct = pipe.text_encoder(ids.input_ids)[0]
    torch.testing.assert_close(instance.text[0], direct[0])
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        dreambooth.cache(pipe, torch.zeros(2, 3, 8, 8), ["a"])


def test_training_is_seeded_and_the_prior_weight_counts(examples) -> None:
    instance, prior = examples

    def run(**options):
        fresh = load_pipeline(TINY_MODEL)
        losses = dreambooth.train(fresh, instance, prior, steps=3, batch_size=4, **options)
        return fresh, losses

    first, losses = run(seed=1)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert list(adapter_layers(first.unet))  # the adapter is in the U-Net
    assert not any(p.requires_grad for p in first.unet.parameters())  # ready to sample
    assert run(seed=1)[1] == losses  # the same seed trains the same adapter
    assert run(seed=2)[1] != losses
    # λ = 0 is training without the prior; a larger λ weighs the prior's loss more
    without = dreambooth.train(load_pipeline(TINY_MODEL), instance, None, steps=3, batch_size=4)
    assert run(seed=0, prior_weight=0.0)[1] == without
    assert run(seed=0, prior_weight=2.0)[1][0] > run(seed=0, prior_weight=1.0)[1][0]
    # caption dropout replaces some embeddings: other losses from the same draws
    assert run(seed=1, caption_dropout=0.5)[1] != losses


def test_training_refuses_bad_settings(pipe, examples) -> None:
    instance, prior = examples
    with pytest.raises(ValueError, match="caption_dropout"):
        dreambooth.train(pipe, instance, prior, caption_dropout=1.0)
    with pytest.raises(ValueError, match="prior_weight"):
        dreambooth.train(pipe, instance, prior, prior_weight=-1.0)
    trained = load_pipeline(TINY_MODEL)
    dreambooth.train(trained, instance, prior, steps=1, batch_size=2)
    with pytest.raises(ValueError, match="already has an adapter"):
        dreambooth.train(trained, instance, prior, steps=1)


def test_the_recipe_data_splits() -> None:
    assert set(TRAIN_DIGITS).isdisjoint(HELD_OUT_DIGITS)
    assert sorted(TRAIN_DIGITS + HELD_OUT_DIGITS) == list(range(10))
    images, captions = instance_images(INSTANCES_PER_DIGIT)
    assert len(images) == len(captions) == INSTANCES_PER_DIGIT * len(TRAIN_DIGITS)
    assert all("rotated" in c for c in captions)
    assert not any(caption(d).split()[-1] in " ".join(captions) for d in HELD_OUT_DIGITS)
    regular, regular_captions = regularisation_images()
    assert len(regular) == 10 * CLASS_IMAGES_PER_DIGIT and "rotated" not in "".join(
        regular_captions
    )
    # no real digit is both an instance image and a regularisation image
    instances = set(_pick(INSTANCES_PER_DIGIT, TRAIN_DIGITS, 0).tolist())
    assert instances.isdisjoint(_pick(CLASS_IMAGES_PER_DIGIT, range(10), 0, skip=50).tolist())
    prompts = class_prompts()
    assert len(prompts) == 10 * CLASS_IMAGES_PER_DIGIT and set(prompts) == {
        caption(d) for d in range(10)
    }
    assert set(class_prompts(1, TRAIN_DIGITS)) == {caption(d) for d in TRAIN_DIGITS}
    # preservation's prompts ("the number three") are in no training caption of any kind
    held_out = {caption(d, template=HELD_OUT_TEMPLATE) for d in HELD_OUT_DIGITS}
    assert held_out.isdisjoint(captions + regular_captions + prompts)
    assert not any("number" in c for c in captions + regular_captions + prompts)


def test_train_concept_refuses_unknown_names() -> None:
    with pytest.raises(ValueError, match="method must be one of"):
        train_concept("dora")
    with pytest.raises(ValueError, match="variant must be one of"):
        train_concept("lora", "half a prior")


def test_the_seed_script_runs_a_small_version(tmp_path) -> None:
    """benchmarks/dreambooth_digits.py --quick: a few steps per method, results as JSON."""
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "dreambooth_digits.py"), "--quick"]
        + ["--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    import json

    results = json.loads(out.read_text())
    assert {r["method"] for r in results["runs"]} == {"lokr", "lora"}
    for run in results["runs"]:
        for rate in ("concept", "preservation", "concept digits"):
            assert 0.0 <= run[rate] <= 1.0
        assert run["parameters"] > 0
    assert set(results["best_learning_rate"]) == {"lokr", "lora"}
    assert "concept" in done.stdout and "wrote" in done.stdout


def test_the_recipe_is_what_the_committed_runs_chose() -> None:
    """CONCEPT_RECIPE's learning rates are the ones the committed grid picked, and its step counts
    are the ones the committed seeds ran: the chapter's live run and its table agree."""
    import json

    results = json.loads((ROOT / "benchmarks" / "results" / "dreambooth_digits.json").read_text())
    for method, recipe in CONCEPT_RECIPE.items():
        assert recipe["learning_rate"] == results["best_learning_rate"][method], method
        seeds = [r for r in results["runs"] if (r["method"], r["variant"]) == (method, "prior")]
        assert recipe["steps"] in {r["steps"] for r in seeds}, method
