"""The checks every public function makes on its arguments, in one place.

Each raises ValueError naming the argument and saying what it got, so a student sees "rank must
be a positive integer, got 0" rather than a shape error deep inside torch.
"""

from __future__ import annotations

import torch

__all__ = ["require_int", "require_matrix"]


def require_int(name: str, value: object, least: int = 1) -> int:
    """value, if it is an int (not a bool) ≥ least; else ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        kind = {0: "a non-negative integer", 1: "a positive integer"}.get(
            least, f"an integer ≥ {least}"
        )
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return value


def require_matrix(name: str, value: object, *, allow_empty: bool = False) -> torch.Tensor:
    """value, if it is a 2-D torch.Tensor (with no empty dimension unless allow_empty)."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got a tensor of shape {tuple(value.shape)}")
    if not allow_empty and 0 in value.shape:
        raise ValueError(f"{name} has an empty dimension: shape {tuple(value.shape)}")
    return value
