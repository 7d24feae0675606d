"""The console scripts that need an extra: each runs its command, or says in one line which
extra to install.

A plain `pip install lokr-edu` installs every console script but only the library's
dependencies. `lokr-edu-train` needs nothing more (it is `lokr_edu.train:main`). `lokr-edu-grade`
runs notebooks in a Jupyter kernel, so it needs the `[course]` extra; without it, it prints

    lokr-edu-grade needs the [course] extra: pip install 'lokr-edu[course]'

on stderr and exits with status 1, instead of a traceback from an import.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence

__all__ = ["COURSE_MODULES", "grade", "missing_modules"]

# pyproject.toml's [course] extra, distribution → the module it is imported as
# (tests/test_packaging.py keeps the two lists the same).
COURSE_MODULES = {
    "nbformat": "nbformat",
    "nbclient": "nbclient",
    "nbconvert": "nbconvert",
    "ipykernel": "ipykernel",  # the kernel each notebook runs in
    "jupyter-core": "jupyter_core",
    "traitlets": "traitlets",
}


def missing_modules(modules: Sequence[str]) -> list[str]:
    """The modules among `modules` that cannot be imported here (not installed, or blocked by a
    None in sys.modules), found without importing them."""
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # ValueError: in sys.modules with no __spec__
            found = False
        if not found:
            missing.append(name)
    return missing


def grade(argv: list[str] | None = None) -> int:
    """The `lokr-edu-grade` command: `lokr_edu.grade.main`, once the [course] extra is there."""
    if missing_modules(list(COURSE_MODULES.values())):
        print(
            "lokr-edu-grade needs the [course] extra: pip install 'lokr-edu[course]'",
            file=sys.stderr,
        )
        return 1
    from lokr_edu.grade import main

    return main(argv)
