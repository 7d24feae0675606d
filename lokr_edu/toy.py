"""A base model you already have, and new tasks to adapt it to: chapter 05's CPU experiment.

Defined in chapter 05 (notebooks/05_finetune_on_cpu.ipynb).

Data: scikit-learn's 8×8 handwritten digits (1,797 images, shipped inside the package: no
download). The base model is a small MLP pretrained on upright digits by `pretrain` and stored as
`lokr_edu/data/digits_mlp.safetensors`, so every run of the chapter starts from the same weights:

    python -m lokr_edu.toy pretrain            # rewrites the shipped weights (about 20 s)

The new tasks show the same digits transformed (rotated, mirrored): same labels, different
pixels, so the pretrained features are close to useful but the base model does badly.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

__all__ = [
    "split_validation",
    "BASE_WEIGHTS",
    "TASKS",
    "Digits",
    "load_digits",
    "make_base_model",
    "load_base_model",
    "accuracy",
    "train",
    "pretrain",
]

BASE_WEIGHTS = Path(__file__).parent / "data" / "digits_mlp.safetensors"
TASKS = ("upright", "rot90", "rot180", "rot270", "mirror")


@dataclass(frozen=True)
class Digits:
    """A train/test split of one task: images flattened to 64 values in [0, 1], labels 0–9."""

    x_train: Tensor  # (n_train, 64)
    y_train: Tensor  # (n_train,)
    x_test: Tensor  # (n_test, 64)
    y_test: Tensor  # (n_test,)


def _transform(images: Tensor, task: str) -> Tensor:
    """images (n, 8, 8) as the task shows them."""
    if task == "upright":
        return images
    if task == "mirror":
        return images.flip(-1)
    turns = {"rot90": 1, "rot180": 2, "rot270": 3}[task]
    return torch.rot90(images, turns, dims=(-2, -1))


def load_digits(task: str = "upright", test_fraction: float = 0.33) -> Digits:
    """The digits of one task, split the same way for every task (a fixed permutation)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0  # (1797, 8, 8), values 0..16
    labels = torch.tensor(data.target, dtype=torch.long)
    x = _transform(images, task).reshape(len(images), 64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    n_test = int(len(x) * test_fraction)
    test, train_ = order[:n_test], order[n_test:]
    return Digits(x[train_], labels[train_], x[test], labels[test])


def split_validation(data: Digits, fraction: float = 0.2) -> tuple[Digits, Digits]:
    """Hold out the first `fraction` of data's training images for validation: (fit, tune).

    Both train on the remaining images; `fit` is evaluated on the real test images and `tune`
    on the held-out validation images (its x_test / y_test). Choices such as a learning rate
    are made with `tune`, so the test accuracy reported at the end was never used to make them.
    Defined in chapter 05."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be between 0 and 1, got {fraction}")
    n_val = int(len(data.x_train) * fraction)
    fit = Digits(data.x_train[n_val:], data.y_train[n_val:], data.x_test, data.y_test)
    held_out = data.x_train[:n_val], data.y_train[:n_val]
    tune = Digits(data.x_train[n_val:], data.y_train[n_val:], *held_out)
    return fit, tune


def make_base_model() -> nn.Sequential:
    """64 → 128 → 128 → 10 MLP with GELU: 26,122 parameters, three Linear layers to adapt."""
    return nn.Sequential(
        nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 10)
    )


def load_base_model(path: Path | str = BASE_WEIGHTS) -> nn.Sequential:
    """The pretrained base model, from safetensors (never a pickle)."""
    model = make_base_model()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Fraction of x whose highest logit is the label."""
    return (model(x).argmax(dim=-1) == y).float().mean().item()


def train(
    model: nn.Module,
    data: Digits,
    steps: int = 300,
    lr: float = 3e-3,
    batch_size: int = 128,
    seed: int = 0,
) -> list[float]:
    """Adam on the cross-entropy over the parameters that require grad; returns the losses.

    Batches are drawn with a seeded generator, so a run is reproducible on one machine.
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError("model: it has no trainable parameters")
    optimizer = torch.optim.Adam(parameters, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(steps):
        batch = torch.randint(len(data.x_train), (batch_size,), generator=generator)
        loss = nn.functional.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def pretrain(out: Path | str = BASE_WEIGHTS, steps: int = 2000, seed: int = 0) -> float:
    """Train the base model on upright digits, save it as safetensors; return test accuracy."""
    torch.manual_seed(seed)
    model = make_base_model()
    data = load_digits("upright")
    train(model, data, steps=steps, lr=1e-3, seed=seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    return accuracy(model, data.x_test, data.y_test)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lokr_edu.toy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=["pretrain"])
    parser.add_argument("--out", type=Path, default=BASE_WEIGHTS)
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    test_accuracy = pretrain(args.out, steps=args.steps)
    print(f"saved {args.out}: upright test accuracy {test_accuracy:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
