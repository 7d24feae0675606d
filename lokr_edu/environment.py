"""What chapter 00 checks: installed versions against pyproject's lower bounds, and the device.

Defined in chapter 00 (notebooks/00_setup.ipynb).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata

import torch
from packaging.requirements import Requirement

__all__ = ["PackageStatus", "check_installation", "best_device"]


@dataclass(frozen=True)
class PackageStatus:
    name: str
    required: str  # the specifier from pyproject, e.g. ">=2.1"
    installed: str | None  # None when missing
    ok: bool

    def advice(self) -> str:
        if self.ok:
            return "ok"
        if self.installed is None:
            return f"missing: run `make install` (or pip install '{self.name}{self.required}')"
        return f"too old ({self.installed}): pip install -U '{self.name}{self.required}'"


def check_installation(extras: tuple[str, ...] = ("dev",)) -> list[PackageStatus]:
    """One row per requirement of lokr-edu (core, plus the given extras), in pyproject order.

    An extra that names another of lokr-edu's own (`dev` includes `lokr-edu[course]`) brings
    that extra's requirements in, not a row for lokr-edu itself."""
    requirements = [Requirement(line) for line in metadata.requires("lokr-edu") or []]

    def wanted(requirement: Requirement, chosen: set[str]) -> bool:
        marker = requirement.marker
        return marker is None or any(marker.evaluate({"extra": e}) for e in chosen)

    chosen = set(extras)
    while True:  # the extras the chosen ones include, transitively
        more = {
            e for r in requirements if r.name == "lokr-edu" and wanted(r, chosen) for e in r.extras
        }
        if more <= chosen:
            break
        chosen |= more
    rows = []
    for requirement in requirements:
        if requirement.name == "lokr-edu" or not wanted(requirement, chosen):
            continue
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            installed = None
        ok = installed is not None and requirement.specifier.contains(installed, prereleases=True)
        rows.append(PackageStatus(requirement.name, str(requirement.specifier), installed, ok))
    return rows


def best_device() -> str:
    """'cuda' if an NVIDIA GPU is usable, else 'mps' on Apple silicon, else 'cpu'."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"
