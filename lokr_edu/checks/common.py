"""What every chapter's checks share: the error they raise and how they report.

Each `check_*` takes the student's function, runs it on cases with known answers, and either
prints one line starting with ✓ or raises `CheckError` saying what is wrong: a shape, a value,
and a hint at the likely mistake. The reference answers are the package's own functions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["CheckError", "call_student", "passed", "random_tensor", "require_tensor", "shape_str"]


class CheckError(AssertionError):
    """A student's answer is wrong; the message says how."""


def passed(message: str) -> None:
    print(f"✓ {message}")


def random_tensor(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def shape_str(t: torch.Tensor) -> str:
    return "×".join(str(s) for s in t.shape)


def require_tensor(name: str, value: object, shape: tuple[int, ...], context: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise CheckError(f"{name} must return a torch.Tensor, got {type(value).__name__} {context}")
    if tuple(value.shape) != shape:
        raise CheckError(f"{name} returned shape {tuple(value.shape)} {context}; expected {shape}")


def call_student(
    name: str, function: Callable, *args: object, context: str, **kwargs: object
) -> object:
    """Call the student's function; report a crash with the case that caused it."""
    try:
        return function(*args, **kwargs)
    except (NotImplementedError, CheckError):
        raise
    except Exception as error:
        raise CheckError(f"{name} raised {type(error).__name__} {context}: {error}") from error
