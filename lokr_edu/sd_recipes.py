"""Where to start fine-tuning SD1.5 with each method: its learning rate, rank and targets.

Defined in chapter 08. LoRA, LoHa and LoKr do not share one learning rate: the same step of
Adam moves ΔW = B·A, (B1·A1) ⊙ (B2·A2) and W1 ⊗ W2 by different amounts, and each method's
authors state their own starting point for SD1.5. `RECIPES[method]` holds those, each value
with the place it is stated:

    lora   diffusers' examples/dreambooth (train_dreambooth_lora.py and its README)
    loha   LyCORIS's example kohya config for LoHa, and its docs
    lokr   LyCORIS's example kohya config for LoKr, and its docs/Guidelines.md

LyCORIS's "preset=attn-mlp" wraps, inside each of the U-Net's Transformer2DModel blocks, every
Linear and 1×1 Conv2d (lycoris/config.py, lycoris/kohya.py): in SD1.5 that is ATTN_MLP below.
A LoKr "dimension" larger than any weight (LyCORIS: 100000) keeps both Kronecker factors full,
and its alpha is then ignored (scale 1; `lokr_edu.lowrank.lokr_scale`).

`with_recipe(method, given)` is how `python -m lokr_edu.train` uses them: the recipe fills in
every setting the user did not give, and a given value always wins (adapter_options key by
key). These are starting points with their provenance, not tuned optima: chapter 08 measures
them.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "ATTN_MLP",
    "RECIPES",
    "Default",
    "recipe_values",
    "with_recipe",
    "help_table",
    "markdown_table",
]

# LyCORIS preset=attn-mlp on SD1.5's U-Net: the Linear and 1×1 Conv2d layers of every
# Transformer2DModel (proj_in / proj_out are 1×1 convs in SD1.5, Linear in SD2).
ATTN_MLP = ("proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")

DIFFUSERS_SCRIPT = "diffusers examples/dreambooth/train_dreambooth_lora.py"
DIFFUSERS_README = "diffusers examples/dreambooth/README.md (LoRA on SD1.5)"
LOHA_CONFIG = "LyCORIS examples/training_configs/loha_config.toml"
LOKR_CONFIG = "LyCORIS example_configs/training_configs/lokr_config.toml"
GUIDELINES = "LyCORIS docs/Guidelines.md"


@dataclass(frozen=True)
class Default:
    """One setting's value and where it is stated (the quoted words are the source's own)."""

    value: object
    source: str


RECIPES: dict[str, dict[str, Default]] = {
    "lora": {
        "learning_rate": Default(1e-4, f'{DIFFUSERS_README}: "--learning_rate=1e-4"'),
        "rank": Default(
            4, f'{DIFFUSERS_SCRIPT}: "--rank" default=4, lora_alpha=args.rank (scale 1)'
        ),
        "targets": Default(
            ("to_k", "to_q", "to_v", "to_out.0"),
            f'{DIFFUSERS_SCRIPT}: target_modules=["to_k", "to_q", "to_v", "to_out.0", '
            '"add_k_proj", "add_v_proj"] (SD1.5 has no add_k_proj / add_v_proj)',
        ),
    },
    "loha": {
        "learning_rate": Default(2e-4, f'{LOHA_CONFIG}: "unet_lr = 2e-4"'),
        "rank": Default(
            8, f'{LOHA_CONFIG}: "network_dim = 8" (LyCORIS docs/Algo-List.md: "dim <= 32")'
        ),
        "alpha": Default(
            4,
            f'{LOHA_CONFIG}: "network_alpha = 4" (docs/Algo-List.md: "alpha from 1 (or lower) '
            'to half dimension")',
        ),
        "targets": Default(
            ATTN_MLP,
            f'{LOHA_CONFIG}: "preset=attn-mlp"; {GUIDELINES}: "sticking to `preset=attn-mlp` '
            'in most cases"',
        ),
    },
    "lokr": {
        "learning_rate": Default(2e-4, f'{LOKR_CONFIG}: "unet_lr = 2e-4"'),
        "rank": Default(
            100_000,
            f'{LOKR_CONFIG}: "network_dim = 100000"; {GUIDELINES}: "full dimension (by setting '
            'dimension to arbitrarily large numbers like 100000)"',
        ),
        "adapter_options": Default(
            {"factor": 6},
            f'{LOKR_CONFIG}: "factor=6"; {GUIDELINES}: "LoKr with low factors (like 4 to 8)"',
        ),
        "targets": Default(
            ATTN_MLP,
            f'{LOKR_CONFIG}: "preset=attn-mlp"; {GUIDELINES}: "sticking to `preset=attn-mlp` '
            'in most cases"',
        ),
    },
}


def recipe_values(method: str) -> dict[str, object]:
    """{setting: value} of the method's recipe; {} for a method without one."""
    return {name: default.value for name, default in RECIPES.get(method, {}).items()}


def with_recipe(method: str, given: Mapping[str, object]) -> dict[str, object]:
    """The settings `given` (TrainConfig field names), with the method's recipe for every one
    not given; adapter_options are merged key by key, the given keys winning."""
    settings = dict(given)
    for name, value in recipe_values(method).items():
        if name == "adapter_options":
            settings[name] = {**value, **dict(settings.get(name) or {})}
        elif name not in settings:
            settings[name] = value
    return settings


def _shown(value: object) -> str:
    """A value as its flag takes it: 1e-4 (not 0.0001), targets space-separated, JSON options."""
    if isinstance(value, float):
        return f"{value:.0e}".replace("e-0", "e-")
    if isinstance(value, tuple):
        return " ".join(value)
    if isinstance(value, dict):
        return f"'{json.dumps(value)}'"
    return str(value)


def help_table(width: int = 96) -> str:
    """The recipes as `--help` shows them: per method, each setting's flag and value, then its
    source below it, wrapped to `width` columns."""
    lines = []
    for method, recipe in RECIPES.items():
        lines.append(f"  {method}")
        for name, default in recipe.items():
            lines.append(f"    --{name.replace('_', '-')} {_shown(default.value)}")
            lines += textwrap.wrap(
                default.source,
                width,
                initial_indent=" " * 8,
                subsequent_indent=" " * 10,
                break_on_hyphens=False,
            )
    return "\n".join(lines)


def markdown_table() -> str:
    """The recipes as the README's table: method, setting, value, source."""
    rows = ["| method | setting | value | source |", "| --- | --- | --- | --- |"]
    for method, recipe in RECIPES.items():
        for name, default in recipe.items():
            value = _shown(default.value).strip("'")
            source = default.source.replace("|", "\\|")
            rows.append(f"| {method} | `--{name.replace('_', '-')}` | `{value}` | {source} |")
    return "\n".join(rows)
