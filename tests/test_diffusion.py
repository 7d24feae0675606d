"""Chapter 07's training loop on a tiny SD-shaped pipeline: loss, checkpoints, exact resume."""

from __future__ import annotations

import json

import numpy as np
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


def fixed_batch_loss(pipe) -> torch.Tensor:
    """The loss of each example of DATASET, with the same ε and t every time (seeded), (4,)."""
    with torch.no_grad():
        pixels = torch.stack([image for image, _ in DATASET])  # (4, 3, 16, 16)
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        text = pipe.text_encoder(tokenize([caption for _, caption in DATASET]))[0]
        generator = torch.Generator().manual_seed(123)
        return noise_prediction_loss(
            pipe.unet, latents, text, pipe.scheduler, generator, reduction="none"
        )


def test_training_runs_and_trains_only_the_adapter() -> None:
    pipe = tiny_pipeline()
    frozen = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    suffixes = ("to_q", "to_k", "to_v", "to_out.0")
    projections = [n for n, _ in pipe.unet.named_modules() if n.endswith(suffixes)]
    assert train(pipe, DATASET, CONFIG, tokenize, stop_after=0) == []  # injects, no step
    initial, before = adapter_state(pipe), fixed_batch_loss(pipe)
    losses = train(pipe, DATASET, CONFIG, tokenize)
    assert len(losses) == 6 and all(type(v) is float and v > 0 for v in losses)
    assert [n for n, _ in adapter_layers(pipe.unet)] == projections
    after = {
        n.replace(".base.", "."): p
        for n, p in pipe.unet.named_parameters()
        if ".adapters." not in n
    }
    assert after.keys() == frozen.keys()
    assert all(torch.equal(after[n], frozen[n]) for n in frozen)  # the base: bit for bit
    trained = adapter_state(pipe)
    assert initial and trained.keys() == initial.keys()
    assert all(not torch.equal(trained[n], initial[n]) for n in initial)  # every factor moved
    assert (fixed_batch_loss(pipe) < before).all()  # and the loss fell, on every example


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
    halfway = adapter_state(interrupted)  # 3 steps in: the last 3 steps moved the adapter
    assert all(not torch.equal(halfway[k], reference[k]) for k in reference)


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


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weighting_follows_hang_et_al(prediction_type: str) -> None:
    """The loss of each example against a hand computation from what the U-Net saw: its input
    z_t, its timestep t and its prediction. With ᾱ = alphas_cumprod[t], SNR = ᾱ/(1 − ᾱ),
    ε = (z_t − √ᾱ·z0)/√(1 − ᾱ), the target is ε (or v = √ᾱ·ε − √(1 − ᾱ)·z0), and min-SNR-γ
    (Hang et al., 2023) weights the loss by min(SNR, γ)/SNR (v-prediction: min(SNR, γ)/(SNR + 1)),
    as diffusers' train_text_to_image.py does."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    pipe, gamma = tiny_pipeline(), 5.0
    scheduler = DDPMScheduler(clip_sample=False, steps_offset=1, prediction_type=prediction_type)
    latents = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0))  # (B, 4, h, w)
    text = pipe.text_encoder(tokenize([f"a digit {i}" for i in range(8)]))[0].detach()
    seen = []
    pipe.unet.register_forward_hook(
        lambda module, args, kwargs, out: seen.append((args[0], args[1], out.sample)),
        with_kwargs=True,
    )

    @torch.no_grad()
    def loss(snr_gamma: float | None) -> torch.Tensor:  # each example's, (B,): same ε and t
        generator = torch.Generator().manual_seed(0)
        return noise_prediction_loss(
            pipe.unet, latents, text, scheduler, generator, snr_gamma, "none"
        )

    plain, weighted = loss(None), loss(gamma)
    (noisy, t, prediction), again = seen
    assert all(torch.equal(a, b) for a, b in zip(again, (noisy, t, prediction), strict=True))
    alpha_bar = scheduler.alphas_cumprod[t].double()  # (B,)
    snr = alpha_bar / (1 - alpha_bar)
    assert torch.allclose(compute_snr(scheduler, t).double(), snr, rtol=1e-5)  # diffusers' SNR
    assert (snr > gamma).any() and (snr < gamma).any()  # γ clips some examples, not others
    a, s = alpha_bar.sqrt()[:, None, None, None], (1 - alpha_bar).sqrt()[:, None, None, None]
    noise = (noisy.double() - a * latents.double()) / s
    target = a * noise - s * latents.double() if prediction_type == "v_prediction" else noise
    by_hand = (prediction.double() - target).square().mean(dim=(1, 2, 3))  # (B,)
    assert torch.allclose(plain.double(), by_hand, rtol=1e-4)
    weight = snr.clamp(max=gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)
    assert torch.allclose(weighted.double(), by_hand * weight, rtol=1e-4)
    assert torch.allclose(weighted / plain, weight.float(), rtol=1e-5)  # the weight alone


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


ACCUMULATING = TrainConfig(
    method="lora",
    rank=2,
    steps=4,
    batch_size=1,
    gradient_accumulation_steps=2,
    learning_rate=1e-3,
    lr_scheduler="cosine",
    lr_warmup_steps=2,
    checkpoint_every=1,
)


def test_resume_is_exact_with_gradient_accumulation_and_a_warmup_schedule(tmp_path) -> None:
    from lokr_edu.io import read_safetensors

    straight = tiny_pipeline()
    train(straight, DATASET, ACCUMULATING, tokenize, checkpoint_dir=tmp_path / "a")
    interrupted = tiny_pipeline()
    train(interrupted, DATASET, ACCUMULATING, tokenize, checkpoint_dir=tmp_path / "b", stop_after=1)
    _, metadata = read_safetensors(tmp_path / "b" / "checkpoint.safetensors")
    schedule = json.loads(metadata["lr_scheduler"])
    assert metadata["step"] == "1" and schedule["last_epoch"] == 1
    assert schedule["_last_lr"] == [pytest.approx(0.5e-3)]  # halfway through the 2-step warmup
    resumed = tiny_pipeline()
    losses = train(
        resumed, DATASET, ACCUMULATING, tokenize, checkpoint_dir=tmp_path / "b", resume=True
    )
    assert len(losses) == 3
    ours, reference = adapter_state(resumed), adapter_state(straight)
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k]) for k in ours)
    constant = tiny_pipeline()  # the schedule is really applied: another one ends elsewhere
    train(
        constant,
        DATASET,
        TrainConfig(**{**ACCUMULATING.__dict__, "lr_scheduler": "constant"}),
        tokenize,
    )
    assert not all(torch.equal(adapter_state(constant)[k], reference[k]) for k in reference)


def test_bad_settings_are_refused_when_the_config_is_made() -> None:
    for settings, message in [
        ({"method": "dora"}, "method must be one of"),
        ({"rank": 0}, "rank must be an integer ≥ 1"),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be"),
        ({"lr_scheduler": "warmup"}, "lr_scheduler must be one of"),
        ({"mixed_precision": "fp8"}, "mixed_precision must be one of"),
        ({"max_grad_norm": -1.0}, "max_grad_norm must be a positive number"),
        ({"sample_every": 5}, "sample_every > 0 needs sample_prompts"),
    ]:
        with pytest.raises(ValueError, match=message):
            TrainConfig(**settings)


def test_fp16_on_the_cpu_is_refused_before_any_step() -> None:
    pipe = tiny_pipeline()
    before = adapter_state(pipe)
    config = TrainConfig(**{**CONFIG.__dict__, "mixed_precision": "fp16"})
    with pytest.raises(ValueError, match="'fp16' needs a GPU"):
        train(pipe, DATASET, config, tokenize)
    assert before == {} and not list(adapter_layers(pipe.unet))


def test_bf16_mixed_precision_and_gradient_checkpointing_run_on_the_cpu() -> None:
    pipe = tiny_pipeline()
    config = TrainConfig(**{**CONFIG.__dict__, "steps": 2, "mixed_precision": "bf16"})
    losses = train(pipe, DATASET, config, tokenize)
    assert len(losses) == 2 and all(0 < v < 10 for v in losses)
    assert {p.dtype for p in pipe.unet.parameters()} == {torch.bfloat16}  # ready to sample
    plain, checkpointed = tiny_pipeline(), tiny_pipeline()
    one_step = TrainConfig(**{**CONFIG.__dict__, "steps": 1})
    expected = train(plain, DATASET, one_step, tokenize)
    recomputed = TrainConfig(**{**one_step.__dict__, "gradient_checkpointing": True})
    assert train(checkpointed, DATASET, recomputed, tokenize) == expected
    ours, reference = adapter_state(checkpointed), adapter_state(plain)
    assert all(torch.allclose(ours[k], reference[k], atol=1e-6) for k in reference)


def test_sample_grids_are_written_every_n_steps(tmp_path) -> None:
    from PIL import Image

    config = TrainConfig(
        **{
            **CONFIG.__dict__,
            "steps": 3,
            "sample_every": 2,
            "sample_prompts": ("a digit 1", "a digit 2"),
            "sample_inference_steps": 2,
        }
    )
    train(tiny_pipeline(), DATASET, config, tokenize, checkpoint_dir=tmp_path)
    grids = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert grids == ["step_000002.png", "step_000003.png"]  # every 2 steps, and the last
    width, height = Image.open(tmp_path / "samples" / grids[0]).size
    assert width == 2 * height  # one row, a square image per prompt
    with pytest.raises(ValueError, match="give checkpoint_dir or sample_dir"):
        train(tiny_pipeline(), DATASET, config, tokenize)


def test_image_folder_refuses_a_missing_folder(tmp_path) -> None:
    with pytest.raises(ValueError, match="is not a directory"):
        ImageCaptionFolder(tmp_path / "nowhere", resolution=16)


def test_images_are_resized_by_the_shorter_side_and_cropped_never_squashed(tmp_path) -> None:
    from lokr_edu.diffusion import resize_and_crop

    wide = Image.new("RGB", (60, 20), (255, 0, 0))  # red | green | blue, 20 px each
    wide.paste((0, 255, 0), (20, 0, 40, 20))
    wide.paste((0, 0, 255), (40, 0, 60, 20))
    centre = np.asarray(resize_and_crop(wide, 8))
    assert centre.shape == (8, 8, 3) and (centre[:, :, 1] > 200).all()  # all green: no squash
    assert (np.asarray(resize_and_crop(wide, 8, left=0.0))[:, :2, 0] > 200).all()  # red edge
    assert (np.asarray(resize_and_crop(wide, 8, left=1.0))[:, -2:, 2] > 200).all()  # blue edge
    tall = np.asarray(resize_and_crop(wide.rotate(90, expand=True), 8))
    assert tall.shape == (8, 8, 3) and (tall[:, :, 1] > 200).all()
    wide.save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("a wide flag")
    fixed = ImageCaptionFolder(tmp_path, 8, center_crop=True, random_flip=True)
    random = ImageCaptionFolder(tmp_path, 8)
    draws = [random.draw(0, torch.Generator().manual_seed(s))[0] for s in range(20)]
    flips = [fixed.draw(0, torch.Generator().manual_seed(s))[0] for s in range(20)]
    assert any(d[0, 0, 0] > 0.9 for d in draws) and any(d[2, 0, -1] > 0.9 for d in draws)
    assert torch.equal(draws[3], random.draw(0, torch.Generator().manual_seed(3))[0])
    assert all(torch.equal(f, fixed[0][0]) or torch.equal(f, fixed[0][0].flip(-1)) for f in flips)
    assert any(not torch.equal(f, fixed[0][0]) for f in flips)  # some flipped


def test_unreadable_images_and_missing_or_empty_captions_are_named_at_construction(
    tmp_path,
) -> None:
    Image.new("RGB", (20, 20)).save(tmp_path / "good.png")
    (tmp_path / "good.txt").write_text("a good image")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (tmp_path / "broken.txt").write_text("a broken image")
    good = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "truncated.txt").write_text("half an image")
    Image.new("RGB", (20, 20)).save(tmp_path / "silent.png")
    (tmp_path / "silent.txt").write_text("  \n")
    Image.new("RGB", (20, 20)).save(tmp_path / "latin.png")
    (tmp_path / "latin.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError) as error:
        ImageCaptionFolder(tmp_path, resolution=16)
    message = str(error.value)
    assert f"{tmp_path / 'broken.png'}: not a readable image" in message
    assert f"{tmp_path / 'truncated.png'}: not a readable image" in message
    assert f"{tmp_path / 'silent.txt'}: empty caption" in message
    assert f"{tmp_path / 'latin.txt'}: caption not readable as UTF-8" in message
    assert "good" not in message


def test_a_diverging_run_stops_at_the_step_and_keeps_the_last_good_checkpoint(tmp_path) -> None:
    from lokr_edu.io import read_safetensors

    config = TrainConfig(
        method="lora",
        rank=2,
        steps=6,
        batch_size=2,
        learning_rate=1e30,  # absurd: the first update overflows the adapter, step 2 is NaN
        max_grad_norm=None,
        checkpoint_every=1,
    )
    with pytest.raises(FloatingPointError) as error:
        train(tiny_pipeline(), DATASET, config, tokenize, checkpoint_dir=tmp_path)
    message = str(error.value)
    _, metadata = read_safetensors(tmp_path / "checkpoint.safetensors")
    step = int(metadata["step"])
    assert f"the loss of step {step + 1} is nan" in message
    assert f"last good checkpoint, {tmp_path / 'checkpoint.safetensors'} (step {step})" in message
    tensors, _ = read_safetensors(tmp_path / "checkpoint.safetensors")
    assert all(torch.isfinite(t).all() for k, t in tensors.items() if k.startswith("param."))


def test_generate_batches_are_sized_for_a_16_gb_gpu() -> None:
    from types import SimpleNamespace

    from lokr_edu.diffusion import default_batch_size

    def pipe(sample_size: int) -> SimpleNamespace:
        unet = SimpleNamespace(config=SimpleNamespace(sample_size=sample_size))
        return SimpleNamespace(unet=unet, vae_scale_factor=8)

    assert default_batch_size(pipe(64)) == 8  # SD1.5 at 512²: 16 U-Net rows with guidance
    assert default_batch_size(pipe(64), resolution=256) == 32
    assert default_batch_size(pipe(96)) == 3  # 768²
    assert default_batch_size(pipe(1)) == 250  # chapter 07's tiny model: one batch


def test_runs_in_different_precisions_follow_one_another_in_one_process() -> None:
    """accelerate keeps one mixed precision per process; train does mixed precision with
    torch.autocast (public API), so "no", then "bf16", then "no" again each run as asked, and the
    last equals the first bit for bit (nothing of the bf16 run is left behind)."""
    seen: list[torch.dtype | None] = []

    def record(module, args) -> None:
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)

    config = TrainConfig(**{**CONFIG.__dict__, "steps": 2})
    runs = {}
    for name, precision in [("first", "no"), ("bf16", "bf16"), ("again", "no")]:
        pipe = tiny_pipeline()
        handle = pipe.unet.register_forward_pre_hook(record)
        seen.clear()
        mixed = TrainConfig(**{**config.__dict__, "mixed_precision": precision})
        runs[name] = (train(pipe, DATASET, mixed, tokenize), adapter_state(pipe), set(seen))
        handle.remove()
    assert runs["first"][2] == runs["again"][2] == {None}  # fp32: no autocast
    assert runs["bf16"][2] == {torch.bfloat16}
    assert runs["again"][0] == runs["first"][0]
    first, again = runs["first"][1], runs["again"][1]
    assert all(torch.equal(again[k], first[k]) for k in first)


def test_an_fp16_update_whose_gradients_overflow_is_skipped_and_the_schedule_waits() -> None:
    """The fp16 path of train's update (torch.amp.GradScaler, as accelerate's fp16 does), run on
    the CPU: inf gradients skip the step and halve the scale, and the LR schedule does not move."""
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    from lokr_edu.diffusion import _optimizer_update

    weight = torch.nn.Parameter(torch.ones(3))
    accelerator = Accelerator(mixed_precision="no")
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    schedule = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=10)
    optimizer, schedule = accelerator.prepare(optimizer, schedule)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for gradient, moves in [(torch.tensor([1.0, float("inf"), 1.0]), False), (torch.ones(3), True)]:
        before, lr, scale = weight.detach().clone(), schedule.get_last_lr()[0], scaler.get_scale()
        accelerator.backward(scaler.scale((weight * gradient).sum()))
        _optimizer_update(accelerator, optimizer, schedule, scaler, [weight], max_grad_norm=1.0)
        assert (not torch.equal(weight, before)) == moves
        assert (schedule.get_last_lr()[0] != lr) == moves
        assert scaler.get_scale() == (scale if moves else scale / 2)
        assert weight.grad is None or not weight.grad.any()  # zeroed for the next step


def _small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)  # frozen, as the U-Net's own weights are
    return model


def _steps(model: torch.nn.Module, optimizer, steps: range) -> None:
    for step in steps:
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


class CountingSGD(torch.optim.SGD):
    """SGD that also counts its steps in each parameter's state, as a Python int."""

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["steps"] = self.state[p].get("steps", 0) + 1
        return super().step(closure)


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.01),
        lambda ps: torch.optim.Adam(ps, lr=0.1, amsgrad=True),  # + max_exp_avg_sq
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),  # momentum_buffer
        lambda ps: CountingSGD(ps, lr=0.1),  # a Python number in the state: JSON metadata
        lambda ps: torch.optim.Adagrad(ps, lr=0.1),  # sum
        lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.5, centered=True),
        lambda ps: torch.optim.NAdam(ps, lr=0.1),  # mu_product
        lambda ps: torch.optim.Rprop(ps, lr=0.1),  # prev, step_size
    ],
    ids=["AdamW", "Adam-amsgrad", "SGD-nesterov", "CountingSGD", "Adagrad", "RMSprop", "NAdam"]
    + ["Rprop"],
)
def test_a_checkpoint_holds_any_optimizers_state_and_resumes_it_exactly(tmp_path, make) -> None:
    from lokr_edu.diffusion import load_checkpoint, save_checkpoint

    def trainable(model):
        return [p for p in model.parameters() if p.requires_grad]

    straight = _small_model()
    optimizer = make(trainable(straight))
    _steps(straight, optimizer, range(3))
    save_checkpoint(tmp_path / "c.safetensors", straight, optimizer, CONFIG, 3)
    _steps(straight, optimizer, range(3, 6))

    resumed = _small_model()  # fresh factors and a fresh optimizer: all comes from the file
    again = make(trainable(resumed))
    assert load_checkpoint(tmp_path / "c.safetensors", resumed, again, CONFIG) == 3
    _steps(resumed, again, range(3, 6))
    pairs = zip(resumed.parameters(), straight.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    ours, theirs = again.state_dict()["state"], optimizer.state_dict()["state"]
    assert ours.keys() == theirs.keys()
    for index in theirs:
        assert ours[index].keys() == theirs[index].keys()
        for key, value in theirs[index].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(ours[index][key], value), key
            else:
                assert ours[index][key] == value, key


def test_an_optimizer_state_that_would_need_a_pickle_is_refused(tmp_path) -> None:
    from lokr_edu.diffusion import save_checkpoint

    model = _small_model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    _steps(model, optimizer, range(1))
    optimizer.state[model[2].weight]["history"] = {1, 2}  # a set: neither a tensor nor JSON
    with pytest.raises(TypeError, match="neither a tensor nor JSON .* no pickles"):
        save_checkpoint(tmp_path / "c.safetensors", model, optimizer, CONFIG, 1)
    assert not (tmp_path / "c.safetensors").exists()


def test_a_checkpoint_of_the_older_format_is_refused_before_anything_changes(tmp_path) -> None:
    from lokr_edu.diffusion import load_checkpoint, save_checkpoint
    from lokr_edu.io import read_safetensors, write_safetensors_atomically

    model = _small_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    _steps(model, optimizer, range(2))
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, model, optimizer, CONFIG, 2)
    tensors, metadata = read_safetensors(path)
    del metadata["optimizer_values"]  # what lokr_edu wrote before: flattened moments, no values
    tensors = {k: v.reshape(-1) for k, v in tensors.items()}
    write_safetensors_atomically(tensors, path, metadata)
    fresh = _small_model()
    before = [p.detach().clone() for p in fresh.parameters()]
    again = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(ValueError, match="written by an older lokr_edu"):
        load_checkpoint(path, fresh, again, CONFIG)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), before, strict=True))


def test_every_name_of_the_split_modules_is_the_same_object_from_lokr_edu_diffusion() -> None:
    """diffusion.py was split by idea (sd_data, sd_checkpoint, sd_sampling); `from
    lokr_edu.diffusion import X` still gives the very object the new module defines."""
    from lokr_edu import diffusion, sd_checkpoint, sd_data, sd_sampling

    parts = [*sd_data.__all__, *sd_checkpoint.__all__, *sd_sampling.__all__]
    loop = [
        "TrainConfig",
        "noise_prediction_loss",
        "prior_preservation_loss",
        "CachedExamples",
        "EncodedExamples",
        "train",
    ]
    assert sorted(diffusion.__all__) == sorted([*loop, *parts]), (
        "lokr_edu.diffusion's public names are the loop's and every part's"
    )
    moved = {
        sd_data: ["IMAGE_SUFFIXES"],
        sd_checkpoint: ["CHECKPOINT_FILE", "_trainable"],
        sd_sampling: ["KOHYA_FILE", "DIFFUSERS_FILE"],
    }
    for module, constants in moved.items():
        for name in [*module.__all__, *constants]:
            assert getattr(diffusion, name) is getattr(module, name), name


def test_the_split_modules_import_without_the_training_loop() -> None:
    """The layering: data, checkpoints and sampling never import lokr_edu.diffusion at run time
    (only for annotations), so there is no import cycle."""
    import subprocess
    import sys

    code = (
        "import sys, lokr_edu.sd_data, lokr_edu.sd_checkpoint, lokr_edu.sd_sampling; "
        "assert 'lokr_edu.diffusion' not in sys.modules, 'imported the loop'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
