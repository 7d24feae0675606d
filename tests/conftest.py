"""The notebook harness: how nbval compares a notebook's outputs (with tests/sanitize.cfg).

pyproject's pytest options turn nbval on for notebooks/ and solutions/ (full output comparison,
kernel from the current environment, a generous per-cell timeout, the sanitize file). Here:
- stderr is not compared: a library's warning text changes between versions and says nothing
  about the chapter. Committed notebooks must still have no stderr at all (test_notebooks.py).
- Each worker uses its share of the cores, cores ÷ workers threads, and each notebook kernel
  it starts one thread (`setup_notebook`, BLAS/OpenMP below): with one worker per core, as
  `make test` runs, that is the share too, so the time of a test does not depend on which test
  shares the machine with it, and the outputs are those of the one thread they were made on.
"""

from __future__ import annotations

import os

import torch
from nbval.plugin import IPyNbCell


def share_of_the_cores() -> int:
    """Threads per pytest worker: the cores divided among the workers (xdist sets the count)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, (os.cpu_count() or 1) // workers)


# Before any kernel starts: BLAS/OpenMP read these at start-up (setup_notebook sets torch's).
for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(variable, "1")
torch.set_num_threads(share_of_the_cores())  # the worker's own tests
os.environ.setdefault("PYTHONHASHSEED", "0")
os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")

_compare_outputs = IPyNbCell.compare_outputs


def _without_stderr(outputs: list) -> list:
    return [
        o for o in outputs if not (o.get("output_type") == "stream" and o.get("name") == "stderr")
    ]


def compare_outputs_ignoring_stderr(self, test, ref, skip_compare=None):
    return _compare_outputs(self, _without_stderr(test), _without_stderr(ref), skip_compare)


IPyNbCell.compare_outputs = compare_outputs_ignoring_stderr
