"""Checkpoints of an adapter's training run: written as it trains, resumed exactly.

Defined in chapter 07. A checkpoint is one safetensors file (CHECKPOINT_FILE in the run's folder):

    param.<name>                each trained parameter (the adapter's factors)
    optimizer.<name>.<key>      each tensor of the optimizer's state (AdamW: exp_avg, exp_avg_sq)
    metadata, JSON strings      the step, the TrainConfig (its key), the optimizer's param_groups
                                and other values, the LR schedule's state, the fp16 loss scale

Nothing is pickled (which is why `accelerator.save_state`, which pickles, is not used), and the
file is replaced atomically: a crash leaves the old checkpoint or the new one. Since every random
draw of `lokr_edu.diffusion.train` is seeded by (seed, step, micro-batch, process), a run that is
interrupted and resumed from a checkpoint ends with exactly the adapter of a run that was not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lokr_edu.io import read_safetensors, write_safetensors_atomically

if TYPE_CHECKING:  # for the annotations only: lokr_edu.diffusion imports this module
    from lokr_edu.diffusion import TrainConfig

__all__ = ["save_checkpoint", "load_checkpoint"]

CHECKPOINT_FILE = "checkpoint.safetensors"


def _trainable(unet: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in unet.named_parameters() if p.requires_grad]


def save_checkpoint(
    path: Path,
    unet: nn.Module,
    optimizer,
    config: TrainConfig,
    step: int,
    lr_scheduler=None,
    scaler=None,
) -> None:
    """The trained factors and the optimizer's state as tensors; step, config, LR schedule state
    and the fp16 loss scale (GradScaler) as JSON metadata. Atomic: a crash leaves the old file or
    the new one.

    Any torch optimizer's state is stored, whatever its keys (Adam's exp_avg, SGD's
    momentum_buffer, ...): each tensor of `optimizer.state_dict()["state"]` becomes the tensor
    "optimizer.<parameter name>.<key>", with its shape, and every other value (a number) goes to
    the JSON metadata "optimizer_values"; the param_groups (hyperparameters) are JSON too. A value
    that is neither a tensor nor JSON (which would need a pickle) is a TypeError."""
    trainable = _trainable(unet)
    tensors = {f"param.{n}": p.detach().to("cpu", copy=True) for n, p in trainable}
    state = optimizer.state_dict()
    values: dict[str, dict[str, object]] = {}
    for index, entries in state["state"].items():
        name = trainable[index][0]
        for key, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{name}.{key}"] = value.detach().to("cpu", copy=True)
            else:
                values.setdefault(name, {})[key] = value
    try:
        metadata = {
            "step": str(step),
            "config": config.key(),
            "param_groups": json.dumps(state["param_groups"]),
            "optimizer_values": json.dumps(values),
        }
    except TypeError as error:
        raise TypeError(
            f"{type(optimizer).__name__}'s state holds a value that is neither a tensor nor JSON "
            f"({error}); a checkpoint stores no pickles"
        ) from None
    if lr_scheduler is not None:
        metadata["lr_scheduler"] = json.dumps(lr_scheduler.state_dict())
    if scaler is not None:
        metadata["grad_scaler"] = json.dumps(scaler.state_dict())
    write_safetensors_atomically(tensors, Path(path), metadata)


def load_checkpoint(
    path: Path, unet: nn.Module, optimizer, config: TrainConfig, lr_scheduler=None, scaler=None
) -> int:
    """Restore a checkpoint written by `save_checkpoint`; returns the step to continue from.

    A checkpoint written by another configuration (TrainConfig.key) is refused before anything
    changes. The optimizer's state is rebuilt as `optimizer.state_dict()` had it and handed to
    `optimizer.load_state_dict`, which moves it to each parameter's device."""
    tensors, metadata = read_safetensors(path)
    if metadata.get("config") != config.key():
        raise ValueError(
            f"checkpoint {Path(path).name} was written by another configuration: "
            f"{metadata.get('config')} (this run: {config.key()})"
        )
    if "optimizer_values" not in metadata:  # the earlier format: Adam's moments, flattened
        raise ValueError(
            f"checkpoint {Path(path).name} was written by an older lokr_edu, which stored only "
            "Adam's moments, flattened; it cannot be resumed: start the run again"
        )
    trainable = _trainable(unet)
    with torch.no_grad():
        for name, p in trainable:
            p.copy_(tensors[f"param.{name}"])
    values = json.loads(metadata["optimizer_values"])
    state = {"state": {}, "param_groups": json.loads(metadata["param_groups"])}
    for index, (name, _) in enumerate(trainable):
        prefix = f"optimizer.{name}."  # a parameter's name is never another's prefix + "."
        entries = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        entries.update(values.get(name, {}))
        if entries:
            state["state"][index] = entries
    optimizer.load_state_dict(state)
    if lr_scheduler is not None and "lr_scheduler" in metadata:
        lr_scheduler.load_state_dict(json.loads(metadata["lr_scheduler"]))
    if scaler is not None and "grad_scaler" in metadata:
        scaler.load_state_dict(json.loads(metadata["grad_scaler"]))
    return int(metadata["step"])
