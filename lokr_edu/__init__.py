"""lokr-edu: the companion package of a course on parameter-efficient fine-tuning.

Each module is the answer key of a chapter (see the README's syllabus). The names below are
the public ones that notebooks, tests and users rely on.
"""

from importlib.metadata import PackageNotFoundError, version

from lokr_edu.adapters import disable, enable, inject, merge, set_strength, unmerge
from lokr_edu.io import load_adapter, save_adapter
from lokr_edu.kron import factorize, kron

# The version is written once, in pyproject.toml; the install records it and this reads it.
try:
    __version__ = version("lokr-edu")
except PackageNotFoundError:  # a checkout put on sys.path by hand, never installed
    __version__ = "0+unknown"

__all__ = [
    "__version__",
    "disable",
    "enable",
    "factorize",
    "inject",
    "kron",
    "load_adapter",
    "merge",
    "save_adapter",
    "set_strength",
    "unmerge",
]
