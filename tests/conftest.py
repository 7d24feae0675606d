"""The notebook harness: how nbval compares a notebook's outputs (with tests/sanitize.cfg).

pyproject's pytest options turn nbval on for notebooks/ and solutions/ (full output comparison,
kernel from the current environment, a generous per-cell timeout, the sanitize file). Here:
- stderr is not compared: a library's warning text changes between versions and says nothing
  about the chapter. Committed notebooks must still have no stderr at all (test_notebooks.py).
- The kernel runs with fixed thread counts, so float reductions add up in the same order.
"""

from __future__ import annotations

import os

from nbval.plugin import IPyNbCell

# Before any kernel starts: BLAS/OpenMP read these at start-up.
for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(variable, "1")
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
