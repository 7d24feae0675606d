"""Fine-tune Stable Diffusion with LoRA / LoHa / LoKr from the command line.

Defined in chapter 07: the notebook's `lokr_edu.diffusion.train`, outside the notebook.

    python -m lokr_edu.train --data my_images --output runs/my_style \\
        --method lokr --rank 8 --steps 1000 --mixed-precision fp16 --gradient-checkpointing
    accelerate launch --multi_gpu -m lokr_edu.train --data ... --output ...

--model is a Hugging Face Hub id (default stable-diffusion-v1-5/stable-diffusion-v1-5) or a local
folder written by save_pretrained.

Settings come from, in this order (later wins): TrainConfig's defaults, --config FILE (a JSON
object of TrainConfig fields, plus any of "model", "data", "output", "resolution", "export",
"center_crop", "random_flip"),
the flags. The training settings' flags are generated from TrainConfig, one per field (--rank
for rank, --batch-size for batch_size, --adapter-options '{"factor": 4}' for the dict
adapter_options, --sample-prompt repeated for sample_prompts), so none can be missing. Without
--mixed-precision in either, the precision that `accelerate launch --mixed_precision` set
(ACCELERATE_MIXED_PRECISION) is used, else "no".

--data is a folder of images, each with a caption in a .txt file of the same name. Images are
resized by their shorter side to --resolution, then cropped square (at random, or the centre
with --center-crop), and flipped at random with --random-flip, as diffusers'
train_text_to_image_lora.py does.
--output receives checkpoint.safetensors (every --checkpoint-every steps; --resume continues
from it exactly), samples/step_NNNNNN.png (with --sample-every and --sample-prompt), and at the
end the trained adapter: adapter.safetensors (kohya/LyCORIS: A1111, ComfyUI) and, for LoRA,
pytorch_lora_weights.safetensors (diffusers: pipe.load_lora_weights(output)).
Every bad input (a setting, the data: an unreadable image, a missing or empty caption, a caption
too long; the model) is an error before the first step, and the data is checked before the model
is loaded. A loss that is not finite stops the run (status 1) at that step, leaving the last good
checkpoint.
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
    ImageCaptionFolder,
    TrainConfig,
    export_adapter,
    load_pipeline,
    tokenize_captions,
    train,
)
from lokr_edu.sd15 import MODEL_ID

__all__ = ["build_parser", "loss_summary", "main", "settings_from"]

RUN_SETTINGS = {
    "model": MODEL_ID,
    "data": None,
    "output": None,
    "resolution": 512,
    "export": True,
    "center_crop": False,
    "random_flip": False,
}
# What a TrainConfig field's flag needs beyond what the field's type and default say: its
# choices (the lists TrainConfig checks against), a spelling of its own, a help line.
FLAG_EXTRAS: dict[str, dict[str, object]] = {
    "method": {"choices": METHODS},
    "alpha": {"shown": "the rank: scale 1"},
    "targets": {"help": "module-name patterns"},
    "steps": {"help": "optimizer updates (diffusers: max_train_steps)"},
    "batch_size": {"help": "per process and micro-batch"},
    "snr_gamma": {"help": "Min-SNR-γ weighting", "shown": "none"},
    "adapter_options": {"help": "the adapter's options as a JSON object, e.g. '{\"factor\": 4}'"},
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
    TrainConfig, one per field (`_add_config_flags`)."""
    p = argparse.ArgumentParser(
        prog="python -m lokr_edu.train",
        description="Fine-tune a Stable Diffusion pipeline with a LoRA / LoHa / LoKr adapter "
        "(lokr_edu chapter 07). Multi-GPU: accelerate launch --multi_gpu -m lokr_edu.train ...",
    )
    p.add_argument("--config", type=Path, help="JSON file of TrainConfig fields (flags override)")
    p.add_argument("--model", help=f"hub id or local folder (default {MODEL_ID})")
    p.add_argument("--data", type=Path, help="folder of images with .txt captions")
    p.add_argument("--output", type=Path, help="folder for checkpoints, samples and exports")
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
    _add_config_flags(p)
    return p


def settings_from(args: argparse.Namespace) -> tuple[TrainConfig, dict[str, object]]:
    """(TrainConfig, run settings) from defaults < --config file < flags. ValueError if bad."""
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
    """Parse, check everything, train, export. Errors exit with status 2 and one message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config, run = settings_from(args)
        output = Path(run["output"])
        if output.exists() and not output.is_dir():
            raise ValueError(f"--output: {output} is a file, not a folder")
        if args.resume and not (output / CHECKPOINT_FILE).is_file():
            raise ValueError(f"resume: no checkpoint in {output}")
        # every image decoded and every caption read before the model loads (minutes on a GPU)
        dataset = ImageCaptionFolder(
            run["data"],
            int(run["resolution"]),
            center_crop=bool(run["center_crop"]),
            random_flip=bool(run["random_flip"]),
        )
        pipe = load_pipeline(run["model"], dtype=MIXED_PRECISION[config.mixed_precision])
        if pipe.tokenizer is None:
            raise ValueError(f"--model: the pipeline in {run['model']} has no tokenizer")
        if dataset.resolution % pipe.vae_scale_factor:
            raise ValueError(
                f"resolution must be a positive multiple of {pipe.vae_scale_factor} (the VAE "
                f"downsamples by {pipe.vae_scale_factor}), got {dataset.resolution}"
            )
        output.mkdir(parents=True, exist_ok=True)
        losses = train(
            pipe,
            dataset,
            config,
            lambda captions: tokenize_captions(pipe.tokenizer, captions),
            checkpoint_dir=output,
            resume=args.resume,
        )
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    except FloatingPointError as error:  # the loss diverged: say where, keep the checkpoint
        parser.exit(1, f"{parser.prog}: {error}\n")
    from accelerate.state import PartialState

    if losses and PartialState().is_main_process:
        print(loss_summary(losses))
    if run["export"] and PartialState().is_main_process:
        for path in export_adapter(pipe, output):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
