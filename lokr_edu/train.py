"""Fine-tune Stable Diffusion with LoRA / LoHa / LoKr from the command line, DreamBooth included.

Defined in chapters 07 and 08: the notebooks' `lokr_edu.diffusion.train`, outside the notebook,
at parity with diffusers' train_dreambooth_lora.py (its flags, spelled with dashes).

    python -m lokr_edu.train --data my_images --output runs/my_style \\
        --method lokr --steps 1000 --mixed-precision fp16 --gradient-checkpointing
    python -m lokr_edu.train --data my_dog --instance-prompt "a photo of sks dog" \\
        --with-prior-preservation --class-prompt "a photo of a dog" --class-data class_dog \\
        --num-class-images 200 --output runs/sks_dog --method lora --steps 500
    accelerate launch --multi_gpu -m lokr_edu.train --data ... --output ...

--model is a Hugging Face Hub id (default stable-diffusion-v1-5/stable-diffusion-v1-5) or a local
folder written by save_pretrained.

Settings come from, in this order (later wins): TrainConfig's defaults, the method's recipe
(`lokr_edu.sd_recipes`: learning rate, rank, targets and LoKr's factor for SD1.5, each with its
source; it fills in only what is not given), --config FILE (a JSON object of TrainConfig fields,
plus any of RUN_SETTINGS: "model", "data", "output", "resolution", "instance_prompt",
"class_prompt", ...), the flags. The training settings' flags are generated from TrainConfig,
one per field (--rank for rank, --batch-size for batch_size, --adapter-options '{"factor": 4}'
for the dict adapter_options, --sample-prompt repeated for sample_prompts), so none can be
missing. Without --mixed-precision in either, the precision that `accelerate launch
--mixed_precision` set (ACCELERATE_MIXED_PRECISION) is used, else "no".

--data is a folder of images, each with a caption in a .txt file of the same name, or with
--instance-prompt one caption for all of them (then no .txt is needed). Images are resized by
their shorter side to --resolution, then cropped square (at random, or the centre with
--center-crop), and flipped at random with --random-flip, as diffusers' scripts do.
DreamBooth's prior preservation (--with-prior-preservation, Ruiz et al. 2023): the frozen model
first draws --num-class-images images of --class-prompt into --class-data
(`lokr_edu.sd_class_images`; images already there are reused), and every step adds
λ = --prior-loss-weight times the loss on as many class images as instance images.
--output receives checkpoint.safetensors (every --checkpoint-every steps; --resume continues
from it exactly), log.csv (a row per step: loss, instance and prior loss, learning rate),
checkpoints/step_NNNNNN/ (the adapter exported at each checkpoint; the last
--checkpoints-total-limit kept), samples/step_NNNNNN.png (with --sample-every and
--sample-prompt), and at the end the trained adapter: adapter.safetensors (kohya/LyCORIS:
A1111, ComfyUI) and, for LoRA, pytorch_lora_weights.safetensors (diffusers:
pipe.load_lora_weights(output)). --report-to tensorboard also logs through accelerate's tracker.
Every bad input (a setting, the data: an unreadable image, a missing or empty caption, a caption
too long; the class folder; the model) is an error before the first step, and the data and the
class folder are checked before the model is loaded. A loss that is not finite stops the run
(status 1) at that step, leaving the last good checkpoint.
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import json
import os
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path

from lokr_edu.diffusion import (
    CHECKPOINT_FILE,
    LR_SCHEDULERS,
    METHODS,
    MIXED_PRECISION,
    REPORT_TO,
    ImageCaptionFolder,
    TrainConfig,
    export_adapter,
    load_pipeline,
    tokenize_captions,
    train,
)
from lokr_edu.sd15 import MODEL_ID, hide_known_harmless_notices
from lokr_edu.sd_class_images import check_class_folder, ensure_class_images
from lokr_edu.sd_recipes import help_table, with_recipe
from lokr_edu.validate import require_int

__all__ = ["build_parser", "loss_summary", "main", "settings_from"]

RUN_SETTINGS = {
    "model": MODEL_ID,
    "data": None,
    "output": None,
    "resolution": 512,
    "export": True,
    "center_crop": False,
    "random_flip": False,
    "instance_prompt": None,
    "with_prior_preservation": False,
    "class_prompt": None,
    "class_data": None,
    "num_class_images": 100,  # diffusers' default
    "sample_batch_size": None,  # None: lokr_edu.sd_sampling.default_batch_size
}
RECIPE = "the method's recipe, below"  # what --help shows as the default of a recipe setting
# What a TrainConfig field's flag needs beyond what the field's type and default say: its
# choices (the lists TrainConfig checks against), a spelling of its own, a help line.
FLAG_EXTRAS: dict[str, dict[str, object]] = {
    "method": {"choices": METHODS},
    "rank": {"shown": RECIPE},
    "alpha": {"shown": f"{RECIPE}, else the rank: scale 1"},
    "targets": {"help": "module-name patterns", "shown": RECIPE},
    "steps": {"help": "optimizer updates (diffusers: max_train_steps)"},
    "batch_size": {"help": "per process and micro-batch (and as many class images)"},
    "learning_rate": {"shown": RECIPE},
    "snr_gamma": {"help": "Min-SNR-γ weighting", "shown": "none"},
    "adapter_options": {
        "help": "the adapter's options as a JSON object, e.g. '{\"factor\": 4}'",
        "shown": f"{RECIPE}, key by key",
    },
    "lr_scheduler": {"choices": LR_SCHEDULERS},
    "mixed_precision": {
        "choices": tuple(MIXED_PRECISION),
        "shown": "accelerate launch's --mixed_precision, else no",
    },
    "sample_every": {"help": "save a sample grid every N steps", "shown": "0, none"},
    "sample_prompts": {
        "flag": "--sample-prompt",
        "action": "append",
        "metavar": "PROMPT",
        "help": "repeat for several",
    },
    "sample_resolution": {"help": "sample side", "shown": "--resolution"},
    "prior_loss_weight": {"help": "DreamBooth's λ: the weight of the class images' loss"},
    "caption_dropout": {"help": "probability that a caption is replaced by the empty prompt"},
    "cache_latents": {
        "help": "encode the images and captions once, before the first step (crops and flips "
        "then fixed at the centre, unflipped)"
    },
    "checkpoints_total_limit": {
        "help": "keep only the last N checkpoints/step_NNNNNN folders",
        "shown": "keep all",
    },
    "report_to": {
        "choices": REPORT_TO,
        "help": "also log the loss and learning rate through accelerate's tracker, into OUTPUT "
        "(tensorboard: pip install tensorboard)",
    },
}
# every TrainConfig field has a flag (--field-name), its value stored under the field's name
CONFIG_FLAGS = [f.name for f in dataclasses.fields(TrainConfig)]


def _json_object(text: str) -> dict:
    """argparse type of a dict field: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def _flag_options(name: str, hint: object) -> dict[str, object]:
    """argparse options of the TrainConfig field `name` from its type: bool, int, float, str, a
    sequence of str, a dict (a JSON object), each maybe `| None` (the flag then gives the value).
    Any other type is a TypeError, so that a new field gets a flag or fails loudly (and in the
    tests), never silently none."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        kinds = [kind for kind in typing.get_args(hint) if kind is not type(None)]
        hint = kinds[0] if len(kinds) == 1 else hint
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if hint in (int, float, str):
        return {"type": hint}
    if origin in (collections.abc.Sequence, tuple, list) and args[:1] == (str,):
        return {"nargs": "+"}
    if hint is dict or origin is dict:
        return {"type": _json_object, "metavar": "JSON"}
    raise TypeError(
        f"TrainConfig.{name}: lokr_edu.train has no command-line form for {hint!r}; "
        "give it one in train._flag_options"
    )


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, generated from the dataclass: --rank for rank,
    --batch-size for batch_size, ... (FLAG_EXTRAS adds choices, help and --sample-prompt)."""
    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig()
    group = parser.add_argument_group("training settings (TrainConfig's fields; --config too)")
    for field in dataclasses.fields(TrainConfig):
        extras = dict(FLAG_EXTRAS.get(field.name, {}))
        flag = extras.pop("flag", "--" + field.name.replace("_", "-"))
        options = {} if "action" in extras else _flag_options(field.name, hints[field.name])
        default = getattr(defaults, field.name)
        if isinstance(default, tuple):
            default = " ".join(default)
        default = extras.pop("shown", default)
        words = [extras.pop("help", ""), f"(default: {default})" if default not in ("", {}) else ""]
        options["help"] = " ".join(str(w) for w in words if w).replace("%", "%%")
        group.add_argument(flag, dest=field.name, default=None, **options, **extras)


def build_parser() -> argparse.ArgumentParser:
    """The command line; every flag defaults to None, so that only flags given override.

    The run's own flags are written here; the training settings' flags are generated from
    TrainConfig, one per field (`_add_config_flags`); the epilog is the per-method recipes."""
    p = argparse.ArgumentParser(
        prog="python -m lokr_edu.train",
        description="Fine-tune a Stable Diffusion pipeline with a LoRA / LoHa / LoKr adapter,\n"
        "DreamBooth with prior preservation included (lokr_edu chapters 07 and 08).\n"
        "Multi-GPU: accelerate launch --multi_gpu -m lokr_edu.train ...",
        epilog="per-method defaults for SD1.5 (lokr_edu.sd_recipes), used for each of these "
        "settings\nnot given as a flag or in --config; a given value wins:\n" + help_table(),
        formatter_class=argparse.RawDescriptionHelpFormatter,  # keeps the epilog's table
    )
    p.add_argument("--config", type=Path, help="JSON file of TrainConfig fields (flags override)")
    p.add_argument("--model", help=f"hub id or local folder (default {MODEL_ID})")
    p.add_argument("--data", type=Path, help="folder of images with .txt captions")
    p.add_argument("--output", type=Path, help="folder for checkpoints, logs, samples, exports")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT's checkpoint")
    p.add_argument("--resolution", type=int, help="image side in pixels (default 512)")
    p.add_argument(
        "--center-crop",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="crop the centre of each resized image (default: a random crop each time)",
    )
    p.add_argument(
        "--random-flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="flip images left-right at random (default: no)",
    )
    p.add_argument(
        "--export",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write the adapter in the kohya and (LoRA) diffusers formats at the end (default)",
    )
    dreambooth = p.add_argument_group(
        "DreamBooth (diffusers' train_dreambooth_lora.py; --config too)"
    )
    dreambooth.add_argument(
        "--instance-prompt",
        help="one caption for every image of --data, e.g. 'a photo of sks dog' (no .txt needed)",
    )
    dreambooth.add_argument(
        "--with-prior-preservation",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="add λ (--prior-loss-weight) × the loss on class images the frozen model drew",
    )
    dreambooth.add_argument(
        "--class-prompt", help="the class images' prompt, e.g. 'a photo of a dog'"
    )
    dreambooth.add_argument(
        "--class-data",
        type=Path,
        help="folder of class images: the missing ones are drawn there, those there reused",
    )
    dreambooth.add_argument(
        "--num-class-images",
        type=int,
        help=f"class images to train with (default {RUN_SETTINGS['num_class_images']})",
    )
    dreambooth.add_argument(
        "--sample-batch-size",
        type=int,
        help="class images drawn at once (default: lokr_edu.sd_sampling.default_batch_size, "
        "8 at 512 px, sized for a 16 GB GPU)",
    )
    _add_config_flags(p)
    return p


def _check_dreambooth(run: dict[str, object]) -> None:
    """The DreamBooth run settings, as diffusers' script checks them (but errors, not warnings):
    prior preservation needs a class prompt and folder, and those need it. ValueError if bad."""
    flags = {name: "--" + name.replace("_", "-") for name in RUN_SETTINGS}
    if not isinstance(run["with_prior_preservation"], bool):
        raise ValueError(
            f"{flags['with_prior_preservation']} is true or false, "
            f"got {run['with_prior_preservation']!r}"
        )
    for name in ("instance_prompt", "class_prompt"):
        if run[name] is not None and (not isinstance(run[name], str) or not run[name].strip()):
            raise ValueError(f"{flags[name]}: give a non-empty prompt, got {run[name]!r}")
    require_int(flags["num_class_images"], run["num_class_images"])
    if run["sample_batch_size"] is not None:
        require_int(flags["sample_batch_size"], run["sample_batch_size"])
    class_settings = ("class_prompt", "class_data")
    if run["with_prior_preservation"]:
        missing = [flags[name] for name in class_settings if run[name] is None]
        if missing:
            raise ValueError(
                f"--with-prior-preservation needs {' and '.join(missing)} (the class images' "
                "prompt and folder, e.g. --class-prompt 'a photo of a dog' --class-data class_dog)"
            )
    else:
        given = " and ".join(flags[name] for name in class_settings if run[name] is not None)
        if given:
            raise ValueError(
                f"{given}: used only with --with-prior-preservation (DreamBooth's prior), which "
                f"is off; add it, or leave {given} out"
            )


def settings_from(args: argparse.Namespace) -> tuple[TrainConfig, dict[str, object]]:
    """(TrainConfig, run settings) from defaults < the method's recipe < --config file < flags
    (the recipe fills in only what neither gave). ValueError if bad."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    settings: dict[str, object] = {}
    if args.config is not None:
        if not args.config.is_file():
            raise ValueError(f"--config: {args.config} is not a file")
        try:
            settings = json.loads(args.config.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"--config: {args.config} is not valid JSON: {error}") from None
        if not isinstance(settings, dict):
            raise ValueError(f"--config: {args.config} must hold a JSON object")
        unknown = sorted(set(settings) - fields - set(RUN_SETTINGS))
        if unknown:
            raise ValueError(
                f"--config: unknown settings {unknown}; known: {sorted(fields | set(RUN_SETTINGS))}"
            )
    for name in [*CONFIG_FLAGS, *RUN_SETTINGS]:
        value = getattr(args, name, None)
        if value is not None:
            settings[name] = value
    if "mixed_precision" not in settings and os.environ.get("ACCELERATE_MIXED_PRECISION"):
        settings["mixed_precision"] = os.environ["ACCELERATE_MIXED_PRECISION"]
    run = {name: settings.pop(name, default) for name, default in RUN_SETTINGS.items()}
    if "sample_resolution" not in settings:
        settings["sample_resolution"] = run["resolution"]
    missing = [f"--{name}" for name in ("model", "data", "output") if run[name] is None]
    if missing:
        raise ValueError(f"give {', '.join(missing)} (as flags or in --config)")
    _check_dreambooth(run)
    settings = with_recipe(settings.get("method", TrainConfig.method), settings)
    return TrainConfig(**settings), run


def loss_summary(losses: Sequence[float]) -> str:
    """One line on how the loss went: its mean over the first and the last quarter of the steps.

    One step's loss is noisy (its t and ε are random), so the means say whether it fell."""
    quarter = max(1, len(losses) // 4)
    first, last = losses[:quarter], losses[-quarter:]
    return (
        f"loss over {len(losses)} steps: mean of the first {quarter} {sum(first) / quarter:.4f}, "
        f"of the last {quarter} {sum(last) / quarter:.4f}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, check everything, draw the class images, train, export. Errors exit with status 2
    and one message."""
    from accelerate.state import PartialState

    hide_known_harmless_notices()  # before the pipeline's first import
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config, run = settings_from(args)
        output = Path(run["output"])
        if output.exists() and not output.is_dir():
            raise ValueError(f"--output: {output} is a file, not a folder")
        if args.resume and not (output / CHECKPOINT_FILE).is_file():
            raise ValueError(f"resume: no checkpoint in {output}")
        resolution, prior = int(run["resolution"]), run["with_prior_preservation"]
        images = {"center_crop": bool(run["center_crop"]), "random_flip": bool(run["random_flip"])}
        # every image decoded and every caption read before the model loads (minutes on a GPU)
        dataset = ImageCaptionFolder(
            run["data"], resolution, caption=run["instance_prompt"], **images
        )
        class_prompt = run["class_prompt"]
        if prior:
            class_folder = Path(run["class_data"])
            try:
                check_class_folder(class_folder, class_prompt, resolution)
            except ValueError as error:
                raise ValueError(f"--class-data: {error}") from None
        pipe = load_pipeline(run["model"], dtype=MIXED_PRECISION[config.mixed_precision])
        if pipe.tokenizer is None:
            raise ValueError(f"--model: the pipeline in {run['model']} has no tokenizer")
        if dataset.resolution % pipe.vae_scale_factor:
            raise ValueError(
                f"resolution must be a positive multiple of {pipe.vae_scale_factor} (the VAE "
                f"downsamples by {pipe.vae_scale_factor}), got {dataset.resolution}"
            )
        # a caption or prompt too long for the text encoder stops here, before any drawing
        prompts = set(dataset.captions) | ({class_prompt} if prior else set())
        tokenize_captions(pipe.tokenizer, sorted(prompts))
        class_dataset = None
        if prior:
            state = PartialState()
            with state.main_process_first():  # the main process draws; the others reuse them
                pipe.to(state.device)
                ensure_class_images(
                    pipe,
                    class_folder,
                    class_prompt,
                    run["num_class_images"],
                    resolution,
                    seed=config.seed,
                    batch_size=run["sample_batch_size"],
                    progress=state.is_local_main_process,
                )
            class_dataset = ImageCaptionFolder(
                class_folder,
                resolution,
                caption=class_prompt,
                limit=run["num_class_images"],
                **images,
            )
        output.mkdir(parents=True, exist_ok=True)
        losses = train(
            pipe,
            dataset,
            config,
            lambda captions: tokenize_captions(pipe.tokenizer, captions),
            checkpoint_dir=output,
            resume=args.resume,
            class_dataset=class_dataset,
        )
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    except FloatingPointError as error:  # the loss diverged: say where, keep the checkpoint
        parser.exit(1, f"{parser.prog}: {error}\n")
    if losses and PartialState().is_main_process:
        print(loss_summary(losses))
    if run["export"] and PartialState().is_main_process:
        for path in export_adapter(pipe, output):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
