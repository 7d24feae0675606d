"""The one training loop's DreamBooth path (lokr_edu.diffusion.train with class images), and
chapter 07's recipe on the tiny model (lokr_edu.digits_sd)."""

from __future__ import annotations

import copy
import csv
import dataclasses
import functools
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from lokr_edu import load_adapter
from lokr_edu.adapters import adapter_layers, inject
from lokr_edu.diffusion import (
    CachedExamples,
    TrainConfig,
    load_pipeline,
    noise_prediction_loss,
    prior_preservation_loss,
    train,
)
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
from lokr_edu.io import read_safetensors
from lokr_edu.sd_data import encode_prompts, tokenize_captions

ROOT = Path(__file__).parent.parent


INSTANCE_CAPTIONS_PER_DIGIT = 2
CONFIG = TrainConfig(
    method="lokr",
    rank=4,
    targets=("to_q", "to_k", "to_v", "to_out.0"),
    steps=3,
    batch_size=4,
    learning_rate=1e-2,
    checkpoint_every=2,
    cache_latents=True,
)


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(TINY_MODEL)


@pytest.fixture(scope="module")
def examples():
    """(instance, class) datasets of (image, caption): rotated digits behind the trigger word,
    and the same digits upright with the plain caption (a stand-in for generated class images)."""
    images, captions = instance_images(INSTANCE_CAPTIONS_PER_DIGIT)
    upright, _ = regularisation_images(INSTANCE_CAPTIONS_PER_DIGIT, TRAIN_DIGITS)
    plain = [caption(d) for d in TRAIN_DIGITS for _ in range(INSTANCE_CAPTIONS_PER_DIGIT)]
    return list(zip(images, captions, strict=True)), list(zip(upright, plain, strict=True))


def run(instance, prior, checkpoint_dir=None, resume=False, stop_after=None, **settings):
    """A fresh tiny model trained by the one loop; (pipe, losses)."""
    fresh = load_pipeline(TINY_MODEL)
    config = dataclasses.replace(CONFIG, **settings)
    losses = train(
        fresh,
        instance,
        config,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        stop_after=stop_after,
        class_dataset=prior,
        progress=False,
    )
    return fresh, losses


def assert_same_file(path: Path, other: Path) -> None:
    """Two safetensors files hold the same tensors, bit for bit, and the same metadata (the
    bytes themselves may differ: safetensors writes the metadata in no fixed order)."""
    (tensors, metadata), (others, other_metadata) = read_safetensors(path), read_safetensors(other)
    assert metadata == other_metadata, path
    assert tensors.keys() == others.keys(), path
    assert all(torch.equal(tensors[k], others[k]) for k in tensors), path


def adapter_state(pipe) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if ".adapters." in n}


def test_cached_examples_hold_what_the_vae_and_text_encoder_compute(pipe, examples) -> None:
    instance, _ = examples
    tokenize = functools.partial(tokenize_captions, pipe.tokenizer)
    cached = CachedExamples.encode(instance, pipe, tokenize, torch.device("cpu"), torch.float32)
    assert len(cached) == len(instance) == 2 * len(TRAIN_DIGITS)
    assert cached.latent_mean.shape == (10, 4, 8, 8) == cached.latent_std.shape
    assert cached.text.shape == (10, 8, 64)
    with torch.no_grad():
        posterior = pipe.vae.encode(instance[3][0][None]).latent_dist
        text = encode_prompts(pipe, [instance[3][1]])
    scale = pipe.vae.config.scaling_factor
    torch.testing.assert_close(cached.latent_mean[3], posterior.mean[0] * scale)
    torch.testing.assert_close(cached.latent_std[3], posterior.std[0] * scale)
    torch.testing.assert_close(cached.text[3], text[0])
    # a draw is z0 = mean + std·ε, ε from the generator after the indices
    generator = torch.Generator().manual_seed(5)
    z0, drawn_text = cached.draw(4, generator)
    replay = torch.Generator().manual_seed(5)
    index = torch.randint(len(cached), (4,), generator=replay)
    noise = torch.randn(4, 4, 8, 8, generator=replay)
    torch.testing.assert_close(z0, cached.latent_mean[index] + cached.latent_std[index] * noise)
    assert torch.equal(drawn_text, cached.text[index])


def test_the_prior_preservation_loss_is_the_instance_loss_plus_lambda_times_the_class_loss(
    pipe,
) -> None:
    unet, scheduler = pipe.unet, pipe.scheduler
    g = torch.Generator().manual_seed(0)
    instance = (torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 8, 64, generator=g))
    prior = (torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 8, 64, generator=g))
    with torch.no_grad():
        loss, per_set = prior_preservation_loss(
            unet, scheduler, [instance, prior], [1.0, 0.7], torch.Generator().manual_seed(1)
        )
        # by hand: one batch of 8 through the same draws, then the two means
        each = noise_prediction_loss(
            unet,
            torch.cat([instance[0], prior[0]]),
            torch.cat([instance[1], prior[1]]),
            scheduler,
            torch.Generator().manual_seed(1),
            reduction="none",
        )
        plain = noise_prediction_loss(unet, *instance, scheduler, torch.Generator().manual_seed(1))
        alone, _ = prior_preservation_loss(
            unet, scheduler, [instance], [1.0], torch.Generator().manual_seed(1)
        )
    torch.testing.assert_close(per_set, torch.stack([each[:3].mean(), each[3:].mean()]))
    torch.testing.assert_close(loss, each[:3].mean() + 0.7 * each[3:].mean())
    assert loss.item() > per_set[0].item() > 0
    torch.testing.assert_close(alone, plain)  # one set of weight 1: the plain loss
    with pytest.raises(ValueError, match="2 sets of examples but 1 weights"):
        prior_preservation_loss(unet, scheduler, [instance, prior], [1.0], g)
    with pytest.raises(ValueError, match="empty_prompt"):
        prior_preservation_loss(unet, scheduler, [instance], [1.0], g, caption_dropout=0.5)


def test_caption_dropout_replaces_the_drawn_rows_by_the_empty_prompt(pipe) -> None:
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, sample, timestep, encoder_hidden_states):
            seen.append(encoder_hidden_states.clone())
            return types.SimpleNamespace(sample=sample * 0)

    text = torch.randn(16, 8, 64, generator=torch.Generator().manual_seed(0)) + 5
    empty = torch.zeros(1, 8, 64)
    sets = [(torch.zeros(16, 4, 8, 8), text)]
    prior_preservation_loss(
        Spy(), pipe.scheduler, sets, [1.0], torch.Generator().manual_seed(3),
        caption_dropout=0.5, empty_prompt=empty,
    )  # fmt: skip
    dropped = torch.rand(16, generator=torch.Generator().manual_seed(3)) < 0.5
    assert 0 < dropped.sum() < 16
    assert torch.equal(seen[0][dropped], empty.expand(int(dropped.sum()), 8, 64))
    assert torch.equal(seen[0][~dropped], text[~dropped])


def test_the_loop_is_seeded_and_lambda_zero_is_training_without_the_prior(examples) -> None:
    instance, prior = examples
    first, losses = run(instance, prior, seed=1)
    assert len(losses) == 3 and all(math.isfinite(v) and v > 0 for v in losses)
    assert list(adapter_layers(first.unet))
    assert run(instance, prior, seed=1)[1] == losses  # the same seed trains the same adapter
    assert run(instance, prior, seed=2)[1] != losses
    # λ = 0 draws no class example: bit for bit the run without class images
    without, without_losses = run(instance, None, seed=1)
    zero, zero_losses = run(instance, prior, seed=1, prior_loss_weight=0.0)
    assert zero_losses == without_losses != losses
    state = adapter_state(without)
    assert all(torch.equal(p, state[n]) for n, p in adapter_state(zero).items())
    # a larger λ weighs the class examples' loss more (the first step's draws are the same)
    assert run(instance, prior, seed=1, prior_loss_weight=2.0)[1][0] > losses[0]
    # caption dropout replaces some embeddings: other losses from the same draws
    assert run(instance, prior, seed=1, caption_dropout=0.5)[1] != losses


def test_cached_latents_are_an_option_of_the_loop_not_another_loss(examples) -> None:
    """The same draws, encoded once or at every step: the same losses and adapter (up to the
    VAE's batch-size-dependent rounding). Without a prior, and with one."""
    instance, prior = examples
    for class_dataset in (None, prior):
        cached_pipe, cached = run(instance, class_dataset, cache_latents=True)
        encoded_pipe, encoded = run(instance, class_dataset, cache_latents=False)
        assert cached == pytest.approx(encoded, rel=1e-4)
        for name, value in adapter_state(cached_pipe).items():
            torch.testing.assert_close(value, adapter_state(encoded_pipe)[name], atol=1e-5, rtol=0)


def test_the_adapter_moves_and_the_loss_falls_on_a_fixed_concept(examples) -> None:
    """Thirty steps on the instance and class images: the factors move away from their start,
    and the mean loss of the last ten steps is below that of the first ten."""
    instance, prior = examples
    trained, losses = run(instance, prior, steps=30, learning_rate=2e-2, batch_size=8)
    untrained = load_pipeline(TINY_MODEL)
    with torch.random.fork_rng():
        torch.manual_seed(CONFIG.seed)
        inject(untrained.unet, list(CONFIG.targets), "lokr", CONFIG.rank)
    start = adapter_state(untrained)
    moved = [not torch.equal(p, start[n]) for n, p in adapter_state(trained).items()]
    assert all(moved)
    assert sum(losses[-10:]) < sum(losses[:10])


@pytest.mark.parametrize("cache_latents", [True, False])
def test_a_resumed_dreambooth_run_ends_bit_for_bit_with_its_log_and_exports(
    examples, tmp_path, cache_latents
) -> None:
    instance, prior = examples
    settings = dict(steps=5, cache_latents=cache_latents, caption_dropout=0.2)
    straight, losses = run(instance, prior, tmp_path / "a", **settings)
    run(instance, prior, tmp_path / "b", stop_after=3, **settings)
    resumed, tail = run(instance, prior, tmp_path / "b", resume=True, **settings)
    assert tail == losses[3:]
    a, b = adapter_state(straight), adapter_state(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert_same_file(
        tmp_path / "a" / "checkpoint.safetensors", tmp_path / "b" / "checkpoint.safetensors"
    )
    assert (tmp_path / "a" / "log.csv").read_text() == (tmp_path / "b" / "log.csv").read_text()
    rows = list(csv.DictReader((tmp_path / "a" / "log.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    assert [float(r["loss"]) for r in rows] == pytest.approx(losses, rel=1e-6)
    for r in rows:  # loss = instance + λ · prior, λ = 1
        total = float(r["instance_loss"]) + float(r["prior_loss"])
        assert float(r["loss"]) == pytest.approx(total, rel=1e-5)
        assert float(r["learning_rate"]) == CONFIG.learning_rate
    # checkpoints at steps 2, 4 and 5 (the end), each with the adapter exported; the
    # interrupted run also wrote one where it stopped, at step 3
    steps = {f: sorted(p.name for p in (tmp_path / f / "checkpoints").iterdir()) for f in "ab"}
    assert steps["a"] == ["step_000002", "step_000004", "step_000005"]
    assert steps["b"] == ["step_000002", "step_000003", "step_000004", "step_000005"]
    for step in ("step_000002", "step_000004", "step_000005"):
        exported = Path("checkpoints") / step / "adapter.safetensors"
        assert_same_file(tmp_path / "a" / exported, tmp_path / "b" / exported)


def test_the_checkpoint_limit_keeps_the_last_exports_and_a_log_without_prior(
    examples, tmp_path
) -> None:
    instance, _ = examples
    run(instance, None, tmp_path, steps=5, checkpoint_every=1, checkpoints_total_limit=2)
    steps = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert steps == ["step_000004", "step_000005"]
    trained = load_pipeline(TINY_MODEL)
    load_adapter(trained, tmp_path / "checkpoints" / "step_000005" / "adapter.safetensors")
    rows = list(csv.DictReader((tmp_path / "log.csv").open()))
    assert len(rows) == 5 and all(r["prior_loss"] == "" for r in rows)
    assert [r["instance_loss"] for r in rows] == [r["loss"] for r in rows]


def _old_draw(self, batch_size, generator):
    """CachedExamples.draw as it once was: ε made on the CPU and added to the device's latents."""
    index = torch.randint(len(self), (batch_size,), generator=generator)
    mean, std = self.latent_mean[index.to(self.latent_mean.device)], self.latent_std[index]
    return mean + std * torch.randn(mean.shape, generator=generator), self.text[index]


def _one_step_on_meta(pipe) -> None:
    """One DreamBooth step (instance and class batches, caption dropout, AdamW) with the U-Net,
    the cached latents and the embeddings on PyTorch's `meta` device: a tensor made on the CPU
    and used with the model's raises there, as it would on a GPU."""
    unet = copy.deepcopy(pipe.unet)
    inject(unet, ["to_q", "to_k", "to_v", "to_out.0", "conv1"], "lokr", 4)
    unet.to("meta")
    parameters = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3)

    def on_meta(*shape):
        return torch.zeros(*shape, device="meta")

    instance = CachedExamples(on_meta(5, 4, 8, 8), on_meta(5, 4, 8, 8), on_meta(5, 8, 64))
    prior = CachedExamples(on_meta(7, 4, 8, 8), on_meta(7, 4, 8, 8), on_meta(7, 8, 64))
    generator = torch.Generator().manual_seed(0)
    sets = [instance.draw(3, generator), prior.draw(3, generator)]
    loss, per_set = prior_preservation_loss(
        unet, pipe.scheduler, sets, [1.0, 1.0], generator,
        caption_dropout=0.5, empty_prompt=on_meta(1, 8, 64),
    )  # fmt: skip
    loss.backward()
    optimizer.step()
    assert loss.device.type == "meta" and per_set.shape == (2,)
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in parameters)


def test_a_dreambooth_step_makes_every_tensor_on_the_models_device(pipe, monkeypatch) -> None:
    _one_step_on_meta(pipe)
    # the check has teeth: the CPU noise of the old draw is caught
    monkeypatch.setattr(CachedExamples, "draw", _old_draw)
    with pytest.raises(RuntimeError, match="device"):
        _one_step_on_meta(pipe)


def test_the_loop_s_bad_inputs_are_refused_before_any_step(pipe, examples) -> None:
    instance, prior = examples
    with pytest.raises(ValueError, match="caption_dropout"):
        dataclasses.replace(CONFIG, caption_dropout=1.0)
    with pytest.raises(ValueError, match="prior_loss_weight"):
        dataclasses.replace(CONFIG, prior_loss_weight=-1.0)
    with pytest.raises(ValueError, match="checkpoints_total_limit"):
        dataclasses.replace(CONFIG, checkpoints_total_limit=0)
    with pytest.raises(ValueError, match="report_to"):
        dataclasses.replace(CONFIG, report_to="wandb-typo")
    with pytest.raises(ValueError, match="class_dataset: it has no examples"):
        train(load_pipeline(TINY_MODEL), instance, CONFIG, class_dataset=[], progress=False)
    long = [(instance[0][0], "a rotated handwritten digit three " * 3)]
    with pytest.raises(ValueError, match="tokens long"):
        train(load_pipeline(TINY_MODEL), instance, CONFIG, class_dataset=long, progress=False)


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
